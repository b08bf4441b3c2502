"""PEFT train steps against the full fine-tune step of the same model.

    python benchmarks/peft_step.py                       # tv_resnet50, 224
    python benchmarks/peft_step.py --arch mobilenetv2 --size 96 --batch 16

Cases (each in its own process, so peak RSS is per case): `full` (everything
trains), `lora4` / `lora16` (LoRA r=4 / 16 on the default targets),
`bitfit`, `adapter`, `linear` (head only, backbone run every step). Every
case is the step the trainer builds (`setup.build_model`, `freeze_plan`,
`train_step`, jit with donation), Adam, random weights. Prints one JSON line
per case and the step-time and peak-RSS ratios against `full`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1]))

from benchmarks import common

CASES = {
  "full": {},
  "lora4": {"peft.method": "lora", "peft.rank": 4},
  "lora16": {"peft.method": "lora", "peft.rank": 16},
  "bitfit": {"peft.method": "bitfit"},
  "adapter": {"peft.method": "adapter"},
  "linear": {"freeze.rules": ((r"backbone/.*", "frozen"),)},
}


def case(arch: str, name: str, size: int, batch: int, budget: float) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import base
  from flaxtl import config_files
  from flaxtl.train import config as config_lib
  from flaxtl.train import setup, steps
  from flaxtl.train.summary import counts

  c = base.get_base()
  c.model.arch, c.model.weights, c.model.head = arch, "none", "linear"
  c.model.pooling, c.image_size, c.optim.name = "avg", size, "adam"
  for k, v in CASES[name].items():
    config_files.override(c, f"{k}={v!r}")
  config_lib.validate(c)
  model = setup.build_model(c, 10)
  v = jax.jit(setup.init_fn(model, size))(jax.random.PRNGKey(0))
  params, stats = v["params"], v.get("batch_stats", {})
  plan = setup.freeze_plan(c, params, 0, log_matches=False)
  tx, step, options = setup.train_step(
    c, model, plan, 1000, lambda x: x.astype(jnp.float32), stats
  )
  state = steps.TrainState(
    jnp.zeros((), jnp.int32),
    params,
    stats,
    tx.init(params),
    jax.random.PRNGKey(1),
  )
  rng = np.random.default_rng(0)
  data = {
    "image": rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32),
    "label": rng.integers(0, 10, batch).astype(np.int32),
  }
  t0 = time.perf_counter()
  compiled = (
    jax.jit(step, donate_argnums=0).lower(state, data).compile(options or None)
  )
  compile_s = time.perf_counter() - t0
  holder = [state]

  def run():
    s, m = compiled(holder[0], data)
    jax.block_until_ready((s, m))
    holder[0] = s

  res = common.time_fn(run, warmup=1, reps=7, budget_s=budget)
  n = counts(params, plan)
  return {
    "case": name,
    "arch": arch,
    "size": size,
    "batch": batch,
    "trainable": n["trainable"],
    "frozen": n["frozen"],
    "compile_s": round(compile_s, 2),
    "step_s": res["median_s"],
    "img_s": batch / res["median_s"],
    "peak_rss_mb": round(common.peak_rss_mb(), 1),
    "contended": res["contended"],
  }


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--arch", default="tv_resnet50")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--budget", type=float, default=6.0)
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    common.tune_malloc()
    out = case(args.arch, args.worker, args.size, args.batch, args.budget)
    print("RESULT " + json.dumps(out))
    return
  rows = []
  for name in args.cases.split(","):
    cmd = [sys.executable, __file__, "--worker", name]
    cmd += ["--arch", args.arch, "--size", str(args.size)]
    cmd += ["--batch", str(args.batch), "--budget", str(args.budget)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
      print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
      continue
    rows.append(json.loads(lines[-1][len("RESULT ") :]))
    print(json.dumps(rows[-1]), flush=True)
  full = next((r for r in rows if r["case"] == "full"), None)
  if full:
    for r in rows:
      print(
        f"{r['case']:8s} trainable {r['trainable']:>11,}  step "
        f"{r['step_s'] * 1e3:8.1f} ms  x{full['step_s'] / r['step_s']:.2f} "
        f"faster  peak RSS {r['peak_rss_mb'] / full['peak_rss_mb']:.2f}x"
        + ("  (contended)" if r["contended"] else "")
      )


if __name__ == "__main__":
  main()
