"""tv_convnext_* against torchvision's own ConvNeXt.

One real model (Tiny, random weights, LayerNorms and LayerScales perturbed)
for outputs; every variant's names, shapes and layer order from
torchvision's modules on the meta device (no memory, no FLOPs).
"""

import jax
import numpy as np
import pytest

from flaxtl import convert, models, tree, weights
from flaxtl.errors import UserError
from flaxtl.models import common, tv_convnext
from flaxtl.preprocess import preprocess_input
from flaxtl.train import freeze
from flaxtl.weights.mappings import torch_names
from flaxtl.weights.mappings import tv_convnext as mapping
from tests import torch_oracle

ARCHS = sorted(tv_convnext.VARIANTS)
SIZE = 64


@pytest.fixture(scope="module")
def tvm():
  return torch_oracle.torchvision_models()


@pytest.fixture(scope="module")
def tiny(tvm):
  """torchvision's ConvNeXt-Tiny (random, norms perturbed), its state_dict."""
  import torch

  torch.manual_seed(0)
  net = torch_oracle.perturb(tvm.convnext_tiny().eval())
  return net, torch_oracle.state_dict(net)


@pytest.fixture(scope="module")
def x(images64):
  return preprocess_input(images64, "torch")


@pytest.fixture(scope="module")
def logits(tiny, x):
  """torchvision's logits, and ConvNeXt-Tiny's jitted forward pass."""
  import torch

  with torch.no_grad():
    want = tiny[0](torch_oracle.nchw(x)).numpy()
  return want, jax.jit(models.create("tv_convnext_tiny").apply)


def test_logits_match_torchvision(tiny, logits, x):
  sd = tiny[1]
  converted = mapping.from_torch(torch_oracle.weights(sd))
  assert (converted.arch, converted.include_top) == ("tv_convnext_tiny", True)
  assert converted.skipped == [] and "batch_stats" not in converted.variables
  scale = converted.variables["params"]["features"]["1"]["0"]["layer_scale"]
  np.testing.assert_array_equal(
    scale, sd["features.1.0.layer_scale"].reshape(-1)
  )
  want, forward = logits
  assert torch_oracle.rel_err(forward(converted.variables, x), want) < 1e-4


def test_torch_file_converts_to_the_same_logits(tiny, logits, x, tmp_path):
  """python -m flaxtl.convert on torch.save's zip (B0 tests every layout)."""
  src = torch_oracle.save(tiny[0], tmp_path, "torch_zip")
  out = convert.main([str(src), "--out", str(tmp_path / "ckpt")])
  assert weights.read_provenance(out)["arch"] == "tv_convnext_tiny"
  restored = weights.restore_variables(out)
  assert set(restored) == {"params"}
  want, forward = logits
  assert torch_oracle.rel_err(forward(restored, x), want) < 1e-4


def test_features_without_top_match_torchvision(tiny, x):
  import torch

  net, sd = tiny
  converted = mapping.from_torch(torch_oracle.weights(sd), include_top=False)
  assert converted.skipped == [
    f"classifier.{i}.{v} (top)" for i in (0, 2) for v in ("weight", "bias")
  ]
  with torch.no_grad():
    stage2 = net.features[:4](torch_oracle.nchw(x))
    pooled = net.avgpool(net.features[4:](stage2)).flatten(1).numpy()
  early = models.create(
    "tv_convnext_tiny", include_top=False, output_layer="features/3"
  )
  got = jax.jit(early.apply)(converted.variables, x)
  assert torch_oracle.rel_err(got, torch_oracle.nhwc(stage2)) < 1e-4
  avg = models.create("tv_convnext_tiny", include_top=False, pooling="avg")
  got = jax.jit(avg.apply)(converted.variables, x)
  assert torch_oracle.rel_err(got, pooled) < 1e-4
  params = common.variable_shapes(early, SIZE)["params"]["features"]
  assert sorted(params, key=int) == ["0", "1", "2", "3"]


def test_stochastic_depth_drops_whole_samples_in_training(tiny, x):
  """Rate 1 at the last block: its residual branch is gone for every sample."""
  early = models.create(
    "tv_convnext_tiny",
    include_top=False,
    output_layer="features/7/2/stochastic_depth",
    stochastic_depth_prob=1.0,
  )
  variables = mapping.from_torch(
    torch_oracle.weights(tiny[1]), include_top=False
  ).variables
  rngs = {"dropout": jax.random.PRNGKey(0)}
  dropped = jax.jit(lambda v: early.apply(v, x, train=True, rngs=rngs))
  kept = jax.jit(lambda v: early.apply(v, x, train=False))
  dropped, kept = dropped(variables), kept(variables)
  assert np.all(np.asarray(dropped) == 0.0) and np.abs(kept).max() > 0


