"""A torchvision VGG16/VGG19 state dict -> tv_vgg16 / tv_vgg19.

The flatten pitfall: torchvision's fc1 (`classifier.0.weight`, 4096 x 25088)
reads the 512x7x7 map flattened as (C, H, W); flaxtl's tv_vgg flattens NHWC
as (H, W, C). Taking the weight as it is (only transposed) gives a model that
runs, with the right shapes, and computes garbage. The rows are permuted here
once: kernel[(h*7 + w)*512 + c] = weight[:, c*49 + h*7 + w].
"""

from __future__ import annotations

import numpy as np

from flaxtl.models import tv_vgg
from flaxtl.weights.mappings import tv_common
from flaxtl.weights.torch_file import TorchWeights

CLASSIFIER = "classifier.6.weight"


def fc1_kernel(weight: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
  """torch's (out, C*H*W) fc1 weight -> a kernel for an (H, W, C) flatten."""
  h, w = tv_vgg.POOL_SIZE
  out = weight.shape[0]
  if weight.ndim != 2 or weight.shape[1] != shape[0] or shape[0] % (h * w):
    return None  # Reported as a shape mismatch.
  c = shape[0] // (h * w)
  return weight.reshape(out, c, h, w).transpose(2, 3, 1, 0).reshape(-1, out)


def detect(weights: TorchWeights) -> str | None:
  """tv_vgg16 / tv_vgg19 by the number of convs in `features`."""
  convs = [
    k
    for k, v in weights.tensors.items()
    if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4
  ]
  if not convs or any(k.count(".") != 2 for k in convs):
    return None  # MobileNet/EfficientNet features nest deeper.
  for arch in tv_vgg.CFGS:
    names = tv_vgg.layer_names(arch, include_top=False)
    if sorted(convs) == sorted(n.replace("/", ".") + ".weight" for n in names):
      return arch
  return None


from_torch = tv_common.from_torch_for(
  CLASSIFIER, {"classifier/0/kernel": fc1_kernel}
)
