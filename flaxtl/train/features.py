"""Backbone features computed once, cached on disk, reused for head training.

Scenario 1 of the tutorial (frozen feature extractor + new head) spends almost
all of its time in the backbone if features are recomputed every epoch. Here
they are computed once per (weights, data, preprocessing, layer, size) with the
backbone in inference mode, stored as a memory-mapped .npy under the cache
directory, and reused on rerun; a change of any input recomputes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from flaxtl import files
from flaxtl.preprocess import prepare_images

log = logging.getLogger(__name__)

# Batch 32: on CPU at 64x64, batch 64's activations fall out of cache
# (benchmarks/README.md).
BATCH_SIZE = 32


def fingerprint(variables: dict, images: np.ndarray, **settings) -> str:
  """Hash of everything the features depend on."""
  h = hashlib.sha256()
  meta = {**settings, "shape": list(images.shape), "dtype": str(images.dtype)}
  h.update(json.dumps(meta, sort_keys=True, default=str).encode())
  for leaf in jax.tree.leaves(variables):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  h.update(np.ascontiguousarray(images).tobytes())
  return h.hexdigest()[:24]


def extract(
  backbone: nn.Module,
  variables: dict,
  images: np.ndarray,
  *,
  image_size: int,
  preprocess: str,
  cache_dir: Path | None,
  split: str = "data",
  compiler_options: dict | None = None,
) -> np.ndarray:
  """(N, ...) float32 features of `backbone` (in inference mode), cached."""
  layer = getattr(backbone, "output_layer", None) or "out"
  key = fingerprint(
    variables, images, model=repr(backbone), size=image_size, pre=preprocess
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
  n = len(images)
  sample = jax.ShapeDtypeStruct((1, *images.shape[1:]), images.dtype)
  out_shape = (n, *jax.eval_shape(forward, variables, sample).shape[1:])
  log.info(
    "features: computing %s for %d images -> %s", layer, n, path or "memory"
  )
  if path is None:
    out = np.empty(out_shape, np.float32)
    _fill(out, forward, variables, images)
    return out
  with files.atomic_path(path, suffix=".npy") as tmp:
    out = np.lib.format.open_memmap(
      tmp, mode="w+", dtype=np.float32, shape=out_shape
    )
    _fill(out, forward, variables, images)
    out.flush()
    del out
  return np.load(path, mmap_mode="r")


def _fill(
  out: np.ndarray, forward, variables: dict, images: np.ndarray
) -> None:
  n, b = len(images), BATCH_SIZE
  for start in range(0, n, b):
    chunk = images[start : start + b]
    pad = b - len(chunk)
    if pad:  # Keep one compiled shape.
      chunk = np.concatenate(
        [chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]
      )
    out[start : start + b - pad] = np.asarray(forward(variables, chunk))[
      : b - pad
    ]


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSet:
  """A dataset of features instead of images: what the pipeline needs of one."""

  images: np.ndarray  # (N, ...) float32 features, memory-mapped from the cache.
  labels: np.ndarray | None

  def __len__(self) -> int:
    return len(self.images)
