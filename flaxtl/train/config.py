"""Checks on a run's config that need no data, no devices and no weights."""

from __future__ import annotations

import ast
import re
from typing import Any

import jax.numpy as jnp
import ml_collections

from flaxtl import data as data_lib
from flaxtl.errors import UserError
from flaxtl.models import registry
from flaxtl.models.heads import ACTIVATIONS, HEADS, INITS
from flaxtl.ops import conv as conv_ops
from flaxtl.ops import cpu
from flaxtl.peft import core as peft_core
from flaxtl.train import sharding as sharding_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODEL_NAMES = ("transfer", "mlp", "cnn")
PREPROCESS = ("auto", "caffe", "tf", "torch", "clip", "unit", "none")
BN_MODES = ("keras", "frozen", "train")
# Config keys that are options of some backbone family, with their defaults.
FAMILY_OPTIONS = {"conv_impl": "auto", "alpha": 1.0}
# Registered options a run sets itself (the head decides the classifier).
_NOT_OPTIONS = {"classifier_activation"}


# Numeric keys and the values that make sense: (low, high, low_open, high_open);
# None is unbounded. Checked before any work, so nonsense fails in a line.
_RANGES: dict[str, tuple] = {
  "image_size": (1, None, False, False),
  "batch_size": (1, None, False, False),
  "eval_batch_size": (1, None, False, False),
  "total_steps": (0, None, False, False),
  "eval_every_epochs": (1, None, False, False),
  "log_every_steps": (1, None, False, False),
  "checkpoint_every_steps": (1, None, False, False),
  "max_to_keep": (1, None, False, False),
  "model.num_classes": (0, None, False, False),
  "optim.lr": (0, None, True, False),
  "optim.decay": (0, None, False, False),
  "optim.warmup_steps": (0, None, False, False),
  "optim.cosine_alpha": (0, 1, False, False),
  "optim.momentum": (0, 1, False, True),
  "optim.b1": (0, 1, False, True),
  "optim.b2": (0, 1, False, True),
  "optim.eps": (0, None, True, False),
  "optim.weight_decay": (0, None, False, False),
  "optim.clip_norm": (0, None, False, False),
  "data.val_fraction": (0, 1, False, True),
  "data.prefetch": (0, None, False, False),
  "data.max_examples": (1, None, False, False),
  "data.load_size": (1, None, False, False),
  "data.image_size": (1, None, False, False),
  "data.workers": (0, None, False, False),
  "freeze.first_layers": (0, None, False, False),
  "freeze.layer_decay": (0, 1, False, False),
  "distributed.num_processes": (1, None, False, False),
}


# Keys of tuple type: (element kind, what an element looks like). A kind is
# a type (or tuple of types), or a list of them for a fixed-length pair.
# Checked first, so a malformed value is one line naming the key, not a crash.
_NUMBER = (int, float)
TUPLE_KEYS: dict[str, tuple[Any, str, str]] = {
  "model.hidden": (int, "a width (int)", "(256, 128)"),
  "model.activations": (str, "an activation name", "('relu', 'relu')"),
  "model.dropout": (_NUMBER, "a rate (float)", "(0.3, 0.0)"),
  "freeze.rules": (
    [str, str],
    "a pair (regex, 'frozen'|'trainable')",
    "(('head/.*', 'trainable'),)",
  ),
  "freeze.lr_mults": (
    [str, _NUMBER],
    "a pair (regex, multiplier)",
    "(('head/.*', 10.0),)",
  ),
  "freeze.phases": ([int, int], "a pair (epoch, first_layers)", "((2, 4),)"),
  "peft.targets": (str, "a regex", "('blocks/.*/attn/qkv:q,v',)"),
  "peft.adapter_after": (str, "a regex", "('blocks/.*/mlp',)"),
  "mesh.shape": (int, "a device count (int)", "(-1, 1)"),
  # Its pairs are checked by check_sharding (the spec has several forms).
  "sharding.rules": (
    (tuple, list),
    "a (regex, spec) pair",
    "(('.*', 'fsdp'),)",
  ),
}


def _is(value: Any, kind: Any) -> bool:
  if isinstance(value, bool):  # True is an int to Python, not to a config.
    return False
  return isinstance(value, kind)


def _element_ok(value: Any, kind: Any) -> bool:
  if not isinstance(kind, list):
    return _is(value, kind)
  return (
    isinstance(value, (tuple, list))
    and len(value) == len(kind)
    and all(_is(v, k) for v, k in zip(value, kind))
  )


