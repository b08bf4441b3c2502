"""Convolutions in the form that runs fastest for their shape.

3x3 'same' convs on CPU (`conv_impl_for`, measured per layer by
benchmarks/conv_forms.py; tables in benchmarks/README.md): tiny maps as one
im2col matmul (XLA:CPU's convolution is slow on 2x2 and 4x4 maps), large
float32 maps with many channels as Winograd F(2x2, 3x3) (2.25x fewer
multiplies), everything else as XLA's convolution. Depthwise convs on CPU
(`conv_general_dilated`, benchmarks/depthwise.py) as a sum of shifted slices.
GPU and TPU always get XLA's convolution.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "direct", "im2col", "winograd")
_IM2COL_MAX_PIXELS = 16


def conv_impl_for(
  h: int,
  w: int,
  cin: int,
  platform: str | None = None,
  dtype: Any = jnp.float32,
) -> str:
  """The "auto" choice for a 3x3 conv on an (h, w, cin) map in `dtype`."""
  if (platform or jax.default_backend()) != "cpu":
    return "direct"
  if h * w <= _IM2COL_MAX_PIXELS:
    return "im2col"
  # float32 only: XLA:CPU runs Winograd's bfloat16 matmuls at half the speed.
  big_enough = (
    min(h, w) >= 28 and cin >= 128 and (cin >= 256 or min(h, w) >= 56)
  )
  if jnp.dtype(dtype) == jnp.float32 and big_enough:
    return "winograd"
  return "direct"


def direct_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def im2col_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  n, h, w, cin = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # (kh, kw, cin) order matches the HWIO kernel reshaped to (9*cin, cout).
  patches = jnp.concatenate(
    [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)],
    axis=-1,
  )
  y = patches.reshape(n * h * w, 9 * cin) @ kernel.reshape(9 * cin, -1)
  return y.reshape(n, h, w, -1)


# Winograd F(2x2, 3x3) (Lavin & Gray, 2015): a 4x4 input tile d and the 3x3
# kernel g give the 2x2 output tile A^T [(G g G^T) * (B^T d B)] A.
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _combine(terms: Sequence[jax.Array], coeffs: Sequence[float]) -> jax.Array:
  """sum_i coeffs[i] * terms[i], skipping zeros (XLA fuses it into one pass)."""
  return sum(c * t if c != 1 else t for c, t in zip(coeffs, terms) if c)


def _winograd_f23(x: jax.Array, kernel: jax.Array) -> jax.Array:
  n, h, w, cin = x.shape
  th, tw = -(-h // 2), -(-w // 2)  # Output tiles; an odd edge is padded.
  xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
  # V = B^T d B for all tiles at once, separably: tile rows are strided slices.
  rows = [xp[:, i : i + 2 * th : 2] for i in range(4)]
  v_rows = [_combine(rows, _BT[p]) for p in range(4)]
  v = jnp.stack(
    [
      _combine([r[:, :, j : j + 2 * tw : 2] for j in range(4)], _BT[q])
      for r in v_rows
      for q in range(4)
    ]
  )  # (16, n, th, tw, cin)
  g = jnp.asarray(_G, kernel.dtype)
  u = jnp.einsum("pi,ijco,qj->pqco", g, kernel, g).reshape(16, cin, -1)
  m = jnp.einsum("tpc,tco->tpo", v.reshape(16, n * th * tw, cin), u)
  m = m.reshape(4, 4, n, th, tw, -1)
  y_rows = [_combine(list(m), _AT[r]) for r in range(2)]  # Y = A^T M A.
  y = jnp.stack(
    [jnp.stack([_combine(list(yr), _AT[s]) for s in range(2)]) for yr in y_rows]
  )
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th, 2 * tw, -1)
  return y[:, :h, :w]


@jax.custom_vjp
def winograd_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 'same' conv by Winograd F(2x2, 3x3), forward and input gradient.

  The input gradient is itself a 3x3 'same' conv (of dy with the kernel flipped
  and its channel axes swapped), so it runs as Winograd too. The kernel
  gradient is XLA's convolution: autodiff through the transforms is slower.
  """
  return _winograd_f23(x, kernel)


