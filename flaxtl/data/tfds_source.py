"""`tfds:NAME[:SPLIT]`: a TensorFlow Datasets dataset, read without TensorFlow.

Datasets prepared in the `array_record` format are read through
`builder.as_data_source`: random access, numpy, no TensorFlow; grain's
workers read and transform examples on demand. The labels are read in one
pass when the source is opened (TFDS decodes each example's image on that
pass; for a large set pack it once with `python -m flaxtl.data.pack`).
Ones prepared in TFDS' default `tfrecord` format have no random access: with
TensorFlow installed the split is read into memory through
`tfds.as_numpy(builder.as_dataset())`; without it the error says how to
rebuild as array_record.

flaxtl never downloads: an offline download retries for minutes and then fails
on DNS, so a dataset that is not prepared in `data.tfds_data_dir` is a one-line
error saying how to prepare it on a machine with internet access:

    tfds build mnist --data_dir=DIR --file_format=array_record
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from flaxtl.data import labels as label_io
from flaxtl.data.dataset import Dataset
from flaxtl.errors import UserError

# `mnist:3.0.1:train` pins a version; a split may hold colons (`train[:80%]`).
_VERSION = re.compile(r"^(\d+|\*)\.(\d+|\*)\.(\d+|\*)$")


def parse(rest: str) -> tuple[str, str | None]:
  """'NAME[:VERSION][:SPLIT]' -> ('NAME[:VERSION]', SPLIT or None)."""
  name, _, split = rest.partition(":")
  version, _, after = split.partition(":")
  if _VERSION.match(version):
    name, split = f"{name}:{version}", after
  return name, (split or None)


def read(rest: str, opts) -> tuple[Dataset, Dataset | None]:
  """The split (default 'train'), plus 'test' when no split was named and
  it exists."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise UserError(
      f"{opts.key}=tfds:{rest} needs tensorflow-datasets: "
      "pip install 'flaxtl[tfds]'"
    ) from None
  name, split = parse(rest)
  try:
    builder = tfds.builder(name, data_dir=opts.tfds_data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(
      f"{opts.key}=tfds:{rest}: unknown TFDS dataset {name!r}: "
      f"{str(e).splitlines()[0]}"
    ) from None
  data = _read_split(tfds, builder, split or "train", opts)
  test = None
  if split is None and "test" in builder.info.splits:
    test = _read_split(
      tfds, builder, "test", _with_classes(opts, data.class_names)
    )
  return data, test


def _with_classes(opts, class_names):
  return dataclasses.replace(opts, class_names=opts.class_names or class_names)


def _read_split(tfds, builder, split: str, opts) -> Dataset:
  name = builder.info.full_name
  try:
    examples = builder.as_data_source(split=split)
  except (NotImplementedError, FileNotFoundError, AssertionError):
    # Not prepared at all, or prepared as tfrecord (no random access).
    if not builder.is_prepared():
      raise UserError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and "
        f"flaxtl does not download; on a machine with internet run `tfds "
        f"build {builder.name} --data_dir=DIR --file_format=array_record`, "
        "copy DIR here and set data.tfds_data_dir=DIR"
      ) from None
    examples = _tfrecord_examples(tfds, builder, split)
  except ValueError as e:  # Unknown split names and bad slicing syntax.
    raise UserError(
      f"TFDS dataset {name!r}: {str(e).splitlines()[0]}"
    ) from None
  return _to_dataset(builder, split, examples, opts)


class TfdsSource:
  """Example i's image feature from a TFDS data source (or a list)."""

  def __init__(self, examples, image_key: str, where: str):
    self.examples = examples
    self.image_key = image_key
    self.where = where

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index: int) -> np.ndarray:
    # Item by item: the documented random-access API (and the one TFDS' mock
    # data supports; its `__getitems__` is broken in 4.9.10).
    return _image(
      np.asarray(self.examples[index][self.image_key]), self.describe(index)
    )

  def describe(self, index: int) -> str:
    return f"{self.where} example {index}"

  def fingerprint(self, h) -> None:
    h.update(f"{self.where}\0{len(self)}".encode())


def _tfrecord_examples(tfds, builder, split: str) -> list:
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    raise UserError(
      f"TFDS dataset {builder.info.full_name!r} in {builder.data_dir} is "
      f"stored as {builder.info.file_format}, which needs tensorflow to read; "
      "rebuild it with --file_format=array_record (read without tensorflow) "
      "or pip install tensorflow"
    ) from None
  # No random access: the split is held in memory.
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


def _to_dataset(builder, split: str, examples, opts) -> Dataset:
  info = builder.info
  keys = info.supervised_keys
  image_key, label_key = (
    keys if isinstance(keys, tuple) and len(keys) == 2 else ("image", "label")
  )
  where = f"tfds {info.full_name}[{split}]"
  if len(examples) == 0:
    raise UserError(f"TFDS dataset {info.full_name!r} split {split!r} is empty")
  first = examples[0]
  if image_key not in first:
    raise UserError(
      f"{where} example 0: no {image_key!r} feature (features: "
      f"{', '.join(first)})"
    )
  source = TfdsSource(examples, image_key, where)
  if label_key not in first:
    if opts.labels_required:
      raise UserError(
        f"TFDS dataset {info.full_name!r} has no {label_key!r} feature; "
        "training data needs labels"
      )
    return Dataset(source)
  raw = np.asarray(
    [int(examples[i][label_key]) for i in range(len(examples))], np.int64
  )
  # FeaturesDict has `in` but no `get`.
  feature = info.features[label_key] if label_key in info.features else None  # noqa: SIM401
  own = list(feature.names) if hasattr(feature, "names") else None
  labels, names = label_io.remap(
    raw, own, opts.class_names, lambda i: f"{where} example {i}"
  )
  return Dataset(source, labels, None, None, names)


def _image(x: np.ndarray, where: str) -> np.ndarray:
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3, 4) or x.dtype != np.uint8:
    raise UserError(
      f"{where}: expected a uint8 (H, W, 1|3|4) image, got {x.dtype} {x.shape}"
    )
  return x[..., :3]  # RGBA -> RGB, as for image files.
