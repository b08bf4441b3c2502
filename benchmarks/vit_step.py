"""ViT forward and full fine-tune step: flaxtl vs timm in PyTorch, fp32.

    python benchmarks/vit_step.py    # vit_small / vit_base_patch16_224
    python benchmarks/vit_step.py --archs vit_small_patch16_224 --batch 8

Cases, each (framework, arch, case) in its own process so that peak RSS is
per run, side by side in one run:
  forward   inference logits (the 1000-way head), batch 8 at 224x224.
  finetune  one training step of everything: the class token into a new
            10-way linear head, cross entropy, SGD lr 1e-3 nesterov 0.9,
            gradient clipping at 1.0 over the trainable parameters.
- flaxtl: the step the trainer builds (`setup.build_model`, `freeze_plan`,
  `train_step`, jit with donation), the forward `jax.jit(model.apply)`.
- torch: `timm.create_model(arch, num_classes=...)`, `.eval()` +
  `torch.no_grad()` for the forward; `.train()`, `clip_grad_norm_`,
  `optimizer.step()`, `.item()` on the loss for the step.
Random weights (no dropout in these archs). Ratios are torch time / flaxtl
time (> 1: flaxtl faster) and flaxtl peak RSS / torch's.
"""

from __future__ import annotations

import argparse
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))

from benchmarks import common

ARCHS = ("vit_small_patch16_224", "vit_base_patch16_224")
CASES = ("forward", "finetune")
FRAMEWORKS = ("flaxtl", "torch")


def flaxtl_case(arch: str, case: str, size: int, batch: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import base
  from flaxtl import models
  from flaxtl.train import config as config_lib
  from flaxtl.train import setup, steps

  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  t0 = time.perf_counter()
  if case == "forward":
    model = models.get(arch).create(include_top=True)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    compiled = jax.jit(model.apply).lower(variables, x).compile()
    compile_s = time.perf_counter() - t0

    def run():
      jax.block_until_ready(compiled(variables, x))

  else:
    c = base.get_base()
    c.model.arch, c.model.weights, c.model.head = arch, "none", "linear"
    c.model.pooling, c.image_size = "token", size
    c.optim.name, c.optim.lr, c.optim.momentum = "sgd", 1e-3, 0.9
    c.optim.nesterov, c.optim.clip_norm = True, 1.0
    config_lib.validate(c)
    model = setup.build_model(c, 10)
    v = jax.jit(setup.init_fn(model, size))(jax.random.PRNGKey(0))
    params, stats = v["params"], v.get("batch_stats", {})
    plan = setup.freeze_plan(c, params, 0, log_matches=False)
    tx, step, options = setup.train_step(
      c, model, plan, 1000, lambda a: a.astype(jnp.float32), stats
    )
    state = steps.TrainState(
      jnp.zeros((), jnp.int32),
      params,
      stats,
      tx.init(params),
      jax.random.PRNGKey(1),
    )
    data = {"image": x, "label": rng.integers(0, 10, batch).astype(np.int32)}
    compiled = (
      jax.jit(step, donate_argnums=0)
      .lower(state, data)
      .compile(options or None)
    )
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run():
      s, m = compiled(holder[0], data)
      jax.block_until_ready((s, m))
      holder[0] = s

  return _timed(run, compile_s)


def torch_case(arch: str, case: str, size: int, batch: int) -> dict:
  from benchmarks import archs

  archs.torchvision()  # timm imports it; its compiled ops do not load here.
  import timm
  import torch

  torch.manual_seed(0)
  x = torch.randn(batch, 3, size, size)
  t0 = time.perf_counter()
  if case == "forward":
    model = timm.create_model(arch, pretrained=False, img_size=size).eval()

    def run():
      with torch.no_grad():
        model(x)

  else:
    model = timm.create_model(
      arch, pretrained=False, img_size=size, num_classes=10
    ).train()
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(
      model.parameters(), lr=1e-3, momentum=0.9, nesterov=True
    )
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(model(x), y)
      loss.backward()
      norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      loss.item(), norm.item()

  return _timed(run, time.perf_counter() - t0)


def _timed(run, setup_s: float) -> dict:
  res = common.time_fn(run, warmup=1, reps=5, min_reps=3, budget_s=8.0)
  return {
    "setup_s": round(setup_s, 2),
    "step_s": res["median_s"],
    "other_cpu": res["other_cpu"],
    "contended": res["contended"],
    "peak_rss_mb": round(common.peak_rss_mb(), 1),
  }


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--archs", default=",".join(ARCHS))
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    fw, arch, case = args.worker
    fn = flaxtl_case if fw == "flaxtl" else torch_case
    out = fn(arch, case, args.size, args.batch)
    common.emit({"framework": fw, "arch": arch, "case": case, **out})
    return
  size_args = ["--size", str(args.size), "--batch", str(args.batch)]
  results: dict = {}
  for arch in args.archs.split(","):
    for case in args.cases.split(","):
      for fw in args.frameworks.split(","):
        recs = common.run_worker(
          __import__("pathlib").Path(__file__),
          ["--worker", fw, arch, case, *size_args],
        )
        for r in recs:
          print(r, flush=True)
          if "error" not in r:
            results[(fw, arch, case)] = r
  rows = []
  for arch in args.archs.split(","):
    for case in args.cases.split(","):
      f, t = (
        results.get(("flaxtl", arch, case)),
        results.get(("torch", arch, case)),
      )
      if not (f and t):
        continue
      rows.append(
        [
          arch,
          case,
          common.fmt(f["step_s"] * 1e3),
          common.fmt(t["step_s"] * 1e3),
          common.fmt_ratio(t["step_s"] / f["step_s"]),
          common.fmt(f["peak_rss_mb"], 0),
          common.fmt(t["peak_rss_mb"], 0),
          common.fmt_ratio(f["peak_rss_mb"] / t["peak_rss_mb"]),
          "yes" if f["contended"] or t["contended"] else "no",
        ]
      )
  print(
    common.markdown_table(
      [
        "arch",
        "case",
        "flaxtl ms",
        "torch ms",
        "speed (torch/flaxtl)",
        "flaxtl RSS MB",
        "torch RSS MB",
        "RSS (flaxtl/torch)",
        "contended",
      ],
      rows,
    )
  )
  common.write_json(
    "vit_step.json",
    {
      "env": common.env_info(),
      "batch": args.batch,
      "size": args.size,
      "results": [
        {"framework": k[0], "arch": k[1], "case": k[2], **v}
        for k, v in results.items()
      ],
    },
  )


if __name__ == "__main__":
  main()
