"""Process memory settings for CPU runs.

Every forward pass frees and reallocates the same large activations. By default glibc's
malloc serves blocks over a threshold with fresh ``mmap`` pages and returns freed memory
to the kernel, so each step pays the page faults of its activations again. On this
project's 2-core machine that was a quarter of a forward that keeps attention maps (the
Fashion-MNIST 4x4 model, batch 128) and a few percent of a training step. PyTorch's CPU
tuning guide gives the same reason for swapping in jemalloc or TCMalloc; this keeps glibc
and changes two of its settings instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below it come from the reused heap
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap for reuse


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; True if it took the settings.

    The process's resident memory then stays near its peak instead of shrinking between
    steps. Does nothing (False) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    if not ok:
        logger.debug("malloc settings not taken; freed memory goes back to the kernel")
    return ok
