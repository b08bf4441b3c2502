"""Backbone forward (no top): flaxtl vs PyTorch vs Keras 3, fp32, bf16.

    python benchmarks/forward.py        # VGG16, ~4 minutes on 2 CPU cores
    python benchmarks/forward.py --cases 64x32 --dtypes fp32 \
      --frameworks flaxtl,torch
    python benchmarks/forward.py --arch mobilenetv2 --cases 224x8 \
      --dtypes fp32               # -> results/forward_mobilenetv2.json

Same input for everyone: a resident float32 NHWC batch of values in 0..255
(already preprocessed, so only the network is timed), random weights (glorot
for flaxtl/Keras, PyTorch's default; speed does not depend on the values).
Each framework runs in its own process (see common.run_worker); each case gets
one warm-up call (compilation), then the median of up to 5 calls in ~4 s.

- flaxtl: `flaxtl.models.create('vgg16', include_top=False, dtype=...)` under
  `jax.jit`, params float32 (bf16 casts them inside). Other archs
  (`--arch`, benchmarks/archs.py): `include_top=False, pooling='avg'`, BN in
  inference mode (`train=False`).
- *_tuned: the same in a process that first calls `common.tune_malloc()`;
  flaxtl_tuned also compiles with flaxtl's own XLA options for the image size
  (`flaxtl.train.setup.compiler_options`, as feature caching and predict do).
- torch: the same 13 convs in plain torch.nn, channels_last,
  `torch.inference_mode`; bf16 via `torch.autocast('cpu', torch.bfloat16)`.
  Other archs: the torchvision model with its classifier replaced by
  Identity (pooled features), `eval()`, channels_last.
- keras: `keras.applications.VGG16(weights=None, include_top=False)` on the
  JAX backend, `predict_on_batch`; bf16 via the 'mixed_bfloat16' policy.
  Other archs: the keras.applications model, `pooling='avg'`.

Each worker imports its framework inside its own function, so a torch process
never loads jax (nor the other way round): one framework's threads and
allocator would otherwise disturb the other's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import sys
import time

import archs
import common
import numpy as np

FRAMEWORKS = (
  "flaxtl",
  "flaxtl_tuned",
  "torch",
  "torch_tuned",
  "keras",
  "keras_tuned",
)
# Not run by default: flaxtl with --options but without tune_malloc (isolates
# the XLA options).
EXTRA_FRAMEWORKS = ("flaxtl_xla",)
CASES = ("224x8", "64x32", "32x64")  # "{size}x{batch}"
DTYPES = ("fp32", "bf16")
# VGG16's conv stack, for the PyTorch copy.
BLOCKS, WIDTHS = (2, 2, 3, 3, 3), (64, 128, 256, 512, 512)


def parse_case(case: str) -> tuple[int, int]:
  size, batch = case.split("x")
  return int(size), int(batch)


def _images(size: int, batch: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  return rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)


# --- workers: one framework per process ---------------------------------------


def flaxtl_cases(
  arch: str,
  cases,
  dtypes,
  budget: float,
  options: dict | None,
  ynn: str,
  conv_impl: str,
) -> None:
  """options: XLA compile options; None: the trainer's choice under `ynn`."""
  import jax
  import jax.numpy as jnp

  from configs import base
  from flaxtl import models
  from flaxtl.ops import conv as conv_ops
  from flaxtl.train import setup

  config = base.get_base()
  config.model.arch = arch
  config.xla_cpu_ynn = ynn
  config.model.conv_impl = conv_impl
  build = {"conv_impl": conv_impl} if arch == "vgg16" else {"pooling": "avg"}
  for case in cases:
    size, batch = parse_case(case)
    config.image_size = size
    x = jnp.asarray(_images(size, batch))
    # float32 params for both dtypes: a bf16 model casts them inside.
    fp32_model = models.create(arch, include_top=False, **build)
    params = models.init_variables(fp32_model, size)
    for dt in dtypes:
      dtype = "bfloat16" if dt == "bf16" else "float32"
      opts = options
      if opts is None:
        opts = setup.compiler_options(config, dtype=dtype) or {}
      model = models.create(
        arch,
        include_top=False,
        dtype=jnp.bfloat16 if dt == "bf16" else jnp.float32,
        **build,
      )
      t0 = time.perf_counter()
      fn = (
        jax.jit(lambda v, x, model=model: model.apply(v, x, train=False))
        .lower(params, x)
        .compile(opts or None)
      )
      compile_s = time.perf_counter() - t0
      res = common.time_fn(
        lambda fn=fn, p=params, x=x: fn(p, x).block_until_ready(),
        budget_s=budget,
      )
      common.emit(
        {
          "case": case,
          "dtype": dt,
          "img_s": batch / res["median_s"],
          "compile_s": compile_s,
          "xla_options": opts,
          "conv_impl": conv_impl,
          "im2col_max_pixels": conv_ops._IM2COL_MAX_PIXELS,
          **res,
        }
      )


