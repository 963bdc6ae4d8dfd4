"""Freed heap memory stays in the process, so that a vectorized cohort's large tensors are not
page-faulted in again on every allocation.

glibc's malloc serves a block above its *mmap threshold* (128 KiB at first) with fresh pages from
the kernel and unmaps them when the block is freed, and it returns free memory above its *trim
threshold* at the top of the heap to the kernel. A vectorized cohort allocates and frees the same
``[clients, ...]`` tensors (0.1-30 MB each) dozens of times per round, so every allocation touched
new pages: on the 100-client digits benchmark that was a third of the batched compute (9.1 -> 6.1
ms a round; 1,000 clients: 62-69 -> 44 ms). Raising both thresholds lets freed blocks be reused.
Per-client paths allocate small tensors and were measured unaffected, so only the vectorized engine
asks for this. The cost: the process keeps up to ``TRIM_THRESHOLD`` of freed memory mapped instead
of returning it to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
#: glibc's largest allowed mmap threshold on 64-bit systems (4 * 1024 * 1024 * sizeof(long)).
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 512 * 1024 * 1024

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; ``False`` where malloc is not
    glibc's (macOS, musl, Windows), which have no such knobs or do not need them."""
    global _applied
    if _applied is None:
        _applied = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                                and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError):  # no loadable libc or no mallopt: leave malloc be
                _applied = False
    return _applied

