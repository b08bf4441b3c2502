"""The workflows with BatchNormalization backbones, Keras- and PyTorch-named.

ResNet50 (Keras names, `freeze.first_layers`) and tv_resnet18 (PyTorch names,
`freeze.until`) stand for every registered family: the engine asks the
registry, never the family. Pretrained weights are real converted checkpoints
of random variables, so what must stay frozen can be compared bit for bit.
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from flaxtl import config_files, models, predict, train, tree, weights
from flaxtl.errors import UserError
from flaxtl.models import common
from flaxtl.train import setup

ROOT = Path(__file__).resolve().parents[2]
# Keras ResNet50: model.layers[:16] ends inside conv2_block1, whose shortcut
# BN (conv2_block1_0_bn) is frozen while its main branch's last BN trains.
FROZEN_BN, TRAINED_BN = "conv2_block1_0_bn", "conv2_block1_3_bn"


@pytest.fixture(scope="module")
def checkpoints(module_tmp) -> dict[str, Path]:
  """Converted no-top checkpoints of random ResNet50 and tv_resnet18."""
  out = {}
  for arch in ("resnet50", "tv_resnet18"):
    model = models.create(arch, include_top=False)
    variables = jax.tree.map(np.asarray, common.init_variables(model, 32))
    path = module_tmp(arch) / arch
    provenance = {"arch": arch, "include_top": False, "num_classes": None}
    out[arch] = weights.save(variables, path, provenance)
  return out


def config(spec: str, arch: str, ckpt: Path, tmp: Path, **overrides):
  c = config_files.load(str(ROOT / spec))
  c.model.arch, c.model.weights = arch, str(ckpt)
  c.model.feature_layer = None  # The backbone's own default.
  c.model.features_cache_dir = str(tmp / "features")
  c.image_size, c.progress = 32, False
  c.data.max_examples, c.batch_size, c.eval_batch_size = 100, 8, 50
  c.total_steps, c.log_every_steps = 3, 1
  for key, value in overrides.items():
    config_files.override(c, f"{key}={value!r}")
  return c


def final(workdir: Path) -> dict:
  return {
    c: tree.flatten(weights.restore_to_host(workdir / c))
    for c in ("params", "batch_stats")
  }


def changed(after: dict, before: dict, layer: str, collection: str) -> bool:
  keys = [k for k in before[collection] if k.startswith(layer + "/")]
  assert keys, layer
  return any(
    not np.array_equal(
      after[collection]["backbone/" + k], before[collection][k]
    )
    for k in keys
  )


def test_first_16_keras_layers_frozen_keep_their_bn_in_inference_mode(
  checkpoints, tmp_path
):
  c = config(
    "configs/mnist_freeze8.py:hed_quick",
    "resnet50",
    checkpoints["resnet50"],
    tmp_path,
    **{"freeze.first_layers": 16},
  )
  result = train.train_and_evaluate(c, tmp_path / "w")
  assert result["step"] == 3 and np.isfinite(result["train_loss"])
  before = {
    k: tree.flatten(v)
    for k, v in weights.restore_variables(checkpoints["resnet50"]).items()
  }
  after = final(tmp_path / "w")
  for collection in ("params", "batch_stats"):
    assert not changed(after, before, FROZEN_BN, collection)
    assert changed(after, before, TRAINED_BN, collection)
  assert not changed(after, before, "conv1_conv", "params")


@pytest.mark.parametrize(
  "bn_mode,inference",
  [
    ("keras", {FROZEN_BN}),
    ("frozen", {FROZEN_BN, TRAINED_BN}),
    ("train", set()),
  ],
)
def test_bn_mode_decides_which_bn_layers_run_in_inference_mode(
  bn_mode, inference
):
  c = config_files.load(str(ROOT / "configs/mnist_freeze8.py:hed_quick"))
  c.model.arch, c.model.bn_mode, c.image_size = "resnet50", bn_mode, 32
  c.freeze.first_layers = 16
  model = setup.build_model(c, 10)
  shapes = setup.abstract_variables(model, 32, jax.random.PRNGKey(0))
  plan = setup.freeze_plan(c, shapes["params"], 16, log_matches=False)
  mode = setup.train_mode(c, plan, shapes["batch_stats"])
  watched = {"backbone/" + FROZEN_BN, "backbone/" + TRAINED_BN}
  assert mode.bn_inference & watched == {"backbone/" + n for n in inference}


def test_freeze_until_a_stage_of_a_pytorch_named_backbone(
  checkpoints, tmp_path
):
  c = config(
    "configs/mnist_freeze8.py:hed_quick",
    "tv_resnet18",
    checkpoints["tv_resnet18"],
    tmp_path,
    **{"freeze.until": "layer1"},
  )
  train.train_and_evaluate(c, tmp_path / "w")
  before = {
    k: tree.flatten(v)
    for k, v in weights.restore_variables(checkpoints["tv_resnet18"]).items()
  }
  after = final(tmp_path / "w")
  for layer in ("conv1", "bn1", "layer1/1/bn2"):
    assert not changed(after, before, layer, "params")
    assert layer == "conv1" or not changed(after, before, layer, "batch_stats")
  assert changed(after, before, "layer2/0/conv1", "params")
  assert changed(after, before, "layer2/0/bn1", "batch_stats")


def test_cached_features_then_predict(checkpoints, tmp_path):
  arch = "tv_resnet18"
  c = config(
    "configs/mnist_features.py:hed",
    arch,
    checkpoints[arch],
    tmp_path,
    **{"model.pooling": "avg"},
  )
  result = train.train_and_evaluate(c, tmp_path / "w")
  before = weights.restore_variables(checkpoints[arch])
  backbone_size = sum(np.size(a) for a in jax.tree.leaves(before["params"]))
  assert result["frozen_params"] == backbone_size
  saved = final(tmp_path / "w")
  for path, value in tree.flatten(before["batch_stats"]).items():
    np.testing.assert_array_equal(
      saved["batch_stats"]["backbone/" + path], value
    )
  out = tmp_path / "pred.csv"
  got = predict.main(
    [
      "--workdir",
      str(tmp_path / "w"),
      "--data",
      "mnist_sample",
      "--out",
      str(out),
    ]
  )
  assert got["count"] == 1000
  # The same model on the same digits (batch shapes differ: a near tie may
  # flip, nothing more).
  assert got["accuracy"] == pytest.approx(result["test_accuracy"], abs=0.005)


def test_the_weights_options_build_the_backbone(tmp_path):
  """A MobileNetV2 converted at alpha 0.35 trains without naming its alpha."""
  model = models.create("mobilenetv2", include_top=False, alpha=0.35)
  variables = jax.tree.map(np.asarray, common.init_variables(model, 32))
  ckpt = weights.save(
    variables,
    tmp_path / "mnv2",
    {"arch": "mobilenetv2", "include_top": False, "options": {"alpha": 0.35}},
  )
  c = config(
    "configs/mnist_freeze8.py:hed_quick",
    "mobilenetv2",
    ckpt,
    tmp_path,
    total_steps=2,
  )
  assert train.train_and_evaluate(c, tmp_path / "w")["step"] == 2
  c.model.alpha = 0.5
  with pytest.raises(UserError, match=r"alpha=0.35; set --config.model.alpha"):
    train.train_and_evaluate(c, tmp_path / "w2")