def _winograd_fwd(x, kernel):
  return _winograd_f23(x, kernel), (x, kernel)


def _winograd_bwd(residuals, dy):
  x, kernel = residuals
  dx = _winograd_f23(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
  dkernel = jax.vjp(lambda k: direct_conv(x, k), kernel)[1](dy)[0]
  return dx, dkernel


winograd_conv.defvjp(_winograd_fwd, _winograd_bwd)

_CONVS = {
  "direct": direct_conv,
  "im2col": im2col_conv,
  "winograd": winograd_conv,
}


def conv3x3(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
  """x (N, H, W, Cin) * HWIO kernel (3, 3, Cin, Cout), 'same', stride 1."""
  if impl == "auto":
    _, h, w, cin = x.shape
    impl = conv_impl_for(h, w, cin, dtype=x.dtype)
  return _CONVS[impl](x, kernel)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """MaxPooling2D(2, 2), 'valid' (an odd last row/column is dropped).

  Reshape + max rather than `nn.max_pool`: same values, but its gradient is a
  compare-and-select that fuses, where reduce_window's is XLA:CPU's slow
  select-and-scatter (benchmarks/README.md).
  """
  n, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


_NHWC = ("NHWC", "HWIO", "NHWC")


def depthwise_taps(
  x: jax.Array,
  kernel: jax.Array,
  strides: Sequence[int],
  pads: Sequence[tuple[int, int]],
) -> jax.Array:
  """Depthwise conv (multiplier 1) as the sum of its k*k shifted slices.

  x (N, H, W, C), kernel (kh, kw, 1, C), explicit (low, high) pads. Each tap
  is a strided slice of the padded input times a per-channel weight: one
  fused elementwise loop, where XLA:CPU's grouped convolution runs 10-20x
  slower (benchmarks/README.md, "Depthwise"). Sums in float32. The gradients
  are written out (`_depthwise_bwd`): autodiff through the strided slices
  pads dy back to the input's size once per tap.
  """
  strides = tuple(int(s) for s in strides)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  return _depthwise(x, kernel, strides, pads)


def depthwise_taps_autodiff(
  x: jax.Array,
  kernel: jax.Array,
  strides: Sequence[int],
  pads: Sequence[tuple[int, int]],
) -> jax.Array:
  """`depthwise_taps` with JAX's own gradients (for benchmarks/depthwise.py)."""
  return _depthwise_fwd_value(x, kernel, tuple(strides), tuple(pads))


def _pad_hw(x: jax.Array, pads: Sequence[tuple[int, int]]) -> jax.Array:
  """Pads (or, negative, crops) the H and W axes of an NHWC array."""
  cfg = ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0))
  return lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _acc(dtype: Any) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _taps_sum(
  xp: jax.Array,
  kernel: jax.Array,
  strides: tuple[int, int],
  out_hw: tuple[int, int],
) -> jax.Array:
  """sum_ij xp[:, i + sh*p, j + sw*q] * kernel[i, j], in kernel's dtype."""
  (sh, sw), (oh, ow) = strides, out_hw
  out = None
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      tap = xp[
        :, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw
      ]
      term = tap.astype(kernel.dtype) * kernel[i, j]
      out = term if out is None else out + term
  return out


def _out_hw(x_shape, kernel_shape, strides, pads) -> tuple[int, int]:
  return tuple(
    (x_shape[1 + d] + sum(pads[d]) - kernel_shape[d]) // strides[d] + 1
    for d in range(2)
  )


def _depthwise_fwd_value(x, kernel, strides, pads):
  out_hw = _out_hw(x.shape, kernel.shape, strides, pads)
  k = kernel[:, :, 0].astype(_acc(x.dtype))
  return _taps_sum(_pad_hw(x, pads), k, strides, out_hw).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, kernel, strides, pads):
  return _depthwise_fwd_value(x, kernel, strides, pads)


def _depthwise_fwd(x, kernel, strides, pads):
  return _depthwise_fwd_value(x, kernel, strides, pads), (x, kernel)


