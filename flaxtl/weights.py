"""Converted weights on disk: an orbax checkpoint plus a provenance JSON.

    <dir>/params/           orbax StandardCheckpoint of {layer: {kernel, bias}}
    <dir>/provenance.json   source file, sha256, layout, arch, include_top, ...

Writes go to a temporary sibling directory that is renamed into place only
when complete, so a failed conversion leaves nothing behind and never touches
an existing checkpoint (replacing one needs force=True, and the old one is
kept until the new one is in place).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

import flaxtl
from flaxtl.errors import UserError
from flaxtl.models import vgg

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
PARAMS = "params"
FORMAT_VERSION = 1


def save(params: dict, out: str | Path, provenance: dict[str, Any], force: bool = False) -> Path:
  """Writes `params` and `provenance` to the checkpoint directory `out`."""
  out = Path(out)
  if out.exists() and not force:
    raise UserError(f"{out}: already exists; pass --force (force=True) to replace it")
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the result should not be.
  except OSError as e:
    raise UserError(f"{out}: cannot write the output directory ({e.strerror})") from None
  try:
    params = jax.tree.map(np.asarray, params)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    ckptr.save((tmp / PARAMS).absolute(), args=ocp.args.StandardSave(params))
    record = {
        "format_version": FORMAT_VERSION,
        "flaxtl_version": flaxtl.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "param_count": int(sum(a.size for a in jax.tree.leaves(params))),
        "layers": {k: {n: list(a.shape) for n, a in v.items()} for k, v in params.items()},
        **provenance,
    }
    (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    replace_dir(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log.info("saved %s (%s parameters)", out, f"{record['param_count']:,}")
  return out


def replace_dir(tmp: Path, out: Path) -> None:
  """Moves the finished `tmp` to `out`; an old `out` survives until then."""
  if not out.exists():
    os.replace(tmp, out)
    return
  old = out.with_name(f".{out.name}.old-{os.getpid()}")
  os.replace(out, old)
  try:
    os.replace(tmp, out)
  except BaseException:
    os.replace(old, out)
    raise
  shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def is_checkpoint(path: str | Path) -> bool:
  path = Path(path)
  return (path / PROVENANCE).is_file() and (path / PARAMS).is_dir()


def read_provenance(path: str | Path) -> dict[str, Any]:
  path = Path(path)
  try:
    return json.loads((path / PROVENANCE).read_text())
  except FileNotFoundError:
    raise UserError(f"{path}: not a flaxtl weights checkpoint (no {PROVENANCE})") from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path / PROVENANCE}: corrupt JSON ({e.msg})") from None


def expected_shapes(arch: str, include_top: bool, num_classes: Optional[int]) -> dict:
  model = vgg.VGG(arch=arch, include_top=include_top, num_classes=num_classes or 1000)
  size = vgg.TOP_SIZE if include_top else vgg.MIN_SIZE
  return jax.tree.map(lambda s: tuple(s.shape), vgg.param_shapes(model, size))


def restore(path: str | Path) -> dict:
  """Restores the params of a converted checkpoint, checked against the model.

  The checkpoint's stored shapes are compared with what `VGG(arch, include_top,
  num_classes)` expects before anything is read; any difference is an error
  that lists the offending parameters.
  """
  path = Path(path).absolute()  # orbax wants absolute paths (relative ones yield no metadata).
  prov = read_provenance(path)
  want = expected_shapes(prov["arch"], prov["include_top"], prov.get("num_classes"))
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    meta = ckptr.metadata(path / PARAMS).item_metadata
  except (OSError, ValueError, FileNotFoundError) as e:
    raise UserError(f"{path}: unreadable checkpoint ({e})") from None
  have = jax.tree.map(lambda m: tuple(m.shape), dict(meta), is_leaf=lambda m: hasattr(m, "shape"))
  _compare(path, have, want)
  return restore_to_host(path / PARAMS)


def restore_to_host(path: str | Path) -> dict:
  """Any StandardCheckpoint as numpy arrays, whatever device topology wrote it."""
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  meta = ckptr.metadata(Path(path).absolute()).item_metadata
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(meta), is_leaf=lambda m: hasattr(m, "shape")
  )
  return ckptr.restore(Path(path).absolute(), args=ocp.args.StandardRestore(abstract))


def _compare(path: Path, have: dict, want: dict) -> None:
  flat_have = {"/".join(k): v for k, v in _flatten(have)}
  flat_want = {"/".join(k): v for k, v in _flatten(want)}
  problems = [f"{k} missing" for k in flat_want if k not in flat_have]
  problems += [f"{k} unexpected" for k in flat_have if k not in flat_want]
  problems += [
      f"{k} {flat_have[k]} != expected {v}"
      for k, v in flat_want.items()
      if k in flat_have and tuple(flat_have[k]) != tuple(v)
  ]
  if problems:
    raise UserError(f"{path}: params do not match the model: {'; '.join(problems)}")


def _flatten(tree: dict, prefix: tuple = ()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v
