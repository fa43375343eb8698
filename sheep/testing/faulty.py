"""A faulty disk under the store, for tests: writes that a power loss drops, and
calls that fail with EIO or ENOSPC on command.

FaultyIO keeps every write since a file's last fdatasync in memory instead of
the file (reads see them), as the page cache does. ``power_loss`` then decides
what reached the disk the way writeback does it: page by page (4 KiB), each
page as it was at some moment, so a page holds the state after some prefix of
the unsynced writes that touched it, chosen at random; then everything pending
is forgotten. Truncates and hole punches are taken as durable at once (they go
to the file after the pending writes of that file). Directory entries are not:
a file created or unlinked since its directory's last ``sync_directory`` may
be undone by a power loss, the changes of one directory landing in order (as a
journal commits them), so some suffix of them is undone: a new file vanishes,
an unlinked one comes back with what it held on disk. LMDB needs no such
layer: the store opens it durable, so a commit that returned is on disk.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import random
import threading
from dataclasses import dataclass, field

from sheep.store.fileio import FileIO

PAGE = 4096


@dataclass
class _File:
    path: str
    pending: list[tuple[int, bytes]] = field(default_factory=list)


class FaultyIO(FileIO):
    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random(0)
        self._files: dict[str, _File] = {}
        self._fds: dict[int, _File] = {}
        self._failures: list[tuple[str, int, int]] = []  # (call, errno, bytes written first)
        self._lock = threading.Lock()  # a store syncs files from several threads at once
        # Per directory, its entries changed since it was last synced, in order:
        # (path, None) for a file made, (path, what it held) for a file unlinked.
        self._entries: dict[str, list[tuple[str, bytes | None]]] = {}

    # --- commands ----------------------------------------------------------------

    def fail(self, call: str, code: int, times: int = 1, partial: int = 0) -> None:
        """Make the next ``times`` calls named call ("pwrite", "pread", "datasync",
        "punch", "open", "truncate", "sync_directory", "extents", "rename") fail with errno
        code; a failing pwrite first writes ``partial`` bytes, as a disk that fills
        up halfway does."""
        self._failures += [(call, code, partial)] * times

    def power_loss(self, lose_all: bool = False) -> None:
        """Decide what of the unsynced writes and directory changes reached the disk;
        forget the rest. lose_all: none of them did."""
        for entry in self._files.values():
            if not entry.pending:
                continue
            pages: dict[int, list[tuple[int, bytes]]] = {}
            for offset, data in entry.pending:
                for page in range(offset // PAGE, -(-(offset + len(data)) // PAGE)):
                    pages.setdefault(page, []).append((offset, data))
            try:
                fd = os.open(entry.path, os.O_RDWR)
            except FileNotFoundError:
                entry.pending.clear()
                continue
            try:
                for page, writes in pages.items():
                    landed = writes[:0 if lose_all else self.rng.randint(0, len(writes))]
                    if not landed:
                        continue
                    start = page * PAGE
                    image = bytearray(os.pread(fd, PAGE, start).ljust(PAGE, b"\0"))
                    for offset, data in landed:
                        _overlay(image, start, offset, data)
                    size = os.fstat(fd).st_size
                    os.pwrite(fd, bytes(image[:max(0, min(PAGE, size - start))]), start)
            finally:
                os.close(fd)
            entry.pending.clear()
        for fd in list(self._fds):
            os.close(fd)
        self._fds.clear()
        for changes in self._entries.values():
            kept = 0 if lose_all else self.rng.randint(0, len(changes))
            for path, held in reversed(changes[kept:]):
                _undo_entry(path, held)
                self._files.pop(path, None)
        self._entries.clear()

    def process_killed(self) -> None:
        """The process died (SIGKILL), the machine did not: its unsynced writes are in
        the page cache, so they all reach the files; its descriptors close."""
        for entry in self._files.values():
            if not entry.pending:
                continue
            try:
                fd = os.open(entry.path, os.O_RDWR)
            except FileNotFoundError:
                entry.pending.clear()
                continue
            try:
                for offset, data in entry.pending:
                    os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
            entry.pending.clear()
        for fd in list(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    @property
    def unsynced(self) -> int:
        return sum(len(entry.pending) for entry in self._files.values())

    # --- the calls ------------------------------------------------------------------

    def _maybe_fail(self, call: str) -> int | None:
        for index, (name, code, partial) in enumerate(self._failures):
            if name == call:
                del self._failures[index]
                if call == "pwrite":
                    raise _PartialWrite(code, partial)
                raise OSError(code, os.strerror(code))
        return None

    def open(self, path: str, create: bool) -> int:
        self._maybe_fail("open")
        made = create and not os.path.exists(path)
        fd = super().open(path, create)
        if made:
            self._entries.setdefault(os.path.dirname(path), []).append((path, None))
        self._fds[fd] = self._files.setdefault(path, _File(path))
        return fd

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        super().close(fd)

    def dup(self, fd: int) -> int:
        new = super().dup(fd)
        self._fds[new] = self._fds[fd]
        return new

    def pread(self, fd: int, count: int, offset: int) -> bytes:
        self._maybe_fail("pread")
        data = bytearray(super().pread(fd, count, offset))
        size = self._size(fd)
        wanted = max(0, min(count, size - offset))
        data = data.ljust(wanted, b"\0")
        for at, written in self._fds[fd].pending:
            _overlay(data, offset, at, written)
        return bytes(data[:wanted])

    def pread_into(self, fd: int, view: memoryview, offset: int) -> int:
        data = self.pread(fd, len(view), offset)  # with the unsynced writes
        view[:len(data)] = data
        return len(data)

    def extents(self, fd: int, size: int) -> list[tuple[int, int]]:
        """The file's own extents and the ranges of its pending writes (held here, as
        the page cache holds them, so the file's lseek cannot see them)."""
        self._maybe_fail("extents")
        ranges = super().extents(fd, size) + [
            (offset, min(offset + len(data), size))
            for offset, data in self._fds[fd].pending if offset < size and data]
        merged: list[tuple[int, int]] = []
        for start, end in sorted(ranges):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        try:
            self._maybe_fail("pwrite")
        except _PartialWrite as partial:
            if partial.written:
                self._fds[fd].pending.append((offset, bytes(data[:partial.written])))
            raise OSError(partial.code, os.strerror(partial.code)) from None
        self._fds[fd].pending.append((offset, bytes(data)))
        return len(data)

    def truncate(self, fd: int, size: int) -> None:
        self._maybe_fail("truncate")
        self._settle(fd)
        super().truncate(fd, size)

    def datasync(self, fd: int) -> None:
        with self._lock:
            self._maybe_fail("datasync")
            self._settle(fd)

    def punch(self, fd: int, offset: int, count: int) -> None:
        self._maybe_fail("punch")
        self._settle(fd)
        super().punch(fd, offset, count)

    def unlink(self, path: str) -> None:
        with open(path, "rb") as file:  # as on disk: what a power loss may bring back
            held = file.read()
        super().unlink(path)
        self._entries.setdefault(os.path.dirname(path), []).append((path, held))
        entry = self._files.pop(path, None)
        if entry is not None:
            entry.pending.clear()

    def rename(self, source: str, target: str) -> None:
        """The file keeps its unsynced writes under its new name. Until the directory
        is synced a power loss may undo the rename: the new name goes (what the old
        one held is not brought back: a file renamed into place is a new file's
        first name, never an old file's)."""
        self._maybe_fail("rename")
        super().rename(source, target)
        self._entries.setdefault(os.path.dirname(target), []).append((target, None))
        entry = self._files.pop(source, None)
        if entry is not None:
            entry.path = target
            self._files[target] = entry

    def sync_many(self, fds: list[int], directories: list[str],
                  pool: concurrent.futures.Executor, anchor: int | None = None) -> None:
        """Each file and directory as its own call, as modelled (a syncfs syncs them
        all, and more besides: never less than this)."""
        self.sync_each(fds, directories, pool)

    def sync_directory(self, path: str) -> None:
        with self._lock:
            self._maybe_fail("sync_directory")
            self._entries.pop(path, None)
        super().sync_directory(path)

    def _settle(self, fd: int) -> None:
        """The file's pending writes go to the file itself."""
        entry = self._fds[fd]
        for offset, data in entry.pending:
            os.pwrite(fd, data, offset)
        entry.pending.clear()

    def _size(self, fd: int) -> int:
        size = os.fstat(fd).st_size
        for offset, data in self._fds[fd].pending:
            size = max(size, offset + len(data))
        return size


class _PartialWrite(Exception):
    def __init__(self, code: int, written: int) -> None:
        super().__init__(code, written)
        self.code = code
        self.written = written


def _undo_entry(path: str, held: bytes | None) -> None:
    """Undo a directory change that did not reach the disk."""
    if held is None:  # a file made: its entry never landed
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    elif os.path.isdir(os.path.dirname(path)):  # a file unlinked: it is back
        with open(path, "wb") as file:
            file.write(held)


def _overlay(target: bytearray, target_offset: int, offset: int, data: bytes) -> None:
    """Copy the part of data (at offset) that falls inside target (at target_offset)."""
    start = max(offset, target_offset)
    end = min(offset + len(data), target_offset + len(target))
    if start < end:
        target[start - target_offset:end - target_offset] = data[start - offset:end - offset]

