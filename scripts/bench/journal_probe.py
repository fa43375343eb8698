"""What a write-ahead journal could win on a replica's flush (issue #20, measured, not
built): 32 random 4 KiB writes over 14 object files of 4 MiB, then the flush, timed
three ways on one filesystem:

- as the store flushes now: one syncfs through a directory fd, then an LMDB commit
  of the changed objects' metadata;
- an fdatasync per changed file, then the LMDB commit (the store's fallback);
- each write also appended to a journal, the flush one fdatasync of it.

    .venv/bin/python scripts/bench/journal_probe.py [--dir DIR] [--flushes 60]

DIR (default: the system's temporary directory) should be on the filesystem the
store would use; the probe works in a temporary directory under it and removes it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable

import lmdb

OBJECT_BYTES = 4 << 20
BLOCK = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None)
    parser.add_argument("--flushes", type=int, default=60)
    parser.add_argument("--writes", type=int, default=32, help="writes between flushes")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="journal-probe-", dir=args.dir)
    try:
        run(base, args.flushes, args.writes)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(base: str, flushes: int, writes_between: int) -> None:
    objects = os.path.join(base, "obj")
    os.makedirs(objects)
    files = []
    for index in range(14):
        fd = os.open(os.path.join(objects, f"{index:04x}"), os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, os.urandom(OBJECT_BYTES), 0)
        files.append(fd)
    os.sync()
    anchor = os.open(objects, os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    env = lmdb.open(os.path.join(base, "meta"), map_size=1 << 30, sync=True, metasync=True,
                    subdir=True, max_dbs=2)
    table = env.open_db(b"meta")
    journal = os.open(os.path.join(base, "journal"), os.O_RDWR | os.O_CREAT | os.O_APPEND,
                      0o644)
    block = os.urandom(BLOCK)

    def write(journaled: bool) -> set[int]:
        touched = set()
        for _ in range(writes_between):
            fd = random.choice(files)
            offset = random.randrange(OBJECT_BYTES // BLOCK) * BLOCK
            os.pwrite(fd, block, offset)
            touched.add(fd)
            if journaled:
                record = (fd.to_bytes(8, "little") + offset.to_bytes(8, "little")
                          + zlib.crc32(block).to_bytes(4, "little"))
                os.write(journal, record + block)
        return touched

    def commit(touched: set[int]) -> None:
        with env.begin(write=True, db=table) as txn:
            for fd in touched:
                txn.put(fd.to_bytes(8, "big"), os.urandom(64))

    def syncfs_then_commit(touched: set[int]) -> None:
        if libc.syncfs(anchor) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
        commit(touched)

    def each_then_commit(touched: set[int]) -> None:
        for fd in touched:
            os.fdatasync(fd)
        commit(touched)

    def journal_only(_: set[int]) -> None:
        os.fdatasync(journal)

    ways: list[tuple[str, bool, Callable[[set[int]], None]]] = [
        ("now: syncfs + LMDB commit", False, syncfs_then_commit),
        ("fdatasync per file + LMDB commit", False, each_then_commit),
        ("journal: one fdatasync", True, journal_only)]
    try:
        for _ in range(2):  # the second round is the one to read: caches are warm
            for name, journaled, flush in ways:
                samples = []
                for _ in range(flushes):
                    touched = write(journaled)
                    started = time.perf_counter()
                    flush(touched)
                    samples.append(time.perf_counter() - started)
                print(f"{name:34s} median {statistics.median(samples) * 1e3:5.2f} ms"
                      f"  mean {statistics.mean(samples) * 1e3:5.2f} ms", flush=True)
    finally:
        env.close()
        for fd in [*files, anchor, journal]:
            os.close(fd)


if __name__ == "__main__":
    main()
