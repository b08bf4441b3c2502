"""Optimisers, schedules and the frozen/trainable split (optax.multi_transform).

Frozen parameters get `optax.set_to_zero()`: no optimiser state (no momentum
buffers) and an update that does not depend on their gradient, so XLA removes
the backward pass through a frozen prefix from the compiled step. Clipping and
the logged gradient norm only read trainable gradients for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable
import re

import jax
import jax.numpy as jnp
import optax

from flaxtl.errors import UserError
from flaxtl.train.freeze import FROZEN, Plan, lr_multiplier
from flaxtl.tree import path_str

Schedule = Callable[[jax.Array], jax.Array]


def make_schedule(cfg, total_steps: int) -> Schedule:
  """cfg.schedule: 'constant', 'cosine', 'keras_decay'; plus linear warm-up.

  keras_decay is Keras 2's `decay` argument: lr / (1 + decay * step).
  """
  lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(
      lr, max(1, total_steps - warmup), alpha=float(cfg.cosine_alpha)
    )
  elif cfg.schedule == "keras_decay":
    decay = float(cfg.decay)

    def main(step):  # Keras 2 SGD/Adam `decay` argument.
      return lr / (1.0 + decay * step)
  else:
    raise UserError(
      "optim.schedule must be 'constant', 'cosine' or 'keras_decay', "
      f"got {cfg.schedule!r}"
    )
  if warmup <= 0:
    return main
  return optax.join_schedules(
    [optax.linear_schedule(0.0, lr, warmup), main], [warmup]
  )


def _base(cfg, lr: Schedule) -> optax.GradientTransformation:
  name = cfg.name
  if name == "sgd":
    return optax.sgd(
      lr, momentum=float(cfg.momentum) or None, nesterov=bool(cfg.nesterov)
    )
  if name == "adam":
    return optax.adam(
      lr, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps)
    )
  if name == "adamw":
    return optax.adamw(
      lr,
      b1=float(cfg.b1),
      b2=float(cfg.b2),
      eps=float(cfg.eps),
      weight_decay=float(cfg.weight_decay),
      mask=_decay_mask(cfg.wd_mask),
    )
  raise UserError(f"optim.name must be 'sgd', 'adam' or 'adamw', got {name!r}")


def _decay_mask(regex: str | None):
  """AdamW decays the params whose path fullmatches `regex` (e.g. kernels)."""
  if not regex:
    return None
  pattern = re.compile(regex)
  return lambda params: jax.tree_util.tree_map_with_path(
    lambda p, _: bool(pattern.fullmatch(path_str(p))), params
  )


def clip_by_global_norm_masked(
  max_norm: float, mask
) -> optax.GradientTransformation:
  """`clip_by_global_norm` whose norm reads only the leaves `mask` selects."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    norm = masked_global_norm(updates, mask)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    updates = jax.tree.map(
      lambda u, m: u * scale.astype(u.dtype) if m else u, updates, mask
    )
    return updates, state

  return optax.GradientTransformation(init, update)


def masked_global_norm(tree, mask) -> jax.Array:
  leaves = [
    x for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m
  ]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(
    sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
  )


def make_optimizer(
  cfg, freeze_plan: Plan, total_steps: int
) -> tuple[optax.GradientTransformation, Schedule]:
  """Masked clip -> multi_transform(frozen | trainable*mult); the schedule."""
  schedule = make_schedule(cfg, total_steps)
  transforms = {}
  for label in freeze_plan.label_set:
    if label == FROZEN:
      transforms[label] = optax.set_to_zero()
    else:
      mult = lr_multiplier(label)
      transforms[label] = _base(
        cfg, schedule if mult == 1.0 else (lambda s, m=mult: m * schedule(s))
      )
  tx = optax.multi_transform(transforms, freeze_plan.labels)
  if cfg.clip_norm:
    tx = optax.chain(
      clip_by_global_norm_masked(
        float(cfg.clip_norm), freeze_plan.trainable_mask()
      ),
      tx,
    )
  return tx, schedule
