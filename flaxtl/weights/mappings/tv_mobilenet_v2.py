"""A torchvision MobileNetV2 state dict -> tv_mobilenet_v2."""

from __future__ import annotations

from flaxtl.models import tv_mobilenet_v2
from flaxtl.weights.mappings import tv_common
from flaxtl.weights.torch_file import TorchWeights

CLASSIFIER = "classifier.1.weight"


def detect(weights: TorchWeights) -> str | None:
  """tv_mobilenet_v2 when the keys are torchvision's MobileNetV2's."""
  last = len(tv_mobilenet_v2.blocks()) + 1
  keys = (
    "features.0.0.weight",
    "features.1.conv.0.0.weight",
    "features.2.conv.0.0.weight",
    f"features.{last}.0.weight",
  )
  if tv_common.has(weights, *keys) and tv_common.count(weights, "features") == (
    last + 1
  ):
    return tv_mobilenet_v2.ARCH
  return None


from_torch = tv_common.from_torch_for(CLASSIFIER)
