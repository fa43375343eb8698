"""The object store: sparse object files, versions, metadata, sync, errors.

Runs on a real filesystem under tmp_path (allocation is measured through
st_blocks); failures the disk will not produce on demand are injected by
monkeypatching os.pwrite, os.fdatasync and the fallocate binding.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest

from sheep import constants
from sheep.constants import KiB, MiB
from sheep.errors import InvalidParameters, IOErrorResult, NoObject, NoSpace, SystemFailure
from sheep.store import punch
from sheep.store import store as store_module
from sheep.store.punch import punch_hole
from sheep.store.store import Store

object_size = constants.object_size_default_bytes
block = constants.block_size_bytes


def opened(path: Path) -> Iterator[Store]:
    store = Store(str(path))
    store.open()
    yield store
    store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    yield from opened(tmp_path / "store")


def reopen(store: Store) -> Store:
    store.close()
    again = Store(store.path)
    again.open()
    return again


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def pattern(length: int, seed: int = 1) -> bytes:
    return bytes((seed + index * 7) % 251 for index in range(length))


# --- object operations ------------------------------------------------------------


def test_create_and_write_then_read(store: Store) -> None:
    data = pattern(8 * KiB)
    assert store.create_and_write(0x10, 4 * KiB, data) == 1
    assert store.read(0x10, 4 * KiB, len(data)) == data
    assert store.read(0x10, 0, 4 * KiB) == bytes(4 * KiB)
    assert store.read(0x10, 12 * KiB, 100) == bytes(100)
    assert store.read(0x10, object_size - 1, 1) == b"\0"
    assert store.read(0x10, 5 * KiB, 0) == b""
    assert store.exists(0x10) and not store.exists(0x11)


def test_create_with_no_data_makes_a_zero_object(store: Store) -> None:
    store.create_and_write(7, 0, b"")
    assert store.read(7, 0, 64 * KiB) == bytes(64 * KiB)
    assert store.stat(7)["size"] == object_size


def test_small_write_allocates_only_what_it_writes(store: Store) -> None:
    store.create_and_write(1, 2 * MiB, pattern(4 * KiB))
    path = store.object_path(1)
    assert os.path.getsize(path) == object_size
    assert 4 * KiB <= allocated(path) <= 16 * KiB
    info = store.stat(1)
    digest = info.pop("digest")
    assert info.pop("synced") is False  # written, not flushed yet
    assert info.pop("durable") is False  # made, never synced: a power loss could take it
    assert info == {"oid": 1, "version": 1, "size": object_size, "allocated": allocated(path)}
    store.create_and_write(3, 0, b"x")
    store.sync()
    assert store.stat(3)["durable"] is True and store.stat(3)["synced"] is True
    store.write(3, 8 * KiB, b"later")
    assert store.stat(3)["durable"] is True and store.stat(3)["synced"] is False
    store.create_and_write(2, 2 * MiB, pattern(4 * KiB))
    assert store.stat(2)["digest"] == digest  # same bytes, same digest
    store.write(1, 0, pattern(4 * KiB, seed=3))
    assert allocated(path) <= 32 * KiB
    assert store.read(1, 4 * KiB, 2 * MiB - 4 * KiB) == bytes(2 * MiB - 4 * KiB)


def test_write_overwrites_a_range(store: Store) -> None:
    store.create_and_write(1, 0, pattern(16 * KiB))
    store.write(1, 4 * KiB, b"x" * 100)
    expected = bytearray(pattern(16 * KiB))
    expected[4 * KiB:4 * KiB + 100] = b"x" * 100
    assert store.read(1, 0, 16 * KiB) == bytes(expected)
    store.write(1, object_size - 3, memoryview(b"end"))
    assert store.read(1, object_size - 3, 3) == b"end"


def test_versions_bump_on_every_change(store: Store) -> None:
    assert store.version(5) == 0
    assert store.create_and_write(5, 0, b"a") == 1
    assert store.write(5, 1, b"b") == 2
    assert store.write(5, 2, b"c", fua=True) == 3
    assert store.discard(5, 0, block) == 4
    assert store.version(5) == 4 and store.stat(5)["version"] == 4
    store.read(5, 0, 10)
    assert store.version(5) == 4  # reads change nothing
    assert store.create_and_write(5, 0, b"again") == 5  # an overwrite is a change too
    assert store.create_and_write(6, 0, b"copy", version=42) == 42  # recovery keeps versions
    assert store.write(6, 0, b"x") == 43


@pytest.mark.parametrize(("offset", "count"), [
    (object_size, 1), (object_size - 1, 2), (0, object_size + 1), (-1, 1), (0, -1),
    (object_size + block, 0)])
def test_ranges_outside_the_object_are_invalid(store: Store, offset: int, count: int) -> None:
    store.create_and_write(1, 0, b"a")
    with pytest.raises(InvalidParameters):
        store.read(1, offset, count)
    with pytest.raises(InvalidParameters):
        store.discard(1, offset, count)
    if count >= 0:
        with pytest.raises(InvalidParameters):
            store.write(1, offset, bytes(count))
        with pytest.raises(InvalidParameters):
            store.create_and_write(2, offset, bytes(count))
    assert not store.exists(2)
    assert store.version(1) == 1


def test_whole_object_range_is_valid(store: Store) -> None:
    data = pattern(object_size)
    store.create_and_write(3, 0, data)
    assert store.read(3, 0, object_size) == data


def test_missing_objects(store: Store) -> None:
    for call in (lambda: store.read(9, 0, 1), lambda: store.write(9, 0, b"x"),
                 lambda: store.discard(9, 0, block), lambda: store.stat(9),
                 lambda: store.remove(9)):
        with pytest.raises(NoObject):
            call()
    assert not store.exists(9)
    assert store.list_oids() == []
    assert store.version(9) == 0


def test_remove(store: Store) -> None:
    store.create_and_write(1, 0, b"one")
    store.create_and_write(2, 0, b"two")
    store.remove(1)
    # The version survives as a tombstone, bumped: a copy elsewhere that missed the
    # removal is older, and a new life of the object is newer than both.
    assert not store.exists(1) and store.version(1) == 2
    assert store.stat(1) == {"oid": 1, "version": 2, "deleted": True}
    with pytest.raises(NoObject):
        store.read(1, 0, 3)
    with pytest.raises(NoObject):
        store.stat(3)  # never here at all
    assert store.list_oids() == [2]
    assert store.create_and_write(1, 0, b"new") == 3
    assert store.read(1, 0, 3) == b"new"


def test_discard_reads_as_zeros_and_frees_blocks(store: Store) -> None:
    store.create_and_write(1, 0, pattern(MiB))
    before = allocated(store.object_path(1))
    store.discard(1, 256 * KiB, 512 * KiB)
    after = allocated(store.object_path(1))
    assert before - after >= 512 * KiB - 2 * block
    assert store.read(1, 256 * KiB, 512 * KiB) == bytes(512 * KiB)
    assert store.read(1, 0, 256 * KiB) == pattern(MiB)[:256 * KiB]
    assert store.read(1, 768 * KiB, 256 * KiB) == pattern(MiB)[768 * KiB:]
    assert store.stat(1)["size"] == object_size


def test_list_oids_and_usage(store: Store) -> None:
    oids = [0x8000_0000_0000_0001, 0x2, 0xABCD_0000_0000_00FF, 0x1FF]
    for oid in oids:
        store.create_and_write(oid, 0, pattern(8 * KiB))
    # A stray file in the object tree is not an object.
    Path(store.object_dir, "01", "not-an-oid").write_bytes(b"")
    assert store.list_oids() == sorted(oids)
    usage = store.usage()
    assert usage["objects"] == len(oids) + 1
    assert len(oids) * 8 * KiB <= usage["used"] <= len(oids) * 64 * KiB
    assert usage["capacity"] == usage["used"] + usage["free"]
    assert 0 < usage["free"] <= usage["fs_size"]


def test_object_paths_fan_out(store: Store) -> None:
    path = store.object_path(0x1234)
    assert path == os.path.join(store.object_dir, "34", "0000000000001234")


def test_wipe_drops_every_object(store: Store) -> None:
    for oid in range(1, 6):
        store.create_and_write(oid, 0, b"data")
    store.write(3, 0, b"dirty")
    store.wipe()
    assert store.list_oids() == [] and store.usage()["objects"] == 0
    assert all(store.version(oid) == 0 for oid in range(1, 6))
    with pytest.raises(NoObject):
        store.read(3, 0, 1)
    job = store.begin_sync()
    assert job.fds == [] and job.metas == {}
    store.sync_done(job)
    assert store.create_and_write(3, 0, b"fresh") == 1
    assert store.read(3, 0, 5) == b"fresh"


def test_a_wipe_between_the_steps_of_a_sync_voids_it(store: Store) -> None:
    """A format wipes the store while the peer's sync may be between its steps (files
    synced in a worker thread, commit still to come, then sync_done on the loop):
    nothing of that sync may bring the wiped objects back."""
    store.create_and_write(1, 0, b"data")
    store.sync()
    store.write(1, 0, b"more")
    store.create_and_write(2, 0, b"new")
    job = store.begin_sync()
    store.sync_files(job)
    store.wipe()
    store.meta_executor.submit(store.commit, job).result()
    store.sync_done(job)
    assert store.list_oids() == [] and store.version(1) == 0 and store.version(2) == 0
    assert store.create_and_write(2, 0, b"after") == 1
    store = reopen(store)
    assert store.version(1) == 0 and store.version(2) == 1
    assert store.read(2, 0, 5) == b"after"
    store.close()


def test_a_wipe_waits_for_the_commit_under_way(store: Store) -> None:
    """A sync's commit already running on the metadata thread when the wipe comes:
    the wipe's own commit goes after it, and drops what it wrote."""
    store.create_and_write(1, 0, b"data")
    job = store.begin_sync()
    store.sync_files(job)
    running = threading.Event()
    go_on = threading.Event()
    store.meta_executor.submit(lambda: (running.set(), go_on.wait(10)))
    commit = store.meta_executor.submit(store.commit, job)
    running.wait(10)
    wipe = threading.Thread(target=store.wipe)
    wipe.start()
    time.sleep(0.05)  # the wipe is waiting for the metadata thread, or done
    go_on.set()
    commit.result()
    wipe.join(10)
    store.sync_done(job)
    store = reopen(store)
    assert store.version(1) == 0
    store.close()


