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
