"""The strategies as configs, cached features, unfreezing, predict, study."""

import csv
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import base
from flaxtl import data, predict, study, train, weights
from flaxtl.errors import UserError
from tests.quick_configs import quick

ROOT = Path(__file__).resolve().parents[1]


# features:hed runs in test_feature_cache_is_reused_and_invalidated; the
# ImageNet variants in test_imagenet_configs.py (another xdist worker).
@pytest.mark.parametrize(
  "spec",
  [
    "configs/mnist_freeze8.py:hed_quick",
    "configs/mnist_scratch.py:quick",
    "configs/mnist_finetune.py:hed",
    "configs/mnist_mlp.py",
    "configs/mnist_cnn.py",
  ],
)
def test_every_offline_config_runs(spec, tmp_path):
  cfg = quick(spec, tmp_path)
  result = train.train_and_evaluate(cfg, tmp_path / "w")
  assert result["step"] == 3 and np.isfinite(result["train_loss"])
  assert (
    result["test_count"] == 1000
    and len(result["test_per_class_accuracy"]) == 10
  )
  assert result["test_accuracy"] * 1000 == pytest.approx(
    round(result["test_accuracy"] * 1000)
  )
  assert (tmp_path / "w" / "params").is_dir()
  if spec.endswith(":hed_quick"):
    _check_first_five_convs_kept(tmp_path / "w")


def _check_first_five_convs_kept(workdir: Path) -> None:
  """freeze-8 keeps model.layers[:8] (five convs) bitwise; the sixth trains."""
  trained = weights.restore_to_host(workdir / "params")
  hed = weights.restore(Path(os.environ["FLAXTL_WEIGHTS_DIR"]) / "vgg16_hed")
  for layer in (
    "block1_conv1",
    "block1_conv2",
    "block2_conv1",
    "block2_conv2",
    "block3_conv1",
  ):
    np.testing.assert_array_equal(
      trained["backbone"][layer]["kernel"], hed[layer]["kernel"]
    )
  assert not np.array_equal(
    trained["backbone"]["block3_conv2"]["kernel"], hed["block3_conv2"]["kernel"]
  )


@pytest.mark.parametrize(
  "spec",
  [
    "configs/mnist_freeze8.py",
    "configs/mnist_features.py",
    "configs/mnist_finetune.py",
  ],
)
def test_imagenet_configs_say_how_to_get_the_weights(spec, tmp_path):
  with pytest.raises(
    UserError,
    match=r"download failed.*copy vgg16_weights_tf_dim_ordering.*'hed'",
  ):
    train.train_and_evaluate(quick(spec, tmp_path), tmp_path / "w")


def test_feature_cache_is_reused_and_invalidated(tmp_path, caplog):
  cfg = quick("configs/mnist_features.py:hed", tmp_path)
  caplog.set_level("INFO", logger="flaxtl")
  first = train.train_and_evaluate(cfg, tmp_path / "a")
  assert first["step"] == 3 and first["test_count"] == 1000
  files = sorted((tmp_path / "feature_cache").glob("*.npy"))
  assert [f.name.split("-")[0] for f in files] == ["test", "train", "val"]
  assert np.load(files[1], mmap_mode="r").shape[1:] == (
    1,
    1,
    512,
  )  # block5_pool at 32x32.
  assert "cache hit" not in caplog.text
  caplog.clear()
  mtimes = [f.stat().st_mtime_ns for f in files]
  second = train.train_and_evaluate(cfg, tmp_path / "b")
  assert caplog.text.count("cache hit") == 3
  assert [f.stat().st_mtime_ns for f in files] == mtimes
  assert (
    second["test_accuracy"] == first["test_accuracy"]
  )  # Same features, same head training.
  cfg.image_size = 48  # Other preprocessing: recomputed, new files.
  train.train_and_evaluate(cfg, tmp_path / "c")
  assert len(list((tmp_path / "feature_cache").glob("*.npy"))) == 6
  assert first["frozen_params"] == 14_714_688  # The whole VGG16 conv stack.


def test_gradual_unfreezing_phases(tmp_path):
  cfg = quick(
    "configs/mnist_finetune.py:hed",
    tmp_path,
    **{"freeze.first_layers": 19, "freeze.lr_mults": ()},
  )
  cfg.freeze.phases = ((1, 15),)  # Head only, then block5 as well from epoch 1.
  cfg.total_steps = 0
  cfg.num_epochs = 2
  cfg.data.max_examples = 40  # 32 train images: 4 steps an epoch.
  result = train.train_and_evaluate(cfg, tmp_path / "w")
  assert result["step"] == 8
  trained = weights.restore_to_host(tmp_path / "w" / "params")
  hed = weights.restore(Path(os.environ["FLAXTL_WEIGHTS_DIR"]) / "vgg16_hed")
  np.testing.assert_array_equal(
    trained["backbone"]["block4_conv3"]["kernel"], hed["block4_conv3"]["kernel"]
  )
  assert not np.array_equal(
    trained["backbone"]["block5_conv1"]["kernel"], hed["block5_conv1"]["kernel"]
  )


