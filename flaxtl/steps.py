"""Pure, jit-compiled steps: (state, batch) -> (state, metrics)."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxtl import optim
from flaxtl.preprocess import prepare_images


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # A raw uint32 key: orbax saves it like any array.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def log_loss_terms(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example log loss exactly as sklearn's `log_loss` computes it.

  Probabilities are clipped to [eps, 1 - eps] (float32 eps) and renormalised
  before the log, so a confident mistake costs ~16, not infinity.
  """
  eps = jnp.finfo(jnp.float32).eps
  p = jnp.clip(jax.nn.softmax(logits.astype(jnp.float32)), eps, 1 - eps)
  p = p / p.sum(-1, keepdims=True)
  return -jnp.log(jnp.take_along_axis(p, labels[:, None], axis=-1)[:, 0])


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    trainable_mask,
    schedule: Callable,
    *,
    prepare: Callable[[jax.Array], jax.Array],
    nan_policy: str = "stop",
    log_grad_norm: bool = True,
    augment: Callable | None = None,
) -> Callable:
  """The (not yet jitted) train step for one freeze phase."""

  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    aug_rng, dropout_rng = jax.random.split(rng)
    x = prepare(batch["image"])
    if augment is not None:
      x = augment(aug_rng, x)
    labels = batch["label"]

    def loss_fn(params):
      logits = model.apply({"params": params}, x, train=True, rngs={"dropout": dropout_rng})
      return cross_entropy(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "lr": schedule(state.step),
    }
    finite = jnp.isfinite(loss)
    if log_grad_norm:
      # Trainable leaves only: reading frozen grads would keep their backward pass alive.
      gnorm = optim.masked_global_norm(grads, trainable_mask)
      metrics["grad_norm"] = gnorm
      finite &= jnp.isfinite(gnorm)
    metrics["finite"] = finite
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if nan_policy == "skip":
      keep = lambda new, old: jnp.where(finite, new, old)
      new_state = state.replace(
          step=state.step + 1,
          params=jax.tree.map(keep, params, state.params),
          opt_state=jax.tree.map(keep, opt_state, state.opt_state),
      )
    return new_state, metrics

  return step_fn


def image_prep(image_size: int, preprocess: str) -> Callable[[jax.Array], jax.Array]:
  """uint8 batch -> model input, on device: resize, grayscale tiling, preprocess_input."""
  return lambda images: prepare_images(images, image_size, preprocess)


def make_eval_step(model: nn.Module, num_classes: int, *, prepare: Callable) -> Callable:
  """Sums over the (padded, masked) batch; the host adds them up across batches."""

  def eval_fn(params, batch: dict) -> dict:
    x = prepare(batch["image"])
    logits = model.apply({"params": params}, x, train=False)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
    onehot = jax.nn.one_hot(labels, num_classes) * mask[:, None]
    return {
        "count": mask.sum(),
        "loss": (cross_entropy(logits, labels) * mask).sum(),
        "log_loss": (log_loss_terms(logits, labels) * mask).sum(),
        "correct": correct.sum(),
        "class_count": onehot.sum(0),
        "class_correct": (onehot * correct[:, None]).sum(0),
    }

  return eval_fn


def make_predict_fn(model: nn.Module, *, prepare: Callable) -> Callable:
  def predict(params, images):
    x = prepare(images)
    return jax.nn.softmax(model.apply({"params": params}, x, train=False))

  return predict
