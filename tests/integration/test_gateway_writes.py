"""Writes through the gateway onto a replica that needs a copy first (unverified,
or found damaged by the write), in-process: every replica ends with the same
bytes and the same version."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sheep.constants import MiB
from sheep.errors import IOErrorResult
from sheep.store import sums
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
        peer = cluster.sheep[index].peer
        assert peer is not None
        peer.health.start_unverified([oid])

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
