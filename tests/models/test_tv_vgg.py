"""tv_vgg against torchvision: logits, the (C, H, W) flatten pitfall, names.

At 64x64 the last map is 2x2 and the adaptive pool spreads it over 7x7
unevenly, so fc1 sees different values per position: a converter that only
transposes fc1's weight (no row permutation) gives wrong logits, which the
test shows before checking that the real conversion matches torch.
"""

import jax
import numpy as np
import pytest

from flaxtl import models, tree
from flaxtl.models import common, tv_vgg
from flaxtl.weights import convert, torch_file
from flaxtl.weights.mappings import tv_common
from tests import torch_oracle

SIZE = 64


@pytest.fixture(scope="module")
def vgg16(torch, torchvision, module_tmp):
  torch.manual_seed(0)
  model = torchvision.models.vgg16(weights=None, num_classes=10)
  x = torch_oracle.images(2, SIZE)
  want = torch_oracle.logits(torch, model, x)
  path = module_tmp("vgg") / "vgg16.pth"
  torch.save(model.state_dict(), path)
  del model
  return torch_file.read(path), x, want


def test_vgg16_matches_torch_and_the_flatten_needs_the_permutation(vgg16):
  weights, x, want = vgg16
  assert convert.detect(weights) == "tv_vgg16"
  converted = convert.to_variables(weights)
  assert converted.num_classes == 10
  model = models.create("tv_vgg16", num_classes=10)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  err = torch_oracle.max_rel_err(apply(converted.variables, x), want)
  assert err < torch_oracle.PARITY, err
  # The pitfall: fc1's weight merely transposed, as for any other linear.
  naive = tv_common.convert(weights, "tv_vgg16", True, 10)
  naive_err = torch_oracle.max_rel_err(apply(naive.variables, x), want)
  assert naive_err > 0.05, naive_err
  fc1 = converted.variables["params"]["classifier"]["0"]["kernel"]
  np.testing.assert_array_equal(
    np.sort(fc1, axis=0),
    np.sort(weights.tensors["classifier.0.weight"].T, axis=0),
  )  # Same rows, reordered.


@pytest.mark.parametrize("arch", sorted(tv_vgg.CFGS))
def test_names_and_shapes_match_torchvision(torch, torchvision, arch):
  with torch.device("meta"):
    model = getattr(torchvision.models, arch[3:])()
  params = {k: tuple(v.shape) for k, v in model.named_parameters()}
  layers = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in params))
  assert [n.replace("/", ".") for n in models.get(arch).layers()] == layers
  shapes = tree.flatten(
    common.variable_shapes(models.create(arch), 32)["params"]
  )
  assert {tv_common.torch_key(p) for p in shapes} == set(params)
  for path, s in shapes.items():
    want = tv_common.to_torch_shape(tuple(s.shape), path.rsplit("/", 1)[1])
    assert want == params[tv_common.torch_key(path)], path
  # Every torch module can be an output; containers after their children.
  outputs = models.get(arch).outputs()
  names = {n.replace(".", "/") for n, _ in model.named_modules() if n}
  assert set(outputs) == names and len(outputs) == len(names)
  last = f"features/{len(tv_vgg._features(arch)) - 1}"
  assert outputs.index(last) + 1 == outputs.index("features")


def test_features_without_the_top():
  spec = models.get("tv_vgg16")
  model = spec.create(include_top=False, output_layer="features/16")
  shapes = common.variable_shapes(model, 32)["params"]
  assert sorted(shapes["features"], key=int) == [
    "0",
    "2",
    "5",
    "7",
    "10",
    "12",
    "14",
  ]
  assert spec.feature_layer in spec.outputs(include_top=False)
