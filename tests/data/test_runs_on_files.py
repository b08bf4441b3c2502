"""launch.py and predict on streamed image files, as a user runs them:
SIGKILL mid-training then rerun is bitwise identical with a grain worker
process decoding a class folder; predictions keep the test CSV's filenames."""

import csv
import dataclasses
import json
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from configs import base, mnist_cnn
from flaxtl import data, weights

ROOT = Path(__file__).resolve().parents[2]
PER_CLASS = 12


@pytest.fixture(scope="module")
def digits(module_tmp) -> Path:
  """Real MNIST digits as PNG files: folder/<class>/<k>.png (12 per class),
  and the tutorial's test layout: test.csv naming `0.png`.. with the images
  in Images/test/."""
  root = module_tmp("digits")
  test = data.load(_sample_cfg()).test
  counts = dict.fromkeys(range(10), 0)
  for image, label in zip(test.images, test.labels):
    k = counts[int(label)]
    if k < PER_CLASS:
      out = root / "folder" / str(label) / f"{k}.png"
      out.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image[..., 0]).save(out)
      counts[int(label)] += 1
  (root / "Images" / "test").mkdir(parents=True)
  names = []
  for i, image in enumerate(test.images[-12:]):
    names.append(f"{i}.png")
    Image.fromarray(image[..., 0]).save(root / "Images" / "test" / names[-1])
  (root / "test.csv").write_text("filename\n" + "\n".join(names) + "\n")
  return root


def _launch_args(workdir: Path, folder: Path) -> list[str]:
  return [
    sys.executable,
    "launch.py",
    "--config",
    "configs/mnist_cnn.py:tiny",
    "--workdir",
    str(workdir),
    "--config.progress=False",
    f"--config.data.source=folder:{folder}",
    "--config.data.workers=1",  # Decoded in a grain worker process.
    "--config.total_steps=36",
    "--config.checkpoint_every_steps=6",
    "--config.eval_every_epochs=100",  # Validate at the end only.
  ]


def _launch(workdir: Path, folder: Path):
  return subprocess.Popen(
    _launch_args(workdir, folder),
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )


@pytest.fixture(scope="module")
def finished(digits, module_tmp) -> Path:
  workdir = module_tmp("ref")
  p = _launch(workdir, digits / "folder")
  out, _ = p.communicate(timeout=900)
  assert p.returncode == 0, out
  return workdir


def _steps(workdir: Path) -> list[int]:
  ck = workdir / "checkpoints"
  if not ck.exists():
    return []
  return sorted(int(x.name) for x in ck.iterdir() if x.name.isdigit())


@pytest.mark.slow
def test_sigkill_on_streamed_folder_then_rerun_is_bitwise_identical(
  digits, finished, tmp_path
):
  p = _launch(tmp_path, digits / "folder")
  deadline = time.time() + 600
  while not any(s >= 12 for s in _steps(tmp_path)):
    assert p.poll() is None, p.stdout.read()
    assert time.time() < deadline, "no checkpoint in time"
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  left = _steps(tmp_path)
  assert left and left[-1] < 36  # Really killed mid-training.
  p = _launch(tmp_path, digits / "folder")
  out, _ = p.communicate(timeout=900)
  assert p.returncode == 0, out
  assert f"resumed from step {left[-1]}" in out
  jax.tree.map(
    np.testing.assert_array_equal,
    weights.restore_to_host(finished / "params"),
    weights.restore_to_host(tmp_path / "params"),
  )
  ref, again = (
    json.loads((d / "summary.json").read_text()) for d in (finished, tmp_path)
  )
  for k in ("val_accuracy", "val_log_loss", "val_count"):
    assert ref[k] == again[k], k
  assert ref["val_count"] == 24  # 20% of the 120 files, each once.


