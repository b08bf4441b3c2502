"""Streamed files: mixed sizes, host transforms, worker processes, resume,
process sharding, corrupt files, ArrayRecord packing. Real image files on
disk, read through grain."""

import contextlib
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from configs import base
from flaxtl import data
from flaxtl.data import pack, packed, sources, transforms
from flaxtl.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SIZE = 24  # Host output size in these tests.


def value_of(k: int) -> int:
  """Image k of the folder is filled with this grey level."""
  return 20 + 9 * k


@pytest.fixture(scope="module")
def folder(module_tmp) -> Path:
  """2 classes x 7 images of mixed sizes, formats and modes; image k is one
  flat grey level, so a batch's rows name their files after any resize."""
  root = module_tmp("folder")
  rng = np.random.default_rng(0)
  for k in range(14):
    cls = root / ("cat" if k < 7 else "dog")
    cls.mkdir(exist_ok=True)
    w, h = (int(x) for x in rng.integers(20, 60, 2))
    gray = np.full((h, w), value_of(k), np.uint8)
    kind = k % 4
    if kind == 0:  # RGB JPEG.
      Image.fromarray(np.stack([gray] * 3, -1)).save(cls / f"{k}.jpg")
    elif kind == 1:  # 8-bit grayscale PNG.
      Image.fromarray(gray, "L").save(cls / f"{k}.png")
    elif kind == 2:  # RGBA PNG: alpha dropped.
      rgba = np.stack([gray] * 3 + [np.full_like(gray, 9)], -1)
      Image.fromarray(rgba, "RGBA").save(cls / f"{k}.png")
    else:  # 16-bit grayscale: scaled, not clipped.
      Image.fromarray(gray.astype(np.uint16) * 257).save(cls / f"{k}.png")
  return root


def opts(**kw) -> data.Options:
  return data.Options(model_size=SIZE, **kw)


def files_of(ds: data.Dataset) -> list[int]:
  return [int(Path(f).stem) for f in ds.filenames]