def test_objects_survive_reopen(store: Store) -> None:
    store.create_and_write(1, 100, b"kept")
    store.write(1, 200, b"too")
    store = reopen(store)
    try:
        assert store.read(1, 100, 4) == b"kept" and store.read(1, 200, 3) == b"too"
        assert store.version(1) == 2
        assert store.list_oids() == [1]
    finally:
        store.close()


# --- metadata ------------------------------------------------------------------------


def test_config_persists(store: Store) -> None:
    assert store.config_get("missing") is None
    store.config_put("answer", {"a": [1, 2], "b": None})
    store.config_put("name", "sheep")
    store = reopen(store)
    try:
        assert store.config_get("answer") == {"a": [1, 2], "b": None}
        assert store.config_get("name") == "sheep"
    finally:
        store.close()


def test_node_secret_is_stable(store: Store, tmp_path: Path) -> None:
    secret = store.node_secret()
    assert len(secret) == 8 and int(secret, 16) >= 0
    assert store.node_secret() == secret
    store = reopen(store)
    try:
        assert store.node_secret() == secret
    finally:
        store.close()
    other = Store(str(tmp_path / "other"))
    other.open()
    try:
        assert other.node_secret() != secret
    finally:
        other.close()


def test_cluster_state_persists(store: Store) -> None:
    assert store.load_cluster_state() == (None, [])
    node = {"node_id": "127.0.0.1:7000/00000001", "address": "127.0.0.1", "port": 7000,
            "zone": 1, "weight": 16 << 28}
    epochs = [{"epoch": epoch, "time": float(epoch), "nodes": [node]} for epoch in (1, 2, 300)]
    store.save_cluster_state({"seq": 2, "epoch": 2}, epochs[:2])
    store.save_cluster_state({"seq": 5, "epoch": 300}, epochs[2:])
    store = reopen(store)
    try:
        state, loaded = store.load_cluster_state()
        assert state == {"seq": 5, "epoch": 300}
        assert loaded == epochs  # in epoch order, not text order
    finally:
        store.close()


def test_cluster_state_machine_round_trips_through_the_store(store: Store) -> None:
    from sheep.cluster_state import ClusterState, Event, EventKind
    from sheep.node import NodeInfo

    state = ClusterState()
    seen = 0
    for seq in range(1, 13):
        node = NodeInfo(f"n{seq % 4}", "127.0.0.1", 7000 + seq % 4, seq % 4, 16)
        kind = EventKind.JOIN if seq % 3 else EventKind.LEAVE
        state.apply(Event(seq=seq, kind=kind, time=float(seq), node=node if seq % 3 else None,
                          node_id="" if seq % 3 else node.node_id))
        store.save_cluster_state(state.to_json(), [e.to_json() for e in state.epochs[seen:]])
        seen = len(state.epochs)
    store = reopen(store)
    try:
        saved, epochs = store.load_cluster_state()
        assert saved is not None
        loaded = ClusterState.from_json(saved, epochs)
        assert loaded.to_json() == state.to_json()
        assert [e.to_json() for e in loaded.epochs] == [e.to_json() for e in state.epochs]
    finally:
        store.close()


# --- sync ------------------------------------------------------------------------------


