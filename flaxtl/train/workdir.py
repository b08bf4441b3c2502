"""A run's workdir: created with a clear error, and held by one run at a time.

The lock is an `fcntl.flock` on `<workdir>/.lock`: the kernel drops it when
the holding process exits, however it exits (SIGKILL included), so a killed
run never blocks the rerun. The file also records who holds it (pid, host,
start time) for the message a second run gets. In a multi-process job,
process 0 takes the lock for the whole job and tells the others whether it
got it, so every process of a refused job stops with the same line.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import datetime
import fcntl
import json
import os
from pathlib import Path
import socket

import jax
from jax.experimental import multihost_utils
import numpy as np

from flaxtl.errors import UserError

LOCK_FILE = ".lock"


def create(workdir: Path) -> list[Path]:
  """mkdir -p, with one line when the path is under a file or unwritable.

  Returns the directories it made, deepest first (for `remove_if_unused`).
  """
  made = [p for p in (workdir, *workdir.parents) if not p.exists()]
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except FileExistsError:
    raise UserError(f"workdir {workdir}: a file is in the way") from None
  except NotADirectoryError:
    raise UserError(f"workdir {workdir}: part of its path is a file") from None
  except OSError as e:
    raise UserError(
      f"workdir {workdir}: cannot create it ({e.strerror})"
    ) from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"workdir {workdir}: not writable")
  return made


def remove_if_unused(made: list[Path]) -> None:
  """Removes the directories `create` made if the run left only its lock.

  A run refused on bad input must not leave a workdir holding a stale
  `.lock`, which looks like a run to the next command and the user.
  """
  if not made or jax.process_index() != 0:
    return
  workdir = made[0]
  with contextlib.suppress(OSError):
    if {p.name for p in workdir.iterdir()} <= {LOCK_FILE}:
      (workdir / LOCK_FILE).unlink(missing_ok=True)
      for d in made:
        d.rmdir()  # Only empty ones: stops at anything else written there.


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
  """Holds the workdir for the block; refuses if another live run holds it."""
  handle, holder = None, None
  if jax.process_index() == 0:
    handle, holder = _try_lock(workdir)
  if jax.process_count() > 1:
    got = multihost_utils.broadcast_one_to_all(np.int32(holder is None))
    if not int(got) and holder is None:
      holder = "another run (its process 0 holds the lock)"
  if holder is not None:
    raise UserError(
      f"workdir {workdir} is in use by {holder}; wait for it to "
      "finish or use another --workdir"
    )
  try:
    yield
  finally:
    if handle is not None:
      handle.close()  # Releases the flock.


# Keys that say how a run runs, not what it computes: a finished run rerun
# with other values of these reports its results as it is.
OPERATIONAL_KEYS = (
  "progress",
  "log_every_steps",
  "log_grad_norm",
  "checkpoint_every_steps",
  "max_to_keep",
  "eval_batch_size",
  "tune_malloc",
  "xla_cpu_ynn",
  "model.conv_impl",
  "model.features_cache_dir",
  "data.workers",
  "data.prefetch",
  "distributed.",
)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def config_differences(recorded: dict, config: dict) -> list[str]:
  """'key: old -> new' for each key (not operational) that differs."""
  old, new = _flat(recorded), _flat(config)
  out = []
  for key in sorted(set(old) | set(new)):
    if key.startswith(OPERATIONAL_KEYS) or old.get(key) == new.get(key):
      continue
    out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
  return out


def check_same_config(workdir: Path, config_json: str) -> None:
  """Refuses to report a finished run recorded with another config."""
  path = workdir / "config.json"
  try:
    recorded = json.loads(path.read_text())
  except (OSError, ValueError):
    return  # No record to compare with (older runs): report it as it is.
  diffs = config_differences(recorded, json.loads(config_json))
  if diffs:
    shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
    raise UserError(
      f"workdir {workdir} holds a finished run of another config "
      f"({len(diffs)} key(s) differ from its config.json: {shown}); use "
      "another --workdir for this config, or delete that one to rerun it"
    )


def _try_lock(workdir: Path):
  """(open handle holding the lock, None) or (None, who holds it)."""
  path = workdir / LOCK_FILE
  handle = open(path, "a+")  # noqa: SIM115 (held until the run ends)
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.seek(0)
    holder = _describe(handle.read())
    handle.close()
    return None, holder
  handle.seek(0)
  handle.truncate()
  record = {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "since": datetime.datetime.now().isoformat(timespec="seconds"),
  }
  handle.write(json.dumps(record) + "\n")
  handle.flush()
  return handle, None


def _describe(text: str) -> str:
  try:
    r = json.loads(text)
    return f"process {r['pid']} on {r['host']} (since {r['since']})"
  except (ValueError, KeyError, TypeError):
    return "another process"
