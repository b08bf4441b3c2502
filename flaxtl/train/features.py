"""Backbone features computed once, cached on disk, reused for head training.

Scenario 1 of the tutorial (frozen feature extractor + new head) spends almost
all of its time in the backbone if features are recomputed every epoch. Here
they are computed once per (weights, data, preprocessing, layer, size) with the
backbone in inference mode, stored as a memory-mapped .npy under the cache
directory, and reused on rerun; a change of any input recomputes. Images are
read through the data pipeline's evaluation path, so a streamed folder is
never held in memory; its cache key uses the files' names, sizes and
modification times rather than their bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from flaxtl import data, files
from flaxtl.preprocess import prepare_images

log = logging.getLogger(__name__)

# Batch 32: on CPU at 64x64, batch 64's activations fall out of cache
# (benchmarks/README.md).
BATCH_SIZE = 32


def fingerprint(variables: dict, ds: data.Dataset, **settings) -> str:
  """Hash of everything the features depend on."""
  h = hashlib.sha256()
  meta = {**settings, "examples": len(ds), "data": ds.fingerprint()}
  h.update(json.dumps(meta, sort_keys=True, default=str).encode())
  for leaf in jax.tree.leaves(variables):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:24]


def extract(
  backbone: nn.Module,
  variables: dict,
  ds: data.Dataset,
  *,
  image_size: int,
  preprocess: str,
  cache_dir: Path | None,
  split: str = "data",
  compiler_options: dict | None = None,
  options: data.Options | None = None,
) -> np.ndarray:
  """(N, ...) float32 features of `backbone` (in inference mode), cached.

  Images come through the evaluation pipeline (`options`: host size, workers).
  """
  options = options or data.Options(model_size=image_size)
  layer = getattr(backbone, "output_layer", None) or "out"
  key = fingerprint(
    variables,
    ds,
    model=repr(backbone),
    size=image_size,
    pre=preprocess,
    host_size=options.output_size(ds, train=False),
  )
  path = Path(cache_dir) / f"{split}-{layer}-{key}.npy" if cache_dir else None
  if path is not None and path.exists():
    log.info("features: cache hit %s", path)
    return np.load(path, mmap_mode="r")

  def fn(v, x):
    return backbone.apply(
      v, prepare_images(x, image_size, preprocess), train=False
    )

  forward = jax.jit(fn, compiler_options=compiler_options)
  batches = data.eval_batches(ds, BATCH_SIZE, options=options)
  first = next(batches)
  sample = jax.ShapeDtypeStruct(first["image"].shape, first["image"].dtype)
  out_shape = (len(ds), *jax.eval_shape(forward, variables, sample).shape[1:])
  log.info(
    "features: computing %s for %d images -> %s",
    layer,
    len(ds),
    path or "memory",
  )
  chained = itertools.chain([first], batches)
  if path is None:
    out = np.empty(out_shape, np.float32)
    _fill(out, forward, variables, chained)
    return out
  with files.atomic_path(path, suffix=".npy") as tmp:
    out = np.lib.format.open_memmap(
      tmp, mode="w+", dtype=np.float32, shape=out_shape
    )
    _fill(out, forward, variables, chained)
    out.flush()
    del out
  return np.load(path, mmap_mode="r")


def _fill(out: np.ndarray, forward, variables: dict, batches) -> None:
  """Rows in order; every batch has BATCH_SIZE rows (one compiled shape),
  the padding of the last one masked out."""
  start = 0
  for batch in batches:
    n = int(batch["mask"].sum())
    feats = np.asarray(forward(variables, batch["image"]))
    out[start : start + n] = feats[batch["mask"]]
    start += n
