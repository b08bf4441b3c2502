"""Pure, jit-compiled steps: (state, batch) -> (state, metrics)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxtl.models.common import TrainMode
from flaxtl.train import optim
from flaxtl.train.metrics import log_loss_terms


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any  # BatchNormalization statistics ({} for models without BN).
  opt_state: Any
  rng: jax.Array  # A raw uint32 key: orbax saves it like any array.

  def variables(self) -> dict:
    return variables_of(self.params, self.batch_stats)


def variables_of(params: Any, batch_stats: Any) -> dict:
  return {
    "params": params,
    **({"batch_stats": batch_stats} if batch_stats else {}),
  }


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), labels
  )


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  trainable_mask: Any,
  schedule: Callable,
  *,
  prepare: Callable[[jax.Array], jax.Array],
  train_mode: TrainMode | bool = True,
  nan_policy: str = "stop",
  log_grad_norm: bool = True,
  augment: Callable | None = None,
) -> Callable:
  """The (not yet jitted) train step for one freeze phase.

  `train_mode` names the BatchNormalization layers that stay in inference mode
  (frozen ones, Keras' rule); the others normalise with batch statistics,
  computed over the global batch, and update their moving statistics.
  """

  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    aug_rng, dropout_rng = jax.random.split(rng)
    x = prepare(batch["image"])
    if augment is not None:
      x = augment(aug_rng, x)
    labels = batch["label"]

    def loss_fn(params):
      variables = variables_of(params, state.batch_stats)
      rngs = {"dropout": dropout_rng}
      if state.batch_stats:
        logits, updates = model.apply(
          variables, x, train=train_mode, rngs=rngs, mutable=["batch_stats"]
        )
        batch_stats = updates["batch_stats"]
      else:
        logits = model.apply(variables, x, train=train_mode, rngs=rngs)
        batch_stats = state.batch_stats
      return cross_entropy(logits, labels).mean(), (logits, batch_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
      "lr": schedule(state.step),
    }
    finite = jnp.isfinite(loss)
    if log_grad_norm:
      # Trainable leaves only: reading frozen grads keeps their backward pass.
      gnorm = optim.masked_global_norm(grads, trainable_mask)
      metrics["grad_norm"] = gnorm
      finite &= jnp.isfinite(gnorm)
    metrics["finite"] = finite
    new = (params, batch_stats, opt_state)
    if nan_policy == "skip":
      old = (state.params, state.batch_stats, state.opt_state)
      new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, batch_stats, opt_state = new
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
    )
    return new_state, metrics

  return step_fn


def make_eval_step(
  model: nn.Module, num_classes: int, *, prepare: Callable
) -> Callable:
  """Sums over the (padded, masked) batch; the host adds them up."""

  def eval_fn(variables: dict, batch: dict) -> dict:
    logits = model.apply(variables, prepare(batch["image"]), train=False)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
    onehot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
    probs = jax.nn.softmax(logits.astype(jnp.float32))
    return {
      "count": mask.sum(),
      "loss": (cross_entropy(logits, labels) * mask).sum(),
      "log_loss": (log_loss_terms(probs, labels) * mask).sum(),
      "correct": correct.sum(),
      "class_count": onehot.sum(0),
      "class_correct": (onehot * correct[:, None]).sum(0),
    }

  return eval_fn


def make_predict_fn(model: nn.Module, *, prepare: Callable) -> Callable:
  def predict(variables: dict, images: jax.Array) -> jax.Array:
    logits = model.apply(variables, prepare(images), train=False)
    return jax.nn.softmax(logits.astype(jnp.float32))

  return predict
