"""tv_efficientnet_b0..b7 against torchvision's own EfficientNet.

One real model (B0, random weights, BN statistics perturbed) for outputs,
written by torch in every layout; every variant's names, shapes and module
order from torchvision's modules on the meta device (no memory, no FLOPs).
"""

import copy

import jax
import numpy as np
import pytest

from flaxtl import convert, models, tree, weights
from flaxtl.errors import UserError
from flaxtl.models import common, tv_efficientnet
from flaxtl.preprocess import preprocess_input
from flaxtl.train import freeze
from flaxtl.weights import convert as weights_convert
from flaxtl.weights.mappings import tv_common
from flaxtl.weights.mappings import tv_efficientnet as mapping
from tests import torch_oracle

ARCHS = sorted(tv_efficientnet.VARIANTS)
SIZE = 64


@pytest.fixture(scope="module")
def b0(torch, torchvision):
  """torchvision's B0 (random init, perturbed BN) and its state dict."""
  torch.manual_seed(0)
  net = torchvision.models.efficientnet_b0().eval()
  torch_oracle.perturb_batch_norm(torch, net)
  return net, torch_oracle.state_dict(net)


@pytest.fixture(scope="module")
def x(images64):
  return preprocess_input(images64, "torch")


@pytest.fixture(scope="module")
def variables(b0):
  converted = mapping.from_torch(
    torch_oracle.in_memory(b0[1]), "tv_efficientnet_b0"
  )
  assert converted.include_top and converted.num_classes == 1000
  return converted.variables


@pytest.fixture(scope="module")
def logits(torch, b0, x):
  """torchvision's logits, and B0's jitted forward pass."""
  want = torch_oracle.logits(torch, b0[0], x)
  return want, jax.jit(models.create("tv_efficientnet_b0").apply)


def test_logits_match_torchvision(logits, variables, x):
  want, forward = logits
  err = torch_oracle.max_rel_err(forward(variables, x), want)
  assert err < torch_oracle.PARITY, err


@pytest.mark.parametrize("layout", torch_oracle.LAYOUTS)
def test_files_torch_wrote_convert_to_the_same_model(
  torch, b0, logits, variables, x, tmp_path, layout
):
  """python -m flaxtl.convert on torch.save (zip, legacy) / safetensors."""
  src = torch_oracle.save(torch, b0[0].state_dict(), tmp_path / "b0", layout)
  out = convert.main([str(src), "--out", str(tmp_path / "ckpt")])
  prov = weights.read_provenance(out)
  assert (prov["arch"], prov["layout"]) == ("tv_efficientnet_b0", layout)
  assert prov["include_top"] and prov["num_classes"] == 1000
  restored = weights.restore_variables(out)
  got, want = tree.flatten(restored), tree.flatten(variables)
  assert got.keys() == want.keys()
  for k in got:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  err = torch_oracle.max_rel_err(logits[1](restored, x), logits[0])
  assert err < torch_oracle.PARITY, err


def test_convert_cli_refuses_another_variant(torch, b0, tmp_path, capsys):
  src = torch_oracle.save(
    torch, b0[0].state_dict(), tmp_path / "b0.pth", "torch_zip"
  )
  out = tmp_path / "ckpt"
  argv = [str(src), "--arch", "tv_efficientnet_b1", "--out", str(out)]
  with pytest.raises(SystemExit) as exit_:
    convert.main(argv)
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1
  assert "holds a tv_efficientnet_b0 model, not tv_efficientnet_b1" in err[0]
  assert not out.exists()


def test_features_without_top_match_torchvision(torch, b0, x):
  net, sd = b0
  converted = weights_convert.to_variables(
    torch_oracle.in_memory(sd), include_top=False
  )
  assert converted.arch == "tv_efficientnet_b0"
  assert converted.num_classes is None
  assert "classifier" not in converted.variables["params"]
  assert {"classifier.1.weight", "classifier.1.bias"} <= set(converted.skipped)
  with torch.no_grad():
    stage3 = net.features[:4](torch_oracle.nchw(torch, x))
    pooled = net.avgpool(net.features[4:](stage3)).flatten(1).numpy()
  early = models.create(
    "tv_efficientnet_b0", include_top=False, output_layer="features/3"
  )
  got = jax.jit(early.apply)(converted.variables, x)
  err = torch_oracle.max_rel_err(got, torch_oracle.nhwc(stage3))
  assert err < torch_oracle.PARITY, err
  avg = models.create("tv_efficientnet_b0", include_top=False, pooling="avg")
  got = jax.jit(avg.apply)(converted.variables, x)
  assert torch_oracle.max_rel_err(got, pooled) < torch_oracle.PARITY
  # A model that stops early has no parameters after its output layer.
  params = common.variable_shapes(early, SIZE)["params"]["features"]
  assert sorted(params, key=int) == ["0", "1", "2", "3"]


