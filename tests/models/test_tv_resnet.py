"""tv_resnet against torchvision and timm: names, shapes, logits.

torch builds the model (random weights, BN statistics perturbed) and writes
it; flaxtl converts the file and must give torch's logits on the same images.
"""

import jax
import pytest

from flaxtl import models, tree, weights
from flaxtl.errors import UserError
from flaxtl.models import common, tv_resnet
from flaxtl.weights import torch_file
from flaxtl.weights.mappings import tv_resnet as mapping
from tests import torch_oracle

SIZE = 64


@pytest.fixture(scope="module")
def resnet18(torch, torchvision):
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None)
  torch_oracle.perturb_batch_norm(torch, model)
  x = torch_oracle.images(2, SIZE)
  return model, x, torch_oracle.logits(torch, model, x)


@pytest.fixture(scope="module")
def apply18():
  model = models.create("tv_resnet18")
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


@pytest.mark.parametrize("layout", torch_oracle.LAYOUTS)
def test_resnet18_file_converts_to_torchs_logits(
  torch, resnet18, apply18, tmp_path, layout
):
  model, x, want = resnet18
  src = torch_oracle.save(torch, model.state_dict(), tmp_path / "r18", layout)
  out = weights.convert_file(src, tmp_path / "ckpt")  # Arch inferred.
  prov = weights.read_provenance(out)
  assert prov["arch"] == "tv_resnet18" and prov["layout"] == layout
  assert prov["include_top"] and prov["num_classes"] == 1000
  variables = weights.restore_variables(out)
  assert set(variables) == {"params", "batch_stats"}
  err = torch_oracle.max_rel_err(apply18(variables, x), want)
  assert err < torch_oracle.PARITY, err


def test_timm_resnet50_in_a_wrapped_data_parallel_checkpoint(
  torch, timm, tmp_path
):
  torch.manual_seed(1)
  model = timm.create_model("resnet50", pretrained=False, num_classes=10)
  torch_oracle.perturb_batch_norm(torch, model, seed=1)
  state = {f"module.{k}": v for k, v in model.state_dict().items()}
  torch.save({"state_dict": state, "epoch": 90}, tmp_path / "timm.pth.tar")
  w = torch_file.read(tmp_path / "timm.pth.tar")
  assert mapping.detect(w) == "tv_resnet50"
  converted, _ = weights.load_file(tmp_path / "timm.pth.tar")
  assert converted.num_classes == 10
  x = torch_oracle.images(2, 32, seed=1)
  ours = models.create("tv_resnet50", num_classes=10).apply(
    converted.variables, x
  )
  err = torch_oracle.max_rel_err(ours, torch_oracle.logits(torch, model, x))
  assert err < torch_oracle.PARITY, err


@pytest.mark.parametrize("arch", sorted(tv_resnet.ARCHS))
def test_names_and_shapes_match_torchvision(torch, torchvision, arch):
  with torch.device("meta"):  # Names and shapes, no memory.
    model = getattr(torchvision.models, arch[3:])()
  params = dict(model.named_parameters())
  layers = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in params))
  assert [n.replace("/", ".") for n in models.get(arch).layers()] == layers
  shapes = common.variable_shapes(models.create(arch), 32)
  flat = tree.flatten(shapes["params"])
  for path, s in flat.items():
    layer, leaf = path.rsplit("/", 1)
    t = params[
      layer.replace("/", ".") + (".bias" if leaf == "bias" else ".weight")
    ]
    want = tuple(t.shape)
    got = tuple(s.shape)
    if leaf == "kernel" and len(got) == 4:
      got = (got[3], got[2], got[0], got[1])
    elif leaf == "kernel":
      got = got[::-1]
    assert got == want, path
  assert len(flat) == len(params)
  stats = tree.flatten(shapes["batch_stats"])
  assert len(stats) == sum(1 for k in model.state_dict() if "running" in k)


def test_output_layers_stop_early_without_later_params(resnet18, apply18):
  spec = models.get("tv_resnet18")
  names = spec.outputs()
  assert names[:5] == ["conv1", "bn1", "relu", "maxpool", "layer1/0/conv1"]
  assert (
    names.index("layer1/0")
    < names.index("layer1")
    < names.index("layer2/0/conv1")
  )
  assert "layer2/0/downsample" in names and names[-2:] == ["avgpool", "fc"]
  model = spec.create(include_top=False, output_layer="layer2/0/bn1")
  shapes = common.variable_shapes(model, SIZE)["params"]
  assert set(shapes) == {"conv1", "bn1", "layer1", "layer2"}
  assert set(shapes["layer2"]) == {"0"}
  assert set(shapes["layer2"]["0"]) == {"conv1", "bn1"}
  feats = spec.create(include_top=False, pooling="avg").apply(
    common.init_variables(spec.create(include_top=False), SIZE),
    resnet18[1],
  )
  assert feats.shape == (2, 512)
  with pytest.raises(UserError, match="output_layer 'layer9' is not a module"):
    common.variable_shapes(spec.create(output_layer="layer9"), SIZE)


def test_wrong_arch_and_misshaped_tensors_are_named(torch, resnet18, tmp_path):
  model = resnet18[0]
  src = torch_oracle.save(
    torch, model.state_dict(), tmp_path / "r.pth", "torch_zip"
  )
  with pytest.raises(
    UserError, match="holds a tv_resnet18 model, not tv_resnet34"
  ):
    weights.load_file(src, "tv_resnet34")
  state = dict(model.state_dict())
  state["layer2.1.conv2.weight"] = state["layer2.1.conv2.weight"][:, :64]
  del state["layer3.0.bn1.running_var"]
  torch.save(state, tmp_path / "bad.pth")
  with pytest.raises(
    UserError, match=r"missing tensor\(s\) layer3\.0\.bn1\.running_var"
  ):
    weights.load_file(tmp_path / "bad.pth", "tv_resnet18")
  state["layer3.0.bn1.running_var"] = model.state_dict()[
    "layer3.0.bn1.running_var"
  ]
  torch.save(state, tmp_path / "bad.pth")
  with pytest.raises(
    UserError,
    match=r"layer2\.1\.conv2\.weight has shape \(128, 64, 3, 3\), "
    r"expected \(128, 128, 3, 3\)",
  ):
    weights.load_file(tmp_path / "bad.pth", "tv_resnet18")
