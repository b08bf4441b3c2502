"""The PyTorch-named families' one tapping convention (tv_common.tap/run).

Module order is recorded from the taps; Flax's own record of which modules
ran, in the order their calls returned (`nn.intercept_methods`), and which of
them own parameters is the oracle here. Shapes through `jax.eval_shape`;
real values only on tiny inputs, one arch per family.
"""

from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np
import pytest

from flaxtl import models, tree
from flaxtl.errors import UserError
from flaxtl.models import common
from flaxtl.models import tv_common as tv
from tests import torch_oracle

# The families traced by tv_common (the ViT taps through common.Taps; every
# arch's contract, ViTs included, is in test_contract.py).
TORCH_ARCHS = [
  a
  for a in models.names()
  if models.get(a).naming == "torch" and models.get(a).family != "vit"
]
# The smallest arch of each torch family.
SMALL = {
  "tv_resnet": "tv_resnet18",
  "tv_mobilenet_v2": "tv_mobilenet_v2",
  "tv_vgg": "tv_vgg16",
  "efficientnet_lite": "efficientnet_lite0",
  "tv_convnext": "tv_convnext_tiny",
  "tv_efficientnet": "tv_efficientnet_b0",
}


def _flax_record(run) -> tuple[list[str], list[str]]:
  """What `run()` made Flax call: the modules in the order their calls
  returned, and those of them that own parameters themselves."""
  returned: list[str] = []
  owners: list[str] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and module.path:
      path = "/".join(module.path)
      returned.append(path)
      params = module.variables.get("params", {})
      if any(not isinstance(v, Mapping) for v in params.values()):
        owners.append(path)
    return out

  with nn.intercept_methods(record):
    run()
  return list(dict.fromkeys(returned)), list(dict.fromkeys(owners))


def _recorded(spec, include_top=True, pooling=None):
  """Flax's record of the very pass that records the module order."""
  tv._recorded.cache_clear()  # So that the pass runs under the record.
  return _flax_record(lambda: spec.outputs(include_top, pooling))


def test_every_torch_family_is_covered():
  assert {models.get(a).family for a in TORCH_ARCHS} == set(SMALL)
  assert len(TORCH_ARCHS) >= 25


@pytest.mark.parametrize("arch", sorted(SMALL.values()))
def test_layer_list_is_the_parameter_owners_in_forward_order(arch):
  spec = models.get(arch)
  returned, owners = _recorded(spec)
  outputs = spec.outputs()
  # Every Flax module is a tapped module path, in the order it returned.
  assert [p for p in outputs if p in set(returned)] == returned
  assert spec.layers() == owners
  # Containers come right after their last child (torch's hook order).
  leaves = [
    p
    for i, p in enumerate(outputs)
    if not any(q.startswith(p + "/") for q in outputs[:i])
  ]
  assert tv.post_order(leaves) == outputs
  assert spec.feature_layer in spec.outputs(include_top=False)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_without_the_top_and_with_a_pool(family):
  spec = models.get(SMALL[family])
  for pooling in (None, "avg"):
    returned, owners = _recorded(spec, False, pooling)
    outputs = spec.outputs(False, pooling)
    assert [p for p in outputs if p in set(returned)] == returned
    assert spec.layers(False, pooling) == owners
    assert set(spec.layers(False, pooling)) < set(spec.layers())


@pytest.mark.parametrize("family", sorted(SMALL))
def test_a_cut_at_any_layer_has_no_later_parameters(family):
  spec = models.get(SMALL[family])
  outputs, layers = spec.outputs(False), spec.layers(False)
  n = len(outputs)
  for cut in sorted({outputs[i] for i in (0, n // 5, n // 2, n - 2)}):
    model = spec.create(include_top=False, output_layer=cut)
    params = common.variable_shapes(model, spec.min_size).get("params", {})
    owners = tree.layers(tree.paths(params))
    at = outputs.index(cut)
    want = [p for p in layers if outputs.index(p) <= at]
    assert sorted(owners) == sorted(want), cut


@pytest.fixture(scope="module")
def x():
  return torch_oracle.images(1, 32, seed=5)


@pytest.mark.parametrize("family", sorted(SMALL))
def test_return_layers_equal_separate_output_layer_runs(family, x):
  arch = SMALL[family]
  spec = models.get(arch)
  outputs = spec.outputs(False)
  early, late = outputs[len(outputs) // 3], outputs[(2 * len(outputs)) // 3]
  both = models.create(arch, include_top=False, return_layers=(late, early))
  # Built with return_layers: no parameters after the deepest one.
  cut = models.create(arch, include_top=False, output_layer=late)
  assert jax.tree.structure(
    common.variable_shapes(both, 32)
  ) == jax.tree.structure(common.variable_shapes(cut, 32))
  variables = common.init_variables(both, 32)
  got = both.apply(variables, x)
  assert set(got) == {early, late}  # Flax's apply returns dicts key-sorted.
  for name in (early, late):
    alone = models.create(arch, include_top=False, output_layer=name)
    want = alone.apply(variables, x)
    assert got[name].shape == want.shape
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want))


def test_return_layers_are_checked():
  spec = models.get("tv_resnet18")
  with pytest.raises(UserError, match="output_layer or return_layers, not"):
    common.variable_shapes(
      spec.create(output_layer="layer1", return_layers=("layer2",)), 32
    )
  with pytest.raises(UserError, match="return_layers 'layer9' is not a mod"):
    common.variable_shapes(spec.create(return_layers=("layer1", "layer9")), 32)
  with pytest.raises(UserError, match="non-empty tuple"):
    common.variable_shapes(spec.create(return_layers="layer1"), 32)
  with pytest.raises(UserError, match="unknown option"):
    spec.create(return_layer=("layer1",))


def test_taps_inside_a_larger_model_are_relative_to_the_backbone(x):
  class Wrapper(nn.Module):
    @nn.compact
    def __call__(self, x):
      backbone = models.create(
        "tv_resnet18", include_top=False, return_layers=("layer1", "layer2")
      )
      return backbone(x)

  wrapper = Wrapper()
  variables = common.init_variables(wrapper, 32)
  assert set(variables["params"]["ResNet_0"]) == {
    "conv1",
    "bn1",
    "layer1",
    "layer2",
  }
  got = wrapper.apply(variables, x)
  assert [v.shape for v in got.values()] == [(1, 8, 8, 64), (1, 4, 4, 128)]
