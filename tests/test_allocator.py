"""``retain_freed_memory``: after it, glibc serves a cohort-sized block from the heap instead of
mapping fresh pages for it (which is what made the vectorized engine page-fault every round)."""

from __future__ import annotations

import platform
import subprocess
import sys

PROBE = r"""
import ctypes, ctypes.util
from fedmaml.engines.allocator import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
class MallInfo(ctypes.Structure):  # glibc < 2.33 has only mallinfo, with int fields
    _fields_ = [(n, ctypes.c_int) for n, _ in MallInfo2._fields_]

mallinfo = getattr(libc, "mallinfo2", None) or libc.mallinfo
mallinfo.restype = MallInfo2 if hasattr(libc, "mallinfo2") else MallInfo

def mapped_blocks_while_holding(size):
    p = libc.malloc(size)
    n = mallinfo().hblks
    libc.free(p)
    return n

BLOCK = 24 * 1024 * 1024  # above any threshold glibc adapts to on its own during start-up
base = mallinfo().hblks
before = mapped_blocks_while_holding(BLOCK) - base
applied = retain_freed_memory()
again = retain_freed_memory()
after = mapped_blocks_while_holding(BLOCK) - mallinfo().hblks
print(before, applied, again, after)
"""


def test_large_blocks_come_from_the_heap_once_applied():
    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        from fedmaml.engines.allocator import retain_freed_memory

        assert retain_freed_memory() is False  # no glibc: nothing to tune, and it says so
        return
    # a fresh process: the thresholds are process-wide and other tests may have set them already
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "True", "True", "0"]

