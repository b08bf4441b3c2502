"""Per-layer experiment: ways to compute VGG16's 3x3 convs on XLA:CPU.

    python benchmarks/conv_forms.py               # 64x64, batch 16, ~3 min
    python benchmarks/conv_forms.py --shapes 224  # 224x224, batch 8
    python benchmarks/conv_forms.py --ynn off     # XLA's Eigen convolutions

For each conv layer shape, the median ms of the forward and of forward + both
gradients (input and kernel, as a full fine-tune needs) for:
  direct   jax.lax.conv_general_dilated (XLA's convolution)
  im2col   one matmul over the 9 shifted copies
  kwcat    the 3 horizontal shifts concatenated on channels, then a 3x1 conv
  F23/F43  Winograd F(2x2,3x3) / F(4x4,3x3) (Lavin & Gray 2015): 2.25x / 4x
           fewer multiplies, the transforms written as strided slices and
           sums, the products as one batched matmul
and the largest difference to `direct` relative to its largest |output|.
These are the "what was tried" rows of benchmarks/README.md. flaxtl uses only
the forms that won there (`flaxtl.ops.conv.conv_impl_for`: im2col on maps of
4x4 and smaller, F23 on large float32 maps, direct otherwise); the copies here
are the experiment's, with autodiff gradients.
"""

from __future__ import annotations

import argparse

import common
import jax
import jax.numpy as jnp
import numpy as np

from flaxtl.ops import cpu

# Winograd matrices (B^T, G, A^T) for F(m x m, 3 x 3).
WINOGRAD = {
  2: (
    np.array(
      [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32
    ),
    np.array(
      [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32
    ),
    np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32),
  ),
  4: (
    np.array(
      [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
      ],
      np.float32,
    ),
    np.array(
      [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
      ],
      np.float32,
    ),
    np.array(
      [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
      ],
      np.float32,
    ),
  ),
}
SHAPES = {  # (batch, map size, cin, cout) of every distinct VGG16 conv.
  "64": [
    (16, 64, 3, 64),
    (16, 64, 64, 64),
    (16, 32, 64, 128),
    (16, 32, 128, 128),
    (16, 16, 128, 256),
    (16, 16, 256, 256),
    (16, 8, 256, 512),
    (16, 8, 512, 512),
    (16, 4, 512, 512),
  ],
  "224": [
    (8, 224, 64, 64),
    (8, 112, 128, 128),
    (8, 56, 256, 256),
    (8, 28, 512, 512),
    (8, 14, 512, 512),
  ],
}


def direct(x, k):
  return jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def im2col(x, k):
  n, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.concatenate(
    [xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], -1
  )
  y = patches.reshape(-1, 9 * c) @ k.reshape(9 * c, -1)
  return y.reshape(n, h, w, -1)


def kwcat(x, k):
  w, c = x.shape[2:]
  xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
  x3 = jnp.concatenate([xp[:, :, j : j + w] for j in range(3)], -1)
  return jax.lax.conv_general_dilated(
    x3,
    k.reshape(3, 1, 3 * c, -1),
    (1, 1),
    ((1, 1), (0, 0)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


def winograd(x, k, m: int):
  bt, g, at = WINOGRAD[m]
  a = m + 2  # Input tile size.
  n, h, w, c = x.shape
  th, tw = -(-h // m), -(-w // m)
  xp = jnp.pad(x, ((0, 0), (1, th * m + 1 - h), (1, tw * m + 1 - w), (0, 0)))

  def combine(rows, coeffs):  # sum_i coeffs[i] * rows[i], skipping zeros.
    return sum(float(cf) * r for cf, r in zip(coeffs, rows) if cf)

  # V = B^T d B for every tile, separably: rows first (strided slices), then
  # columns.
  rows = [xp[:, i : i + m * th : m] for i in range(a)]
  v_rows = [combine(rows, bt[p]) for p in range(a)]
  v = jnp.stack(
    [
      combine([vr[:, :, j : j + m * tw : m] for j in range(a)], bt[q])
      for vr in v_rows
      for q in range(a)
    ]
  )
  u = jnp.einsum("pi,ijco,qj->pqco", g, k, g)  # U = G g G^T.
  u = u.reshape(a * a, c, -1)
  prod = jnp.einsum("tnc,tco->tno", v.reshape(a * a, n * th * tw, c), u)
  prod = prod.reshape(a, a, n, th, tw, -1)
  y_rows = [combine(list(prod), at[r]) for r in range(m)]  # Y = A^T M A.
  y = jnp.stack(
    [
      jnp.stack([combine([yr[q] for q in range(a)], at[s]) for s in range(m)])
      for yr in y_rows
    ]
  )
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, -1)
  return y[:, :h, :w]


FORMS = {
  "direct": direct,
  "im2col": im2col,
  "kwcat": kwcat,
  "F23": lambda x, k: winograd(x, k, 2),
  "F43": lambda x, k: winograd(x, k, 4),
}


def _time_form(f, x, k, dy, ref, options, budget: float) -> tuple[float, ...]:
  """(forward s, forward + gradients s, max |f - ref| / max |ref|)."""
  fwd = jax.jit(f).lower(x, k).compile(options)
  grads = (
    jax.jit(lambda x, k, dy: jax.vjp(f, x, k)[1](dy))
    .lower(x, k, dy)
    .compile(options)
  )
  t_fwd = common.time_fn(lambda: fwd(x, k).block_until_ready(), budget_s=budget)
  t_train = common.time_fn(
    lambda: jax.block_until_ready(grads(x, k, dy)), budget_s=budget
  )
  err = float(jnp.abs(fwd(x, k) - ref).max() / jnp.abs(ref).max())
  return t_fwd["median_s"], t_train["median_s"], err


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", choices=sorted(SHAPES), default="64")
  ap.add_argument("--forms", default=",".join(FORMS))
  ap.add_argument(
    "--ynn",
    choices=("on", "off"),
    default="on",
    help="XLA:CPU YNNPACK convs (flaxtl: auto)",
  )
  ap.add_argument("--budget", type=float, default=1.0)
  args = ap.parse_args()
  cpu.tune_malloc()
  options = cpu.compiler_options(args.ynn, int(args.shapes))
  forms = args.forms.split(",")
  print(
    f"ms per call, forward / forward+grads, YNNPACK {args.ynn}; "
    "(err) = max |form - direct| / max |direct|"
  )
  print("| batch x map x cin -> cout | " + " | ".join(forms) + " |")
  print("|---" * (len(forms) + 1) + "|")
  rng = np.random.default_rng(0)
  for n, size, cin, cout in SHAPES[args.shapes]:
    x = jnp.asarray(rng.standard_normal((n, size, size, cin), np.float32))
    scale = np.sqrt(2 / (9 * cin))
    k = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * scale)
    dy = jnp.asarray(rng.standard_normal((n, size, size, cout), np.float32))
    ref = direct(x, k)
    cells = []
    for name in forms:
      t_fwd, t_train, err = _time_form(
        FORMS[name], x, k, dy, ref, options, args.budget
      )
      cells.append(f"{t_fwd * 1e3:.1f} / {t_train * 1e3:.1f} ({err:.0e})")
    shape = f"{n} x {size}x{size} x {cin} -> {cout}"
    print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
