"""A Keras file's layers -> ConvNeXt variables (`flaxtl.models.convnext`).

Keras prefixes every ConvNeXt layer with the model's name
(`convnext_tiny_stage_0_block_0_depthwise_conv`); a model built under
another name is renamed to the architecture's. The size is told by the stem
width and the number of blocks in stage 2.
"""

from __future__ import annotations

import re

from flaxtl.errors import UserError
from flaxtl.models import convnext
from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import keras_names

_STEM = re.compile(r"(.+)_stem_conv")


def _prefix(weights: keras_file.KerasWeights) -> tuple[str, int] | None:
  """(model name, stem width) from the `<name>_stem_conv` layer."""
  for layer in weights.layers:
    m = _STEM.fullmatch((layer.name or "").rsplit("/", 1)[-1])
    if m and layer.arrays and layer.arrays[0].ndim == 4:
      return m.group(1), int(layer.arrays[0].shape[-1])
  return None


def detect(weights: keras_file.KerasWeights) -> str | None:
  """The ConvNeXt size the file holds (stem width, stage-2 depth)."""
  found = _prefix(weights)
  if found is None:
    return None
  name, width = found
  block = re.compile(re.escape(name) + r"_stage_2_block_(\d+)_depthwise_conv")
  depth = 1 + max(
    (
      int(m.group(1))
      for layer in weights.layers
      if (m := block.fullmatch(layer.name or ""))
    ),
    default=-1,
  )
  for arch, (depths, dims) in convnext.CONFIGS.items():
    if dims[0] == width and depths[2] == depth:
      return arch
  return None


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str = "convnext_tiny",
  include_top: bool | None = None,
) -> Converted:
  found = detect(weights)
  if found is not None and found != arch:
    raise UserError(
      f"{weights.path}: holds a {found} model, not {arch}; use --arch {found}"
    )
  aliases = {}
  prefix = _prefix(weights)
  if prefix is not None and prefix[0] != arch:
    old = prefix[0] + "_"
    aliases = {
      layer.name: arch + "_" + layer.name[len(old) :]
      for layer in weights.layers
      if layer.name and layer.name.startswith(old)
    }
  return keras_names.from_keras(weights, arch, include_top, aliases=aliases)
