"""Host-allocator settings for XLA:CPU processes that drive one device: reuse freed memory.

XLA:CPU allocates each executable's outputs and temporaries with the C allocator on every call,
from its worker threads. glibc's malloc gives each thread an arena of mmap'd heaps and serves
large blocks with fresh `mmap`s that it unmaps on free, so a call can pay the first-touch page
faults of the large buffers it writes, every time: a zero-fill of an 8 MB buffer took ~2 ms fresh
against ~0.3 ms reused on the CPU VMs this project measures on.

`reuse_freed_memory()` routes every thread through the main heap (one arena), never mmaps blocks
and never trims the heap, so freed buffers are reused. Measured with `benchmarks/straggler.py
--d_ff=8` (2 processes x 1 device on 1 pinned core each; the step minus its expert FFN): 171 ms
with it, 232 ms with glibc's defaults, and 232 ms with only the mmap/trim settings (the arena is
what matters there). It is for processes that drive one device: with many device threads in one
process the single arena serialises their allocations (`launch/bench.py`, 8 simulated devices:
35-40% fewer tokens/s), so launch scripts do not call it. The price is that resident memory stays
at its peak. The 2-process benchmarks call it.
"""

from __future__ import annotations

import ctypes
import os
import sys

# <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def reuse_freed_memory() -> bool:
  """Configures glibc malloc to reuse freed blocks; True if every setting took.

  A no-op returning False where there is no glibc `mallopt` (macOS, musl), or when the
  environment sets MOE_JAX_SYSTEM_MALLOC=1 (keep glibc's defaults). Call it before jax starts its
  threads (before the first computation) for the full effect.
  """
  opted_out = os.environ.get("MOE_JAX_SYSTEM_MALLOC", "") not in ("", "0")
  if opted_out or not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
