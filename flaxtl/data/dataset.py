"""Datasets: a random-access source of images, read one example at a time.

A `Dataset` is a source with grain's random-access protocol (`len`,
`source[i]`, like `grain.sources.RandomAccessDataSource`) plus the metadata
that splitting and predictions need in memory: int32 labels, the file names
as the user wrote them, the resolved paths and the class list. Images are
only read when the pipeline asks for an example, so memory does not grow with
the number of images (labels and names aside).

Sources (what `Dataset.source[i]` returns):
    ArraySource   uint8 (H, W, C) arrays already in memory (the embedded
                  sample, npz) or memory-mapped (cached features): one size
    FileSource    the encoded bytes of an image file (folder:, csv:)
    PackedSource  encoded bytes from ArrayRecord shards (`flaxtl.data.pack`)
    TfdsSource    a TFDS data source's image feature (`flaxtl.data.tfds_source`)
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import os
from typing import Any, Protocol

import numpy as np

from flaxtl.data import images


class Source(Protocol):
  """Random access to images: np.ndarray (decoded) or bytes (encoded)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> np.ndarray | bytes: ...

  def describe(self, index: int) -> str:
    """How errors name example `index` (a path, 'train.npz[3]', ...)."""
    ...

  def fingerprint(self, h) -> None:
    """Feeds what identifies the images into the hash `h`."""
    ...


class ArraySource:
  """Decoded images of one size, in memory or memory-mapped."""

  def __init__(self, images: np.ndarray, name: str = "array"):
    if images.ndim < 2:
      raise ValueError(f"images must be (N, ...), got {images.shape}")
    self.images = images
    self.name = name

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images[index]

  def describe(self, index: int) -> str:
    return f"{self.name}[{index}]"

  def fingerprint(self, h) -> None:
    meta = f"{self.images.shape}{self.images.dtype}"
    h.update(meta.encode())
    h.update(np.ascontiguousarray(self.images).tobytes())


class FileSource:
  """Image files, read (not decoded) on access."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> bytes:
    return images.read_bytes(self.paths[index])

  def describe(self, index: int) -> str:
    return self.paths[index]

  def fingerprint(self, h) -> None:
    for p in self.paths:
      st = os.stat(p)
      h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


class Subset:
  """The examples of `source` at `indices`, in that order."""

  def __init__(self, source: Source, indices: np.ndarray):
    self.source = source
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[int(self.indices[index])]

  def describe(self, index: int) -> str:
    return self.source.describe(int(self.indices[index]))

  def fingerprint(self, h) -> None:
    self.source.fingerprint(h)
    h.update(self.indices.tobytes())


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """N examples. labels: int32 (N,) or None (unlabelled test data);
  filenames: as the user wrote them (CSV cell, path relative to a folder);
  paths: where they were found."""

  source: Any  # A `Source`.
  labels: np.ndarray | None = None
  filenames: list[str] | None = None
  paths: list[str] | None = None
  class_names: list[str] | None = None

  def __post_init__(self):
    # Sources validate user data with UserErrors; these checks catch our bugs.
    n = len(self.source)
    if self.labels is not None and (
      self.labels.dtype != np.int32 or self.labels.shape != (n,)
    ):
      raise ValueError(
        f"labels must be int32 ({n},), got {self.labels.dtype} "
        f"{self.labels.shape}"
      )
    for name in ("filenames", "paths"):
      value = getattr(self, name)
      if value is not None and len(value) != n:
        raise ValueError(f"{len(value)} {name} for {n} examples")

  @classmethod
  def from_arrays(
    cls,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    filenames: list[str] | None = None,
    class_names: list[str] | None = None,
    name: str = "array",
  ) -> Dataset:
    """In-memory (or memory-mapped) arrays of one shape."""
    return cls(ArraySource(images, name), labels, filenames, None, class_names)

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    kind = type(self.source).__name__
    labels = (
      "unlabelled"
      if self.labels is None
      else f"{len(self.class_names or ())} classes"
    )
    return f"Dataset({len(self)} examples, {kind}, {labels})"

  @property
  def in_memory(self) -> bool:
    """Decoded arrays of one size: batched as they are, no worker processes."""
    return isinstance(self.source, ArraySource)

  @property
  def images(self) -> np.ndarray:
    """The arrays of an in-memory dataset (tests, benchmarks)."""
    if not self.in_memory:
      raise TypeError(f"{self!r} is read from files, not held in memory")
    return self.source.images

  @property
  def image_shape(self) -> tuple[int, ...] | None:
    return tuple(self.source.images.shape[1:]) if self.in_memory else None

  def describe(self, index: int) -> str:
    for names in (self.paths, self.filenames):
      if names is not None:
        return names[index]
    return self.source.describe(index)

  def take(self, indices: Sequence[int] | np.ndarray) -> Dataset:
    """The examples at `indices`, in that order (arrays are copied; other
    sources are indexed lazily)."""
    idx = np.asarray(indices, dtype=np.int64)
    if self.in_memory:
      source = ArraySource(self.source.images[idx], self.source.name)
    else:
      source = Subset(self.source, idx)
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
    return Dataset(
      source=source,
      labels=None if self.labels is None else self.labels[idx],
      filenames=pick(self.filenames),
      paths=pick(self.paths),
      class_names=self.class_names,
    )

  def fingerprint(self) -> str:
    """A hash of the images (in memory) or of the files' names, sizes and
    modification times (streamed), for caches keyed on the data."""
    h = hashlib.sha256()
    h.update(type(self.source).__name__.encode())
    self.source.fingerprint(h)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Splits:
  """What `data.load` returns; val/test are None when not asked for."""

  train: Dataset
  val: Dataset | None
  test: Dataset | None
  class_names: list[str]
