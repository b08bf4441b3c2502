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
