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

import jax

log = logging.getLogger(__name__)

# XLA:CPU hands convolutions to YNNPACK by default; XLA's own Eigen kernels are
# faster for large maps and for the backward pass of a network's first convs.
_YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}
_LARGE_IMAGE = 128
YNN_SETTINGS = ("auto", "on", "off")


@functools.cache
def tune_malloc() -> bool:
  """glibc malloc: keep freed memory for reuse instead of returning it.

  glibc serves blocks over 32 MB with a fresh mmap and unmaps them on free, so
  every step page-faults and zeroes its large activations again. One arena, no
  mmap and no trimming let each step reuse the first one's pages (the same as
  MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647); RSS
  then stays at its high-water mark. Call it before the first big allocation;
  returns False where it does not apply (macOS, musl).
  """
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's malloc.h.
  settings = ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1))
  ok = all(mallopt(opt, val) == 1 for opt, val in settings)
  log.debug("glibc malloc tuned for reuse: %s", ok)
  return ok


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