def torch_vgg16_features(torch):
  """VGG16's conv stack (torchvision's `features`) in plain torch.nn."""
  layers, cin = [], 3
  for n, width in zip(BLOCKS, WIDTHS):
    for _ in range(n):
      layers += [
        torch.nn.Conv2d(cin, width, 3, padding=1),
        torch.nn.ReLU(inplace=True),
      ]
      cin = width
    layers.append(torch.nn.MaxPool2d(2))
  return torch.nn.Sequential(*layers)


def torch_cases(arch: str, cases, dtypes, budget: float) -> None:
  import torch

  if arch == "vgg16":
    model = torch_vgg16_features(torch).eval()
  else:
    model = archs.torch_model(arch, head=False).eval()
  model = model.to(memory_format=torch.channels_last)
  for case in cases:
    size, batch = parse_case(case)
    x = torch.from_numpy(_images(size, batch)).permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=torch.channels_last)
    for dt in dtypes:

      def run(dt=dt, x=x):
        with (
          torch.inference_mode(),
          torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == "bf16"),
        ):
          return model(x)

      # Two warm-up calls: oneDNN picks its kernels on the first.
      res = common.time_fn(run, warmup=2, budget_s=budget)
      common.emit(
        {
          "case": case,
          "dtype": dt,
          "img_s": batch / res["median_s"],
          "threads": torch.get_num_threads(),
          **res,
        }
      )


def keras_cases(arch: str, cases, dtypes, budget: float) -> None:
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import keras

  for dt in dtypes:
    policy = "mixed_bfloat16" if dt == "bf16" else "float32"
    keras.config.set_dtype_policy(policy)
    for case in cases:
      size, batch = parse_case(case)
      if arch == "vgg16":
        model = keras.applications.VGG16(
          weights=None, include_top=False, input_shape=(size, size, 3)
        )
      else:
        model = archs.keras_model(arch, size)
      x = _images(size, batch)
      t0 = time.perf_counter()
      model.predict_on_batch(x)  # Traces and compiles the predict step.
      compile_s = time.perf_counter() - t0
      res = common.time_fn(
        lambda model=model, x=x: model.predict_on_batch(x), budget_s=budget
      )
      common.emit(
        {
          "case": case,
          "dtype": dt,
          "img_s": batch / res["median_s"],
          "first_call_s": compile_s,
          **res,
        }
      )
      keras.backend.clear_session()


def worker(
  name: str,
  arch: str,
  cases,
  dtypes,
  budget: float,
  options: dict | None,
  conv_impl: str,
) -> None:
  base, tuned = name.removesuffix("_tuned"), name.endswith("_tuned")
  if tuned:
    common.tune_malloc()  # Before the framework's first allocation.
  if base == "flaxtl":
    # Stock: XLA's defaults (xla_cpu_ynn='on'); tuned: as the trainer runs.
    ynn = "auto" if tuned else "on"
    flaxtl_cases(
      arch, cases, dtypes, budget, options if tuned else None, ynn, conv_impl
    )
  elif base == "flaxtl_xla":
    flaxtl_cases(arch, cases, dtypes, budget, options, "auto", conv_impl)
  elif base == "torch":
    torch_cases(arch, cases, dtypes, budget)
  elif base == "keras":
    keras_cases(arch, cases, dtypes, budget)
  else:
    raise SystemExit(f"unknown framework {name!r}")
  common.emit({"peak_rss_mb": common.peak_rss_mb()})


# --- driver -------------------------------------------------------------------


def _ratio_tables(fws, cases, ips, derived: dict) -> list[str]:
  """bf16 speed-up per framework, and the 32x32 vs 64x64 ratio."""
  out, rows2 = [], []
  for f in fws:
    for case in cases:
      r = common.ratio(ips(f, case, "bf16"), ips(f, case, "fp32"))
      if r is not None:
        derived[f"bf16_speedup/{f}@{case}"] = r
        rows2.append([f, case, common.fmt_ratio(r)])
  if rows2:
    table = common.markdown_table(["framework", "case", "bf16 / fp32"], rows2)
    out.append("bf16 / fp32 images/s:\n\n" + table)
  rows3 = []
  for f in fws:
    for dt in DTYPES:
      r = common.ratio(ips(f, "32x64", dt), ips(f, "64x32", dt))
      if r is not None:
        derived[f"32_over_64/{f}/{dt}"] = r
        rows3.append([f, dt, common.fmt_ratio(r)])
  if rows3:
    table = common.markdown_table(
      ["framework", "dtype", "32x32 / 64x64"], rows3
    )
    out.append(
      "images/s at 32x32 (batch 64) / images/s at 64x64 (batch 32):\n\n" + table
    )
  return out


