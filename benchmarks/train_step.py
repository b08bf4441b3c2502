"""VGG16 train step (default 64x64, batch 16), fp32, SGD nesterov 0.9: flaxtl vs PyTorch vs Keras 3.

    python benchmarks/train_step.py                 # ~4 minutes on 2 CPU cores
    python benchmarks/train_step.py --cases freeze8,full --frameworks flaxtl,torch

Model everywhere: VGG16 without top, Flatten -> Dense(256, relu) -> Dense(10), random weights, cross
entropy on logits, lr 1e-3, global-norm clipping at 1.0 over the trainable parameters.

Cases:
  freeze8          first 8 Keras layers frozen (block1_conv1 ... block3_conv1), the rest trains.
  full             everything trains.
  frozen_backbone  all 13 convs frozen, only the head trains, backbone run every step.
  head_cached      flaxtl only: the head alone on precomputed block5_pool features (the
                   `model.cache_features` workflow), host batches sliced from a cached array.

- flaxtl: `TransferModel(arch='vgg16', head='mlp', hidden=(256,), ...)`, `freeze.first_layers_rules`,
  `optim.make_optimizer` (multi_transform + masked clipping), `steps.make_train_step` with grad-norm
  logging ON, `jax.jit(..., donate_argnums=0)` as flaxtl.train does. Also reports lower/compile seconds
  and the convolutions left in the compiled step.
- *_tuned: the same in a process that first calls `common.tune_malloc()`, so each framework is compared
  both stock and with the same settings. flaxtl_tuned is the step as `launch.py` runs it: malloc tuned
  (config.tune_malloc) and compiled with flaxtl.runtime.train_compiler_options (config.xla_cpu_ynn='auto':
  YNNPACK off while block1 trains).
- torch: the same layers in plain torch.nn (channels_last), `requires_grad_(False)` on frozen layers,
  `clip_grad_norm_` over the trainable params (its return value is the logged norm), `.item()` on
  loss and norm every step (what a logging loop does).
- keras: `keras.applications.VGG16(weights=None, include_top=False)` + the head, `layer.trainable=False`
  on `base.layers[:8]`, SGD(global_clipnorm=1.0), `train_on_batch`. Keras computes no grad norm to log.

Each (framework, case) runs in its own process so that peak RSS (max RSS) is per run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from pathlib import Path
import re
import sys
import time

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from forward import torch_vgg16_features

FRAMEWORKS = (
  "flaxtl",
  "flaxtl_tuned",
  "torch",
  "torch_tuned",
  "keras",
  "keras_tuned",
)
# Not run by default: flaxtl with --options but without tune_malloc (isolates the XLA options).
EXTRA_FRAMEWORKS = ("flaxtl_xla",)
CASES = ("freeze8", "full", "frozen_backbone", "head_cached")
FIRST_LAYERS = {
  "freeze8": 8,
  "full": 0,
  "frozen_backbone": 19,  # 19 = every layer of VGG16 no-top.
  "freeze4": 4,
}  # Not run by default: block1 frozen (used to choose the XLA:CPU options).
SIZE, BATCH, CLASSES, HIDDEN = 64, 16, 10, 256
LR, MOMENTUM, CLIP = 1e-3, 0.9, 1.0


def _batch(n: int | None = None, seed: int = 0):
  n = n or BATCH
  import numpy as np

  rng = np.random.default_rng(seed)
  x = rng.uniform(-120, 140, (n, SIZE, SIZE, 3)).astype(
    np.float32
  )  # Like caffe-preprocessed pixels.
  y = rng.integers(0, CLASSES, n).astype(np.int32)
  return x, y


# --- flaxtl ---------------------------------------------------------------------------------------


def _make_step(model, tx, mask, schedule, prepare, size: int):
  """`steps.make_train_step` across its two signatures (prepare= or image_size=/preprocess=)."""
  from flaxtl import steps

  kw = dict(log_grad_norm=True)
  if "prepare" in inspect.signature(steps.make_train_step).parameters:
    kw["prepare"] = prepare
  else:
    kw.update(image_size=size, preprocess="none")
  return steps.make_train_step(model, tx, mask, schedule, **kw)


def _optim_cfg():
  from configs import base

  cfg = base.get_base().optim
  cfg.update(
    dict(
      name="sgd",
      lr=LR,
      momentum=MOMENTUM,
      nesterov=True,
      clip_norm=CLIP,
      schedule="constant",
    )
  )
  return cfg


def flaxtl_case(case: str, budget: float, options: dict | None) -> dict:
  """options: XLA compile options; None = what flaxtl.train picks (config.xla_cpu_ynn='auto')."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from flaxtl import freeze, optim, steps
  from flaxtl.models.heads import TransferModel

  model = TransferModel(
    arch="vgg16",
    head="mlp",
    hidden=(HIDDEN,),
    activations=("relu",),
    dropout=(0.0,),
    num_classes=CLASSES,
  )
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))[
    "params"
  ]
  out: dict = {}
  if case == "head_cached":
    return _head_cached(model, params, budget, options)

  plan = freeze.plan(
    params,
    freeze.first_layers_rules(
      FIRST_LAYERS[case], params, arch="vgg16", include_top=False
    ),
  )
  tx, schedule = optim.make_optimizer(_optim_cfg(), plan, 10_000)
  step = _make_step(
    model,
    tx,
    plan.trainable_mask(),
    schedule,
    lambda x: x.astype(jnp.float32),
    SIZE,
  )
  state = steps.TrainState(
    jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(1)
  )
  x, y = _batch()
  batch = {
    "image": x,
    "label": y,
  }  # Host arrays: each call transfers them, as the training loop does.

  t0 = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=0).lower(state, batch)
  t1 = time.perf_counter()
  if options is None:
    from flaxtl import runtime

    options = (
      runtime.compiler_options("auto", SIZE, plan.trainable_paths()) or {}
    )
  out["xla_options"] = options
  compiled = lowered.compile(options or None)
  t2 = time.perf_counter()
  hlo = compiled.as_text()
  out.update(
    lower_s=t1 - t0,
    compile_s=t2 - t1,
    convolutions=len(re.findall(r"= \S+ convolution\(", hlo))
    + len(re.findall(r'custom_call_target="__onednn\$convolution', hlo)),
  )
  holder = [state]

  def run(n: int = 1):
    s = holder[0]
    for _ in range(n):
      s, metrics = compiled(s, batch)
    jax.block_until_ready((s, metrics))
    holder[0] = s
    return metrics

  t3 = time.perf_counter()
  metrics = run()
  out["first_step_s"] = time.perf_counter() - t3
  out["grad_norm_logged"] = "grad_norm" in metrics and bool(
    np.isfinite(metrics["grad_norm"])
  )
  res = common.time_fn(run, warmup=1, reps=7, budget_s=budget)
  out.update(img_s=BATCH / res["median_s"], **res)
  return out


