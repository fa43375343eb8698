"""The file calls the store makes, in one place, so tests can put a faulty disk
under it (sheep/testing/faulty.py: lost unsynced writes, EIO, ENOSPC)."""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import os
import sys
from collections.abc import Callable
from typing import Any

from sheep.store.punch import punch_hole

# The most one pwrite call writes. On the Linux VMs we run on, one pwrite of 4 MiB
# into the page cache took 10 ms, and the same bytes in calls of 256 KiB 1.0 ms
# (medians of 100 each, interleaved, into fresh files; reads show no such
# difference). Recovery, repairs and whole-object writes all write 4 MiB at once.
write_piece_bytes = 256 << 10


def _syncfs() -> Callable[[int], int] | None:
    """libc's syncfs, where it reports writeback errors (Linux 5.8 and later: before,
    it returned 0 whatever failed, and only an fdatasync of each file would say)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
        if (major, minor) < (5, 8):
            return None
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (ValueError, AttributeError, OSError):
        return None
    call.argtypes = [ctypes.c_int]
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]


_libc_syncfs = _syncfs()


class FileIO:
    """The real thing: plain os calls."""

    def open(self, path: str, create: bool) -> int:
        return os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)

    def close(self, fd: int) -> None:
        os.close(fd)

    def dup(self, fd: int) -> int:
        return os.dup(fd)

    def pread(self, fd: int, count: int, offset: int) -> bytes:
        return os.pread(fd, count, offset)

    def pread_into(self, fd: int, view: memoryview, offset: int) -> int:
        """Read into view (no new buffer: a copy's data goes where it is sent from);
        the bytes read, fewer only at the end of the file."""
        done = 0
        while done < len(view):
            count = os.preadv(fd, [view[done:]], offset + done)
            if count <= 0:
                break
            done += count
        return done

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write all of data, in pieces of at most write_piece_bytes: a short write (a
        disk filling up) goes on from where it stopped, and one that writes nothing is
        ENOSPC."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            written = os.pwrite(fd, view[done:done + write_piece_bytes], offset + done)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += written
        return done

    def extents(self, fd: int, size: int) -> list[tuple[int, int]]:
        """The [start, end) byte ranges of the first ``size`` bytes that hold data, by
        lseek SEEK_DATA/SEEK_HOLE; everything else is a hole and reads as zeros. Where
        the system or the filesystem cannot tell (no SEEK_DATA, EINVAL, EOPNOTSUPP),
        the whole file is data: a copy made from it is as full as before, never wrong."""
        seek_data = getattr(os, "SEEK_DATA", None)
        seek_hole = getattr(os, "SEEK_HOLE", None)
        if seek_data is None or seek_hole is None:
            return [(0, size)] if size else []
        found: list[tuple[int, int]] = []
        at = 0
        try:
            while at < size:
                try:
                    start = os.lseek(fd, at, seek_data)
                except OSError as error:
                    if error.errno == errno.ENXIO:  # no data past at (or at is past the end)
                        break
                    raise
                if start >= size:
                    break
                at = min(os.lseek(fd, start, seek_hole), size)
                found.append((start, at))
        except OSError as error:
            if error.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                return [(0, size)] if size else []
            raise
        return found

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def datasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def punch(self, fd: int, offset: int, count: int) -> None:
        punch_hole(fd, offset, count)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def rename(self, source: str, target: str) -> None:
        """Give a file another name in the same directory (durable once the
        directory is synced, as a new file's entry is)."""
        os.rename(source, target)

    def sync_directory(self, path: str) -> None:
        """Make the directory's entries durable: a file's fdatasync does not cover
        the entry that names it (nor an unlink)."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync_many(self, fds: list[int], directories: list[str],
                  pool: concurrent.futures.Executor, anchor: int | None = None) -> None:
        """Make the data of the files fds and the entries of the directories durable.
        Several on one filesystem, given an anchor (an fd on that filesystem opened
        before any of their writes): one syncfs through the anchor, which commits the
        filesystem's journal and flushes the disk's cache once, where each fdatasync
        does both again (on our VMs 14 changed objects took 0.44 ms so, against 0.83 ms
        as fdatasyncs from 16 threads and 1.6 ms one after another). syncfs reports
        the filesystem's writeback errors since its fd was opened (once per fd): a
        file opened later would not hear of an earlier file's lost writeback, hence
        the anchor. It writes back whatever else is dirty on that filesystem too: a
        store on a filesystem of its own pays nothing for that. Else (one item, several
        filesystems, no anchor, no syncfs) each is synced, at once from pool's threads."""
        if (len(fds) + len(directories) > 1 and anchor is not None
                and _libc_syncfs is not None):
            device = os.fstat(anchor).st_dev
            if (all(os.fstat(fd).st_dev == device for fd in fds)
                    and all(os.stat(path).st_dev == device for path in directories)):
                if _libc_syncfs(anchor) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"syncfs: {os.strerror(code)}")
                return
        self.sync_each(fds, directories, pool)

    def sync_each(self, fds: list[int], directories: list[str],
                  pool: concurrent.futures.Executor) -> None:
        """fdatasync each file and fsync each directory, at once from pool's threads
        (the filesystem commits them together) when there are several."""
        calls: list[tuple[Callable[[Any], None], Any]] = [
            *((self.datasync, fd) for fd in fds),
            *((self.sync_directory, path) for path in directories)]
        if len(calls) == 1:
            calls[0][0](calls[0][1])
        elif calls:
            futures = [pool.submit(call, what) for call, what in calls]
            concurrent.futures.wait(futures)  # all of them, before any fd closes
            for future in futures:
                future.result()
