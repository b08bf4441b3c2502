"""The transfer-learning run: `train_and_evaluate(config, workdir) -> metrics`.

One freeze phase at a time (gradual unfreezing starts a new phase, with a new
optimiser and one new compilation); checkpoints carry params, optimiser state,
step, rng and the data iterator position, so rerunning the same command in
the same workdir resumes exactly where the last checkpoint left off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from flaxtl import data as data_lib
from flaxtl import distributed, features, freeze, optim, pretrained, runtime, steps
from flaxtl.errors import UserError
from flaxtl.merge import merge_pretrained
from flaxtl.metric_writer import MetricWriter
from flaxtl.models import vgg
from flaxtl.models.baselines import PixelMLP, SmallCNN
from flaxtl.models.heads import ACTIVATIONS, INITS, HeadOnly, MLPHead, TransferModel
from flaxtl.summary import counts, param_table
from flaxtl.weights import replace_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLoss(UserError):
  """The loss or gradient norm became NaN/Inf; the last good checkpoint is kept."""


# --- config checks and model assembly --------------------------------------------------------


def validate(config: ml_collections.ConfigDict, devices: bool = True) -> None:
  """Everything that can be checked before touching data (devices: also the batch split)."""
  m = config.model
  if m.name not in ("vgg", "mlp", "cnn"):
    raise UserError(f"model.name must be 'vgg', 'mlp' or 'cnn', got {m.name!r}")
  if m.dtype not in DTYPES:
    raise UserError(f"model.dtype must be one of {sorted(DTYPES)}, got {m.dtype!r}")
  if config.preprocess not in ("caffe", "unit", "none"):
    raise UserError(f"preprocess must be 'caffe', 'unit' or 'none', got {config.preprocess!r}")
  if config.xla_cpu_ynn not in runtime.YNN_SETTINGS:
    raise UserError(f"xla_cpu_ynn must be one of {runtime.YNN_SETTINGS}, got {config.xla_cpu_ynn!r}")
  if config.nan_policy not in ("stop", "skip"):
    raise UserError(f"nan_policy must be 'stop' or 'skip', got {config.nan_policy!r}")
  if config.batch_size <= 0 or config.eval_batch_size <= 0:
    raise UserError("batch_size and eval_batch_size must be positive")
  if m.name == "vgg":
    if m.arch not in vgg.BLOCKS:
      raise UserError(f"model.arch must be one of {sorted(vgg.BLOCKS)}, got {m.arch!r}")
    if m.conv_impl not in vgg.CONV_IMPLS:
      raise UserError(f"model.conv_impl must be one of {vgg.CONV_IMPLS}, got {m.conv_impl!r}")
    if m.head not in ("keras_top", "mlp", "linear"):
      raise UserError(f"model.head must be 'keras_top', 'mlp' or 'linear', got {m.head!r}")
    if m.head == "keras_top" and config.image_size != vgg.TOP_SIZE:
      raise UserError(
          f"image_size={config.image_size}: model.head='keras_top' (fc1 takes 7x7x512) needs image_size=224; "
          "use model.head='mlp' or 'linear' for other sizes"
      )
    if config.image_size < vgg.MIN_SIZE:
      raise UserError(f"image_size={config.image_size}: VGG needs at least {vgg.MIN_SIZE}")
    if m.head != "keras_top":
      layers = vgg.keras_layer_names(m.arch, include_top=False)[1:]
      if m.feature_layer not in layers:
        raise UserError(f"model.feature_layer={m.feature_layer!r} is not a {m.arch} layer: {layers}")
    if m.pooling not in (None, "avg", "max"):
      raise UserError(f"model.pooling must be None, 'avg' or 'max', got {m.pooling!r}")
    bad = [a for a in m.activations if a not in ACTIVATIONS]
    if bad or len(m.activations) < len(m.hidden):
      raise UserError(f"model.activations needs one of {sorted(ACTIVATIONS)} per hidden layer, got {m.activations}")
    if m.head_init not in INITS:
      raise UserError(f"model.head_init must be one of {sorted(INITS)}, got {m.head_init!r}")
  elif config.image_size < 8:
    raise UserError(f"image_size={config.image_size} is too small")
  for epoch, k in config.freeze.phases:
    if epoch <= 0 or k < 0:
      raise UserError(f"freeze.phases entries are (epoch >= 1, first_layers >= 0), got {(epoch, k)}")
  if devices:  # Asking for the device count starts the backend: not before distributed init.
    distributed.check_batch(config.batch_size)
    distributed.check_batch(config.eval_batch_size, "eval_batch_size")


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  m, dtype = config.model, DTYPES[config.model.dtype]
  if m.name == "mlp":
    return PixelMLP(num_classes, dtype=dtype)
  if m.name == "cnn":
    return SmallCNN(num_classes, dtype=dtype)
  return TransferModel(
      arch=m.arch, head=m.head, num_classes=num_classes, feature_layer=m.feature_layer,
      pooling=m.pooling, hidden=tuple(m.hidden), activations=tuple(m.activations),
      dropout=tuple(m.dropout), head_init=m.head_init, dtype=dtype, conv_impl=m.get("conv_impl", "auto"),
  )


def _check_feature_mode(config) -> None:
  m = config.model
  if m.name != "vgg" or m.head == "keras_top":
    raise UserError("model.cache_features needs model.name='vgg' with model.head 'mlp' or 'linear'")
  if config.freeze.first_layers or config.freeze.phases:
    raise UserError("model.cache_features trains the head alone (the backbone is frozen by construction): "
                    "set freeze.first_layers=0 and freeze.phases=()")
  if config.data.augment:
    raise UserError("model.cache_features cannot augment: features are computed once per image")


def _feature_splits(config, backbone: dict, splits):
  m = config.model

  def convert(ds, split: str):
    if ds is None:
      return None
    feats = features.extract(backbone, ds.images, arch=m.arch, layer=m.feature_layer,
                             image_size=config.image_size, preprocess=config.preprocess,
                             cache_dir=Path(m.features_cache_dir), split=split, xla_cpu_ynn=config.xla_cpu_ynn)
    return features.FeatureSet(feats, ds.labels)

  return dataclasses.replace(splits, train=convert(splits.train, "train"), val=convert(splits.val, "val"),
                             test=convert(splits.test, "test"))


def _init_fn(model: nn.Module, config):
  x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
  return lambda rng: model.init(rng, x)["params"]


def abstract_init(model: nn.Module, config, rng: jax.Array) -> dict:
  """The param tree as shapes, at no FLOPs: checks the model at this image size."""
  return jax.eval_shape(_init_fn(model, config), rng)


def init_params(model: nn.Module, config, rng: jax.Array, replicated) -> dict:
  return jax.jit(_init_fn(model, config), out_shardings=replicated)(rng)


def load_pretrained(config, params: dict) -> tuple[dict, Optional[dict]]:
  m = config.model
  if m.name != "vgg" or str(m.weights).lower() in ("none", ""):
    log.info("no pretrained weights: training from scratch")
    return params, None
  keras_top = m.head == "keras_top"
  pre, provenance = pretrained.load(m.weights, m.arch, keras_top)
  merged, report = merge_pretrained(params, pre, into="backbone", reinit=["predictions"] if keras_top else [])
  return merged, {**provenance, "merge": {k: len(v) for k, v in report.items()}, "skipped": report["skipped"]}


def freeze_plan(config, params: dict, first_layers: int, log_matches: bool = True) -> freeze.Plan:
  m = config.model
  is_vgg = m.name == "vgg"
  rules = freeze.first_layers_rules(
      first_layers, params, arch=m.arch if is_vgg else None, include_top=is_vgg and m.head == "keras_top"
  )
  rules += [tuple(r) for r in config.freeze.rules]
  return freeze.plan(params, rules, [tuple(r) for r in config.freeze.lr_mults], log_matches)


# --- the run ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
  start_step: int
  first_layers: int


def phases(config, steps_per_epoch: int) -> list[Phase]:
  out = [Phase(0, int(config.freeze.first_layers))]
  for epoch, k in sorted(config.freeze.phases):
    out.append(Phase(int(epoch) * steps_per_epoch, int(k)))
  return out


def phase_index(all_phases: list[Phase], step: int) -> int:
  return max(i for i, p in enumerate(all_phases) if p.start_step <= step)


class _StopFlag:
  """SIGTERM/SIGINT ask the loop to save a checkpoint and return."""

  def __init__(self):
    self.signal: Optional[int] = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: leave signals alone.
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class _Run:
  """What training needs once data and weights are in place."""

  model: nn.Module
  params: dict
  prepare: Any  # Device-side batch["image"] -> model input.
  splits: Any  # data_lib splits; backbone features instead of images when features are cached.
  provenance: Optional[dict]
  backbone: Optional[dict] = None  # Host copy of the frozen backbone when features are cached.


def load_data(config: ml_collections.ConfigDict):
  """The train/val/test splits, checked against the model config and batch size."""
  splits = data_lib.load(config.data)
  num_classes = len(splits.class_names)
  if config.model.num_classes and config.model.num_classes != num_classes:
    raise UserError(f"model.num_classes={config.model.num_classes} but the data has {num_classes} classes "
                    f"({config.data.source})")
  if splits.train is None or len(splits.train) == 0:
    raise UserError(f"data.source={config.data.source!r}: no training examples")
  if len(splits.train) < config.batch_size:
    raise UserError(f"batch_size={config.batch_size} is larger than the {len(splits.train)} training examples")
  return splits


def _setup(config, splits, init_rng: jax.Array, replicated) -> _Run:
  """Model, initial params (pretrained merged in), and cached features if configured."""
  model = build_model(config, len(splits.class_names))
  cached = bool(config.model.cache_features)
  if cached:
    _check_feature_mode(config)
  # Shape-first: every phase's freeze rules are checked on the abstract params before any work.
  abstract_params = abstract_init(model, config, init_rng)
  for k in [config.freeze.first_layers, *(k for _, k in config.freeze.phases)]:
    freeze_plan(config, {"head": abstract_params["head"]} if cached else abstract_params, k, log_matches=False)

  params = init_params(model, config, init_rng, replicated)
  params, provenance = load_pretrained(config, params)
  params = jax.device_put(params, replicated)
  run = _Run(model, params, steps.image_prep(config.image_size, config.preprocess), splits, provenance)
  if cached:  # From here on the model is the head and the data are backbone features.
    run.backbone = jax.device_get(params["backbone"])
    run.splits = _feature_splits(config, run.backbone, splits)
    head = MLPHead(**model.head_kwargs(), parent=None)
    run.model, run.params = HeadOnly(head, pooling=config.model.pooling), {"head": params["head"]}
    run.prepare = lambda feats: feats.astype(jnp.float32)
  return run


def _checkpoint_manager(workdir: Path, config) -> ocp.CheckpointManager:
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  return ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.max_to_keep, create=True,
                                           enable_async_checkpointing=False),
      item_names=("state", "data"),
  )


def _restore(manager: ocp.CheckpointManager, step: int, state: steps.TrainState, workdir: Path):
  """(state, data iterator state) of checkpoint `step`, restored into `state`'s shapes and shardings."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
  except ValueError as e:  # Tree or shape mismatch: the workdir holds another model/optimiser.
    raise UserError(
        f"{workdir}: its checkpoint (step {step}) was written by a different model or optimiser "
        f"config ({str(e).splitlines()[0]}); use a new --workdir to start over") from None
  log.info("resumed from step %d in %s", step, workdir)
  return restored["state"], restored["data"]


