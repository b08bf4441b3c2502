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
