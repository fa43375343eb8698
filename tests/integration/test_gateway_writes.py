"""Writes through the gateway onto a replica that needs a copy first (unverified,
or found damaged by the write), in-process: every replica ends with the same
bytes and the same version. Whole copies (a write's, a repair's) travel as
extents and keep the holes; a malformed sparse copy is an error, never a copy."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sheep import proto
from sheep.constants import MiB
from sheep.errors import BadRequest, IOErrorResult, Result
from sheep.proto import Header, Op
from sheep.store import sums
from sheep.testing.cluster import raw_call
from sheep.testing.inprocess import InProcessCluster

object_size = 1 * MiB


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[InProcessCluster]:
    cluster = InProcessCluster(str(tmp_path), nodes=3).start()
    with cluster.client(0) as client:
        client.format(3, object_size)  # every sheep holds every object
    yield cluster
    cluster.close()


def versions(cluster: InProcessCluster, oid: int) -> list[int]:
    return [sheep.store.version(oid) for sheep in cluster.sheep]


def mark_unverified(cluster: InProcessCluster, index: int, oid: int) -> None:
    async def mark() -> None:
        sheep = cluster.sheep[index]
        assert sheep.peer is not None
        sheep.peer.health.start_unverified([oid], sheep.group.epoch)

    cluster.run(mark())


def test_a_raw_write_resent_after_a_recovery_bumps_every_replica_once(
        cluster: InProcessCluster) -> None:
    """A raw write (no gateway version: each replica takes its own + 1) meets an
    unverified copy: the gateway copies a current one over it (with the write
    already applied) and sends the write there again, with the version the others
    took rather than a second bump."""
    oid = 0x42
    with cluster.client(0) as client:
        client.create_and_write(oid, b"a" * 8192)
        assert versions(cluster, oid) == [1, 1, 1]
        mark_unverified(cluster, 2, oid)
        client.write(oid, b"b" * 100, offset=10)
        assert versions(cluster, oid) == [2, 2, 2]
        client.write(oid, b"c", offset=0)
        assert versions(cluster, oid) == [3, 3, 3]
        assert client.read(oid, 0, 200) == b"c" + b"a" * 9 + b"b" * 100 + b"a" * 90
    for sheep in cluster.sheep:
        assert sheep.store.read(oid, 0, 200) == b"c" + b"a" * 9 + b"b" * 100 + b"a" * 90


def test_a_partial_write_onto_a_damaged_block_replaces_the_damaged_copy(
        cluster: InProcessCluster) -> None:
    """The replica whose block is damaged refuses to merge a partial write into it
    (that would bless the damage with a new checksum): its copy is marked damaged,
    the gateway copies a good one over it and writes there again."""
    oid = 0x43
    with cluster.client(0) as client:
        client.create_and_write(oid, b"a" * 3 * sums.BLOCK)
        client.flush()
        damaged = cluster.sheep[1]
        with open(damaged.store.object_path(oid), "r+b") as file:
            file.seek(sums.BLOCK + 7)
            file.write(b"X")
        client.write(oid, b"new", offset=sums.BLOCK + 100)
        expected = b"a" * (sums.BLOCK + 100) + b"new" + b"a" * (2 * sums.BLOCK - 103)
        assert client.read(oid, 0, 3 * sums.BLOCK) == expected
    assert damaged.peer is not None and damaged.peer.health.repaired == 1
    assert damaged.store.verify(oid) == []
    for sheep in cluster.sheep:
        assert sheep.store.read(oid, 0, 3 * sums.BLOCK) == expected
    assert len(set(versions(cluster, oid))) == 1


def test_a_partial_write_onto_a_block_damaged_everywhere_is_an_io_error(
        cluster: InProcessCluster) -> None:
    oid = 0x44
    with cluster.client(0) as client:
        client.create_and_write(oid, b"a" * sums.BLOCK)
        client.flush()
        for sheep in cluster.sheep:
            with open(sheep.store.object_path(oid), "r+b") as file:
                file.write(b"X")
        with pytest.raises(IOErrorResult, match="checksum mismatch in block 0"):
            client.write(oid, b"new", offset=100)
    assert [sheep.store.verify(oid) for sheep in cluster.sheep] == [[0], [0], [0]]


# --- whole copies travel as extents (FLAG_SPARSE): holes stay holes ----------------------


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def sparse_object(client: Any, oid: int) -> bytes:
    """An object with 8 KiB of data at its start and 4 KiB in its middle; the rest a hole."""
    client.create_and_write(oid, b"s" * 8192)
    client.write(oid, b"m" * sums.BLOCK, offset=object_size // 2)
    client.flush()
    return client.read(oid, 0, object_size)


def test_a_copy_made_for_a_write_keeps_the_holes(cluster: InProcessCluster) -> None:
    """The gateway copies a current copy over an unverified one before a write: only
    the source's data is written there, not a whole object of zeros."""
    oid = 0x61
    with cluster.client(0) as client:
        sparse_object(client, oid)
        mark_unverified(cluster, 2, oid)
        client.write(oid, b"w" * 100, offset=100)
        expected = client.read(oid, 0, object_size)
    source, copy = cluster.sheep[0].store, cluster.sheep[2].store
    assert copy.read(oid, 0, object_size) == expected
    assert copy.verify(oid) == [] and copy.version(oid) == source.version(oid)
    assert allocated(copy.object_path(oid)) <= allocated(source.object_path(oid))
    assert allocated(copy.object_path(oid)) <= 4 * sums.BLOCK


