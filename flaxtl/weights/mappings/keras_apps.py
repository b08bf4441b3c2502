"""Names a Keras file's layers the way a `keras_model` model names them.

Then `keras_names.from_keras` maps them by name and checks every shape. Three
cases need more than the names the file records:
- Auto-named layers (`conv2d_7`, `batch_normalization_3`): another Keras
  session numbers them from another start (Keras 2 from 1, a second model in
  the same session after the first). Within one class they come in model
  order in every layout, so the k-th such layer of the file is the model's
  k-th of that class.
- Layers of a Keras Sequential inside the model (ConvNeXt's stem): files name
  the inner layer; the variables nest it under the Sequential.
- Keras 3 `.weights.h5` files without names (Keras <= 3.3 wrote none): the
  groups are keyed by class and rank in `model.layers`
  (`layers/conv2d_3/vars`), which is how Keras' own loader matches them.
"""

from __future__ import annotations

import dataclasses
import re

from flaxtl.errors import UserError
from flaxtl.models import keras_model, registry
from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import keras_names

# Keras classes with weights whose layers may be left unnamed (auto-named).
_AUTO = re.compile(
  r"(conv2d|batch_normalization|dense|separable_conv2d|depthwise_conv2d"
  r"|layer_normalization)(?:_(\d+))?"
)
_GROUP = re.compile(r"layers/([^/]+)")


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str,
  include_top: bool | None = None,
  rename: dict[str, str] | None = None,
) -> Converted:
  """Names the file's layers for `arch`, then maps them by name.

  rename: file layer name -> model layer name, applied first (e.g. a
  ConvNeXt built under another model name).
  """
  layers = [dataclasses.replace(layer) for layer in weights.layers]
  for layer in layers:
    if layer.name in (rename or {}):
      layer.name = rename[layer.name]
  # Unnamed groups outside `layers/` (an archive's optimizer state) are
  # not layers of the model.
  unnamed = [
    layer for layer in layers if layer.name is None and _keys(layer.where)
  ]
  root = _root(weights.path, unnamed, arch) if unnamed else None
  if include_top is None:
    include_top = _has_top(arch, layers, root)
  graph = keras_model.recorded(arch, include_top)
  if root is not None:
    _name_by_keys(unnamed, graph, root)
  _unscope(layers, graph)
  _nest(layers, graph)
  _rename_auto(layers, graph)
  named = dataclasses.replace(weights, layers=layers)
  converted = keras_names.from_keras(named, arch, include_top)
  if unnamed:
    converted.mapping = "by_class_order"
  return converted


def _has_top(arch: str, layers: list, root: tuple[str, ...] | None) -> bool:
  """Whether the classifier is there: by name, or by class key if unnamed."""
  spec = registry.get(arch)
  if any(layer.name == spec.classifier for layer in layers):
    return True
  if root is None:
    return False
  top_key = root + keras_model.recorded(arch, True).keys[spec.classifier]
  return any(_keys(layer.where) == top_key for layer in layers)


def _keys(where: str) -> tuple[str, ...]:
  """'/layers/functional/layers/conv2d_3/vars' -> ('functional', 'conv2d_3')."""
  return tuple(_GROUP.findall(where))


def _root(src, unnamed: list, arch: str) -> tuple[str, ...]:
  """The group prefix of the model's layers in an unnamed Keras 3 file.

  A backbone nested in a bigger model sits under its own `layers/<key>`:
  the root is the prefix under which most of the model's class keys match.
  """
  keys = set(keras_model.recorded(arch, False).keys.values())
  roots: dict[tuple[str, ...], int] = {}
  for layer in unnamed:
    where = _keys(layer.where)
    for n in (1, 2):
      if where[-n:] in keys:
        roots[where[:-n]] = roots.get(where[:-n], 0) + 1
  if not roots:
    raise UserError(
      f"{src}: its layers have no names and their groups "
      f"({unnamed[0].where}, ...) are not Keras 3 class keys of {arch}"
    )
  return max(roots, key=roots.get)


def _name_by_keys(
  unnamed: list, graph: keras_model.Layers, root: tuple[str, ...]
) -> None:
  by_key = {root + keys: path for path, keys in graph.keys.items()}
  for layer in unnamed:
    layer.name = by_key.get(_keys(layer.where))


def _unscope(layers: list, graph: keras_model.Layers) -> None:
  """'normal_A_block_0/normal_conv_1_0' -> 'normal_conv_1_0'.

  A nested model's legacy h5 names its layers by their weight paths, which
  keep the Keras name scopes they were built in (NASNet's cells).
  """
  ours = set(graph.weighted)
  last = {p.rsplit("/", 1)[-1] for p in graph.weighted}
  for layer in layers:
    name = layer.name or ""
    if "/" in name and name not in ours and name.rsplit("/", 1)[-1] in last:
      layer.name = name.rsplit("/", 1)[-1]


def _nest(layers: list, graph: keras_model.Layers) -> None:
  """Inner layers of a Sequential: 'x_stem_conv' -> 'x_stem/x_stem_conv'."""
  nested = {p.rsplit("/", 1)[-1]: p for p in graph.weighted if "/" in p}
  for layer in layers:
    if layer.name in nested:
      layer.name = nested[layer.name]


def _rename_auto(layers: list, graph: keras_model.Layers) -> None:
  """The file's k-th auto-named layer of a class -> the model's k-th."""
  ours: dict[str, list[str]] = {}
  for path in graph.weighted:
    m = _AUTO.fullmatch(path)
    if m:
      ours.setdefault(m.group(1), []).append(path)
  theirs: dict[str, list] = {}
  for layer in layers:
    m = _AUTO.fullmatch(layer.name or "")
    if m and m.group(1) in ours:
      theirs.setdefault(m.group(1), []).append(layer)
  for kind, names in ours.items():
    found = theirs.get(kind, [])
    for name, layer in zip(names, found):
      layer.name = name
    for layer in found[len(names) :]:  # Not the backbone's: never mapped.
      layer.name = f"{layer.name} (unmapped)"
