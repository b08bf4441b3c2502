"""Data: sources -> lazy datasets -> batches on grain for the jitted step.

    splits = data.load(cfg.data)     # Splits(train, val, test, class_names)
    opts = data.Options.from_config(cfg)
    it = data.TrainIterator(splits.train, batch_size=16, seed=0, options=opts)
    batches = data.prefetch(it, size=2, put=lambda b: jax.device_put(b, s))
    for batch in data.eval_batches(splits.val, 64, options=opts): ...

Sources (`data.source`): mnist_sample | csv:PATH | folder:PATH |
tfds:NAME[:SPLIT] | npz:PATH | arrayrecord:DIR; see `flaxtl.data.sources`.
"""

from flaxtl.data.augment import augment, device_augment
from flaxtl.data.dataset import Dataset, Splits
from flaxtl.data.pipeline import Options, TrainIterator, eval_batches, prefetch
from flaxtl.data.sources import SCHEMES
from flaxtl.data.splits import load, split, stratified_sample
from flaxtl.data.transforms import augment_mode

__all__ = [
  "SCHEMES",
  "Dataset",
  "Options",
  "Splits",
  "TrainIterator",
  "augment",
  "augment_mode",
  "device_augment",
  "eval_batches",
  "load",
  "prefetch",
  "split",
  "stratified_sample",
]
