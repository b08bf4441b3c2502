"""torchvision EfficientNet-B0..B7 state dicts -> tv_efficientnet_* variables.

The variables are named like the state dict's keys (`tv_common`). Which
variant a file holds is told by its stem width, head width (B1 and B2
differ only there) and the number of blocks in each stage.
"""

from __future__ import annotations

from flaxtl.models import tv_efficientnet
from flaxtl.weights.mappings import tv_common
from flaxtl.weights.torch_file import TorchWeights

CLASSIFIER = "classifier.1.weight"
_STEM = "features.0.0.weight"
_HEAD = f"features.{len(tv_efficientnet.STAGES) + 1}.0.weight"


def detect(weights: TorchWeights) -> str | None:
  """The variant whose stem, head and stage depths the file has."""
  if not tv_common.has(weights, _STEM, _HEAD, "features.1.0.block.0.0.weight"):
    return None
  stem, head = weights.tensors[_STEM].shape, weights.tensors[_HEAD].shape
  if tuple(stem[1:]) != (3, 3, 3) or len(head) != 4:
    return None
  depths = [
    tv_common.count(weights, f"features.{s}")
    for s in range(1, len(tv_efficientnet.STAGES) + 1)
  ]
  for arch in tv_efficientnet.VARIANTS:
    want = [len(stage) for stage in tv_efficientnet.blocks(arch)]
    widths = (
      tv_efficientnet.stem_width(arch),
      tv_efficientnet.head_width(arch),
    )
    if (stem[0], head[0]) == widths and depths == want:
      return arch
  return None


from_torch = tv_common.from_torch_for(CLASSIFIER)
