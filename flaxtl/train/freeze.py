"""Freezing as data: (regex, label) rules over '/'-joined parameter paths.

Rules are tried in order with `re.fullmatch`; the first match wins; a final
catch-all makes every parameter trainable unless a rule said otherwise. A rule
that matches nothing is an error (a typo would otherwise silently train
everything). `first_layers: k` turns Keras' `model.layers[:k]` into rules;
`until: NAME` freezes every layer up to and including NAME in forward order.
The resulting labels drive `optax.multi_transform` (see `flaxtl.train.optim`).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import logging
import re

import jax

from flaxtl import tree
from flaxtl.errors import UserError
from flaxtl.models import registry

log = logging.getLogger(__name__)

FROZEN = "frozen"
TRAINABLE = "trainable"


def first_layers_rules(
  k: int,
  params: dict,
  backbone: registry.Backbone | None = None,
  include_top: bool = True,
  pooling: str | None = None,
  options: dict | None = None,
  prefix: str = "backbone/",
) -> list[tuple[str, str]]:
  """Rules freezing the first k layers.

  With a registered backbone, k counts like Keras' `model.layers[:k]`: the
  input layer and every layer without weights (pooling, activation, padding,
  add) count, so for VGG16 k=8 freezes block1_conv1 ... block3_conv1. Other
  models count their parameter layers.
  """
  if k <= 0:
    return []
  if backbone is not None:
    names = backbone.layers(include_top, pooling, **(options or {}))
    if k > len(names):
      raise UserError(
        f"freeze.first_layers={k}, but {backbone.arch} has only "
        f"{len(names)} layers"
      )
    owners = _owners(params, backbone)
    frozen = [prefix + n for n in names[:k] if prefix + n in owners]
  else:
    layers = tree.layers(tree.paths(params))
    if k > len(layers):
      raise UserError(
        f"freeze.first_layers={k}, but the model has only {len(layers)} "
        f"layers: {layers}"
      )
    frozen = layers[:k]
  return _rules(frozen, params)


def _rules(frozen: list[str], params: dict) -> list[tuple[str, str]]:
  """Freeze rules for these layers; a root parameter (ViT's cls_token) is
  its own layer and gets an exact rule."""
  leaves = set(tree.paths(params))
  return [
    (re.escape(n) if n in leaves else re.escape(n) + "/.*", FROZEN)
    for n in frozen
  ]


def _owners(params: dict, backbone: registry.Backbone | None) -> set[str]:
  """The layers that own parameters.

  A Keras layer's weights may nest under it (a Sequential inside the model,
  e.g. ConvNeXt's stem): with Keras naming it owns every layer below it.
  """
  layers = tree.layers(tree.paths(params))
  if backbone is None or backbone.naming != "keras":
    return set(layers) | set(tree.paths(params))  # Root params: ViT tokens.
  owners = set()
  for layer in layers:
    parts = layer.split("/")
    owners.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
  return owners


def until_rules(
  name: str,
  params: dict,
  backbone: registry.Backbone | None = None,
  include_top: bool = True,
  pooling: str | None = None,
  options: dict | None = None,
  prefix: str = "backbone/",
) -> list[tuple[str, str]]:
  """Rules freezing every layer up to and including `name`, in forward order.

  `name` is a layer ('block2_conv2', 'layer2/1/bn2'), a stage, i.e. a name
  prefix ('block2' for block2_*, Keras naming; 'layer2' for layer2/..., torch
  naming), which freezes through its last layer, or 'strideN': through the
  backbone's stage at output stride N (`Backbone.stages`). PyTorch-named
  backbones also take weightless modules ('maxpool'). Without a registered
  backbone, the parameter tree's layers count, '/'-prefixes as stages.
  """
  weighted = tree.layers(tree.paths(params))
  stride = re.fullmatch(r"stride(\d+)", name)
  if stride and backbone is not None:  # The registry's stage at that stride.
    name = backbone.stage(int(stride[1]), **(options or {})).name
  if backbone is None:
    names, sep, arch, at = weighted, "/", "the model", ""
  else:
    at = prefix
    arch = backbone.arch
    if backbone.naming == "torch":
      names = backbone.outputs(include_top, pooling, **(options or {}))
      sep = "/"
    else:
      names = backbone.layers(include_top, pooling, **(options or {}))
      sep = "_"
  hits = [
    i for i, n in enumerate(names) if n == name or n.startswith(name + sep)
  ]
  if not hits:
    raise UserError(
      f"freeze.until={name!r} is not a layer or stage of {arch} (layers "
      f"look like {[n for n in names if n.startswith(at)][:4] or names[:4]})"
    )
  owners = _owners(params, backbone)
  frozen = [at + n for n in names[: hits[-1] + 1] if at + n in owners]
  return _rules(frozen, params)


def layer_groups(
  params: dict,
  backbone: registry.Backbone,
  include_top: bool = True,
  pooling: str | None = None,
  options: dict | None = None,
  prefix: str = "backbone/",
) -> tuple[dict[str, int | None], int]:
  """({param path: layer id or None (the top)}, depth) of the backbone.

  Ids follow the registry's forward order: PyTorch-named backbones group by
  the path through its first index (`blocks/3`, `layer2/1`, `features/4`),
  parameters before the first group (ViT's cls_token, pos_embed,
  patch_embed; a ResNet stem) are group 0, those after the last (ViT's final
  norm) the top; Keras-named ones by the stage (`Backbone.stages`) each layer
  ends in, layers after the last stage the top. Ids are numbered 0..depth-1
  over the groups that hold parameters (timm's layer-decay groups).
  """
  options = options or {}
  paths = [p for p in tree.paths(params) if p.startswith(prefix)]
  if backbone.naming == "torch":
    names = backbone.outputs(include_top, pooling, **options)
  else:
    names = backbone.layers(include_top, pooling, **options)
  order = {n: i for i, n in reversed(list(enumerate(names)))}

  def index(path: str) -> int:
    parts = path.removeprefix(prefix).split("/")
    for k in range(len(parts), 0, -1):  # The innermost named module.
      if (name := "/".join(parts[:k])) in order:
        return order[name]
    return len(names)  # Unknown to the registry: with the top.

  paths.sort(key=index)  # Stable: a layer's params stay in tree order.
  raw: dict[str, int | None] = {}
  if backbone.naming == "torch":
    keys = {}
    for p in paths:
      parts = p.removeprefix(prefix).split("/")[:-1]
      num = next((i for i, part in enumerate(parts) if part.isdigit()), None)
      keys[p] = None if num is None else "/".join(parts[: num + 1])
    numbered = [p for p in paths if keys[p] is not None]
    last = index(numbered[-1]) if numbered else -1
    seen: dict[str, int] = {}
    for p in paths:
      if keys[p] is not None:
        raw[p] = seen.setdefault(keys[p], len(seen) + 1)
      elif numbered and index(p) > last:
        raw[p] = None  # After the last block (ViT's norm): the top.
      else:  # The stem (group 0), or with the block before it.
        raw[p] = len(seen)
  else:
    ends = sorted(order[s.name] for s in backbone.stages(**options))
    for p in paths:
      group = sum(e < index(p) for e in ends)
      raw[p] = None if group >= len(ends) else group
  ids = sorted({g for g in raw.values() if g is not None})
  dense = {g: i for i, g in enumerate(ids)}
  return {p: None if g is None else dense[g] for p, g in raw.items()}, len(ids)


def layer_decay_scales(
  decay: float, params: dict, backbone: registry.Backbone, **where
) -> dict[str, float]:
  """{param path: decay ** (depth - layer id)}: 1.0 for the top and for
  everything outside the backbone (the head)."""
  groups, depth = layer_groups(params, backbone, **where)
  return {
    p: 1.0 if g is None else decay ** (depth - g) for p, g in groups.items()
  }


@dataclasses.dataclass
class Plan:
  """What each parameter gets: frozen, or trained with an lr multiplier."""

  labels: dict  # Same tree as params: "frozen", "trainable", "trainable*<m>".
  rows: list[tuple[str, str, float]]  # (path, frozen|trainable, lr multiplier)

  def trainable_mask(self):
    return jax.tree.map(lambda label: label != FROZEN, self.labels)

  def trainable_paths(self) -> list[str]:
    return [path for path, state, _ in self.rows if state == TRAINABLE]

  def frozen_layers(self) -> set[str]:
    """Layers none of whose parameters train."""
    trains = {tree.layer_of(p) for p in self.trainable_paths()}
    return {tree.layer_of(p) for p, _, _ in self.rows} - trains

  @property
  def label_set(self) -> list[str]:
    return sorted(set(jax.tree.leaves(self.labels)))


def plan(
  params: dict,
  rules: Sequence[tuple[str, str]] = (),
  lr_mults: Sequence[tuple[str, float]] = (),
  log_matches: bool = True,
  scales: dict[str, float] | None = None,
) -> Plan:
  """Applies freeze rules and lr multipliers to every parameter of `params`;
  `scales` ({path: factor}, layer-wise decay) multiply the lr_mults'."""
  paths = tree.paths(params)
  rules = _pairs(rules, "freeze.rules", "(regex, 'frozen'|'trainable')")
  lr_mults = _pairs(lr_mults, "freeze.lr_mults", "(regex, multiplier)")
  rules = [(_compile(r, "freeze rule"), label) for r, label in rules]
  for pattern, label in rules:
    if label not in (FROZEN, TRAINABLE):
      raise UserError(
        f"freeze rule {pattern.pattern!r}: label must be 'frozen' or "
        f"'trainable', got {label!r}"
      )
  mults = [(_compile(r, "lr multiplier"), m) for r, m in lr_mults]
  used: dict[str, list[str]] = {p.pattern: [] for p, _ in rules + mults}

  def first_match(path, patterns, default):
    for pattern, value in patterns:
      if pattern.fullmatch(path):
        used[pattern.pattern].append(path)
        return value
    return default

  scales = scales or {}
  decided = {
    p: (
      first_match(p, rules, TRAINABLE),
      first_match(p, mults, 1.0) * scales.get(p, 1.0),
    )
    for p in paths
  }
  unused = [r for r, hits in used.items() if not hits]
  if unused:
    example = paths[0] if paths else "?"
    raise UserError(
      f"freeze rule(s) {unused} match no parameter (paths look like "
      f"{example!r}; rules use re.fullmatch)"
    )
  for pattern, hits in used.items() if log_matches else ():
    layers = ", ".join(tree.layers(hits))
    log.info("rule %r matched %d params: %s", pattern, len(hits), layers)

  def label(path) -> str:
    state, mult = decided[tree.path_str(path)]
    if state == FROZEN:
      return FROZEN
    return TRAINABLE if mult == 1.0 else f"{TRAINABLE}*{mult:.12g}"

  labels = jax.tree_util.tree_map_with_path(lambda p, _: label(p), params)
  rows = [(p, s, 0.0 if s == FROZEN else m) for p, (s, m) in decided.items()]
  return Plan(labels, rows)


def _pairs(items: Sequence, key: str, what: str) -> list[tuple]:
  """`items` as (str, value) pairs, or one line naming `key`."""
  out = []
  for item in items if isinstance(items, (tuple, list)) else [items]:
    ok = isinstance(item, (tuple, list)) and len(item) == 2
    if ok and isinstance(item[0], str):
      if key != "freeze.lr_mults":
        out.append(tuple(item))
        continue
      if isinstance(item[1], (int, float)) and not isinstance(item[1], bool):
        out.append((item[0], float(item[1])))
        continue
    raise UserError(f"{key}: {item!r} is not {what}")
  return out


def _compile(regex: str, what: str) -> re.Pattern:
  try:
    return re.compile(regex)
  except re.error as e:
    raise UserError(f"{what} {regex!r} is not a valid regex ({e})") from None


def lr_multiplier(label: str) -> float:
  return float(label.split("*", 1)[1]) if "*" in label else 1.0
