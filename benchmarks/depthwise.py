"""Per-layer experiment: depthwise convolutions on XLA:CPU vs PyTorch.

    python benchmarks/depthwise.py            # MobileNetV2 + EfficientNetB0
    python benchmarks/depthwise.py --ynn off  # XLA's Eigen convolutions
    python benchmarks/depthwise.py --forms grouped --frameworks flaxtl

Every distinct depthwise layer of MobileNetV2 and EfficientNetB0 at 224x224,
batch 8 ('same' padding, multiplier 1), timed alone: the median ms of the
forward and of forward + both gradients (input and kernel, as a full
fine-tune needs), as
  grouped  jax.lax.conv_general_dilated with feature_group_count=C (XLA's
           grouped convolution; what flaxtl ran before)
  taps     `flaxtl.ops.conv.depthwise_taps`, what flaxtl's models now run on
           CPU: the k*k shifted (strided) slices of the padded input, each
           times its per-channel weight, summed (elementwise work XLA fuses
           into one loop), with its written-out gradients (a custom VJP:
           the input gradient as taps of dy, the kernel gradient as k*k
           per-channel reductions)
  taps_ad  the same forward with JAX's autodiff gradients (before the VJP)
  torch    torch.nn.functional.conv2d(groups=C), channels_last (oneDNN),
           in its own process; backward through `torch.autograd.grad`
with the largest difference of `taps` to `grouped` relative to the largest
|output|. Each shape also gets its share of the layers' FLOPs. The totals row
sums the per-layer times: what all depthwise layers of one forward cost.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
import sys
import time

import common
import numpy as np

# (name, batch, map size, channels, kernel, stride): every distinct depthwise
# layer shape of Keras' MobileNetV2 (mnv2) and EfficientNetB0 (effb0) at 224.
# `count` is how many layers of that model have the shape.
SHAPES = (
  ("mnv2", 8, 112, 32, 3, 1, 1),
  ("mnv2", 8, 112, 96, 3, 2, 1),
  ("mnv2", 8, 56, 144, 3, 1, 1),
  ("mnv2", 8, 56, 144, 3, 2, 1),
  ("mnv2", 8, 28, 192, 3, 1, 2),
  ("mnv2", 8, 28, 192, 3, 2, 1),
  ("mnv2", 8, 14, 384, 3, 1, 4),
  ("mnv2", 8, 14, 576, 3, 1, 2),
  ("mnv2", 8, 14, 576, 3, 2, 1),
  ("mnv2", 8, 7, 960, 3, 1, 3),
  ("effb0", 8, 112, 32, 3, 1, 1),
  ("effb0", 8, 112, 96, 3, 2, 1),
  ("effb0", 8, 56, 144, 3, 1, 1),
  ("effb0", 8, 56, 144, 5, 2, 1),
  ("effb0", 8, 28, 240, 5, 1, 1),
  ("effb0", 8, 28, 240, 3, 2, 1),
  ("effb0", 8, 14, 480, 3, 1, 2),
  ("effb0", 8, 14, 480, 5, 1, 1),
  ("effb0", 8, 14, 672, 5, 1, 2),
  ("effb0", 8, 14, 672, 5, 2, 1),
  ("effb0", 8, 7, 1152, 5, 1, 3),
  ("effb0", 8, 7, 1152, 3, 1, 1),
)
FORMS = ("grouped", "taps_ad", "taps")
FRAMEWORKS = ("flaxtl", "torch")


def _arrays(n, size, c, k, stride, seed: int = 0):
  """Input, kernel (k, k, 1, c) and output cotangent, float32 NHWC."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, size, size, c), np.float32)
  w = rng.standard_normal((k, k, 1, c), np.float32) / k
  out = -(-size // stride)
  dy = rng.standard_normal((n, out, out, c), np.float32)
  return x, w, dy


def _shape_key(shape) -> str:
  model, n, size, c, k, stride, _ = shape
  return f"{model} {n}x{size}x{size}x{c} k{k} s{stride}"


# --- JAX forms ----------------------------------------------------------------


def grouped(x, w, stride: int):
  import jax

  return jax.lax.conv_general_dilated(
    x,
    w,
    (stride, stride),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
  )


def taps(x, w, stride: int):
  from jax import lax

  from flaxtl.ops import conv as conv_ops

  pads = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], (stride,) * 2, "SAME")
  return conv_ops.depthwise_taps(x, w, (stride, stride), pads)


