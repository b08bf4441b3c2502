"""Training checkpoints (orbax) and a run's final variables."""

from __future__ import annotations

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

ITEMS = ("state", "data")


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


def save(
  mngr: ocp.CheckpointManager, step: int, state: TrainState, data_state: dict
) -> None:
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
  )
  mngr.save(step, args=args, force=True)
  mngr.wait_until_finished()


def restore(
  mngr: ocp.CheckpointManager, step: int, state: TrainState, workdir: Path
) -> tuple[TrainState, dict]:
  """(state, data iterator state) of checkpoint `step`, sharded as `state`."""
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
  return restored["state"], restored["data"]


def save_final(workdir: Path, variables: dict) -> None:
  """Each collection as host arrays in `workdir/<collection>` (any topology).

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


def _host(a) -> np.ndarray:
  # Replicated: any local shard is the whole array.
  return (
    np.asarray(a.addressable_data(0))
    if isinstance(a, jax.Array)
    else np.asarray(a)
  )
