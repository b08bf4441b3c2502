"""A Keras file's layers -> NASNetMobile variables (`flaxtl.models.nasnet`).

Every weighted NASNet layer has a Keras name, so layers map by name.
"""

from __future__ import annotations

from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import keras_names

# NASNetMobile's first cell; NASNetLarge (not provided) has 96 stem filters.
_STEM = ("stem_conv1", (3, 3, 3, 32))
_CELL = "reduction_conv_1_stem_1"


def detect(weights: keras_file.KerasWeights) -> str | None:
  """'nasnet_mobile' by its stem and first reduction cell.

  Names are taken without the name scopes a nested model's legacy h5 keeps.
  """
  layers = {
    layer.name.rsplit("/", 1)[-1]: layer
    for layer in weights.layers
    if layer.name
  }
  stem = layers.get(_STEM[0])
  if stem is None or _CELL not in layers:
    return None
  return "nasnet_mobile" if stem.arrays[0].shape == _STEM[1] else None


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str = "nasnet_mobile",
  include_top: bool | None = None,
) -> Converted:
  return keras_names.from_keras(weights, arch, include_top)
