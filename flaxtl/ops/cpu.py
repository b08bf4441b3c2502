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
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Free memory at the top of the heap above this goes back to the OS at once.
TRIM_THRESHOLD = 256 << 20
# A trim every time RSS passes max(this, 1.25x RSS after the last trim).
TRIM_FLOOR = 512 << 20


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
  """glibc malloc: reuse freed memory between steps, within a bound.

  glibc serves blocks over 32 MB with a fresh mmap and unmaps them on free, so
  every step page-faults and zeroes its large activations again. One arena and
  no mmap let each step reuse the previous one's pages; a finite trim
  threshold (TRIM_THRESHOLD) returns large free space at the heap's top, and
  `MallocTrimmer` (the train loop) returns fragmented free pages, so RSS no
  longer stays at its high-water mark. Call it before the first big
  allocation; returns False where it does not apply (macOS, musl).
  """
  libc = _libc()
  if libc is None:
    return False
  settings = (
    (_M_ARENA_MAX, 1),
    (_M_MMAP_MAX, 0),
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


class MallocTrimmer:
  """Bounds RSS between steps: trims when RSS passes a limit.

  The limit is max(`floor`, 1.25x RSS after the last trim): steps keep
  reusing their pages while free memory stays under a quarter of the live
  set (measured: benchmarks/memory_stream.py), and the limit
  follows the model's size. A trim costs a few ms plus page faults the next
  step, so it is rare in the steady state. Reading RSS is ~10 us per step.
  """

  def __init__(self, floor: int = TRIM_FLOOR):
    self.floor = floor
    self.limit = floor
    self.trims = 0

  def __call__(self) -> bool:
    """After a step: trims if over the limit; True if it trimmed."""
    if rss_bytes() <= self.limit:
      return False
    malloc_trim()
    self.trims += 1
    self.limit = max(self.floor, rss_bytes() * 5 // 4)
    return True


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