@pytest.fixture(scope="module")
def finished_run(module_tmp):
  tmp = module_tmp("run")
  cfg = quick("configs/mnist_cnn.py", tmp, total_steps=30)
  cfg.image_size = 32
  train.train_and_evaluate(cfg, tmp / "w")
  return tmp / "w"


def _csv_rows(path: Path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _digit_csv(tmp: Path, labelled: bool) -> Path:
  cfg = base.get_base().data
  cfg.val_fraction = 0.0
  test = data.load(cfg).test
  (tmp / "images").mkdir()
  rows = []
  for i in range(12):
    name = f"img_{i}.png"
    Image.fromarray(test.images[i, :, :, 0]).save(tmp / "images" / name)
    rows.append([name, str(test.labels[i])] if labelled else [name])
  path = tmp / "test.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["filename", "label"] if labelled else ["filename"])
    w.writerows(rows)
  return path


def test_predict_unlabelled_csv_writes_a_submission(
  finished_run, tmp_path, capsys
):
  src = _digit_csv(tmp_path, labelled=False)
  out = tmp_path / "sub" / "submission.csv"
  result = predict.main(
    [
      "--workdir",
      str(finished_run),
      "--data",
      f"csv:{src}",
      "--out",
      str(out),
      "--probs",
    ]
  )
  rows = _csv_rows(out)
  assert result["count"] == 12 and len(rows) == 12
  assert rows[0]["filename"].endswith("img_0.png") and rows[0]["label"] in [
    str(i) for i in range(10)
  ]
  assert abs(sum(float(rows[0][f"prob_{i}"]) for i in range(10)) - 1) < 1e-4
  assert "accuracy" not in result


def test_predict_labelled_reports_accuracy_and_confusion(
  finished_run, tmp_path
):
  src = _digit_csv(tmp_path, labelled=True)
  out = tmp_path / "pred.csv"
  result = predict.main(
    ["--workdir", str(finished_run), "--data", f"csv:{src}", "--out", str(out)]
  )
  preds = [r["label"] for r in _csv_rows(out)]
  truth = [r["label"] for r in _csv_rows(src)]
  assert result["accuracy"] == pytest.approx(
    np.mean([p == t for p, t in zip(preds, truth)])
  )
  assert Path(result["confusion_png"]).stat().st_size > 1000


def test_predict_bad_workdir_is_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    predict.main(
      [
        "--workdir",
        str(tmp_path),
        "--data",
        "mnist_sample",
        "--out",
        str(tmp_path / "o.csv"),
      ]
    )
  assert e.value.code == 2
  assert capsys.readouterr().err.strip().splitlines() == [
    f"error: {tmp_path}: no config.json; is this the workdir of a finished run?"
  ]
  assert not (tmp_path / "o.csv").exists()


def test_log_loss_matches_sklearn_definition():
  probs = np.array(
    [[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], np.float32
  )
  labels = np.array([0, 0, 2])
  eps = np.finfo(np.float32).eps
  p = np.clip(probs, eps, 1 - eps)
  p /= p.sum(1, keepdims=True)
  want = -np.mean(np.log([p[0, 0], p[1, 0], p[2, 2]]))
  assert predict.log_loss(labels, probs) == pytest.approx(want)
  try:
    from sklearn.metrics import log_loss as sk
  except ImportError:
    return
  assert predict.log_loss(labels, probs) == pytest.approx(
    sk(labels, probs, labels=[0, 1, 2]), rel=1e-5
  )


def test_study_writes_report_plots_and_results_and_a_rerun_keeps_them(
  tmp_path,
):
  args = [
    "--workdir",
    str(tmp_path),
    "--configs",
    "configs/mnist_mlp.py",
    "configs/mnist_cnn.py",
    "--set",
    "total_steps=4",
    "data.max_examples=100",
    "batch_size=8",
    "progress=False",
    "image_size=32",
  ]
  results = study.main(args)
  assert [r["name"] for r in results] == ["mnist_mlp", "mnist_cnn"]
  report = (tmp_path / "report.md").read_text()
  assert "| mnist_cnn |" in report and "![accuracy](accuracy.png)" in report
  assert (tmp_path / "learning_curves.png").stat().st_size > 5000
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved[1]["test_count"] == 1000
  # The same command again, as a user reruns it: every recorded figure stays.
  r = subprocess.run(
    [sys.executable, "-m", "flaxtl.study", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "report.md").read_text() == report
  assert " - |" not in report  # No missing validation figure.


def test_study_bad_override_stops_before_training(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    study.main(
      [
        "--workdir",
        str(tmp_path),
        "--configs",
        "configs/mnist_mlp.py",
        "--set",
        "nope=1",
      ]
    )
  assert (
    e.value.code == 2 and "unknown config key 'nope'" in capsys.readouterr().err
  )
  assert not (tmp_path / "mnist_mlp").exists()


def test_study_refuses_configs_on_different_splits(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    study.main(
      [
        "--workdir",
        str(tmp_path),
        "--configs",
        "configs/mnist_mlp.py",
        "configs/mnist_features.py:hed",
      ]
    )
  err = capsys.readouterr().err
  assert (
    e.value.code == 2
    and "data.val_fraction=0.3" in err
    and "--set data.val_fraction=0.2" in err
  )
