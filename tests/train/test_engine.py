"""The engine end to end: real jitted steps, orbax checkpoints, subprocesses."""

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import mnist_cnn
from flaxtl import train, weights
from flaxtl.errors import UserError
from flaxtl.train import loop

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(**overrides):
  """configs/mnist_cnn.py:tiny (a small CNN on 200 digits, seconds a run)."""
  c = mnist_cnn.get_config("tiny")
  c.progress = False
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def final_params(workdir: Path):
  return weights.restore_to_host(workdir / "params")


def metrics_lines(workdir: Path, split="train"):
  return [
    record
    for record in map(
      json.loads, (workdir / "metrics.jsonl").read_text().splitlines()
    )
    if record["split"] == split
  ]


@pytest.fixture(scope="module")
def reference_run(module_tmp):
  workdir = module_tmp("ref")
  result = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, result


def test_run_writes_everything_and_learns(reference_run):
  workdir, result = reference_run
  assert result["step"] == 24 and result["interrupted"] is None
  for name in (
    "config.json",
    "summary.json",
    "metrics.jsonl",
    "class_names.json",
    "weights_provenance.json",
  ):
    assert (workdir / name).is_file(), name
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(
    int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()
  ) == [16, 24]
  train_lines = metrics_lines(workdir)
  assert [line["step"] for line in train_lines] == [4, 8, 12, 16, 20, 24]
  assert train_lines[-1]["loss"] < train_lines[0]["loss"]
  assert result["val_count"] == 40  # 20% of 200, each once.
  assert result["val_accuracy"] * 40 == pytest.approx(
    round(result["val_accuracy"] * 40)
  )
  assert metrics_lines(workdir, "val")[-1]["accuracy"] == result["val_accuracy"]
  assert (
    result["test_count"] == 1000
    and len(result["test_per_class_accuracy"]) == 10
  )
  assert (
    json.loads((workdir / "config.json").read_text())["model"]["name"] == "cnn"
  )


def test_the_train_step_compiles_once(tmp_path, caplog):
  """The state enters the step placed as the step returns it: a step counter
  left uncommitted made the second call compile the whole step again."""
  with jax.log_compiles(), caplog.at_level("WARNING", logger="jax"):
    train.train_and_evaluate(tiny_config(total_steps=3), tmp_path / "w")
  assert caplog.text.count("Compiling jit(step_fn)") == 1


