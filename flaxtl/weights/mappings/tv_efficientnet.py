"""torchvision EfficientNet-B0..B7 state_dicts -> tv_efficientnet_* variables.

The variables are named like the state_dict keys (`torch_names`), so the map is
by name; which variant a file holds is told by its stem width, head width
(B1 and B2 differ only there) and the number of blocks in each stage.
"""

from __future__ import annotations

import re

from flaxtl.models import tv_efficientnet
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import torch_names
from flaxtl.weights.torch_file import TorchWeights

FAMILY = "tv_efficientnet"
_BLOCK = re.compile(r"features\.(\d+)\.(\d+)\.block\.")
_STEM = "features.0.0.weight"
_HEAD = "features.8.0.weight"
_TOP = "classifier.1.weight"


def detect(weights: TorchWeights) -> str | None:
  """The tv_efficientnet arch whose stem, head and stage depths keys show."""
  tensors = weights.tensors
  stem = torch_names.shape_of(tensors, _STEM)
  head = torch_names.shape_of(tensors, _HEAD)
  if stem is None or head is None or tuple(stem[1:]) != (3, 3, 3):
    return None
  depths = torch_names.stage_depths(tensors, _BLOCK)
  for arch in tv_efficientnet.VARIANTS:
    want = {s[0].stage: len(s) for s in tv_efficientnet.blocks(arch)}
    widths = (
      tv_efficientnet.stem_width(arch),
      tv_efficientnet.head_width(arch),
    )
    if (stem[0], head[0]) == widths and depths == want:
      return arch
  return None


def from_torch(
  weights: TorchWeights,
  arch: str | None = None,
  include_top: bool | None = None,
) -> Converted:
  """Maps a torchvision EfficientNet state_dict onto `arch` (detected if None).

  include_top: None takes the classifier when the file has one.
  """
  found = detect(weights)
  arch = torch_names.resolve_arch(weights.path, found, arch, FAMILY)
  return torch_names.from_torch(weights, arch, include_top, _TOP)