def _depthwise_bwd(strides, pads, residuals, dy):
  """The input gradient as taps of dy, the kernel gradient as k*k reductions.

  Input: the padded input's position p = i + s*o receives dy[o] * w[i] for
  every tap i = p (mod s), so each of the s*s phases p = r + s*q is a
  stride-1 depthwise conv of dy with the sub-kernel w[r::s] flipped; the
  phases are then interleaved and the padding cropped. Kernel: tap (i, j)'s
  weight gradient is the per-channel sum of its input slice times dy.
  """
  x, kernel = residuals
  acc = _acc(x.dtype)
  n, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  out_hw = dy.shape[1:3]
  k = kernel[:, :, 0].astype(acc)
  dya = dy.astype(acc)
  sizes = (h, w)
  # Phase rows q cover the padded input up to the last row dx keeps.
  qs = tuple(-(-(pads[d][0] + sizes[d]) // strides[d]) for d in range(2))
  phases = []
  for rh in range(strides[0]):
    row = []
    for rw in range(strides[1]):
      sub = k[rh :: strides[0], rw :: strides[1]]
      th, tw = sub.shape[:2]
      if th == 0 or tw == 0:
        row.append(jnp.zeros((n, *qs, c), acc))
        continue
      dyp = _pad_hw(
        dya, ((th - 1, qs[0] - out_hw[0]), (tw - 1, qs[1] - out_hw[1]))
      )
      row.append(_taps_sum(dyp, jnp.flip(sub, (0, 1)), (1, 1), qs))
    phases.append(row)
  if strides == (1, 1):
    dxp = phases[0][0]
  else:
    dxp = jnp.stack([jnp.stack(row, 3) for row in phases], 2)
    dxp = dxp.reshape(n, qs[0] * strides[0], qs[1] * strides[1], c)
  crop = tuple(
    (-pads[d][0], sizes[d] + pads[d][0] - dxp.shape[1 + d]) for d in range(2)
  )
  dx = _pad_hw(dxp, crop).astype(x.dtype)
  xp = _pad_hw(x, pads)
  (sh, sw), (oh, ow) = strides, out_hw
  # Tap (i, j)'s products summed over the batch, all taps side by side on
  # the channel axis, then over rows and columns.
  per_tap = [
    _fold_sum(
      xp[
        :, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw
      ].astype(acc)
      * dya,
      0,
    )
    for i in range(kh)
    for j in range(kw)
  ]
  dk = _fold_sum(_fold_sum(jnp.concatenate(per_tap, -1), 1), 2)
  return dx, dk.reshape(kh, kw, 1, c).astype(kernel.dtype)


def _fold_sum(p: jax.Array, axis: int, k: int = 8) -> jax.Array:
  """Sum over `axis` (kept, size 1) as sums of k slices, not a reduce op.

  XLA:CPU rewrites a large reduce into a reduce-window that runs 5-10x slower
  than these fused elementwise adds (benchmarks/depthwise.py, 'taps_ad').
  """
  while p.shape[axis] > 1:
    m = p.shape[axis]
    k_ = min(k, m)
    h = -(-m // k_)
    if h * k_ != m:
      widths = [(0, 0)] * p.ndim
      widths[axis] = (0, h * k_ - m)
      p = jnp.pad(p, widths)
    acc = lax.slice_in_dim(p, 0, h, axis=axis)
    for i in range(1, k_):
      acc = acc + lax.slice_in_dim(p, i * h, (i + 1) * h, axis=axis)
    p = acc
  return p


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  **kwargs: Any,
) -> jax.Array:
  """`lax.conv_general_dilated`, with CPU depthwise convs as `depthwise_taps`.

  A drop-in for `nn.Conv(conv_general_dilated=...)`: a 2D NHWC conv with one
  group per input channel, one output channel per group and no dilation runs
  as taps on CPU; everything else (and every other platform) is lax's.
  """
  c = lhs.shape[-1]
  is_depthwise = (
    lhs.ndim == 4
    and feature_group_count == c > 1
    and rhs.shape[2:] == (1, c)
    and not any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    and kwargs.get("preferred_element_type") is None
    and jax.default_backend() == "cpu"
  )
  if not is_depthwise:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      **kwargs,
    )
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(
      lhs.shape[1:3], rhs.shape[:2], window_strides, padding
    )
  return depthwise_taps(lhs, rhs, window_strides, padding)
