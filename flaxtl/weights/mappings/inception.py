"""A Keras file's layers -> InceptionV3 / InceptionResNetV2 variables.

Nearly every layer of these models is auto-named by Keras (`conv2d_17`), so
the file's numbering may start anywhere; `name_repairs` maps them by their
order within each class, then every shape is checked.
"""

from __future__ import annotations

import re

from flaxtl.errors import UserError
from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import keras_names

_BASE = "inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf"
# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, md5), from
# keras/src/applications/inception_v3.py and inception_resnet_v2.py (Keras
# 3.15; get_file checks the md5).
IMAGENET_FILES = {
  ("inception_v3", True): (
    "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
    "9a0d58056eeedaa3f26cb7ebd46da564",
  ),
  ("inception_v3", False): (
    "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "bcbd6486424b2319ff4ef7d526e38f63",
  ),
  ("inception_resnet_v2", True): (
    f"{_BASE}_kernels.h5",
    "e693bd0210a403b3192acc6073ad2e96",
  ),
  ("inception_resnet_v2", False): (
    f"{_BASE}_kernels_notop.h5",
    "d19885ff4a710c122648d3b5c3b684e4",
  ),
}

V3_CONVS = 94  # conv2d_bn units in InceptionV3.
_IRV2 = re.compile(r"block(35|17|8)_\d+_conv|conv_7b")
_CONV = re.compile(r"conv2d(_\d+)?")
_BN = re.compile(r"batch_normalization(_\d+)?")


def detect(weights: keras_file.KerasWeights) -> str | None:
  """'inception_resnet_v2' by its named block convolutions; 'inception_v3'
  by 94 auto-named bias-free convolutions (the first a 3x3x3x32 stem) with
  as many scale-free BatchNormalizations."""
  names = [layer.name or "" for layer in weights.layers]
  if any(_IRV2.fullmatch(n) for n in names):
    return "inception_resnet_v2"
  convs = [
    layer
    for layer in weights.layers
    if _CONV.fullmatch(layer.name or "")
    and len(layer.arrays) == 1
    and layer.arrays[0].ndim == 4
  ]
  bns = [
    layer
    for layer in weights.layers
    if _BN.fullmatch(layer.name or "") and len(layer.arrays) == 3
  ]
  stem = convs and convs[0].arrays[0].shape == (3, 3, 3, 32)
  if stem and len(convs) >= V3_CONVS and len(bns) >= V3_CONVS:
    return "inception_v3"
  return None


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str = "inception_v3",
  include_top: bool | None = None,
) -> Converted:
  found = detect(weights)
  if found is not None and found != arch:
    raise UserError(
      f"{weights.path}: holds an {found} model, not {arch}; use --arch {found}"
    )
  return keras_names.from_keras(weights, arch, include_top)
