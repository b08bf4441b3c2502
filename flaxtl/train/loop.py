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

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flaxtl import data as data_lib
from flaxtl import files
from flaxtl.ops import cpu
from flaxtl.peft import core as peft_core
from flaxtl.train import checkpoint, distributed, prepare, records, setup, steps
from flaxtl.train import config as config_lib
from flaxtl.train import sharding as sharding_lib
from flaxtl.train import workdir as workdir_lib
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


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str | Path
) -> dict[str, Any]:
  """Trains and evaluates as `config` says; returns the final metrics.

  Rerunning a finished run returns what it recorded (summary.json) and
  changes nothing; rerunning an interrupted one resumes it.
  """
  t_start = time.perf_counter()
  workdir = Path(workdir)
  config_lib.validate(config)
  if config.tune_malloc:
    cpu.tune_malloc()  # Before the first big allocation.
  distributed.initialize(config.distributed)
  # Asking for the device count starts the backend: only after initialize.
  distributed.check_batch(config.batch_size)
  distributed.check_batch(config.eval_batch_size, "eval_batch_size")
  made = workdir_lib.create(workdir) if jax.process_index() == 0 else []
  try:
    return _train_locked(config, workdir, t_start)
  except BaseException:
    workdir_lib.remove_if_unused(made)  # Refused or failed before any output.
    raise


def _train_locked(config, workdir: Path, t_start: float) -> dict[str, Any]:
  with workdir_lib.locked(workdir):
    data_lib.Options.from_config(config)  # Checks the data.* keys first.
    splits = prepare.load_data(config)
    # Full batches only: the last partial batch of an epoch is dropped.
    steps_per_epoch = len(splits.train) // config.batch_size
    total_steps = (
      int(config.total_steps) or int(config.num_epochs) * steps_per_epoch
    )
    start_step = checkpoint.latest_step(workdir)
    recorded = records.recorded_summary(workdir, start_step, total_steps)
    if recorded is not None:
      workdir_lib.check_same_config(workdir, config.to_json_best_effort())
      log.info(
        "%s: finished at step %d; its results are in %s (nothing to do)",
        workdir,
        start_step,
        workdir / "summary.json",
      )
      return recorded
    trainer = _Trainer(config, workdir, splits, total_steps, t_start)
    try:
      return trainer.run(start_step)
    finally:
      trainer.close()


