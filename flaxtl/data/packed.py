"""`arrayrecord:DIR`: a data set packed into ArrayRecord shards.

    DIR/flaxtl_pack.json       format, example count, shard names, classes
    DIR/labels.npy             int32 labels (absent for unlabelled data)
    DIR/filenames.json         each example's filename as the source had it
    DIR/data-00000-of-0000K.array_record

Each record is a little-endian int32 label (-1: unlabelled) followed by the
encoded image bytes: the original file's bytes for file sources (no
re-encoding), PNG for in-memory arrays. Labels and names also sit outside the
records so splitting never reads a shard. Records are read through grain's
`ArrayRecordDataSource` (random access, one record per chunk).
Written by `python -m flaxtl.data.pack`.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
from pathlib import Path
import struct

from array_record.python import array_record_module
import grain
import numpy as np

from flaxtl import files
from flaxtl.data import images
from flaxtl.data import labels as label_io
from flaxtl.data.dataset import Dataset
from flaxtl.errors import UserError

FORMAT = "flaxtl-arrayrecord/1"
META = "flaxtl_pack.json"
_LABEL = struct.Struct("<i")


def encode(label: int, image: bytes) -> bytes:
  return _LABEL.pack(label) + image


def decode(record: bytes) -> tuple[int, bytes]:
  """(label or -1, encoded image bytes)."""
  return _LABEL.unpack_from(record)[0], record[_LABEL.size :]


class PackedSource:
  """Encoded image bytes of example i, from the shards in `root`."""

  def __init__(self, root: Path, shards: list[str]):
    self.root = Path(root)
    self.shards = list(shards)
    self._records = None

  @property
  def records(self) -> grain.sources.ArrayRecordDataSource:
    # Opened on first use: in each grain worker, after unpickling.
    if self._records is None:
      paths = [str(self.root / s) for s in self.shards]
      self._records = grain.sources.ArrayRecordDataSource(paths)
    return self._records

  def __getstate__(self):
    return {"root": self.root, "shards": self.shards, "_records": None}

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> bytes:
    return decode(self.records[index])[1]

  def describe(self, index: int) -> str:
    return f"{self.root} record {index}"

  def fingerprint(self, h) -> None:
    for s in self.shards:
      st = os.stat(self.root / s)
      h.update(f"{self.root / s}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


def read(path: Path, opts) -> Dataset:
  """The packed data set in `path` (a `sources.Options` says how)."""
  meta_path = path / META
  if not meta_path.is_file():
    raise UserError(
      f"{opts.key}: {path} has no {META}; write it with "
      f"`python -m flaxtl.data.pack SOURCE --out {path}`"
    )
  try:
    meta = json.loads(meta_path.read_text())
    count, shards = int(meta["num_examples"]), list(meta["shards"])
    own_names = meta.get("class_names")
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"{meta_path}: not a flaxtl pack index: {e}") from None
  if meta.get("format") != FORMAT:
    raise UserError(
      f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}"
    )
  for s in shards:
    if not (path / s).is_file():
      raise UserError(f"{path}: shard {s} is missing (incomplete copy?)")
  names_file = path / "filenames.json"
  filenames = (
    json.loads(names_file.read_text()) if names_file.is_file() else None
  )
  source = PackedSource(path, shards)
  if len(source) != count:
    raise UserError(
      f"{path}: the shards hold {len(source)} records, {META} says {count}"
    )
  labels_file = path / "labels.npy"
  if not labels_file.is_file():
    if opts.labels_required:
      raise UserError(f"{path}: packed without labels; training needs them")
    return Dataset(source, None, filenames, None, None)
  raw = np.load(labels_file)
  labels, names = label_io.remap(
    raw, own_names, opts.class_names, lambda i: f"{path} example {i}"
  )
  return Dataset(source, labels, filenames, None, names)


def write(
  ds: Dataset,
  out: Path,
  shard_size: int = 10_000,
  progress: Callable[[int], None] | None = None,
) -> dict:
  """Packs `ds` into `out` (created whole or not at all); returns the index."""
  n = len(ds)
  num_shards = max(1, -(-n // shard_size))
  shards = [
    f"data-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)
  ]
  labels = ds.labels
  with files.atomic_dir(out) as tmp:
    for k, shard in enumerate(shards):
      writer = array_record_module.ArrayRecordWriter(
        str(tmp / shard), "group_size:1"
      )
      try:
        for i in range(k * shard_size, min(n, (k + 1) * shard_size)):
          label = -1 if labels is None else int(labels[i])
          writer.write(encode(label, _encoded(ds, i)))
          if progress is not None:
            progress(i + 1)
      finally:
        writer.close()
    if labels is not None:
      np.save(tmp / "labels.npy", labels.astype(np.int32))
    if ds.filenames is not None:
      files.write_json(tmp / "filenames.json", list(ds.filenames))
    meta = {
      "format": FORMAT,
      "num_examples": n,
      "shards": shards,
      "class_names": ds.class_names,
    }
    files.write_json(tmp / META, meta)
  return meta


def _encoded(ds: Dataset, index: int) -> bytes:
  """Example `index` as encoded image bytes (checked to be an image)."""
  record = ds.source[index]
  if isinstance(record, np.ndarray):
    if record.dtype != np.uint8:
      raise UserError(f"{ds.describe(index)}: only uint8 images can be packed")
    return images.encode_png(record)
  images.verify_image(record, ds.describe(index))  # Truncated: refused now.
  return record
