"""Process-wide allocator settings for dedicated server processes (never called at import).

glibc returns freed heap memory to the OS once more than its trim threshold (by default
twice the largest freed mmap chunk, ~2 MiB here) lies free at the top of the heap, and
serves big blocks (> 128 KiB at first) with mmap. A parameter-server shard makes and frees
megabyte arrays on every request (received frames, gathered rows, replies), so each of them
was faulted in from fresh zeroed pages: ~1,700 minor page faults per get+push of 1,000 x 256
rows, measured, which cost more than the arithmetic. Raising both thresholds keeps that
memory for reuse; the process holds at most ``trim_bytes`` of freed heap more than before.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

#: glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(trim_bytes: int = 256 << 20, mmap_bytes: int = 32 << 20) -> bool:
    """Ask glibc to keep up to ``trim_bytes`` of freed heap and to mmap only blocks over ``mmap_bytes``
    (32 MiB is glibc's ceiling). Returns False where that is not possible (not Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes))
    log.debug("allocator keeps freed memory: %s", ok)
    return ok
