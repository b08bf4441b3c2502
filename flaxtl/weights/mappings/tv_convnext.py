"""torchvision ConvNeXt state_dicts -> tv_convnext_* variables.

By name (`torch_names`); `layer_scale` (C, 1, 1) becomes (C,). Which variant a
file holds is told by its stem width and the number of blocks per stage
(Tiny and Small share widths, not depths; Small, Base and Large share depths,
not widths).
"""

from __future__ import annotations

import re

from flaxtl.models import tv_convnext
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import torch_names
from flaxtl.weights.torch_file import TorchWeights

FAMILY = "tv_convnext"
_BLOCK = re.compile(r"features\.(\d+)\.(\d+)\.block\.")
_STEM = "features.0.0.weight"
_TOP = "classifier.2.weight"


def detect(weights: TorchWeights) -> str | None:
  """The tv_convnext arch whose stem and stage depths the keys show."""
  tensors = weights.tensors
  stem = torch_names.shape_of(tensors, _STEM)
  if stem is None or tuple(stem[1:]) != (3, 4, 4):
    return None
  depths = torch_names.stage_depths(tensors, _BLOCK)
  for arch, v in tv_convnext.VARIANTS.items():
    want = {tv_convnext.stage_index(s): d for s, d in enumerate(v.depths)}
    if stem[0] == v.widths[0] and depths == want:
      return arch
  return None


def from_torch(
  weights: TorchWeights,
  arch: str | None = None,
  include_top: bool | None = None,
) -> Converted:
  """Maps a torchvision ConvNeXt state_dict onto `arch` (detected if None).

  include_top: None takes the classifier when the file has one.
  """
  found = detect(weights)
  arch = torch_names.resolve_arch(weights.path, found, arch, FAMILY)
  return torch_names.from_torch(weights, arch, include_top, _TOP)
