"""Linear probe: multinomial logistic regression trained in JAX (optax).

Full-batch L-BFGS (optax.lbfgs with its zoom line search) on features
standardised on the training set, loss = mean cross-entropy + wd / 2 *
||W||^2 (bias unregularised). The weight decay is chosen from WD_GRID on a
stratified validation split of the training data (VAL_FRACTION, seeded),
then the probe is refitted on all of it, as the linear-probe protocols of
the self-supervised papers do (they sweep on a held-out part of train).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxtl.data.splits import stratified_sample

WD_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
VAL_FRACTION = 0.2
STEPS = 100  # At most; stops earlier once the gradient norm is below TOL.
TOL = 1e-4


def _loss(params, x, y, mask, wd):
  logits = x @ params["w"] + params["b"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  ce = jnp.sum(ce * mask) / jnp.sum(mask)
  return ce + 0.5 * wd * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _train(x, y, mask, wd, num_classes: int):
  """L-BFGS until the gradient norm is below TOL (at most STEPS steps); rows
  with mask 0 (the validation split) do not count. One compile per shape."""
  params = {
    "w": jnp.zeros((x.shape[1], num_classes), x.dtype),
    "b": jnp.zeros((num_classes,), x.dtype),
  }
  fun = functools.partial(_loss, x=x, y=y, mask=mask, wd=wd)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(
      grad, state, params, value=value, grad=grad, value_fn=fun
    )
    return optax.apply_updates(params, updates), state

  def going(carry):
    _, state = carry
    count = optax.tree_utils.tree_get(state, "count")
    grad = optax.tree_utils.tree_get(state, "grad")
    norm = optax.tree_utils.tree_norm(grad)
    return (count == 0) | ((count < STEPS) & (norm >= TOL))

  params, _ = jax.lax.while_loop(going, step, (params, opt.init(params)))
  return params


class Probe:
  """A trained probe: standardisation + (w, b)."""

  def __init__(self, mean, std, params, wd: float):
    self.mean, self.std, self.params, self.wd = mean, std, params, wd

  def predict(self, x: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, np.float32) - self.mean) / self.std
    logits = z @ np.asarray(self.params["w"]) + np.asarray(self.params["b"])
    return np.argmax(logits, axis=1)


def train(
  x: np.ndarray,
  y: np.ndarray,
  num_classes: int,
  wd: float,
  mask: np.ndarray | None = None,
) -> Probe:
  """A probe on the rows where `mask` (default: all), standardised on them."""
  x = np.asarray(x, np.float32)
  mask = np.ones(len(x), bool) if mask is None else mask
  mean = x[mask].mean(0, keepdims=True)
  std = x[mask].std(0, keepdims=True) + 1e-6
  params = _train(
    jnp.asarray((x - mean) / std),
    jnp.asarray(y, jnp.int32),
    jnp.asarray(mask, jnp.float32),
    jnp.float32(wd),
    num_classes,
  )
  return Probe(mean, std, jax.tree.map(np.asarray, params), wd)


def fit(
  x: np.ndarray,
  y: np.ndarray,
  num_classes: int,
  seed: int = 0,
  grid: tuple[float, ...] = WD_GRID,
) -> Probe:
  """Picks wd on a stratified validation split (seeded), refits on all."""
  n = len(y)
  n_val = max(num_classes, round(n * VAL_FRACTION))
  val = stratified_sample(y, n_val, np.random.default_rng(seed))
  is_val = np.zeros(n, bool)
  is_val[val] = True
  accs = []
  for wd in grid:  # The masked rows keep one compiled shape for all fits.
    probe = train(x, y, num_classes, wd, mask=~is_val)
    accs.append(np.mean(probe.predict(x[is_val]) == y[is_val]))
  best = grid[int(np.argmax(accs))]  # Ties: the smaller wd (first).
  return train(x, y, num_classes, best)


def accuracy(
  x_train, y_train, x_test, y_test, num_classes: int, seed: int = 0
) -> tuple[float, float]:
  """(test accuracy, the weight decay chosen on the validation split)."""
  probe = fit(x_train, y_train, num_classes, seed)
  return float(np.mean(probe.predict(x_test) == y_test)), probe.wd