def _predict(workdir: Path, digits: Path, out: Path, *extra):
  args = ["--workdir", str(workdir), "--data", f"csv:{digits / 'test.csv'}"]
  r = subprocess.run(
    [sys.executable, "-m", "flaxtl.predict", *args, "--out", str(out), *extra],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=600,
  )
  assert r.returncode == 0, r.stderr
  with open(out, newline="") as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_predict_submission_keeps_the_csv_filenames(digits, finished, tmp_path):
  with open(digits / "test.csv", newline="") as f:
    written = [row["filename"] for row in csv.DictReader(f)]
  rows = _predict(finished, digits, tmp_path / "submission.csv")
  assert [r["filename"] for r in rows] == written  # "0.png", not a path.
  assert all(r["label"] in [str(d) for d in range(10)] for r in rows)
  full = _predict(finished, digits, tmp_path / "full.csv", "--full-paths")
  assert [r["filename"] for r in full] == [
    str((digits / "Images" / "test" / name).absolute()) for name in written
  ]
  assert [r["label"] for r in full] == [r["label"] for r in rows]


@pytest.fixture(scope="module")
def damaged(digits, module_tmp):
  """The digit folder with one training file truncated: (folder, that file,
  the training step that first reads it)."""
  folder = module_tmp("damaged") / "folder"
  for src in (digits / "folder").rglob("*.png"):
    dst = folder / src.relative_to(digits / "folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
  config = mnist_cnn.get_config("tiny")
  config.data.source = f"folder:{folder}"
  train = data.load(config.data).train
  bad = Path(train.paths[0])
  bad.write_bytes(bad.read_bytes()[:100])
  # The step at which the run meets it: where a skipping iterator skips it.
  opts = data.Options.from_config(config)
  it = data.TrainIterator(
    train,
    config.batch_size,
    seed=config.seed,
    options=dataclasses.replace(opts, skip_corrupt=True),
  )
  while not it.skipped:
    next(it)
  return folder, bad, it.step


def _launch_damaged(workdir: Path, folder: Path, *extra):
  return subprocess.run(
    [
      sys.executable,
      "launch.py",
      "--config",
      "configs/mnist_cnn.py:tiny",
      "--workdir",
      str(workdir),
      "--config.progress=False",
      f"--config.data.source=folder:{folder}",
      "--config.checkpoint_every_steps=2",
      "--config.eval_every_epochs=100",
      *extra,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=900,
  )


@pytest.mark.slow
def test_truncated_file_stops_with_one_line_and_checkpoint_intact(
  damaged, tmp_path
):
  folder, bad, step = damaged
  r = _launch_damaged(tmp_path, folder)
  assert r.returncode == 2, r.stdout + r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: training step {step}: {bad}: cannot read")
  assert "Traceback" not in r.stderr
  # Checkpoints up to the last even step before it, the latest restorable.
  kept = _steps(tmp_path)
  assert kept and kept[-1] == (step - 1) // 2 * 2
  restored = weights.restore_to_host(
    tmp_path / "checkpoints" / str(kept[-1]) / "state"
  )
  assert "params" in restored
  # Skipping instead: the run finishes and counts the file once.
  r = _launch_damaged(
    tmp_path / "skip", folder, "--config.data.skip_corrupt=True"
  )
  assert r.returncode == 0, r.stdout + r.stderr
  summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
  assert summary["corrupt_files_skipped"] == 1
  assert summary["step"] == 24


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_losses(workdir: Path) -> list[float]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r["loss"] for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.mark.slow
def test_two_processes_on_loopback_stream_the_same_batches(
  digits, finished, tmp_path
):
  """Each process reads its own rows of every global batch (its grain
  worker decoding them); together they train like the one-process run."""
  port = _free_port()
  procs = []
  for i in range(2):
    args = [
      *_launch_args(tmp_path, digits / "folder"),
      "--config.distributed.num_processes=2",
      f"--config.distributed.process_id={i}",
      f"--config.distributed.coordinator_address=127.0.0.1:{port}",
    ]
    procs.append(
      subprocess.Popen(
        args,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
      )
    )
  outs = [p.communicate(timeout=900)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
  assert "process 1 of 2" in outs[1]
  np.testing.assert_allclose(
    _train_losses(tmp_path), _train_losses(finished), rtol=2e-4, atol=1e-5
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
    weights.restore_to_host(tmp_path / "params"),
    weights.restore_to_host(finished / "params"),
  )


def _sample_cfg():
  """The declared data config on the embedded sample, nothing held out."""
  cfg = base.get_base().data
  cfg.val_fraction = 0.0
  return cfg
