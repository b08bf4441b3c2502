"""`data.source` strings -> `Dataset`s (files are listed, not read).

    mnist_sample        5,000 real MNIST digits shipped with flaxtl (offline)
    csv:PATH            the tutorial's layout: `filename,label` CSV + images
    folder:PATH         one sub-folder of images per class (Keras'
                        image_dataset_from_directory)
    tfds:NAME[:SPLIT]   a TensorFlow Datasets dataset prepared in
                        data.tfds_data_dir
    npz:PATH            arrays `images` (N, H, W[, C]) uint8, `labels`,
                        optional `class_names` (held in memory)
    arrayrecord:DIR     shards written by `python -m flaxtl.data.pack`

A training source defines the class list; a test source is read against it.
Problems with the listing (a missing file, a bad CSV row, an unknown label)
are a `UserError` naming the file (and the CSV row) before training starts;
an image that cannot be decoded is found when the pipeline reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import dataclasses
import importlib.resources
import logging
import os
from pathlib import Path
import zipfile

import numpy as np

from flaxtl.data import images as image_io
from flaxtl.data import labels as label_io
from flaxtl.data import packed
from flaxtl.data.dataset import Dataset, FileSource
from flaxtl.errors import UserError

log = logging.getLogger(__name__)

SCHEMES = (
  "mnist_sample",
  "csv:PATH",
  "folder:PATH",
  "tfds:NAME[:SPLIT]",
  "npz:PATH",
  "arrayrecord:DIR",
)

# The embedded sample: a fixed shuffle, then 100 digits per class held out.
SAMPLE_FILE = "mnist_5k.npz"
SAMPLE_SEED = 0
SAMPLE_TEST_PER_CLASS = 100


@dataclasses.dataclass(frozen=True)
class Options:
  """How to read any source. `key`: the config key the spec came from (for
  errors); `class_names`: the training classes (for test sources)."""

  key: str = "data.source"
  class_names: Sequence[str] | None = None
  labels_required: bool = True
  tfds_data_dir: str | None = None


def read(
  spec: str, opts: Options = Options()
) -> tuple[Dataset, Dataset | None]:
  """Reads one source: (data, the source's own held-out test split or None).

  Only `mnist_sample` (its fixed 1,000) and `tfds:NAME` without a split (the
  dataset's 'test' split, when it has one) come with their own test split.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise UserError(
      f"{opts.key} is empty; expected one of {', '.join(SCHEMES)}"
    )
  spec = spec.strip()
  if spec == "mnist_sample":
    return read_mnist_sample(opts)
  scheme, sep, rest = spec.partition(":")
  if not sep or not rest:
    raise UserError(
      f"{opts.key}={spec!r} is not a known source; expected one of "
      f"{', '.join(SCHEMES)}"
    )
  if scheme == "tfds":
    from flaxtl.data import (
      tfds_source,
    )  # tensorflow_datasets is optional and slow to import.

    return tfds_source.read(rest, opts)
  readers = {
    "csv": read_csv,
    "folder": read_folder,
    "npz": read_npz,
    "arrayrecord": packed.read,
  }
  if scheme not in readers:
    raise UserError(
      f"{opts.key}={spec!r}: unknown source scheme {scheme!r}; expected one "
      f"of {', '.join(SCHEMES)}"
    )
  path = Path(rest).expanduser()
  if not path.exists():
    raise UserError(f"{opts.key}={spec!r}: {path} does not exist")
  return readers[scheme](path, opts), None


def read_mnist_sample(opts: Options) -> tuple[Dataset, Dataset]:
  """The embedded digits: a fixed 4,000-image pool and 1,000 test images
  (100 per class)."""
  with (
    importlib.resources.files("flaxtl.resources")
    .joinpath(SAMPLE_FILE)
    .open("rb") as f,
    np.load(f) as z,
  ):
    images, labels = z["images"], z["labels"].astype(np.int32)
  names = [str(d) for d in range(10)]
  if opts.class_names is not None and list(opts.class_names) != names:
    raise UserError(
      f"{opts.key}=mnist_sample has classes 0..9, not the training classes "
      f"{list(opts.class_names)}"
    )
  order = np.random.default_rng(SAMPLE_SEED).permutation(len(images))
  is_test = np.zeros(len(images), bool)
  for c in range(10):
    is_test[np.flatnonzero(labels[order] == c)[:SAMPLE_TEST_PER_CLASS]] = True

  def part(mask: np.ndarray) -> Dataset:
    idx = order[mask]
    return Dataset.from_arrays(
      images[idx][..., None],
      labels[idx],
      [f"{SAMPLE_FILE}[{i}]" for i in idx],
      names,
      name=SAMPLE_FILE,
    )

  return part(~is_test), part(is_test)


def csv_image_dirs(csv_path: Path) -> list[Path]:
  """Where a CSV's `filename`s are looked up, in order (folders that exist).

  The CSV's own folder, then `images/`, `Images/`, `train/`, `test/` next to it,
  then `<csv stem>/`, `train/` and `test/` inside `images/` and `Images/` (the
  tutorial's data has train.csv with Images/train/ and test.csv with
  Images/test/). Each row's file is looked up in all of them, the folder of
  the previous row's file first.
  """
  d, stem = csv_path.parent, csv_path.stem.lower()
  candidates = [d] + [d / sub for sub in ("images", "Images", "train", "test")]
  candidates += [
    d / top / sub
    for top in ("images", "Images")
    for sub in (stem, "train", "test")
  ]
  seen, dirs = set(), []
  for c in candidates:
    if (
      c.is_dir() and c.resolve() not in seen
    ):  # images/ and Images/ are one folder on some file systems.
      seen.add(c.resolve())
      dirs.append(c)
  return dirs


def read_csv(path: Path, opts: Options) -> Dataset:
  """A `filename[,label]` CSV; a test CSV may leave out `label` (labels None).

  Every file must exist (checked now); images are read by the pipeline.
  """
  rows, line_of = _csv_rows(path, opts)
  where = lambda i: f"{path} row {i + 1} (line {line_of[i]})"  # noqa: E731
  dirs = csv_image_dirs(path)
  files, hit = [], dirs[0]
  for i, row in enumerate(rows):
    name = row["filename"]
    if not name:
      raise UserError(f"{where(i)}: empty filename")
    if os.path.isabs(name) or os.path.normpath(name).startswith(".."):
      raise UserError(
        f"{where(i)}: {name!r} points outside the data folder {path.parent}; "
        "filenames must be relative paths inside it"
      )
    found, hit = _find(name, hit, dirs)
    if found is None:
      shown = ", ".join(str(d) for d in dirs)
      raise UserError(
        f"{where(i)}: image file {name!r} not found (looked in {shown})"
      )
    files.append(os.path.abspath(found))
  filenames = [row["filename"] for row in rows]
  raw = [row["label"] for row in rows] if "label" in rows[0] else []
  if not any(raw):
    if opts.labels_required:
      raise UserError(
        f"{path}: the 'label' column is empty; training data needs labels"
      )
    # A test CSV with a blank label column.
    return Dataset(FileSource(files), None, filenames, files)
  if not all(raw):
    i = raw.index("")
    raise UserError(f"{where(i)}: empty label")
  keep = _check_duplicates(files, raw, where, path)
  if opts.labels_required and len(keep) < len(files):
    # Training data: a repeated file would count twice and may land in both
    # the train and the validation split.
    files = [files[i] for i in keep]
    filenames = [filenames[i] for i in keep]
    raw = [raw[i] for i in keep]
  names = (
    list(opts.class_names)
    if opts.class_names is not None
    else label_io.class_names_of(raw)
  )
  labels = label_io.index(raw, names, where)
  return Dataset(FileSource(files), labels, filenames, files, names)


def _check_duplicates(
  files: list[str], raw: list[str], where, path: Path
) -> list[int]:
  """Rows to keep: the first of each file. Conflicting labels are refused;
  repeats with the same label are counted in one warning."""
  first: dict[str, int] = {}
  keep, repeats = [], []
  for i, f in enumerate(files):
    j = first.setdefault(f, i)
    if j == i:
      keep.append(i)
    elif raw[i] != raw[j]:
      raise UserError(
        f"{where(i)}: {f} is listed again with label {raw[i]!r}, but "
        f"{where(j)} gives it {raw[j]!r}"
      )
    else:
      repeats.append(i)
  if repeats:
    log.warning(
      "%s: %d row(s) list a file already listed with the same label (first: "
      "%s); each file counts once",
      path,
      len(repeats),
      where(repeats[0]),
    )
  return keep


def _csv_rows(path: Path, opts: Options) -> tuple[list[dict], list[int]]:
  if not path.is_file():
    raise UserError(f"{opts.key}: {path} is not a file")
  try:
    # utf-8-sig: spreadsheet exports start with a byte-order mark that would
    # otherwise become part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      header = [h.strip().lower() for h in next(reader, [])]
      body = [
        (reader.line_num, row)
        for row in reader
        if any(cell.strip() for cell in row)
      ]
  except (UnicodeDecodeError, csv.Error) as e:
    raise UserError(f"{path}: not a readable CSV: {e}") from None
  if "filename" not in header:
    raise UserError(
      f"{path}: no 'filename' column (columns: {', '.join(header) or 'none'})"
    )
  if opts.labels_required and "label" not in header:
    raise UserError(
      f"{path}: no 'label' column (columns: {', '.join(header)}); training "
      "data needs labels"
    )
  if not body:
    raise UserError(f"{path}: no rows, the dataset is empty")
  keep = ["filename"] + (["label"] if "label" in header else [])
  cols = {k: header.index(k) for k in keep}
  rows = []
  for i, (line, row) in enumerate(body):
    if len(row) <= max(cols.values()):
      raise UserError(
        f"{path} row {i + 1} (line {line}): expected {len(header)} columns, "
        f"got {len(row)}"
      )
    rows.append({k: row[j].strip() for k, j in cols.items()})
  return rows, [line for line, _ in body]


def _find(name: str, first: Path, dirs: list[Path]) -> tuple[Path | None, Path]:
  """(the file, the folder it was in); that folder is tried first for the
  next row, so the usual case costs one stat per file."""
  for d in [first] + [d for d in dirs if d != first]:
    p = d / name
    if p.is_file():
      return p, d
  return None, first


def read_folder(path: Path, opts: Options) -> Dataset:
  """One sub-folder per class (sorted names), images anywhere below it.

  A test folder may instead hold the images directly (unlabelled).
  Filenames are relative to `path`.
  """
  if not path.is_dir():
    raise UserError(f"{opts.key}: {path} is not a folder")
  subdirs = sorted(
    d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")
  )
  if not subdirs:
    loose = sorted(
      p for p in path.iterdir() if p.is_file() and image_io.is_image_file(p)
    )
    if loose and not opts.labels_required:
      return _files(path, loose, None, None)
    raise UserError(
      f"{path}: no class sub-folders; expected one sub-folder of images per "
      "class"
    )
  own = [d.name for d in subdirs]
  names = list(opts.class_names) if opts.class_names is not None else own
  class_index = label_io.index(
    own, names, lambda i: f"class folder {subdirs[i]}"
  )
  files, labels = [], []
  for d, k in zip(subdirs, class_index):
    found = sorted(
      p for p in d.rglob("*") if p.is_file() and image_io.is_image_file(p)
    )
    if not found:
      extensions = ", ".join(sorted(image_io.IMAGE_EXTENSIONS))
      raise UserError(f"class folder {d} has no images ({extensions})")
    files += found
    labels += [k] * len(found)
  return _files(path, files, np.asarray(labels, np.int32), names)


def _files(
  root: Path,
  files: list[Path],
  labels: np.ndarray | None,
  names: list[str] | None,
) -> Dataset:
  paths = [os.path.abspath(p) for p in files]
  filenames = [p.relative_to(root).as_posix() for p in files]
  return Dataset(FileSource(paths), labels, filenames, paths, names)


def read_npz(path: Path, opts: Options) -> Dataset:
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise UserError(f"{path}: cannot read npz: {e}") from None
  if "images" not in arrays:
    raise UserError(
      f"{path}: no 'images' array (arrays: {', '.join(arrays) or 'none'})"
    )
  images = _npz_images(arrays["images"], path)
  if "labels" not in arrays:
    if opts.labels_required:
      raise UserError(
        f"{path}: no 'labels' array (arrays: {', '.join(arrays)}); training "
        "data needs labels"
      )
    return Dataset.from_arrays(images, name=path.name)
  raw = arrays["labels"]
  if raw.shape != (len(images),) or not np.issubdtype(raw.dtype, np.integer):
    raise UserError(
      f"{path}: 'labels' must be integers of shape ({len(images)},), got "
      f"{raw.dtype} {raw.shape}"
    )
  own = (
    [str(s) for s in arrays["class_names"]] if "class_names" in arrays else None
  )
  labels, names = label_io.remap(
    raw, own, opts.class_names, lambda i: f"{path} labels[{i}]"
  )
  return Dataset.from_arrays(images, labels, None, names, name=path.name)


def _npz_images(x: np.ndarray, path: Path) -> np.ndarray:
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
    raise UserError(
      f"{path}: 'images' must be (N, H, W[, 1|3|4]), got shape {x.shape}"
    )
  if len(x) == 0:
    raise UserError(f"{path}: 'images' is empty")
  if x.dtype != np.uint8:
    if not np.issubdtype(x.dtype, np.integer) or x.min() < 0 or x.max() > 255:
      raise UserError(
        f"{path}: 'images' must be uint8 0..255, got {x.dtype} in "
        f"[{x.min()}, {x.max()}]"
      )
    x = x.astype(np.uint8)
  return x[..., :3]  # RGBA -> RGB, as for image files.
