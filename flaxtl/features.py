"""Backbone features computed once, cached on disk, reused for head training.

Scenario 1 of the tutorial (frozen feature extractor + new head) spends almost
all of its time in the backbone if features are recomputed every epoch. Here
they are computed once per (weights, data, preprocessing, layer, size), stored
as a memory-mapped .npy under the cache directory, and reused on rerun; any
change of those inputs changes the fingerprint and recomputes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flaxtl import runtime
from flaxtl.models.vgg import VGG
from flaxtl.preprocess import prepare_images

log = logging.getLogger(__name__)


def fingerprint(*, params, images: np.ndarray, arch: str, layer: str, image_size: int, preprocess: str) -> str:
  """Hash of everything the features depend on."""
  h = hashlib.sha256()
  h.update(json.dumps({"arch": arch, "layer": layer, "size": image_size, "pre": preprocess,
                       "shape": list(images.shape), "dtype": str(images.dtype)}).encode())
  for leaf in jax.tree.leaves(params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  h.update(np.ascontiguousarray(images).tobytes())
  return h.hexdigest()[:24]


def extract(params, images: np.ndarray, *, arch: str, layer: str, image_size: int, preprocess: str,
            cache_dir: Optional[Path], batch_size: int = 32, split: str = "data",
            xla_cpu_ynn: str = "auto") -> np.ndarray:
  """(N, ...) float32 features of `layer`, from the cache when possible.

  batch_size 32: on CPU at 64x64, batch 64's activations fall out of cache (93-130 img/s
  against 156-177 at 16-32; benchmarks/README.md).
  """
  key = fingerprint(params=params, images=images, arch=arch, layer=layer, image_size=image_size,
                    preprocess=preprocess)
  path = Path(cache_dir) / f"{split}-{layer}-{key}.npy" if cache_dir else None
  if path is not None and path.exists():
    log.info("features: cache hit %s", path)
    return np.load(path, mmap_mode="r")
  model = VGG(arch=arch, include_top=False, output_layer=layer)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, prepare_images(x, image_size, preprocess)),
                    compiler_options=runtime.compiler_options(xla_cpu_ynn, image_size))
  n = len(images)
  out_shape = jax.eval_shape(forward, params, jax.ShapeDtypeStruct((1, *images.shape[1:]), images.dtype)).shape
  if path is not None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, *out_shape[1:]))
  else:
    out = np.empty((n, *out_shape[1:]), np.float32)
  log.info("features: computing %s for %d images -> %s", layer, n, path or "memory")
  for start in range(0, n, batch_size):
    chunk = images[start : start + batch_size]
    pad = batch_size - len(chunk)
    if pad:  # Keep one compiled shape.
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    out[start : start + batch_size - pad] = np.asarray(forward(params, chunk))[: batch_size - pad]
  if path is not None:
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSet:
  """A dataset of features instead of images: what the data pipeline needs of one."""

  images: np.ndarray  # (N, ...) float32 features, memory-mapped from the cache.
  labels: Optional[np.ndarray]

  def __len__(self) -> int:
    return len(self.images)
