"""`tfds:NAME[:SPLIT]`: a TensorFlow Datasets dataset, read without TensorFlow.

Datasets prepared in the `array_record` format are read through
`builder.as_data_source` (random access, numpy, no TensorFlow). Ones prepared
in TFDS' default `tfrecord` format need `tfds.as_numpy(builder.as_dataset())`,
which imports TensorFlow: that path is taken only when TensorFlow is
installed; otherwise the error says how to rebuild as array_record.

flaxtl never downloads: an offline download retries for minutes and then fails
on DNS, so a dataset that is not prepared in `data.tfds_data_dir` is a one-line
error saying how to prepare it on a machine with internet access:

    tfds build mnist --data_dir=DIR --file_format=array_record
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from flaxtl.data import images as image_io
from flaxtl.data import labels as label_io
from flaxtl.data.dataset import Dataset
from flaxtl.errors import UserError

# `mnist:3.0.1:train` pins a version; a split may itself hold colons (`train[:80%]`).
_VERSION = re.compile(r"^(\d+|\*)\.(\d+|\*)\.(\d+|\*)$")


def parse(rest: str) -> tuple[str, str | None]:
  """'NAME[:VERSION][:SPLIT]' -> ('NAME[:VERSION]', SPLIT or None)."""
  name, _, split = rest.partition(":")
  version, _, after = split.partition(":")
  if _VERSION.match(version):
    name, split = f"{name}:{version}", after
  return name, (split or None)


def read(rest: str, opts) -> tuple[Dataset, Dataset | None]:
  """The split (default 'train'), plus 'test' when no split was named and it exists."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise UserError(
      f"{opts.key}=tfds:{rest} needs tensorflow-datasets: pip install 'flaxtl[tfds]'"
    ) from None
  name, split = parse(rest)
  try:
    builder = tfds.builder(name, data_dir=opts.tfds_data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise UserError(
      f"{opts.key}=tfds:{rest}: unknown TFDS dataset {name!r}: {str(e).splitlines()[0]}"
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
    examples = _examples(builder.as_data_source(split=split))
  except (NotImplementedError, FileNotFoundError, AssertionError):
    # Not prepared at all, or prepared as tfrecord (no random access).
    if not builder.is_prepared():
      raise UserError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and flaxtl does not download; "
        f"on a machine with internet run `tfds build {builder.name} --data_dir=DIR "
        "--file_format=array_record`, copy DIR here and set data.tfds_data_dir=DIR"
      ) from None
    examples = _tfrecord_examples(tfds, builder, split)
  except ValueError as e:  # Unknown split names and bad slicing syntax.
    raise UserError(
      f"TFDS dataset {name!r}: {str(e).splitlines()[0]}"
    ) from None
  return _to_dataset(builder, split, examples, opts)


def _examples(src):
  # Item by item: the documented random-access API (and the one TFDS' mock
  # data supports; its `__getitems__` is broken in 4.9.10).
  return (src[i] for i in range(len(src)))


def _tfrecord_examples(tfds, builder, split: str):
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    raise UserError(
      f"TFDS dataset {builder.info.full_name!r} in {builder.data_dir} is stored as "
      f"{builder.info.file_format}, which needs tensorflow to read; rebuild it with "
      "--file_format=array_record (read without tensorflow) or pip install tensorflow"
    ) from None
  return tfds.as_numpy(builder.as_dataset(split=split))


def _to_dataset(builder, split: str, examples, opts) -> Dataset:
  info = builder.info
  keys = info.supervised_keys
  image_key, label_key = (
    keys if isinstance(keys, tuple) and len(keys) == 2 else ("image", "label")
  )
  where = lambda i: f"tfds {info.full_name}[{split}] example {i}"  # noqa: E731
  arrays, raw = [], []
  for i, ex in enumerate(examples):
    if image_key not in ex:
      raise UserError(
        f"{where(i)}: no {image_key!r} feature (features: {', '.join(ex)})"
      )
    arrays.append(_image(np.asarray(ex[image_key]), where(i), opts.load_size))
    if label_key in ex:
      raw.append(int(ex[label_key]))
  if not arrays:
    raise UserError(f"TFDS dataset {info.full_name!r} split {split!r} is empty")
  images = image_io.stack(arrays, [where(i) for i in range(len(arrays))])
  if not raw:
    if opts.labels_required:
      raise UserError(
        f"TFDS dataset {info.full_name!r} has no {label_key!r} feature; training data needs labels"
      )
    return Dataset(images)
  feature = info.features[label_key] if label_key in info.features else None
  own = list(feature.names) if hasattr(feature, "names") else None
  labels, names = label_io.remap(np.asarray(raw), own, opts.class_names, where)
  return Dataset(images, labels, None, names)


def _image(x: np.ndarray, where: str, load_size: int | None) -> np.ndarray:
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3, 4) or x.dtype != np.uint8:
    raise UserError(
      f"{where}: expected a uint8 (H, W, 1|3|4) image, got {x.dtype} {x.shape}"
    )
  x = x[..., :3]  # RGBA -> RGB, as for image files.
  return image_io.resize_array(x, load_size) if load_size is not None else x
