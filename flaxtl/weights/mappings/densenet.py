"""A Keras file's layers -> DenseNet variables (by Keras layer name).

The official ImageNet files were written by Keras 2 from keras-applications'
DenseNet, whose stem and top had other names ('conv1/conv', 'conv1/bn',
'fc1000'); Keras itself loads them by order. ALIASES maps those names.
"""

from __future__ import annotations

import functools

from flaxtl.models import keras_model
from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import keras_names

FAMILY = "densenet"
ALIASES = {
  "conv1/conv": "conv1_conv",
  "conv1/bn": "conv1_bn",
  "fc1000": "predictions",
}

# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, md5), from
# keras/src/applications/densenet.py.
_MD5 = {
  "densenet121": (
    "9d60b8095a5708f2dcce2bca79d332c7",
    "30ee3e1110167f948a6b9946edeeb738",
  ),
  "densenet169": (
    "d699b8f76981ab1b30698df4c175e90b",
    "b8c4d4c20dd625c148057b9ff1c1176b",
  ),
  "densenet201": (
    "1ceb130c1ea1b78c3bf6114dbdfd8807",
    "c13680b51ded0fb44dff2d8f86ac8bb1",
  ),
}
IMAGENET_FILES = {
  (arch, top): (
    f"densenet/{arch}_weights_tf_dim_ordering_tf_kernels"
    f"{'' if top else '_notop'}.h5",
    md5s[0 if top else 1],
  )
  for arch, md5s in _MD5.items()
  for top in (True, False)
}


@functools.cache
def _weighted(arch: str) -> frozenset[str]:
  return frozenset(keras_model.recorded(arch, include_top=False).weighted)


def detect(weights: keras_file.KerasWeights) -> str | None:
  """Which DenseNet the file holds (by its layer names), else None."""
  return keras_names.detect(
    weights, FAMILY, aliases=ALIASES, weighted=_weighted
  )


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str,
  include_top: bool | None = None,
) -> Converted:
  # Unnamed Keras 3 groups map by position, as ResNet's ('by_order').
  return keras_names.from_keras(
    weights,
    arch,
    include_top,
    aliases=ALIASES,
    found=detect(weights),
    class_keys=False,
  )
