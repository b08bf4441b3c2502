"""Resampling a ViT's position table the way each source's framework does.

NumPy, float64 inside, as separable (out, in) interpolation matrices:
- `bicubic`: PyTorch's `F.interpolate(mode='bicubic', align_corners=False,
  antialias=False)` (timm, Hugging Face ViT / DeiT / Dinov2 / CLIP /
  SigLIP, ONNX Resize cubic a=-0.75 half_pixel): Keys' cubic a=-0.75,
  edge samples clamped.
- `bicubic_aa`: the same with `antialias=True` (HF Dinov2WithRegisters):
  PyTorch's separate path, a=-0.5 (as PIL), the kernel widened by the
  scale when shrinking, weights normalised.
- `linear_zoom`: big_vision / AugReg's `scipy.ndimage.zoom(order=1)`: the
  corner samples map onto the corners (align_corners=True).
"""

from __future__ import annotations

import math

import numpy as np

from flaxtl.errors import UserError
from flaxtl.weights.vit_arch import (
  BICUBIC_TORCH,
  BICUBIC_TORCH_AA,
  LINEAR_ZOOM,
  VitArch,
)

METHODS = {
  BICUBIC_TORCH: "bicubic",
  BICUBIC_TORCH_AA: "bicubic_aa",
  LINEAR_ZOOM: "linear_zoom",
}


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  return np.where(
    x <= 1,
    ((a + 2) * x - (a + 3)) * x * x + 1,
    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0),
  )


def _bicubic(n_in: int, n_out: int) -> np.ndarray:
  w = np.zeros((n_out, n_in))
  scale = n_in / n_out
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    x0 = math.floor(src)
    t = src - x0
    for off in (-1, 0, 1, 2):
      j = min(max(x0 + off, 0), n_in - 1)
      w[i, j] += _cubic(np.array(t - off), -0.75)
  return w


def _bicubic_aa(n_in: int, n_out: int) -> np.ndarray:
  scale = n_in / n_out
  # PyTorch's antialiased path: a=-0.5 even when enlarging; the kernel
  # widens by the scale only when shrinking.
  stretch = max(scale, 1.0)
  support = 2.0 * stretch
  w = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    j = np.arange(lo, hi)
    k = _cubic((j - center + 0.5) / stretch, -0.5)
    w[i, lo:hi] = k / k.sum()
  return w


def _linear_zoom(n_in: int, n_out: int) -> np.ndarray:
  w = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    x0 = min(math.floor(src), n_in - 1)
    x1 = min(x0 + 1, n_in - 1)
    t = src - x0
    w[i, x0] += 1 - t
    w[i, x1] += t
  return w


MATRICES = {
  "bicubic": _bicubic,
  "bicubic_aa": _bicubic_aa,
  "linear_zoom": _linear_zoom,
}


def resample_grid(
  grid: np.ndarray, size: tuple[int, int], method: str
) -> np.ndarray:
  """A (H, W, D) table resampled to `size`, by one of METHODS' values."""
  method = METHODS.get(method, method)
  if method not in MATRICES:
    raise UserError(
      f"unknown position-embedding resampling {method!r}; expected one of "
      f"{sorted(MATRICES)}"
    )
  h, w = grid.shape[:2]
  if (h, w) == tuple(size):
    return grid
  wy, wx = MATRICES[method](h, size[0]), MATRICES[method](w, size[1])
  out = np.einsum("ah,hwd,bw->abd", wy, grid.astype(np.float64), wx)
  return out.astype(grid.dtype)


def resample_pos_embed(
  pos_embed: np.ndarray, arch: VitArch, img_size: int | tuple[int, int]
) -> np.ndarray:
  """timm's (1, T, D) `pos_embed` of `arch` for another input size, with
  the source's own interpolation (`arch.posemb_resize`); prefix-token
  positions are kept as they are."""
  hw = (img_size, img_size) if isinstance(img_size, int) else img_size
  if any(s % arch.patch_size for s in hw):
    raise UserError(
      f"input size {hw} is not a multiple of the patch ({arch.patch_size})"
    )
  n = 0 if arch.no_embed_class else int(arch.class_token) + int(arch.dist_token)
  prefix, grid = pos_embed[:, :n], pos_embed[0, n:]
  old = arch.img_size // arch.patch_size
  grid = grid.reshape(old, old, -1)
  new = resample_grid(
    grid,
    (hw[0] // arch.patch_size, hw[1] // arch.patch_size),
    arch.posemb_resize,
  )
  return np.concatenate([prefix, new.reshape(1, -1, new.shape[-1])], 1)
