"""Files that appear whole or not at all, and file hashes.

Every file or directory flaxtl writes for a user (converted weights, run
records, predictions, cached features) is written next to its final path and
renamed into place once complete, so an interrupted or failed write leaves the
previous version intact and no half-written file behind.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import hashlib
import json
import os
from pathlib import Path
import shutil
import tempfile
from typing import Any, TextIO


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
  h = hashlib.new(algorithm)
  with open(path, "rb") as f:
    while block := f.read(1 << 20):
      h.update(block)
  return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
  """A temporary sibling of `path`, renamed onto it if the block succeeds."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(
    prefix=f".{path.name}.part-", suffix=suffix, dir=path.parent
  )
  os.close(fd)
  tmp = Path(tmp_name)
  try:
    yield tmp
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes it 0600.
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(
  path: str | Path, newline: str | None = None
) -> Iterator[TextIO]:
  """`open(path, 'w')` whose result appears only when the block succeeds."""
  with atomic_path(path) as tmp, open(tmp, "w", newline=newline) as f:
    yield f


def write_text(path: str | Path, text: str) -> None:
  with atomic_open(path) as f:
    f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
  """Numpy scalars and arrays (and anything else) in JSON."""
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


@contextlib.contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
  """A temporary sibling directory that becomes `path` when the block succeeds.

  With replace=True an existing `path` is swapped out only once the new one is
  complete (and restored if the swap fails); otherwise it is left alone.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700.
  try:
    yield tmp
    replace_dir(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


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
