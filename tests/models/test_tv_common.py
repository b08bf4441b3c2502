"""What the PyTorch-named families share: torch's layer semantics, module
paths, and `freeze.until` (for every family, Keras ones too)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxtl import models
from flaxtl.errors import UserError
from flaxtl.models import common
from flaxtl.models import tv_common as tv
from flaxtl.train import freeze
from tests import torch_oracle


def test_post_order_puts_containers_after_their_children():
  leaves = ["conv1", "layer1/0/conv1", "layer1/0/down/0", "layer1/1/a", "fc"]
  assert tv.post_order(leaves) == [
    "conv1",
    "layer1/0/conv1",
    "layer1/0/down/0",
    "layer1/0/down",
    "layer1/0",
    "layer1/1/a",
    "layer1/1",
    "layer1",
    "fc",
  ]


def test_pools_and_tf_same_padding_match_torch(torch):
  f = torch.nn.functional
  x = torch_oracle.images(2, 11, seed=3)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
  for out in ((7, 7), (3, 5), (11, 11)):
    want = f.adaptive_avg_pool2d(xt, out).numpy().transpose(0, 2, 3, 1)
    got = tv.adaptive_avg_pool(jnp.asarray(x), out)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  want = f.max_pool2d(xt, 3, 2, 1).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(tv.max_pool(jnp.asarray(x), 3, 2, 1), want)
  # TF 'SAME': lukemelas' Conv2dDynamicSamePadding pads the same way.
  for size, k, s in ((11, 3, 2), (12, 5, 2), (15, 5, 2), (8, 3, 1)):
    before, after = tv.tf_same_padding(size, k, s)
    assert (size + before + after - k) // s + 1 == -(-size // s)
    assert after - before in (0, 1)


def _params(arch, size=32, **options):
  model = models.create(arch, **options)
  return {"backbone": common.variable_shapes(model, size)["params"]}


def _frozen(rules):
  return [r.removesuffix("/.*").replace("\\", "") for r, _ in rules]


def test_freeze_until_a_torch_stage_or_module():
  spec = models.get("tv_resnet18")
  params = _params("tv_resnet18", include_top=False)
  stage = _frozen(freeze.until_rules("layer1", params, spec, False))
  assert stage[:2] == ["backbone/conv1", "backbone/bn1"]
  assert stage[-1] == "backbone/layer1/1/bn2" and len(stage) == 10
  assert _frozen(freeze.until_rules("maxpool", params, spec, False)) == [
    "backbone/conv1",
    "backbone/bn1",
  ]
  block = _frozen(freeze.until_rules("layer2/0", params, spec, False))
  assert block[-1] == "backbone/layer2/0/downsample/1"
  plan = freeze.plan(params, freeze.until_rules("layer3", params, spec, False))
  assert {p.split("/")[1] for p in plan.trainable_paths()} == {"layer4"}
  with pytest.raises(UserError, match=r"freeze\.until='layer7' is not a layer"):
    freeze.until_rules("layer7", params, spec, False)


def test_freeze_until_on_a_keras_family_matches_first_layers():
  spec = models.get("vgg16")
  params = _params("vgg16", include_top=False)
  by_stage = freeze.until_rules("block2", params, spec, False)
  assert _frozen(by_stage) == [
    "backbone/block1_conv1",
    "backbone/block1_conv2",
    "backbone/block2_conv1",
    "backbone/block2_conv2",
  ]
  # model.layers[:7] ends with block2_pool: the same layers.
  assert by_stage == freeze.first_layers_rules(7, params, spec, False)
  assert freeze.until_rules("block3_conv1", params, spec, False) == (
    freeze.first_layers_rules(8, params, spec, False)
  )


def test_frozen_torch_bn_runs_in_inference_mode():
  model = models.create("tv_resnet18", include_top=False, pooling="avg")
  variables = common.init_variables(model, 32)
  x = jnp.asarray(torch_oracle.images(2, 32))
  mode = common.TrainMode(frozenset({"bn1"}))
  _, updates = model.apply(variables, x, train=mode, mutable=["batch_stats"])
  stats, new = variables["batch_stats"], updates["batch_stats"]
  same = jax.tree.map(np.array_equal, stats["bn1"], new["bn1"])
  assert all(jax.tree.leaves(same))  # Frozen: statistics untouched.
  moved = jax.tree.map(np.array_equal, stats["layer1"], new["layer1"])
  assert not any(jax.tree.leaves(moved))
