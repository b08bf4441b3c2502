"""launch.py as a user meets it: reruns, the workdir lock, bad input, messages.

Every case runs the real CLI in a subprocess. A user error must end with one
`error: ...` line on stderr and exit status 2, with no traceback.
"""

import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flaxtl import models, weights
from flaxtl.errors import UserError
from flaxtl.models import common

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/mnist_cnn.py:tiny"
QUIET = ("--config.progress=False",)


def _env() -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def launch(*args, config=TINY, cwd=ROOT, timeout=300):
  cmd = [sys.executable, str(ROOT / "launch.py"), "--config", config, *args]
  return subprocess.run(
    cmd, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=timeout
  )


def start(*args, config=TINY):
  cmd = [sys.executable, str(ROOT / "launch.py"), "--config", config, *args]
  return subprocess.Popen(
    cmd,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=_env(),
  )


def user_error(r: subprocess.CompletedProcess) -> str:
  """The one `error:` line of a run that stopped on a user error."""
  assert r.returncode == 2, r.stdout + r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and r.stderr.strip().endswith(errors[0]), r.stderr
  return errors[0]


def checkpoints(workdir: Path) -> list[int]:
  ck = workdir / "checkpoints"
  return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit())


def wait_for_checkpoint(workdir: Path, proc, timeout=240) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (workdir / "checkpoints").exists() and checkpoints(workdir):
      return
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  raise AssertionError("no checkpoint in time")


# --- a finished run: its default workdir, reruns, predict's flags ---


@pytest.fixture(scope="module")
def finished(module_tmp) -> tuple[Path, subprocess.CompletedProcess]:
  """A short run launched without --workdir, from another directory, with
  its progress bar on (the default) and its output captured, as in a log."""
  cwd = module_tmp("cwd")
  r = launch("--config.total_steps=8", config=str(ROOT / TINY), cwd=cwd)
  assert r.returncode == 0, r.stderr
  return cwd / "workdirs" / "mnist_cnn-tiny", r


def test_default_workdir_is_named_after_config_and_variant(finished):
  wd, r = finished
  assert (wd / "summary.json").is_file()
  expected = "python -m flaxtl.predict --workdir workdirs/mnist_cnn-tiny "
  assert expected in r.stdout
  # A captured log: no bar redrawn into the parameter table, no 100% lines.
  log = r.stdout + r.stderr
  assert "\r" not in log and "100%" not in log, log
  assert "step 8 val:" in log


def _snapshot(wd: Path) -> dict:
  return {
    p.relative_to(wd): (p.stat().st_mtime_ns, p.read_bytes())
    for p in sorted(wd.rglob("*"))
    if p.is_file() and p.name != ".lock"  # Its holder's record, not output.
  }


def test_bad_config_or_another_config_leaves_a_finished_run_untouched(
  finished,
):
  wd, _ = finished
  before = _snapshot(wd)
  line = user_error(
    launch("--workdir", str(wd), "--config.freeze.rules=garbage", *QUIET)
  )
  assert line.startswith("error: freeze.rules[0]='garbage' is not a pair")
  line = user_error(launch("--workdir", str(wd), "--config.optim.lrr=0.1"))
  assert (
    line == "error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"
  )
  line = user_error(
    launch(
      "--workdir",
      str(wd),
      "--config.total_steps=8",
      "--config.optim.lr=0.5",
      "--config.seed=3",
      *QUIET,
    )
  )
  assert f"workdir {wd} holds a finished run of another config" in line
  assert "optim.lr: 0.001 -> 0.5" in line and "seed: 0 -> 3" in line
  assert "another --workdir" in line
  assert _snapshot(wd) == before


def test_a_run_refused_on_bad_data_leaves_no_workdir(tmp_path):
  wd = tmp_path / "runs" / "new" / "wd"
  line = user_error(
    launch("--workdir", str(wd), f"--config.data.source=csv:{tmp_path}/t.csv")
  )
  assert "t.csv does not exist" in line
  assert list(tmp_path.iterdir()) == []  # Not even the stale .lock.