def test_a_repaired_copy_keeps_the_holes(cluster: InProcessCluster) -> None:
    oid = 0x62
    with cluster.client(0) as client:
        expected = sparse_object(client, oid)
        damaged = cluster.sheep[1].store
        with open(damaged.object_path(oid), "r+b") as file:
            file.seek(5)
            file.write(b"X")
        [result] = client.check_objects([oid], scrub=True)
        assert result["state"] == "repaired", result
    assert damaged.read(oid, 0, object_size) == expected and damaged.verify(oid) == []
    assert allocated(damaged.object_path(oid)) <= 4 * sums.BLOCK


def test_a_malformed_sparse_reply_is_an_error_never_a_copy(cluster: InProcessCluster) -> None:
    """A holder whose sparse reads answer garbage (a bug, a bad peer): reading its copy
    fails with BadRequest, and a write that needed that copy fails rather than making
    a wrong one."""
    oid = 0x63
    with cluster.client(0) as client:
        sparse_object(client, oid)
    bad = cluster.sheep[0].peer
    assert bad is not None
    honest_read = bad.handlers[Op.READ_PEER]

    async def garbage(header: Header, payload: bytes) -> tuple[bytes, dict[str, int]]:
        if header.flags & proto.FLAG_SPARSE:
            # One extent of a block, then half a block of data.
            return struct.pack("<III", 1, 0, sums.BLOCK) + b"g" * (sums.BLOCK // 2), {"arg0": 1}
        return await honest_read(header, payload)

    bad.handlers[Op.READ_PEER] = garbage
    reader = cluster.sheep[1].gateway
    assert reader is not None
    node = cluster.sheep[0].node
    with pytest.raises(BadRequest, match="cut short"):  # over TCP, decoded on receipt
        cluster.run(reader.read_extents(node, oid, reader.group.epoch))
    before = cluster.sheep[2].store.read(oid, 0, object_size)
    mark_unverified(cluster, 2, oid)
    with cluster.client(0) as client, pytest.raises(BadRequest, match="sparse copy"):
        client.write(oid, b"w", offset=0)
    assert cluster.sheep[2].store.read(oid, 0, object_size) == before  # no copy made
    bad.handlers[Op.READ_PEER] = honest_read


def test_a_malformed_sparse_copy_is_refused_by_its_receiver(cluster: InProcessCluster) -> None:
    oid = 0x64
    create = Header(opcode=Op.CREATE_AND_WRITE_OBJ, oid=oid, count=object_size,
                    flags=proto.FLAG_SPARSE, arg0=5)
    for payload in (b"\x01\x00", struct.pack("<III", 1, 1, sums.BLOCK) + bytes(sums.BLOCK),
                    struct.pack("<III", 1, 0, sums.BLOCK) + bytes(sums.BLOCK + 1)):
        reply, message = raw_call(cluster.ports[0], create, payload, credentials=cluster.credentials)
        assert reply.result == Result.BAD_REQUEST, message
        assert b"sparse copy" in message
    assert not any(sheep.store.exists(oid) for sheep in cluster.sheep)
    # A well-formed one makes the object on every holder, thin.
    extents = [(0, memoryview(b"k" * sums.BLOCK))]
    reply, _ = raw_call(cluster.ports[0], create, proto.encode_extents(extents),
                        credentials=cluster.credentials)
    assert reply.result == Result.SUCCESS
    for sheep in cluster.sheep:
        assert sheep.store.read(oid, 0, sums.BLOCK + 1) == b"k" * sums.BLOCK + b"\0"
        assert sheep.store.version(oid) == 5
        assert allocated(sheep.store.object_path(oid)) == sums.BLOCK


def test_an_old_style_whole_read_still_returns_every_byte(cluster: InProcessCluster) -> None:
    oid = 0x65
    with cluster.client(0) as client:
        expected = sparse_object(client, oid)
    reply, data = raw_call(cluster.ports[1], Header(opcode=Op.READ_OBJ, oid=oid,
                                                    count=object_size), credentials=cluster.credentials)
    assert reply.result == Result.SUCCESS and bytes(data) == expected
    reply, data = raw_call(cluster.ports[1], Header(opcode=Op.READ_OBJ, oid=oid,
                                                    count=object_size, flags=proto.FLAG_SPARSE),
                           credentials=cluster.credentials)
    assert reply.result == Result.SUCCESS
    assert [(offset, len(view)) for offset, view in proto.decode_extents(data, object_size)] == [
        (0, 2 * sums.BLOCK), (object_size // 2, sums.BLOCK)]


def test_a_writers_flush_reaches_only_the_members_it_changed(tmp_path: Any) -> None:
    """A VDI writer's flush syncs the members its sheep made changes on since the last
    flush, not every member (each would cost a round trip and a wait for whatever
    sync it had under way). A writable handle's first flush reaches every member (its
    client may have written through another sheep before: a failover), and so does
    a flush naming no VDI."""
    cluster = InProcessCluster(str(tmp_path), nodes=5).start()

    def flushes() -> list[int]:
        return [sheep.peer.flushes for sheep in cluster.sheep]  # type: ignore[union-attr]

    try:
        with cluster.client(0) as client:
            client.format(2, object_size)
            client.vdi_create("v", 8 * object_size)
            handle = client.vdi_open("v", writable=True)["handle"]
            client.vdi_write(handle, 0, b"a" * 4096)  # allocates: the tree changes too
            before = flushes()
            client.flush(handle)
            assert flushes() == [count + 1 for count in before]  # its first: everywhere
            before = flushes()
            client.vdi_write(handle, 4096, b"b" * 4096)  # the same object: nothing else
            client.flush(handle)
            oid = int(client.vdi_object("v", 0)["oid"])
            holders = {replica["node_id"] for replica in client.stat(oid)["replicas"]}
            reached = {sheep.node.node_id for sheep, was, now  # type: ignore[union-attr]
                       in zip(cluster.sheep, before, flushes(), strict=True) if now > was}
            assert reached == holders and len(holders) == 2
            client.flush(handle)  # nothing changed since: nobody to sync
            assert flushes() == [count + (sheep.node.node_id in holders)  # type: ignore[union-attr]
                                 for sheep, count in zip(cluster.sheep, before, strict=True)]
            before = flushes()
            client.flush()  # names no VDI: every member
            assert flushes() == [count + 1 for count in before]
        # The writer moves to another sheep (as the NBD plugin fails over): the new
        # handle's first flush reaches every member, the next only those changed since.
        with cluster.client(1) as client:
            handle = client.vdi_open("v", writable=True)["handle"]
            before = flushes()
            client.flush(handle)
            assert flushes() == [count + 1 for count in before]
            client.flush(handle)
            assert flushes() == [count + 1 for count in before]
    finally:
        cluster.close()


def test_a_flush_waits_for_changes_another_flush_under_way_has_taken(tmp_path: Any) -> None:
    """A writer's change is acknowledged, another client's flush begins (and hangs at
    one of the change's members), then the writer flushes: the writer's flush syncs
    the change's members itself rather than count on the flush under way (which may
    fail, or hang): it answers only once they did. (Had the first flush taken the
    members to sync for itself, the writer's would have found none and answered at
    once, the change not yet durable.)"""
    import concurrent.futures

    cluster = InProcessCluster(str(tmp_path), nodes=5).start()
    try:
        with cluster.client(0) as writer, cluster.client(0) as other:
            writer.format(2, object_size)
            writer.vdi_create("v", 8 * object_size)
            handle = writer.vdi_open("v", writable=True)["handle"]
            writer.vdi_write(handle, 0, b"a" * 4096)
            writer.flush(handle)  # its first: every member
            reader = other.vdi_open("v")["handle"]
            oid = int(writer.vdi_object("v", 0)["oid"])
            holders = {replica["node_id"] for replica in writer.stat(oid)["replicas"]}
            held = next(sheep for sheep in cluster.sheep
                        if sheep.node is not None and sheep.node.node_id in holders)
            assert held.peer is not None
            gate: dict[str, asyncio.Event] = {}
            real_flush = held.peer.flush

            async def make_gate() -> None:
                gate["open"] = asyncio.Event()

            cluster.run(make_gate())

            async def held_flush(header: Any, payload: bytes) -> Any:
                await gate["open"].wait()
                return await real_flush(header, payload)

            held.peer.handlers[Op.FLUSH_PEER] = held_flush
            writer.vdi_write(handle, 4096, b"b" * 4096)  # changes the holders
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                first = pool.submit(other.flush, reader)  # held at one of the holders
                time.sleep(0.3)
                second = pool.submit(writer.flush, handle)
                time.sleep(0.3)
                assert not first.done() and not second.done()
                held.peer.handlers[Op.FLUSH_PEER] = real_flush
                cluster._loop.call_soon_threadsafe(gate["open"].set)
                first.result(30)
                second.result(30)
    finally:
        cluster.close()
