"""A Keras file's layers -> Xception variables (`flaxtl.models.xception`).

Explicit Keras names map one to one; the four unnamed residual convolutions
and their BatchNormalizations map by their order (`name_repairs`).
"""

from __future__ import annotations

import re

from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import keras_names

_SEPCONV = re.compile(r"block\d+_sepconv\d")


def detect(weights: keras_file.KerasWeights) -> str | None:
  """'xception' when the file has Xception's named separable convolutions."""
  found = any(
    _SEPCONV.fullmatch(layer.name or "") and len(layer.arrays) in (2, 3)
    for layer in weights.layers
  )
  return "xception" if found else None


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str = "xception",
  include_top: bool | None = None,
) -> Converted:
  return keras_names.from_keras(weights, arch, include_top)
