"""A Keras file's layers -> ResNet v1/v2 variables (by Keras layer name).

The official ImageNet files (keras-applications' resnet_common, 2019) use the
layer names Keras 3 still uses, so no aliases are needed.
"""

from __future__ import annotations

import functools

from flaxtl.models import keras_model
from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import keras_names

FAMILY = "resnet"

# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, md5), from
# keras/src/applications/resnet.py WEIGHTS_HASHES (same files for v2).
_MD5 = {
  "resnet50": (
    "2cb95161c43110f7111970584f804107",
    "4d473c1dd8becc155b73f8504c6f6626",
  ),
  "resnet101": (
    "f1aeb4b969a6efcfb50fad2f0c20cfc5",
    "88cf7a10940856eca736dc7b7e228a21",
  ),
  "resnet152": (
    "100835be76be38e30d865e96f2aaae62",
    "ee4c566cf9a93f14d82f913c2dc6dd0c",
  ),
  "resnet50v2": (
    "3ef43a0b657b3be2300d5770ece849e0",
    "fac2f116257151a9d068a22e544a4917",
  ),
  "resnet101v2": (
    "6343647c601c52e1368623803854d971",
    "c0ed64b8031c3730f411d2eb4eea35b5",
  ),
  "resnet152v2": (
    "a49b44d1979771252814e80f8ec446f9",
    "ed17cf2e0169df9d443503ef94b23b33",
  ),
}
IMAGENET_FILES = {
  (arch, top): (
    f"resnet/{arch}_weights_tf_dim_ordering_tf_kernels"
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
  """Which ResNet the file holds (by its layer names), else None."""
  return keras_names.detect(weights, FAMILY, weighted=_weighted)


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str,
  include_top: bool | None = None,
) -> Converted:
  # Unnamed Keras 3 groups map by position: conv, BN and dense layers tell
  # themselves apart by their arrays' ranks ('by_order').
  return keras_names.from_keras(
    weights, arch, include_top, found=detect(weights), class_keys=False
  )
