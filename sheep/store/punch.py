"""Punching holes into files: fallocate(2) with FALLOC_FL_PUNCH_HOLE.

The standard library has no binding for fallocate's mode flags, so this calls
libc through ctypes. Where the call is missing or the filesystem refuses it,
the range is overwritten with zeros instead, which reads the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int

_zeros = bytes(1 << 20)


def punch_hole(fd: int, offset: int, length: int) -> None:
    if length <= 0:
        return
    if _fallocate is not None:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _fallocate(fd, mode, offset, length) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code))
    end = offset + length
    while offset < end:
        step = min(len(_zeros), end - offset)
        os.pwrite(fd, _zeros[:step], offset)
        offset += step