def rows(batch) -> list[int]:
  """Which files a batch holds (by their grey level)."""
  levels = batch["image"][:, SIZE // 2, SIZE // 2, 0].astype(int)
  return [(v - 20) // 9 for v in levels.tolist()]


def test_mixed_sizes_stream_as_fixed_size_rgb_batches(folder):
  ds, _ = sources.read(f"folder:{folder}")
  assert not ds.in_memory and len(ds) == 14
  it = data.TrainIterator(ds, 4, seed=0, options=opts())
  seen = []
  for _ in range(3):  # One epoch: 14 // 4.
    batch = next(it)
    assert batch["image"].shape == (4, SIZE, SIZE, 3)
    assert batch["image"].dtype == np.uint8
    ks = rows(batch)
    # Flat images stay flat in every channel: mode handling and RGB output.
    for img, k in zip(batch["image"], ks):
      np.testing.assert_allclose(img, value_of(k), atol=2)
    np.testing.assert_array_equal(batch["label"], [int(k >= 7) for k in ks])
    seen += ks
  assert len(set(seen)) == 12  # No repeats; two dropped.
  evals = list(data.eval_batches(ds, 8, options=opts()))
  got = [k for b in evals for k in np.array(rows(b))[b["mask"]].tolist()]
  assert got == files_of(ds)  # Every file once, in order.


def _image(width: int, height: int) -> Image.Image:
  """Smooth, position-dependent RGB content."""
  yy, xx = np.mgrid[0:height, 0:width]
  arr = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1)
  return Image.fromarray(arr.astype(np.uint8))


def test_eval_transform_is_shorter_side_then_centre_crop(tmp_path):
  img = _image(90, 30)
  out = transforms.fit(img, 15)
  # Reference: shorter side to 15 (90x30 -> 45x15), then the centre 15x15.
  ref = np.asarray(img.resize((45, 15), Image.BILINEAR))[:, 15:30]
  assert out.shape == (15, 15, 3)
  assert np.abs(out.astype(int) - ref).max() <= 3
  # A large JPEG decoded at a reduced DCT scale gives the same picture.
  big = _image(400, 320)
  big.save(tmp_path / "big.jpg", quality=95)
  with Image.open(tmp_path / "big.jpg") as jpeg:
    drafted = transforms.fit(jpeg, 32)
    assert jpeg.size == (50, 40)  # 1/8 scale: still >= 32 across the crop.
  full = transforms.fit(big, 32)
  assert np.abs(drafted.astype(int) - full).mean() < 3


def test_inception_crop_boxes_and_flips():
  rng = np.random.default_rng(0)
  for w, h in [(300, 200), (40, 400), (64, 64)]:
    for _ in range(200):
      x0, y0, x1, y1 = transforms.inception_box(w, h, rng)
      assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
      area = (x1 - x0) * (y1 - y0) / (w * h)
      assert 0.07 <= area <= 1.0
  img = _image(80, 60)
  outs = [
    transforms.fit(img, 16, np.random.default_rng(s), "inception")
    for s in range(40)
  ]
  assert all(o.shape == (16, 16, 3) for o in outs)
  # Red grows left to right: mirrored crops have it falling.
  mirrored = [int(o[8, 0, 0]) > int(o[8, -1, 0]) for o in outs]
  assert 10 < sum(mirrored) < 30
  assert len({o.tobytes() for o in outs}) == 40  # Every crop differs.


def test_inception_is_per_position_and_resumes_across_worker_counts(folder):
  ds, _ = sources.read(f"folder:{folder}")
  aug = opts(augment="inception")
  it = data.TrainIterator(ds, 4, seed=3, options=aug)
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  expected = [next(it) for _ in range(3)]  # Crosses into epoch 1.
  again = data.TrainIterator(ds, 4, seed=3, options=aug)
  np.testing.assert_array_equal(next(again)["image"], first[0]["image"])
  # The same state continues identically with grain worker processes.
  workers = data.TrainIterator(
    ds, 4, seed=3, options=opts(augment="inception", workers=2)
  )
  workers.set_state(state)
  try:
    for want in expected:
      got = next(workers)
      for key in ("image", "label"):
        np.testing.assert_array_equal(got[key], want[key])
  finally:
    workers.close()


def test_two_processes_split_each_global_batch_of_files(folder):
  ds, _ = sources.read(f"folder:{folder}")
  one = data.TrainIterator(ds, 4, seed=1, options=opts())
  parts = [
    data.TrainIterator(
      ds, 4, seed=1, process_index=i, process_count=2, options=opts()
    )
    for i in range(2)
  ]
  for _ in range(4):
    full = next(one)
    halves = [next(part) for part in parts]
    for key in ("image", "label"):
      np.testing.assert_array_equal(
        np.concatenate([h[key] for h in halves]), full[key]
      )


@pytest.fixture
def damaged(folder, tmp_path):
  """A copy of the folder with one file truncated; (root, its filename)."""
  root = tmp_path / "damaged"
  for src in folder.rglob("*.*"):
    dst = root / src.relative_to(folder)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
  bad = root / "dog" / "9.png"
  bad.write_bytes(bad.read_bytes()[:60])
  return root, "dog/9.png"


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_file_mid_epoch_names_file_and_step(folder, damaged, workers):
  root, name = damaged
  ds, _ = sources.read(f"folder:{root}")
  # Where the file comes in a healthy run: its training step.
  healthy, _ = sources.read(f"folder:{folder}")
  clean = data.TrainIterator(healthy, 4, seed=2, options=opts())
  step = next(s for s in range(1, 4) if 9 in rows(next(clean)))
  it = data.TrainIterator(ds, 4, seed=2, options=opts(workers=workers))
  try:
    with pytest.raises(UserError) as e:
      for _ in range(3):
        next(it)
  finally:
    it.close()
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(f"training step {step}: {root / name}: cannot read")


def test_skip_corrupt_counts_and_keeps_batches_full(damaged):
  root, name = damaged
  ds, _ = sources.read(f"folder:{root}")
  it = data.TrainIterator(ds, 4, seed=2, options=opts(skip_corrupt=True))
  ks = []
  for _ in range(6):  # Two epochs.
    batch = next(it)
    assert batch["image"].shape == (4, SIZE, SIZE, 3)
    ks += rows(batch)
  assert 9 not in ks
  assert [ds.filenames[i] for i in it.skipped] == [name]
  assert it.get_state()["skipped"] == sorted(it.skipped)
  skipped = set()
  evals = list(
    data.eval_batches(ds, 8, options=opts(skip_corrupt=True), skipped=skipped)
  )
  assert sum(int(b["mask"].sum()) for b in evals) == 13
  assert [ds.filenames[i] for i in skipped] == [name]


def test_pack_round_trip_is_bitwise(folder, tmp_path):
  ds, _ = sources.read(f"folder:{folder}")
  meta = packed.write(ds, tmp_path / "p", shard_size=5)
  assert len(meta["shards"]) == 3  # 14 examples, 5 per shard.
  back, _ = sources.read(f"arrayrecord:{tmp_path / 'p'}")
  assert back.class_names == ds.class_names
  assert back.filenames == ds.filenames
  np.testing.assert_array_equal(back.labels, ds.labels)
  # The files' own bytes: decoding gives the very same pixels.
  assert back.source[3] == Path(ds.paths[3]).read_bytes()
  for a, b in zip(
    data.eval_batches(ds, 8, options=opts()),
    data.eval_batches(back, 8, options=opts()),
  ):
    np.testing.assert_array_equal(a["image"], b["image"])
  # In-memory arrays are packed as PNG: lossless.
  digits = data.load(_sample_cfg()).test
  small = digits.take(np.arange(6))
  packed.write(small, tmp_path / "d")
  again, _ = sources.read(f"arrayrecord:{tmp_path / 'd'}")
  np.testing.assert_array_equal(again.labels, small.labels)
  decoded = next(
    data.eval_batches(again, 6, options=data.Options(model_size=28))
  )
  np.testing.assert_array_equal(decoded["image"][..., 0], small.images[..., 0])


def test_pack_cli_writes_whole_or_nothing(folder, tmp_path, capsys):
  out = tmp_path / "packed"
  cmd = ["-m", "flaxtl.data.pack", f"folder:{folder}", "--out", str(out)]
  r = subprocess.run(
    [sys.executable, *cmd],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr
  assert "packed 14 examples into 1 shard(s)" in r.stdout
  assert (out / packed.META).is_file()

  def fails(*args) -> list[str]:
    with pytest.raises(SystemExit) as e:
      pack.main(list(args))
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()

  assert fails(f"folder:{folder}", "--out", str(out)) == [
    f"error: --out {out} already exists; pass --force to replace it"
  ]
  # A file that is not an image: one line naming it, nothing written.
  bad = tmp_path / "bad"
  (bad / "a").mkdir(parents=True)
  (bad / "b").mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad / "a" / "0.png")
  (bad / "b" / "1.png").write_text("not a png")
  lines = fails(f"folder:{bad}", "--out", str(tmp_path / "never"))
  assert len(lines) == 1
  assert lines[0].startswith(f"error: {bad / 'b' / '1.png'}: cannot read image")
  assert not list(tmp_path.glob("*never*"))  # No half-written folder.


def test_options_are_checked_with_one_line():
  with pytest.raises(UserError, match=r"data\.augment='crop': expected one"):
    data.Options(augment="crop")
  with pytest.raises(UserError, match=r"data\.workers must be an integer"):
    data.Options(workers=-1)
  cfg = base.get_base()
  cfg.image_size, cfg.data.load_size = 64, 48
  options = data.Options.from_config(cfg)  # Deprecated key still works.
  assert (options.image_size, options.augment) == (48, "none")


_HOLD_WORKERS = """
import sys, time
from flaxtl import data
from flaxtl.data import sources
ds, _ = sources.read("folder:" + sys.argv[1])
it = data.TrainIterator(ds, 4, options=data.Options(model_size=24, workers=1))
next(it)
print("ready", flush=True)
time.sleep(600)
"""


def _descendants(pid: int) -> list[int]:
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    for tid in os.listdir(f"/proc/{p}/task"):
      with open(f"/proc/{p}/task/{tid}/children") as f:
        kids = [int(c) for c in f.read().split()]
      out += kids
      todo += kids
  return out


def test_workers_end_when_the_run_is_killed(folder):
  p = subprocess.Popen(
    [sys.executable, "-c", _HOLD_WORKERS, str(folder)],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    text=True,
  )
  assert p.stdout.readline().strip() == "ready"
  workers = _descendants(p.pid)
  assert workers  # grain's worker (and multiprocessing's tracker).
  p.send_signal(signal.SIGKILL)
  p.wait()
  deadline = time.time() + 30
  try:
    while any(Path(f"/proc/{w}").exists() for w in workers):
      assert time.time() < deadline, "grain workers outlived the killed run"
      time.sleep(0.2)
  finally:
    for w in workers:  # Leave nothing behind if the check failed.
      with contextlib.suppress(ProcessLookupError):
        os.kill(w, signal.SIGKILL)


def _sample_cfg():
  """The declared data config on the embedded sample, nothing held out."""
  cfg = base.get_base().data
  cfg.val_fraction = 0.0
  return cfg
