"""The mapping for families whose variables are named and shaped like Keras'.

Such a family (flaxtl.models registry, naming='keras') has a flat parameter
tree with one entry per weighted Keras layer, named like the layer, with
Keras' shapes. A file layer then maps onto the model by name (or, when the
file records no usable names, by position among weighted layers), and its
arrays, in Keras' stored order, onto the layer's variables sorted by
KERAS_ORDER. Every shape is checked; nothing is transposed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from flaxtl import tree
from flaxtl.errors import UserError
from flaxtl.models import common, registry
from flaxtl.weights import keras_file
from flaxtl.weights.converted import Converted

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


def detect(weights: keras_file.KerasWeights, family: str) -> str | None:
  """The smallest architecture of `family` whose layers cover the file's.

  Only file layer names that some architecture of the family uses count, so
  a backbone nested in a bigger model (with its own head) is still found;
  the stem layer must be there.
  """
  file_names = {layer.name for layer in weights.layers if layer.name}
  archs = registry.names(family)
  known = {a: set(registry.get(a).layers(include_top=True)) for a in archs}
  family_names = set().union(*known.values()) if known else set()
  ours = file_names & family_names
  fits = [
    a
    for a in archs
    if ours
    and ours <= known[a]
    and all(s in file_names for s in registry.get(a).stem_layers[:1])
  ]
  return min(fits, key=lambda a: len(known[a])) if fits else None


def from_keras(
  weights: keras_file.KerasWeights,
  arch: str,
  include_top: bool | None = None,
  option_candidates: Sequence[dict[str, Any]] = ({},),
) -> Converted:
  """Maps the file's layers onto `arch`, trying each options dict in turn.

  option_candidates: e.g. [{'alpha': a} for a in ALPHAS]; the first whose
  shapes all match the file wins and is recorded in the provenance.
  """
  spec = registry.get(arch)
  src = weights.path
  by_name = {layer.name: layer for layer in weights.layers if layer.name}
  if include_top is None:
    include_top = spec.classifier in by_name
  num_classes = _num_classes(src, by_name, spec, include_top)
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


def _num_classes(
  src, by_name: dict, spec: registry.Backbone, include_top: bool
) -> int | None:
  if not include_top:
    return None
  top = by_name.get(spec.classifier)
  if top is None:
    raise UserError(
      f"{src}: no {spec.classifier!r} layer (the top of {spec.arch}); "
      "convert without the top (--notop)"
    )
  return int(max(top.arrays, key=lambda a: a.ndim).shape[-1])


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
    chosen, mapping = _by_position(src, layers, by_name, order), "by_order"
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
) -> list[keras_file.LayerWeights]:
  """The file's weighted layers in order, when its names are not the model's."""
  named = [n for n in order if n in by_name]
  if named and len(named) > len(order) // 2:
    missing = [n for n in order if n not in by_name]
    raise UserError(f"{src}: missing layer(s) {', '.join(_preview(missing))}")
  if len(layers) < len(order):
    raise UserError(
      f"{src}: holds {len(layers)} weighted layers, the model needs "
      f"{len(order)} (first missing: {order[len(layers)]})"
    )
  return list(layers[: len(order)])


def _preview(names: Iterable[str], limit: int = 8) -> list[str]:
  names = list(names)
  return names[:limit] + (
    [f"... ({len(names)} in all)"] if len(names) > limit else []
  )
