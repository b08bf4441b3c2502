"""torchvision ConvNeXt state_dicts -> tv_convnext_* variables.

By name (`tv_common`); `layer_scale` (C, 1, 1) becomes (C,). Which variant a
file holds is told by its stem width and the number of blocks per stage
(Tiny and Small share widths, not depths; Small, Base and Large share depths,
not widths).
"""

from __future__ import annotations

from collections.abc import Mapping
import re

import numpy as np

from flaxtl.models import tv_convnext
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import tv_common

FAMILY = "tv_convnext"
_BLOCK = re.compile(r"features\.(\d+)\.(\d+)\.block\.")
_STEM = "features.0.0.weight"
_TOP = "classifier.2.weight"


def detect_torch(tensors: Mapping[str, np.ndarray]) -> str | None:
  """The tv_convnext arch whose stem and stage depths the keys show."""
  tensors = tv_common.unwrap(tensors)
  stem = tv_common.shape_of(tensors, _STEM)
  if stem is None or tuple(stem[1:]) != (3, 4, 4):
    return None
  depths = tv_common.stage_depths(tensors, _BLOCK)
  for arch, v in tv_convnext.VARIANTS.items():
    want = {tv_convnext.stage_index(s): d for s, d in enumerate(v.depths)}
    if stem[0] == v.widths[0] and depths == want:
      return arch
  return None


def from_torch(
  tensors: Mapping[str, np.ndarray],
  arch: str | None = None,
  include_top: bool | None = None,
  src: str = "state_dict",
) -> Converted:
  """Maps a torchvision ConvNeXt state_dict onto `arch` (detected if None).

  include_top: None takes the classifier when the file has one.
  """
  tensors = tv_common.unwrap(tensors)
  arch = tv_common.resolve_arch(src, detect_torch(tensors), arch, FAMILY)
  return tv_common.from_torch(src, tensors, arch, include_top, _TOP)
