"""Train step, fp32, SGD: flaxtl vs PyTorch vs Keras 3 (VGG16 by default).

    python benchmarks/train_step.py     # VGG16 64x64, ~4 minutes on 2 cores
    python benchmarks/train_step.py --cases freeze8,full \
      --frameworks flaxtl,torch
    python benchmarks/train_step.py --arch resnet50   # 224x224, batch 8

Model everywhere: VGG16 without top, Flatten -> Dense(256, relu) -> Dense(10),
random weights, cross entropy on logits, SGD lr 1e-3 nesterov 0.9,
global-norm clipping at 1.0 over the trainable parameters.

Other archs (`--arch`, benchmarks/archs.py; 224x224, batch 8 by default):
the backbone without top, global average pooling, the same head, BN layers
trained in batch mode except frozen ones (Keras' rule, `model.bn_mode=
'keras'`, by hand in PyTorch). Cases `freeze` (a middle stage frozen, named
per arch in archs.py, `freeze.until` in flaxtl) and `full`.

VGG16 cases:
  freeze8          first 8 Keras layers frozen (block1_conv1 ... block3_conv1).
  full             everything trains.
  frozen_backbone  all 13 convs frozen, only the head trains, backbone run
                   every step.
  head_cached      flaxtl only: the head alone on precomputed block5_pool
                   features (`model.cache_features`), host batches sliced
                   from a cached array.

- flaxtl: the step the trainer builds, from a `configs/base.py` config
  (head 'mlp', `freeze.first_layers`, `optim`): `setup.build_model`,
  `setup.freeze_plan`, `setup.train_step` (multi_transform + masked clipping,
  grad-norm logging on, the phase's XLA options), `jax.jit(donate_argnums=0)`.
  Also reports lower/compile seconds and the convolutions left in the
  compiled step.
- *_tuned: the same in a process that first calls `common.tune_malloc()`, so
  each framework is compared both stock and with the same settings.
  flaxtl_tuned is the step as `launch.py` runs it (config.tune_malloc, and
  config.xla_cpu_ynn='auto': YNNPACK off while a stem conv trains); stock
  flaxtl is xla_cpu_ynn='on' (XLA's defaults).
- torch: the same layers in plain torch.nn (channels_last),
  `requires_grad_(False)` on frozen layers, `clip_grad_norm_` over the
  trainable params (its return value is the logged norm), `.item()` on loss
  and norm every step (what a logging loop does).
- keras: `keras.applications.VGG16(weights=None, include_top=False)` + the
  head, `layer.trainable=False` on `base.layers[:8]`,
  SGD(global_clipnorm=1.0), `train_on_batch`. Keras logs no grad norm.

Each (framework, case) runs in its own process so that peak RSS (max RSS) is
per run; each worker imports its framework inside its own function, so a torch
process never loads jax (nor the other way round).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import re
import sys
import time

import archs
import common
from forward import torch_vgg16_features
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
CASES = ("freeze8", "full", "frozen_backbone", "head_cached")
# freeze.first_layers per case (Keras' model.layers[:k] of VGG16 no-top).
# freeze4 (block1 frozen) is not run by default; it chose the XLA:CPU options.
FIRST_LAYERS = {"freeze8": 8, "full": 0, "frozen_backbone": 19, "freeze4": 4}
SIZE, BATCH, CLASSES, HIDDEN = 64, 16, archs.CLASSES, archs.HIDDEN
# Other archs' defaults: the size their ImageNet weights were trained at.
FAMILY_SIZE, FAMILY_BATCH = 224, 8
LR, MOMENTUM, CLIP = 1e-3, 0.9, 1.0
# Rows of block5_pool features the head_cached case slices its batches from.
N_CACHED = 4096


def _batch(n: int | None = None, seed: int = 0):
  n = n or BATCH
  rng = np.random.default_rng(seed)
  # Like caffe-preprocessed pixels.
  x = rng.uniform(-120, 140, (n, SIZE, SIZE, 3)).astype(np.float32)
  y = rng.integers(0, CLASSES, n).astype(np.int32)
  return x, y


# --- flaxtl -------------------------------------------------------------------


def _config(arch: str, case: str, ynn: str):
  """The trainer's config for this benchmark's model, case and optimiser."""
  from configs import base

  config = base.get_base()
  config.model.arch = arch
  config.image_size = SIZE
  config.batch_size = BATCH
  config.model.weights = "none"
  config.model.head = "mlp"
  config.model.hidden = (HIDDEN,)
  config.model.activations = ("relu",)
  config.model.dropout = (0.0,)
  if arch == "vgg16":
    config.freeze.first_layers = FIRST_LAYERS.get(case, 0)  # 0: head_cached.
  else:
    config.model.pooling = "avg"
    if case == "freeze":
      config.freeze.until = archs.get(arch).until
  config.optim.update(
    {
      "name": "sgd",
      "lr": LR,
      "momentum": MOMENTUM,
      "nesterov": True,
      "clip_norm": CLIP,
      "schedule": "constant",
    }
  )
  config.log_grad_norm = True
  config.xla_cpu_ynn = ynn
  return config


def _count_convolutions(hlo: str) -> int:
  return len(re.findall(r"= \S+ convolution\(", hlo)) + len(
    re.findall(r'custom_call_target="__onednn\$convolution', hlo)
  )


def flaxtl_case(
  arch: str, case: str, budget: float, options: dict | None, ynn: str
):
  """options: XLA compile options; None: the trainer's choice under `ynn`."""
  import jax
  import jax.numpy as jnp

  from flaxtl import models
  from flaxtl.train import config as config_lib
  from flaxtl.train import setup, steps

  config = _config(arch, case, ynn)
  config_lib.validate(config)
  model = setup.build_model(config, CLASSES)
  variables = models.init_variables(model, SIZE)
  if case == "head_cached":
    return _head_cached(config, model, variables, budget, options)

  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  plan = setup.freeze_plan(
    config, params, config.freeze.first_layers, log_matches=False
  )
  tx, step, auto_options = setup.train_step(
    config, model, plan, 10_000, lambda x: x.astype(jnp.float32), batch_stats
  )
  options = auto_options if options is None else options
  state = steps.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    rng=jax.random.PRNGKey(1),
  )
  x, y = _batch()
  # Host arrays: each call transfers them, as the training loop does.
  batch = {"image": x, "label": y}

  out: dict = {
    "xla_options": options or {},
    "frozen_arrays": sum(1 for r in plan.rows if r[1] == "frozen"),
    "bn_inference_layers": len(
      setup.train_mode(config, plan, batch_stats).bn_inference
    ),
  }
  t0 = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=0).lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile(options or None)
  t2 = time.perf_counter()
  out.update(
    lower_s=t1 - t0,
    compile_s=t2 - t1,
    convolutions=_count_convolutions(compiled.as_text()),
  )
  holder = [state]

  def run():
    s, metrics = compiled(holder[0], batch)
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


