"""Large buffers from the heap, not from fresh mappings (glibc's malloc).

A 1 MiB frame is a few allocations of 1 MiB on its way: a pread's bytes, a sealed
frame, a receive buffer. glibc serves an allocation above its mmap threshold (128
KiB at start, raised only as mapped chunks are freed, and per arena) with a fresh
mmap, which the kernel fills a page fault and a zeroed page at a time: 256 faults
per MiB, and an munmap when it is freed. Measured on this data path (a profiled
1 MiB sequential read, 3 sheep, encrypted frames): 565 MiB/s as glibc starts,
1042 MiB/s with large blocks kept in the heap (docs/performance.md). So the
sheep and the NBD plugin (in nbdkit's process) set the thresholds once at start:
blocks up to 32 MiB (glibc's largest threshold; a data frame is at most an object,
4 MiB by default) come from the heap, and up to 128 MiB of free heap is kept for
the next ones instead of being handed back at once.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3

mmap_threshold_bytes = 32 << 20
trim_threshold_bytes = 128 << 20


def keep_large_blocks_in_the_heap() -> bool:
    """Set glibc's thresholds (see above); False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = (mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes) == 1
            and mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes) == 1)
    if not done:
        log.warning("could not set malloc's thresholds: large buffers stay mapped anew")
    return done
