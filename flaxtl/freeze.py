"""Freezing as data: (regex, label) rules over '/'-joined parameter paths.

Rules are tried in order with `re.fullmatch`; the first match wins; a final
catch-all makes every parameter trainable unless a rule said otherwise. A rule
that matches nothing is an error (a typo would otherwise silently train
everything). `first_layers: k` turns Keras' `model.layers[:k]` into rules.
The resulting labels drive `optax.multi_transform` (see `flaxtl.optim`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Optional, Sequence

import jax

from flaxtl.errors import UserError
from flaxtl.models import vgg

log = logging.getLogger(__name__)

FROZEN = "frozen"
TRAINABLE = "trainable"


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_paths(params) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def layer_order(params) -> list[str]:
  """Top-level-to-leaf layer names in creation order ('backbone/block1_conv1', 'head/dense1')."""
  layers: list[str] = []
  for path in param_paths(params):
    layer = path.rsplit("/", 1)[0]
    if layer not in layers:
      layers.append(layer)
  return layers


def first_layers_rules(k: int, params, arch: Optional[str] = None, include_top: bool = True,
                       prefix: str = "backbone/") -> list[tuple[str, str]]:
  """Rules freezing the first k layers.

  With a VGG backbone (`arch` given), k counts like Keras' `model.layers[:k]`:
  the input layer and the pooling/flatten layers count, so k=8 freezes
  block1_conv1 ... block3_conv1. Other models count their parameter layers.
  """
  if k <= 0:
    return []
  if arch is not None:
    keras_layers = vgg.keras_layer_names(arch, include_top)
    if k > len(keras_layers):
      raise UserError(f"freeze.first_layers={k}, but {arch} has only {len(keras_layers)} Keras layers")
    weighted = set(vgg.param_layer_names(arch, include_top))
    names = [f"{prefix}{n}" for n in keras_layers[:k] if n in weighted]
  else:
    layers = layer_order(params)
    if k > len(layers):
      raise UserError(f"freeze.first_layers={k}, but the model has only {len(layers)} layers: {layers}")
    names = layers[:k]
  return [(re.escape(n) + "/.*", FROZEN) for n in names]


@dataclasses.dataclass
class Plan:
  """What each parameter gets: frozen, or trained with an lr multiplier."""

  labels: dict  # Same tree as params: "frozen", "trainable" or "trainable*<mult>".
  rows: list[tuple[str, str, float]]  # (path, frozen|trainable, lr multiplier)

  def trainable_mask(self):
    return jax.tree.map(lambda l: l != FROZEN, self.labels)

  def trainable_paths(self) -> list[str]:
    return [path for path, state, _ in self.rows if state == TRAINABLE]

  @property
  def label_set(self) -> list[str]:
    return sorted(set(jax.tree.leaves(self.labels)))


def plan(params, rules: Sequence[tuple[str, str]] = (),
         lr_mults: Sequence[tuple[str, float]] = (), log_matches: bool = True) -> Plan:
  """Applies freeze rules and lr multipliers to every parameter of `params`."""
  paths = param_paths(params)
  rules = [(_compile(r, "freeze rule"), label) for r, label in rules]
  for pattern, label in rules:
    if label not in (FROZEN, TRAINABLE):
      raise UserError(f"freeze rule {pattern.pattern!r}: label must be 'frozen' or 'trainable', got {label!r}")
  mults = [(_compile(r, "lr multiplier"), float(m)) for r, m in lr_mults]
  used = {p.pattern: [] for p, _ in rules + mults}

  def decide(path: str) -> tuple[str, float]:
    state = TRAINABLE
    for pattern, label in rules:
      if pattern.fullmatch(path):
        used[pattern.pattern].append(path)
        state = label
        break
    mult = 1.0
    for pattern, m in mults:
      if pattern.fullmatch(path):
        used[pattern.pattern].append(path)
        mult = m
        break
    return state, mult

  decided = {p: decide(p) for p in paths}
  unused = [r for r, hits in used.items() if not hits]
  if unused:
    example = paths[0] if paths else "?"
    raise UserError(
        f"freeze rule(s) {unused} match no parameter (paths look like {example!r}; rules use re.fullmatch)"
    )
  for pattern, hits in used.items() if log_matches else ():
    log.info("rule %r matched %d params: %s", pattern, len(hits), _summarise(hits))

  def label(path) -> str:
    state, mult = decided[path_str(path)]
    return FROZEN if state == FROZEN else (TRAINABLE if mult == 1.0 else f"{TRAINABLE}*{mult:g}")

  labels = jax.tree_util.tree_map_with_path(lambda p, _: label(p), params)
  rows = [(p, s, 0.0 if s == FROZEN else m) for p, (s, m) in decided.items()]
  return Plan(labels, rows)


def _compile(regex: str, what: str) -> re.Pattern:
  try:
    return re.compile(regex)
  except re.error as e:
    raise UserError(f"{what} {regex!r} is not a valid regex ({e})") from None


def _summarise(paths: list[str]) -> str:
  layers = []
  for p in paths:
    layer = p.rsplit("/", 1)[0]
    if layer not in layers:
      layers.append(layer)
  return ", ".join(layers)


def lr_multiplier(label: str) -> float:
  return float(label.split("*", 1)[1]) if "*" in label else 1.0