def test_help_exits_0_and_every_flag_says_what_it_does():
  r = subprocess.run(
    [sys.executable, str(ROOT / "launch.py"), "--help"],
    capture_output=True,
    text=True,
    env=_env(),
    timeout=120,
  )
  assert r.returncode == 0, r.stderr
  assert "--workdir: Run directory" in r.stdout + r.stderr
  r = subprocess.run(
    [sys.executable, "-m", "flaxtl.convert", "--help"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=_env(),
    timeout=120,
  )
  assert r.returncode == 0, r.stderr
  assert r.stdout.count("tv_mobilenet_v2") == 1 and "--arch ARCH" in r.stdout
  for flag in ("--include-top", "--notop", "--allow-nonfinite"):
    (row,) = [ln for ln in r.stdout.splitlines() if ln.strip().startswith(flag)]
    assert len(row.split()) > 1, row  # Help text on the flag's own row.


def test_rerunning_a_finished_run_changes_nothing(finished):
  wd, _ = finished
  kept = {n: (wd / n).read_bytes() for n in ("summary.json", "metrics.jsonl")}
  again = launch("--workdir", str(wd), "--config.total_steps=8", *QUIET)
  assert again.returncode == 0, again.stderr
  assert "finished at step 8" in again.stderr
  assert {n: (wd / n).read_bytes() for n in kept} == kept
  summary = json.loads(kept["summary.json"])
  assert summary["val_count"] == 40 and "train_loss" in summary
  assert 0 < summary["train_time_s"] <= summary["wall_time_s"]


def predict(*args):
  cmd = [sys.executable, "-m", "flaxtl.predict", *args]
  return subprocess.run(
    cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300
  )


def test_predict_out_a_folder_and_batch_size_zero(finished, tmp_path):
  base = ("--workdir", str(finished[0]), "--data", "mnist_sample")
  line = user_error(predict(*base, "--out", str(tmp_path)))
  assert f"--out {tmp_path}: is a directory" in line
  out = tmp_path / "p.csv"
  line = user_error(predict(*base, "--out", str(out), "--batch-size", "0"))
  assert line == "error: --batch-size=0: must be positive"
  assert not out.exists()


# --- the workdir lock, a killed run, resuming with another batch size ---


@pytest.mark.slow
def test_lock_refuses_a_second_run_and_a_killed_run_leaves_it_free(tmp_path):
  wd = tmp_path / "wd"
  first = start(
    "--workdir",
    str(wd),
    "--config.total_steps=400",
    "--config.checkpoint_every_steps=4",
    *QUIET,
  )
  try:
    wait_for_checkpoint(wd, first)
    line = user_error(launch("--workdir", str(wd), *QUIET))
    assert f"workdir {wd} is in use by process {first.pid}" in line
  finally:
    first.kill()  # SIGKILL: the lock file is left behind.
    first.wait()
  assert (wd / ".lock").exists()
  line = user_error(
    launch("--workdir", str(wd), "--config.batch_size=4", *QUIET)
  )
  assert "--config.batch_size=8" in line and "another --workdir" in line
  saved = checkpoints(wd)[-1]
  resumed = launch(
    "--workdir", str(wd), f"--config.total_steps={saved}", *QUIET
  )
  assert resumed.returncode == 0, resumed.stderr
  assert json.loads((wd / "summary.json").read_text())["step"] == saved


# --- interruptions ---


@pytest.mark.slow
def test_sigint_saves_says_so_and_exits_nonzero_then_resume_counts_time(
  tmp_path,
):
  wd = tmp_path / "wd"
  p = start(
    "--workdir",
    str(wd),
    "--config.total_steps=400",
    "--config.checkpoint_every_steps=4",
    *QUIET,
  )
  wait_for_checkpoint(wd, p)
  p.send_signal(signal.SIGINT)
  out, _ = p.communicate(timeout=300)
  assert p.returncode == 128 + signal.SIGINT, out
  assert "SIGINT: saved step" in out and "rerun the same command" in out
  assert "final variables" not in out and "Traceback" not in out
  assert not (wd / "params").exists() and not (wd / "summary.json").exists()
  saved = checkpoints(wd)[-1]
  done = launch(
    "--workdir", str(wd), f"--config.total_steps={saved + 4}", *QUIET
  )
  assert done.returncode == 0, done.stderr
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["sessions"] == 2 and summary["step"] == saved + 4


def test_nan_before_any_checkpoint_says_none_was_saved(tmp_path):
  line = user_error(
    launch(
      "--workdir",
      str(tmp_path / "wd"),
      "--config.optim.lr=1e30",
      "--config.log_every_steps=1",
      *QUIET,
    )
  )
  assert (
    "NaN/Inf at step" in line and "no checkpoint had been saved yet" in line
  )


# --- bad input: one line, exit 2 ---


@pytest.mark.parametrize(
  "args,config,expected",
  [
    ((), "configs/nope.py", "--config: configs/nope.py: no such config file"),
    (("--config.optim.lr=-0.001",), TINY, "optim.lr=-0.001 is out of range"),
    (
      ("--config.num_epochs=0",),
      "configs/mnist_cnn.py",
      "num_epochs=0 is out of range",
    ),
    (
      ("--config.num_epochs=-2",),
      "configs/mnist_cnn.py",
      "num_epochs=-2 is out of range",
    ),
    (("--config.optim.momentum=1.5",), TINY, "optim.momentum=1.5"),
    (
      ("--config.model.weights=hed",),
      "configs/mnist_freeze8.py",
      "--config.model.head=mlp",
    ),
  ],
  ids=[
    "missing_config",
    "negative_lr",
    "zero_epochs",
    "negative_epochs",
    "momentum",
    "hed_with_keras_top",
  ],
)
def test_config_errors_are_one_line(tmp_path, args, config, expected):
  line = user_error(
    launch("--workdir", str(tmp_path / "wd"), *args, *QUIET, config=config)
  )
  assert expected in line
  assert not (tmp_path / "wd" / "checkpoints").exists()


def test_config_file_with_a_syntax_error(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  line = user_error(launch(config=str(bad)))
  assert line == f"error: --config: {bad}:1: invalid syntax"


def test_single_class_data_is_refused(tmp_path):
  npz = tmp_path / "one.npz"
  np.savez(
    npz, images=np.zeros((20, 8, 8), np.uint8), labels=np.zeros(20, np.int64)
  )
  line = user_error(
    launch(
      "--workdir",
      str(tmp_path / "wd"),
      f"--config.data.source=npz:{npz}",
      *QUIET,
    )
  )
  assert "only one class" in line


@pytest.mark.parametrize("kind", ["under_a_file", "is_a_file", "read_only"])
def test_unusable_workdir(tmp_path, kind):
  blocker = tmp_path / "blocker"
  blocker.write_text("x")
  wd = {
    "under_a_file": blocker / "wd",
    "is_a_file": blocker,
    "read_only": Path("/sys/flaxtl-test-wd"),
  }[kind]
  line = user_error(launch("--workdir", str(wd), *QUIET))
  assert f"workdir {wd}" in line


# --- converted weights that are not whole ---


@pytest.fixture(scope="module")
def converted(module_tmp) -> Path:
  """A real converted VGG16 (no top) written by flaxtl.weights.save."""
  model = models.create("vgg16", include_top=False)
  variables = jax.tree.map(np.asarray, common.init_variables(model, 32))
  out = module_tmp("conv") / "vgg16_random"
  return weights.save(
    variables, out, {"arch": "vgg16", "include_top": False, "num_classes": None}
  )


def _damaged(converted: Path, tmp: Path, how: str) -> Path:
  d = tmp / how
  shutil.copytree(converted, d)
  data = sorted((d / "params" / "d").iterdir())[0]
  if how == "missing_file":
    data.unlink()
  elif how == "changed_file":
    data.write_bytes(data.read_bytes()[:100])
  elif how == "no_provenance":
    (d / "provenance.json").unlink()
  elif how == "no_commit_marker":
    (d / "params" / "commit_success.txt").unlink()
  return d


@pytest.mark.parametrize(
  "how,expected",
  [
    ("missing_file", "damaged checkpoint, params/d/"),
    ("changed_file", "has changed"),
    ("no_provenance", "has no provenance.json"),
    ("no_commit_marker", "commit_success.txt is missing"),
  ],
)
def test_damaged_converted_weights_are_one_line(
  converted, tmp_path, how, expected
):
  d = _damaged(converted, tmp_path, how)
  line = user_error(
    launch(
      "--workdir",
      str(tmp_path / "wd"),
      f"--config.model.weights={d}",
      "--config.total_steps=1",
      *QUIET,
      config="configs/mnist_freeze8.py:hed_quick",
    )
  )
  assert str(d) in line and expected in line


def test_weights_restore_refuses_a_half_written_checkpoint(converted, tmp_path):
  d = _damaged(converted, tmp_path, "no_commit_marker")
  prov = json.loads((d / "provenance.json").read_text())
  del prov["files"]  # As a checkpoint written before file digests.
  (d / "provenance.json").write_text(json.dumps(prov))
  with pytest.raises(UserError, match="half-written"):
    weights.restore_variables(d)


def test_readme_chain_predict_writes_the_test_csvs_own_filenames(
  finished, tmp_path
):
  """launch.py ... && python -m flaxtl.predict on examples/digits/test.csv."""
  test_csv = ROOT / "examples" / "digits" / "test.csv"
  out = tmp_path / "submission.csv"
  r = predict(
    "--workdir",
    str(finished[0]),
    "--data",
    f"csv:{test_csv}",
    "--out",
    str(out),
  )
  assert r.returncode == 0, r.stderr
  written = out.read_text().splitlines()
  expected = test_csv.read_text().splitlines()
  assert written[0] == "filename,label" and len(written) == len(expected)
  assert [line.split(",")[0] for line in written[1:]] == expected[1:]
  labelled = predict(
    "--workdir",
    str(finished[0]),
    "--data",
    f"csv:{test_csv.with_name('test_labelled.csv')}",
    "--out",
    str(out),
  )
  assert labelled.returncode == 0 and "accuracy" in labelled.stdout


# --- malformed config values: checked in-process, one line each ---

# (key, the value absl's parser makes of the flag, what the line says).
MALFORMED = [
  ("freeze.rules", ("garbage",), "freeze.rules[0]='garbage' is not a pair"),
  ("freeze.rules", (("x",),), "freeze.rules[0]=('x',) is not a pair (regex"),
  ("freeze.rules", ((1, "frozen"),), "freeze.rules[0]=(1, 'frozen')"),
  ("freeze.lr_mults", ("garbage",), "freeze.lr_mults[0]='garbage' is not"),
  (
    "freeze.lr_mults",
    (("head/.*", "ten"),),
    "freeze.lr_mults[0]=('head/.*', 'ten') is not a pair (regex, multiplier)",
  ),
  ("freeze.lr_mults", "garbage", "freeze.lr_mults='garbage' is not a tuple"),
  ("freeze.phases", ("garbage",), "freeze.phases[0]='garbage' is not a pair"),
  ("freeze.phases", ((1,),), "freeze.phases[0]=(1,) is not a pair (epoch"),
  ("freeze.phases", ((1.5, 2),), "freeze.phases[0]=(1.5, 2)"),
  ("model.hidden", ("abc",), "model.hidden[0]='abc' is not a width (int)"),
  ("model.hidden", (True,), "model.hidden[0]=True is not a width"),
  ("model.activations", (3,), "model.activations[0]=3 is not an activation"),
  ("model.dropout", ("x",), "model.dropout[0]='x' is not a rate"),
]


def test_malformed_tuple_values_are_one_line_naming_the_key():
  from configs import base
  from flaxtl import config_files
  from flaxtl.train import config as config_lib

  # The class, not the cases: every tuple-typed key of the base config is
  # described in TUPLE_KEYS (a new one must be added there).
  keys = config_files.leaf_keys(base.get_base())
  tuples = {
    k for k in keys if isinstance(config_lib._get(base.get_base(), k), tuple)
  }
  assert tuples == set(config_lib.TUPLE_KEYS)
  for key, value, expected in MALFORMED:
    c = config_files.load("configs/mnist_freeze8.py:hed_quick")
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    with node.ignore_type():
      node[leaf] = value
    with pytest.raises(UserError) as e:
      config_lib.validate(c)
    assert str(e.value).startswith(expected), (key, value, str(e.value))
    assert "\n" not in str(e.value) and f'--config.{key}="' in str(e.value)
  with pytest.raises(
    UserError, match=r"^freeze.rules: \('x',\) is not \(regex"
  ):
    from flaxtl.train import freeze

    freeze.plan({"w": np.zeros(2)}, rules=[("x",)])
  spec = "configs/mnist_freeze8.py:hed_quick"
  assert config_files.unknown_key_message(spec, ["--config.optim.lrr=0.1"]) == (
    "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"
  )
  with pytest.raises(UserError) as e:
    models.registry.get("vgg61")
  assert str(e.value) == "unknown architecture 'vgg61'; did you mean 'vgg19'?"


def test_weights_of_another_arch_name_both_archs(converted):
  with pytest.raises(UserError) as e:
    weights.resolve(str(converted), "tv_mobilenet_v2", False)
  assert str(e.value) == (
    f"model.weights={str(converted)!r} holds vgg16 weights, but model.arch="
    "'tv_mobilenet_v2'; use --config.model.arch=vgg16 or weights of "
    "tv_mobilenet_v2"
  )


@pytest.mark.parametrize("cli", ["predict", "study"])
def test_every_flag_of_predict_and_study_has_help(cli, capsys):
  import importlib

  module = importlib.import_module(f"flaxtl.{cli}")
  with pytest.raises(SystemExit) as e:
    module.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  flag = {"predict": "--batch-size BATCH_SIZE", "study": "--workdir WORKDIR"}
  row = out[out.index("\n  " + flag[cli]) + 1 :].splitlines()
  # The help text follows the flag on its row or the next one.
  assert len(row[0].split()) > 2 or row[1].startswith(" " * 10), out
