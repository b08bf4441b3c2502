"""`data.load(cfg)`: read the sources, cap and split the training pool.

Splits are deterministic functions of (data, `split_seed`): the same config
gives the same train/val partition in every run and on every process, which
multi-process training and resumed runs rely on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flaxtl.data import sources
from flaxtl.data.dataset import Dataset, Splits
from flaxtl.errors import UserError


def load(cfg: Any) -> Splits:
  """Reads `cfg` (the `data` ConfigDict, or a whole config that has one)
  into Splits. Every key is read as configs/base.py declares it: the data
  layer has no defaults of its own."""
  if "data" in cfg and "source" not in cfg:
    cfg = cfg.data
  opts = sources.Options(key="data.source", tfds_data_dir=cfg.tfds_data_dir)
  pool, test = sources.read(cfg.source, opts)
  if pool.labels is None:
    raise UserError(
      f"data.source={cfg.source!r} has no labels; training data needs them"
    )
  if len(pool) == 0:
    raise UserError(f"data.source={cfg.source!r} is empty")
  class_names = list(pool.class_names)
  if cfg.test_source:
    test_opts = sources.Options(
      key="data.test_source",
      class_names=class_names,
      labels_required=False,
      tfds_data_dir=cfg.tfds_data_dir,
    )
    test, _ = sources.read(cfg.test_source, test_opts)
  seed = int(cfg.split_seed)
  max_examples = _positive(cfg, "max_examples")
  if max_examples is not None and max_examples < len(pool):
    # A stream of its own: the cap is the same subset whatever the split does.
    pool = pool.take(
      stratified_sample(
        pool.labels, max_examples, np.random.default_rng([seed, 1])
      )
    )
  train, val = split(
    pool,
    float(cfg.val_fraction),
    seed,
    bool(cfg.stratify),
  )
  return Splits(train=train, val=val, test=test, class_names=class_names)


def split(
  pool: Dataset, val_fraction: float, seed: int, stratify: bool = True
) -> tuple[Dataset, Dataset | None]:
  """(train, val); val gets ceil(N * val_fraction) examples, like sklearn's
  train_test_split."""
  if not 0.0 <= val_fraction < 1.0:
    raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
  if val_fraction == 0.0:
    return pool, None
  n = len(pool)
  n_val = math.ceil(
    n * val_fraction - 1e-9
  )  # 4000 * 0.2 is 800.0000000000001 in floats.
  if n_val >= n:
    raise UserError(
      f"data.val_fraction={val_fraction} leaves no training examples out of {n}"
    )
  rng = np.random.default_rng(seed)
  if stratify and pool.labels is not None:
    val_idx = stratified_sample(pool.labels, n_val, rng)
  else:
    val_idx = np.sort(rng.permutation(n)[:n_val])
  is_val = np.zeros(n, bool)
  is_val[val_idx] = True
  return pool.take(np.flatnonzero(~is_val)), pool.take(val_idx)


def stratified_sample(
  labels: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
  """`size` indices (sorted) with each class's share as close to its share
  of `labels` as counts allow."""
  classes, counts = np.unique(labels, return_counts=True)
  quota = allocate(counts, size)
  picked = [
    rng.permutation(np.flatnonzero(labels == c))[:q]
    for c, q in zip(classes, quota)
  ]
  return np.sort(np.concatenate(picked))


def allocate(counts: np.ndarray, size: int) -> np.ndarray:
  """Largest-remainder apportionment of `size` over classes with `counts`
  (ties: lower class first)."""
  exact = np.asarray(counts, np.float64) * size / counts.sum()
  quota = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - quota), kind="stable")
  quota[order[: size - quota.sum()]] += 1
  return quota


def _positive(cfg: Any, key: str) -> int | None:
  value = cfg[key]
  if value is None:
    return None
  if int(value) != value or value <= 0:
    raise UserError(
      f"data.{key} must be a positive integer or None, got {value!r}"
    )
  return int(value)
