"""HTTP download with a progress bar, a checksum and an atomic rename.

The file appears at its final path only once its hash is verified; a wrong
hash, an HTTP error or an interruption leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
import tempfile
import urllib.error
import urllib.request

from tqdm import tqdm

from flaxtl.errors import UserError
from flaxtl.files import file_hash


def download(
  url: str,
  dest: Path,
  *,
  md5: str | None = None,
  sha256: str | None = None,
  timeout: float = 60.0,
  progress: bool = True,
) -> Path:
  """Downloads `url` to `dest` unless a verified copy is already there."""
  dest = Path(dest)
  algorithm, expected = ("md5", md5) if md5 else ("sha256", sha256)
  # A stale or damaged cache entry is fetched again rather than trusted.
  if dest.exists() and (
    expected is None or file_hash(dest, algorithm) == expected
  ):
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.part-", dir=dest.parent)
  tmp = Path(tmp_name)
  try:
    h = hashlib.new(algorithm)
    with os.fdopen(fd, "wb") as f:
      try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
          total = int(r.headers.get("Content-Length") or 0) or None
          with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=dest.name,
            disable=not progress,
          ) as bar:
            while block := r.read(1 << 20):
              f.write(block)
              h.update(block)
              bar.update(len(block))
      except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"{url}: download failed ({reason})") from None
    got = h.hexdigest()
    if expected is not None and got != expected:
      raise UserError(
        f"{url}: {algorithm} mismatch (got {got}, expected {expected}); "
        "file discarded"
      )
    os.replace(tmp, dest)
  finally:
    tmp.unlink(missing_ok=True)
  return dest
