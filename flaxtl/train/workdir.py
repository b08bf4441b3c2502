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


def create(workdir: Path) -> None:
  """mkdir -p, with one line when the path is under a file or unwritable."""
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