def taps_ad(x, w, stride: int):
  from jax import lax

  from flaxtl.ops import conv as conv_ops

  pads = lax.padtype_to_pads(x.shape[1:3], w.shape[:2], (stride,) * 2, "SAME")
  return conv_ops.depthwise_taps_autodiff(x, w, (stride, stride), pads)


def _grads(f, stride, x, w, dy):
  """Input and kernel gradients of f(x, w, stride) for the cotangent dy."""
  import jax

  return jax.vjp(lambda a, b: f(a, b, stride), x, w)[1](dy)


def flaxtl_worker(forms, ynn: str, budget: float) -> None:
  import jax
  import jax.numpy as jnp

  from flaxtl.ops import cpu

  # 224 px: 'auto' would also turn YNNPACK off here.
  options = cpu.compiler_options(ynn, 224)
  fns = {"grouped": grouped, "taps_ad": taps_ad, "taps": taps}
  for shape in SHAPES:
    _, n, size, c, k, stride, _ = shape
    x, w, dy = (jnp.asarray(a) for a in _arrays(n, size, c, k, stride))
    ref = None
    for form in forms:
      f = fns[form]
      fwd = (
        jax.jit(lambda x, w, f=f, s=stride: f(x, w, s))
        .lower(x, w)
        .compile(options)
      )
      grads = (
        jax.jit(functools.partial(_grads, f, stride))
        .lower(x, w, dy)
        .compile(options)
      )
      t_fwd = common.time_fn(
        lambda fwd=fwd, x=x, w=w: fwd(x, w).block_until_ready(),
        budget_s=budget,
      )
      t_train = common.time_fn(
        lambda g=grads, x=x, w=w, dy=dy: jax.block_until_ready(g(x, w, dy)),
        budget_s=budget,
      )
      y = np.asarray(fwd(x, w))
      ref = y if ref is None else ref
      err = float(np.abs(y - ref).max() / np.abs(ref).max())
      common.emit(
        {
          "shape": _shape_key(shape),
          "form": form,
          "fwd_ms": 1e3 * t_fwd["median_s"],
          "train_ms": 1e3 * t_train["median_s"],
          "other_cpu": max(t_fwd["other_cpu"], t_train["other_cpu"]),
          "contended": t_fwd["contended"] or t_train["contended"],
          "err_vs_first_form": err,
          "xla_options": options or {},
        }
      )


# --- PyTorch ------------------------------------------------------------------


def torch_worker(budget: float) -> None:
  import torch

  for shape in SHAPES:
    _, n, size, c, k, stride, _ = shape
    x, w, dy = _arrays(n, size, c, k, stride)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    xt = xt.contiguous(memory_format=torch.channels_last).requires_grad_()
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_()
    dyt = torch.from_numpy(dy).permute(0, 3, 1, 2)
    dyt = dyt.contiguous(memory_format=torch.channels_last)
    # torch's symmetric padding k // 2 gives TF 'SAME' shapes for odd k; a
    # stride-2 layer pads one more row/column on the top-left than 'SAME'
    # does, the same work.
    pad = k // 2

    def fwd(xt=xt, wt=wt, s=stride, pad=pad):
      with torch.no_grad():
        return torch.nn.functional.conv2d(
          xt, wt, stride=s, padding=pad, groups=xt.shape[1]
        )

    def train(xt=xt, wt=wt, s=stride, pad=pad, dyt=dyt):
      y = torch.nn.functional.conv2d(
        xt, wt, stride=s, padding=pad, groups=xt.shape[1]
      )
      return torch.autograd.grad(y, (xt, wt), dyt)

    t_fwd = common.time_fn(fwd, warmup=2, budget_s=budget)
    t_train = common.time_fn(train, warmup=2, budget_s=budget)
    common.emit(
      {
        "shape": _shape_key(shape),
        "form": "torch",
        "fwd_ms": 1e3 * t_fwd["median_s"],
        "train_ms": 1e3 * t_train["median_s"],
        "other_cpu": max(t_fwd["other_cpu"], t_train["other_cpu"]),
        "contended": t_fwd["contended"] or t_train["contended"],
        "threads": torch.get_num_threads(),
      }
    )


