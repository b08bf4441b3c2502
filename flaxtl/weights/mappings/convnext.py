"""A Keras file's layers -> ConvNeXt variables (`flaxtl.models.convnext`).

Keras prefixes every ConvNeXt layer with the model's name
(`convnext_tiny_stage_0_block_0_depthwise_conv`); a model built under
another name is renamed to the architecture's. The size is told by the stem
width and the number of blocks in stage 2.
"""

from __future__ import annotations

import re

from flaxtl.errors import UserError
from flaxtl.models import convnext
from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import keras_names

# Official ImageNet files: (arch, include_top) -> (path under
# https://storage.googleapis.com/tensorflow/keras-applications/, sha256),
# from keras/src/applications/convnext.py (Keras 3.15; get_file checks the
# sha256).
_SHA256 = {
  "convnext_tiny": (
    "8ae6e78ce2933352b1ef4008e6dd2f17bc40771563877d156bc6426c7cf503ff",
    "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
  ),
  "convnext_small": (
    "ce1277d8f1ee5a0ef0e171469089c18f5233860ceaf9b168049cb9263fd7483c",
    "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab",
  ),
  "convnext_base": (
    "52cbb006d3dadd03f6e095a8ca1aca47aecdd75acb4bc74bce1f5c695d0086e6",
    "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45",
  ),
  "convnext_large": (
    "070c5ed9ed289581e477741d3b34beffa920db8cf590899d6d2c67fba2a198a6",
    "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd",
  ),
  "convnext_xlarge": (
    "c1f5ccab661354fc3a79a10fa99af82f0fbf10ec65cb894a3ae0815f17a889ee",
    "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05",
  ),
}
IMAGENET_FILES = {
  (arch, top): (f"convnext/{arch}{'' if top else '_notop'}.h5", digest)
  for arch, digests in _SHA256.items()
  for top, digest in zip((True, False), digests)
}

_STEM = re.compile(r"(.+)_stem_conv")


def _prefix(weights: keras_file.KerasWeights) -> tuple[str, int] | None:
  """(model name, stem width) from the `<name>_stem_conv` layer."""
  for layer in weights.layers:
    m = _STEM.fullmatch((layer.name or "").rsplit("/", 1)[-1])
    if m and layer.arrays and layer.arrays[0].ndim == 4:
      return m.group(1), int(layer.arrays[0].shape[-1])
  return None


def detect(weights: keras_file.KerasWeights) -> str | None:
  """The ConvNeXt size the file holds (stem width, stage-2 depth)."""
  found = _prefix(weights)
  if found is None:
    return None
  name, width = found
  block = re.compile(re.escape(name) + r"_stage_2_block_(\d+)_depthwise_conv")
  depth = 1 + max(
    (
      int(m.group(1))
      for layer in weights.layers
      if (m := block.fullmatch(layer.name or ""))
    ),
    default=-1,
  )
  for arch, (depths, dims) in convnext.CONFIGS.items():
    if dims[0] == width and depths[2] == depth:
      return arch
  return None


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str = "convnext_tiny",
  include_top: bool | None = None,
) -> Converted:
  found = detect(weights)
  if found is not None and found != arch:
    raise UserError(
      f"{weights.path}: holds a {found} model, not {arch}; use --arch {found}"
    )
  aliases = {}
  prefix = _prefix(weights)
  if prefix is not None and prefix[0] != arch:
    old = prefix[0] + "_"
    aliases = {
      layer.name: arch + "_" + layer.name[len(old) :]
      for layer in weights.layers
      if layer.name and layer.name.startswith(old)
    }
  return keras_names.from_keras(weights, arch, include_top, aliases=aliases)
