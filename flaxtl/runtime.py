"""Process and compiler settings that make XLA:CPU runs faster (measured in benchmarks/README.md).

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

# XLA:CPU's default pipeline hands convolutions to YNNPACK. XLA's own Eigen kernels are
# faster for the backward pass of VGG's convs, and for the forward too at larger maps
# now that those run as Winograd matmuls (models/vgg.py). VGG16, img/s, YNNPACK on -> off:
#   64x64 train step, batch 16: full 39.0 -> 44.1, block1 frozen 47.5 -> 46.7,
#                               freeze-8 64.8 -> 60.4; forward (batch 32) 166 -> 149
#   128x128: forward (batch 16) 43.9 -> 47.4; freeze-8 step 16.2 -> 17.9
#   224x224, batch 8: forward 15.6 -> 16.6; freeze-8 step 2.54 -> 2.86; full 1.12 -> 1.30
# So 'auto' turns it off from 128 px up, and below that while block1 trains.
_YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}
_BLOCK1_KERNEL = re.compile(r"(.*/)?block1_conv\d+/kernel")
_LARGE_IMAGE = 128
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


def compiler_options(ynn: str, image_size: int, trainable_paths: Iterable[str] = (),
                     dtype: str = "float32", platform: Optional[str] = None) -> Optional[dict[str, str]]:
  """Per-executable XLA options for a VGG step at `image_size` that trains `trainable_paths`.

  ynn: 'auto' (YNNPACK off on CPU where that measured faster, see above; bfloat16 compute
  keeps it: 13.6 on vs 12.6 off img/s at 224), 'on' (XLA's default) or 'off'. A forward
  pass trains nothing. Returns None (XLA's defaults) off CPU.
  """
  if ynn not in YNN_SETTINGS:
    raise ValueError(f"ynn must be one of {YNN_SETTINGS}, got {ynn!r}")
  if (platform or jax.default_backend()) != "cpu" or ynn == "on":
    return None
  if ynn == "auto" and dtype != "float32":
    return None
  if ynn == "auto":
    large = image_size >= _LARGE_IMAGE
    ynn = "off" if large or any(_BLOCK1_KERNEL.fullmatch(p) for p in trainable_paths) else "on"
  return dict(_YNN_OFF) if ynn == "off" else None