# --- driver -------------------------------------------------------------------


def summarise(records: list[dict], forms: list[str]) -> str:
  by = {(r["shape"], r["form"]): r for r in records if "shape" in r}

  def cell(shape, form):
    r = by.get((_shape_key(shape), form))
    if r is None:
      return "-"
    star = "*" if r["contended"] else ""
    err = r.get("err_vs_first_form")
    err_s = f" ({err:.0e})" if err is not None and form != forms[0] else ""
    return f"{r['fwd_ms']:.2f} / {r['train_ms']:.2f}{star}{err_s}"

  header = ["model", "batch x map x C, kernel, stride", "layers", *forms]
  rows, totals = [], {}
  for shape in SHAPES:
    model, n, size, c, k, stride, count = shape
    rows.append(
      [
        model,
        f"{n} x {size}x{size} x {c}, {k}x{k}, s{stride}",
        str(count),
        *[cell(shape, f) for f in forms],
      ]
    )
    for f in forms:
      r = by.get((_shape_key(shape), f))
      if r:
        t = totals.setdefault((model, f), [0.0, 0.0])
        t[0] += count * r["fwd_ms"]
        t[1] += count * r["train_ms"]
  for model in dict.fromkeys(s[0] for s in SHAPES):
    cells = []
    for f in forms:
      t = totals.get((model, f))
      cells.append(f"**{t[0]:.1f} / {t[1]:.1f}**" if t else "-")
    rows.append([model, "all depthwise layers of one step", "", *cells])
  return (
    "ms per call, forward / forward + both gradients; (err) = max |form - "
    f"{forms[0]}| / max |{forms[0]}|\n\n"
    + common.markdown_table(header, rows)
    + "\n\n"
    + common.STAR_NOTE
  )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--forms", default=",".join(FORMS))
  ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
  ap.add_argument(
    "--ynn",
    choices=("on", "off"),
    default="on",
    help="XLA:CPU YNNPACK convs for the JAX forms (flaxtl's 'auto' is off "
    "at 224)",
  )
  ap.add_argument("--budget", type=float, default=1.0)
  ap.add_argument("--out", default="depthwise.json")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args()
  forms = args.forms.split(",")
  if args.worker:
    common.tune_malloc()  # Both frameworks, as their *_tuned rows.
    if args.worker == "torch":
      torch_worker(args.budget)
    else:
      flaxtl_worker(forms, args.ynn, args.budget)
    return
  records: list[dict] = []
  meta: dict = {}
  for fw in args.frameworks.split(","):
    common.wait_for_quiet()
    print(f"[depthwise] {fw} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    recs = common.run_worker(
      Path(__file__),
      [
        "--worker",
        fw,
        "--forms",
        args.forms,
        "--ynn",
        args.ynn,
        "--budget",
        str(args.budget),
      ],
    )
    records += recs
    meta[fw] = {"wall_s": time.perf_counter() - t}
  shown = [f for f in forms if "flaxtl" in args.frameworks]
  shown += ["torch"] if "torch" in args.frameworks else []
  table = summarise(records, shown)
  path = common.write_json(
    args.out,
    {
      "env": common.env_info(),
      "ynn": args.ynn,
      "records": records,
      "meta": meta,
      "table": table,
    },
  )
  print(table)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
