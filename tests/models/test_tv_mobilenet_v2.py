"""tv_mobilenet_v2 against torchvision: logits, names, module paths."""

import jax
import pytest

from flaxtl import models, tree
from flaxtl.models import common
from flaxtl.weights import convert, torch_file
from flaxtl.weights.mappings import tv_common
from tests import torch_oracle


@pytest.fixture(scope="module")
def torch_model(torch, torchvision):
  torch.manual_seed(0)
  model = torchvision.models.mobilenet_v2(weights=None)
  torch_oracle.perturb_batch_norm(torch, model)
  return model


def test_legacy_file_converts_to_torchs_logits(torch, torch_model, tmp_path):
  path = torch_oracle.save(
    torch, torch_model.state_dict(), tmp_path / "mb.pth", "torch_legacy"
  )
  converted = convert.to_variables(torch_file.read(path))
  assert converted.arch == "tv_mobilenet_v2" and converted.include_top
  x = torch_oracle.images(2, 64)
  model = models.create("tv_mobilenet_v2")
  ours = jax.jit(model.apply)(converted.variables, x)
  err = torch_oracle.max_rel_err(
    ours, torch_oracle.logits(torch, torch_model, x)
  )
  assert err < torch_oracle.PARITY, err
  # Features of any module, e.g. an inverted residual's depthwise stage.
  feats = models.create(
    "tv_mobilenet_v2", include_top=False, output_layer="features/7/conv/1"
  ).apply(converted.variables, x)
  assert feats.shape == (2, 4, 4, 192)


def test_names_shapes_and_module_paths_match_torchvision(torch, torchvision):
  with torch.device("meta"):
    model = torchvision.models.mobilenet_v2()
  params = {k: tuple(v.shape) for k, v in model.named_parameters()}
  spec = models.get("tv_mobilenet_v2")
  layers = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in params))
  assert [n.replace("/", ".") for n in spec.layers()] == layers
  shapes = common.variable_shapes(spec.create(), 32)
  for collection, tensors in shapes.items():
    for path, s in tree.flatten(tensors).items():
      key = tv_common.torch_key(path, collection)
      want = tuple(model.state_dict()[key].shape)
      leaf = path.rsplit("/", 1)[1]
      assert tv_common.to_torch_shape(tuple(s.shape), leaf) == want, path
  names = {n.replace(".", "/") for n, _ in model.named_modules() if n}
  assert set(spec.outputs()) == names and len(spec.outputs()) == len(names)
  assert spec.feature_layer == "features" and "features" in spec.outputs(False)
