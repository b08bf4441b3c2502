"""Process and compiler settings that make XLA:CPU runs faster (measured in benchmarks/PERF.md).

Both are no-ops where they do not apply (not glibc; not the CPU backend), so a config
runs unchanged on GPU and TPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import re
from typing import Iterable, Optional

import jax

log = logging.getLogger(__name__)

# XLA:CPU's default pipeline hands convolutions to YNNPACK. For the backward pass of
# the full-resolution, 64-channel block1 convs XLA's own Eigen kernels are faster:
# with block1 trainable the VGG16 step at 64x64 runs +13-23% with YNNPACK off; with
# block1 frozen it is even or YNNPACK wins (freeze-8: -7%; forward: -8%).
_YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}
_BLOCK1_KERNEL = re.compile(r"(.*/)?block1_conv\d+/kernel")
YNN_SETTINGS = ("auto", "on", "off")


@functools.lru_cache(maxsize=None)
def tune_malloc() -> bool:
  """glibc malloc: keep freed memory for reuse instead of handing it back to the kernel.

  glibc serves every block over 32 MB with a fresh mmap and unmaps it on free, so each
  step's large activations (VGG16 at 224x224, batch 8: 100 MB per block1 map) are
  page-faulted and zeroed by the kernel again on every call: ~0.3 s of system time per
  forward. One arena, no mmap and no trimming make every later step reuse the pages of
  the first (+30% forward at 224, +19% full fine-tune step). The cost is that RSS stays
  at its high-water mark. Same as MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
  MALLOC_TRIM_THRESHOLD_=2147483647. Best called before the first big allocation;
  returns False where it does not apply (macOS, musl).
  """
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # From glibc's malloc.h.
  ok = all(mallopt(opt, val) == 1 for opt, val in
           ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))
  log.info("glibc malloc tuned for reuse: %s", ok)
  return ok


def train_compiler_options(ynn: str, trainable_paths: Iterable[str],
                           platform: Optional[str] = None) -> Optional[dict[str, str]]:
  """Per-executable XLA options for a train step that trains the params at `trainable_paths`.

  ynn: 'auto' (YNNPACK off on CPU when a block1 conv kernel trains), 'on' (XLA's default)
  or 'off'. Returns None (XLA's defaults) off CPU.
  """
  if ynn not in YNN_SETTINGS:
    raise ValueError(f"ynn must be one of {YNN_SETTINGS}, got {ynn!r}")
  if (platform or jax.default_backend()) != "cpu" or ynn == "on":
    return None
  if ynn == "auto":
    ynn = "off" if any(_BLOCK1_KERNEL.fullmatch(p) for p in trainable_paths) else "on"
  return dict(_YNN_OFF) if ynn == "off" else None
