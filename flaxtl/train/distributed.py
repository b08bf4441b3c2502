"""One device or many, one host or many: jit + NamedSharding, no pmap.

Batches are split along the mesh's 'data' axis (params and optimiser state
are placed by `flaxtl.train.sharding`). With
several processes each feeds its own slice of the global batch and
`jax.make_array_from_process_local_data` assembles the global array.
"""

from __future__ import annotations

import logging
import os

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from flaxtl.errors import UserError

log = logging.getLogger(__name__)


def initialize(cfg) -> None:
  """Starts multi-process JAX when the config or the environment asks for it."""
  num = int(cfg.num_processes)
  env_coord = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num <= 1 and not env_coord:
    return
  if jax.distributed.is_initialized():
    return
  # CPU backend only; set before the backend starts (asking which would).
  jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  if num > 1:
    if not cfg.coordinator_address:
      raise UserError(
        "distributed.num_processes > 1 needs distributed.coordinator_address "
        "(host:port)"
      )
    jax.distributed.initialize(
      cfg.coordinator_address, num_processes=num, process_id=int(cfg.process_id)
    )
  else:
    # Cluster environment variables (SLURM, TPU pods, JAX_*).
    jax.distributed.initialize()
  log.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
  """(replicated, batch-split) shardings."""
  return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def check_batch(batch_size: int, what: str = "batch_size") -> None:
  devices, processes = jax.device_count(), jax.process_count()
  if batch_size % devices:
    raise UserError(
      f"{what}={batch_size} does not divide across {devices} devices"
    )
  if batch_size % processes:
    raise UserError(
      f"{what}={batch_size} does not divide across {processes} processes"
    )


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
  """Host-local numpy batch -> global jax.Array split over the mesh."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return {
    k: jax.make_array_from_process_local_data(sharding, v)
    for k, v in batch.items()
  }
