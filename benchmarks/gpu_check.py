"""One accelerator check: the 224x224 freeze-8 VGG16 train step, img/s, % peak.

    python benchmarks/gpu_check.py                 # GPU: batch 64, bf16
    python benchmarks/gpu_check.py --peak 1979e12  # another chip's bf16 peak
    python benchmarks/gpu_check.py --smoke         # CPU: batch 2, 2 steps

The step is the trainer's own, from a `configs/base.py` config: VGG16 with
its Keras top (fc1, fc2 and a new 10-class `predictions`), the first 8 Keras
layers frozen, SGD nesterov 0.9 with masked clipping at 1.0 and grad-norm
logging (`flaxtl.train.setup.train_step`), `jax.jit(..., donate_argnums=0)`,
compute dtype bf16 (params float32). The batch is a resident, already
preprocessed float32 array so only the step is timed.

FLOPs per step are counted analytically ("model FLOPs", as MFU is usually
defined): the forward of every layer, plus for each trainable layer its
weight gradient, plus the input gradient of every trainable layer after the
first trainable one (nothing upstream of it needs a gradient). XLA's own
`cost_analysis()` count is reported alongside when the backend provides it.
"""

from __future__ import annotations

import argparse
import json
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from flaxtl import models
from flaxtl.models import vgg
from flaxtl.train import freeze, setup, steps

H100_BF16_DENSE = 989e12  # H100/H200 SXM dense bf16 peak, FLOP/s.
SIZE, CLASSES = 224, 10  # The Keras top needs 224x224.


def layer_flops(
  size: int = SIZE, num_classes: int = CLASSES
) -> list[tuple[str, float]]:
  """(Keras layer, forward FLOPs per image) of VGG16 with its top (2/MAC)."""
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
  frozen: set[str], size: int = SIZE, num_classes: int = CLASSES
) -> float:
  total, seen_trainable = 0.0, False
  for name, f in layer_flops(size, num_classes):
    total += f  # Forward.
    if name not in frozen:
      total += f  # Weight gradient.
      if seen_trainable:  # The first trainable layer needs no input gradient.
        total += f
      seen_trainable = True
  return total


def _config(first_layers: int, dtype: str):
  config = base.get_base()
  config.image_size = SIZE
  config.model.head = "keras_top"
  config.model.weights = "none"
  config.model.dtype = dtype
  config.freeze.first_layers = first_layers
  config.optim.update(
    {
      "name": "sgd",
      "lr": 1e-3,
      "momentum": 0.9,
      "nesterov": True,
      "clip_norm": 1.0,
      "schedule": "constant",
    }
  )
  config.log_grad_norm = True
  return config


def _xla_flops(compiled) -> float | None:
  """XLA's own FLOP count, where the backend implements cost_analysis()."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # Backend-specific; the analytic count is the one used.
    return None
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca["flops"]) if ca and ca.get("flops") else None


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
  ap.add_argument(
    "--out",
    default=None,
    help="JSON under results/ (or an absolute path); default "
    "gpu_check.json, or gpu_check_smoke.json with --smoke",
  )
  args = ap.parse_args()
  if args.smoke:
    args.batch, args.steps, args.reps = 2, 2, 1

  device = jax.devices()[0]
  print(
    f"device: {device.platform} {device.device_kind} x{jax.device_count()}, "
    f"jax {jax.__version__}",
    flush=True,
  )
  if device.platform == "cpu" and not args.smoke:
    print(
      "warning: no accelerator; the fraction of peak below is meaningless "
      "(use --smoke on CPU)",
      flush=True,
    )

  config = _config(args.first_layers, args.dtype)
  model = setup.build_model(config, CLASSES)
  variables = jax.jit(lambda: models.init_variables(model, SIZE))()
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  plan = setup.freeze_plan(config, params, args.first_layers, log_matches=False)
  frozen = {p.split("/")[1] for p, s, _ in plan.rows if s == freeze.FROZEN}
  tx, step, options = setup.train_step(
    config, model, plan, 10_000, lambda x: x.astype(jnp.float32), batch_stats
  )
  state = steps.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=jax.jit(tx.init)(params),
    rng=jax.random.PRNGKey(1),
  )
  rng = np.random.default_rng(0)
  images = rng.uniform(-120, 140, (args.batch, SIZE, SIZE, 3))
  labels = rng.integers(0, CLASSES, args.batch)
  batch = {
    "image": jax.device_put(images.astype(np.float32)),
    "label": jax.device_put(labels.astype(np.int32)),
  }

  t0 = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=0).lower(state, batch)
  compiled = lowered.compile(options)
  compile_s = time.perf_counter() - t0
  xla_flops = _xla_flops(compiled)

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
  flops = step_flops_per_image(frozen) * args.batch
  achieved = flops / step_s
  result = {
    "device": f"{device.platform} {device.device_kind}",
    "devices": jax.device_count(),
    "jax": jax.__version__,
    "smoke": args.smoke,
    "batch": args.batch,
    "dtype": args.dtype,
    "frozen_layers": sorted(frozen),
    "xla_options": options or {},
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
  out = args.out or ("gpu_check_smoke.json" if args.smoke else "gpu_check.json")
  path = common.write_json(out, result)
  shown = {k: v for k, v in result.items() if k != "step_times_s"}
  print(json.dumps(shown, indent=1))
  print(
    f"\n{result['img_s']:.1f} img/s, {achieved / 1e12:.2f} TFLOP/s = "
    f"{100 * result['fraction_of_peak']:.1f}% of {args.peak / 1e12:.0f} "
    f"TFLOP/s ({args.dtype}, batch {args.batch}); wrote {path}"
  )


if __name__ == "__main__":
  main()
