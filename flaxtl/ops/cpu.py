"""Process and compiler settings that make XLA:CPU runs faster.

Both are no-ops where they do not apply (not glibc; not the CPU backend), so a
config runs unchanged on GPU and TPU. The rules were measured with
benchmarks/train_step.py and benchmarks/forward.py (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Iterable
import ctypes
import ctypes.util
import functools
import logging
import os

import jax

log = logging.getLogger(__name__)

# XLA:CPU hands convolutions to YNNPACK by default; XLA's own Eigen kernels are
# faster for large maps and for the backward pass of a network's first convs.
_YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}
_LARGE_IMAGE = 128
YNN_SETTINGS = ("auto", "on", "off")


# glibc's malloc.h option numbers.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# Blocks from this size up get their own mmap, unmapped on free (fixed: glibc's
# dynamic threshold would keep raising it and the heap would fragment).
MMAP_THRESHOLD = 64 << 20
# Free memory at the top of the heap above this goes back to the OS at once.
TRIM_THRESHOLD = 256 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt, libc.malloc_trim  # noqa: B018 - AttributeError off glibc.
  except (OSError, AttributeError):
    return None
  return libc


@functools.cache
def tune_malloc() -> bool:
  """glibc malloc: reuse freed blocks between steps, with bounded memory.

  One arena, blocks under MMAP_THRESHOLD reused from the heap (glibc's default
  would mmap and unmap everything over its dynamic threshold), the largest
  ones mapped and returned on free, and free heap top over TRIM_THRESHOLD
  returned: peak memory stays at glibc's default level and does not depend on
  how compilation fragmented the heap (benchmarks/memory_stream.py; the
  previous one arena + no mmap + no trim kept 3.3-4.8 GB of a 1.2 GB run).
  Call it before the first big allocation; returns False where it does not
  apply (macOS, musl).
  """
  libc = _libc()
  if libc is None:
    return False
  settings = (
    (_M_ARENA_MAX, 1),
    (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
  )
  ok = all(libc.mallopt(opt, val) == 1 for opt, val in settings)
  log.debug("glibc malloc tuned for reuse: %s", ok)
  return ok


def rss_bytes() -> int:
  """Resident set size of this process (0 where /proc is absent)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, IndexError, ValueError):
    return 0


def malloc_trim() -> bool:
  """Returns glibc's free pages (all arenas, not only the top) to the OS.

  True if memory was released; False if none was, or not glibc.
  """
  libc = _libc()
  return libc is not None and libc.malloc_trim(0) == 1


def compiler_options(
  ynn: str,
  image_size: int,
  trainable_paths: Iterable[str] = (),
  dtype: str = "float32",
  stem_layers: Iterable[str] = (),
  platform: str | None = None,
) -> dict[str, str] | None:
  """Per-executable XLA options for a step at `image_size`.

  ynn: 'auto' (YNNPACK off on CPU from 128 px up, or while a kernel of one of
  the backbone's `stem_layers` trains; bfloat16 compute keeps it), 'on' (XLA's
  default) or 'off'. A forward pass trains nothing. None means XLA's defaults.
  """
  if ynn not in YNN_SETTINGS:
    raise ValueError(f"ynn must be one of {YNN_SETTINGS}, got {ynn!r}")
  if (platform or jax.default_backend()) != "cpu" or ynn == "on":
    return None
  if ynn == "auto":
    if dtype != "float32":
      return None
    stem_trains = any(
      p.endswith("/kernel") and _is_stem(p.rsplit("/", 1)[0], stem_layers)
      for p in trainable_paths
    )
    ynn = "off" if image_size >= _LARGE_IMAGE or stem_trains else "on"
  return dict(_YNN_OFF) if ynn == "off" else None


def _is_stem(layer: str, stem_layers: Iterable[str]) -> bool:
  """'backbone/features/0/0' is the stem layer 'features/0/0'."""
  return any(layer == s or layer.endswith("/" + s) for s in stem_layers)