def _head_cached(config, model, variables, budget: float, options):
  """Head-only step on cached features, plus the one-off extraction cost.

  Built as the trainer's `model.cache_features` mode builds it: the backbone
  up to the feature layer in inference mode, then a `HeadOnly` model.
  """
  import jax
  import jax.numpy as jnp

  from flaxtl.models.heads import HeadOnly, MLPHead
  from flaxtl.train import config as config_lib
  from flaxtl.train import setup, steps

  spec = config_lib.backbone(config)
  backbone = spec.build(
    include_top=False,
    output_layer=config_lib.feature_layer(config),
    dtype=config_lib.DTYPES[config.model.dtype],
    **config_lib.backbone_options(config),
  )
  backbone_vars = {"params": variables["params"]["backbone"]}
  extract_options = options
  if extract_options is None:
    extract_options = setup.compiler_options(config, dtype=config.model.dtype)
  # The cache holds every image's features, computed once in batches of 32
  # (flaxtl.train.features.BATCH_SIZE).
  extract_batch = 32
  xe, _ = _batch(extract_batch, seed=1)
  fwd = (
    jax.jit(lambda v, x: backbone.apply(v, x, train=False))
    .lower(backbone_vars, xe)
    .compile(extract_options or None)
  )
  ext = common.time_fn(
    lambda: fwd(backbone_vars, xe).block_until_ready(), budget_s=budget
  )
  feats = np.asarray(fwd(backbone_vars, xe))
  # (4096, 2, 2, 512) float32 on the host at 64x64.
  feats = np.concatenate([feats] * (N_CACHED // extract_batch))
  rng = np.random.default_rng(0)
  labels = rng.integers(0, CLASSES, N_CACHED).astype(np.int32)

  head_model = HeadOnly(
    MLPHead(**model.head_kwargs(), parent=None), pooling=config.model.pooling
  )
  head_params = {"head": variables["params"]["head"]}
  plan = setup.freeze_plan(config, head_params, 0, log_matches=False)
  tx, step, auto_options = setup.train_step(
    config, head_model, plan, 10_000, lambda f: f.astype(jnp.float32), {}
  )
  options = auto_options if options is None else options
  state = steps.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=head_params,
    batch_stats={},
    opt_state=tx.init(head_params),
    rng=jax.random.PRNGKey(1),
  )
  first = {"image": feats[:BATCH], "label": labels[:BATCH]}
  compiled = (
    jax.jit(step, donate_argnums=0).lower(state, first).compile(options or None)
  )
  # One step is tens of microseconds: time many, slicing host batches like an
  # epoch does.
  steps_per_call = 256
  holder = [state, 0]

  def run():
    s, i = holder
    for _ in range(steps_per_call):
      j = (i % (N_CACHED // BATCH)) * BATCH
      batch = {"image": feats[j : j + BATCH], "label": labels[j : j + BATCH]}
      s, metrics = compiled(s, batch)
      i += 1
    jax.block_until_ready((s, metrics))
    holder[:] = [s, i]

  res = common.time_fn(run, warmup=1, reps=7, budget_s=budget)
  return {
    "img_s": steps_per_call * BATCH / res["median_s"],
    "extract_img_s": extract_batch / ext["median_s"],
    "extract_batch": extract_batch,
    "xla_options": options or {},
    **res,
  }


# --- PyTorch ------------------------------------------------------------------


def _torch_vgg16(torch, case: str):
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
  # Convs among Keras' model.layers[:FIRST_LAYERS[case]].
  n_frozen = {"freeze4": 2, "freeze8": 5, "full": 0}.get(case, len(convs))
  for conv in convs[:n_frozen]:
    conv.requires_grad_(False)
  return model


def torch_case(arch: str, case: str, budget: float) -> dict:
  import torch

  torch.manual_seed(0)
  if arch == "vgg16":
    model = _torch_vgg16(torch, case)
  else:
    model = archs.torch_model(arch, head=True)
    model = model.to(memory_format=torch.channels_last).train()
    if case == "freeze":
      archs.torch_freeze(model, arch)
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(trainable, lr=LR, momentum=MOMENTUM, nesterov=True)
  x, y = _batch()
  x = torch.from_numpy(x).permute(0, 3, 1, 2)
  x = x.contiguous(memory_format=torch.channels_last)
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
    "frozen_arrays": sum(1 for p in model.parameters() if not p.requires_grad),
    "bn_inference_layers": sum(
      1
      for m in model.modules()
      if isinstance(m, torch.nn.BatchNorm2d) and not m.training
    ),
    **res,
  }


# --- Keras 3 ------------------------------------------------------------------


def keras_case(arch: str, case: str, budget: float) -> dict:
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import keras

  keras.utils.set_random_seed(0)
  if arch == "vgg16":
    base = keras.applications.VGG16(
      weights=None, include_top=False, input_shape=(SIZE, SIZE, 3)
    )
    k, flatten = FIRST_LAYERS[case], [keras.layers.Flatten()]
  else:
    base = archs.keras_model(arch, SIZE)  # Global average pooled.
    k = archs.keras_frozen_count(base, arch) if case == "freeze" else 0
    flatten = []
  for layer in base.layers[:k]:
    layer.trainable = False
  model = keras.Sequential(
    [
      base,
      *flatten,
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
  return {
    "img_s": BATCH / res["median_s"],
    "first_step_s": first,
    "frozen_layers": k,
    # Trainable-kind arrays (kernels, BN scale/bias) of the frozen layers.
    "frozen_arrays": sum(
      1 for layer in base.layers[:k] for w in layer.weights if w.trainable
    ),
    **res,
  }


def worker(
  fw: str, arch: str, case: str, budget: float, options: dict | None
) -> None:
  base, tuned = fw.removesuffix("_tuned"), fw.endswith("_tuned")
  if tuned:
    common.tune_malloc()  # Before the framework's first allocation.
  if base == "flaxtl":
    # Stock: XLA's defaults (xla_cpu_ynn='on'); tuned: as the trainer runs.
    ynn = "auto" if tuned else "on"
    rec = flaxtl_case(arch, case, budget, options if tuned else None, ynn)
  elif base == "flaxtl_xla":
    rec = flaxtl_case(arch, case, budget, options, "auto")
  elif base == "torch":
    rec = torch_case(arch, case, budget)
  elif base == "keras":
    rec = keras_case(arch, case, budget)
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


# --- driver -------------------------------------------------------------------


def _speed_table(results, fws, cases, derived) -> str:
  def get(fw, case):
    return results.get(fw, {}).get(case, {}).get("img_s")

  def cell(fw, case):
    r = results.get(fw, {}).get(case)
    if not r or "img_s" not in r:
      return "-"
    return common.fmt(r["img_s"]) + ("*" if r.get("contended") else "")

  header = ["case", *[f"{f} img/s" for f in fws]]
  pairs = common.present_pairs(fws)
  header += [f"{a}/{b}" for a, b in pairs]
  rows = []
  for case in cases:
    row = [case, *[cell(f, case) for f in fws]]
    row += common.ratio_cells(
      pairs, lambda f, case=case: get(f, case), case, derived
    )
    rows.append(row)
  return common.markdown_table(header, rows)


def _freeze_ratio_table(results, fws, derived) -> str | None:
  """Step time freeze / full (time, so the inverse of images/s)."""
  rows = []
  for f in fws:
    r = results.get(f, {})
    freeze = "freeze8" if "freeze8" in r else "freeze"
    ratio = common.ratio(
      r.get("full", {}).get("img_s"), r.get(freeze, {}).get("img_s")
    )
    if ratio is not None:
      derived[f"{freeze}_over_full_time/{f}"] = ratio
      rows.append([f, common.fmt_ratio(ratio)])
  if not rows:
    return None
  return (
    "Step time, freeze / full fine-tune (lower is better; VGG16 freeze-8 "
    "target <= 0.65):\n\n"
    + common.markdown_table(["framework", "freeze / full step time"], rows)
  )


def _compile_memory_table(results, fws, cases) -> str | None:
  rows = []
  for f in fws:
    for case in cases:
      c = results.get(f, {}).get(case)
      if not c or "peak_rss_mb" not in c:
        continue
      if f.startswith("flaxtl") and "compile_s" in c:
        lower, compile_s = f"{c['lower_s']:.2f}", f"{c['compile_s']:.2f}"
      else:
        lower = compile_s = "-"
      rows.append(
        [
          f,
          case,
          lower,
          compile_s,
          f"{c.get('first_step_s', 0):.2f}",
          str(c.get("convolutions", "-")),
          f"{c['peak_rss_mb']:.0f}",
        ]
      )
  if not rows:
    return None
  header = [
    "framework",
    "case",
    "lower s",
    "compile s",
    "first step s",
    "convs in compiled step",
    "peak RSS MB",
  ]
  return (
    "Compilation and memory (each row its own process; peak RSS = max RSS "
    "of that process):\n\n" + common.markdown_table(header, rows)
  )


def _cached_table(results, fws, derived) -> str | None:
  rows = []
  for f in fws:
    r = results.get(f, {})
    hc = r.get("head_cached")
    if not hc or "img_s" not in hc:
      continue
    for case in ("frozen_backbone", "freeze8"):
      base_ips = r.get(case, {}).get("img_s")
      ratio = common.ratio(hc["img_s"], base_ips)
      derived[f"head_cached_speedup/{f}@{case}"] = ratio
      rows.append(
        [
          f,
          f"head on cached features vs {case} step",
          common.fmt(hc["img_s"]),
          common.fmt(base_ips),
          common.fmt_ratio(ratio),
        ]
      )
    # Ten epochs over N images: cached = one extraction pass + 10 head
    # epochs; otherwise 10 epochs through the backbone.
    backbone_ips = r.get("frozen_backbone", {}).get("img_s")
    if backbone_ips:
      epochs = 10
      cached_t = 1 / hc["extract_img_s"] + epochs / hc["img_s"]
      plain_t = epochs / backbone_ips
      derived[f"ten_epochs_speedup/{f}"] = plain_t / cached_t
      rows.append(
        [
          f,
          f"{epochs} epochs incl. the one-off extraction (s per 1000 images)",
          f"{1000 * cached_t:.1f}",
          f"{1000 * plain_t:.1f}",
          common.fmt_ratio(plain_t / cached_t),
        ]
      )
  if not rows:
    return None
  header = ["framework", "comparison", "cached", "backbone", "speed-up"]
  return (
    f"Cached features (head-only step, batch {BATCH}) vs running the "
    "backbone every step:\n\n" + common.markdown_table(header, rows)
  )


def summarise(results: dict) -> tuple[str, dict]:
  fws = [f for f in FRAMEWORKS + EXTRA_FRAMEWORKS if f in results]
  cases = [
    c
    for c in ("freeze4", "freeze8", "freeze", "full", "frozen_backbone")
    if any(c in results.get(f, {}) for f in fws)
  ]
  derived: dict = {}
  tables = [
    _speed_table(results, fws, cases, derived),
    _freeze_ratio_table(results, fws, derived),
    _compile_memory_table(results, fws, cases),
    _cached_table(results, [f for f in fws if f.startswith("flaxtl")], derived),
    common.STAR_NOTE,
  ]
  return "\n\n".join(t for t in tables if t), derived


# What-if settings, recorded with each result so that an experiment is never
# mistaken for a plain run.
EXPERIMENTS: dict = {}


def _experiments(im2col_max_pixels: int | None) -> None:
  """What-if switch for the flaxtl workers (see README.md); off by default."""
  if im2col_max_pixels is None:
    return
  from flaxtl.ops import conv as conv_ops  # A flaxtl worker only.

  EXPERIMENTS["im2col_max_pixels"] = im2col_max_pixels
  conv_ops._IM2COL_MAX_PIXELS = im2col_max_pixels


def main() -> None:
  global SIZE, BATCH  # --size/--batch; workers get them on their command line.
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
  ap.add_argument(
    "--cases",
    default=None,
    help=f"VGG16: {','.join(CASES)} (default), freeze4; other archs: "
    f"{','.join(archs.CASES)}",
  )
  ap.add_argument(
    "--budget",
    type=float,
    default=4.0,
    help="seconds of timed steps per measurement",
  )
  ap.add_argument(
    "--options",
    default="null",
    help="XLA options (JSON) for flaxtl_tuned and flaxtl_xla; default: the "
    "trainer's own per-phase choice",
  )
  ap.add_argument(
    "--im2col-max-pixels",
    type=int,
    default=None,
    help="experiment: override flaxtl.ops.conv._IM2COL_MAX_PIXELS in the "
    "flaxtl workers",
  )
  ap.add_argument(
    "--size",
    type=int,
    help=f"input size (default {SIZE} for VGG16, {FAMILY_SIZE} for the "
    "others; the tutorial's is 224)",
  )
  ap.add_argument(
    "--batch",
    type=int,
    help=f"default {BATCH} for VGG16, {FAMILY_BATCH} for the others",
  )
  ap.add_argument(
    "--out", help="default: train_step.json (VGG16), train_step_<arch>.json"
  )
  ap.add_argument("--worker", help=argparse.SUPPRESS)
  ap.add_argument("--case", help=argparse.SUPPRESS)
  args = ap.parse_args()
  vgg = args.arch == "vgg16"
  if not vgg:
    archs.get(args.arch)  # Fails early on a typo.
  SIZE = args.size or (SIZE if vgg else FAMILY_SIZE)
  BATCH = args.batch or (BATCH if vgg else FAMILY_BATCH)
  if args.worker:
    _experiments(args.im2col_max_pixels)
    worker(
      args.worker, args.arch, args.case, args.budget, json.loads(args.options)
    )
    return
  extra = ["--arch", args.arch, "--size", str(SIZE), "--batch", str(BATCH)]
  fws = args.frameworks or ",".join(
    f
    for f in FRAMEWORKS
    if vgg or archs.get(args.arch).keras or "keras" not in f
  )
  cases = args.cases or ",".join(CASES if vgg else archs.CASES)
  out = args.out or (
    "train_step.json" if vgg else f"train_step_{args.arch}.json"
  )
  if args.im2col_max_pixels is not None:
    extra += ["--im2col-max-pixels", str(args.im2col_max_pixels)]

  results: dict[str, dict] = {}
  for fw in fws.split(","):
    results[fw] = {}
    for case in cases.split(","):
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
    out,
    {
      "env": common.env_info(),
      "tuned_options": json.loads(args.options),
      "config": {
        "arch": args.arch,
        "freeze": archs.get(args.arch).frozen_desc if not vgg else "",
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
