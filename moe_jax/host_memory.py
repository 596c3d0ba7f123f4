"""Host-allocator settings for XLA:CPU: reuse freed memory instead of faulting in fresh pages.

XLA:CPU allocates each executable's outputs and temporaries with the C allocator on every call.
glibc's malloc serves large blocks (above its mmap threshold, 32 MB at most, and anything a
thread's arena cannot hold) with a fresh `mmap` and unmaps it on free, so every call pays the
first-touch page faults of every large buffer it writes. On the CPU VMs this project measures on,
that was the larger part of a memory-bound op: zero-filling an 8 MB buffer took ~2 ms fresh and
~0.3 ms reused, and the MoE layer writes several such buffers per call (see the closing notes of
issue 8 for the step-level effect).

`reuse_freed_memory()` asks glibc to keep freed memory for reuse: no mmap'd blocks, no trimming of
the heap, one arena. The cost is that the process's resident memory stays at its peak. Launch
scripts call it before jax starts (launch/_setup.py); research code may call it first thing.
"""

from __future__ import annotations

import ctypes
import sys

# <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1), (_M_ARENA_MAX, 1))


def reuse_freed_memory() -> bool:
  """Configures glibc malloc to reuse freed blocks; True if every setting took.

  A no-op returning False where there is no glibc `mallopt` (macOS, musl). Call it before the
  first large allocation (before running any jax computation) for the full effect.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
