"""Keras files -> EfficientNet (B0-B7) and EfficientNetV2 variables.

The models are named and shaped like Keras' (flaxtl.models.efficientnet), so
this is `keras_names` plus what it cannot know:
- Whether the model had Keras' extra ImageNet Rescaling layer
  (`imagenet_rescaling`, recorded in the provenance): from the model config
  when the file has one (full-model h5, .keras), else from the
  Normalization variance, which holds the ImageNet stddev (not its square) in
  the official files and in every model started from them.
- Which architecture an unnamed Keras 3 file holds (its groups named by each
  architecture's class keys in turn).
Keras names EfficientNet's Normalization layer automatically ('normalization',
or 'normalization_3' in a session that built other models first):
`name_repairs` renames it.
"""

from __future__ import annotations

import json
from pathlib import Path
import zipfile

import h5py
import numpy as np

from flaxtl.models import efficientnet, registry
from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import keras_names, name_repairs

FAMILY = "efficientnet"

# Official ImageNet files, MD5 as Keras checks them (keras/src/applications/
# efficientnet.py, efficientnet_v2.py: WEIGHTS_HASHES, (top, no top)).
_V1_MD5 = {
  "b0": (
    "902e53a9f72be733fc0bcb005b3ebbac",
    "50bc09e76180e00e4465e1a485ddc09d",
  ),
  "b1": (
    "1d254153d4ab51201f1646940f018540",
    "74c4e6b3e1f6a1eea24c589628592432",
  ),
  "b2": (
    "b15cce36ff4dcbd00b6dd88e7857a6ad",
    "111f8e2ac8aa800a7a99e3239f7bfb39",
  ),
  "b3": (
    "ffd1fdc53d0ce67064dc6a9c7960ede0",
    "af6d107764bb5b1abb91932881670226",
  ),
  "b4": (
    "18c95ad55216b8f92d7e70b3a046e2fc",
    "ebc24e6d6c33eaebbd558eafbeedf1ba",
  ),
  "b5": (
    "ace28f2a6363774853a83a0b21b9421a",
    "38879255a25d3c92d5e44e04ae6cec6f",
  ),
  "b6": (
    "165f6e37dce68623721b423839de8be5",
    "9ecce42647a20130c1f39a5d4cb75743",
  ),
  "b7": (
    "8c03f828fec3ef71311cd463b6759d99",
    "cbcfe4450ddf6f3ad90b1b398090fe4a",
  ),
}
_V2_MD5 = {
  "b0": (
    "21ecbf6da12460d5c40bb2f29ceb2188",
    "893217f2bb855e2983157299931e43ff",
  ),
  "b1": (
    "069f0534ff22adf035c89e2d9547a9dc",
    "0e80663031ca32d657f9caa404b6ec37",
  ),
  "b2": (
    "424e49f28180edbde1e94797771950a7",
    "1dfe2e7a5d45b6632553a8961ea609eb",
  ),
  "b3": (
    "1f1fc43bd98a6e4fd8fdfd551e02c7a0",
    "f6abf7b5849ac99a89b50dd3fd532856",
  ),
  "s": (
    "e1d88a8495beba45748fedd0cecbe016",
    "af0682fb74e8c54910f2d4393339c070",
  ),
  "m": (
    "a3bf6aa3276309f4fc6a34aa114c95cd",
    "1b8dc055df72dde80d614482840fe342",
  ),
  "l": (
    "27e6d408b53c7ebc868fefa357689935",
    "b0b66b5c863aef5b46e8608fe1711615",
  ),
}
HASH_ALGORITHM = "md5"
# EfficientNet (V1) files are NOT under the common base URL
# https://storage.googleapis.com/tensorflow/keras-applications/ but here:
V1_BASE_URL = "https://storage.googleapis.com/keras-applications/"
IMAGENET_BASE_URLS = dict.fromkeys(efficientnet.V1_ARCHS, V1_BASE_URL)
# (arch, include_top) -> (path under the arch's base URL, md5).
IMAGENET_FILES = {
  **{
    (f"efficientnet{v}", top): (
      f"efficientnet{v}{'' if top else '_notop'}.h5",
      _V1_MD5[v][0 if top else 1],
    )
    for v in _V1_MD5
    for top in (True, False)
  },
  **{
    (f"efficientnetv2{v}", top): (
      f"efficientnet_v2/efficientnetv2-{v}{'' if top else '_notop'}.h5",
      _V2_MD5[v][0 if top else 1],
    )
    for v in _V2_MD5
    for top in (True, False)
  },
}
# Build options the official files need (Keras' weights='imagenet' model).
IMAGENET_OPTIONS = {
  arch: {"imagenet_rescaling": True} for arch in efficientnet.V1_ARCHS
}


def detect(weights: keras_file.KerasWeights) -> str | None:
  """The EfficientNet architecture the file holds, from its layer names."""
  if not any(layer.name is None for layer in weights.layers):
    named, _, _ = name_repairs.repaired(weights, "efficientnetb0", None)
    return keras_names.detect(named, FAMILY)
  for arch in registry.names(FAMILY):  # Unnamed Keras 3 groups.
    renamed = name_repairs.by_class_keys(weights, arch)
    if renamed is not None and _fits(renamed, arch):
      return arch
  return None


def _fits(weights: keras_file.KerasWeights, arch: str) -> bool:
  """Every layer `arch` has (without the top) is named in the file and fits."""
  by_name = {layer.name: layer for layer in weights.layers if layer.name}
  want = efficientnet.keras_weight_shapes(arch, include_top=False)
  return all(
    n in by_name
    and sorted(tuple(a.shape) for a in by_name[n].arrays) == sorted(shapes)
    for n, shapes in want.items()
  )


def imagenet_rescaling(weights: keras_file.KerasWeights) -> bool:
  """Whether the file's model had Keras' ImageNet Rescaling layer."""
  config = _model_config(weights.path)
  if config is not None:
    scales = [
      layer.get("config", {}).get("scale")
      for layer in _config_layers(config)
      if layer.get("class_name") == "Rescaling"
    ]
    if scales:
      return any(isinstance(s, list) and len(s) == 3 for s in scales)
  norm = next((x for x in weights.layers if x.name == "normalization"), None)
  if norm is None or len(norm.arrays) < 2:
    return False
  variance = np.asarray(norm.arrays[1], np.float64)
  stddev = np.asarray(efficientnet.IMAGENET_STDDEV_RGB)
  return variance.shape == stddev.shape and np.allclose(
    variance, stddev, atol=1e-4
  )


def _model_config(path: Path) -> dict | None:
  """The model config a full-model h5 or a .keras archive holds."""
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as z:
        if "config.json" in z.namelist():
          return json.loads(z.read("config.json"))
      return None
    with h5py.File(path, "r") as f:
      raw = f.attrs.get("model_config")
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):
    return None  # keras_file.read has already accepted the weights.
  if raw is None:
    return None
  return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def _config_layers(config):
  """Every layer config in a (nested) model config."""
  if isinstance(config, dict):
    if "class_name" in config and "config" in config:
      yield config
    for value in config.values():
      yield from _config_layers(value)
  elif isinstance(config, list):
    for value in config:
      yield from _config_layers(value)


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str,
  include_top: bool | None = None,
) -> Converted:
  """Maps the file onto `arch`; records imagenet_rescaling for EfficientNet."""
  options = {}
  if arch in efficientnet.V1_ARCHS:
    named, _, _ = name_repairs.repaired(weights, arch, include_top)
    options["imagenet_rescaling"] = imagenet_rescaling(named)
  return keras_names.from_keras(weights, arch, include_top, [options])