def summarise(results: dict) -> tuple[str, dict]:
  """Markdown tables and the derived ratios."""

  def ips(fw, case, dt):
    r = results.get(fw, {}).get(f"{case}/{dt}")
    return r["img_s"] if r else None

  def mark(fw, case, dt):
    r = results.get(fw, {}).get(f"{case}/{dt}")
    return "*" if r and r.get("contended") else ""

  cases = sorted(
    {k.split("/")[0] for fw in results.values() for k in fw if "/" in k},
    key=lambda c: -parse_case(c)[0],
  )
  fws = [f for f in FRAMEWORKS + EXTRA_FRAMEWORKS if f in results]
  header = ["input, batch", "dtype", *[f"{f} img/s" for f in fws]]
  pairs = common.present_pairs(fws)
  header += [f"{a}/{b}" for a, b in pairs]
  rows, derived = [], {}
  for case in cases:
    size, batch = parse_case(case)
    for dt in DTYPES:
      if not any(ips(f, case, dt) for f in fws):
        continue
      row = [f"{size}x{size}, batch {batch}", dt]
      row += [common.fmt(ips(f, case, dt)) + mark(f, case, dt) for f in fws]
      row += common.ratio_cells(
        pairs,
        lambda f, case=case, dt=dt: ips(f, case, dt),
        f"{case}/{dt}",
        derived,
      )
      rows.append(row)
  out = [common.markdown_table(header, rows)]

  out += _ratio_tables(fws, cases, ips, derived)
  out.append(common.STAR_NOTE)
  return "\n\n".join(out), derived


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--arch",
    default="vgg16",
    help=f"vgg16 or one of {list(archs.ARCHS)} (benchmarks/archs.py)",
  )
  ap.add_argument(
    "--frameworks",
    default=None,
    help="default: all that build the arch (Keras has no tv_* models)",
  )
  ap.add_argument("--cases", default=",".join(CASES))
  ap.add_argument("--dtypes", default=",".join(DTYPES))
  ap.add_argument(
    "--budget",
    type=float,
    default=4.0,
    help="seconds of timed calls per measurement",
  )
  ap.add_argument(
    "--options",
    default="null",
    help="XLA options (JSON) for flaxtl_tuned and flaxtl_xla; default: "
    "flaxtl's own choice per image size",
  )
  ap.add_argument(
    "--conv-impl",
    default="auto",
    help="experiment: the VGG16 conv_impl option in the flaxtl workers",
  )
  ap.add_argument(
    "--im2col-max-pixels",
    type=int,
    default=None,
    help="experiment: override flaxtl.ops.conv._IM2COL_MAX_PIXELS in the "
    "flaxtl workers",
  )
  ap.add_argument(
    "--out", help="default: forward.json (VGG16), forward_<arch>.json"
  )
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.arch != "vgg16":
    archs.get(args.arch)  # Fails early on a typo.
  cases, dtypes = args.cases.split(","), args.dtypes.split(",")
  if args.worker:
    if args.im2col_max_pixels is not None:
      from flaxtl.ops import conv as conv_ops  # A flaxtl worker only.

      conv_ops._IM2COL_MAX_PIXELS = args.im2col_max_pixels
    worker(
      args.worker,
      args.arch,
      cases,
      dtypes,
      args.budget,
      json.loads(args.options),
      args.conv_impl,
    )
    return
  extra = ["--conv-impl", args.conv_impl]
  if args.im2col_max_pixels is not None:
    extra += ["--im2col-max-pixels", str(args.im2col_max_pixels)]

  fws = args.frameworks or ",".join(
    f
    for f in FRAMEWORKS
    if args.arch == "vgg16"
    or archs.get(args.arch).keras
    or not f.startswith("keras")
  )
  out = args.out or (
    "forward.json" if args.arch == "vgg16" else f"forward_{args.arch}.json"
  )
  results: dict[str, dict] = {}
  for fw in fws.split(","):
    common.wait_for_quiet()
    print(f"[forward] {fw} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    recs = common.run_worker(
      Path(__file__),
      [
        "--worker",
        fw,
        "--arch",
        args.arch,
        "--cases",
        args.cases,
        "--dtypes",
        args.dtypes,
        "--budget",
        str(args.budget),
        "--options",
        args.options,
        *extra,
      ],
    )
    results[fw] = {f"{r['case']}/{r['dtype']}": r for r in recs if "case" in r}
    results[fw]["_meta"] = {
      "wall_s": time.perf_counter() - t,
      **{k: v for r in recs if "case" not in r for k, v in r.items()},
    }
  table, derived = summarise(results)
  path = common.write_json(
    out,
    {
      "arch": args.arch,
      "env": common.env_info(),
      "tuned_options": json.loads(args.options),
      "results": results,
      "derived": derived,
      "table": table,
    },
  )
  print(table)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
