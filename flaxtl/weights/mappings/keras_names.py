"""The mapping of every Keras family: variables named and shaped as Keras'.

Such a family (`flaxtl.models.keras_model`, naming='keras') has a flat
parameter tree with one entry per weighted Keras layer, named like the layer,
with Keras' shapes. A file layer maps onto the model by name, after the
family's `aliases` (names older Keras versions used, e.g. DenseNet's
'conv1/conv') and `name_repairs` (split layers, class keys of unnamed Keras 3
groups, name scopes, Sequentials, auto names from another session); when the
names still do not cover the model, by position among the weighted layers of
the same kind (conv, BN, dense). Its arrays, in Keras' stored order, go onto
the layer's variables sorted by KERAS_ORDER. Every shape is checked; nothing
is transposed.

A family mapping module is typically:

    def detect(weights):
      return keras_names.detect(weights, "resnet", weighted=...)
    def from_keras(weights, arch, include_top=None):
      return keras_names.from_keras(weights, arch, include_top,
                                    found=detect(weights))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
from typing import Any

import numpy as np

from flaxtl import tree
from flaxtl.errors import UserError
from flaxtl.models import common, registry
from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted
from flaxtl.weights.mappings import name_repairs

# Keras stores a layer's variables in this order (Conv2D: kernel, bias;
# BatchNormalization: gamma, beta, moving_mean, moving_variance; separable:
# depthwise, pointwise, bias; LayerNormalization: gamma, beta); flaxtl names.
KERAS_ORDER = (
  "depthwise_kernel",
  "pointwise_kernel",
  "kernel",
  "scale",
  "gamma",
  "bias",
  "mean",
  "var",
  "count",
)


def layer_slots(shapes: dict) -> dict[str, list[tuple[str, str, tuple]]]:
  """{collection: {path: shape}} -> {layer: [(collection, var, shape)]}.

  Each layer's entries are in Keras' stored order.
  """
  slots: dict[str, list[tuple[str, str, tuple]]] = {}
  for collection, flat in shapes.items():
    for path, shape in flat.items():
      layer, var = path.rsplit("/", 1)
      slots.setdefault(layer, []).append((collection, var, tuple(shape)))
  for entries in slots.values():
    entries.sort(
      key=lambda e: (
        KERAS_ORDER.index(e[1]) if e[1] in KERAS_ORDER else len(KERAS_ORDER)
      )
    )
  return slots


def model_shapes(
  arch: str, include_top: bool, num_classes: int | None, options: dict[str, Any]
) -> dict:
  """{collection: {path: shape}} of `arch` built with these options."""
  spec = registry.get(arch)
  model = spec.create(
    include_top=include_top, num_classes=num_classes or 1000, **options
  )
  shapes = common.variable_shapes(model, spec.input_size(include_top))
  return {
    c: {p: tuple(s.shape) for p, s in tree.flatten(v).items()}
    for c, v in shapes.items()
  }


def ordered_layers(arch: str, include_top: bool, slots: dict) -> list[str]:
  """The weighted layers in Keras' model.layers order."""
  names = registry.get(arch).layers(include_top)
  ordered = [n for n in names if n in slots]
  return ordered + [n for n in slots if n not in ordered]


def renamed(
  weights: keras_file.KerasWeights, aliases: Mapping[str, str] | None
) -> keras_file.KerasWeights:
  """`weights` with older Keras layer names replaced by today's."""
  if not aliases:
    return weights
  layers = [
    dataclasses.replace(layer, name=aliases.get(layer.name, layer.name))
    for layer in weights.layers
  ]
  return dataclasses.replace(weights, layers=layers)


