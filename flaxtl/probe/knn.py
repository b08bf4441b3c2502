"""DINO's weighted kNN classifier on L2-normalised features.

As `eval_knn.py` of DINO: cosine similarities to every training feature, the
k most similar neighbours vote with weight exp(similarity / T) for their
class, the class with the largest total wins (k=20, T=0.07 by default).
"""

from __future__ import annotations

import numpy as np

K = 20
TEMPERATURE = 0.07
CHUNK = 1024  # Test rows per similarity block (bounds memory).


def normalise(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def votes(
  x_train: np.ndarray,
  y_train: np.ndarray,
  x_test: np.ndarray,
  num_classes: int,
  k: int = K,
  temperature: float = TEMPERATURE,
) -> np.ndarray:
  """(N_test, C) summed neighbour weights per class."""
  train, test = normalise(x_train), normalise(x_test)
  k = min(k, len(train))
  out = np.zeros((len(test), num_classes), np.float64)
  for start in range(0, len(test), CHUNK):
    sim = test[start : start + CHUNK] @ train.T
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(sim, top, axis=1).astype(np.float64)
    w = np.exp(s / temperature)
    rows = np.arange(len(sim))[:, None]
    np.add.at(out[start : start + CHUNK], (rows, y_train[top]), w)
  return out


def predict(x_train, y_train, x_test, num_classes: int, **kw) -> np.ndarray:
  return np.argmax(votes(x_train, y_train, x_test, num_classes, **kw), axis=1)


def accuracy(x_train, y_train, x_test, y_test, num_classes: int) -> float:
  pred = predict(x_train, y_train, x_test, num_classes)
  return float(np.mean(pred == y_test))
