"""In-memory datasets: uint8 images at their native size, int32 labels.

Images stay uint8 on the host at the size they were stored (28x28x1 for MNIST:
49,000 digits are 38 MB). Resizing to the model's input and Keras'
preprocessing happen per batch on the device (`flaxtl.preprocess`), so the
224x224 float32 copy that took the tutorial 29.5 GB never exists.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """images: uint8 (N, H, W, C), C in {1, 3}; labels: int32 (N,) or None
  (unlabelled test data); filenames: where each image came from, or None."""

  images: np.ndarray
  labels: np.ndarray | None = None
  filenames: list[str] | None = None
  class_names: list[str] | None = None

  def __post_init__(self):
    # Sources validate user data with UserErrors; these checks catch our bugs.
    if (
      self.images.dtype != np.uint8
      or self.images.ndim != 4
      or self.images.shape[-1] not in (1, 3)
    ):
      raise ValueError(
        f"images must be uint8 (N, H, W, 1|3), got {self.images.dtype} {self.images.shape}"
      )
    n = len(self.images)
    if self.labels is not None and (
      self.labels.dtype != np.int32 or self.labels.shape != (n,)
    ):
      raise ValueError(
        f"labels must be int32 ({n},), got {self.labels.dtype} {self.labels.shape}"
      )
    if self.filenames is not None and len(self.filenames) != n:
      raise ValueError(f"{len(self.filenames)} filenames for {n} images")

  def __len__(self) -> int:
    return len(self.images)

  def __repr__(self) -> str:
    labels = (
      "unlabelled"
      if self.labels is None
      else f"{len(self.class_names or ())} classes"
    )
    return f"Dataset({len(self)} x {self.images.shape[1:]} uint8, {labels})"

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  def take(self, indices: Sequence[int] | np.ndarray) -> Dataset:
    """The examples at `indices`, in that order (copies)."""
    idx = np.asarray(indices, dtype=np.int64)
    return Dataset(
      images=self.images[idx],
      labels=None if self.labels is None else self.labels[idx],
      filenames=None
      if self.filenames is None
      else [self.filenames[i] for i in idx],
      class_names=self.class_names,
    )


@dataclasses.dataclass(frozen=True)
class Splits:
  """What `data.load` returns; val/test are None when not asked for."""

  train: Dataset
  val: Dataset | None
  test: Dataset | None
  class_names: list[str]
