"""Checks on a run's config that need no data, no devices and no weights."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from flaxtl.errors import UserError
from flaxtl.models import registry
from flaxtl.models.heads import ACTIVATIONS, HEADS, INITS
from flaxtl.ops import conv as conv_ops
from flaxtl.ops import cpu
from flaxtl.peft import core as peft_core

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODEL_NAMES = ("transfer", "mlp", "cnn")
PREPROCESS = ("auto", "caffe", "tf", "torch", "unit", "none")
BN_MODES = ("keras", "frozen", "train")
# Config keys that are options of some backbone family, with their defaults.
FAMILY_OPTIONS = {"conv_impl": "auto", "alpha": 1.0}


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
  "distributed.num_processes": (1, None, False, False),
}


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
  options = {}
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
    if key in FAMILY_OPTIONS and chosen not in (FAMILY_OPTIONS[key], value):
      raise UserError(
        f"model.{key}={chosen!r}, but model.weights were converted with "
        f"{key}={value!r}; set --config.model.{key}={value!r}"
      )
    options[key] = value
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
  _choice("model.name", m.name, MODEL_NAMES)
  _choice("model.dtype", m.dtype, DTYPES)
  _choice("model.bn_mode", m.bn_mode, BN_MODES)
  _choice("preprocess", config.preprocess, PREPROCESS)
  _choice("xla_cpu_ynn", config.xla_cpu_ynn, cpu.YNN_SETTINGS)
  _choice("nan_policy", config.nan_policy, ("stop", "skip"))
  _choice("model.conv_impl", m.conv_impl, conv_ops.CONV_IMPLS)
  check_ranges(config)
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
  _choice("model.pooling", m.pooling, registry.POOLINGS)
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