def test_rerun_in_same_workdir_resumes_and_matches(reference_run, tmp_path):
  ref_dir, ref = reference_run
  first = train.train_and_evaluate(tiny_config(total_steps=16), tmp_path)
  assert first["step"] == 16
  second = train.train_and_evaluate(
    tiny_config(), tmp_path
  )  # Same workdir: resumes at 16.
  assert second["step"] == 24
  a, b = final_params(ref_dir), final_params(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert (
    second["val_accuracy"] == ref["val_accuracy"]
    and second["val_log_loss"] == ref["val_log_loss"]
  )


def _launch(workdir, *extra, **kw):
  args = [
    sys.executable,
    "launch.py",
    "--config",
    "configs/mnist_cnn.py:tiny",
    "--workdir",
    str(workdir),
    "--config.progress=False",
    *extra,
  ]
  return subprocess.Popen(
    args,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    **kw,
  )


def _wait_for_checkpoint(workdir: Path, min_step: int, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    ck = workdir / "checkpoints"
    done = (
      [int(p.name) for p in ck.iterdir() if p.name.isdigit()]
      if ck.exists()
      else []
    )
    if any(s >= min_step for s in done):
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stdout.read()}")
    time.sleep(0.05)
  raise AssertionError("no checkpoint in time")


@pytest.mark.slow
def test_sigkill_mid_training_then_restart_is_bitwise_identical(tmp_path):
  ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
  extra = ["--config.total_steps=60", "--config.checkpoint_every_steps=10"]
  p = _launch(ref_dir, *extra)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out

  p = _launch(killed_dir, *extra)
  _wait_for_checkpoint(killed_dir, 20, p)
  p.send_signal(signal.SIGKILL)
  p.wait()
  steps_left = sorted(
    int(x.name)
    for x in (killed_dir / "checkpoints").iterdir()
    if x.name.isdigit()
  )
  assert steps_left and steps_left[-1] < 60  # Really killed mid-training.
  p = _launch(killed_dir, *extra)
  out, _ = p.communicate(timeout=600)
  assert p.returncode == 0, out
  assert f"resumed from step {steps_left[-1]}" in out

  jax.tree.map(
    np.testing.assert_array_equal,
    final_params(ref_dir),
    final_params(killed_dir),
  )
  ref, again = (
    json.loads((d / "summary.json").read_text()) for d in (ref_dir, killed_dir)
  )
  for k in ("val_accuracy", "val_log_loss", "test_accuracy", "test_log_loss"):
    assert ref[k] == again[k], k


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  cfg = tiny_config(checkpoint_every_steps=4, log_every_steps=1)
  train.train_and_evaluate(
    tiny_config(total_steps=4, checkpoint_every_steps=4), tmp_path
  )
  good = final_params(tmp_path)
  cfg.optim.lr = 1e30  # Diverges within a few steps.
  with pytest.raises(
    train.NonFiniteLoss,
    match=r"NaN/Inf at step \d+; the last good checkpoint \(step \d+\)",
  ):
    train.train_and_evaluate(cfg, tmp_path)
  ckpts = sorted(
    int(x.name)
    for x in (tmp_path / "checkpoints").iterdir()
    if x.name.isdigit()
  )
  mngr = ocp.CheckpointManager(
    (tmp_path / "checkpoints").absolute(), item_names=("state", "data")
  )
  restored = mngr.restore(
    ckpts[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )
  leaves = jax.tree.leaves(restored["state"]["params"])
  assert all(
    np.isfinite(np.asarray(line)).all() for line in leaves
  )  # No NaN was ever saved.
  jax.tree.map(
    np.testing.assert_array_equal, good, final_params(tmp_path)
  )  # Final params untouched.


def test_resume_with_another_optimizer_is_a_clear_error(reference_run):
  workdir, _ = reference_run
  cfg = tiny_config(total_steps=30)
  cfg.optim.name = "sgd"
  with pytest.raises(
    UserError, match=r"different model or optimiser config.*new --workdir"
  ):
    train.train_and_evaluate(cfg, workdir)


def test_nan_skip_policy_drops_updates_and_finishes(tmp_path):
  cfg = tiny_config(total_steps=8, log_every_steps=1, nan_policy="skip")
  cfg.optim.lr = 1e30
  result = train.train_and_evaluate(cfg, tmp_path)
  assert result["step"] == 8 and result["skipped_updates"] >= 1
  assert all(
    np.isfinite(np.asarray(leaf)).all()
    for leaf in jax.tree.leaves(final_params(tmp_path))
  )


@pytest.mark.parametrize(
  "overrides,msg",
  [
    (
      {
        "freeze.rules": (("backbone/nothing/.*", "frozen"),),
        "model.name": "transfer",
      },
      "match no parameter",
    ),
    (
      {"model.name": "transfer", "model.head": "keras_top", "image_size": 64},
      "needs image_size=224",
    ),
    (
      {"model.num_classes": 7},
      "model.num_classes=7 but the data has 10 classes",
    ),
    ({"batch_size": 7, "data.max_examples": 5}, "larger than"),
    ({"data.source": "npz:/nonexistent/file.npz"}, "nonexistent"),
  ],
)
def test_config_errors_stop_before_any_work(tmp_path, overrides, msg):
  cfg = tiny_config(**overrides)
  if cfg.model.name == "transfer":
    cfg.model.head, cfg.preprocess = (
      cfg.model.head if "model.head" in overrides else "linear",
      "caffe",
    )
  with pytest.raises(UserError, match=msg):
    train.train_and_evaluate(cfg, tmp_path / "w")
  assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_flag_catches_both_signals_and_restores_handlers(sig):
  """The loop saves and stops on either; the end-to-end run: test_launch.py."""
  before = signal.getsignal(sig)
  with loop._StopFlag() as stop:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # Python runs handlers between bytecodes.
    assert stop.signal == sig
  assert signal.getsignal(sig) is before
