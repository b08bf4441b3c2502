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
