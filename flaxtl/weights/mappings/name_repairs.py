"""Fixes to a Keras file's layer names before `keras_names` maps them.

`keras_names` maps a file's layers onto a model (`flaxtl.models.keras_model`)
by name. Where Keras recorded other names than the model's, `repaired` gives
the file's layers the model's names, from what `keras_model.recorded` knows
of the Keras model:
- Layers split in two: a legacy h5 stores a nested model's weights in one
  group listing its trainable weights before its non-trainable ones, so a
  fine-tuned BN layer's gamma and beta come far before its moving
  statistics; the reader yields the layer twice. The parts are joined in
  file order.
- Keras 3 `.weights.h5` files without names (Keras <= 3.3 wrote none): each
  layer of `model.layers` sits under `layers/<snake_case class>[_N]/vars`, N
  counting the earlier layers of its class (keras/src/saving/saving_lib.py
  `_save_container_state`), nested under the backbone's own `layers/<key>`
  in a bigger model and under a Sequential's. Those keys name every group,
  whatever order the groups come in (text order puts every `conv2d_N` before
  the first `depthwise_conv2d`, so position alone cannot tell a MobileNet's
  convolutions apart).
- Name scopes: a nested model's legacy h5 names its layers by weight paths
  that keep the scopes they were built in ('normal_A_block_0/normal_conv_1_0'
  for NASNet's cells).
- Layers of a Keras Sequential inside the model (ConvNeXt's stem): files name
  the inner layer; the variables nest it under the Sequential.
- Auto-named layers (`conv2d_7`, `batch_normalization_3`, `normalization_2`):
  another Keras session numbers them from another start (Keras 2 from 1, a
  second model in the same session after the first). Within one class they
  come in model order in every layout, so the k-th such layer of the file is
  the model's k-th of that class.
"""

from __future__ import annotations

import dataclasses
import re

from flaxtl.errors import UserError
from flaxtl.models import keras_model, registry
from flaxtl.weights import keras_file

# Keras classes with weights whose layers may be left unnamed (auto-named).
_AUTO = re.compile(
  r"(conv2d|batch_normalization|dense|separable_conv2d|depthwise_conv2d"
  r"|layer_normalization|normalization)(?:_(\d+))?"
)
_GROUP = re.compile(r"layers/([^/]+)")


def repaired(
  weights: keras_file.KerasWeights,
  arch: str,
  include_top: bool | None,
  class_keys: bool = True,
) -> tuple[keras_file.KerasWeights, bool | None, bool]:
  """`weights` with its layers named as `arch`'s (see the module docstring).

  include_top: None to tell from the file (by the classifier's name or
  class key); stays None when the file has neither names nor class keys.
  class_keys: name unnamed Keras 3 groups by their class keys.
  Returns (weights, include_top, whether groups were named by class keys).
  """
  weights = merged(weights)
  root = _root(weights, arch) if class_keys else None
  layers = [dataclasses.replace(layer) for layer in weights.layers]
  if include_top is None and (root is not None or any(x.name for x in layers)):
    include_top = _has_top(arch, layers, root)
  graph = keras_model.recorded(
    arch, True if include_top is None else include_top
  )
  if root is not None:
    _name_by_keys(layers, graph, root)
  _unscope(layers, graph)
  _nest(layers, graph)
  _rename_auto(layers, graph)
  keyed = root is not None  # () is the root of a top-level model.
  return dataclasses.replace(weights, layers=layers), include_top, keyed


def by_class_keys(
  weights: keras_file.KerasWeights, arch: str
) -> keras_file.KerasWeights | None:
  """`weights` with its unnamed Keras 3 groups named as `arch`'s layers;
  None when it has none or their keys are not `arch`'s."""
  try:
    if _root(weights, arch) is None:
      return None
  except UserError:
    return None
  return repaired(weights, arch, None)[0]


def merged(weights: keras_file.KerasWeights) -> keras_file.KerasWeights:
  """`weights` with the parts of a split layer joined, in file order."""
  seen: dict[tuple[str, str], keras_file.LayerWeights] = {}
  layers = []
  for layer in weights.layers:
    key = (layer.name, layer.where)
    if layer.name is None or key not in seen:
      layer = dataclasses.replace(layer, arrays=list(layer.arrays))
      if layer.name is not None:
        seen[key] = layer
      layers.append(layer)
    else:
      seen[key].arrays.extend(layer.arrays)
  if len(layers) == len(weights.layers):
    return weights
  return dataclasses.replace(weights, layers=layers)


def _keys(where: str) -> tuple[str, ...]:
  """'/layers/functional/layers/conv2d_3/vars' -> ('functional', 'conv2d_3')."""
  return tuple(_GROUP.findall(where))


def _root(
  weights: keras_file.KerasWeights, arch: str
) -> tuple[str, ...] | None:
  """The group prefix of the model's layers in an unnamed Keras 3 file.

  None when every layer has a name. Unnamed groups outside `layers/` (an
  archive's optimizer state) are not layers of the model. A backbone nested
  in a bigger model sits under its own `layers/<key>`: the root is the
  prefix under which most of the model's class keys match.
  """
  unnamed = [x for x in weights.layers if x.name is None and _keys(x.where)]
  if not unnamed:
    return None
  keys = set(keras_model.recorded(arch, False).keys.values())
  roots: dict[tuple[str, ...], int] = {}
  for layer in unnamed:
    where = _keys(layer.where)
    for n in (1, 2):
      if where[-n:] in keys:
        roots[where[:-n]] = roots.get(where[:-n], 0) + 1
  if not roots:
    raise UserError(
      f"{weights.path}: its layers have no names and their groups "
      f"({unnamed[0].where}, ...) are not Keras 3 class keys of {arch}"
    )
  return max(roots, key=roots.get)


def _has_top(arch: str, layers: list, root: tuple[str, ...] | None) -> bool:
  """Whether the classifier is there: by name, or by class key if unnamed."""
  spec = registry.get(arch)
  if any(layer.name == spec.classifier for layer in layers):
    return True
  if root is None:
    return False
  top_key = root + keras_model.recorded(arch, True).keys[spec.classifier]
  return any(_keys(layer.where) == top_key for layer in layers)


def _name_by_keys(
  layers: list, graph: keras_model.Layers, root: tuple[str, ...]
) -> None:
  by_key = {root + keys: path for path, keys in graph.keys.items()}
  for layer in layers:
    if layer.name is None:
      layer.name = by_key.get(_keys(layer.where))


def _unscope(layers: list, graph: keras_model.Layers) -> None:
  """'normal_A_block_0/normal_conv_1_0' -> 'normal_conv_1_0'."""
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