def test_train_mode_matches_torch_train_mode(torch, b0, variables, x):
  """Batch statistics, momentum 0.1 == Flax 0.9, and a BN kept in eval."""
  net = copy.deepcopy(b0[0]).train()
  for m in net.modules():  # Deterministic: no dropout, no stochastic depth.
    if hasattr(m, "p"):
      m.p = 0.0
  net.features[0][1].eval()  # The stem BN keeps its running statistics.
  with torch.no_grad():
    want = net(torch_oracle.nchw(torch, x)).numpy()
  after = torch_oracle.state_dict(net)
  model = models.create(
    "tv_efficientnet_b0", dropout=0.0, stochastic_depth_prob=0.0
  )
  train = common.TrainMode(bn_inference=frozenset({"features/0/1"}))
  step = jax.jit(
    lambda v: model.apply(v, x, train=train, mutable=["batch_stats"])
  )
  got, updates = step(variables)
  assert torch_oracle.max_rel_err(got, want) < torch_oracle.PARITY
  stats = tree.flatten(updates["batch_stats"])
  before = tree.flatten(variables["batch_stats"])
  np.testing.assert_array_equal(
    stats["features/0/1/mean"], before["features/0/1/mean"]
  )
  for path, mean in stats.items():
    if path.endswith("/mean") and not path.startswith("features/0/"):
      key = tv_common.torch_key(path, "batch_stats")
      np.testing.assert_allclose(mean, after[key], rtol=1e-5, atol=1e-6)
  # torch updates running_var with the unbiased batch variance, Flax with
  # the biased one: equal to within n/(n-1), n = 2*32*32 for features/1.
  np.testing.assert_allclose(
    stats["features/1/0/block/0/1/var"],
    after["features.1.0.block.0.1.running_var"],
    rtol=5e-4,
  )


@pytest.mark.parametrize("arch", ARCHS)
def test_names_shapes_and_order_match_torchvision(torch, torchvision, arch):
  net = torch_oracle.meta_model(
    torch, getattr(torchvision.models, arch.removeprefix("tv_"))
  )
  sd = net.state_dict()
  assert mapping.detect(torch_oracle.in_memory(sd)) == arch
  shapes = common.variable_shapes(models.create(arch), 32)
  got = {
    c: {p: tuple(a.shape) for p, a in tree.flatten(v).items()}
    for c, v in shapes.items()
  }
  assert got == torch_oracle.flax_shapes(sd)
  # Module paths: the order torch's forward calls return, and our taps'.
  paths = tv_efficientnet.module_paths(arch)
  assert paths == torch_oracle.forward_order(torch, net, 32)
  assert models.get(arch).outputs() == paths
  # layer_names: the modules holding parameters, in that order.
  owners = set(tree.layers(tree.paths(shapes["params"])))
  assert models.get(arch).layers() == [p for p in paths if p in owners]
  bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  variant = tv_efficientnet.VARIANTS[arch]
  assert {(m.eps, 1 - m.momentum) for m in bn} == {
    (variant.bn_eps, variant.bn_momentum)
  }


def test_registry_metadata():
  spec = models.get("tv_efficientnet_b3")
  assert (spec.family, spec.naming, spec.preprocess) == (
    "tv_efficientnet",
    "torch",
    "torch",
  )
  assert spec.feature_layer in spec.outputs(include_top=False)
  for layer in (spec.classifier, *spec.stem_layers):
    assert layer in spec.layers(include_top=True)
  paths = spec.outputs(include_top=False, pooling="max")
  assert paths[-2:] == ["features", "maxpool"]
  with pytest.raises(UserError, match="output_layer 'classifier/1'"):
    models.create(
      "tv_efficientnet_b0", include_top=False, output_layer="classifier/1"
    ).init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(UserError, match="at least 32x32"):
    common.variable_shapes(models.create("tv_efficientnet_b0"), 16)


def test_freeze_until_a_stage_freezes_through_its_last_block():
  spec = models.get("tv_efficientnet_b0")
  shapes = common.variable_shapes(spec.create(include_top=False), 32)
  params = {"backbone": shapes["params"]}
  rules = freeze.until_rules("features/3", params, spec, include_top=False)
  frozen = freeze.plan(params, rules, log_matches=False).frozen_layers()
  stages = {layer.split("/")[2] for layer in frozen}
  assert stages == {"0", "1", "2", "3"}
  assert "backbone/features/3/1/block/3/1" in frozen  # Its last layer.


@pytest.mark.parametrize(
  "key,value,message",
  [
    (
      "features.3.0.block.1.1.running_var",
      None,
      r"missing tensor\(s\) features.3.0.block.1.1.running_var",
    ),
    (
      "features.8.0.weight",
      np.zeros((1280, 320, 3, 3), np.float32),
      r"features.8.0.weight has shape \(1280, 320, 3, 3\), "
      r"expected \(1280, 320, 1, 1\)",
    ),
    (
      "features.0.0.weight",
      np.zeros((32, 3, 3, 3), np.int32),
      "features.0.0.weight holds int32",
    ),
    ("classifier.1.weight", None, r"no classifier .*--notop"),
  ],
)
def test_bad_state_dicts_are_refused(b0, key, value, message):
  sd = dict(b0[1])
  if value is None:
    del sd[key]
  else:
    sd[key] = value
  include_top = True if key.startswith("classifier") else None
  with pytest.raises(UserError, match=message):
    weights_convert.to_variables(
      torch_oracle.in_memory(sd, "b0.pth"), "tv_efficientnet_b0", include_top
    )


def test_half_precision_state_dict_converts_to_float32(b0, variables):
  sd = {k: v.astype(np.float16) for k, v in b0[1].items()}
  converted = mapping.from_torch(torch_oracle.in_memory(sd), ARCHS[0])
  got, want = tree.flatten(converted.variables), tree.flatten(variables)
  assert got.keys() == want.keys()
  assert all(a.dtype == np.float32 for a in got.values())
  key = "params/features/8/0/kernel"
  np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=1e-4)
