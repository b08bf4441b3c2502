"""Closed-form few-shot: regularised least squares onto one-hot targets.

big_vision's `evaluators/fewshot_lsr.py` semantics: features standardised on
the shots (mean, std + 1e-5), a constant 100 column for an almost
unregularised bias, targets 2 * one_hot - 1, and the ridge solution
(x^T x + l2 I)^-1 x^T y (or x^T (x x^T + l2 I)^-1 y when there are more
dimensions than shots) through one eigendecomposition, so every l2 of the
grid costs a matrix product. big_vision picks l2 on a held-out split of the
evaluation data; here it is chosen on the shots alone, by exact
leave-one-out (the hat matrix of ridge gives every left-out prediction in
closed form; the standardisation is not refitted per left-out point).
Ties in left-out accuracy go to the lower left-out squared error.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flaxtl.errors import UserError

BIAS_CONSTANT = 100.0
L2_GRID = tuple(2.0**i for i in range(-10, 20))  # big_vision's grid.


@dataclasses.dataclass(frozen=True)
class Ridge:
  mean: np.ndarray
  std: np.ndarray
  w: np.ndarray  # (D + 1, C): the last row multiplies BIAS_CONSTANT.
  l2: float

  def scores(self, x: np.ndarray) -> np.ndarray:
    return _design(x, self.mean, self.std) @ self.w

  def predict(self, x: np.ndarray) -> np.ndarray:
    return np.argmax(self.scores(x), axis=1)


def _design(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  x = (np.asarray(x, np.float64) - mean) / std
  return np.pad(x, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def targets(y: np.ndarray, num_classes: int) -> np.ndarray:
  return 2.0 * np.eye(num_classes)[y] - 1.0


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x, np.float64)
  return x.mean(axis=0, keepdims=True), x.std(axis=0, keepdims=True) + 1e-5


def fit(
  x: np.ndarray,
  y: np.ndarray,
  num_classes: int,
  l2: float | None = None,
  grid: tuple[float, ...] = L2_GRID,
) -> Ridge:
  """Ridge onto one-hot targets; l2=None picks it from `grid` by LOO."""
  mean, std = standardise(x)
  a = _design(x, mean, std)
  t = targets(y, num_classes)
  # a = u s v^T (thin): both of big_vision's cases in one decomposition.
  u, s, vt = np.linalg.svd(a, full_matrices=False)
  eigs = s**2
  uty = u.T @ t
  if l2 is None:
    l2 = _pick_l2(u, eigs, uty, t, y, grid)
  w = vt.T @ ((s / (eigs + l2))[:, None] * uty)
  return Ridge(mean, std, w, float(l2))


def loo_scores(a: np.ndarray, t: np.ndarray, l2: float) -> np.ndarray:
  """Row i: the scores of row i by the ridge fitted without it (exact)."""
  u, s, _ = np.linalg.svd(a, full_matrices=False)
  return _loo(u, s**2, u.T @ t, t, l2)


def _loo(u, eigs, uty, t, l2) -> np.ndarray:
  shrink = eigs / (eigs + l2)
  fitted = u @ (shrink[:, None] * uty)  # The hat matrix times t.
  h = np.einsum("ij,j,ij->i", u, shrink, u)  # diag of the hat matrix.
  return (fitted - h[:, None] * t) / np.maximum(1.0 - h, 1e-12)[:, None]


def _pick_l2(u, eigs, uty, t, y, grid) -> float:
  """The grid value with the best leave-one-out accuracy on the shots."""
  best, best_key = grid[0], None
  for l2 in grid:
    loo = _loo(u, eigs, uty, t, l2)
    acc = np.mean(np.argmax(loo, axis=1) == y)
    err = np.mean((loo - t) ** 2)
    key = (acc, -err)
    if best_key is None or key > best_key:
      best, best_key = l2, key
  return best


def sample_shots(
  labels: np.ndarray, shots: int, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
  """`shots` indices per class (sorted), drawn with `rng`."""
  picked = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < shots:
      raise UserError(
        f"{shots}-shot needs {shots} training examples per class; class {c} "
        f"has {len(idx)}"
      )
    picked.append(rng.choice(idx, shots, replace=False))
  return np.sort(np.concatenate(picked))


def accuracy(
  x_train: np.ndarray,
  y_train: np.ndarray,
  x_test: np.ndarray,
  y_test: np.ndarray,
  num_classes: int,
) -> tuple[float, float]:
  """(test accuracy, the l2 chosen on the training examples)."""
  model = fit(x_train, y_train, num_classes)
  return float(np.mean(model.predict(x_test) == y_test)), model.l2
