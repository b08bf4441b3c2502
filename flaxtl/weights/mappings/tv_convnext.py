"""torchvision ConvNeXt state dicts -> tv_convnext_* variables.

By name (`tv_common`); each block's `layer_scale`, (C, 1, 1) in torch, becomes
(C,). Which variant a file holds is told by its stem width and the number of
blocks per stage (Tiny and Small share widths, not depths; Small, Base and
Large share depths, not widths).
"""

from __future__ import annotations

import numpy as np

from flaxtl.models import tv_convnext
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import tv_common
from flaxtl.weights.torch_file import TorchWeights

CLASSIFIER = "classifier.2.weight"
_STEM = "features.0.0.weight"


def detect(weights: TorchWeights) -> str | None:
  """The variant whose stem width and stage depths the file has."""
  if not tv_common.has(weights, _STEM, "features.1.0.layer_scale"):
    return None
  stem = weights.tensors[_STEM].shape
  if tuple(stem[1:]) != (3, 4, 4):
    return None
  depths = tuple(
    tv_common.count(weights, f"features.{tv_convnext.stage_index(s)}")
    for s in range(4)
  )
  for arch, v in tv_convnext.VARIANTS.items():
    if stem[0] == v.widths[0] and depths == v.depths:
      return arch
  return None


def _layer_scale(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """(C, 1, 1) -> (C,); anything else is left to fail the shape check."""
  return array.reshape(shape) if array.shape == (*shape, 1, 1) else array


def from_torch(
  weights: TorchWeights, arch: str, include_top: bool | None = None
) -> Converted:
  depths = tv_convnext.VARIANTS[arch].depths
  fixups = {
    f"features/{tv_convnext.stage_index(s)}/{j}/layer_scale": _layer_scale
    for s, depth in enumerate(depths)
    for j in range(depth)
  }
  return tv_common.from_torch(weights, arch, include_top, CLASSIFIER, fixups)