@pytest.fixture
def recorded_taps(monkeypatch):
  """Every Taps a model creates, to read the layer names it went through."""
  made = []

  class Recording(common.Taps):
    def __init__(self, output_layer=None):
      super().__init__(output_layer)
      made.append(self)

  monkeypatch.setattr(common, "Taps", Recording)
  return made


@pytest.mark.parametrize("arch", ARCHS)
def test_names_shapes_and_order_match_torchvision(tvm, recorded_taps, arch):
  net = torch_oracle.meta_model(getattr(tvm, arch.removeprefix("tv_")))
  sd = net.state_dict()
  assert mapping.detect(torch_oracle.weights(sd)) == arch
  want = {}
  for key, t in sd.items():
    s = torch_names.slot(key, t.ndim)
    if s is not None:
      want.setdefault(s.collection, {})[s.path] = s.shape(tuple(t.shape))
  shapes = common.variable_shapes(models.create(arch), 32)
  got = {
    c: {p: tuple(a.shape) for p, a in tree.flatten(v).items()}
    for c, v in shapes.items()
  }
  assert got == want
  paths = tv_convnext.module_paths(arch)
  assert paths == torch_oracle.forward_order(net, 32)
  assert recorded_taps[-1].seen == paths
  # layer_names: the modules holding parameters, in that order.
  layers = models.get(arch).layers(include_top=True)
  owners = set(tree.layers(tree.paths(shapes["params"])))
  assert layers == [p for p in paths if p in owners]
  norms = [m for m in net.modules() if "LayerNorm" in type(m).__name__]
  assert {m.eps for m in norms} == {tv_convnext.EPS}
  sd_rates = [
    m.p for m in net.modules() if type(m).__name__ == "StochasticDepth"
  ]
  assert max(sd_rates) == pytest.approx(
    tv_convnext.VARIANTS[arch].stochastic_depth_prob
  )


def test_registry_metadata():
  spec = models.get("tv_convnext_base")
  assert (spec.family, spec.naming, spec.preprocess, spec.batch_stats) == (
    "tv_convnext",
    "torch",
    "torch",
    False,
  )
  names = tv_convnext.module_paths("tv_convnext_base")
  assert spec.feature_layer in names
  for layer in (spec.classifier, *spec.stem_layers):
    assert layer in spec.layers(include_top=True)


def test_freeze_until_a_stage_freezes_its_layer_scales():
  spec = models.get("tv_convnext_tiny")
  shapes = common.variable_shapes(spec.create(include_top=False), 32)
  params = {"backbone": shapes["params"]}
  rules = freeze.until_rules("features/1", params, spec, include_top=False)
  frozen = freeze.plan(params, rules, log_matches=False).frozen_layers()
  assert "backbone/features/1/2" in frozen  # The last block's layer_scale.
  assert {layer.split("/")[2] for layer in frozen} == {"0", "1"}


@pytest.mark.parametrize(
  "key,value,message",
  [
    (
      "features.1.0.layer_scale",
      np.ones((95, 1, 1), np.float32),
      r"features.1.0.layer_scale has shape \(95, 1, 1\), expected \(96,\)",
    ),
    (
      "features.2.1.weight",
      np.ones((192, 96, 2), np.float32),
      r"features.2.1.weight has shape \(192, 96, 2\)",
    ),
    ("classifier.0.bias", None, "missing tensor.*classifier.0.bias"),
  ],
)
def test_bad_state_dicts_are_refused(tiny, key, value, message):
  sd = dict(tiny[1])
  if value is None:
    del sd[key]
  else:
    sd[key] = value
  with pytest.raises(UserError, match=message):
    mapping.from_torch(
      torch_oracle.weights(sd, "tiny.pth"), arch="tv_convnext_tiny"
    )


def test_small_file_is_not_tiny(tvm):
  sd = torch_oracle.meta_model(tvm.convnext_small).state_dict()
  with pytest.raises(UserError, match="holds a tv_convnext_small model"):
    mapping.from_torch(torch_oracle.weights(sd), arch="tv_convnext_tiny")
