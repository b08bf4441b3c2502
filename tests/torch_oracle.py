"""PyTorch as the oracle for the torch-named families (a test-only dependency).

torchvision 0.28's compiled ops do not load against the CPU torch wheel and
`import torchvision` fails in `torchvision._meta_registrations`; the model
definitions need none of it, so an empty module stands in for it
(REFERENCE.md section 6). Tests skip when torch is not installed.
"""

from pathlib import Path
import sys
import types

import numpy as np
import pytest


def torchvision_models():
  """`torchvision.models` (skips the test without torch/torchvision)."""
  pytest.importorskip("torch")
  sys.modules.setdefault(
    "torchvision._meta_registrations",
    types.ModuleType("torchvision._meta_registrations"),
  )
  return pytest.importorskip("torchvision").models


def perturb(net, seed: int = 0):
  """Moves every norm and LayerScale away from its initial values.

  BN running mean/var, BN and LayerNorm scale/bias, ConvNeXt's layer_scale
  (1e-6 at init would make every block an identity) become random, so a
  mapping that drops or transposes one of them shows in the outputs.
  """
  import torch

  g = torch.Generator().manual_seed(seed)

  def uniform(t, lo, hi):
    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g))

  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        uniform(m.running_mean, -0.5, 0.5)
        uniform(m.running_var, 0.5, 2.0)
      if isinstance(
        m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm)
      ):
        uniform(m.weight, 0.5, 1.5)
        uniform(m.bias, -0.3, 0.3)
      if isinstance(getattr(m, "layer_scale", None), torch.nn.Parameter):
        uniform(m.layer_scale, 0.3, 1.0)
  return net


LAYOUTS = ("torch_zip", "torch_legacy", "safetensors")


def save(net, out: Path, layout: str) -> Path:
  """Writes `net.state_dict()` as torch / safetensors write it."""
  import torch

  sd = net.state_dict()
  if layout == "safetensors":
    from safetensors.torch import save_file

    path = out / "model.safetensors"
    save_file(sd, path)
  else:
    path = out / f"model_{layout}.pth"
    zip_format = layout == "torch_zip"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
  return path


def state_dict(net) -> dict[str, np.ndarray]:
  """The state_dict as numpy arrays (what the torch file reader returns)."""
  return {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}


def meta_model(builder):
  """The model on torch's meta device: shapes only, nothing allocated."""
  import torch

  with torch.device("meta"):
    return builder().eval()


def forward_order(net, size: int) -> list[str]:
  """Module paths ('features/0/0') in the order their forward calls return."""
  import torch

  order: list[str] = []
  hooks = [
    m.register_forward_hook(
      lambda *_, name=name: order.append(name.replace(".", "/"))
    )
    for name, m in net.named_modules()
    if name
  ]
  device = next(net.parameters()).device
  with torch.no_grad():
    net(torch.empty(1, 3, size, size, device=device))
  for h in hooks:
    h.remove()
  return order


def nchw(x: np.ndarray):
  import torch

  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def rel_err(got, want) -> float:
  """max |got - want| relative to the largest magnitude of `want`."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def weights(tensors, name: str = "state_dict.pth"):
  """A state_dict as `torch_file.read` hands it to the mappings."""
  from flaxtl.weights.torch_file import TorchWeights

  return TorchWeights(Path(name), "in_memory", dict(tensors))