@pytest.fixture
def per_file_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file fdatasynced on its own (no syncfs), so that the calls can be counted
    and failed one by one."""
    from sheep.store import fileio

    monkeypatch.setattr(fileio, "_libc_syncfs", None)


def test_sync_fsyncs_dirty_objects_once(store: Store, monkeypatch: pytest.MonkeyPatch,
                                        per_file_sync: None) -> None:
    synced: list[int] = []
    real_fdatasync = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    store.create_and_write(1, 0, b"a")
    store.create_and_write(2, 0, b"b")
    store.write(2, 1, b"c")
    store.create_and_write(4, 0, b"d")
    store.write(4, 0, b"e", fua=True)  # synced at once, with the create before it
    inode = {oid: os.stat(store.object_path(oid)).st_ino for oid in (1, 2, 4)}
    assert synced == [inode[4]]
    synced.clear()
    store.sync()
    assert sorted(synced) == sorted([inode[1], inode[2]])
    synced.clear()
    store.sync()
    assert synced == []


def test_fua_write_is_not_left_dirty(store: Store) -> None:
    store.create_and_write(1, 0, b"a")
    store.sync()
    store.write(1, 0, b"b", fua=True)
    job = store.begin_sync()
    assert job.fds == [] and job.metas == {}
    store.sync_done(job)


def test_begin_and_finish_sync(store: Store) -> None:
    store.create_and_write(1, 0, b"a")
    store.create_and_write(2, 0, b"b")
    job = store.begin_sync()
    fds = list(job.fds)
    assert len(fds) == 2
    with pytest.raises(AssertionError, match="already under way"):
        store.begin_sync()  # one at a time: the owner (the peer) serializes them
    # The duplicates outlive the cache's own fds: remove closes those.
    store.remove(1)
    store.write(2, 0, b"c")  # dirty again, for the next flush
    store.finish_sync(job)
    store.sync_done(job)
    for fd in fds:
        with pytest.raises(OSError) as caught:
            os.fstat(fd)
        assert caught.value.errno == errno.EBADF
    job = store.begin_sync()
    assert len(job.fds) == 1  # the taken ones are not repeated; the rewritten one is
    store.finish_sync(job)
    store.sync_done(job)


def test_finish_sync_closes_fds_even_when_it_fails(
        store: Store, monkeypatch: pytest.MonkeyPatch, per_file_sync: None) -> None:
    store.create_and_write(1, 0, b"a")
    job = store.begin_sync()

    def failing_fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    fds = list(job.fds)
    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    with pytest.raises(IOErrorResult):
        store.finish_sync(job)
    with pytest.raises(OSError):
        os.fstat(fds[0])
    assert 1 in store._dirty  # the next flush tries again, rather than answering at once
    monkeypatch.undo()
    store.sync()
    assert not store._dirty and store.stat(1)["synced"]


def test_close_twice_and_close_unopened(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s"))
    store.close()
    store.open()
    store.create_and_write(1, 0, b"a")
    store.close()
    store.close()


# --- the fd cache ---------------------------------------------------------------------


def test_fd_cache_evicts_and_fsyncs(store: Store, monkeypatch: pytest.MonkeyPatch,
                                    per_file_sync: None) -> None:
    cache_max = store_module._fd_cache_max
    count = cache_max + 50
    synced: set[int] = set()
    # Record instead of syncing: a thousand real fsyncs would make this test slow.
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.add(os.fstat(fd).st_ino))

    for oid in range(1, count + 1):
        store.create_and_write(oid, 0, oid.to_bytes(8, "little"))
    assert len(store._fds) == cache_max
    evicted = list(range(1, count - cache_max + 1))
    assert all(oid not in store._fds for oid in evicted)
    # Evicted dirty objects were synced on the way out, and are no longer dirty.
    inode = {oid: os.stat(store.object_path(oid)).st_ino for oid in range(1, count + 1)}
    assert synced == {inode[oid] for oid in evicted}
    assert not set(evicted) & store._dirty

    # Everything still reads and writes, evicted or not, and the cache stays bounded.
    for oid in range(1, count + 1):
        assert store.read(oid, 0, 8) == oid.to_bytes(8, "little")
        assert len(store._fds) <= cache_max
    for oid in evicted:
        store.write(oid, 8, b"more")
    assert store.read(1, 0, 12) == (1).to_bytes(8, "little") + b"more"
    assert store.version(1) == 2
    assert len(store._fds) == cache_max

    synced.clear()
    store.sync()
    # Only objects still in the cache are left to sync; the rest were synced on eviction.
    assert synced <= {inode[oid] for oid in range(1, count + 1)}
    # Every copy counts as durable now, the evicted ones too (their metadata went with
    # this sync): a surplus copy elsewhere waits for that before it is dropped.
    assert all(store.stat(oid)["durable"] for oid in range(1, count + 1))
    assert not store._dirty
    assert len(list(Path("/proc/self/fd").iterdir())) < 2 * cache_max


# --- punching holes -------------------------------------------------------------------


def test_punch_hole_frees_blocks_and_keeps_size(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(pattern(MiB))
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        before = allocated(str(path))
        punch_hole(fd, 128 * KiB, 256 * KiB)
        assert before - allocated(str(path)) >= 256 * KiB - 2 * block
        assert os.fstat(fd).st_size == MiB
        data = os.pread(fd, MiB, 0)
        assert data[128 * KiB:384 * KiB] == bytes(256 * KiB)
        assert data[:128 * KiB] == pattern(MiB)[:128 * KiB]
        assert data[384 * KiB:] == pattern(MiB)[384 * KiB:]
        punch_hole(fd, 0, 0)  # nothing to do
        punch_hole(fd, 10, -5)
        assert os.pread(fd, 10, 0) == pattern(10)
    finally:
        os.close(fd)


def test_punch_hole_unaligned_range(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"\xff" * (64 * KiB))
    fd = os.open(path, os.O_RDWR)
    try:
        punch_hole(fd, 1000, 10_000)
        data = os.pread(fd, 64 * KiB, 0)
        assert data == b"\xff" * 1000 + bytes(10_000) + b"\xff" * (64 * KiB - 11_000)
    finally:
        os.close(fd)


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, None])
def test_punch_hole_falls_back_to_writing_zeros(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int | None) -> None:
    def refusing_fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(code or 0)
        return -1

    monkeypatch.setattr(punch, "_fallocate", None if code is None else refusing_fallocate)
    path = tmp_path / "file"
    size = 3 * MiB
    path.write_bytes(b"\x01" * size)
    fd = os.open(path, os.O_RDWR)
    try:
        punch_hole(fd, 100, size - 200)  # longer than the zero buffer: several steps
        assert os.pread(fd, size, 0) == b"\x01" * 100 + bytes(size - 200) + b"\x01" * 100
        assert os.fstat(fd).st_size == size
    finally:
        os.close(fd)


def test_punch_hole_reports_other_errors(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            punch_hole(fd, 0, 4096)
        assert caught.value.errno == errno.EBADF
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 8192


# --- errors are translated at the boundary ------------------------------------------------


def failing(code: int):  # type: ignore[no-untyped-def]
    def fail(*args: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(("code", "error_class"), [
    (errno.ENOSPC, NoSpace), (errno.EDQUOT, NoSpace), (errno.EIO, IOErrorResult),
    (errno.EROFS, SystemFailure)])
def test_write_errors_are_translated(store: Store, monkeypatch: pytest.MonkeyPatch,
                                     code: int, error_class: type[Exception]) -> None:
    store.create_and_write(1, 0, b"a")
    monkeypatch.setattr(os, "pwrite", failing(code))
    with pytest.raises(error_class) as caught:
        store.write(1, 0, b"b")
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == code
    assert "write object 0000000000000001" in str(caught.value)
    with pytest.raises(error_class):
        store.create_and_write(2, 0, b"c")
    assert store.version(1) == 1  # a failed write is not a new version


def test_read_errors_are_translated(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create_and_write(1, 0, b"a")
    monkeypatch.setattr(os, "pread", failing(errno.EIO))
    with pytest.raises(IOErrorResult) as caught:
        store.read(1, 0, 1)
    assert "read object" in str(caught.value)


def test_discard_errors_are_translated(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.create_and_write(1, 0, b"a")

    def refusing_fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(punch, "_fallocate", refusing_fallocate)
    with pytest.raises(IOErrorResult):
        store.discard(1, 0, block)


def test_sync_errors_are_translated(store: Store, monkeypatch: pytest.MonkeyPatch,
                                    per_file_sync: None) -> None:
    store.create_and_write(1, 0, b"a")
    monkeypatch.setattr(os, "fdatasync", failing(errno.ENOSPC))
    with pytest.raises(NoSpace):
        store.sync()


def test_open_errors_are_translated(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(SystemFailure):
        Store(str(blocker / "store")).open()


def test_full_metadata_map_is_no_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "lmdb_map_size_bytes", 256 * KiB)
    store = Store(str(tmp_path / "s"))
    store.open()
    try:
        with pytest.raises(NoSpace) as caught:
            for number in range(1000):
                store.config_put(f"key{number}", "v" * 1000)
        assert isinstance(caught.value.__cause__, lmdb.MapFullError)
    finally:
        store.close()


def test_create_and_write_over_an_existing_object_replaces_it(store: Store) -> None:
    # A stale copy of a reused oid must not show through a new object's unwritten ranges.
    store.create_and_write(1, 0, b"\xee" * (64 * KiB))
    assert store.create_and_write(1, 8 * KiB, b"new") == 2
    assert store.read(1, 0, 8 * KiB) == bytes(8 * KiB)
    assert store.read(1, 8 * KiB, 3) == b"new"
    assert store.read(1, 8 * KiB + 3, 56 * KiB) == bytes(56 * KiB)
    assert store.stat(1)["size"] == object_size
    assert allocated(store.object_path(1)) <= 16 * KiB


def test_failed_sync_on_eviction_keeps_the_object_dirty(
        store: Store, monkeypatch: pytest.MonkeyPatch, per_file_sync: None) -> None:
    cache_max = store_module._fd_cache_max
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    for oid in range(1, cache_max + 1):
        store.create_and_write(oid, 0, b"x")
    open_fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fdatasync", failing(errno.EIO))
    with pytest.raises(IOErrorResult):
        store.create_and_write(cache_max + 1, 0, b"y")  # evicts object 1, which is dirty
    # Object 1 could not be synced: its fd stays, and it stays dirty for the next sync.
    assert 1 in store._fds and 1 in store._dirty
    # The new object's creation failed: it is not left behind half made (nor its fd).
    assert not store.exists(cache_max + 1)
    assert len(os.listdir("/proc/self/fd")) == open_fds
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    assert store.read(1, 0, 1) == b"x"
    assert store.create_and_write(cache_max + 1, 0, b"y") == 1
    assert len(store._fds) == cache_max


# --- digests kept with the metadata ------------------------------------------------------


def test_stat_digest_comes_from_the_metadata_without_reading_the_checksum_table(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A committed copy's digest is kept in its metadata value: STAT (run for every copy
    at start-up and in recovery) must not read the 4 KiB checksum tables, which would
    map the whole checksum database into the sheep's memory."""
    from sheep.store import sums

    store.create_and_write(1, 0, pattern(3 * block))
    store.create_and_write(2, 0, b"")
    dirty = {oid: store.stat(oid)["digest"] for oid in (1, 2)}
    assert dirty[1] == sums.digest(store._checksums(1)) != dirty[2]
    store.sync()
    store = reopen(store)

    def no_table(*args: object) -> None:
        raise AssertionError("the checksum table was read")

    monkeypatch.setattr(store, "_checksums", no_table)
    assert {oid: store.stat(oid)["digest"] for oid in (1, 2)} == dirty
    monkeypatch.undo()
    store.write(1, 0, b"changed")  # a changed copy: its digest follows at once
    changed = store.stat(1)["digest"]
    assert changed != dirty[1]
    store.sync()
    monkeypatch.setattr(store, "_checksums", no_table)
    assert store.stat(1)["digest"] == changed
    monkeypatch.undo()
    store.close()


