"""ImageNet-1k class names and Keras' `decode_predictions`, offline."""

from __future__ import annotations

import functools
from importlib import resources
import json

import numpy as np


@functools.cache
def class_index() -> list[tuple[str, str]]:
  """[(wnid, name)] for the 1000 classes, in the models' output order."""
  text = (
    resources.files("flaxtl.resources")
    .joinpath("imagenet_classes.json")
    .read_text()
  )
  return [tuple(pair) for pair in json.loads(text)]


def decode_predictions(
  preds, top: int = 5
) -> list[list[tuple[str, str, float]]]:
  """Keras' `decode_predictions`: top-k (wnid, name, score) per row."""
  preds = np.asarray(preds)
  if preds.ndim != 2 or preds.shape[1] != 1000:
    raise ValueError(
      f"decode_predictions expects a (batch, 1000) array, got {preds.shape}"
    )
  classes = class_index()
  results = []
  for row in preds:
    best = np.argsort(row)[::-1][:top]
    results.append([(*classes[i], float(row[i])) for i in best])
  return results