def check_tuples(config: ml_collections.ConfigDict) -> None:
  """Every tuple-typed key is a tuple of well-formed elements."""
  for key, (kind, what, example) in TUPLE_KEYS.items():
    try:
      value = _get(config, key)
    except KeyError:
      continue  # A config built without this key (tests, old configs).
    hint = f'write it as e.g. --config.{key}="{example}"'
    if not isinstance(value, (tuple, list)):
      raise UserError(f"{key}={value!r} is not a tuple; {hint}")
    for i, element in enumerate(value):
      if not _element_ok(element, kind):
        raise UserError(f"{key}[{i}]={element!r} is not {what}; {hint}")


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _in_range(key: str, value: Any, low, high, low_open, high_open) -> None:
  if value is None or isinstance(value, bool):
    return
  bad_low = low is not None and (value <= low if low_open else value < low)
  bad_high = high is not None and (value >= high if high_open else value > high)
  if bad_low or bad_high:
    left = "(" if low_open else "["
    right = ")" if high_open or high is None else "]"
    bounds = f"{left}{'-inf' if low is None else low}, "
    bounds += f"{'inf' if high is None else high}{right}"
    raise UserError(f"{key}={value!r} is out of range: it must be in {bounds}")


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Every numeric key within the values that make sense."""
  for key, bounds in _RANGES.items():
    _in_range(key, _get(config, key), *bounds)
  if not config.total_steps:
    _in_range("num_epochs", config.num_epochs, 1, None, False, False)
  if config.model.num_classes == 1:
    raise UserError(
      "model.num_classes=1: a classifier needs at least 2 classes"
    )
  for width in config.model.hidden:
    _in_range("model.hidden", width, 1, None, False, False)
  for rate in config.model.dropout:
    _in_range("model.dropout", rate, 0, 1, False, True)
  for regex, mult in config.freeze.lr_mults:
    _in_range(f"freeze.lr_mults[{regex!r}]", mult, 0, None, True, False)
  _in_range(
    "distributed.process_id",
    config.distributed.process_id,
    0,
    config.distributed.num_processes,
    False,
    True,
  )


def _choice(key: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise UserError(f"{key} must be one of {list(allowed)}, got {value!r}")


def backbone(config: ml_collections.ConfigDict) -> registry.Backbone | None:
  """The registered backbone a transfer config names (None for baselines)."""
  if config.model.name != "transfer":
    return None
  return registry.get(config.model.arch)


def backbone_options(
  config: ml_collections.ConfigDict, provenance: dict | None = None
) -> dict[str, Any]:
  """The backbone's family options: the config's, and its weights' own.

  Pretrained weights record the options they were converted with (alpha,
  EfficientNet's ImageNet rescaling): those apply unless the config sets the
  key to something else, which is an error rather than a silent mismatch.
  """
  spec = backbone(config)
  given = parse_options(config.model.get("options", ""), spec)
  options = dict(given)
  for key, default in FAMILY_OPTIONS.items():
    value = config.model.get(key, default)
    if spec is not None and key in spec.options:
      options[key] = value
    elif value != default:
      raise UserError(
        f"model.{key}={value!r} is not an option of model.arch="
        f"{config.model.arch!r}"
      )
  for key, value in ((provenance or {}).get("options") or {}).items():
    chosen = config.model.get(key, FAMILY_OPTIONS.get(key))
    if key in given and given[key] != value:
      raise UserError(
        f"model.options sets {key}={options[key]!r}, but model.weights were "
        f"converted with {key}={value!r}"
      )
    if key in FAMILY_OPTIONS and chosen not in (FAMILY_OPTIONS[key], value):
      raise UserError(
        f"model.{key}={chosen!r}, but model.weights were converted with "
        f"{key}={value!r}; set --config.model.{key}={value!r}"
      )
    options[key] = value
  return options


def parse_options(text: str, spec: registry.Backbone | None) -> dict[str, Any]:
  """model.options 'key=value,...' (values Python literals), each an option
  the backbone registered (FAMILY_OPTIONS have keys of their own)."""
  options: dict[str, Any] = {}
  for item in filter(None, (i.strip() for i in text.split(","))):
    key, sep, value = (part.strip() for part in item.partition("="))
    if not sep or not key:
      raise UserError(f"model.options: {item!r} is not 'key=value'")
    try:
      options[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key] = value  # A bare word: a string option.
  if options and spec is None:
    raise UserError("model.options are backbone options: model.name='transfer'")
  if spec is None:
    return options
  allowed = sorted(set(spec.options) - set(FAMILY_OPTIONS) - _NOT_OPTIONS)
  for key in options:
    if key in FAMILY_OPTIONS:
      raise UserError(f"model.options: set {key} with --config.model.{key}")
    if key not in allowed:
      raise UserError(
        f"model.options: {key!r} is not an option of {spec.arch}; it takes "
        f"{allowed or 'none'}"
      )
  return options


def feature_layer(config: ml_collections.ConfigDict) -> str:
  return config.model.feature_layer or backbone(config).feature_layer


def preprocess_mode(config: ml_collections.ConfigDict) -> str:
  """'auto' resolves to the backbone's own preprocess_input."""
  if config.preprocess != "auto":
    return config.preprocess
  spec = backbone(config)
  return spec.preprocess if spec is not None else "unit"


def validate(config: ml_collections.ConfigDict) -> None:
  """Everything that can be checked before touching data, devices or weights."""
  m = config.model
  check_tuples(config)
  _choice("model.name", m.name, MODEL_NAMES)
  _choice("model.dtype", m.dtype, DTYPES)
  _choice("model.bn_mode", m.bn_mode, BN_MODES)
  _choice("preprocess", config.preprocess, PREPROCESS)
  _choice("xla_cpu_ynn", config.xla_cpu_ynn, cpu.YNN_SETTINGS)
  _choice("nan_policy", config.nan_policy, ("stop", "skip"))
  _choice("model.conv_impl", m.conv_impl, conv_ops.CONV_IMPLS)
  check_ranges(config)
  check_sharding(config)
  spec = backbone(config)
  backbone_options(config)
  if spec is None:
    if config.image_size < 8:
      raise UserError(f"image_size={config.image_size} is too small")
  else:
    _validate_transfer(config, spec)
  peft_core.validate(config)
  for epoch, k in config.freeze.phases:
    if epoch <= 0 or k < 0:
      raise UserError(
        "freeze.phases entries are (epoch >= 1, first_layers >= 0), "
        f"got {(epoch, k)}"
      )


def _validate_transfer(config, spec: registry.Backbone) -> None:
  m = config.model
  _choice("model.head", m.head, HEADS)
  # The backbone's own (a ViT's 'token' and 'map' too).
  _choice("model.pooling", m.pooling, spec.poolings)
  _choice("model.head_init", m.head_init, INITS)
  if (
    m.head == "keras_top"
    and spec.top_size
    and config.image_size != spec.top_size
  ):
    raise UserError(
      f"image_size={config.image_size}: model.head='keras_top' of {spec.arch} "
      f"needs image_size={spec.top_size}; use model.head='mlp' or 'linear' "
      "for other sizes"
    )
  if config.image_size < spec.min_size:
    raise UserError(
      f"image_size={config.image_size}: {spec.arch} needs at least "
      f"{spec.min_size}"
    )
  if m.head != "keras_top":
    layers = spec.outputs(include_top=False)
    if feature_layer(config) not in layers:
      raise UserError(
        f"model.feature_layer={m.feature_layer!r} is not a {spec.arch} "
        f"layer: {layers}"
      )
  bad = [a for a in m.activations if a not in ACTIVATIONS]
  if bad or len(m.activations) < len(m.hidden):
    raise UserError(
      f"model.activations needs one of {sorted(ACTIVATIONS)} per hidden "
      f"layer, got {m.activations}"
    )


def check_sharding(config: ml_collections.ConfigDict) -> None:
  """mesh.shape and sharding.* well formed (device counts are checked later)."""
  shape = tuple(config.mesh.shape)
  if (
    len(shape) != len(sharding_lib.AXES)
    or not all(isinstance(s, int) and (s >= 1 or s == -1) for s in shape)
    or shape.count(-1) > 1
  ):
    raise UserError(
      f"mesh.shape={shape} must be (data, model) device counts, each >= 1 "
      "or one of them -1 (the rest)"
    )
  _in_range("sharding.min_kib", config.sharding.min_kib, 0, None, False, False)
  specs = (sharding_lib.FSDP, sharding_lib.REPLICATE)
  for i, rule in enumerate(config.sharding.rules):
    where = f"sharding.rules[{i}]={rule!r}"
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise UserError(f"{where} must be a (regex, spec) pair")
    regex, spec = rule
    try:
      re.compile(regex)
    except (re.error, TypeError) as e:
      raise UserError(f"{where}: bad regex ({e})") from None
    if isinstance(spec, str) and spec in specs:
      continue
    names = [
      n
      for entry in (spec if isinstance(spec, (tuple, list)) else [0])
      for n in (entry if isinstance(entry, (tuple, list)) else [entry])
    ]
    known = [n for n in names if n is None or n in sharding_lib.AXES]
    axes = [n for n in names if n is not None]
    if len(known) != len(names) or len(axes) != len(set(axes)):
      raise UserError(
        f"{where}: spec must be {list(specs)} or a PartitionSpec tuple of "
        f"None / {list(sharding_lib.AXES)} (each axis at most once)"
      )


def check_feature_mode(config: ml_collections.ConfigDict) -> None:
  """A head trained alone on cached features: what that excludes."""
  m = config.model
  if m.name != "transfer" or m.head == "keras_top":
    raise UserError(
      "model.cache_features needs model.name='transfer' with model.head "
      "'mlp' or 'linear'"
    )
  if config.freeze.first_layers or config.freeze.phases:
    raise UserError(
      "model.cache_features trains the head alone (the backbone is frozen by "
      "construction): set freeze.first_layers=0 and freeze.phases=()"
    )
  if data_lib.augment_mode(config.data.augment) != "none":
    raise UserError(
      "model.cache_features cannot augment: features are computed once "
      "per image"
    )