def test_metadata_values_of_the_old_form_are_still_read(store: Store) -> None:
    """Stores written before digests were kept: version and tombstone are read, the
    digest is computed from the checksum table, and the next commit adds it."""
    store.create_and_write(1, 0, pattern(block))
    store.create_and_write(2, 0, pattern(block, 3))
    store.remove(2)
    store.sync()
    expected = store.stat(1)
    with store.env.begin(write=True) as txn:
        for oid in (1, 2):
            key = oid.to_bytes(8, "big")
            version, removed, _ = store_module._unpack_meta(txn.get(key, db=store._objects))
            txn.put(key, store_module._meta_value.pack(version, 1 if removed else 0),
                    db=store._objects)
    store = reopen(store)
    assert store.stat(1)["digest"] == expected["digest"]
    assert store.stat(1)["version"] == expected["version"]
    assert store.stat(2)["deleted"]
    store.close()


def test_a_failed_creation_leaves_no_half_made_object(tmp_path: Path) -> None:
    """A new object whose first write fails (ENOSPC, EIO) must not stay as a copy at
    version 0: recovery and reads would take it for a real one (found by the simulator:
    a recovered copy that hit EIO served zeros to a copy-up). A tombstone stays."""
    from sheep.testing.faulty import FaultyIO

    io = FaultyIO()
    store = Store(str(tmp_path / "s"), io=io)
    store.open()
    try:
        io.fail("pwrite", errno.ENOSPC, partial=512)
        with pytest.raises(NoSpace):
            store.create_and_write(7, 0, pattern(2 * block), version=5)
        assert not store.exists(7) and store.version(7) == 0
        store.create_and_write(8, 0, b"x")
        store.remove(8, 9)
        io.fail("pwrite", errno.EIO)
        with pytest.raises(IOErrorResult):
            store.create_and_write(8, 0, pattern(block), version=10)
        assert not store.exists(8) and store.version(8) == 9  # still removed, at 9
        assert store.create_and_write(7, 0, b"y", version=6) == 6
    finally:
        store.close()


