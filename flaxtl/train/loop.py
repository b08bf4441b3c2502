"""The transfer-learning run: `train_and_evaluate(config, workdir) -> metrics`.

One freeze phase at a time (gradual unfreezing starts a new phase, with a new
optimiser and one new compilation); checkpoints carry params, BN statistics,
optimiser state, step, rng and the data iterator position, so rerunning the
same command in the same workdir resumes exactly where the last checkpoint
left off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxtl import data as data_lib
from flaxtl import files
from flaxtl.errors import UserError
from flaxtl.models.heads import HeadOnly, MLPHead
from flaxtl.ops import cpu
from flaxtl.preprocess import prepare_images
from flaxtl.train import checkpoint, distributed, features, setup, steps
from flaxtl.train import config as config_lib
from flaxtl.train.metrics import MetricWriter, PendingMetrics, summarise_eval
from flaxtl.train.summary import counts, param_table

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Phase:
  start_step: int
  first_layers: int


def phases(
  config: ml_collections.ConfigDict, steps_per_epoch: int
) -> list[Phase]:
  out = [Phase(0, int(config.freeze.first_layers))]
  for epoch, k in sorted(config.freeze.phases):
    out.append(Phase(int(epoch) * steps_per_epoch, int(k)))
  return out


def phase_index(all_phases: list[Phase], step: int) -> int:
  return max(i for i, p in enumerate(all_phases) if p.start_step <= step)


class _StopFlag:
  """SIGTERM/SIGINT ask the loop to save a checkpoint and return."""

  def __init__(self):
    self.signal: int | None = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      # Not the main thread (ValueError): leave signals alone.
      with contextlib.suppress(ValueError):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


@dataclasses.dataclass(frozen=True)
class Run:
  """What training needs once data and weights are in place."""

  model: nn.Module
  variables: dict  # {'params': ..., 'batch_stats': ...}
  prepare: Any  # Device-side batch["image"] -> model input.
  splits: Any  # Backbone features instead of images when features are cached.
  provenance: dict | None
  frozen_backbone: dict | None = None  # Host variables of a cached backbone.


def load_data(config: ml_collections.ConfigDict):
  """The train/val/test splits, checked against the model and batch size."""
  splits = data_lib.load(config.data)
  num_classes = len(splits.class_names)
  if config.model.num_classes and config.model.num_classes != num_classes:
    raise UserError(
      f"model.num_classes={config.model.num_classes} but the data has "
      f"{num_classes} classes ({config.data.source})"
    )
  if splits.train is None or len(splits.train) == 0:
    raise UserError(f"data.source={config.data.source!r}: no training examples")
  if len(splits.train) < config.batch_size:
    raise UserError(
      f"batch_size={config.batch_size} is larger than the "
      f"{len(splits.train)} training examples"
    )
  return splits


def _check_feature_mode(config: ml_collections.ConfigDict) -> None:
  m = config.model
  if m.name != "transfer" or m.head == "keras_top":
    raise UserError(
      "model.cache_features needs model.name='transfer' with model.head "
      "'mlp' or 'linear'"
    )
  if config.freeze.first_layers or config.freeze.phases:
    raise UserError(
      "model.cache_features trains the head alone (the backbone is frozen by "
      "construction): set freeze.first_layers=0 and freeze.phases=()"
    )
  if data_lib.augment_mode(config.data.augment) != "none":
    raise UserError(
      "model.cache_features cannot augment: features are computed once "
      "per image"
    )


def _split_backbone(variables: dict) -> tuple[dict, dict]:
  """(backbone variables, the rest), per collection."""
  inner = {c: v["backbone"] for c, v in variables.items() if "backbone" in v}
  rest = {
    c: {k: x for k, x in v.items() if k != "backbone"}
    for c, v in variables.items()
  }
  return inner, rest


def _cached_features_run(config, run: Run, compiler_options) -> Run:
  """The head alone on backbone features computed once (and cached on disk)."""
  spec = config_lib.backbone(config)
  backbone_vars, head_vars = _split_backbone(jax.device_get(run.variables))
  backbone = spec.build(
    include_top=False,
    output_layer=config_lib.feature_layer(config),
    dtype=config_lib.DTYPES[config.model.dtype],
    **config_lib.backbone_options(config),
  )

  def convert(ds, split: str):
    if ds is None:
      return None
    feats = features.extract(
      backbone,
      backbone_vars,
      ds,
      image_size=config.image_size,
      preprocess=config_lib.preprocess_mode(config),
      cache_dir=Path(config.model.features_cache_dir),
      split=split,
      compiler_options=compiler_options,
      options=data_lib.Options.from_config(config),
    )
    return data_lib.Dataset.from_arrays(feats, ds.labels, name=split)

  splits = dataclasses.replace(
    run.splits,
    train=convert(run.splits.train, "train"),
    val=convert(run.splits.val, "val"),
    test=convert(run.splits.test, "test"),
  )
  head = MLPHead(**run.model.head_kwargs(), parent=None)
  return Run(
    model=HeadOnly(head, pooling=config.model.pooling),
    variables=jax.device_put(head_vars),
    prepare=lambda feats: feats.astype(jnp.float32),
    splits=splits,
    provenance=run.provenance,
    frozen_backbone=backbone_vars,
  )


def _setup(config, splits, init_rng: jax.Array, replicated) -> Run:
  """Model, initial variables (pretrained merged in), cached features."""
  model = setup.build_model(config, len(splits.class_names))
  cached = bool(config.model.cache_features)
  if cached:
    _check_feature_mode(config)
  # Shape-first: every phase's rules are checked on abstract params first.
  abstract = setup.abstract_variables(model, config.image_size, init_rng)
  params = abstract["params"]
  for k in [config.freeze.first_layers, *(k for _, k in config.freeze.phases)]:
    setup.freeze_plan(
      config,
      {"head": params["head"]} if cached else params,
      k,
      log_matches=False,
    )

  variables = jax.jit(
    setup.init_fn(model, config.image_size), out_shardings=replicated
  )(init_rng)
  variables, provenance = setup.load_pretrained(config, variables)
  mode = config_lib.preprocess_mode(config)
  run = Run(
    model=model,
    variables=jax.device_put(variables, replicated),
    prepare=lambda images: prepare_images(images, config.image_size, mode),
    splits=splits,
    provenance=provenance,
  )
  if cached:
    options = setup.compiler_options(config, dtype=config.model.dtype)
    run = _cached_features_run(config, run, options)
  return run


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | Path
) -> dict[str, Any]:
  """Trains and evaluates as `config` says; returns the final metrics."""
  t_start = time.perf_counter()
  workdir = Path(workdir)
  config_lib.validate(config)
  if config.tune_malloc:
    cpu.tune_malloc()  # Before the first big allocation.
  distributed.initialize(config.distributed)
  # Asking for the device count starts the backend: only after initialize.
  distributed.check_batch(config.batch_size)
  distributed.check_batch(config.eval_batch_size, "eval_batch_size")

  data_opts = data_lib.Options.from_config(config)  # Checks data.* keys.
  splits = load_data(config)
  num_classes = len(splits.class_names)
  mesh = distributed.make_mesh()
  replicated, batch_sharding = distributed.shardings(mesh)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  run = _setup(config, splits, init_rng, replicated)
  model, splits = run.model, run.splits
  batch_stats = run.variables.get("batch_stats", {})

  if run.frozen_backbone is not None:
    data_opts = data_opts.for_arrays()  # Cached features pass as they are.
  train_iter = data_lib.TrainIterator(
    splits.train,
    batch_size=config.batch_size,
    seed=config.seed,
    shuffle=True,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    options=data_opts,
  )
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = (
    int(config.total_steps) or int(config.num_epochs) * steps_per_epoch
  )
  eval_period = max(1, int(config.eval_every_epochs)) * steps_per_epoch
  all_phases = phases(config, steps_per_epoch)
  manager = checkpoint.manager(workdir, config.max_to_keep)

  def compile_train_step(plan_):
    tx_, fn, options = setup.train_step(
      config, model, plan_, total_steps, run.prepare, batch_stats
    )
    if options:
      log.info("train step compiled with %s", options)
    jitted = jax.jit(
      fn,
      donate_argnums=0,
      out_shardings=(replicated, replicated),
      compiler_options=options,
    )
    return tx_, jitted

  def init_opt_state(params):
    return jax.jit(tx.init, out_shardings=replicated)(params)

  start_step = manager.latest_step() or 0
  phase_i = phase_index(all_phases, start_step)
  params = run.variables["params"]
  plan = setup.freeze_plan(config, params, all_phases[phase_i].first_layers)
  tx, train_step = compile_train_step(plan)
  state = steps.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=init_opt_state(params),
    rng=jax.device_put(train_rng, replicated),
  )
  if start_step:
    state, iter_state = checkpoint.restore(manager, start_step, state, workdir)
    train_iter.set_state(iter_state)

  writer = MetricWriter(
    workdir, total_steps, start_step, config.batch_size, config.progress
  )
  _write_run_files(workdir, config, run.provenance, splits.class_names)
  writer.print(param_table(state.params, plan))
  param_counts = counts(state.params, plan)
  if run.frozen_backbone is not None:
    frozen = run.frozen_backbone.get("params", {})
    param_counts["frozen"] += sum(
      int(np.size(a)) for a in jax.tree.leaves(frozen)
    )
    writer.print(
      f"backbone: {param_counts['frozen']:,} params frozen (features cached "
      f"in {config.model.features_cache_dir})"
    )

  eval_fn = jax.jit(
    steps.make_eval_step(model, num_classes, prepare=run.prepare),
    compiler_options=setup.compiler_options(config, dtype=config.model.dtype),
  )
  metrics = PendingMetrics(
    writer, config.nan_policy, workdir, last_good_step=start_step
  )

  def save(step: int) -> None:
    checkpoint.save(manager, step, state, iter_state)
    metrics.last_good_step = step

  skipped_eval: set = set()  # Unreadable files masked out (skip_corrupt).

  def evaluate(ds, split: str, step: int) -> dict:
    out = _evaluate(
      eval_fn,
      state.variables(),
      ds,
      config.eval_batch_size,
      batch_sharding,
      data_opts,
      skipped_eval,
    )
    writer.write(step, split, out)
    shown = ", ".join(
      f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float)
    )
    writer.print(f"step {step} {split}: {shown}")
    return out

  def put(batch):
    return distributed.put_batch(batch, batch_sharding)

  batches = data_lib.prefetch(train_iter, size=config.data.prefetch, put=put)
  val_metrics: dict = {}
  iter_state = batches.get_state()
  interrupted = None
  step = start_step
  has_val = splits.val is not None and len(splits.val) > 0
  try:
    with _StopFlag() as stop:
      while step < total_steps:
        i = phase_index(all_phases, step)
        if i != phase_i:
          metrics.flush()
          phase_i = i
          plan = setup.freeze_plan(
            config, state.params, all_phases[i].first_layers
          )
          tx, train_step = compile_train_step(plan)
          # A new phase gets a fresh optimiser, as Keras' recompile does.
          state = state.replace(opt_state=init_opt_state(state.params))
          writer.print(
            f"phase {i}: first_layers={all_phases[i].first_layers} "
            f"from step {step}"
          )
          writer.print(param_table(state.params, plan))
        batch = next(batches)
        state, step_metrics = train_step(state, batch)
        step += 1
        iter_state = batches.get_state()
        metrics.add(step, step_metrics)
        if step % config.log_every_steps == 0:
          metrics.flush()
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
          metrics.flush()  # Never save after a non-finite step.
          save(step)
        if has_val and (step % eval_period == 0 or step == total_steps):
          metrics.flush()
          val_metrics = evaluate(splits.val, "val", step)
        if stop.signal is not None:
          interrupted = signal.Signals(stop.signal).name
          metrics.flush()
          if metrics.last_good_step != step:
            save(step)
          writer.print(
            f"{interrupted}: saved step {step}; rerun the same command "
            "to resume"
          )
          break
      metrics.flush()
    if interrupted is None:
      final = state.variables()
      if run.frozen_backbone is not None:
        final = _with_backbone(final, run.frozen_backbone)
      checkpoint.save_final(workdir, final)
  except BaseException:
    writer.close()
    raise
  finally:
    batches.close()
    train_iter.close()

  result: dict[str, Any] = {
    "step": step,
    "total_steps": total_steps,
    "interrupted": interrupted,
  }
  result.update({f"train_{k}": v for k, v in metrics.last.items()})
  result.update({f"val_{k}": v for k, v in val_metrics.items()})
  if (
    interrupted is None
    and splits.test is not None
    and splits.test.labels is not None
  ):
    test_metrics = evaluate(splits.test, "test", step)
    result.update({f"test_{k}": v for k, v in test_metrics.items()})
  provenance = run.provenance or {}
  result.update(
    {
      "trainable_params": param_counts["trainable"],
      "frozen_params": param_counts["frozen"],
      "skipped_updates": metrics.skipped_updates,
      "corrupt_files_skipped": len(train_iter.skipped) + len(skipped_eval),
      "wall_time_s": time.perf_counter() - t_start,
      "train_images_per_s": float(np.median(metrics.rates))
      if metrics.rates
      else None,
      "weights": provenance.get("source")
      or provenance.get("source_file")
      or "none",
    }
  )
  if jax.process_index() == 0:
    files.write_json(workdir / "summary.json", result)
  shown = ", ".join(
    f"{k}={_short(v)}"
    for k, v in result.items()
    if "class" not in k and v is not None
  )
  writer.print("summary: " + shown)
  writer.close()
  return result


def _with_backbone(variables: dict, backbone: dict) -> dict:
  """A head's variables with the cached backbone's put back under 'backbone'."""
  out = {c: dict(v) for c, v in variables.items()}
  for c, v in backbone.items():
    out.setdefault(c, {})["backbone"] = v
  return out


def _short(v):
  return f"{v:.4f}" if isinstance(v, float) else v


def _evaluate(
  eval_fn, variables: dict, ds, batch_size: int, sharding, opts, skipped
) -> dict:
  total = None
  for batch in data_lib.eval_batches(
    ds,
    batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    options=opts,
    skipped=skipped,
  ):
    sums = eval_fn(variables, distributed.put_batch(batch, sharding))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return {} if total is None else summarise_eval(jax.device_get(total))


def _write_run_files(
  workdir: Path, config, provenance: dict | None, class_names: list[str]
) -> None:
  if jax.process_index() != 0:
    return
  files.write_text(
    workdir / "config.json", config.to_json_best_effort(indent=2) + "\n"
  )
  files.write_json(workdir / "weights_provenance.json", provenance)
  files.write_json(workdir / "class_names.json", list(class_names))
