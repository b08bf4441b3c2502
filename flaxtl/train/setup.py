"""A run's model, initial variables and freeze plan, from its config."""

from __future__ import annotations

from collections.abc import Callable
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxtl import data as data_lib
from flaxtl import tree, weights
from flaxtl.errors import UserError
from flaxtl.models import common
from flaxtl.models.baselines import PixelMLP, SmallCNN
from flaxtl.models.heads import TransferModel
from flaxtl.ops import cpu
from flaxtl.peft import core as peft_core
from flaxtl.train import config as config_lib
from flaxtl.train import freeze, optim, run_spec, steps

log = logging.getLogger(__name__)


def build_model(
  config: ml_collections.ConfigDict,
  num_classes: int,
  provenance: dict | None = None,
  *,
  spec: run_spec.RunSpec | None = None,
) -> nn.Module:
  """The run's model; `provenance`: its pretrained weights' (for options)."""
  spec = spec or run_spec.resolve(config, provenance)
  m, dtype = config.model, config_lib.DTYPES[config.model.dtype]
  if m.name == "mlp":
    return PixelMLP(num_classes, dtype=dtype)
  if m.name == "cnn":
    return SmallCNN(num_classes, dtype=dtype)
  model = TransferModel(
    arch=m.arch,
    head=m.head,
    num_classes=num_classes,
    feature_layer=spec.feature_layer,
    pooling=spec.pooling,
    hidden=tuple(m.hidden),
    activations=tuple(m.activations),
    dropout=tuple(m.dropout),
    head_init=m.head_init,
    dtype=dtype,
    backbone_options=tuple(sorted(spec.options.items())),
  )
  return peft_core.wrap(model, config)  # As is unless peft.method is set.


def init_fn(model: nn.Module, image_size: int) -> Callable[[jax.Array], dict]:
  x = jnp.zeros(common.dummy_input(image_size).shape, jnp.float32)
  return lambda rng: dict(model.init(rng, x))


def abstract_variables(
  model: nn.Module, image_size: int, rng: jax.Array
) -> dict:
  """The variables as shapes, at no FLOPs: checks the model at this size."""
  return jax.eval_shape(init_fn(model, image_size), rng)


def resolve_pretrained(
  config: ml_collections.ConfigDict,
) -> tuple[dict, dict] | None:
  """(variables, provenance) of `model.weights`, or None when training from
  scratch. Done before the model is initialised, so a bad value fails fast."""
  m = config.model
  if m.name != "transfer" or str(m.weights).lower() in ("none", ""):
    log.info("no pretrained weights: training from scratch")
    return None
  keras_top = m.head == "keras_top"
  pretrained, provenance = weights.resolve(
    m.weights, m.arch, keras_top, options=config_lib.backbone_options(config)
  )
  if keras_top and provenance.get("include_top") is False:
    raise UserError(
      f"model.weights={m.weights!r} holds {provenance.get('arch')} without "
      "its top, but model.head='keras_top' keeps the pretrained top: use "
      "--config.model.head=mlp (or 'linear'), as the offline variants such as "
      "configs/mnist_freeze8.py:hed_quick do"
    )
  return pretrained, provenance


def merge_pretrained(
  config: ml_collections.ConfigDict,
  variables: dict,
  pretrained: tuple[dict, dict] | None,
) -> tuple[dict, dict | None]:
  """Merges resolved pretrained variables into the fresh ones (strictly)."""
  if pretrained is None:
    return variables, None
  spec = config_lib.backbone(config)
  keras_top = config.model.head == "keras_top"
  merged, report = weights.merge_pretrained(
    variables,
    pretrained[0],
    into="backbone",
    reinit=[spec.classifier] if keras_top else [],
  )
  counts = {k: len(v) for k, v in report.items()}
  return merged, {
    **pretrained[1],
    "merge": counts,
    "skipped": report["skipped"],
  }


def freeze_plan(
  config: ml_collections.ConfigDict,
  params: dict,
  first_layers: int,
  log_matches: bool = True,
  *,
  spec: run_spec.RunSpec | None = None,
) -> freeze.Plan:
  """The freeze plan of one phase; `spec` (default: resolved from the config
  alone) gives the backbone options its layer order depends on."""
  spec = spec or run_spec.resolve(config)
  where = {
    "backbone": spec.backbone if "backbone" in params else None,
    **spec.layer_options(),
    "options": dict(spec.options),
  }
  rules = freeze.first_layers_rules(first_layers, params, **where)
  until = config.freeze.get("until")
  if until and "backbone" in params:  # Cached features: frozen anyway.
    rules += freeze.until_rules(until, params, **where)
  rules = list(dict.fromkeys(rules))  # first_layers and until may overlap.
  rules += [tuple(r) for r in config.freeze.rules]
  rules += peft_core.freeze_rules(config, params, rules)
  lr_mults = [tuple(r) for r in config.freeze.lr_mults]
  scales = None
  decay = config.freeze.get("layer_decay") or 0.0
  if decay and "backbone" in params:  # Cached features: nothing to decay.
    if where["backbone"] is None:
      raise UserError(
        f"freeze.layer_decay={decay}: model.arch={config.model.arch!r} is "
        "not a registered backbone, so it has no layer order"
      )
    scales = freeze.layer_decay_scales(decay, params, **where)
  return freeze.plan(params, rules, lr_mults, log_matches, scales)


def train_mode(
  config: ml_collections.ConfigDict, plan: freeze.Plan, batch_stats: dict
) -> common.TrainMode:
  """Which BatchNormalization layers run in inference mode while training.

  model.bn_mode 'keras': the frozen ones (Keras' rule since 2.1.3 / TF 2);
  'frozen': all of them; 'train': none (every BN layer normalises with batch
  statistics and updates its moving ones, PyTorch's `model.train()`).
  """
  bn_layers = set(tree.layers(tree.paths(batch_stats)))
  mode = config.model.bn_mode
  if mode == "frozen":
    inference = bn_layers
  elif mode == "keras":
    inference = bn_layers & plan.frozen_layers()
  else:
    inference = set()
  return common.TrainMode(frozenset(inference))


def compiler_options(
  config: ml_collections.ConfigDict,
  trainable_paths=(),
  dtype: str = "float32",
) -> dict[str, str] | None:
  """XLA options for a step of this run that trains `trainable_paths`."""
  spec = config_lib.backbone(config)
  return cpu.compiler_options(
    config.xla_cpu_ynn,
    config.image_size,
    trainable_paths,
    dtype,
    stem_layers=spec.stem_layers if spec is not None else (),
  )


def train_step(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  plan: freeze.Plan,
  total_steps: int,
  prepare: Callable[[jax.Array], jax.Array],
  batch_stats: dict,
) -> tuple[optax.GradientTransformation, Callable, dict[str, str] | None]:
  """(optimiser, un-jitted train step, XLA options) for one freeze phase."""
  tx, schedule = optim.make_optimizer(config.optim, plan, total_steps)
  fn = steps.make_train_step(
    model,
    tx,
    plan.trainable_mask(),
    schedule,
    prepare=prepare,
    train_mode=train_mode(config, plan, batch_stats),
    nan_policy=config.nan_policy,
    log_grad_norm=config.log_grad_norm,
    augment=data_lib.device_augment(config),
  )
  options = compiler_options(config, plan.trainable_paths(), config.model.dtype)
  return tx, fn, options