def test_a_failed_replacement_leaves_the_old_copy_in_doubt(tmp_path: Path) -> None:
    """A whole new copy over an old one (the verifier's replacement, a repair) that
    fails halfway leaves a file holding neither, at the old copy's version: in doubt,
    durably, so any copy at that version not in doubt outranks it (found by the
    simulator, seed 67: a replacement that met ENOSPC left zeros at the version of a
    flushed write; the verifier kept them against the good unverified copies, and a
    repair copied them over those)."""
    from sheep import replicas
    from sheep.testing.faulty import FaultyIO

    io = FaultyIO()
    store = Store(str(tmp_path / "s"), io=io)
    store.open()
    try:
        store.create_and_write(7, 0, pattern(2 * block), version=5)
        store.create_and_write(8, 0, pattern(block), version=5)
        store.sync()
        good = store.stat(7)
        assert not store.in_doubt(7)
        extents = [(0, memoryview(pattern(2 * block, seed=3)))]
        io.fail("pwrite", errno.ENOSPC)
        with pytest.raises(NoSpace):
            store.create_from_extents(7, extents, version=5)
        io.fail("pwrite", errno.EIO)
        with pytest.raises(IOErrorResult):
            store.create_and_write(8, 0, pattern(block, seed=3), version=5)
        for oid in (7, 8):
            assert store.exists(oid) and store.version(oid) == 5 and store.in_doubt(oid)
            assert store.verify(oid) == []  # checksums true to what the file holds
        torn = replicas.CopyStatus.from_json({**store.stat(7), "unverified": True})
        assert torn.doubtful and torn.digest != good["digest"]
        other = replicas.CopyStatus.from_json({**good, "unverified": True})
        best = replicas.newest([("there", other)], verified_only=False)
        assert replicas.verdict(torn, best, False) is replicas.Verdict.REPLACE
        store.sync()
        store = reopen(store)
        assert store.in_doubt(7) and store.in_doubt(8)
        store.create_from_extents(7, extents, version=5)  # replaced at last: no doubt
        assert not store.in_doubt(7)
    finally:
        store.close()


# --- partial copies (a new holder's write before recovery copied the object) ----------


def test_a_partial_copy_keeps_its_writes_and_fill_adds_only_the_rest(store: Store) -> None:
    oid = 0x77
    store.write_partial(oid, 8 * KiB, b"new!" * 1024, version=9)
    assert store.is_partial(oid) and store.in_doubt(oid) and store.partial_oids() == {oid}
    store.write(oid, 100 * KiB, b"two", version=10)  # a later write: recorded too
    assert store.is_partial(oid)
    # The whole copy was read before the partial copy's writes reached its source.
    source = bytearray(pattern(object_size))
    source[2 * MiB:3 * MiB] = bytes(MiB)  # a zero range in the source: stays a hole
    version = store.fill(oid, bytes(source), 8)
    assert version == 10  # the newer of the two
    assert not store.is_partial(oid) and not store.in_doubt(oid)
    data = store.read(oid, 0, object_size)
    assert data[:8 * KiB] == source[:8 * KiB]
    assert data[8 * KiB:12 * KiB] == b"new!" * 1024  # not overwritten by the fill
    assert data[12 * KiB:100 * KiB] == source[12 * KiB:100 * KiB]
    assert data[100 * KiB:100 * KiB + 3] == b"two"
    assert data[100 * KiB + 3:] == source[100 * KiB + 3:]
    assert allocated(store.object_path(oid)) <= object_size - MiB + 64 * KiB
    assert store.verify(oid) == []  # checksums hold for every block


def test_a_partial_copy_only_replaces_nothing(store: Store) -> None:
    store.create_and_write(1, 0, b"here")
    with pytest.raises(NoObject):
        store.write_partial(1, 0, b"x", version=5)
    store.create_and_write(2, 0, b"gone")
    store.remove(2)
    with pytest.raises(NoObject):  # a tombstone: the object was removed
        store.write_partial(2, 0, b"x", version=9)
    with pytest.raises(NoObject):
        store.fill(3, bytes(object_size), 1)
    store.write_partial(4, 0, b"x", version=2)
    with pytest.raises(InvalidParameters):
        store.fill(4, b"short", 1)


def test_a_whole_copy_or_a_removal_ends_a_partial_copy(store: Store) -> None:
    store.write_partial(5, 0, b"x", version=2)
    store.create_and_write(5, 0, b"whole", version=3)
    assert not store.is_partial(5) and not store.in_doubt(5)
    store.write_partial(6, 0, b"x", version=2)
    store.remove(6)
    assert not store.is_partial(6) and not store.in_doubt(6)


def test_a_partial_copy_stays_partial_across_a_restart_with_its_ranges(store: Store) -> None:
    """A restart must not take a partial copy for a whole one: the verifier would keep
    it (nothing outranks it) and a write's recovery copy its holes over good copies
    (simulator, seed 474). Its ranges come back with it, so the fill after the restart
    still keeps what was written here."""
    store.write_partial(7, 4 * KiB, b"half", version=4)
    store.write(7, 64 * KiB, b"more", version=5)
    again = reopen(store)
    try:
        assert again.is_partial(7) and again.in_doubt(7)
        assert 7 in again.list_oids() and 7 not in again.copies()
        source = pattern(object_size)
        assert again.fill(7, source, 3) == 5
        data = again.read(7, 0, object_size)
        assert data[4 * KiB:4 * KiB + 4] == b"half" and data[64 * KiB:64 * KiB + 4] == b"more"
        assert data[:4 * KiB] == source[:4 * KiB] and data[-KiB:] == source[-KiB:]
        # This sheep was away: what it wrote may have been written again meanwhile, so
        # the filled copy stays in doubt until the verifier compares it.
        assert again.in_doubt(7)
        third = reopen(again)  # filled and synced: its record is gone
        assert not third.is_partial(7) and 7 in third.copies()
        third.close()
    finally:
        again.close()


def test_a_partial_copy_that_failed_leaves_no_record(store: Store,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """write_partial records the copy before making it: if making it fails, the
    record must go, or a whole copy made here later would come back partial at the
    next start, and its fill keep stale bytes (found by review)."""
    def no_space(*args: object, **kwargs: object) -> int:
        raise NoSpace("full")

    with monkeypatch.context() as patched:
        patched.setattr(store, "create_and_write", no_space)
        with pytest.raises(NoSpace):
            store.write_partial(9, 0, b"x", version=2)
    assert not store.is_partial(9)
    store.create_from_extents(9, [(0, memoryview(b"whole".ljust(4096, b"\0")))], 5)
    again = reopen(store)
    try:
        assert not again.is_partial(9) and again.read(9, 0, 5) == b"whole"
    finally:
        again.close()


def test_a_partial_record_whose_file_is_gone_is_forgotten(store: Store) -> None:
    store.write_partial(8, 0, b"x", version=2)
    store.sync()
    os.unlink(store.object_path(8))  # as a crash before the file's entry was durable
    again = reopen(store)
    try:
        assert not again.is_partial(8) and again.partial_oids() == set()
        with again.env.begin(db=again._partial_db) as txn:
            assert txn.get((8).to_bytes(8, "big")) is None  # deleted, not met again
    finally:
        again.close()


# --- copies by extents (thin recovery) --------------------------------------------------


def copy_by_extents(source: Store, target: Store, oid: int, version: int | None = None) -> int:
    return target.create_from_extents(oid, source.read_extents(oid)[0], version)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Store]:
    yield from opened(tmp_path / "target")


