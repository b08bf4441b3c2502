"""Variables and optimiser state sharded over a ('data', 'model') mesh.

`sharding.rules` maps '/'-joined variable paths (re.fullmatch, first match
wins) to a spec: 'fsdp' shards an array's largest axis that the 'data' axis
divides (FSDP / ZeRO-3: each device holds 1/N of it; XLA all-gathers it for
the forward pass and reduce-scatters its gradient), 'replicate' keeps a whole
copy on every device, and a tuple is a PartitionSpec over the mesh's axes,
e.g. (None, 'model') for tensor parallelism. Unmatched arrays are replicated.
Optimiser state follows the params it belongs to; batches split on 'data'.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import re
from typing import Any

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from flaxtl import tree
from flaxtl.errors import UserError

AXES = ("data", "model")
FSDP, REPLICATE = "fsdp", "replicate"
Rules = Sequence[tuple[str, Any]]


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int]:
  """`mesh.shape` with its -1 resolved; it must use every device."""
  sizes = [int(s) for s in shape]
  if sizes.count(-1) == 1:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise UserError(
        f"mesh.shape={tuple(shape)}: {known} does not divide the "
        f"{num_devices} devices"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UserError(
      f"mesh.shape={tuple(shape)} needs {math.prod(sizes)} devices, the job "
      f"has {num_devices} (use -1 for one axis to take the rest)"
    )
  return sizes[0], sizes[1]


def make_mesh(shape: Sequence[int] = (-1, 1), devices=None) -> Mesh:
  """The ('data', 'model') mesh over all the job's devices (every process)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(shape, len(devices))
  # create_device_mesh orders devices by the interconnect on TPU/GPU pods.
  return Mesh(mesh_utils.create_device_mesh(sizes, devices), AXES)


def _axis_size(mesh, entry) -> int:
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names if n is not None)


def fsdp_spec(shape: Sequence[int], nbytes: int, mesh, min_bytes: int) -> P:
  """The largest axis 'data' divides, sharded on it; small arrays replicated."""
  size = mesh.shape["data"]
  if size == 1 or nbytes < min_bytes:
    return P()
  # Largest first; on ties the last axis (a kernel's output features).
  for axis in sorted(range(len(shape)), key=lambda i: (shape[i], i))[::-1]:
    if shape[axis] % size == 0:
      return P(*(["data" if i == axis else None for i in range(axis + 1)]))
  return P()  # Nothing divides: a whole copy is still correct.


def spec_for(
  path: str, shape: Sequence[int], nbytes: int, mesh, rules: Rules, min_bytes
) -> P:
  """The PartitionSpec of the array at `path` under the first matching rule."""
  for i, (regex, spec) in enumerate(rules):
    if not re.fullmatch(regex, path):
      continue
    if spec == FSDP:
      return fsdp_spec(shape, nbytes, mesh, min_bytes)
    if spec == REPLICATE:
      return P()
    spec = tuple(spec)
    where = f"sharding.rules[{i}]=({regex!r}, {spec})"
    if len(spec) > len(shape):
      raise UserError(
        f"{where} has {len(spec)} axes but {path} has shape {tuple(shape)}"
      )
    for dim, entry in zip(shape, spec):
      if dim % _axis_size(mesh, entry):
        raise UserError(
          f"{where}: {path} (shape {tuple(shape)}) does not split over "
          f"{entry!r} of mesh {dict(mesh.shape)}"
        )
    return P(*spec)
  return P()


def variable_shardings(
  variables: Any, mesh, rules: Rules, min_kib: float = 0
) -> Any:
  """A NamedSharding per array of `variables` (arrays or ShapeDtypeStructs)."""
  min_bytes = int(min_kib * 1024)

  def one(path, leaf):
    shape = tuple(np.shape(leaf))
    nbytes = math.prod(shape) * np.dtype(leaf.dtype).itemsize
    spec = spec_for(tree.path_str(path), shape, nbytes, mesh, rules, min_bytes)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, variables)


def from_config(variables: Any, mesh, cfg) -> Any:
  """`variable_shardings` with the config's `sharding.*` keys."""
  rules = [(r, s) for r, s in cfg.rules]
  return variable_shardings(variables, mesh, rules, float(cfg.min_kib))


def like_params(opt_state: Any, params: Any, param_shardings: Any, mesh) -> Any:
  """Shardings for an optax state: each params-shaped leaf as its param.

  Optax states hold copies of the params tree (Adam's mu/nu, momentum traces,
  masked by multi_transform with MaskedNode leaves): a leaf whose key path ends
  with a param's path and has its shape takes that param's sharding; counts
  and anything else are replicated.
  """
  flat_params = tree.flatten(params)
  flat_shardings = tree.flatten(param_shardings)
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    # The trailing dict keys of the state's path: where a params copy nests.
    names: list[str] = []
    for key in reversed(path):
      if not isinstance(key, jax.tree_util.DictKey):
        break
      names.insert(0, str(key.key))
    for start in range(len(names)):
      p = "/".join(names[start:])
      if p in flat_params and np.shape(flat_params[p]) == np.shape(leaf):
        return flat_shardings[p]
    return replicated

  return jax.tree_util.tree_map_with_path(one, opt_state)


def bytes_per_device(arrays: Any) -> tuple[int, int]:
  """(bytes on one device, bytes of the whole) over arrays or abstract ones.

  The busiest device counts: shards are equal-sized under these rules.
  """
  per_device = whole = 0
  for leaf in jax.tree.leaves(arrays):
    shape = tuple(np.shape(leaf))
    itemsize = np.dtype(leaf.dtype).itemsize
    whole += math.prod(shape) * itemsize
    sharding = getattr(leaf, "sharding", None)
    local = sharding.shard_shape(shape) if sharding is not None else shape
    per_device += math.prod(local) * itemsize
  return per_device, whole


def describe(params: Any, mesh) -> str:
  """One line: what the params cost per device on this mesh."""
  per_device, whole = bytes_per_device(params)
  leaves = jax.tree.leaves(params)
  sharded = sum(not leaf.sharding.is_fully_replicated for leaf in leaves)
  axes = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
  return (
    f"params: {per_device / 2**20:.3f} MiB per device of "
    f"{whole / 2**20:.3f} MiB ({per_device / max(whole, 1):.3f}; "
    f"{sharded} of {len(leaves)} arrays sharded; mesh {axes})"
  )
