"""Converted weights on disk: an orbax checkpoint per collection + provenance.

    <dir>/params/           orbax StandardCheckpoint of the params tree
    <dir>/batch_stats/      the same for BatchNormalization statistics (if any)
    <dir>/provenance.json   source file, sha256, layout, arch, options, ...

The directory is written next to its final path and renamed into place when
complete, so a failed conversion leaves nothing behind and never touches an
existing checkpoint (replacing one needs force=True; the old one stays until
the new one is in place).
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

import flaxtl
from flaxtl import files, tree
from flaxtl.errors import UserError
from flaxtl.models import common, registry

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
COLLECTIONS = ("params", "batch_stats")
FORMAT_VERSION = 2  # 1: params only (still read).


def save(
  variables: dict,
  out: str | Path,
  provenance: dict[str, Any],
  force: bool = False,
) -> Path:
  """Writes `variables` ({'params', ['batch_stats']}) and `provenance`."""
  out = Path(out)
  if out.exists() and not force:
    raise UserError(
      f"{out}: already exists; pass --force (force=True) to replace it"
    )
  variables = {
    k: jax.tree.map(np.asarray, v) for k, v in variables.items() if v
  }
  record = {
    "format_version": FORMAT_VERSION,
    "flaxtl_version": flaxtl.__version__,
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"
    ),
    "param_count": int(
      sum(a.size for a in jax.tree.leaves(variables["params"]))
    ),
    "collections": sorted(variables),
    "shapes": {
      c: {p: list(np.shape(a)) for p, a in tree.flatten(v).items()}
      for c, v in variables.items()
    },
    **provenance,
  }
  try:
    with files.atomic_dir(out, replace=force) as tmp:
      ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
      for name, collection in variables.items():
        ckptr.save(
          (tmp / name).absolute(), args=ocp.args.StandardSave(collection)
        )
      record["files"] = _digests(tmp, sorted(variables))
      files.write_json(tmp / PROVENANCE, record)
  except OSError as e:
    raise UserError(
      f"{out}: cannot write the output directory ({e.strerror})"
    ) from None
  log.info("saved %s (%s parameters)", out, f"{record['param_count']:,}")
  return out


def _digests(root: Path, collections: list[str]) -> dict[str, str]:
  """sha256 of every file orbax wrote, by path under `root`."""
  return {
    str(p.relative_to(root)): files.file_hash(p)
    for c in collections
    for p in sorted((root / c).rglob("*"))
    if p.is_file()
  }


def _verify(path: Path, digests: dict[str, str]) -> None:
  """A missing or damaged file is named before orbax reads anything."""
  for rel, digest in digests.items():
    f = path / rel
    if not f.is_file():
      raise UserError(
        f"{path}: damaged checkpoint, {rel} is missing; convert it again"
      )
    if files.file_hash(f) != digest:
      raise UserError(
        f"{path}: damaged checkpoint, {rel} has changed; convert it again"
      )


def is_checkpoint(path: str | Path) -> bool:
  path = Path(path)
  return (path / PROVENANCE).is_file() and (path / "params").is_dir()


def read_provenance(path: str | Path) -> dict[str, Any]:
  path = Path(path)
  try:
    return json.loads((path / PROVENANCE).read_text())
  except FileNotFoundError:
    what = "half-written or " if (path / "params").is_dir() else ""
    raise UserError(
      f"{path}: {what}not a converted flaxtl checkpoint: it has no "
      f"{PROVENANCE} (convert weights with python -m flaxtl.convert)"
    ) from None
  except json.JSONDecodeError as e:
    raise UserError(f"{path / PROVENANCE}: corrupt JSON ({e.msg})") from None


def expected_shapes(provenance: dict[str, Any]) -> dict:
  """{collection: {path: shape}} of the model the provenance describes."""
  spec = registry.get(provenance["arch"])
  include_top = bool(provenance["include_top"])
  model = spec.create(
    include_top=include_top,
    num_classes=provenance.get("num_classes") or 1000,
    **provenance.get("options", {}),
  )
  shapes = common.variable_shapes(model, spec.input_size(include_top))
  return {
    c: {p: tuple(s.shape) for p, s in tree.flatten(v).items()}
    for c, v in shapes.items()
  }


def restore_variables(path: str | Path) -> dict:
  """The Flax variables of a converted checkpoint, checked against its model.

  Returns {'params': ...} plus 'batch_stats' for families that have them. The
  stored shapes are compared with what the recorded architecture expects
  before anything is read; any difference lists the offending variables.
  """
  path = Path(path).absolute()  # orbax wants absolute paths.
  prov = read_provenance(path)
  _verify(path, prov.get("files", {}))  # Checkpoints since format 2 list them.
  want = expected_shapes(prov)
  have = {}
  for collection in want:
    if not (path / collection).is_dir():
      raise UserError(f"{path}: no {collection}/ (the model has {collection})")
    have[collection] = {
      p: tuple(s.shape)
      for p, s in tree.flatten(_metadata(path / collection)).items()
    }
  _compare(path, have, want)
  return {c: restore_to_host(path / c) for c in want}


def restore(path: str | Path) -> dict:
  """The params alone of a converted checkpoint (see `restore_variables`)."""
  return restore_variables(path)["params"]


# orbax writes this file last: without it the checkpoint is half-written.
COMMIT_MARKER = "commit_success.txt"


def _metadata(path: Path) -> dict:
  if not (path / COMMIT_MARKER).is_file():
    raise UserError(
      f"{path}: half-written checkpoint (no {COMMIT_MARKER}); convert or "
      "save it again"
    )
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    meta = ckptr.metadata(path).item_metadata
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable checkpoint ({e})") from None
  if meta is None:  # orbax's answer when its metadata or manifest is damaged.
    raise UserError(f"{path}: damaged checkpoint (its metadata is unreadable)")
  return jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
    dict(meta),
    is_leaf=lambda m: hasattr(m, "shape"),
  )


def restore_to_host(path: str | Path) -> dict:
  """Any StandardCheckpoint as numpy arrays, whatever topology wrote it."""
  path = Path(path).absolute()
  abstract = _metadata(path)
  # numpy targets: a file written sharded over any mesh reads on one host.
  host = jax.tree.map(
    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract
  )
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    return ckptr.restore(
      path, args=ocp.args.PyTreeRestore(item=abstract, restore_args=host)
    )
  # A damaged user file: orbax and tensorstore raise many types for it.
  except Exception as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f"{path}: damaged checkpoint ({reason})") from None


def _compare(path: Path, have: dict, want: dict) -> None:
  problems = []
  for collection, shapes in want.items():
    got = have[collection]
    problems += [f"{k} missing" for k in shapes if k not in got]
    problems += [f"{k} unexpected" for k in got if k not in shapes]
    problems += [
      f"{k} {got[k]} != expected {v}"
      for k, v in shapes.items()
      if k in got and tuple(got[k]) != tuple(v)
    ]
  if problems:
    raise UserError(
      f"{path}: variables do not match the model: {'; '.join(problems)}"
    )