def test_file_extents_are_the_written_ranges(tmp_path: Path) -> None:
    from sheep.store.fileio import FileIO

    io = FileIO()
    fd = io.open(str(tmp_path / "file"), create=True)
    try:
        io.truncate(fd, object_size)
        assert io.extents(fd, object_size) == []
        io.pwrite(fd, b"x" * 100, 8 * KiB)
        io.pwrite(fd, b"y" * (64 * KiB), 2 * MiB)
        found = io.extents(fd, object_size)
        for start, end in ((8 * KiB, 8 * KiB + 100), (2 * MiB, 2 * MiB + 64 * KiB)):
            assert any(low <= start and end <= high for low, high in found), found
        assert sum(high - low for low, high in found) <= 2 * (64 * KiB + block)
        # Cut at size: nothing past it is listed.
        assert all(high <= MiB for _, high in io.extents(fd, MiB))
    finally:
        io.close(fd)


def test_file_writes_go_in_pieces_and_survive_short_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 MiB write goes in calls of at most write_piece_bytes (one big pwrite into
    the page cache was ten times slower here); a short write goes on where it stopped."""
    from sheep.store import fileio

    calls: list[int] = []
    real = os.pwrite

    def recording(fd: int, data: memoryview, offset: int) -> int:
        calls.append(len(data))
        return real(fd, data[:len(data) - 1000] if len(calls) == 2 else data, offset)

    io = fileio.FileIO()
    fd = io.open(str(tmp_path / "file"), create=True)
    data = os.urandom(object_size)
    try:
        monkeypatch.setattr(os, "pwrite", recording)
        assert io.pwrite(fd, data, 0) == object_size
        monkeypatch.undo()
        assert max(calls) <= fileio.write_piece_bytes < object_size
        assert os.pread(fd, object_size, 0) == data
    finally:
        io.close(fd)


def test_file_extents_where_holes_cannot_be_found_are_the_whole_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sheep.store.fileio import FileIO

    io = FileIO()
    fd = io.open(str(tmp_path / "file"), create=True)
    try:
        io.truncate(fd, object_size)

        def unsupported(fd: int, offset: int, whence: int) -> int:
            raise OSError(errno.EINVAL, "no SEEK_DATA here")

        monkeypatch.setattr(os, "lseek", unsupported)
        assert io.extents(fd, object_size) == [(0, object_size)]
        monkeypatch.setattr(os, "lseek", failing(errno.EIO))
        with pytest.raises(OSError):  # a real failure is not taken for "all data"
            io.extents(fd, object_size)
    finally:
        monkeypatch.undo()
        io.close(fd)


def test_faulty_disk_extents_include_unsynced_writes(tmp_path: Path) -> None:
    from sheep.testing.faulty import FaultyIO

    io = FaultyIO()
    fd = io.open(str(tmp_path / "file"), create=True)
    try:
        io.truncate(fd, object_size)
        io.pwrite(fd, b"z" * block, 3 * block)  # held in memory, not in the file yet
        assert io.extents(fd, object_size) == [(3 * block, 4 * block)]
        io.fail("extents", errno.EIO)
        with pytest.raises(OSError):
            io.extents(fd, object_size)
    finally:
        io.close(fd)


def test_a_copy_by_extents_keeps_the_holes_and_the_bytes(store: Store, target: Store) -> None:
    oid = 0x51
    store.create_and_write(oid, 0, pattern(64 * KiB), version=7)
    store.write(oid, 2 * MiB + 100, b"tail")  # inside one block: the block goes whole
    store.write(oid, 3 * MiB, bytes(32 * KiB))  # zeros written: allocated, yet not data
    extents, _ = store.read_extents(oid)
    assert [(offset, len(data)) for offset, data in extents] == [
        (0, 64 * KiB), (2 * MiB, block)]
    assert copy_by_extents(store, target, oid, version=9) == 9  # exactly the given version
    source_path, copy_path = store.object_path(oid), target.object_path(oid)
    assert os.stat(copy_path).st_size == object_size
    assert allocated(copy_path) == 64 * KiB + block
    assert allocated(copy_path) < allocated(source_path)  # the written zeros stayed behind
    assert target.read(oid, 0, object_size) == store.read(oid, 0, object_size)
    assert target.verify(oid) == []  # every block, holes included
    assert target.stat(oid)["digest"] == store.stat(oid)["digest"]
    # The checksums hold after a restart too (committed as computed, not re-read).
    target = reopen(target)
    assert target.verify(oid) == [] and target.version(oid) == 9


def test_an_object_of_zeros_is_copied_as_a_hole(store: Store, target: Store) -> None:
    oid = 0x52
    store.create_and_write(oid, 0, bytes(object_size))  # every byte written, all zeros
    assert allocated(store.object_path(oid)) >= object_size
    assert store.read_extents(oid)[0] == []
    copy_by_extents(store, target, oid, version=1)
    assert allocated(target.object_path(oid)) == 0
    assert target.read(oid, 0, object_size) == bytes(object_size)
    assert target.verify(oid) == []


def test_zero_blocks_inside_extents_are_not_written(target: Store) -> None:
    data = bytearray(pattern(8 * block))
    data[2 * block:5 * block] = bytes(3 * block)
    target.create_from_extents(0x53, [(MiB, memoryview(bytes(data)))], version=4)
    assert allocated(target.object_path(0x53)) == 5 * block
    assert target.read(0x53, MiB, len(data)) == data
    assert target.verify(0x53) == []


def test_a_copy_by_extents_replaces_an_older_copy_whole(store: Store, target: Store) -> None:
    oid = 0x54
    target.create_and_write(oid, 0, pattern(object_size, seed=3), version=2)
    store.create_and_write(oid, MiB, pattern(block), version=5)
    assert copy_by_extents(store, target, oid, version=5) == 5
    assert target.read(oid, 0, object_size) == store.read(oid, 0, object_size)
    assert allocated(target.object_path(oid)) == block
    assert target.verify(oid) == []


@pytest.mark.parametrize("where", ["data", "hole"])
def test_a_damaged_source_block_is_an_io_error(store: Store, where: str) -> None:
    oid = 0x55
    store.create_and_write(oid, 0, pattern(4 * block))
    store.sync()
    if where == "data":  # a flipped byte in a block that holds data
        with open(store.object_path(oid), "r+b") as file:
            file.seek(block + 9)
            file.write(b"!")
    else:  # a block the file lost: it reads as zeros, its checksum says otherwise
        fd = os.open(store.object_path(oid), os.O_RDWR)
        try:
            punch_hole(fd, 2 * block, block)
        finally:
            os.close(fd)
    with pytest.raises(IOErrorResult, match="checksum mismatch in block"):
        store.read_extents(oid)
    with pytest.raises(IOErrorResult):  # exactly as a read of the whole object
        store.read(oid, 0, object_size)


def test_a_missing_source_file_is_an_io_error_and_an_absent_object_is_none(
        store: Store) -> None:
    store.create_and_write(0x56, 0, b"x")
    store.sync()
    os.unlink(store.object_path(0x56))
    store = reopen(store)  # no fd cached for it
    try:
        with pytest.raises(IOErrorResult, match="missing"):
            store.read_extents(0x56)
        with pytest.raises(NoObject):
            store.read_extents(0x57)
    finally:
        store.close()


def test_extents_that_are_not_whole_blocks_in_order_are_refused(target: Store) -> None:
    for extents in ([(1, memoryview(bytes(block)))], [(0, memoryview(bytes(10)))],
                    [(block, memoryview(bytes(block))), (0, memoryview(bytes(block)))],
                    [(object_size, memoryview(bytes(block)))]):
        with pytest.raises(InvalidParameters):
            target.create_from_extents(0x58, extents)
    assert not target.exists(0x58)


def test_a_failed_copy_by_extents_leaves_no_half_made_object(tmp_path: Path) -> None:
    from sheep.testing.faulty import FaultyIO

    io = FaultyIO()
    store = Store(str(tmp_path / "faulty"), io=io)
    store.open()
    try:
        io.fail("pwrite", errno.EIO)
        with pytest.raises(IOErrorResult):
            store.create_from_extents(0x59, [(0, memoryview(pattern(block)))], version=3)
        assert not store.exists(0x59) and store.version(0x59) == 0
        # An old copy replaced halfway keeps checksums true to what its file holds.
        store.create_and_write(0x5A, 0, pattern(2 * block), version=1)
        io.fail("pwrite", errno.ENOSPC, partial=512)
        with pytest.raises(NoSpace):
            store.create_from_extents(0x5A, [(0, memoryview(pattern(2 * block, seed=9)))], 2)
        assert store.verify(0x5A) == []
    finally:
        store.close()


def adopt(target: Store, oid: int, extents: list[tuple[int, memoryview]], version: int) -> bool:
    return asyncio.run(target.adopt_extents(oid, extents, version))


def test_an_adopted_copy_is_the_copy_by_extents_written_off_the_loop(
        store: Store, target: Store) -> None:
    oid = 0x61
    store.create_and_write(oid, 0, pattern(64 * KiB), version=7)
    store.write(oid, 3 * MiB, bytes(32 * KiB))  # zeros: not written on the copy
    threads: list[str] = []
    real = target._write_adopted

    def recorded(*args: object) -> object:
        threads.append(threading.current_thread().name)
        return real(*args)  # type: ignore[arg-type]

    target._write_adopted = recorded  # type: ignore[method-assign]
    assert adopt(target, oid, store.read_extents(oid)[0], 7)
    assert threads and threads[0].startswith("store-write")  # not the loop's thread
    assert target.read(oid, 0, object_size) == store.read(oid, 0, object_size)
    assert allocated(target.object_path(oid)) == 64 * KiB
    assert target.verify(oid) == [] and target.version(oid) == 7
    assert target.stat(oid)["digest"] == store.stat(oid)["digest"]
    assert os.listdir(os.path.dirname(target.object_path(oid))) == [f"{oid:016x}"]
    assert target.list_oids() == [oid]
    target = reopen(target)  # synced at the close: whole, at its version
    assert target.verify(oid) == [] and target.version(oid) == 7
    target.close()


def test_adoption_gives_way_to_a_write_that_made_the_object_meanwhile(target: Store) -> None:
    """A client's write makes a partial copy while the adopted file is written: the
    adoption keeps nothing (the caller fills the partial copy instead), and leaves
    no file behind."""
    oid = 0x62
    real = target._write_adopted

    def racing(*args: object) -> object:
        result = real(*args)  # type: ignore[arg-type]
        target.write_partial(oid, 0, b"newer", version=9)  # as if on the loop meanwhile
        return result

    target._write_adopted = racing  # type: ignore[method-assign]
    assert not adopt(target, oid, [(0, memoryview(pattern(block)))], 5)
    assert target.is_partial(oid) and target.read(oid, 0, 5) == b"newer"
    assert os.listdir(os.path.dirname(target.object_path(oid))) == [f"{oid:016x}"]
    # Known already (a tombstone, a copy): nothing is written at all.
    target.remove(oid)
    assert not adopt(target, oid, [(0, memoryview(pattern(block)))], 10)


def test_a_failed_or_crashed_adoption_leaves_nothing(tmp_path: Path) -> None:
    from sheep.testing.faulty import FaultyIO

    io = FaultyIO()
    store = Store(str(tmp_path / "faulty"), io=io)
    store.open()
    io.fail("pwrite", errno.ENOSPC, partial=512)
    with pytest.raises(NoSpace):
        adopt(store, 0x63, [(0, memoryview(pattern(2 * block)))], 3)
    assert not store.knows(0x63)
    assert os.listdir(os.path.dirname(store.object_path(0x63))) == []
    # A crash while a copy is being written leaves its file under the temporary
    # name: the next start removes it.
    leftover = store.object_path(0x64) + ".adopting"
    os.makedirs(os.path.dirname(leftover), exist_ok=True)
    with open(leftover, "wb") as file:
        file.write(b"half")
    store.close()
    store = Store(str(tmp_path / "faulty"), io=io)
    store.open()
    assert not os.path.exists(leftover) and store.list_oids() == []
    # Adopted, then the power fails before a sync: the copy is gone whole (its
    # entry never reached the disk), never there with checksums that lie.
    assert adopt(store, 0x65, [(0, memoryview(pattern(block)))], 4)
    io.power_loss(lose_all=True)
    store._fds.clear()
    assert store._env is not None
    store._env.close()
    store._env = None
    store = Store(str(tmp_path / "faulty"), io=io)
    store.open()
    assert not store.exists(0x65) and store.version(0x65) == 0
    store.close()


def test_fill_from_extents_keeps_what_the_partial_copy_wrote(store: Store) -> None:
    oid = 0x5B
    store.write_partial(oid, 8 * KiB, b"new!" * 1024, version=9)
    source = [(0, memoryview(pattern(16 * KiB))), (MiB, memoryview(pattern(block, seed=5)))]
    assert store.fill_extents(oid, source, 8) == 9
    assert not store.is_partial(oid) and not store.in_doubt(oid)
    data = store.read(oid, 0, object_size)
    assert data[:8 * KiB] == pattern(16 * KiB)[:8 * KiB]
    assert data[8 * KiB:12 * KiB] == b"new!" * 1024
    assert data[12 * KiB:16 * KiB] == pattern(16 * KiB)[12 * KiB:]
    assert data[MiB:MiB + block] == pattern(block, seed=5)
    assert data[16 * KiB:MiB] == bytes(MiB - 16 * KiB)  # the source's holes
    assert data[MiB + block:] == bytes(object_size - MiB - block)
    assert allocated(store.object_path(oid)) == 16 * KiB + block
    assert store.verify(oid) == []


def test_extents_are_packed_in_one_buffer_after_the_room_asked_for(store: Store) -> None:
    """Blocks of zeros inside the file's data are left out and the data after them
    moves up, so the extents lie one after another from ``room`` on: a sparse reply
    puts its table in front and sends the buffer without another copy."""
    oid = 0x5C
    data = bytearray(pattern(6 * block))
    data[block:3 * block] = bytes(2 * block)  # written zeros between data
    store.create_and_write(oid, 0, bytes(data))
    extents, buffer = store.read_extents(oid, room=100)
    assert [(offset, bytes(view)) for offset, view in extents] == [
        (0, bytes(data[:block])), (3 * block, bytes(data[3 * block:]))]
    assert bytes(buffer[100:100 + 4 * block]) == bytes(data[:block] + data[3 * block:])
    assert all(view.obj is buffer for _, view in extents)


# --- the format version -----------------------------------------------------------------

_opened = contextlib.contextmanager(opened)


def test_a_new_store_is_stamped_with_the_format_version(tmp_path: Path) -> None:
    from sheep.store import store as store_module

    with _opened(tmp_path / "s") as fresh:
        assert fresh.config_get("format_version") == store_module.format_version


def test_a_store_from_before_versions_is_stamped_and_a_newer_one_refused(tmp_path: Path) -> None:
    from sheep.errors import SystemFailure
    from sheep.store import store as store_module

    with _opened(tmp_path / "s") as old:
        old.create_and_write(0x10, 0, b"kept")
        with old.env.begin(db=old._config, write=True) as txn:
            txn.delete(b"format_version")  # as a store made before versions were kept
    with _opened(tmp_path / "s") as again:
        assert again.config_get("format_version") == store_module.format_version
        assert again.read(0x10, 0, 4) == b"kept"
        again.config_put("format_version", store_module.format_version + 1)
    newer = Store(str(tmp_path / "s"))
    with pytest.raises(SystemFailure, match=f"format version {store_module.format_version + 1},"
                                            " newer than this sheep's"):
        newer.open()


def test_an_older_store_is_upgraded_step_by_step_and_a_crash_in_a_step_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sheep.errors import SystemFailure
    from sheep.store import store as store_module

    current = store_module.format_version
    monkeypatch.setattr(store_module, "format_version", current + 2)
    with _opened(tmp_path / "s") as made:
        made.config_put("format_version", current)
    ran: list[int] = []
    crash = [True]

    def first(store: Store) -> None:
        ran.append(current)
        store.config_put("upgraded", "once")  # idempotent

    def second(store: Store) -> None:
        ran.append(current + 1)
        if crash:
            crash.pop()
            raise OSError("power loss in the middle of the step")

    monkeypatch.setattr(store_module, "upgrades", {current: first})
    blocked = Store(str(tmp_path / "s"))
    with pytest.raises(SystemFailure, match=f"cannot upgrade it to {current + 2}"):
        blocked.open()  # version current+1 has no step: refused, after the first step
    blocked.close()
    monkeypatch.setattr(store_module, "upgrades", {current: first, current + 1: second})
    crashed = Store(str(tmp_path / "s"))
    with pytest.raises(SystemFailure, match="power loss"):
        crashed.open()
    crashed.close()
    with _opened(tmp_path / "s") as done:  # the crashed step runs again, then it opens
        assert done.config_get("format_version") == current + 2
    assert ran == [current, current + 1, current + 1]


def test_several_changed_files_are_synced_by_one_syncfs(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """One syncfs of the store's filesystem for a sync of several files (one journal
    commit and one flush of the disk's cache, not one per file); one file alone is
    an fdatasync; a syncfs that fails fails the sync (EIO, an I/O error), and the changes stay
    dirty for the next one."""
    from sheep.store import fileio

    calls: list[str] = []
    real_syncfs = fileio._libc_syncfs
    if real_syncfs is None:
        pytest.skip("no syncfs that reports errors on this kernel")
    failing = {"now": False}

    through: list[int] = []

    def recording_syncfs(fd: int) -> int:
        calls.append("syncfs")
        through.append(fd)
        if failing["now"]:
            ctypes.set_errno(errno.EIO)
            return -1
        return real_syncfs(fd)

    real_fdatasync = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        calls.append("fdatasync")
        real_fdatasync(fd)

    monkeypatch.setattr(fileio, "_libc_syncfs", recording_syncfs)
    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    for oid in (1, 2, 3):
        store.create_and_write(oid, 0, b"a")
    store.sync()
    assert calls == ["syncfs"]
    # Through the store's own fd, opened before any write: a file opened later would
    # not hear of an earlier one's failed writeback.
    assert through == [store._anchor]
    calls.clear()
    store.write(2, 0, b"b")
    store.sync()
    assert calls == ["fdatasync"]
    calls.clear()
    store.write(1, 0, b"c")
    store.write(3, 0, b"c")
    failing["now"] = True
    with pytest.raises(IOErrorResult):
        store.sync()
    failing["now"] = False
    calls.clear()
    store.sync()  # the failed sync's changes are dirty again
    assert calls == ["syncfs"]
    assert store.read(1, 0, 1) == b"c" and store.read(3, 0, 1) == b"c"


def test_files_on_other_filesystems_are_synced_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """syncfs only where every file is on one filesystem: else each is fdatasynced."""
    import concurrent.futures
    from types import SimpleNamespace

    from sheep.store import fileio

    calls: list[str] = []
    monkeypatch.setattr(fileio, "_libc_syncfs", lambda fd: calls.append("syncfs") or 0)
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("fdatasync"))
    anchor = os.open(tmp_path, os.O_RDONLY)
    here = os.open(tmp_path / "a", os.O_RDWR | os.O_CREAT)
    there = os.open(tmp_path / "b", os.O_RDWR | os.O_CREAT)
    real_fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: SimpleNamespace(st_dev=-1) if fd == there
                        else real_fstat(fd))  # as if b were on another filesystem
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            fileio.FileIO().sync_many([here, there], [], pool, anchor)
            assert sorted(calls) == ["fdatasync", "fdatasync"]
            calls.clear()
            fileio.FileIO().sync_many([here], [str(tmp_path)], pool, anchor)
            assert calls == ["syncfs"]
            calls.clear()
            # No anchor (an fd opened before the writes): each file on its own, since a
            # syncfs through a file opened later would not hear of an earlier one's
            # failed writeback.
            fileio.FileIO().sync_many([here], [str(tmp_path)], pool)
            assert calls == ["fdatasync"]
    finally:
        os.close(anchor)
        os.close(here)
        os.close(there)