def _head_cached(model, params, budget: float, options: dict) -> dict:
  """Head-only step on cached block5_pool features, plus the one-off extraction cost."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from flaxtl import freeze, optim, steps
  from flaxtl.models import heads
  from flaxtl.models.vgg import VGG

  # What the cache holds: block5_pool features of every image, computed once (batch 32 as features.py).
  extract_batch = 32
  backbone = VGG(arch="vgg16", include_top=False, output_layer="block5_pool")
  fwd = (
    jax.jit(lambda p, x: backbone.apply({"params": p}, x))
    .lower(params["backbone"], jnp.zeros((extract_batch, SIZE, SIZE, 3)))
    .compile(options or None)
  )
  xe, _ = _batch(extract_batch, seed=1)
  ext = common.time_fn(
    lambda: fwd(params["backbone"], xe).block_until_ready(), budget_s=budget
  )
  n_cached = 4096
  feats = np.asarray(fwd(params["backbone"], xe))
  feats = np.concatenate(
    [feats] * (n_cached // extract_batch)
  )  # (4096, 2, 2, 512) float32 on the host.
  labels = (
    np.random.default_rng(0).integers(0, CLASSES, n_cached).astype(np.int32)
  )

  # Built directly (not model.make_head()): outside apply a submodule made in an unbound method has no scope.
  head_model = heads.HeadOnly(
    heads.MLPHead((HIDDEN,), ("relu",), (0.0,), CLASSES), pooling=None
  )
  head_params = {"head": params["head"]}
  plan = freeze.plan(head_params)
  tx, schedule = optim.make_optimizer(_optim_cfg(), plan, 10_000)
  step = _make_step(
    head_model,
    tx,
    plan.trainable_mask(),
    schedule,
    lambda f: f.astype(jnp.float32),
    SIZE,
  )
  state = steps.TrainState(
    jnp.zeros((), jnp.int32),
    head_params,
    tx.init(head_params),
    jax.random.PRNGKey(1),
  )
  compiled = (
    jax.jit(step, donate_argnums=0)
    .lower(state, {"image": feats[:BATCH], "label": labels[:BATCH]})
    .compile(options or None)
  )
  steps_per_call = 256  # One step is tens of microseconds: time many, slicing host batches like an epoch.
  holder = [state, 0]

  def run():
    s, i = holder
    for _ in range(steps_per_call):
      j = (i % (n_cached // BATCH)) * BATCH
      s, metrics = compiled(
        s, {"image": feats[j : j + BATCH], "label": labels[j : j + BATCH]}
      )
      i += 1
    jax.block_until_ready((s, metrics))
    holder[:] = [s, i]

  res = common.time_fn(run, warmup=1, reps=7, budget_s=budget)
  return {
    "img_s": steps_per_call * BATCH / res["median_s"],
    "extract_img_s": extract_batch / ext["median_s"],
    "extract_batch": extract_batch,
    **res,
  }


# --- PyTorch --------------------------------------------------------------------------------------


def torch_case(case: str, budget: float) -> dict:
  import torch

  torch.manual_seed(0)
  features = torch_vgg16_features(torch)
  model = torch.nn.Sequential(
    features,
    torch.nn.Flatten(),
    torch.nn.Linear(512 * (SIZE // 32) ** 2, HIDDEN),
    torch.nn.ReLU(),
    torch.nn.Linear(HIDDEN, CLASSES),
  )
  model = model.to(memory_format=torch.channels_last).train()
  convs = [m for m in features if isinstance(m, torch.nn.Conv2d)]
  n_frozen = {"freeze8": 5, "full": 0, "frozen_backbone": len(convs)}[case]
  for conv in convs[:n_frozen]:
    conv.requires_grad_(False)
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(trainable, lr=LR, momentum=MOMENTUM, nesterov=True)
  x, y = _batch()
  x = (
    torch.from_numpy(x)
    .permute(0, 3, 1, 2)
    .contiguous(memory_format=torch.channels_last)
  )
  y = torch.from_numpy(y).long()

  def run():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(trainable, CLIP)
    opt.step()
    return loss.item(), norm.item()

  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  res = common.time_fn(run, warmup=2, reps=7, budget_s=budget)
  return {
    "img_s": BATCH / res["median_s"],
    "first_step_s": first,
    "threads": torch.get_num_threads(),
    **res,
  }


# --- Keras 3 --------------------------------------------------------------------------------------


def keras_case(case: str, budget: float) -> dict:
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import keras

  keras.utils.set_random_seed(0)
  base = keras.applications.VGG16(
    weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
  )
  n_frozen = FIRST_LAYERS[case]
  for layer in base.layers[:n_frozen]:
    layer.trainable = False
  model = keras.Sequential(
    [
      base,
      keras.layers.Flatten(),
      keras.layers.Dense(HIDDEN, activation="relu"),
      keras.layers.Dense(CLASSES),
    ]
  )
  model.compile(
    optimizer=keras.optimizers.SGD(
      learning_rate=LR, momentum=MOMENTUM, nesterov=True, global_clipnorm=CLIP
    ),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    jit_compile=True,
  )
  x, y = _batch()
  t0 = time.perf_counter()
  model.train_on_batch(x, y)  # Traces and compiles.
  first = time.perf_counter() - t0
  res = common.time_fn(
    lambda: model.train_on_batch(x, y), warmup=1, reps=7, budget_s=budget
  )
  return {"img_s": BATCH / res["median_s"], "first_step_s": first, **res}


def worker(fw: str, case: str, budget: float, options: dict | None) -> None:
  base, tuned = fw.removesuffix("_tuned"), fw.endswith("_tuned")
  if tuned:
    common.tune_malloc()  # Before the framework's first allocation.
  if base == "flaxtl":
    rec = flaxtl_case(case, budget, options if tuned else {})
  elif base == "flaxtl_xla":
    rec = flaxtl_case(case, budget, options)
  elif base == "torch":
    rec = torch_case(case, budget)
  elif base == "keras":
    rec = keras_case(case, budget)
  else:
    raise SystemExit(f"unknown framework {fw!r}")
  common.emit(
    {
      "case": case,
      **rec,
      "peak_rss_mb": common.peak_rss_mb(),
      "experiments": EXPERIMENTS,
    }
  )


# --- driver ---------------------------------------------------------------------------------------


def summarise(results: dict) -> tuple[str, dict]:
  def get(fw, case, key="img_s"):
    return results.get(fw, {}).get(case, {}).get(key)

  def cell(fw, case):
    r = results.get(fw, {}).get(case)
    if not r or "img_s" not in r:
      return "-"
    return common.fmt(r["img_s"]) + ("*" if r.get("contended") else "")

  fws = [f for f in FRAMEWORKS + EXTRA_FRAMEWORKS if f in results]
  flax_fws = [f for f in fws if f.startswith("flaxtl")]
  cases = [
    c
    for c in ("freeze8", "full", "frozen_backbone")
    if any(c in results.get(f, {}) for f in fws)
  ]
  derived: dict = {}
  header = ["case", *[f"{f} img/s" for f in fws]]
  pairs = common.present_pairs(fws)
  header += [f"{a}/{b}" for a, b in pairs]
  rows = []
  for case in cases:
    row = [case, *[cell(f, case) for f in fws]]
    row += common.ratio_cells(pairs, lambda f: get(f, case), case, derived)
    rows.append(row)
  out = [common.markdown_table(header, rows)]

  # Step-time ratio freeze-8 / full (time, so the inverse of images/s).
  rows2 = []
  for f in fws:
    r = common.ratio(get(f, "full"), get(f, "freeze8"))
    if r is not None:
      derived[f"freeze8_over_full_time/{f}"] = r
      rows2.append([f, common.fmt_ratio(r)])
  if rows2:
    out.append(
      "Step time, freeze-8 / full fine-tune (lower is better; target <= 0.65):\n\n"
      + common.markdown_table(["framework", "freeze-8 / full step time"], rows2)
    )

  rows3 = []
  for f in flax_fws:
    r = results.get(f, {})
    for case in cases:
      c = r.get(case)
      if c and "compile_s" in c:
        rows3.append(
          [
            f,
            case,
            f"{c['lower_s']:.2f}",
            f"{c['compile_s']:.2f}",
            f"{c['first_step_s']:.2f}",
            str(c.get("convolutions", "-")),
            f"{c['peak_rss_mb']:.0f}",
          ]
        )
  for f in (f for f in fws if not f.startswith("flaxtl")):
    for case in cases:
      c = results.get(f, {}).get(case)
      if c and "peak_rss_mb" in c:
        rows3.append(
          [
            f,
            case,
            "-",
            "-",
            f"{c.get('first_step_s', 0):.2f}",
            "-",
            f"{c['peak_rss_mb']:.0f}",
          ]
        )
  if rows3:
    out.append(
      "Compilation and memory (each row its own process; peak RSS = max RSS of that process):\n\n"
      + common.markdown_table(
        [
          "framework",
          "case",
          "lower s",
          "compile s",
          "first step s",
          "convs in compiled step",
          "peak RSS MB",
        ],
        rows3,
      )
    )

  rows4 = []
  for f in flax_fws:
    hc = results.get(f, {}).get("head_cached")
    if not hc or "img_s" not in hc:
      continue
    for case in ("frozen_backbone", "freeze8"):
      base_ips = get(f, case)
      r = common.ratio(hc["img_s"], base_ips)
      derived[f"head_cached_speedup/{f}@{case}"] = r
      rows4.append(
        [
          f,
          f"head on cached features vs {case} step",
          common.fmt(hc["img_s"]),
          common.fmt(base_ips),
          common.fmt_ratio(r),
        ]
      )
    # Ten epochs over N images: cached = one extraction pass + 10 head epochs; else 10 backbone epochs.
    if get(f, "frozen_backbone"):
      epochs = 10
      cached_t = 1 / hc["extract_img_s"] + epochs / hc["img_s"]
      plain_t = epochs / get(f, "frozen_backbone")
      derived[f"ten_epochs_speedup/{f}"] = plain_t / cached_t
      rows4.append(
        [
          f,
          f"{epochs} epochs incl. the one-off extraction (s per 1000 images)",
          f"{1000 * cached_t:.1f}",
          f"{1000 * plain_t:.1f}",
          common.fmt_ratio(plain_t / cached_t),
        ]
      )
  if rows4:
    out.append(
      f"Cached features (head-only step, batch {BATCH}) vs running the backbone every step:\n\n"
      + common.markdown_table(
        ["framework", "comparison", "cached", "backbone", "speed-up"], rows4
      )
    )
  out.append(
    "`*`: other processes used > 15% of the machine during that measurement (retried, least contended kept)."
  )
  return "\n\n".join(out), derived


EXPERIMENTS: dict = {}  # Recorded with each result so a what-if run is never mistaken for a plain one.


def _experiments(im2col_max_pixels) -> None:
  """What-if switch for the flaxtl workers (see README.md); off by default."""
  if im2col_max_pixels is None:
    return
  from flaxtl.models import vgg

  EXPERIMENTS["im2col_max_pixels"] = im2col_max_pixels
  vgg._IM2COL_MAX_PIXELS = im2col_max_pixels


def main() -> None:
  global SIZE, BATCH  # --size/--batch; workers get them on their command line.
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
  ap.add_argument("--cases", default=",".join(CASES))
  ap.add_argument(
    "--budget",
    type=float,
    default=4.0,
    help="seconds of timed steps per measurement",
  )
  ap.add_argument(
    "--options",
    default="null",
    help="XLA options (JSON) for flaxtl_tuned; default: flaxtl.train's own per-phase choice",
  )
  ap.add_argument(
    "--im2col-max-pixels",
    type=int,
    default=None,
    help="experiment: override flaxtl.models.vgg._IM2COL_MAX_PIXELS in the flaxtl workers",
  )
  ap.add_argument(
    "--size", type=int, default=SIZE, help="input size (the tutorial's is 224)"
  )
  ap.add_argument("--batch", type=int, default=BATCH)
  ap.add_argument("--out", default="train_step.json")
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  ap.add_argument("--case", help=argparse.SUPPRESS)
  args = ap.parse_args()
  SIZE, BATCH = args.size, args.batch
  if args.worker:
    _experiments(args.im2col_max_pixels)
    worker(args.worker, args.case, args.budget, json.loads(args.options))
    return
  extra = ["--size", str(SIZE), "--batch", str(BATCH)]
  extra += (
    []
    if args.im2col_max_pixels is None
    else ["--im2col-max-pixels", str(args.im2col_max_pixels)]
  )

  results: dict[str, dict] = {}
  for fw in args.frameworks.split(","):
    results[fw] = {}
    for case in args.cases.split(","):
      if case == "head_cached" and not fw.startswith("flaxtl"):
        continue
      common.wait_for_quiet()
      print(f"[train_step] {fw} {case} ...", file=sys.stderr, flush=True)
      recs = common.run_worker(
        Path(__file__),
        [
          "--worker",
          fw,
          "--case",
          case,
          "--budget",
          str(args.budget),
          "--options",
          args.options,
          *extra,
        ],
      )
      for r in recs:
        results[fw][r.get("case", case)] = r
  table, derived = summarise(results)
  path = common.write_json(
    args.out,
    {
      "env": common.env_info(),
      "tuned_options": json.loads(args.options),
      "config": {
        "size": SIZE,
        "batch": BATCH,
        "hidden": HIDDEN,
        "lr": LR,
        "momentum": MOMENTUM,
        "nesterov": True,
        "clip_norm": CLIP,
      },
      "results": results,
      "derived": derived,
      "table": table,
    },
  )
  print(table)
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main()