class _Trainer:
  """One session of a run: set up, resume, train, evaluate, record."""

  def __init__(
    self,
    config,
    workdir: Path,
    splits,
    total_steps: int,
    t_start: float,
  ):
    self.config, self.workdir, self.t_start = config, workdir, t_start
    self.total_steps = total_steps
    self.num_classes = len(splits.class_names)
    self.mesh = mesh = sharding_lib.make_mesh(config.mesh.shape)
    self.replicated, self.batch_sharding = distributed.shardings(mesh)
    init_rng, self.train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    self.run_ = prepare.prepare(config, splits, init_rng, mesh)
    self.model, self.splits = self.run_.model, self.run_.splits
    # Where each variable lives for the whole run (the head's, when cached).
    self.var_shardings = sharding_lib.from_config(
      self.run_.variables, mesh, config.sharding
    )
    # Shapes only: the arrays themselves are donated to the first step.
    self.abstract_params = jax.eval_shape(
      lambda v: v["params"], self.run_.variables
    )
    self.data_opts = data_lib.Options.from_config(config)
    if self.run_.frozen_backbone is not None:
      self.data_opts = self.data_opts.for_arrays()  # Features pass as is.
    self.skipped_eval: set[int] = set()  # Unreadable images masked out.
    self.train_iter = data_lib.TrainIterator(
      self.splits.train,
      batch_size=config.batch_size,
      seed=config.seed,
      shuffle=True,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      options=self.data_opts,
    )
    steps_per_epoch = self.train_iter.steps_per_epoch
    self.eval_period = int(config.eval_every_epochs) * steps_per_epoch
    self.phases = phases(config, steps_per_epoch)
    # After setup: a run refused by it leaves no checkpoints/ behind.
    self.manager = checkpoint.manager(workdir, config.max_to_keep)
    self.has_val = self.splits.val is not None and len(self.splits.val) > 0
    self.writer: MetricWriter | None = None
    self.batches = None
    self.eval_fn = None

  def close(self) -> None:
    if self.batches is not None:
      self.batches.close()
    self.train_iter.close()
    if self.writer is not None:
      self.writer.close()

  # --- the pieces ------------------------------------------------------------

  def compile_train_step(self, plan):
    tx, fn, options = setup.train_step(
      self.config,
      self.model,
      plan,
      self.total_steps,
      self.run_.prepare,
      self.run_.variables.get("batch_stats", {}),
    )
    if options:
      log.info("train step compiled with %s", options)
    params = self.var_shardings["params"]
    self.opt_shardings = sharding_lib.like_params(
      jax.eval_shape(tx.init, self.abstract_params),
      self.abstract_params,
      params,
      self.mesh,
    )
    r = self.replicated
    state = steps.TrainState(
      step=r,
      params=params,
      batch_stats=self.var_shardings.get("batch_stats", {}),
      opt_state=self.opt_shardings,
      rng=r,
    )
    jitted = jax.jit(
      fn,
      in_shardings=(state, self.batch_sharding),
      out_shardings=(state, r),
      donate_argnums=0,
      compiler_options=options,
    )
    return tx, jitted

  def roles(self, params) -> dict[str, str] | None:
    """PEFT runs: each parameter's role (adapter, head, base) in the table."""
    if not peft_core.methods(self.config):
      return None
    return peft_core.roles(self.config, params)

  def init_opt_state(self, tx, params):
    return jax.jit(tx.init, out_shardings=self.opt_shardings)(params)

  def evaluate(self, eval_fn, state, split: str, step: int) -> dict:
    ds = getattr(self.splits, split)
    out = _evaluate(
      eval_fn,
      state.variables(),
      ds,
      self.config.eval_batch_size,
      self.batch_sharding,
      self.data_opts,
      self.skipped_eval,
    )
    self.writer.write(step, split, out)
    shown = ", ".join(
      f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float)
    )
    self.writer.print(f"step {step} {split}: {shown}")
    return out

  def batches_from(self, iterator):
    def put(batch):
      return distributed.put_batch(batch, self.batch_sharding)

    return data_lib.prefetch(iterator, size=self.config.data.prefetch, put=put)

  # --- the run ---------------------------------------------------------------

  def phase_step(self, phase: int, params):
    """(plan, optimiser, jitted step) of a freeze phase."""
    first = self.phases[phase].first_layers
    plan = setup.freeze_plan(self.config, params, first, spec=self.run_.spec)
    return (plan, *self.compile_train_step(plan))

  def start(self, start_step: int):
    """(state, plan, optimiser, step fn, prior record) to train from."""
    config = self.config
    variables = jax.device_put(self.run_.variables, self.var_shardings)
    params = variables["params"]
    plan, tx, train_step = self.phase_step(
      phase_index(self.phases, start_step), params
    )
    state = steps.TrainState(
      # Placed like the step's output: else the second call recompiles.
      step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=self.init_opt_state(tx, params),
      rng=jax.device_put(self.train_rng, self.replicated),
    )
    prior = checkpoint.RunRecord(batch_size=config.batch_size)
    if start_step:
      state, iter_state, prior = checkpoint.restore(
        self.manager, start_step, state, self.workdir, config.batch_size
      )
      self.train_iter.set_state(iter_state)
    return state, plan, train_step, prior

  def param_counts(self, state, plan) -> dict[str, int]:
    """The parameter table printed; trainable and frozen counts returned."""
    writer = self.writer
    writer.print(param_table(state.params, plan, self.roles(state.params)))
    writer.print(sharding_lib.describe(state.params, self.mesh))
    param_counts = counts(state.params, plan)
    if self.run_.frozen_backbone is not None:
      frozen = self.run_.frozen_backbone.get("params", {})
      param_counts["frozen"] += sum(
        int(np.size(a)) for a in jax.tree.leaves(frozen)
      )
      writer.print(
        f"backbone: {param_counts['frozen']:,} params frozen (features "
        f"cached in {self.config.model.features_cache_dir})"
      )
    return param_counts

  def run(self, start_step: int) -> dict[str, Any]:
    config, workdir = self.config, self.workdir
    state, plan, train_step, prior = self.start(start_step)
    self.writer = MetricWriter(
      workdir, self.total_steps, start_step, config.batch_size, config.progress
    )
    records.write_run_files(
      workdir, config, self.run_.provenance, self.splits.class_names
    )
    param_counts = self.param_counts(state, plan)
    self.eval_fn = jax.jit(
      steps.make_eval_step(
        self.model, self.num_classes, prepare=self.run_.prepare
      ),
      out_shardings=self.replicated,  # Sums every process can read.
      compiler_options=setup.compiler_options(config, dtype=config.model.dtype),
    )
    metrics = PendingMetrics(
      self.writer,
      config.nan_policy,
      workdir,
      last_good_step=start_step if start_step else None,
    )
    t_loop = time.perf_counter()
    state, step, val_metrics, interrupted = self.train(
      state, plan, train_step, start_step, metrics, prior, t_loop
    )
    result: dict[str, Any] = {
      "step": step,
      "total_steps": self.total_steps,
      "interrupted": interrupted,
    }
    if interrupted is not None:
      return result
    train_s = prior.train_s + time.perf_counter() - t_loop
    return self.finish(
      state, step, val_metrics, metrics, prior, train_s, param_counts, result
    )

  def train(self, state, plan, train_step, step, metrics, prior, t_loop):
    """The steps from `step` to the end (or a signal): (state, step, the
    last validation metrics, the signal's name or None)."""
    config, writer = self.config, self.writer
    phase_i = phase_index(self.phases, step)
    self.batches = batches = self.batches_from(self.train_iter)
    iter_state = batches.get_state()

    def save(step: int) -> None:
      record = prior.advanced(
        train_s=time.perf_counter() - t_loop,
        wall_s=time.perf_counter() - self.t_start,
      )
      checkpoint.save(self.manager, step, state, iter_state, record)
      metrics.last_good_step = step

    val_metrics: dict = {}
    interrupted = None
    with _StopFlag() as stop:
      while step < self.total_steps:
        i = phase_index(self.phases, step)
        if i != phase_i:
          metrics.flush()
          phase_i = i
          plan, tx, train_step = self.phase_step(i, state.params)
          # A new phase gets a fresh optimiser, as Keras' recompile does.
          state = state.replace(opt_state=self.init_opt_state(tx, state.params))
          first = self.phases[i].first_layers
          writer.print(f"phase {i}: first_layers={first} from step {step}")
          writer.print(
            param_table(state.params, plan, self.roles(state.params))
          )
        state, step_metrics = train_step(state, next(batches))
        step += 1
        iter_state = batches.get_state()
        metrics.add(step, step_metrics)
        last = step == self.total_steps
        if step % config.log_every_steps == 0:
          metrics.flush()
        if step % config.checkpoint_every_steps == 0 or last:
          metrics.flush()  # Never save after a non-finite step.
          save(step)
        if self.has_val and (step % self.eval_period == 0 or last):
          metrics.flush()
          val_metrics = self.evaluate(self.eval_fn, state, "val", step)
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
    return state, step, val_metrics, interrupted

  def finish(
    self,
    state,
    step,
    val_metrics,
    metrics,
    prior,
    train_s,
    param_counts,
    result,
  ) -> dict[str, Any]:
    """Final variables saved, the test split evaluated, summary.json."""
    workdir = self.workdir
    final = state.variables()
    if self.run_.frozen_backbone is not None:
      final = prepare.with_backbone(final, self.run_.frozen_backbone)
    checkpoint.save_final(workdir, final)
    train_last = metrics.last or records.last_record(workdir, "train")
    if self.has_val and not val_metrics:  # Resumed at the last step.
      val_metrics = self.evaluate(self.eval_fn, state, "val", step)
    result.update(
      {
        f"train_{k}": v
        for k, v in train_last.items()
        if k not in ("step", "split")
      }
    )
    result.update({f"val_{k}": v for k, v in val_metrics.items()})
    test = self.splits.test
    if test is not None and test.labels is not None:
      test_metrics = self.evaluate(self.eval_fn, state, "test", step)
      result.update({f"test_{k}": v for k, v in test_metrics.items()})
    provenance = self.run_.provenance or {}
    rates = metrics.rates
    result.update(
      {
        "trainable_params": param_counts["trainable"],
        "frozen_params": param_counts["frozen"],
        "skipped_updates": metrics.skipped_updates,
        "corrupt_files_skipped": len(self.train_iter.skipped)
        + len(self.skipped_eval),
        "train_time_s": train_s,
        "wall_time_s": prior.wall_s + time.perf_counter() - self.t_start,
        "sessions": prior.sessions + 1,
        "train_images_per_s": float(np.median(rates)) if rates else None,
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
    self.writer.print("summary: " + shown)
    return result


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
