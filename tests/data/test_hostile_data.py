"""Careless data: repeated and conflicting CSV rows, files that are not
images, truncated JPEGs, huge images. Real files written by Pillow; each
problem is one line naming the file, found at listing or packing time."""

import io
import logging
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from flaxtl import data
from flaxtl.data import images, sources
from flaxtl.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _digits(folder: Path, n: int = 4) -> list[str]:
  folder.mkdir(parents=True, exist_ok=True)
  names = []
  for i in range(n):
    rng = np.random.default_rng(i)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(img).save(folder / f"{i}.jpg", quality=90)
    names.append(f"{i}.jpg")
  return names


def test_repeated_rows_with_the_same_label_are_counted_once(tmp_path, caplog):
  names = _digits(tmp_path / "images")
  rows = [f"{n},{i % 2}" for i, n in enumerate(names)]
  rows += [rows[0], rows[2], rows[0]]
  (tmp_path / "t.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
  with caplog.at_level(logging.WARNING, logger="flaxtl"):
    ds, _ = sources.read(f"csv:{tmp_path / 't.csv'}")
  assert len(ds) == 4 and list(ds.filenames) == names
  (warning,) = [r.getMessage() for r in caplog.records]
  assert "3 row(s) list a file already listed" in warning
  assert "t.csv row 5 (line 6)" in warning
  # A test CSV keeps its rows as written (predictions are row by row).
  opts = sources.Options(labels_required=False)
  ds, _ = sources.read(f"csv:{tmp_path / 't.csv'}", opts)
  assert len(ds) == 7


def test_unreadable_images_name_the_file_and_say_why(tmp_path, caplog):
  _digits(tmp_path / "images", 2)
  (tmp_path / "images" / "empty.png").write_bytes(b"")
  (tmp_path / "images" / "notes.png").write_text("not pixels\n")
  for name, why in (("empty.png", "empty file"), ("notes.png", "not an image")):
    path = tmp_path / "images" / name
    with pytest.raises(UserError, match=why) as e:
      images.read_image(path)
    assert str(e.value).startswith(f"{path}: ") and "BytesIO" not in str(
      e.value
    )
    (tmp_path / "t.csv").write_text(f"filename,label\n0.jpg,a\n{name},b\n")
    ds, _ = sources.read(f"csv:{tmp_path / 't.csv'}")
    with pytest.raises(UserError, match=why) as e:
      list(data.eval_batches(ds, 2, options=data.Options(model_size=16)))
    assert name in str(e.value) and "BytesIO" not in str(e.value)
  big = tmp_path / "big.png"
  Image.new("L", (300, 200)).save(big)
  limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 50_000
  try:
    with caplog.at_level(logging.WARNING, logger="flaxtl"):
      assert images.read_image(big).shape == (200, 300, 1)
  finally:
    Image.MAX_IMAGE_PIXELS = limit
  (warning,) = [r.getMessage() for r in caplog.records]
  assert warning.startswith(f"{big}: a large image (300x200, 60000 pixels")


def test_pack_cli_refuses_a_truncated_jpeg_and_writes_nothing(tmp_path):
  names = _digits(tmp_path / "images")
  buf = io.BytesIO()
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  Image.fromarray(noise).save(buf, "JPEG")
  cut = tmp_path / "images" / "cut.jpg"
  cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 3 // 5])
  Image.open(cut).close()  # Its header is whole: only decoding finds it.
  rows = [f"{n},{i % 2}" for i, n in enumerate(names)] + ["cut.jpg,1"]
  (tmp_path / "t.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
  out = tmp_path / "packed"
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "flaxtl.data.pack",
      f"csv:{tmp_path / 't.csv'}",
      "--out",
      str(out),
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=120,
  )
  assert r.returncode == 2, r.stdout + r.stderr
  assert "Traceback" not in r.stderr
  (line,) = r.stderr.strip().splitlines()
  assert line.startswith("error: ") and str(cut) in line
  assert "truncated" in line.lower()
  assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
    "images",
    "t.csv",
  ]
