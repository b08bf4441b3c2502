"""Builds examples/digits/: 100 held-out digits in the tutorial's file layout.

    python tools/make_digit_examples.py

`test.csv` lists `filename` only (as the tutorial's test file does), with the
PNGs in `Images/test/`; `test_labelled.csv` adds the `label` column so that
`python -m flaxtl.predict` can report accuracy on it. The digits are the
first 10 of each class of the embedded sample's held-out part, which no
training run sees.
"""

import csv
from pathlib import Path
import sys

import numpy as np
from PIL import Image

from flaxtl import data

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "examples" / "digits"
PER_CLASS = 10


def main() -> None:
  sys.path.insert(0, str(ROOT))  # configs/ is the repository's, not installed.
  from configs import base

  cfg = base.get_base().data
  cfg.val_fraction = 0.0
  test = data.load(cfg).test
  picked = np.concatenate(
    [np.flatnonzero(test.labels == c)[:PER_CLASS] for c in range(10)]
  )
  images = OUT / "Images" / "test"
  images.mkdir(parents=True, exist_ok=True)
  rows = []
  for i, k in enumerate(sorted(picked)):
    name = f"{i}.png"
    Image.fromarray(test.images[k, :, :, 0]).save(images / name)
    rows.append((name, test.class_names[test.labels[k]]))
  for filename, header in (("test.csv", 1), ("test_labelled.csv", 2)):
    with open(OUT / filename, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["filename", "label"][:header])
      w.writerows(row[:header] for row in rows)
  print(f"wrote {len(rows)} digits to {OUT}")


if __name__ == "__main__":
  main()