def detect(
  weights: keras_file.KerasWeights,
  family: str,
  *,
  aliases: Mapping[str, str] | None = None,
  weighted: Callable[[str], Iterable[str]] | None = None,
  min_coverage: float = 0.75,
) -> str | None:
  """The architecture of `family` the file holds, from its layer names.

  Only file layer names that some architecture of the family uses count, so
  a backbone nested in a bigger model (with its own head) is still found.
  Those names must all belong to the architecture. With `weighted` (arch ->
  its weighted layers without the top), the file must also hold at least
  `min_coverage` of them and the best-covered architecture wins (a file
  missing a layer is still recognised, so the error can name the layer);
  without it, the smallest architecture whose first stem layer is present.
  """
  weights = renamed(weights, aliases)
  file_names = {layer.name for layer in weights.layers if layer.name}
  archs = registry.names(family)
  known = {a: set(registry.get(a).layers(include_top=True)) for a in archs}
  family_names = set().union(*known.values()) if known else set()
  ours = file_names & family_names
  if not ours:
    return None
  candidates = [a for a in archs if ours <= known[a]]
  if weighted is None:
    fits = [
      a
      for a in candidates
      if all(s in file_names for s in registry.get(a).stem_layers[:1])
    ]
    return min(fits, key=lambda a: len(known[a])) if fits else None
  coverage = {}
  for a in candidates:
    need = set(weighted(a))
    coverage[a] = len(need & file_names) / max(1, len(need))
  fits = [a for a in candidates if coverage[a] >= min_coverage]
  return max(fits, key=lambda a: (coverage[a], -len(known[a])), default=None)


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str,
  include_top: bool | None = None,
  option_candidates: Sequence[dict[str, Any]] = ({},),
  *,
  aliases: Mapping[str, str] | None = None,
  found: str | None = None,
  class_keys: bool = True,
) -> Converted:
  """Maps the file's layers onto `arch`, trying each options dict in turn.

  option_candidates: e.g. [{'alpha': a} for a in ALPHAS]; the first whose
  shapes all match the file wins and is recorded in the provenance.
  found: the architecture the family's `detect` sees in the file; another
  one than `arch` is an error that says which.
  class_keys: name an unnamed Keras 3 file's groups by their class keys
  (mapping 'by_class_order'); without, its layers map by position.
  """
  spec = registry.get(arch)
  src = weights.path
  if found is not None and found != arch:
    raise UserError(
      f"{src}: holds a {found} model, not {arch}; use --arch {found}"
    )
  weights = renamed(weights, aliases)
  weights, include_top, keyed = name_repairs.repaired(
    weights, arch, include_top, class_keys
  )
  by_name = {layer.name: layer for layer in weights.layers if layer.name}
  if include_top is None:
    include_top = _has_top(weights.layers, by_name, spec)
  top = _top_layer(src, weights.layers, by_name, spec) if include_top else None
  num_classes = int(_kernel(top).shape[-1]) if top else None
  errors = []
  for options in option_candidates:
    shapes = model_shapes(arch, include_top, num_classes, dict(options))
    slots = layer_slots(shapes)
    order = ordered_layers(arch, include_top, slots)
    try:
      variables, mapping, used = _assign(
        src, weights.layers, by_name, order, slots
      )
    except UserError as e:
      errors.append((options, e))
      continue
    skipped = [
      f"{layer.name or '?'} at {layer.where}"
      for layer in weights.layers
      if id(layer) not in used
    ]
    if keyed:
      mapping = "by_class_order"
    return Converted(
      variables, arch, include_top, num_classes, mapping, skipped, dict(options)
    )
  if len(errors) == 1:
    raise errors[0][1]
  tried = ", ".join(str(o) for o, _ in errors)
  raise UserError(
    f"{src}: matches {arch} with none of the options {tried} "
    f"(with {errors[0][0]}: {errors[0][1]})"
  )


def _kind(ndims: Iterable[int]) -> tuple[int, ...]:
  """A layer's kind as its arrays' ranks: conv (4, 1), BN (1, 1, 1, 1), ..."""
  return tuple(ndims)


_DENSE = (2, 1)


def _has_top(layers, by_name: dict, spec: registry.Backbone) -> bool:
  """Named files: a layer named like the classifier. Unnamed: a dense layer."""
  if by_name:
    return spec.classifier in by_name
  return any(_kind(a.ndim for a in layer.arrays) == _DENSE for layer in layers)


