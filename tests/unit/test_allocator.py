"""Large buffers come from the heap once the sheep (and the plugin) set malloc's
thresholds (sheep/allocator.py)."""

from __future__ import annotations

import subprocess
import sys

from sheep import allocator

PROBE = r"""
import ctypes, sys
from sheep.allocator import keep_large_blocks_in_the_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def mapped_while_held():
    before = libc.mallinfo2().hblkhd
    block = bytearray(4 << 20)  # a 4 MiB object's worth
    return libc.mallinfo2().hblkhd - before

first = mapped_while_held()
assert keep_large_blocks_in_the_heap()
print(first, mapped_while_held())
"""


def test_a_4_mib_buffer_is_no_fresh_mapping_once_the_thresholds_are_set():
    if allocator.platform.libc_ver()[0] != "glibc":  # nothing to set: it says so
        assert allocator.keep_large_blocks_in_the_heap() is False
        return
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            timeout=60, check=True)
    before, after = map(int, result.stdout.split())
    assert before >= 4 << 20  # as glibc starts: mapped anew (and unmapped when freed)
    assert after == 0
