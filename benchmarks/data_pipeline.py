"""Data pipeline: peak memory of a 224x224 epoch, host throughput vs model.

    python benchmarks/data_pipeline.py      # about 1 minute on 2 CPU cores

1. One epoch over 60,000 MNIST-like 28x28 uint8 images (the embedded 5k
   sample, tiled and perturbed), each batch resized to 224x224 and
   preprocessed (Keras caffe mode) inside a jitted `prepare_images`. Reports
   the process's peak RSS: only one batch is ever 224x224 float32, where the
   tutorial's whole-set array took 29.5 GB.
2. Host pipeline images/s (TrainIterator + prefetch, batch 16) against a
   jitted VGG16 forward at 64x64, batch 16, measured in the same run. A train
   step is slower than a forward, so pipeline/forward is a conservative
   headroom factor.

Runs in this order because peak RSS is a process-wide high-water mark.
"""

from __future__ import annotations

import argparse
import time

import common
import jax
import numpy as np

from flaxtl import data, models
from flaxtl.data import sources
from flaxtl.preprocess import prepare_images


def mnist_like(n: int, seed: int = 0) -> data.Dataset:
  """`n` 28x28 digits: the 5k sample repeated, each copy shifted and noised
  so that no two are equal."""
  pool, test = sources.read("mnist_sample")
  base = np.concatenate([pool.images, test.images])
  labels = np.concatenate([pool.labels, test.labels])
  rng = np.random.default_rng(seed)
  copies, label_copies = [], []
  for _ in range(-(-n // len(base))):
    dy, dx = rng.integers(-2, 3, size=2)
    shifted = np.roll(base, (dy, dx), axis=(1, 2)).astype(np.int16)
    shifted += rng.integers(-8, 9, base.shape, np.int16)
    copies.append(np.clip(shifted, 0, 255).astype(np.uint8))
    label_copies.append(labels)
  return data.Dataset(
    np.concatenate(copies)[:n],
    np.concatenate(label_copies)[:n],
    None,
    pool.class_names,
  )


def memory_epoch(ds: data.Dataset, batch: int, size: int) -> dict:
  prep = jax.jit(lambda x: prepare_images(x, size, "caffe"))
  it = data.TrainIterator(ds, batch, seed=0)
  before = common.peak_rss_mb()
  t0 = time.perf_counter()
  checksum = 0.0
  with data.prefetch(it, size=2, put=jax.device_put) as batches:
    for _ in range(it.steps_per_epoch):
      # The full (batch, size, size, 3) float32 array is materialised.
      out = prep(next(batches)["image"])
      out.block_until_ready()
      checksum += float(out[0, 0, 0, 0])
  seconds = time.perf_counter() - t0
  return {
    "images": it.steps_per_epoch * batch,
    "seconds": seconds,
    "rss_before_mb": before,
    "peak_rss_mb": common.peak_rss_mb(),
    "batch_mb": batch * size * size * 3 * 4 / 2**20,
    "whole_set_gb": len(ds) * size * size * 3 * 4 / 1e9,
  }


def host_throughput(ds: data.Dataset, batch: int, steps: int) -> float:
  it = data.TrainIterator(ds, batch, seed=1)
  with data.prefetch(it, size=2) as batches:
    next(batches)  # Thread start-up is not throughput.
    t0 = time.perf_counter()
    for _ in range(steps):
      next(batches)
    return steps * batch / (time.perf_counter() - t0)


def forward_throughput(
  ds: data.Dataset, batch: int, size: int, steps: int
) -> tuple[float, float]:
  """images/s on one resident batch, and fed by TrainIterator + prefetch."""
  model = models.create("vgg16", include_top=False)
  params = models.init_variables(model, size)["params"]
  fwd = jax.jit(
    lambda p, x: model.apply(
      {"params": p}, prepare_images(x, size, "caffe")
    ).sum()
  )
  x = jax.device_put(ds.images[:batch])
  fwd(params, x).block_until_ready()  # Compile.
  t0 = time.perf_counter()
  for _ in range(steps):
    fwd(params, x).block_until_ready()
  resident = steps * batch / (time.perf_counter() - t0)
  with data.prefetch(
    data.TrainIterator(ds, batch, seed=2), size=2, put=jax.device_put
  ) as batches:
    next(batches)
    t0 = time.perf_counter()
    for _ in range(steps):
      fwd(params, next(batches)["image"]).block_until_ready()
    fed = steps * batch / (time.perf_counter() - t0)
  return resident, fed


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--images", type=int, default=60_000)
  ap.add_argument(
    "--batch", type=int, default=128, help="batch of the 224x224 memory epoch"
  )
  ap.add_argument("--size", type=int, default=224)
  ap.add_argument(
    "--host-steps",
    type=int,
    default=3_000,
    help="batches of 16 timed for the host pipeline",
  )
  ap.add_argument("--forward-steps", type=int, default=30)
  args = ap.parse_args()

  ds = mnist_like(args.images)
  print(
    f"dataset: {len(ds)} x {ds.image_shape} uint8 = "
    f"{ds.images.nbytes / 2**20:.0f} MiB; "
    f"jax {jax.__version__} on {jax.devices()[0].platform}"
  )
  mem = memory_epoch(ds, args.batch, args.size)
  host = host_throughput(ds, 16, args.host_steps)
  resident, fed = forward_throughput(ds, 16, 64, args.forward_steps)

  size = f"{args.size}x{args.size}"
  rate = mem["images"] / mem["seconds"]
  rows = [
    [
      f"epoch of {mem['images']:,} images at {size} (batch {args.batch}, "
      "jitted prepare_images)",
      f"{mem['seconds']:.0f} s, {rate:,.0f} img/s",
    ],
    [
      "peak RSS (max RSS of the process)",
      f"{mem['peak_rss_mb']:,.0f} MB (before the epoch: "
      f"{mem['rss_before_mb']:,.0f} MB)",
    ],
    [
      f"one {size}x3 float32 batch / the whole set",
      f"{mem['batch_mb']:.0f} MiB / {mem['whole_set_gb']:.1f} GB",
    ],
    [
      "host pipeline (TrainIterator + prefetch, batch 16)",
      f"{host:,.0f} img/s",
    ],
    [
      "VGG16 forward 64x64 batch 16 (jit, resident batch)",
      f"{resident:.1f} img/s",
    ],
    [
      "same forward fed by TrainIterator + prefetch(device_put)",
      f"{fed:.1f} img/s",
    ],
    ["host pipeline / forward", f"{host / resident:,.0f}x"],
  ]
  print()
  print(common.markdown_table(["measure", "value"], rows))
  ok = mem["peak_rss_mb"] < 1024
  print(f"\npeak RSS under 1 GB: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
  main()
