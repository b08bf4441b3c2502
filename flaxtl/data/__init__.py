"""Data: sources -> in-memory uint8 datasets -> batches for the jitted step.

    splits = data.load(cfg.data)     # Splits(train, val, test, class_names)
    it = data.TrainIterator(splits.train, batch_size=16, seed=0)
    batches = data.prefetch(it, size=2, put=lambda b: jax.device_put(b, sharding))
    for batch in data.eval_batches(splits.val, batch_size=64): ...

Sources (`data.source`): mnist_sample | csv:PATH | folder:PATH |
tfds:NAME[:SPLIT] | npz:PATH; see `flaxtl.data.sources`.
"""

from flaxtl.data.augment import augment
from flaxtl.data.dataset import Dataset, Splits
from flaxtl.data.pipeline import (
  Prefetcher,
  TrainIterator,
  eval_batches,
  prefetch,
)
from flaxtl.data.sources import SCHEMES
from flaxtl.data.splits import load, split, stratified_sample

__all__ = [
  "SCHEMES",
  "Dataset",
  "Prefetcher",
  "Splits",
  "TrainIterator",
  "augment",
  "eval_batches",
  "load",
  "prefetch",
  "split",
  "stratified_sample",
]
