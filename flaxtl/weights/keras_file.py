"""Reads the weights out of any Keras file layout, as an ordered list of layers.

Layouts:
- "legacy_weights_h5": `save_weights('x.h5')` and the official ImageNet files:
  root attribute `layer_names`, one group per layer whose `weight_names`
  attribute lists its datasets in order (Keras-1 `block1_conv1_W_1:0`, TF
  `block1_conv1/kernel:0`, Keras 3 `block1_conv1/kernel`).
- "legacy_model_h5": `model.save('x.h5')`: the same under `model_weights`.
- "keras3_weights_h5": `save_weights('x.weights.h5')`: `.../vars/0..k` groups
  named after the layer class (`conv2d_10`), not the layer; sub-models nest.
- "keras_archive": a `.keras` zip holding `model.weights.h5` + `config.json`.

Nothing here knows about VGG: this module only recovers (name, arrays) per
layer in model order. Mapping onto a model is `flaxtl.convert`'s job.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import io
import json
from pathlib import Path
import re
import zipfile

import h5py
import numpy as np

from flaxtl.errors import UserError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclasses.dataclass
class LayerWeights:
  """One weight-bearing layer: its Keras name when recorded, and its arrays."""

  name: str | None  # Keras layer name, e.g. "block1_conv1"; None if unknown.
  where: str  # Path of the layer inside the file, for error messages.
  arrays: list[np.ndarray]


@dataclasses.dataclass
class KerasWeights:
  path: Path
  layout: str
  layers: list[LayerWeights]  # In model order.
  keras_version: str | None = None
  backend: str | None = None


def read(path: str | Path) -> KerasWeights:
  """Reads every weight-bearing layer of a Keras file, in model order."""
  path = Path(path)
  if not path.exists():
    raise UserError(f"{path}: no such file")
  if path.is_dir():
    raise UserError(f"{path}: is a directory, expected a Keras .h5/.keras file")
  size = path.stat().st_size
  if size == 0:
    raise UserError(f"{path}: file is empty")
  try:
    if zipfile.is_zipfile(path):
      return _read_archive(path)
    with open(path, "rb") as f:
      head = f.read(8)
    if head != HDF5_SIGNATURE and not h5py.is_hdf5(path):
      raise UserError(
        f"{path}: not a Keras file (neither HDF5 nor a .keras zip archive)"
      )
    with h5py.File(path, "r") as f:
      return _read_h5(path, f)
  except UserError:
    raise
  except (OSError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile) as e:
    # h5py reports truncation and corruption as OSError/KeyError.
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(
      f"{path}: unreadable or corrupt Keras file ({reason})"
    ) from None


def _read_h5(
  path: Path, f: h5py.File, layout_hint: str | None = None
) -> KerasWeights:
  version = _attr_str(f.attrs.get("keras_version"))
  backend = _attr_str(f.attrs.get("backend"))
  if "model_weights" in f and "layer_names" in f["model_weights"].attrs:
    g = f["model_weights"]
    version = version or _attr_str(g.attrs.get("keras_version"))
    layers = list(_legacy_layers(g))
    layout = "legacy_model_h5"
  elif "layer_names" in f.attrs:
    layers = list(_legacy_layers(f))
    layout = "legacy_weights_h5"
  else:
    layers = list(_keras3_layers(f))
    layout = layout_hint or "keras3_weights_h5"
  if not layers:
    raise UserError(f"{path}: holds no layer weights ({layout} layout)")
  return KerasWeights(path, layout, layers, version, backend)


def _read_archive(path: Path) -> KerasWeights:
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    if "model.weights.h5" not in names:
      raise UserError(
        f"{path}: .keras archive without model.weights.h5 (has {names})"
      )
    config = (
      json.loads(z.read("config.json")) if "config.json" in names else None
    )
    meta = (
      json.loads(z.read("metadata.json")) if "metadata.json" in names else {}
    )
    blob = z.read("model.weights.h5")
  with h5py.File(io.BytesIO(blob), "r") as f:
    weights = _read_h5(path, f, layout_hint="keras_archive")
  weights.layout = "keras_archive"
  weights.keras_version = weights.keras_version or meta.get("keras_version")
  if config is not None:
    _names_from_config(weights.layers, config)
  return weights


def _legacy_layers(g: h5py.Group) -> Iterator[LayerWeights]:
  """Layers of the legacy format, in `layer_names` order.

  A nested model's weights all sit in one group; its `weight_names` prefixes
  (`block1_conv1/kernel:0`) tell the inner layers apart. Keras lists a nested
  model's trainable weights before its non-trainable ones, so a
  BatchNormalization layer's moving statistics come long after its gamma and
  beta: arrays are gathered per inner layer, in first-seen order.
  """
  for layer_name in _attr_list(g.attrs["layer_names"]):
    group = g[layer_name]
    inner: dict[str, LayerWeights] = {}
    for weight_name in _attr_list(_chunked(group.attrs, "weight_names")):
      name = _legacy_inner_layer(layer_name, weight_name)
      layer = inner.setdefault(name, LayerWeights(name, group.name, []))
      layer.arrays.append(np.asarray(group[weight_name]))
    yield from inner.values()


def _legacy_inner_layer(group_name: str, weight_name: str) -> str:
  """The layer a legacy weight belongs to.

  In its own group: 'block1_conv1/kernel:0', Keras-1 'block1_conv1_W_1:0',
  Keras-2-era names with a slash ('conv1/conv/kernel:0' in group
  'conv1/conv': DenseNet's official files). In a nested model's group:
  'conv1_conv/kernel' (Keras 2/3) or 'resnet50/conv1_conv/kernel:0' (TF 1)
  in group 'resnet50' -> 'conv1_conv'. Keras 3 weight paths keep the name
  scopes the layer was built in (NASNet's 'normal_A_block_0/normal_conv_1_0/
  kernel' in group 'normal_conv_1_0'): the group is still the layer.
  """
  if weight_name.rsplit("/", 1)[0].endswith("/" + group_name):
    return group_name
  rest = weight_name.removeprefix(group_name)
  if rest != weight_name and (
    (rest.startswith("/") and rest.count("/") == 1)
    or (rest.startswith("_") and "/" not in rest)
  ):
    return group_name
  if "/" not in weight_name:
    return group_name
  return weight_name.removeprefix(group_name + "/").rsplit("/", 1)[0]


def _keras3_layers(g: h5py.Group) -> Iterator[LayerWeights]:
  """Depth-first over `.../vars` groups, children in natural order.

  Keras 3 names groups after the layer class with a counter in model order
  (`conv2d`, `conv2d_1`, ..., `conv2d_10`), so text order would put conv2d_10
  before conv2d_2: sort numerically.
  """
  if "vars" in g and isinstance(g["vars"], h5py.Group):
    vars_group = g["vars"]
    keys = sorted(vars_group.keys(), key=_natural_key)
    if keys:
      name = _attr_str(vars_group.attrs.get("name"))
      yield LayerWeights(
        name, vars_group.name, [np.asarray(vars_group[k]) for k in keys]
      )
  for key in sorted(g.keys(), key=_natural_key):
    if key != "vars" and isinstance(g[key], h5py.Group):
      yield from _keras3_layers(g[key])


def _names_from_config(layers: list[LayerWeights], config: dict) -> None:
  """Names (where missing) and model order of an archive's layers (config.json).

  Keras 3 stores each layer of `model.layers` under `layers/<snake_case class
  name>[_N]`, N counting earlier layers of the same class (nested models under
  their own `layers/`); config.json lists the same layers in the same order,
  with their names. Rebuilding those keys maps every group to its layer.
  """
  paths = list(_config_paths(config.get("config", {}).get("layers", []), ""))
  names, position = dict(paths), {p: i for i, (p, _) in enumerate(paths)}

  def key(layer: LayerWeights) -> str:
    return layer.where.strip("/").removesuffix("/vars")

  for layer in layers:
    layer.name = layer.name or names.get(key(layer))
  # h5 groups iterate by name; the config has model order.
  layers.sort(key=lambda layer: position.get(key(layer), len(position)))


def _config_paths(specs: list[dict], prefix: str) -> Iterator[tuple[str, str]]:
  """(h5 group path, layer name) for every layer in a config's layer list."""
  used: dict[str, int] = {}
  for spec in specs:
    key = _snake_case(spec.get("class_name", ""))
    used[key] = used.get(key, -1) + 1
    path = f"{prefix}layers/{key}" + (f"_{used[key]}" if used[key] else "")
    yield path, spec.get("config", {}).get("name")
    inner = spec.get("config", {}).get("layers")
    if isinstance(inner, list):  # A nested Functional / Sequential model.
      yield from _config_paths(inner, path + "/")


def _snake_case(name: str) -> str:
  """Keras' to_snake_case: 'BatchNormalization' -> 'batch_normalization'."""
  name = re.sub(r"\W+", "", name)
  name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
  return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _natural_key(s: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _attr_str(value) -> str | None:
  if value is None:
    return None
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.shape == ():
    return _attr_str(value.item())
  return str(value)


def _chunked(attrs, name: str):
  """An attribute Keras may have split into `name0`, `name1`, ...

  HDF5 caps an attribute at 64 KiB; Keras' save_attributes_to_hdf5_group
  splits longer lists (a nested NASNet's `weight_names`).
  """
  if name in attrs:
    return attrs[name]
  chunks = []
  while f"{name}{len(chunks)}" in attrs:
    chunks.append(np.asarray(attrs[f"{name}{len(chunks)}"]).ravel())
  return np.concatenate(chunks) if chunks else []


def _attr_list(value) -> list[str]:
  """`layer_names`/`weight_names`: an array of bytes or str, or a str repr."""
  if isinstance(value, (str, bytes)):
    # Some writers store a printed numpy array; take the quoted names out.
    text = value.decode("utf-8") if isinstance(value, bytes) else value
    return re.findall(r"'([^']*)'", text) or [text]
  return [
    v.decode("utf-8") if isinstance(v, bytes) else str(v)
    for v in np.asarray(value).ravel()
  ]
