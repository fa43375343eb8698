"""Crash safety of the store, on a disk that loses unsynced writes (FaultyIO).

Hundreds of power losses at random points of a random workload (writes aligned
and not, creates, discards, removals, FUA writes, flushes): after each restart
every block holds its content as of the last sync or one of the states written
since (never anything else), no read reports a checksum error, and a flushed
write is never lost. Then planted damage is still caught: checksums are not
merely recomputed for everything after a crash.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from pathlib import Path

import pytest

from sheep.constants import KiB
from sheep.errors import IOErrorResult, NoObject, NoSpace, SystemFailure
from sheep.store import sums
from sheep.store.store import Store
from sheep.testing.faulty import FaultyIO

object_size = 64 * KiB
blocks = object_size // sums.BLOCK
oids = [0x11, 0x22, 0x33, 0x44]


class Model:
    """What each object may hold: per block, its content at the last sync and every
    state written since (any of them may have reached the disk)."""

    def __init__(self) -> None:
        self.current: dict[int, bytearray | None] = dict.fromkeys(oids)
        self.allowed: dict[int, list[set[bytes]]] = {}
        self.may_be_absent: set[int] = set()
        for oid in oids:
            self.synced(oid)

    def synced(self, oid: int) -> None:
        content = self.current[oid]
        if content is None:
            self.allowed.pop(oid, None)
            self.may_be_absent.discard(oid)
            return
        self.allowed[oid] = [{bytes(content[b * sums.BLOCK:(b + 1) * sums.BLOCK])}
                             for b in range(blocks)]
        self.may_be_absent.discard(oid)

    def changed(self, oid: int, offset: int, count: int) -> None:
        content = self.current[oid]
        assert content is not None
        first, end = sums.covering(offset, count)
        table = self.allowed.setdefault(oid, [set() for _ in range(blocks)])
        for block in range(first, end):
            table[block].add(bytes(content[block * sums.BLOCK:(block + 1) * sums.BLOCK]))

    def created(self, oid: int) -> None:
        """A create is a truncate (on disk at once) and then unsynced data; until a
        sync its directory entry may not land (the file vanishes), or an unlinked
        file of the same name may come back in its place."""
        content = self.current[oid]
        assert content is not None
        before = self.allowed.get(oid, [set() for _ in range(blocks)])
        self.allowed[oid] = [{bytes(sums.BLOCK)} | old for old in before]
        self.changed(oid, 0, object_size)
        self.may_be_absent.add(oid)


def new_store(tmp_path: Path, io: FaultyIO | None = None) -> Store:
    store = Store(str(tmp_path / "store"), io=io)
    store.open()
    store.set_object_size(object_size)
    return store


def random_data(rng: random.Random, length: int) -> bytes:
    return bytes([rng.randrange(1, 256)]) * length if rng.random() < 0.5 else rng.randbytes(length)


def step(store: Store, model: Model, rng: random.Random) -> None:
    oid = rng.choice(oids)
    content = model.current[oid]
    roll = rng.random()
    if content is None or roll < 0.05:
        offset = rng.randrange(0, object_size - 1)
        data = random_data(rng, rng.randrange(1, min(3 * sums.BLOCK, object_size - offset)))
        store.create_and_write(oid, offset, data)
        model.current[oid] = bytearray(object_size)
        model.current[oid][offset:offset + len(data)] = data  # type: ignore[index]
        model.created(oid)
    elif roll < 0.70:
        aligned = rng.random() < 0.5
        if aligned:
            offset = rng.randrange(0, blocks) * sums.BLOCK
            length = rng.randrange(1, 3) * sums.BLOCK
        else:
            offset = rng.randrange(0, object_size - 1)
            length = rng.randrange(1, 2 * sums.BLOCK)
        length = min(length, object_size - offset)
        data = random_data(rng, length)
        fua = rng.random() < 0.1
        store.write(oid, offset, data, fua=fua)
        content[offset:offset + length] = data
        model.changed(oid, offset, length)
        if fua:
            model.synced(oid)
    elif roll < 0.80:
        offset = rng.randrange(0, object_size - 1)
        count = min(rng.randrange(1, 3 * sums.BLOCK), object_size - offset)
        store.discard(oid, offset, count)
        content[offset:offset + count] = bytes(count)
        model.changed(oid, offset, count)
    elif roll < 0.85:
        store.remove(oid)
        model.current[oid] = None
        model.may_be_absent.add(oid)
    else:
        store.sync()
        for each in oids:
            model.synced(each)


def crash(store: Store, io: FaultyIO, lose_all: bool = False) -> None:
    """Power loss: the disk keeps what it keeps; the process and its memory are gone
    (LMDB's environment is closed without anything more: its commits are synced)."""
    io.power_loss(lose_all)
    store._fds.clear()
    assert store._env is not None
    store._env.close()
    store._env = None


def check_after_restart(store: Store, model: Model) -> None:
    for oid in oids:
        try:
            data = store.read(oid, 0, object_size)  # a false checksum error raises here
        except NoObject:
            assert model.current[oid] is None or oid in model.may_be_absent or (
                oid not in model.allowed), f"{oid:x} lost"
            model.current[oid] = None
            model.synced(oid)
            continue
        allowed = model.allowed.get(oid)
        assert allowed is not None, f"{oid:x} came back though it never was synced or written"
        for block in range(blocks):
            got = data[block * sums.BLOCK:(block + 1) * sums.BLOCK]
            assert got in allowed[block], f"{oid:x} block {block} holds what was never written"
        model.current[oid] = bytearray(data)
        model.synced(oid)


@pytest.mark.parametrize("seed", range(4))
def test_power_loss_at_random_points_loses_only_unsynced_writes(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    io = FaultyIO(random.Random(seed + 1000))
    store = new_store(tmp_path, io)
    path = store.path
    model = Model()
    crashes = 0
    for _ in range(60):  # 4 seeds x 60 crashes
        for _ in range(rng.randrange(1, 40)):
            step(store, model, rng)
        crash(store, io)
        crashes += 1
        store = Store(path, io=io)
        store.open()
        check_after_restart(store, model)
    assert crashes == 60
    store.close()


def test_new_and_removed_files_are_durable_once_synced(tmp_path: Path) -> None:
    """A sync (or a FUA write) makes the directory entries of the files it covers
    durable too: a new object's entry, and a removed one's absence."""
    io = FaultyIO()
    store = new_store(tmp_path, io)
    store.create_and_write(0x11, 0, b"flushed")
    store.create_and_write(0x33, 0, b"removed")
    store.sync()
    store.remove(0x33)
    store.sync()
    store.create_and_write(0x22, 0, b"written with FUA")
    store.write(0x22, 0, b"W", fua=True)
    store.create_and_write(0x44, 0, b"never synced")
    crash(store, io, lose_all=True)
    store = Store(store.path, io=io)
    store.open()
    assert store.read(0x11, 0, 7) == b"flushed"
    assert store.read(0x22, 0, 16) == b"Written with FUA"
    assert not store.exists(0x33) and store.stat(0x33)["deleted"] is True
    assert not store.exists(0x44)  # its entry never reached the disk: nor its metadata
    with pytest.raises(NoObject):
        store.read(0x44, 0, 1)
    store.close()


def test_damage_is_still_caught_after_a_crash(tmp_path: Path) -> None:
    io = FaultyIO(random.Random(5))
    store = new_store(tmp_path, io)
    path = store.path
    for oid in oids:
        store.create_and_write(oid, 0, bytes([oid]) * object_size)
    store.sync()
    store.write(0x11, 0, b"unsynced" * 512)  # may or may not land; never reported
    crash(store, io)
    with open(store.object_path(0x22), "r+b") as file:  # synced, then flipped on disk
        file.seek(5000)
        file.write(b"\xff")
    store = Store(path, io=io)
    store.open()
    assert store.counters["recomputed_after_crash"] == 1
    store.read(0x11, 0, object_size)
    with pytest.raises(IOErrorResult, match="checksum mismatch in block 1"):
        store.read(0x22, 4096, 10)
    assert store.read(0x22, 8192, 10) == bytes([0x22]) * 10  # the other blocks are fine
    assert store.verify(0x22) == [1]
    assert store.counters["checksum_errors"] == 1
    store.close()


def test_a_clean_stop_leaves_nothing_to_recompute(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    for oid in oids:
        store.create_and_write(oid, 0, b"x" * 100)
    store.sync()
    store.write(0x11, 0, b"y")
    store.close()
    store = Store(str(tmp_path / "store"))
    store.open()
    assert store.counters["recomputed_after_crash"] == 0
    assert store.read(0x11, 0, 2) == b"yx"
    store.close()


def damaged_store(tmp_path: Path) -> Store:
    store = new_store(tmp_path)
    for oid in oids:
        store.create_and_write(oid, 0, bytes([oid]) * object_size)
    store.close()
    return store


def reopened(store: Store) -> Store:
    again = Store(store.path)
    again.open()
    return again


def test_flipped_bytes_are_an_io_error_naming_the_block(tmp_path: Path) -> None:
    store = damaged_store(tmp_path)
    with open(store.object_path(0x33), "r+b") as file:
        file.seek(3 * sums.BLOCK + 17)
        file.write(b"\x00")
    store = reopened(store)
    with pytest.raises(IOErrorResult, match="0000000000000033: checksum mismatch in block 3"):
        store.read(0x33, 0, object_size)
    assert store.read(0x33, 0, 3 * sums.BLOCK) == bytes([0x33]) * 3 * sums.BLOCK
    assert store.verify(0x33) == [3] and store.verify(0x44) == []
    store.close()


def test_a_partial_change_of_a_damaged_block_fails_and_keeps_the_damage(
        tmp_path: Path) -> None:
    """A write or discard covering part of a block merges it with what the block
    holds: that is verified first, or a new checksum would bless the damage."""
    store = damaged_store(tmp_path)
    with open(store.object_path(0x33), "r+b") as file:
        file.seek(3 * sums.BLOCK + 17)
        file.write(b"\x00")
    store = reopened(store)
    version = store.version(0x33)
    with pytest.raises(IOErrorResult, match="0000000000000033: checksum mismatch in block 3"):
        store.write(0x33, 3 * sums.BLOCK + 100, b"new")
    with pytest.raises(IOErrorResult, match="checksum mismatch in block 3"):
        store.discard(0x33, 2 * sums.BLOCK, sums.BLOCK + 10)
    assert store.verify(0x33) == [3] and store.version(0x33) == version
    assert store.read(0x33, 2 * sums.BLOCK, sums.BLOCK) == bytes([0x33]) * sums.BLOCK
    store.write(0x33, 4 * sums.BLOCK + 100, b"ok")  # a sound block takes it
    store.write(0x33, 3 * sums.BLOCK, b"w" * sums.BLOCK)  # a whole block replaces it
    assert store.verify(0x33) == []
    store.close()


def test_a_truncated_file_is_caught_where_data_was(tmp_path: Path) -> None:
    store = damaged_store(tmp_path)
    os.truncate(store.object_path(0x22), 5 * sums.BLOCK + 100)
    store = reopened(store)
    assert store.read(0x22, 0, 5 * sums.BLOCK) == bytes([0x22]) * 5 * sums.BLOCK
    with pytest.raises(IOErrorResult, match="checksum mismatch in blocks 5, 6"):
        store.read(0x22, 4 * sums.BLOCK, object_size - 4 * sums.BLOCK)
    store.close()


def test_a_missing_file_is_damage_not_absence(tmp_path: Path) -> None:
    store = damaged_store(tmp_path)
    os.unlink(store.object_path(0x11))
    store = reopened(store)
    with pytest.raises(IOErrorResult, match="its file is missing"):
        store.read(0x11, 0, 10)
    assert store.stat(0x11)["missing"] is True
    assert store.counters["missing_files"] == 1
    with pytest.raises(NoObject):  # a write needs a copy first: the gateway brings one
        store.write(0x11, 0, b"x")
    store.close()


def test_lost_metadata_is_caught(tmp_path: Path) -> None:
    store = damaged_store(tmp_path)
    store = reopened(store)
    with store.env.begin(write=True) as txn:  # both the version and the checksums go
        txn.delete((0x44).to_bytes(8, "big"), db=store._objects)
        txn.delete((0x44).to_bytes(8, "big"), db=store._sums)
    with pytest.raises(IOErrorResult, match="checksum mismatch"):
        store.read(0x44, 0, 10)
    assert store.version(0x44) == 0
    store.close()


def test_a_write_that_fails_halfway_leaves_checksums_true(tmp_path: Path) -> None:
    io = FaultyIO()
    store = new_store(tmp_path, io)
    store.create_and_write(0x11, 0, b"a" * object_size)
    store.sync()
    io.fail("pwrite", errno.ENOSPC, partial=sums.BLOCK + 10)
    with pytest.raises(NoSpace, match="no space left"):
        store.write(0x11, 0, b"b" * 3 * sums.BLOCK)
    data = store.read(0x11, 0, object_size)  # whatever landed, it reads without error
    assert data[:sums.BLOCK + 10] == b"b" * (sums.BLOCK + 10)
    assert data[sums.BLOCK + 10:] == b"a" * (object_size - sums.BLOCK - 10)
    io.fail("pwrite", errno.EIO)
    with pytest.raises(IOErrorResult, match="I/O error"):
        store.write(0x11, 0, b"c")
    assert store.read(0x11, 0, 1) == b"b"
    store.write(0x11, 0, b"d")  # space came back: writes work again
    assert store.read(0x11, 0, 2) == b"db"
    store.close()


def test_a_store_with_unreadable_metadata_refuses_to_open(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    store.create_and_write(0x11, 0, b"x")
    store.close()
    with open(os.path.join(store.path, "meta", "data.mdb"), "r+b") as file:
        file.write(os.urandom(8192))
    with pytest.raises(SystemFailure, match="is unreadable .*refusing to start"):
        Store(store.path).open()


def test_a_store_keeps_its_checksum_setting(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"), checksums=False)
    store.open()
    store.create_and_write(0x11, 0, b"x")
    assert "digest" not in store.stat(0x11)
    store.close()
    with pytest.raises(SystemFailure, match="was made without checksums"):
        Store(store.path).open()


def test_a_sigkill_keeps_the_version_its_intent_promised(tmp_path: Path) -> None:
    """A SIGKILL keeps the data of unsynced changes (the page cache survives) but not
    their versions (in memory): after the restart the copy is at least at the version
    its intent promised, so a replica that got a later write outranks one that did
    not, even though neither synced since (a whole-cluster SIGKILL test saw a replica
    that missed a write win over two that had it)."""
    import asyncio

    io = FaultyIO()
    store = Store(str(tmp_path / "store"), io=io)
    store.open()
    store.set_object_size(object_size)
    store.create_and_write(1, 0, b"old", version=5)
    store.sync()

    async def change() -> None:
        await store.ensure_intent(1, 9)
        store.write(1, 0, b"new", version=9)
        await store.ensure_intent(2, 12)
        store.create_and_write(2, 0, b"fresh", version=12)

    asyncio.run(change())
    io.process_killed()  # SIGKILL: the unsynced writes reach the files
    store._fds.clear()
    assert store._env is not None
    store._env.close()
    store._env = None
    again = Store(store.path)
    again.open()
    try:
        assert again.read(1, 0, 3) == b"new" and again.version(1) == 9
        assert again.read(2, 0, 5) == b"fresh" and again.version(2) == 12
    finally:
        again.close()


def test_a_copy_at_a_version_only_an_intent_promised_is_in_doubt_until_cleared(
        tmp_path: Path) -> None:
    """A change promised version 6 in its intent and its write never reached the disk:
    after the power loss the copy says version 6 with version 5's data. It is in
    doubt (another copy at 6 that is not outranks it: sheep/replicas.py), across
    further crashes, until cleared (verified) and synced; a copy whose intent did not
    raise its version is not in doubt."""
    io = FaultyIO(random.Random(7))
    store = new_store(tmp_path, io)
    path = store.path
    store.create_and_write(0x11, 0, b"a" * 4096, version=5)
    store.create_and_write(0x22, 0, b"b" * 4096, version=5)
    store.sync()
    asyncio.run(store.ensure_intent(0x11, 6))
    store.write(0x11, 0, b"lost", version=6)
    store.write(0x22, 0, b"also lost")  # an intent without a promised version
    crash(store, io, lose_all=True)

    def reopened() -> Store:
        fresh = Store(path, io=io)
        fresh.open()
        return fresh

    store = reopened()
    assert store.counters["recomputed_after_crash"] == 2
    assert store.version(0x11) == 6 and store.read(0x11, 0, 4) == b"aaaa"
    assert store.stat(0x11).get("doubtful") is True and store.in_doubt(0x11)
    assert "doubtful" not in store.stat(0x22)
    crash(store, io)
    store = reopened()  # not verified yet: still in doubt
    assert store.in_doubt(0x11)
    store.clear_doubt(0x11)
    assert "doubtful" not in store.stat(0x11)
    crash(store, io)
    store = reopened()  # cleared but never synced: the doubt comes back (the safe side)
    assert store.in_doubt(0x11)
    store.clear_doubt(0x11)
    store.sync()
    crash(store, io)
    store = reopened()
    assert not store.in_doubt(0x11)
    store.close()


def synced_pair(tmp_path: Path, seed: int, size: int) -> tuple[FaultyIO, Store]:
    """A store on a faulty disk with objects 0x11 and 0x22 (size bytes of "a", version
    5), synced."""
    io = FaultyIO(random.Random(seed))
    store = new_store(tmp_path, io)
    for oid in (0x11, 0x22):
        store.create_and_write(oid, 0, b"a" * size, version=5)
    store.sync()
    return io, store


def test_a_replaced_or_removed_copy_is_no_longer_in_doubt(tmp_path: Path) -> None:
    io, store = synced_pair(tmp_path, 8, 4096)
    path = store.path
    for oid in (0x11, 0x22):
        asyncio.run(store.ensure_intent(oid, 6))
        store.write(oid, 0, b"lost", version=6)
    crash(store, io, lose_all=True)
    store = Store(path, io=io)
    store.open()
    assert store.in_doubt(0x11) and store.in_doubt(0x22)
    store.create_and_write(0x11, 0, b"the newest copy" * 100, version=6)  # recovery's copy
    store.remove(0x22)
    assert not store.in_doubt(0x11) and not store.in_doubt(0x22)
    store.sync()
    store.close()
    store = Store(path, io=io)
    store.open()
    assert not store.in_doubt(0x11) and not store.in_doubt(0x22)
    store.close()


def test_recovery_commits_its_copies_intents_together_and_releases_the_unused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery commits the intents of a window of copies at once (one commit, not
    one per copy, each with an fsync, which held every fetch up); those of copies it
    did not make go at the next sync. A copy made but not synced before a crash is
    left at version 0, older than every real copy (so it is fetched again); one
    synced is whole, at its version."""
    io = FaultyIO()
    store = new_store(tmp_path, io)
    commits: list[list[int]] = []
    real = store._write_intents

    def counted(wanted: dict[int, bytes], cleared: dict[int, bytes]) -> None:
        commits.append(sorted(wanted))
        real(wanted, cleared)

    monkeypatch.setattr(store, "_write_intents", counted)
    asyncio.run(store.ensure_intents([0x11, 0x22, 0x33, 0x44]))
    assert commits == [[0x11, 0x22, 0x33, 0x44]]
    made = b"r" * object_size
    store.create_from_extents(0x11, [(0, memoryview(made))], 7)
    store.create_from_extents(0x44, [(0, memoryview(made))], 9)
    assert len(commits) == 1  # the copies needed no commit of their own
    store.release_intents([0x11, 0x22, 0x33])  # 0x11 changed: it keeps its intent
    store.sync()
    store.create_from_extents(0x22, [(0, memoryview(made))], 3)  # intent released: its own
    assert commits[1:] == [[0x22]]
    io.process_killed()  # SIGKILL: the unsynced copy's bytes are in the page cache
    crash(store, io)
    store = Store(store.path, io=io)
    store.open()
    assert store.counters["recomputed_after_crash"] == 1  # 0x22 only: 0x33's intent went
    assert store.read(0x11, 0, object_size) == made and store.version(0x11) == 7
    assert store.read(0x44, 0, object_size) == made and store.version(0x44) == 9
    assert store.version(0x22) == 0 and not store.knows(0x33)


def test_a_doubt_keeps_the_epoch_its_lost_writes_were_made_from(tmp_path: Path) -> None:
    """An intent records the epoch it was made in, and the doubt a crash leaves keeps
    it: the writes the crash may have taken were made from then on, so the nodes the
    placement named since then may hold them (the verifier waits for those that are
    away: sheep/replicas.py, verdict). Another crash keeps the earlier epoch; a
    partial copy is in doubt from the epoch it was made in."""
    io = FaultyIO(random.Random(9))
    store = new_store(tmp_path, io)
    path = store.path

    def reopened() -> Store:
        fresh = Store(path, io=io)
        fresh.open()
        fresh.load_cluster_state()
        return fresh

    store.save_cluster_state({"epoch": 3}, [])
    store.create_and_write(0x11, 0, b"a" * 4096, version=5)
    store.sync()
    asyncio.run(store.ensure_intent(0x11, 6))
    store.write(0x11, 0, b"lost", version=6)
    store.save_cluster_state({"epoch": 7}, [])  # epochs go on; the writes were made in 3
    crash(store, io, lose_all=True)
    store = reopened()
    assert store.doubts() == {0x11: 3} and store.epoch == 7
    asyncio.run(store.ensure_intent(0x11, 8))  # a change in epoch 7, lost too
    store.write(0x11, 0, b"lost again", version=8)
    crash(store, io, lose_all=True)
    store = reopened()
    assert store.doubts() == {0x11: 3}
    store.write_partial(0x33, 0, b"x" * 4096, version=9)
    store.sync()
    crash(store, io)
    store = reopened()
    assert store.doubts() == {0x11: 3, 0x33: 7}
    store.close()


def test_a_partial_copy_a_crash_caught_stays_partial_and_in_doubt_once_filled(
        tmp_path: Path) -> None:
    """A partial copy is recorded before its file is made, so a crash before its first
    sync leaves it partial. A crash with writes not synced leaves its recorded ranges
    unsure (a write may have landed outside them): once filled it stays in doubt, for
    the verifier to compare (a copy at its version not in doubt outranks it)."""
    io = FaultyIO(random.Random(11))
    store = new_store(tmp_path, io)
    asyncio.run(store.ensure_intent(0x41, 5))
    store.write_partial(0x41, 0, b"p" * 4096, version=5)
    asyncio.run(store.ensure_intent(0x42, 5))
    store.write_partial(0x42, 0, b"q" * 4096, version=5)
    store.sync()
    asyncio.run(store.ensure_intent(0x42, 6))
    store.write(0x42, 8 * KiB, b"r" * 4096, version=6)  # not synced
    crash(store, io)
    store = reopened(store)
    try:
        assert store.partial_oids() == {0x41, 0x42}
        assert store.in_doubt(0x41) and store.in_doubt(0x42)
        assert 0x41 not in store.copies() and 0x42 not in store.copies()
        store.fill(0x42, bytes(object_size), 4)
        assert not store.is_partial(0x42) and store.in_doubt(0x42)
    finally:
        store.close()
