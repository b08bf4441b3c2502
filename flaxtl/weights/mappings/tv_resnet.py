"""A torchvision (or timm) ResNet state dict -> tv_resnet18 ... tv_resnet152.

timm's ResNets use torchvision's module names (`conv1`, `layer1.0.conv1`,
`layer1.0.downsample.0`, `fc`), so both load through the same names.
"""

from __future__ import annotations

from flaxtl.models import tv_resnet
from flaxtl.weights.mappings import tv_common
from flaxtl.weights.torch_file import TorchWeights

CLASSIFIER = "fc.weight"


def detect(weights: TorchWeights) -> str | None:
  """The ResNet depth whose blocks the file's `layerN.i` keys count, if any."""
  if not tv_common.has(weights, "conv1.weight", "layer1.0.conv1.weight"):
    return None
  kind = (
    "bottleneck" if tv_common.has(weights, "layer1.0.conv3.weight") else "basic"
  )
  counts = tuple(tv_common.count(weights, f"layer{i}") for i in range(1, 5))
  for arch, spec in tv_resnet.ARCHS.items():
    if spec == (kind, counts):
      return arch
  return None


from_torch = tv_common.from_torch_for(CLASSIFIER)
