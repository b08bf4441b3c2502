"""One prepared accelerator check: the 224x224 freeze-8 VGG16 train step, images/s and fraction of peak.

    python benchmarks/gpu_check.py                         # on a GPU: batch 64, bf16, peak 989e12
    python benchmarks/gpu_check.py --peak 1979e12          # another chip's dense bf16 peak (FLOP/s)
    python benchmarks/gpu_check.py --smoke                 # CPU: batch 2, 2 timed steps, proves it runs

The step is flaxtl's own: `TransferModel(arch='vgg16', head='keras_top')` (fc1, fc2 and a new
10-class `predictions`), the first 8 Keras layers frozen, SGD nesterov 0.9 with masked clipping at 1.0
and grad-norm logging, `jax.jit(..., donate_argnums=0)`, compute dtype bf16 (params float32). The batch
is a resident, already preprocessed float32 array so only the step is timed.

FLOPs per step are counted analytically ("model FLOPs", as MFU is usually defined): the forward of
every layer, plus for each trainable layer its weight gradient, plus the input gradient of every
trainable layer after the first trainable one (nothing upstream of it needs a gradient). XLA's own
`cost_analysis()` count is reported alongside when the backend provides it.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

H100_BF16_DENSE = 989e12  # H100/H200 SXM dense bf16 tensor-core peak, FLOP/s.


def layer_flops(
  size: int = 224, num_classes: int = 10
) -> list[tuple[str, float]]:
  """(keras layer name, forward FLOPs per image) for VGG16 with the Keras top, 2 FLOPs per MAC."""
  from flaxtl.models import vgg

  out, s, cin = [], size, 3
  for b, (n, width) in enumerate(zip(vgg.BLOCKS["vgg16"], vgg.WIDTHS), start=1):
    for i in range(1, n + 1):
      out.append((f"block{b}_conv{i}", 2.0 * s * s * 9 * cin * width))
      cin = width
    s //= 2
  dims = [
    (s * s * cin, vgg.TOP_UNITS, "fc1"),
    (vgg.TOP_UNITS, vgg.TOP_UNITS, "fc2"),
    (vgg.TOP_UNITS, num_classes, "predictions"),
  ]
  out += [(name, 2.0 * a * b) for a, b, name in dims]
  return out


def step_flops_per_image(
  frozen: set[str], size: int = 224, num_classes: int = 10
) -> float:
  total, seen_trainable = 0.0, False
  for name, f in layer_flops(size, num_classes):
    total += f  # Forward.
    if name not in frozen:
      total += f  # Weight gradient.
      if seen_trainable:
        total += (
          f  # Input gradient (the first trainable layer's input needs none).
        )
      seen_trainable = True
  return total


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument(
    "--steps", type=int, default=20, help="timed steps per repetition"
  )
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument(
    "--dtype", default="bfloat16", choices=["bfloat16", "float32"]
  )
  ap.add_argument(
    "--peak",
    type=float,
    default=H100_BF16_DENSE,
    help="chip peak FLOP/s for --dtype",
  )
  ap.add_argument("--first-layers", type=int, default=8)
  ap.add_argument(
    "--smoke", action="store_true", help="tiny CPU run: batch 2, 2 steps, 1 rep"
  )
  ap.add_argument("--out", default="gpu_check.json")
  args = ap.parse_args()
  if args.smoke:
    args.batch, args.steps, args.reps = 2, 2, 1

  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import base
  from flaxtl import freeze, optim, steps
  from flaxtl.models.heads import TransferModel

  size, classes = 224, 10  # keras_top needs 224x224.
  device = jax.devices()[0]
  print(
    f"device: {device.platform} {device.device_kind} x{jax.device_count()}, jax {jax.__version__}",
    flush=True,
  )
  if device.platform == "cpu" and not args.smoke:
    print(
      "warning: no accelerator; the fraction of peak below is meaningless (use --smoke on CPU)",
      flush=True,
    )

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  model = TransferModel(
    arch="vgg16", head="keras_top", num_classes=classes, dtype=dtype
  )
  params = jax.jit(
    lambda k: model.init(k, jnp.zeros((1, size, size, 3)))["params"]
  )(jax.random.PRNGKey(0))
  rules = freeze.first_layers_rules(
    args.first_layers, params, arch="vgg16", include_top=True
  )
  plan = freeze.plan(params, rules)
  frozen = {p.split("/")[1] for p, s, _ in plan.rows if s == freeze.FROZEN}
  cfg = base.get_base().optim
  cfg.update(
    dict(
      name="sgd",
      lr=1e-3,
      momentum=0.9,
      nesterov=True,
      clip_norm=1.0,
      schedule="constant",
    )
  )
  tx, schedule = optim.make_optimizer(cfg, plan, 10_000)
  prepare = lambda x: x.astype(jnp.float32)
  kw = {"log_grad_norm": True}
  if "prepare" in inspect.signature(steps.make_train_step).parameters:
    kw["prepare"] = prepare
  else:  # Older signature: prepare_images with mode 'none' is the same identity on 224x224x3 floats.
    kw.update(image_size=size, preprocess="none")
  step = steps.make_train_step(model, tx, plan.trainable_mask(), schedule, **kw)
  state = steps.TrainState(
    jnp.zeros((), jnp.int32),
    params,
    jax.jit(tx.init)(params),
    jax.random.PRNGKey(1),
  )
  rng = np.random.default_rng(0)
  batch = {
    "image": jax.device_put(
      rng.uniform(-120, 140, (args.batch, size, size, 3)).astype(np.float32)
    ),
    "label": jax.device_put(
      rng.integers(0, classes, args.batch).astype(np.int32)
    ),
  }

  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  xla_flops = None
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    xla_flops = float(ca.get("flops")) if ca and ca.get("flops") else None
  except (
    Exception
  ):  # Not every backend implements it; the analytic count is the one reported.
    pass

  for _ in range(2):  # Warm-up: autotuning, allocator.
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  times = []
  for _ in range(args.reps):
    t = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t) / args.steps)
  step_s = float(np.median(times))
  flops = step_flops_per_image(frozen, size, classes) * args.batch
  achieved = flops / step_s
  result = {
    "device": f"{device.platform} {device.device_kind}",
    "devices": jax.device_count(),
    "jax": jax.__version__,
    "smoke": args.smoke,
    "batch": args.batch,
    "dtype": args.dtype,
    "frozen_layers": sorted(frozen),
    "compile_s": compile_s,
    "step_s": step_s,
    "step_times_s": times,
    "img_s": args.batch / step_s,
    "model_flops_per_step": flops,
    "xla_flops_per_step": xla_flops,
    "achieved_flop_s": achieved,
    "peak_flop_s": args.peak,
    "fraction_of_peak": achieved / args.peak,
    "loss": float(metrics["loss"]),
    "grad_norm": float(metrics.get("grad_norm", float("nan"))),
    "peak_rss_mb": common.peak_rss_mb(),
  }
  if not np.isfinite(result["loss"]):
    raise SystemExit(f"non-finite loss {result['loss']}: the step is broken")
  path = common.write_json(
    args.out if not args.smoke else "gpu_check_smoke.json", result
  )
  print(
    json.dumps(
      {k: v for k, v in result.items() if k != "step_times_s"}, indent=1
    )
  )
  print(
    f"\n{result['img_s']:.1f} img/s, {achieved / 1e12:.2f} TFLOP/s = {100 * result['fraction_of_peak']:.1f}% "
    f"of {args.peak / 1e12:.0f} TFLOP/s ({args.dtype}, batch {args.batch}); wrote {path}"
  )


if __name__ == "__main__":
  main()
