"""Training checkpoints (orbax) and a run's final variables."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxtl import files
from flaxtl.errors import UserError
from flaxtl.train.steps import TrainState

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "run")


@dataclasses.dataclass(frozen=True)
class RunRecord:
  """What a run has spent so far, saved with every checkpoint."""

  batch_size: int
  train_s: float = 0.0  # Time in the training loop, all sessions.
  wall_s: float = 0.0  # Time of whole sessions, setup and evaluation included.
  sessions: int = 0

  def advanced(self, train_s: float, wall_s: float) -> RunRecord:
    """This record plus a session that has spent `train_s` and `wall_s`."""
    return dataclasses.replace(
      self,
      train_s=self.train_s + train_s,
      wall_s=self.wall_s + wall_s,
      sessions=self.sessions + 1,
    )


def manager(workdir: Path, max_to_keep: int) -> ocp.CheckpointManager:
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
  return ocp.CheckpointManager(
    (workdir / "checkpoints").absolute(),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    ),
    item_names=ITEMS,
  )


def latest_step(workdir: Path) -> int:
  """The step of the run's latest checkpoint (0 if none), creating nothing."""
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    return 0
  # orbax renames a step's directory to its number only once it is complete.
  steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
  return max(steps, default=0)


def save(
  mngr: ocp.CheckpointManager,
  step: int,
  state: TrainState,
  data_state: dict,
  record: RunRecord,
) -> None:
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(state),
    data=ocp.args.JsonSave(data_state),
    run=ocp.args.JsonSave(dataclasses.asdict(record)),
  )
  mngr.save(step, args=args, force=True)
  mngr.wait_until_finished()


def restore(
  mngr: ocp.CheckpointManager,
  step: int,
  state: TrainState,
  workdir: Path,
  batch_size: int,
) -> tuple[TrainState, dict, RunRecord]:
  """(state, data iterator state, run record) of checkpoint `step`.

  The state is restored into `state`'s shapes and shardings.
  """
  record = RunRecord(batch_size=batch_size)
  if (mngr.directory / str(step) / "run").exists():  # Older runs lack it.
    saved = mngr.restore(
      step, args=ocp.args.Composite(run=ocp.args.JsonRestore())
    )
    record = RunRecord(**saved["run"])
  if record.batch_size != batch_size:
    raise UserError(
      f"{workdir}: its run used batch_size={record.batch_size}, this config "
      f"has {batch_size}; resume with --config.batch_size={record.batch_size} "
      "or start a new run with another --workdir"
    )
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  args = ocp.args.Composite(
    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
  )
  try:
    restored = mngr.restore(step, args=args)
  except ValueError as e:  # Tree or shape mismatch: another model/optimiser.
    raise UserError(
      f"{workdir}: its checkpoint (step {step}) was written by a different "
      f"model or optimiser config ({str(e).splitlines()[0]}); use a new "
      "--workdir to start over"
    ) from None
  log.info("resumed from step %d in %s", step, workdir)
  return restored["state"], restored["data"], record


def restore_state_onto(
  mngr: ocp.CheckpointManager, step: int, sharding: jax.sharding.Sharding
) -> dict:
  """Checkpoint `step`'s state as arrays placed by `sharding` (e.g. one
  device), whatever mesh wrote it, without building the model."""
  path = mngr.directory / str(step) / "state"
  meta = ocp.Checkpointer(ocp.StandardCheckpointHandler()).metadata(path)
  meta = meta.item_metadata
  target = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
    dict(meta),
    is_leaf=lambda m: hasattr(m, "shape"),
  )
  args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
  return mngr.restore(step, args=args)["state"]


def save_final(workdir: Path, variables: dict) -> None:
  """Each collection in `workdir/<collection>`, read back on any topology.

  Written beside its final path and swapped in when complete.
  """
  for name, collection in variables.items():
    if not collection:
      continue
    host = jax.tree.map(_host, collection)
    path = workdir / name
    tmp = path.with_name(f".{path.name}.tmp")
    if jax.process_index() == 0 and tmp.exists():
      shutil.rmtree(tmp)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp.absolute(), host)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
      files.replace_dir(tmp, path)


def _host(a) -> np.ndarray | jax.Array:
  if not isinstance(a, jax.Array):
    return np.asarray(a)
  if a.sharding.is_fully_replicated:  # Any local shard is the whole array.
    return np.asarray(a.addressable_data(0))
  # Sharded: each process writes its own shards, none gathers the whole.
  return a