class _PendingMetrics:
  """Train metrics fetched from the device in batches (no per-step sync), checked for NaN/Inf.

  Checking happens on `flush()`, which the loop calls before every checkpoint, so a
  non-finite step is never saved.
  """

  def __init__(self, writer: MetricWriter, nan_policy: str, workdir: Path, last_good_step: int):
    self.writer, self.nan_policy, self.workdir = writer, nan_policy, workdir
    self.last_good_step = last_good_step
    self.skipped_updates = 0
    self.last: dict = {}
    self.rates: list[float] = []
    self._pending: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))

  def flush(self) -> None:
    if not self._pending:
      return
    fetched = jax.device_get([m for _, m in self._pending])
    for (s, _), m in zip(self._pending, fetched):
      if not bool(m["finite"]):
        if self.nan_policy == "stop":
          raise NonFiniteLoss(
              f"loss or gradient became NaN/Inf at step {s}; the last good checkpoint (step "
              f"{self.last_good_step}) in {self.workdir} is intact; lower optim.lr or set nan_policy='skip'")
        self.skipped_updates += 1
        log.warning("step %d: non-finite loss, update skipped", s)
    s, m = self._pending[-1][0], fetched[-1]
    self.last = {k: float(v) for k, v in m.items() if k != "finite"}
    self.writer.write(s, "train", {**self.last, "skipped_updates": self.skipped_updates})
    rate = self.writer.progress(s, self.last)
    if rate:
      self.rates.append(rate)
    self._pending = []


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Trains and evaluates as `config` says; returns the final metrics."""
  t_start = time.perf_counter()
  workdir = Path(workdir)
  validate(config, devices=False)
  if config.tune_malloc:
    runtime.tune_malloc()  # Before the first big allocation.
  distributed.initialize(config.distributed)
  validate(config)

  splits = load_data(config)
  num_classes = len(splits.class_names)
  mesh = distributed.make_mesh()
  replicated, batch_sharding = distributed.shardings(mesh)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  run = _setup(config, splits, init_rng, replicated)
  model, splits = run.model, run.splits

  train_iter = data_lib.TrainIterator(
      splits.train, batch_size=config.batch_size, seed=config.seed, shuffle=True,
      process_index=jax.process_index(), process_count=jax.process_count(),
  )
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = int(config.total_steps) or int(config.num_epochs) * steps_per_epoch
  eval_period = max(1, int(config.eval_every_epochs)) * steps_per_epoch
  all_phases = phases(config, steps_per_epoch)
  manager = _checkpoint_manager(workdir, config)

  def compile_train_step(plan_):
    tx_, schedule_ = optim.make_optimizer(config.optim, plan_, total_steps)
    fn = steps.make_train_step(
        model, tx_, plan_.trainable_mask(), schedule_, prepare=run.prepare, nan_policy=config.nan_policy,
        log_grad_norm=config.log_grad_norm, augment=data_lib.augment if config.data.augment else None)
    options = runtime.compiler_options(config.xla_cpu_ynn, config.image_size, plan_.trainable_paths(),
                                       config.model.dtype)
    if options:
      log.info("train step compiled with %s", options)
    return tx_, jax.jit(fn, donate_argnums=0, out_shardings=(replicated, replicated),
                        compiler_options=options)

  start_step = manager.latest_step() or 0
  phase_i = phase_index(all_phases, start_step)
  plan = freeze_plan(config, run.params, all_phases[phase_i].first_layers)
  tx, train_step = compile_train_step(plan)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=run.params,
                           opt_state=jax.jit(tx.init, out_shardings=replicated)(run.params),
                           rng=jax.device_put(train_rng, replicated))
  if start_step:
    state, iter_state = _restore(manager, start_step, state, workdir)
    train_iter.set_state(iter_state)

  writer = MetricWriter(workdir, total_steps, start_step, config.batch_size, config.progress)
  _write_run_files(workdir, config, run.provenance, splits.class_names)
  writer.print(param_table(state.params, plan))
  param_counts = counts(state.params, plan)
  if run.backbone is not None:
    param_counts["frozen"] += sum(int(np.size(a)) for a in jax.tree.leaves(run.backbone))
    writer.print(f"backbone: {param_counts['frozen']:,} params frozen (features cached in "
                 f"{config.model.features_cache_dir})")

  eval_fn = jax.jit(steps.make_eval_step(model, num_classes, prepare=run.prepare),
                    compiler_options=runtime.compiler_options(config.xla_cpu_ynn, config.image_size,
                                                              dtype=config.model.dtype))

  def save(step: int) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(iter_state)), force=True)
    manager.wait_until_finished()
    metrics.last_good_step = step

  def evaluate(ds, split: str, step: int) -> dict:
    out = _evaluate(eval_fn, state.params, ds, config.eval_batch_size, batch_sharding, num_classes)
    writer.write(step, split, out)
    writer.print(f"step {step} {split}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float)))
    return out

  def producer():
    while True:
      batch = next(train_iter)
      yield batch, train_iter.get_state()

  batches = data_lib.prefetch(producer(), size=config.data.prefetch,
                              put=lambda item: (distributed.put_batch(item[0], batch_sharding), item[1]))
  metrics = _PendingMetrics(writer, config.nan_policy, workdir, last_good_step=start_step)
  val_metrics: dict = {}
  iter_state = train_iter.get_state()
  interrupted = None
  step = start_step
  try:
    with _StopFlag() as stop:
      while step < total_steps:
        i = phase_index(all_phases, step)
        if i != phase_i:
          metrics.flush()
          phase_i = i
          plan = freeze_plan(config, state.params, all_phases[i].first_layers)
          tx, train_step = compile_train_step(plan)
          # A new phase gets a fresh optimiser, as Keras' recompile after changing `trainable` does.
          state = state.replace(opt_state=jax.jit(tx.init, out_shardings=replicated)(state.params))
          writer.print(f"phase {i}: first_layers={all_phases[i].first_layers} from step {step}")
          writer.print(param_table(state.params, plan))
        batch, iter_state_next = next(batches)
        state, step_metrics = train_step(state, batch)
        step += 1
        iter_state = iter_state_next
        metrics.add(step, step_metrics)
        if step % config.log_every_steps == 0:
          metrics.flush()
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
          metrics.flush()  # Never save after a non-finite step.
          save(step)
        if splits.val is not None and len(splits.val) and (step % eval_period == 0 or step == total_steps):
          metrics.flush()
          val_metrics = evaluate(splits.val, "val", step)
        if stop.signal is not None:
          interrupted = signal.Signals(stop.signal).name
          metrics.flush()
          if metrics.last_good_step != step:
            save(step)
          writer.print(f"{interrupted}: saved step {step}; rerun the same command to resume")
          break
      metrics.flush()
    if interrupted is None:
      final = {**state.params, "backbone": run.backbone} if run.backbone is not None else state.params
      _save_params(workdir / "params", final)
  except BaseException:
    writer.close()
    raise
  finally:
    batches.close()

  result: dict[str, Any] = {"step": step, "total_steps": total_steps, "interrupted": interrupted}
  result.update({f"train_{k}": v for k, v in metrics.last.items()})
  result.update({f"val_{k}": v for k, v in val_metrics.items()})
  if interrupted is None and splits.test is not None and splits.test.labels is not None:
    test_metrics = evaluate(splits.test, "test", step)
    result.update({f"test_{k}": v for k, v in test_metrics.items()})
  result.update({
      "trainable_params": param_counts["trainable"], "frozen_params": param_counts["frozen"],
      "skipped_updates": metrics.skipped_updates, "wall_time_s": time.perf_counter() - t_start,
      "train_images_per_s": float(np.median(metrics.rates)) if metrics.rates else None,
      "weights": (run.provenance or {}).get("source") or (run.provenance or {}).get("source_file") or "none",
  })
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
  writer.print("summary: " + ", ".join(f"{k}={_short(v)}" for k, v in result.items()
                                       if "class" not in k and v is not None))
  writer.close()
  return result


def _short(v):
  return f"{v:.4f}" if isinstance(v, float) else v


def _evaluate(eval_fn, params, ds, batch_size: int, sharding, num_classes: int) -> dict:
  total = None
  for batch in data_lib.eval_batches(ds, batch_size=batch_size, process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    sums = eval_fn(params, distributed.put_batch(batch, sharding))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    return {}
  t = jax.device_get(total)
  n = float(t["count"])
  per_class = np.where(t["class_count"] > 0, t["class_correct"] / np.maximum(t["class_count"], 1), np.nan)
  return {
      "count": int(n), "loss": float(t["loss"]) / n, "accuracy": float(t["correct"]) / n,
      "log_loss": float(t["log_loss"]) / n, "per_class_accuracy": [float(x) for x in per_class],
  }


def _save_params(path: Path, params) -> None:
  """The final params alone, as host arrays (restorable on any topology); replaced atomically."""
  params = jax.tree.map(  # Replicated: any local shard is the whole array.
      lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a), params)
  tmp = path.with_name(f".{path.name}.tmp")
  if jax.process_index() == 0 and tmp.exists():
    shutil.rmtree(tmp)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp.absolute(), params)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    replace_dir(tmp, path)


def _write_run_files(workdir: Path, config, provenance: Optional[dict], class_names: list[str]) -> None:
  if jax.process_index() != 0:
    return
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  (workdir / "weights_provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
  (workdir / "class_names.json").write_text(json.dumps(list(class_names)) + "\n")
