"""The probes over cached features: one record per (layer, method, shots).

fewshot: k shots per class drawn with each seed (as big_vision, shots only);
linear: the full training set, one seeded validation split (seed 0); knn: k
shots per class per seed and the full training set. Deterministic runs
(linear, full-set knn) count as one seed. accuracy_ci95 is the half-width of the
95% interval: Student's t over seeds when there are several, else the normal
approximation of the binomial over the test set (ci_kind says which).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

from flaxtl.errors import UserError
from flaxtl.probe import fewshot, knn, linear

METHODS = ("fewshot", "linear", "knn")


def ci95(accs: Sequence[float], n_test: int) -> tuple[float, str]:
  accs = np.asarray(accs, np.float64)
  if len(accs) > 1:
    sem = accs.std(ddof=1) / np.sqrt(len(accs))
    return float(stats.t.ppf(0.975, len(accs) - 1) * sem), "seeds-t"
  p = float(accs[0])
  return float(1.96 * np.sqrt(p * (1 - p) / n_test)), "binomial"


def check_shots(y_train: np.ndarray, num_classes: int, shots: Sequence[int]):
  counts = np.bincount(y_train, minlength=num_classes)
  if num_classes < 2 or (counts > 0).sum() < 2:
    raise UserError(
      f"the training data has {int((counts > 0).sum())} class(es); a probe "
      "needs at least 2"
    )
  for k in shots:
    if k < 1:
      raise UserError(f"--shots must be positive, got {k}")
    if counts.min() < k:
      c = int(np.argmin(counts))
      raise UserError(
        f"--shots {k}: class {c} has only {counts[c]} training examples "
        f"({k} per class needed)"
      )


def run(
  x_train: np.ndarray,
  y_train: np.ndarray,
  x_test: np.ndarray,
  y_test: np.ndarray,
  num_classes: int,
  methods: Sequence[str],
  shots: Sequence[int],
  seeds: int,
) -> list[dict]:
  """Records (without arch/weights/layer) for one layer's features."""
  records = []
  n_test = len(y_test)

  def record(method, k, accs, chosen, n_train):
    mean = float(np.mean(accs))
    half, kind = ci95(accs, n_test)
    records.append(
      {
        "method": method,
        "shots": k,
        "seeds": len(accs),
        "accuracy_mean": mean,
        "accuracy_ci95": half,
        "ci_kind": kind,
        "accuracies": [float(a) for a in accs],
        "chosen": chosen,
        "n_train": n_train,
        "n_test": n_test,
      }
    )

  for method in methods:
    if method == "linear":
      a, wd = linear.accuracy(x_train, y_train, x_test, y_test, num_classes)
      record(method, None, [a], [wd], len(y_train))
      continue
    for k in [*shots, None] if method == "knn" else shots:
      if k is None:
        draws = [np.arange(len(y_train))]
      else:
        draws = [
          fewshot.sample_shots(
            y_train, k, num_classes, np.random.default_rng(s)
          )
          for s in range(seeds)
        ]
      accs, chosen = [], []
      for idx in draws:
        xs, ys = x_train[idx], y_train[idx]
        if method == "fewshot":
          a, l2 = fewshot.accuracy(xs, ys, x_test, y_test, num_classes)
          chosen.append(l2)
        else:
          a = knn.accuracy(xs, ys, x_test, y_test, num_classes)
        accs.append(a)
      record(method, k, accs, chosen or None, len(draws[0]))
  return records
