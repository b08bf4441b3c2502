"""Per-layer experiment: one trained BatchNorm layer, flaxtl vs PyTorch.

    python benchmarks/bn_train.py                 # the shapes below
    python benchmarks/bn_train.py --ynn off       # XLA's non-YNNPACK kernels

A BN layer in training mode (batch statistics, moving averages updated),
forward + the gradients of its input, scale and bias, on NHWC float32 maps of
the ResNet50 / MobileNetV2 shapes at 224, batch 8: flaxtl's `BatchNorm`
(two-pass variance, `use_fast_variance=False`) under `jax.jit`, and
`torch.nn.BatchNorm2d` channels_last through `torch.autograd.grad`, each in
its own process. Reported: the median wall ms and the least *process CPU* ms
per call (user + system of all threads), which a busy shared machine inflates
far less than wall time.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys
import time

import common
import numpy as np

SHAPES = (
  (8, 112, 112, 32),
  (8, 56, 56, 144),
  (8, 28, 28, 512),
  (8, 7, 7, 2048),
)
FRAMEWORKS = ("flaxtl", "torch")


def _timed(fn, reps: int = 7) -> dict:
  fn()
  fn()
  wall, cpu = [], []
  for _ in range(reps):
    t, c = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return {"wall_ms": 1e3 * float(np.median(wall)), "cpu_ms": 1e3 * min(cpu)}


def _arrays(shape, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = (3 + 2 * rng.standard_normal(shape)).astype(np.float32)
  return x, rng.standard_normal(shape).astype(np.float32)


def flaxtl_worker(ynn: str) -> None:
  import jax
  import jax.numpy as jnp

  from flaxtl.models.common import BatchNorm
  from flaxtl.ops import cpu

  options = cpu.compiler_options(ynn, 224)
  for shape in SHAPES:
    x, dy = (jnp.asarray(a) for a in _arrays(shape))
    bn = BatchNorm(momentum=0.99, epsilon=1e-3)
    v = bn.init(jax.random.PRNGKey(0), x)

    def step(params, stats, x, dy, bn=bn):
      def f(p, x):
        return bn.apply(
          {"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"]
        )

      _, vjp, upd = jax.vjp(f, params, x, has_aux=True)
      return vjp(dy), upd

    c = jax.jit(step).lower(v["params"], v["batch_stats"], x, dy)
    c = c.compile(options)
    r = _timed(
      lambda c=c, v=v, x=x, dy=dy: jax.block_until_ready(
        c(v["params"], v["batch_stats"], x, dy)
      )
    )
    common.emit({"shape": list(shape), "framework": "flaxtl", **r})


def torch_worker() -> None:
  import torch

  for shape in SHAPES:
    x, dy = _arrays(shape)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    xt = xt.contiguous(memory_format=torch.channels_last).requires_grad_()
    dyt = torch.from_numpy(dy).permute(0, 3, 1, 2)
    dyt = dyt.contiguous(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(shape[-1], eps=1e-3, momentum=0.01).train()

    def step(bn=bn, xt=xt, dyt=dyt):
      y = bn(xt)
      return torch.autograd.grad(y, (xt, *bn.parameters()), dyt)

    r = _timed(step)
    common.emit({"shape": list(shape), "framework": "torch", **r})


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
  ap.add_argument("--ynn", choices=("on", "off"), default="off")
  ap.add_argument("--out", default="bn_train.json")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    common.tune_malloc()
    if args.worker == "torch":
      torch_worker()
    else:
      flaxtl_worker(args.ynn)
    return
  records: list[dict] = []
  for fw in args.frameworks.split(","):
    print(f"[bn_train] {fw} ...", file=sys.stderr, flush=True)
    records += common.run_worker(
      Path(__file__), ["--worker", fw, "--ynn", args.ynn]
    )
  by = {(tuple(r["shape"]), r["framework"]): r for r in records if "shape" in r}
  rows = []
  for shape in SHAPES:
    f, t = by.get((shape, "flaxtl")), by.get((shape, "torch"))
    cells = [
      f"{r['wall_ms']:.2f} / {r['cpu_ms']:.2f}" if r else "-" for r in (f, t)
    ]
    ratio = f"{t['cpu_ms'] / f['cpu_ms']:.2f}x" if f and t else "-"
    rows.append([" x ".join(map(str, shape)), *cells, ratio])
  table = common.markdown_table(
    [
      "N x H x W x C",
      "flaxtl wall / cpu ms",
      "torch wall / cpu ms",
      "torch cpu / flaxtl cpu",
    ],
    rows,
  )
  path = common.write_json(
    args.out, {"env": common.env_info(), "records": records, "table": table}
  )
  print(table)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
