"""Data sources and splits: real files written to tmp_path, the embedded
sample, TFDS mock data."""

import json

import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import base
from flaxtl import data
from flaxtl.data import sources, tfds_source
from flaxtl.errors import UserError


def make_cfg(**overrides) -> ml_collections.ConfigDict:
  c = base.get_base().data
  c.update(overrides)
  return c


def decoded(ds: data.Dataset, size: int = 28) -> np.ndarray:
  """Every image of `ds` as the evaluation pipeline gives it."""
  batches = data.eval_batches(ds, 4, options=data.Options(model_size=size))
  return np.concatenate([b["image"][b["mask"]] for b in batches])


def pattern(seed: int, shape=(28, 28)) -> np.ndarray:
  """A distinct uint8 image per seed."""
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- the tutorial's CSV layout ------------------------------------------------


@pytest.fixture
def tutorial(tmp_path):
  """train.csv + Images/train/ in many formats and modes, test.csv +
  Images/test/. Labels 2, 10, 1 check numeric class order (1, 2, 10), not
  text order (1, 10, 2)."""
  train_dir = tmp_path / "Images" / "train"
  test_dir = tmp_path / "Images" / "test"
  train_dir.mkdir(parents=True)
  test_dir.mkdir(parents=True)
  expected, rows = {}, []
  for i in range(9):
    gray = pattern(i)
    name = f"{i}.png"
    label = (2, 10, 1)[i % 3]
    if i == 0:  # RGB PNG.
      rgb = np.stack([gray, 255 - gray, gray // 2], -1)
      Image.fromarray(rgb, "RGB").save(train_dir / name)
      expected[name] = rgb
    elif i == 1:  # RGBA: the alpha is dropped.
      rgba = np.stack([gray, gray // 3, 255 - gray, np.full_like(gray, 7)], -1)
      Image.fromarray(rgba, "RGBA").save(train_dir / name)
      expected[name] = rgba[..., :3]
    elif i == 2:  # Palette PNG with a transparency entry.
      img = Image.fromarray(gray, "L").convert("P")
      img.info["transparency"] = 0
      img.save(train_dir / name, transparency=0)
      expected[name] = np.repeat(gray[..., None], 3, -1)
    elif i == 3:  # JPEG (lossy: compared loosely).
      name = "3.jpg"
      rgb = np.full((28, 28, 3), (200, 40, 90), np.uint8)
      Image.fromarray(rgb, "RGB").save(train_dir / name, quality=95)
      expected[name] = rgb
    elif i == 4:  # 16-bit grayscale: scaled to 8 bits, not clipped.
      Image.fromarray(gray.astype(np.uint16) * 257).save(train_dir / name)
      expected[name] = np.repeat(gray[..., None], 3, -1)
    elif i == 5:  # BMP, grayscale.
      name = "5.bmp"
      Image.fromarray(gray, "L").save(train_dir / name)
      expected[name] = np.repeat(gray[..., None], 3, -1)
    else:  # Plain 8-bit grayscale PNG.
      Image.fromarray(gray, "L").save(train_dir / name)
      expected[name] = np.repeat(gray[..., None], 3, -1)
    rows.append(f"{name},{label}")
  (tmp_path / "train.csv").write_text(
    "filename,label\n" + "\n".join(rows) + "\n"
  )
  for i in range(3):
    Image.fromarray(pattern(100 + i), "L").save(test_dir / f"t{i}.png")
  (tmp_path / "test.csv").write_text(
    "filename\n" + "\n".join(f"t{i}.png" for i in range(3)) + "\n"
  )
  return tmp_path, expected


def test_csv_reads_every_mode_and_converts_to_rgb(tutorial):
  root, expected = tutorial
  ds, own_test = sources.read(f"csv:{root / 'train.csv'}")
  assert own_test is None and not ds.in_memory  # Listed, not read.
  images = decoded(ds)  # At their own size: the pixels as stored.
  assert images.shape == (9, 28, 28, 3) and images.dtype == np.uint8
  assert ds.class_names == ["1", "2", "10"]
  np.testing.assert_array_equal(ds.labels, [1, 2, 0] * 3)
  assert ds.labels.dtype == np.int32
  assert ds.filenames[3] == "3.jpg"  # As written in the CSV.
  assert ds.paths[3] == str(root / "Images" / "train" / "3.jpg")
  for img, name in zip(images, ds.filenames):
    tol = 3 if name.endswith(".jpg") else 0
    np.testing.assert_allclose(
      img.astype(int), expected[name].astype(int), atol=tol, err_msg=name
    )


def test_csv_test_split_without_labels(tutorial):
  root, _ = tutorial
  splits = data.load(
    make_cfg(
      source=f"csv:{root / 'train.csv'}",
      test_source=f"csv:{root / 'test.csv'}",
      val_fraction=0.0,
    )
  )
  test = splits.test
  assert test.labels is None and len(test) == 3
  assert test.filenames == ["t0.png", "t1.png", "t2.png"]
  images = decoded(test)
  # Grayscale files are tiled to RGB on the host.
  assert images.shape == (3, 28, 28, 3)
  for c in range(3):
    np.testing.assert_array_equal(images[1, ..., c], pattern(101))
  assert splits.val is None and len(splits.train) == 9


def test_csv_test_labels_map_onto_training_classes(tutorial):
  root, _ = tutorial
  (root / "test_labelled.csv").write_text(
    "filename,label\nt0.png,10\nt1.png,1.0\n"
  )
  splits = data.load(
    make_cfg(
      source=f"csv:{root / 'train.csv'}",
      test_source=f"csv:{root / 'test_labelled.csv'}",
      val_fraction=0.0,
    )
  )
  np.testing.assert_array_equal(
    splits.test.labels, [2, 0]
  )  # Indices into ['1', '2', '10'].


def test_csv_images_next_to_csv_of_mixed_sizes(tmp_path):
  for i, size in enumerate([(28, 28), (40, 30)]):
    Image.fromarray(pattern(i, size), "L").save(tmp_path / f"{i}.png")
  (tmp_path / "d.csv").write_text("filename,label\n0.png,a\n1.png,b\n")
  ds, _ = sources.read(f"csv:{tmp_path / 'd.csv'}")
  assert ds.class_names == ["a", "b"] and ds.filenames == ["0.png", "1.png"]
  assert decoded(ds, 32).shape == (2, 32, 32, 3)  # Mixed sizes need no key.


# --- class folders and npz ----------------------------------------------------


def test_folder_source(tmp_path):
  for cls, n in [("dog", 2), ("cat", 3)]:
    (tmp_path / cls / "nested").mkdir(parents=True)
    for i in range(n):
      Image.fromarray(np.full((16, 16, 3), 10 * i + len(cls), np.uint8)).save(
        tmp_path / cls / f"{i}.png"
      )
    Image.fromarray(pattern(n, (16, 16)), "L").save(
      tmp_path / cls / "nested" / "x.jpeg"
    )
    (tmp_path / cls / "notes.txt").write_text("not an image")
  ds, _ = sources.read(f"folder:{tmp_path}")
  assert ds.class_names == ["cat", "dog"]
  assert decoded(ds, 16).shape == (7, 16, 16, 3)
  np.testing.assert_array_equal(ds.labels, [0, 0, 0, 0, 1, 1, 1])
  # Relative to the folder, as written; paths are absolute.
  assert ds.filenames[:4] == [
    "cat/0.png",
    "cat/1.png",
    "cat/2.png",
    "cat/nested/x.jpeg",
  ]
  assert ds.paths[0] == str(tmp_path / "cat" / "0.png")


def test_folder_of_loose_images_is_unlabelled_test_data(tmp_path):
  for i in range(2):
    Image.fromarray(pattern(i), "L").save(tmp_path / f"{i}.png")
  ds, _ = sources.read(
    f"folder:{tmp_path}", sources.Options(labels_required=False)
  )
  assert ds.labels is None and ds.filenames == ["0.png", "1.png"]
  assert decoded(ds).shape == (2, 28, 28, 3)


def test_npz_source(tmp_path):
  images = np.stack([pattern(i) for i in range(6)])
  np.savez(
    tmp_path / "d.npz",
    images=images,
    labels=np.array([0, 1, 2, 0, 1, 2]),
    class_names=np.array(["a", "b", "c"]),
  )
  ds, _ = sources.read(f"npz:{tmp_path / 'd.npz'}")
  assert ds.images.shape == (6, 28, 28, 1) and ds.class_names == ["a", "b", "c"]
  np.testing.assert_array_equal(ds.images[..., 0], images)
  # A test npz with its own class order is mapped by name onto the training
  # classes.
  np.savez(
    tmp_path / "t.npz",
    images=images[:2],
    labels=np.array([0, 1]),
    class_names=np.array(["c", "a"]),
  )
  test, _ = sources.read(
    f"npz:{tmp_path / 't.npz'}", sources.Options(class_names=["a", "b", "c"])
  )
  np.testing.assert_array_equal(test.labels, [2, 0])


# --- the embedded MNIST sample ------------------------------------------------


def test_mnist_sample_splits():
  splits = data.load(make_cfg())
  assert splits.class_names == [str(d) for d in range(10)]
  assert (
    splits.train.images.shape == (3200, 28, 28, 1)
    and splits.train.images.dtype == np.uint8
  )
  assert (len(splits.val), len(splits.test)) == (800, 1000)
  for ds, per_class in [
    (splits.train, 320),
    (splits.val, 80),
    (splits.test, 100),
  ]:
    np.testing.assert_array_equal(
      np.bincount(ds.labels, minlength=10), [per_class] * 10
    )
  names = [set(ds.filenames) for ds in (splits.train, splits.val, splits.test)]
  assert (
    not (names[0] & names[1])
    and not (names[0] & names[2])
    and not (names[1] & names[2])
  )
  assert len(names[0] | names[1] | names[2]) == 5000
  # Real digits, not noise: mostly background, with bright strokes.
  assert (
    0.7 < (splits.train.images == 0).mean() < 0.95
    and splits.train.images.max() == 255
  )


def test_mnist_sample_is_deterministic_and_seeded():
  a, b = data.load(make_cfg()), data.load(make_cfg())
  np.testing.assert_array_equal(a.val.images, b.val.images)
  assert (
    a.train.filenames == b.train.filenames
    and a.test.filenames == b.test.filenames
  )
  c = data.load(make_cfg(split_seed=7))
  assert c.val.filenames != a.val.filenames
  assert (
    c.test.filenames == a.test.filenames
  )  # The held-out test part never moves.


def test_unstratified_split_and_max_examples():
  loose = data.load(make_cfg(stratify=False))
  assert len(loose.val) == 800
  assert (
    np.bincount(loose.val.labels, minlength=10).std() > 0
  )  # Random, not balanced by construction.
  small = data.load(make_cfg(max_examples=1000, val_fraction=0.25))
  np.testing.assert_array_equal(
    np.bincount(small.train.labels, minlength=10), [75] * 10
  )
  np.testing.assert_array_equal(
    np.bincount(small.val.labels, minlength=10), [25] * 10
  )
  again = data.load(make_cfg(max_examples=1000, val_fraction=0.25))
  assert small.train.filenames == again.train.filenames
  assert data.load(make_cfg(val_fraction=0.0)).val is None


def test_allocate_keeps_total_and_proportions():
  from flaxtl.data.splits import allocate

  quota = allocate(np.array([50, 30, 20, 1]), 10)
  assert quota.sum() == 10 and list(quota) == [5, 3, 2, 0]


# --- TFDS (mock data; downloads cannot work here) -----------------------------


def test_tfds_mock_mnist():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=24):
    splits = data.load(
      make_cfg(
        source="tfds:mnist:train",
        test_source="tfds:mnist:test",
        val_fraction=0.25,
      )
    )
  assert splits.class_names == [str(d) for d in range(10)]
  # Read on demand through the TFDS data source, RGB like any decoded image.
  assert decoded(splits.train).shape == (18, 28, 28, 3)
  assert len(splits.val) == 6 and len(splits.test) == 24
  assert (
    splits.train.labels.dtype == np.int32 and splits.train.labels.max() < 10
  )


def test_tfds_name_parsing():
  assert tfds_source.parse("mnist") == ("mnist", None)
  assert tfds_source.parse("mnist:test") == ("mnist", "test")
  assert tfds_source.parse("mnist:3.0.1:train[:80%]") == (
    "mnist:3.0.1",
    "train[:80%]",
  )
  assert tfds_source.parse("cifar10:train[10%:]") == ("cifar10", "train[10%:]")


def test_tfds_not_prepared_is_one_clear_line(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(UserError) as e:
    data.load(make_cfg(source="tfds:mnist", tfds_data_dir=str(tmp_path)))
  msg = str(e.value)
  assert (
    "not prepared" in msg
    and str(tmp_path) in msg
    and "tfds build mnist" in msg
    and "\n" not in msg
  )


def test_tfds_unknown_dataset():
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(
    UserError, match="unknown TFDS dataset 'no_such_dataset_xyz'"
  ):
    sources.read("tfds:no_such_dataset_xyz")


# --- bad input: one UserError line naming the file / row / key ---------------


def _png(path, size=(28, 28)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pattern(0, size), "L").save(path)


def _bad_csv(tmp_path, body):
  for i in range(3):
    _png(tmp_path / "images" / f"{i}.png")
  (tmp_path / "t.csv").write_text(body)
  return f"csv:{tmp_path / 't.csv'}"


BAD = {
  "missing image file": (
    lambda p: _bad_csv(p, "filename,label\n0.png,a\n1.png,b\nmissing.png,a\n"),
    r"t\.csv row 3 \(line 4\): image file 'missing\.png' not found",
  ),
  "no filename column": (
    lambda p: _bad_csv(p, "file,label\n0.png,a\n"),
    r"t\.csv: no 'filename' column \(columns: file, label\)",
  ),
  "no label column": (
    lambda p: _bad_csv(p, "filename\n0.png\n"),
    r"t\.csv: no 'label' column",
  ),
  "empty csv": (
    lambda p: _bad_csv(p, "filename,label\n"),
    r"t\.csv: no rows, the dataset is empty",
  ),
  "short row": (
    lambda p: _bad_csv(p, "filename,label\n0.png,a\n1.png\n"),
    r"t\.csv row 2 \(line 3\): expected 2 columns",
  ),
  "empty label": (
    lambda p: _bad_csv(p, "filename,label\n0.png,a\n1.png,\n"),
    r"t\.csv row 2 \(line 3\): empty label",
  ),
  "conflicting labels": (
    lambda p: _bad_csv(p, "filename,label\n0.png,a\n1.png,b\n0.png,b\n"),
    r"t\.csv row 3 \(line 4\): .*0\.png is listed again with label 'b', "
    r"but .*t\.csv row 1 \(line 2\) gives it 'a'",
  ),
  "row outside the data root": (
    lambda p: _bad_csv(p, "filename,label\n0.png,a\n../../etc/hostname,b\n"),
    r"t\.csv row 2 \(line 3\): '\.\./\.\./etc/hostname' points outside",
  ),
  "absolute row": (
    lambda p: _bad_csv(p, "filename,label\n/etc/passwd,a\n1.png,b\n"),
    r"t\.csv row 1 \(line 2\): '/etc/passwd' points outside the data",
  ),
  "unknown scheme": (
    lambda p: "s3:bucket/train.csv",
    r"data\.source='s3:bucket/train\.csv': unknown source scheme 's3'",
  ),
  "no scheme": (
    lambda p: "train.csv",
    r"data\.source='train\.csv' is not a known source",
  ),
  "missing path": (
    lambda p: f"csv:{p / 'nope.csv'}",
    r"nope\.csv does not exist",
  ),
  "empty class folder": (
    lambda p: (_png(p / "a" / "0.png"), (p / "b").mkdir(), f"folder:{p}")[2],
    r"class folder .*/b has no images",
  ),
  "folder without classes": (lambda p: f"folder:{p}", r"no class sub-folders"),
  "npz without images": (
    lambda p: (np.savez(p / "d.npz", x=np.zeros(3)), f"npz:{p / 'd.npz'}")[1],
    r"d\.npz: no 'images' array \(arrays: x\)",
  ),
  "npz label out of range": (
    lambda p: (
      np.savez(
        p / "d.npz",
        images=np.zeros((2, 8, 8), np.uint8),
        labels=np.array([0, 5]),
        class_names=np.array(["a", "b"]),
      ),
      f"npz:{p / 'd.npz'}",
    )[1],
    r"d\.npz labels\[1\]: label 5 is outside the 2 classes",
  ),
  "npz float images": (
    lambda p: (
      np.savez(
        p / "d.npz", images=np.zeros((2, 8, 8)), labels=np.array([0, 1])
      ),
      f"npz:{p / 'd.npz'}",
    )[1],
    r"d\.npz: 'images' must be uint8",
  ),
  "corrupt npz": (
    lambda p: (
      (p / "d.npz").write_bytes(b"PK\x03\x04garbage"),
      f"npz:{p / 'd.npz'}",
    )[1],
    r"d\.npz: cannot read npz",
  ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_one_line_user_error(tmp_path, case):
  make, pattern_ = BAD[case]
  with pytest.raises(UserError, match=pattern_) as e:
    data.load(make_cfg(source=make(tmp_path)))
  assert "\n" not in str(e.value)


def test_test_label_outside_training_classes(tutorial):
  root, _ = tutorial
  (root / "bad_test.csv").write_text("filename,label\nt0.png,1\nt1.png,7\n")
  expected = (
    r"bad_test\.csv row 2 \(line 3\): label '7' is not one of the classes "
    r"\[1, 2, 10\]"
  )
  with pytest.raises(UserError, match=expected):
    data.load(
      make_cfg(
        source=f"csv:{root / 'train.csv'}",
        test_source=f"csv:{root / 'bad_test.csv'}",
      )
    )


def test_test_folder_with_unknown_class(tmp_path):
  _png(tmp_path / "train" / "a" / "0.png")
  _png(tmp_path / "train" / "b" / "0.png")
  _png(tmp_path / "test" / "c" / "0.png")
  with pytest.raises(
    UserError,
    match=r"class folder .*/test/c: label 'c' is not one of the classes",
  ):
    data.load(
      make_cfg(
        source=f"folder:{tmp_path / 'train'}",
        test_source=f"folder:{tmp_path / 'test'}",
        val_fraction=0.0,
      )
    )


def test_bad_split_config():
  with pytest.raises(UserError, match="val_fraction must be in"):
    data.load(make_cfg(val_fraction=1.0))
  with pytest.raises(
    UserError, match="max_examples must be a positive integer"
  ):
    data.load(make_cfg(max_examples=0))


def test_iterator_state_is_json():
  it = data.TrainIterator(
    data.load(make_cfg(max_examples=100)).train, batch_size=8, seed=1
  )
  next(it)
  assert json.loads(json.dumps(it.get_state())) == it.get_state()