def _top_layer(src, layers, by_name: dict, spec: registry.Backbone):
  if by_name:
    top = by_name.get(spec.classifier)
  else:
    dense = [x for x in layers if _kind(a.ndim for a in x.arrays) == _DENSE]
    top = dense[-1] if dense else None
  if top is None or not top.arrays:
    raise UserError(
      f"{src}: no {spec.classifier!r} layer (the top of {spec.arch}); "
      "convert without the top (--notop)"
    )
  return top


def _kernel(layer: keras_file.LayerWeights) -> np.ndarray:
  return max(layer.arrays, key=lambda a: a.ndim)


def _assign(
  src,
  layers: Sequence[keras_file.LayerWeights],
  by_name: dict,
  order: list[str],
  slots: dict,
) -> tuple[dict, str, set[int]]:
  if all(name in by_name for name in order):
    chosen, mapping = [by_name[n] for n in order], "by_name"
  else:
    chosen = _by_position(src, layers, by_name, order, slots)
    mapping = "by_order"
  flat: dict[str, dict[str, np.ndarray]] = {}
  for name, layer in zip(order, chosen):
    for (collection, var, shape), array in zip(
      slots[name], _arrays(src, name, layer, slots[name])
    ):
      if tuple(array.shape) != shape:
        raise UserError(
          f"{src}: layer {name} ({layer.where}) {var} has shape "
          f"{tuple(array.shape)}, expected {shape}"
        )
      # Normalization's `count` is Keras' only integer variable.
      kind = np.integer if var == "count" else np.floating
      if not np.issubdtype(array.dtype, kind):
        raise UserError(f"{src}: layer {name} holds {array.dtype} {var}")
      flat.setdefault(collection, {})[f"{name}/{var}"] = np.asarray(array)
  variables = {c: tree.nested(v) for c, v in flat.items()}
  return variables, mapping, {id(layer) for layer in chosen}


def _arrays(
  src, name: str, layer: keras_file.LayerWeights, slots: list
) -> list[np.ndarray]:
  if len(layer.arrays) != len(slots):
    want = ", ".join(f"{v} {s}" for _, v, s in slots)
    got = ", ".join(str(a.shape) for a in layer.arrays)
    raise UserError(
      f"{src}: layer {name} ({layer.where}) holds {len(layer.arrays)} "
      f"arrays ({got}), expected {len(slots)} ({want})"
    )
  return layer.arrays


def _by_position(
  src,
  layers: Sequence[keras_file.LayerWeights],
  by_name: dict,
  order: list[str],
  slots: dict,
) -> list[keras_file.LayerWeights]:
  """The file's layers by position, when its names are not the model's.

  Matched per kind, in order: the n-th BN layer of the model takes the n-th
  BN layer of the file. This is the model order whether the file lists its
  layers in `model.layers` order (legacy h5) or grouped by layer class
  (Keras 3 `.weights.h5`, `conv2d_N` before `dense_N`).
  """
  named = [n for n in order if n in by_name]
  if named and len(named) > len(order) // 2:
    missing = [n for n in order if n not in by_name]
    raise UserError(f"{src}: missing layer(s) {', '.join(_preview(missing))}")
  queues: dict[tuple[int, ...], list[keras_file.LayerWeights]] = {}
  for layer in layers:
    queues.setdefault(_kind(a.ndim for a in layer.arrays), []).append(layer)
  chosen = []
  for name in order:
    kind = _kind(len(shape) for _, _, shape in slots[name])
    queue = queues.get(kind)
    if not queue:
      have = sum(
        1 for n in order if _kind(len(s) for *_, s in slots[n]) == kind
      )
      raise UserError(
        f"{src}: missing layer {name}: the file holds fewer layers with "
        f"arrays of rank {kind} than the {have} the model needs"
      )
    chosen.append(queue.pop(0))
  return chosen


def _preview(names: Iterable[str], limit: int = 8) -> list[str]:
  names = list(names)
  return names[:limit] + (
    [f"... ({len(names)} in all)"] if len(names) > limit else []
  )
