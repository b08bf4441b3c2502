"""tv_convnext_* against torchvision's own ConvNeXt.

One real model (Tiny, random weights, LayerNorms and LayerScales perturbed)
for outputs; every variant's names, shapes and module order from
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
from flaxtl.weights import convert as weights_convert
from flaxtl.weights.mappings import tv_convnext as mapping
from tests import torch_oracle

ARCHS = sorted(tv_convnext.VARIANTS)
SIZE = 64


@pytest.fixture(scope="module")
def tiny(torch, torchvision):
  """torchvision's ConvNeXt-Tiny (random, norms perturbed), its state dict."""
  torch.manual_seed(0)
  net = torchvision.models.convnext_tiny().eval()
  torch_oracle.perturb_norms(torch, net)
  return net, torch_oracle.state_dict(net)


@pytest.fixture(scope="module")
def x(images64):
  return preprocess_input(images64, "torch")


@pytest.fixture(scope="module")
def logits(torch, tiny, x):
  """torchvision's logits, and ConvNeXt-Tiny's jitted forward pass."""
  want = torch_oracle.logits(torch, tiny[0], x)
  return want, jax.jit(models.create("tv_convnext_tiny").apply)


def test_logits_match_torchvision(tiny, logits, x):
  sd = tiny[1]
  converted = weights_convert.to_variables(torch_oracle.in_memory(sd))
  assert (converted.arch, converted.include_top) == ("tv_convnext_tiny", True)
  assert converted.skipped == [] and "batch_stats" not in converted.variables
  scale = converted.variables["params"]["features"]["1"]["0"]["layer_scale"]
  np.testing.assert_array_equal(
    scale, sd["features.1.0.layer_scale"].reshape(-1)
  )
  want, forward = logits
  err = torch_oracle.max_rel_err(forward(converted.variables, x), want)
  assert err < torch_oracle.PARITY, err


def test_torch_file_converts_to_the_same_logits(
  torch, tiny, logits, x, tmp_path
):
  """python -m flaxtl.convert on torch.save's zip (B0 tests every layout)."""
  src = torch_oracle.save(
    torch, tiny[0].state_dict(), tmp_path / "tiny.pth", "torch_zip"
  )
  out = convert.main([str(src), "--out", str(tmp_path / "ckpt")])
  assert weights.read_provenance(out)["arch"] == "tv_convnext_tiny"
  restored = weights.restore_variables(out)
  assert set(restored) == {"params"}
  want, forward = logits
  assert torch_oracle.max_rel_err(forward(restored, x), want) < 1e-4


def test_features_without_top_match_torchvision(torch, tiny, x):
  net, sd = tiny
  converted = mapping.from_torch(
    torch_oracle.in_memory(sd), "tv_convnext_tiny", include_top=False
  )
  assert converted.skipped == [
    f"classifier.{i}.{v}" for i in (0, 2) for v in ("weight", "bias")
  ]
  with torch.no_grad():
    stage2 = net.features[:4](torch_oracle.nchw(torch, x))
    pooled = net.avgpool(net.features[4:](stage2)).flatten(1).numpy()
  early = models.create(
    "tv_convnext_tiny", include_top=False, output_layer="features/3"
  )
  got = jax.jit(early.apply)(converted.variables, x)
  err = torch_oracle.max_rel_err(got, torch_oracle.nhwc(stage2))
  assert err < torch_oracle.PARITY, err
  avg = models.create("tv_convnext_tiny", include_top=False, pooling="avg")
  got = jax.jit(avg.apply)(converted.variables, x)
  assert torch_oracle.max_rel_err(got, pooled) < torch_oracle.PARITY
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
    torch_oracle.in_memory(tiny[1]), "tv_convnext_tiny", include_top=False
  ).variables
  rngs = {"dropout": jax.random.PRNGKey(0)}
  dropped = jax.jit(lambda v: early.apply(v, x, train=True, rngs=rngs))
  kept = jax.jit(lambda v: early.apply(v, x, train=False))
  dropped, kept = dropped(variables), kept(variables)
  assert np.all(np.asarray(dropped) == 0.0) and np.abs(kept).max() > 0


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
  paths = tv_convnext.module_paths(arch)
  assert paths == torch_oracle.forward_order(torch, net, 32)
  assert models.get(arch).outputs() == paths
  owners = set(tree.layers(tree.paths(shapes["params"])))
  assert models.get(arch).layers() == [p for p in paths if p in owners]
  norms = [m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]
  assert {m.eps for m in norms} == {tv_convnext.EPS}
  rates = [m.p for m in net.modules() if type(m).__name__ == "StochasticDepth"]
  assert max(rates) == pytest.approx(
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
  assert spec.feature_layer in spec.outputs(include_top=False)
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
    ("classifier.0.bias", None, r"missing tensor\(s\) classifier.0.bias"),
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
      torch_oracle.in_memory(sd, "tiny.pth"), "tv_convnext_tiny"
    )


def test_small_is_told_from_tiny(torch, torchvision):
  sd = torch_oracle.meta_model(torch, torchvision.models.convnext_small)
  w = torch_oracle.in_memory(sd.state_dict())
  with pytest.raises(UserError, match="holds a tv_convnext_small model"):
    weights_convert.to_variables(w, "tv_convnext_tiny")
