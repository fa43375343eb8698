"""VDIs on real sheep processes: huge sparse VDIs, restarts, deaths, locks, fencing, space.

Data is written at random offsets and lengths (crossing object boundaries)
and checked against bytearrays kept by the test. Objects are counted where
they really are: the object files in each sheep's store directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from sheep import auth, radix
from sheep.client import Client, Connection, SyncClient
from sheep.errors import InvalidParameters, ReadOnly, SystemFailure, Timeout, VdiLocked
from sheep.oid import ObjectType, oid_generation, oid_index, oid_type
from sheep.proto import Header, Op
from sheep.testing.cluster import LocalCluster
from sheep.testing.inprocess import InProcessCluster
from sheep.vdi import VdiEngine

KiB = 1 << 10
MiB = 1 << 20
PiB = 1 << 50
object_size = 4 * MiB
vdi_types = {ObjectType.DATA, ObjectType.TREE, ObjectType.INODE, ObjectType.ATTR,
             ObjectType.CHANGES}
lock_release_max_s = 10.0  # a closed connection's or dead gateway's lock is gone by then
handoff_wait_s = 1.0  # the module cluster's --lock-handoff-wait (the default 3 s is for VMs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    """Three sheep in three zones, two copies: shared by the tests that kill nothing."""
    with LocalCluster(str(tmp_path_factory.mktemp("vdi")), nodes=3) as local:
        for node in local.sheep:
            node.extra_args = [*node.extra_args, "--lock-handoff-wait", str(handoff_wait_s)]
        local.start()
        local.format(copies=2, object_size=object_size)
        yield local


def vdi_object_files(cluster: LocalCluster) -> dict[int, set[int]]:
    """Per sheep index, the VDI objects (data, tree nodes, ...) its store directory holds."""
    found: dict[int, set[int]] = {}
    for node in cluster.sheep:
        oids = found.setdefault(node.index, set())
        top = os.path.join(node.directory, "obj")
        if not os.path.isdir(top):
            continue
        for fanout in os.listdir(top):
            for name in os.listdir(os.path.join(top, fanout)):
                if len(name) == 16 and oid_type(int(name, 16)) in vdi_types:
                    oids.add(int(name, 16))
    return found


def all_vdi_objects(cluster: LocalCluster) -> set[int]:
    return set().union(*vdi_object_files(cluster).values())


def generation(client: SyncClient, name: str, tag: str | None = None) -> int:
    for item in client.vdi_list([name], usage=False):
        if (tag is None and not item["snapshot"]) or (tag is not None and item["tag"] == tag):
            return int(item["generation"])
    raise AssertionError(f"no {name}@{tag}")


def read_all(client: SyncClient, name: str, snapshot: str | None = None) -> bytes:
    info = client.vdi_open(name, snapshot=snapshot)
    try:
        parts = [client.vdi_read(info["handle"], offset, min(object_size, info["size"] - offset))
                 for offset in range(0, info["size"], object_size)]
    finally:
        client.vdi_close(info["handle"])
    return b"".join(parts)


@dataclass
class Disk:
    """A VDI held open writable, and (unless it is huge) what it must read back as."""

    client: SyncClient
    name: str
    size: int
    handle: int = 0
    expected: bytearray | None = None

    @classmethod
    def create(cls, client: SyncClient, name: str, size: int, track: bool = True) -> Disk:
        client.vdi_create(name, size)
        return cls.open(client, name, bytearray(size) if track else None)

    @classmethod
    def open(cls, client: SyncClient, name: str, expected: bytearray | None) -> Disk:
        info = client.vdi_open(name, writable=True, owner=f"test {name}")
        return cls(client, name, info["size"], info["handle"], expected)

    @property
    def contents(self) -> bytes:
        assert self.expected is not None
        return bytes(self.expected)

    def write(self, offset: int, data: bytes) -> None:
        self.client.vdi_write(self.handle, offset, data)
        if self.expected is not None:
            self.expected[offset:offset + len(data)] = data

    def scribble(self, rng: random.Random, count: int, length_max: int = 3 * MiB) -> None:
        """count writes of random bytes at random offsets, many crossing objects."""
        for _ in range(count):
            length = rng.randrange(1, length_max)
            self.write(rng.randrange(self.size - length), rng.randbytes(length))

    def close(self) -> None:
        self.client.vdi_close(self.handle)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.05)


# --- a petabyte ------------------------------------------------------------------------


def test_petabyte_vdi_first_and_last_byte(cluster):
    with cluster.client(0) as client:
        disk = Disk.create(client, "peta", PiB, track=False)
        assert disk.size == PiB
        disk.write(0, b"first")
        disk.write(PiB - 1, b"L")
        assert client.vdi_read(disk.handle, PiB - 4, 4) == b"\0\0\0L"
        disk.close()
        assert client.vdi_list(["peta"])[0]["used"] == 2 * object_size
        gen = generation(client, "peta")
    with cluster.client(1) as client:
        info = client.vdi_open("peta")
        assert info["size"] == PiB
        assert client.vdi_read(info["handle"], 0, 6) == b"first\0"
        assert client.vdi_read(info["handle"], PiB - 1, 1) == b"L"
        assert client.vdi_read(info["handle"], PiB // 3, 4096) == bytes(4096)

    # A depth-3 tree: the root, a level-2 and a level-1 node on each of the two
    # paths, and the two data objects.
    files = vdi_object_files(cluster)
    objects = {oid for oids in files.values() for oid in oids if oid_generation(oid) == gen
               and (radix.is_tree(oid) or radix.is_data(oid))}
    assert len(objects) <= 8
    assert sorted(radix.node_level(oid) if radix.is_tree(oid) else 0 for oid in objects) == [
        0, 0, 1, 1, 2, 2, 3]
    # The stores say the same as their files: every object in its two copies.
    listed: dict[int, int] = {}
    for node in cluster.sheep:
        with cluster.client(node.index) as client:
            stored = set(client.list_objects())
        assert {oid for oid in stored if oid_generation(oid) == gen} == {
            oid for oid in files[node.index] if oid_generation(oid) == gen}
        for oid in stored:
            listed[oid] = listed.get(oid, 0) + 1
    assert all(listed[oid] == 2 for oid in objects)


# --- a whole-cluster restart -------------------------------------------------------------


def test_everything_reads_back_after_a_cluster_restart(make_cluster):
    cluster = make_cluster(3)
    cluster.format(copies=2, object_size=object_size)
    rng = random.Random(11)
    expected: dict[tuple[str, str | None], bytes] = {}
    client = cluster.client(0)
    try:
        base = Disk.create(client, "base", 40 * MiB)
        base.scribble(rng, 12)
        client.vdi_snapshot("base", "s1")
        expected["base", "s1"] = base.contents
        base.scribble(rng, 8)
        client.vdi_snapshot("base", "s2")
        expected["base", "s2"] = base.contents
        base.scribble(rng, 4)
        expected["base", None] = base.contents
        client.vdi_clone("base", "s1", "clone")
        clone = Disk.open(client, "clone", bytearray(expected["base", "s1"]))
        clone.scribble(rng, 6)
        client.vdi_snapshot("clone", "c1")
        expected["clone", "c1"] = clone.contents
        clone.scribble(rng, 3)
        expected["clone", None] = clone.contents
        client.vdi_create("empty", 1 << 40)
        expected["empty", None] = b""
        client.vdi_setattr("base", "owner", "someone")
        listing = client.vdi_list()
        assert {item["name"] for item in listing if item["lock"]} == {"base", "clone"}
        # The writers stay attached: a restart must not leave their locks behind.
        result = subprocess.run([sys.executable, "-m", "dog", "-p", str(cluster.sheep[1].port),
                                 "cluster", "shutdown"], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        for node in cluster.sheep:
            assert node.process is not None and node.process.wait(timeout=30) == 0
    finally:
        client.close()

    cluster.start()
    with cluster.client(2) as client:
        # The locks went with their sheep: whoever writes next settles those VDIs first.
        assert client.vdi_list() == [{**item, "lock": None, "unsettled": bool(item["lock"])}
                                     for item in listing]
        assert client.vdi_getattr("base", "owner") == {"key": "owner", "value": "someone"}
        for (name, tag), data in expected.items():
            if name == "empty":
                info = client.vdi_open(name)
                assert client.vdi_read(info["handle"], (1 << 40) - 4096, 4096) == bytes(4096)
                continue
            assert read_all(client, name, tag) == data, (name, tag)
        again = Disk.open(client, "clone", bytearray(expected["clone", None]))
        again.scribble(rng, 2)
        again.close()
        assert read_all(client, "clone") == again.contents
        assert read_all(client, "clone", "c1") == expected["clone", "c1"]


# --- a sheep dies ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> Iterator[LocalCluster]:
    """Four sheep in four zones, three copies."""
    with LocalCluster(str(tmp_path_factory.mktemp("four")), nodes=4) as local:
        local.start()
        local.format(copies=3, object_size=object_size)
        yield local


@dataclass
class AfterKill:
    cluster: LocalCluster
    expected: dict[tuple[str, str | None], bytes]
    rng: random.Random
    lost: set[int]  # the clone's data objects that had a copy on the dead sheep
    survivors: list[int]


@pytest.fixture(scope="module")
def after_kill(four) -> AfterKill:
    """VDIs, a snapshot and a clone written on four sheep; then one is SIGKILLed."""
    rng = random.Random(12)
    expected: dict[tuple[str, str | None], bytes] = {}
    with four.client(0) as client:
        base = Disk.create(client, "base", 32 * MiB)
        base.scribble(rng, 10)
        client.vdi_snapshot("base", "s1")
        expected["base", "s1"] = base.contents
        base.scribble(rng, 6)
        expected["base", None] = base.contents
        client.vdi_clone("base", "s1", "clone")
        clone = Disk.open(client, "clone", bytearray(expected["base", "s1"]))
        clone.scribble(rng, 5)
        expected["clone", None] = clone.contents
        base.close()
        clone.close()
        gen = generation(client, "clone")
    files = vdi_object_files(four)
    held = {index: {oid for oid in files[index] if oid_generation(oid) == gen
                    and radix.is_data(oid)} for index in (1, 2, 3)}
    victim = max(held, key=lambda index: len(held[index]))
    assert held[victim], "the victim holds some of the clone"
    four.kill(victim)
    four.wait_epoch(0, 3)
    return AfterKill(four, expected, rng, held[victim],
                     [node.index for node in four.sheep if node.alive])


def test_sigkill_one_of_four_with_three_copies(after_kill):
    for index in after_kill.survivors:
        with after_kill.cluster.client(index) as client:
            for (name, tag), data in after_kill.expected.items():
                assert read_all(client, name, tag) == data, (index, name, tag)


def test_new_generations_written_after_the_epoch_change(after_kill):
    """Snapshots and clones go on through any survivor; their writes make new objects."""
    cluster, expected, rng = after_kill.cluster, after_kill.expected, after_kill.rng
    first, second, third = after_kill.survivors
    with cluster.client(second) as client:
        client.vdi_snapshot("base", "after")
        client.vdi_clone("base", "after", "late-clone")
        late = Disk.open(client, "late-clone", bytearray(expected["base", None]))
        late.scribble(rng, 5)
        late.close()
        assert len(client.vdi_object("late-clone", 0)["replicas"]) == 3
    with cluster.client(third) as client:
        assert read_all(client, "late-clone") == late.contents
        assert read_all(client, "base", "after") == expected["base", None]
        assert read_all(client, "base", "s1") == expected["base", "s1"]


def test_writes_into_old_objects_after_the_epoch_change(after_kill):
    """Last of its cluster's tests: when it fails, it leaves the clone half written."""
    cluster = after_kill.cluster
    with cluster.client(after_kill.survivors[1]) as client:
        clone = Disk.open(client, "clone", bytearray(after_kill.expected["clone", None]))
        try:
            for oid in sorted(after_kill.lost):  # in place: the clone's own objects
                clone.write(oid_index(oid) * object_size + 100, b"after the kill")
        finally:
            clone.close()
    with cluster.client(0) as client:
        assert read_all(client, "clone") == clone.contents


def test_a_dead_gateway_releases_its_locks(four):
    alive = [node.index for node in four.sheep if node.alive]
    victim, observer = alive[-1], alive[0]
    holder = four.client(victim)
    holder.vdi_create("orphan", 8 * MiB)
    handle = holder.vdi_open("orphan", writable=True, owner="doomed")["handle"]
    holder.vdi_write(handle, 0, b"locks")  # the first change takes the lock
    with four.client(observer) as client:
        other = client.vdi_open("orphan", writable=True)["handle"]  # attaching never locks
        with pytest.raises(VdiLocked, match="doomed"):
            client.vdi_write(other, 0, b"refused")
        four.kill(victim)
        holder.close()
        four.wait_epoch(observer, len(alive) - 1)
        wait_for(lambda: client.vdi_list(["orphan"], usage=False)[0]["lock"] is None,
                 lock_release_max_s, "the dead gateway's lock released")
        handle = client.vdi_open("orphan", writable=True)["handle"]
        client.vdi_write(handle, 0, b"adopted")
        assert client.vdi_read(handle, 0, 7) == b"adopted"


def test_a_write_half_applied_by_a_dead_writer_is_settled_before_the_next_writer_writes(
        make_cluster):
    """The writer's sheep dies with a write on one replica only (made here with a peer
    request to that replica alone). Whoever opens the VDI next first makes every copy
    agree: without that, its own next write would give both replicas the same version
    and the difference would stay, each gateway reading its own replica's bytes."""
    cluster: LocalCluster = make_cluster(3)
    cluster.format(copies=2, object_size=object_size)
    with cluster.client(0) as client:
        client.vdi_create("halfway", 8 * MiB)
        handle = client.vdi_open("halfway", writable=True)["handle"]
        client.vdi_write(handle, 0, b"\x11" * object_size)
        client.vdi_close(handle)
        oid = client.vdi_object("halfway", 0)["oid"]
    holders = cluster.object_files(oid)
    assert len(holders) == 2
    writer = next(node.index for node in cluster.sheep if node.index not in holders)
    first, second = holders
    with cluster.client(writer) as client:
        client.flush(client.vdi_open("halfway", writable=True, owner="doomed")["handle"])
        epoch = client.node_info()["epoch"]
        version = max(replica["version"] for replica in client.stat(oid)["replicas"])

        async def half_write() -> None:  # what the writer sent before it died
            connection = await Connection.open("127.0.0.1", cluster.sheep[first].port,
                                               cluster.credentials)
            try:
                await connection.call(Header(opcode=Op.WRITE_PEER, epoch=epoch, oid=oid,
                                             count=4096, arg0=version + 1), b"\x22" * 4096)
            finally:
                connection.close()

        asyncio.run(half_write())
        assert cluster_file(cluster, first, oid)[:4096] != cluster_file(cluster, second, oid)[:4096]
        cluster.kill(writer)
    survivor = first
    cluster.wait_epoch(survivor, 2)
    with cluster.client(survivor) as client:
        wait_for(lambda: client.vdi_list(["halfway"], usage=False)[0]["lock"] is None,
                 lock_release_max_s, "the dead writer's lock released")
        assert client.vdi_list(["halfway"], usage=False)[0]["unsettled"]
        handle = client.vdi_open("halfway", writable=True)["handle"]
        assert not client.vdi_list(["halfway"], usage=False)[0]["unsettled"]
        client.vdi_write(handle, object_size - 5, b"later")
        client.vdi_close(handle)
    # Both replicas hold the same bytes: the half-applied write (either outcome is a
    # valid one for a write never acknowledged, but the same on every copy).
    assert cluster_file(cluster, first, oid) == cluster_file(cluster, second, oid)
    reads = set()
    for index in (first, second):
        with cluster.client(index) as client:
            handle = client.vdi_open("halfway")["handle"]
            reads.add(bytes(client.vdi_read(handle, 0, 4096)))
            client.vdi_close(handle)
    assert len(reads) == 1


def test_readers_through_different_sheep_agree_on_a_write_its_dead_writer_half_applied(
        tmp_path):
    """As above, but nobody writes next: two read-only opens through the two holders.
    Reads are served from the gateway's own replica first, so without settling the
    read-only open each reader would see its own replica's bytes."""
    with InProcessCluster(str(tmp_path), nodes=3) as cluster:
        with cluster.client(0) as client:
            client.format(2, object_size)
            client.vdi_create("halfway", 8 * MiB)
            handle = client.vdi_open("halfway", writable=True)["handle"]
            client.vdi_write(handle, 0, b"\x11" * 4096)
            client.vdi_close(handle)
            oid = client.vdi_object("halfway", 0)["oid"]
            stat = client.stat(oid)
        holders = [cluster.ports.index(int(replica["endpoint"].rpartition(":")[2]))
                   for replica in stat["replicas"]]
        writer = next(index for index in range(3) if index not in holders)
        version = max(replica["version"] for replica in stat["replicas"])
        with cluster.client(writer) as client:
            client.flush(client.vdi_open("halfway", writable=True, owner="doomed")["handle"])

            async def half_write() -> None:  # what the writer sent before it died
                connection = await Connection.open("127.0.0.1", cluster.ports[holders[0]],
                                                   cluster.credentials)
                try:
                    await connection.call(Header(opcode=Op.WRITE_PEER, epoch=stat["epoch"],
                                                 oid=oid, count=4096, arg0=version + 1),
                                          b"\x22" * 4096)
                finally:
                    connection.close()

            asyncio.run(half_write())
            cluster.declare_dead(writer)  # the lock goes with the leave: unsettled
        for index in holders:
            with cluster.client(index) as client:
                wait_for(lambda: client.vdi_list(["halfway"], usage=False)[0]["unsettled"],  # noqa: B023
                         lock_release_max_s, "the dead writer's lock released")
        reads = set()
        for index in holders:
            with cluster.client(index) as client:
                handle = client.vdi_open("halfway")["handle"]
                reads.add(bytes(client.vdi_read(handle, 0, 4096)))
                client.vdi_close(handle)
        assert len(reads) == 1, "both readers see the same outcome of the half write"
        with cluster.client(holders[1]) as client:
            assert client.vdi_list(["halfway"], usage=False)[0]["unsettled"] is False


def cluster_file(cluster: LocalCluster, index: int, oid: int) -> bytes:
    with open(cluster.object_path(index, oid), "rb") as file:
        return file.read()


# --- copies ----------------------------------------------------------------------------------


def stores_holding(cluster: LocalCluster, oid: int, marker: bytes) -> list[int]:
    """Indexes of the sheep whose object file for oid holds marker."""
    return [index for index in cluster.object_files(oid)
            if marker in cluster_file(cluster, index, oid)]


def test_a_deleted_snapshots_data_keeps_its_vdis_copies_through_recovery(tmp_path):
    """A copies=3 VDI in a copies=2 cluster: what it wrote before a snapshot stays in the
    snapshot's generation, which its live tree still reaches after the snapshot is
    deleted. Recovery after a join must keep it on 3 stores, not the cluster's 2."""
    marker = b"copies=3, written before the snapshot" * 1800  # 65 KB
    with LocalCluster(str(tmp_path), nodes=4) as cluster:
        cluster.start()
        cluster.format(copies=2, object_size=object_size)
        with cluster.client(0) as client:
            client.vdi_create("k", 32 * MiB, copies=3)
            handle = client.vdi_open("k", writable=True)["handle"]
            client.vdi_write(handle, 0, marker)
            oid = client.vdi_object("k", 0)["oid"]
            client.vdi_snapshot("k", "s")
            client.vdi_write(handle, 8 * MiB, b"after" * 800)
            client.vdi_close(handle)
            client.vdi_delete("k", snapshot="s")
            assert client.vdi_object("k", 0)["oid"] == oid, "still shared with the live tree"
        assert len(stores_holding(cluster, oid, marker)) == 3
        cluster.start(cluster.add().index)
        cluster.wait_recovered()
        with cluster.client(4) as client:
            stat = client.stat(oid)
            assert stat["copies"] == 3
            placed = {cluster.index_of(replica["endpoint"]) for replica in stat["replicas"]}
            assert len(placed) == 3
            # Surplus copies go once the placement's copies are durable: wait for that.
            wait_for(lambda: set(stores_holding(cluster, oid, marker)) == placed, 20,
                     "the copies where the placement puts them")
            handle = client.vdi_open("k")["handle"]
            assert client.vdi_read(handle, 0, len(marker)) == marker


# --- locks -----------------------------------------------------------------------------------


def test_a_connection_that_lets_go_of_a_lock_may_lock_again_one_that_lost_it_may_not(
        cluster):
    """The lock comes with the first change and goes with the last writable handle.
    Closed by its holder, a later handle on the same connection locks again (the
    plugin reuses its connection for every client); taken away by a forced unlock,
    the connection's changes fail from then on, and are never applied."""
    with cluster.client(0) as client:
        client.vdi_create("again", 8 * MiB)
        handle = client.vdi_open("again", writable=True)["handle"]
        assert client.vdi_list(["again"], usage=False)[0]["lock"] is None  # attached only
        client.vdi_write(handle, 0, b"one")
        assert client.vdi_list(["again"], usage=False)[0]["lock"] is not None
        client.vdi_close(handle)
        assert client.vdi_list(["again"], usage=False)[0]["lock"] is None
        handle = client.vdi_open("again", writable=True)["handle"]
        client.vdi_write(handle, 0, b"two")
        with cluster.client(1) as admin:
            admin.vdi_unlock("again")
        for change, args in [(client.vdi_write, (handle, 0, b"three")),
                             (client.vdi_discard, (handle, 0, 4096)), (client.flush, (handle,))]:
            with pytest.raises(VdiLocked, match="was taken from this client"):
                change(*args)  # type: ignore[operator]
        assert client.vdi_list(["again"], usage=False)[0]["lock"] is None
        assert client.vdi_read(handle, 0, 3) == b"two"


def test_one_writer_at_a_time(cluster):
    with cluster.client(0) as first:
        disk = Disk.create(first, "single", 16 * MiB)
        disk.write(MiB, b"first's")
        first.vdi_snapshot("single", "snap")
        same_sheep = cluster.client(0)
        other_sheep = cluster.client(1)
        try:
            handles = {}
            for contender in (same_sheep, other_sheep):
                # Attaching is allowed, and reading through it; the first change is not.
                handle = contender.vdi_open("single", writable=True, owner="second")["handle"]
                assert contender.vdi_read(handle, MiB, 7) == b"first's"
                changes = [(contender.vdi_write, (handle, 0, b"no")),
                           (contender.vdi_discard, (handle, 0, 4096)),
                           (contender.flush, (handle,))]
                for change, args in changes:
                    with pytest.raises(VdiLocked, match=r"in use by test single \(via sheep"):
                        change(*args)  # type: ignore[operator]
                handles[contender] = handle
            # Readers and snapshots are welcome meanwhile, and see the writer's data.
            reader = other_sheep.vdi_open("single")
            assert not reader["writable"]
            assert other_sheep.vdi_read(reader["handle"], MiB, 7) == b"first's"
            snap = same_sheep.vdi_open("single", snapshot="snap", writable=True)
            assert not snap["writable"]  # a snapshot opens read-only, whatever was asked
            with pytest.raises(ReadOnly):
                same_sheep.vdi_write(snap["handle"], 0, b"no")
            with pytest.raises(ReadOnly):
                other_sheep.vdi_write(reader["handle"], 0, b"no")
            # A second handle on the holder's own connection is the same writer.
            second = first.vdi_open("single", writable=True)
            first.vdi_write(second["handle"], 0, b"also first")

            first.close()  # the connection ends: its lock goes

            def takes_over() -> bool:
                try:
                    other_sheep.vdi_write(handles[other_sheep], 0, b"second")
                except VdiLocked:
                    return False
                return True

            wait_for(takes_over, lock_release_max_s, "the lock released on close")
            with pytest.raises(VdiLocked, match="in use by second"):
                same_sheep.vdi_write(handles[same_sheep], 0, b"third")
        finally:
            same_sheep.close()
            other_sheep.close()


def test_a_flushed_idle_writer_hands_its_lock_over_and_is_fenced(cluster):
    """What a live migration does: the source writes, flushes and goes quiet at the
    switchover; the destination, attached all along through another sheep, writes.
    While the source has unflushed writes, or keeps writing, the destination waits
    --lock-handoff-wait and is refused; once it is flushed and idle, the lock moves,
    and every later change of the source fails saying so."""
    with cluster.client(0) as source, cluster.client(1) as destination:
        source.vdi_create("handoff", 8 * MiB)
        src = source.vdi_open("handoff", writable=True, owner="source")["handle"]
        dst = destination.vdi_open("handoff", writable=True, owner="destination")["handle"]
        source.vdi_write(src, 0, b"A" * 4096)
        time.sleep(0.6)  # idle long enough, but not flushed
        started = time.monotonic()
        with pytest.raises(VdiLocked, match="in use by source .*not flushed its latest"):
            destination.vdi_write(dst, 4096, b"B" * 4096)
        assert time.monotonic() - started >= handoff_wait_s

        stop = threading.Event()

        def keep_writing() -> None:  # flushed after every write, but never idle
            while not stop.is_set():
                source.vdi_write(src, 8192, b"C" * 4096)
                source.flush(src)
                time.sleep(0.05)

        busy = threading.Thread(target=keep_writing, daemon=True)
        busy.start()
        try:
            # Busy either way: it wrote a moment ago, or (on a loaded box, when the
            # contender's last look came mid-write) a write is in flight.
            with pytest.raises(VdiLocked, match=r"in use by source .*(wrote 0\.\d+ s ago"
                                                r"|of its writes are in flight)"):
                destination.vdi_write(dst, 4096, b"B" * 4096)
        finally:
            stop.set()
            busy.join()
        assert destination.vdi_list(["handoff"], usage=False)[0]["lock"]["owner"].startswith(
            "source")

        source.flush(src)
        destination.vdi_write(dst, 4096, b"B" * 4096)  # granted within half a second
        lock = destination.vdi_list(["handoff"], usage=False)[0]["lock"]
        assert lock["owner"].startswith("destination (via sheep")
        for change, args in [(source.vdi_write, (src, 0, b"late")),
                             (source.vdi_discard, (src, 0, 4096)), (source.flush, (src,))]:
            with pytest.raises(VdiLocked, match="moved to destination"):
                change(*args)  # type: ignore[operator]
        destination.vdi_write(dst, 12288, b"D" * 4096)
        assert destination.vdi_read(dst, 0, 16384) == b"A" * 4096 + b"B" * 4096 + (
            b"C" * 4096 + b"D" * 4096)
        assert source.vdi_read(src, 0, 4096) == b"A" * 4096  # a fenced writer still reads


def test_snapshots_across_a_handoff_hold_a_prefix_of_the_acknowledged_writes(cluster):
    """Crash consistency is unchanged by a handoff: a source writes blocks in order
    (block i holds i), flushes and goes quiet; a destination through another sheep
    takes the lock over and writes on; snapshots are taken through a third sheep
    all along (each goes to whichever sheep holds the lock then). Each holds blocks
    0..n-1 exactly and nothing after, n past every block acknowledged before it was
    asked for and not past any block sent after it returned."""
    block, total, switch = 4096, 160, 80

    def content(i: int) -> bytes:
        return i.to_bytes(4, "little") * (block // 4)

    sent: dict[int, float] = {}
    acked: dict[int, float] = {}
    with cluster.client(0) as setup:
        setup.vdi_create("prefix", 4 * MiB)
    snapshots: list[tuple[str, float, float]] = []
    stop = threading.Event()

    def snapshotter() -> None:
        with cluster.client(2) as client:
            while not stop.is_set():
                tag = f"p{len(snapshots)}"
                asked = time.monotonic()
                try:
                    client.vdi_snapshot("prefix", tag)
                except VdiLocked:  # the lock moved while it was forwarded: again
                    continue
                snapshots.append((tag, asked, time.monotonic()))
                time.sleep(0.3)

    thread = threading.Thread(target=snapshotter, daemon=True)
    with cluster.client(0) as source, cluster.client(1) as destination:
        src = source.vdi_open("prefix", writable=True, owner="source")["handle"]
        dst = destination.vdi_open("prefix", writable=True, owner="destination")["handle"]
        thread.start()
        try:
            def snapshot_after(moment: float) -> None:  # one more snapshot, asked after
                deadline = time.monotonic() + 30
                while not any(asked > moment for _, asked, _ in snapshots):
                    assert time.monotonic() < deadline and thread.is_alive()
                    time.sleep(0.01)

            for i in range(total):
                if i in (switch // 2, switch + 10):
                    snapshot_after(acked[i - 1])
                writer, handle = (source, src) if i < switch else (destination, dst)
                sent[i] = time.monotonic()
                writer.vdi_write(handle, i * block, content(i))
                acked[i] = time.monotonic()
                if i == switch - 1:
                    source.flush(src)  # the switchover: flushed, then quiet
        finally:
            stop.set()
            thread.join(timeout=60)
        with pytest.raises(VdiLocked, match="moved to destination"):
            source.vdi_write(src, 0, b"late")
    # Snapshots on both sides of the handoff (through the source's sheep, then the
    # destination's), and more around it as the timing falls.
    assert any(done < acked[switch - 1] for _, _, done in snapshots), snapshots
    assert any(asked > acked[switch] for _, asked, _ in snapshots), snapshots
    with cluster.client(2) as reader:
        for tag, asked, done in snapshots:
            handle = reader.vdi_open("prefix", snapshot=tag)["handle"]
            data = reader.vdi_read(handle, 0, total * block)
            n = 0
            while n < total and data[n * block:(n + 1) * block] == content(n):
                n += 1
            assert data[n * block:] == bytes((total - n) * block), (tag, n)
            assert all(n > i for i, at in acked.items() if at < asked), (tag, n)
            assert all(n <= i for i, at in sent.items() if at > done), (tag, n)


def test_clients_named_on_one_connection_contend_like_connections(cluster):
    """The NBD plugin serves every NBD client over one connection to its sheep, naming
    each client at open: two clients are two contenders, one client's handles one."""
    with cluster.client(0) as client:
        client.vdi_create("clients", 8 * MiB)
        first = client.vdi_open("clients", writable=True, owner="first", client="a")["handle"]
        again = client.vdi_open("clients", writable=True, owner="first", client="a")["handle"]
        second = client.vdi_open("clients", writable=True, owner="second", client="b")["handle"]
        client.vdi_write(first, 0, b"one")
        client.vdi_write(again, 3, b"two")  # the same client: the same lock
        with pytest.raises(VdiLocked, match="in use by first"):
            client.vdi_write(second, 6, b"no")
        client.flush(first)
        time.sleep(0.5)
        client.vdi_write(second, 6, b"three")
        with pytest.raises(VdiLocked, match="moved to second"):
            client.vdi_write(again, 0, b"late")
        assert client.vdi_read(second, 0, 11) == b"onetwothree"
        attached = client.vdi_attachments()
        mine = sorted((a["client"], a["mode"], a["holds_lock"]) for a in attached
                      if a["name"] == "clients")
        assert mine == [("a", "rw", False), ("a", "rw", False), ("b", "rw", True)]


# --- fencing ------------------------------------------------------------------------------------


@dataclass
class Acked:
    offset: int
    data: bytes
    issued_s: float
    acked_s: float = 0.0


class Writer(threading.Thread):
    """Writes distinct regions of a VDI through one sheep, a few in flight, timing each."""

    region_bytes = 16 * KiB
    in_flight = 4

    def __init__(self, port: int, name: str, regions: int,
                 credentials: auth.Credentials) -> None:
        super().__init__(daemon=True)
        self.port, self.name, self.regions = port, name, regions
        self.credentials = credentials
        self.writes: list[Acked] = []
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as error:  # reported by finish()
            self.errors.append(error)
            self.ready.set()

    async def _run(self) -> None:
        rng = random.Random(13)
        client = await Client.connect("127.0.0.1", self.port, credentials=self.credentials)
        try:
            handle = (await client.vdi_open(self.name, writable=True, owner="writer"))["handle"]
            self.ready.set()
            slots = asyncio.Semaphore(self.in_flight)

            async def one(write: Acked) -> None:
                try:
                    await client.vdi_write(handle, write.offset, write.data)
                    write.acked_s = time.monotonic()
                finally:
                    slots.release()

            tasks = []
            for region in range(self.regions):
                if self.stop_event.is_set():
                    break
                await slots.acquire()
                write = Acked(region * self.region_bytes, rng.randbytes(self.region_bytes),
                              time.monotonic())
                self.writes.append(write)
                tasks.append(asyncio.ensure_future(one(write)))
            await asyncio.gather(*tasks)
        finally:
            client.close()

    def acked_after(self, moment_s: float) -> int:
        return sum(1 for w in self.writes if w.acked_s > moment_s)

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)
        assert not self.is_alive() and not self.errors, self.errors


def test_a_writers_cached_tree_follows_writes_made_through_another_sheep(cluster):
    """The gateway caches the tree entries of a VDI whose lock it holds. A lock that
    moves to another sheep, which allocates objects, and comes back, must not leave
    the first sheep answering from its old entries (an unallocated object read as
    zeros, an old data object read instead of the new one)."""
    name = "cached-tree"
    with cluster.client(0) as client:
        client.vdi_create(name, 64 * MiB)
    first, second = b"first" * 1000, b"second" * 1000
    with cluster.client(0) as client:
        handle = client.vdi_open(name, writable=True)["handle"]
        client.vdi_write(handle, 0, first)
        # Lookups through the lock holder: object 0 allocated, objects 1 and 2 not.
        assert bytes(client.vdi_read(handle, 0, len(first))) == first
        assert bytes(client.vdi_read(handle, object_size, 8)) == bytes(8)
        assert bytes(client.vdi_read(handle, 2 * object_size, 8)) == bytes(8)
        # Inside one session the cache follows its own allocations and discards.
        client.vdi_write(handle, 2 * object_size, second)
        assert bytes(client.vdi_read(handle, 2 * object_size, len(second))) == second
        client.vdi_discard(handle, 2 * object_size, object_size)
        assert bytes(client.vdi_read(handle, 2 * object_size, 8)) == bytes(8)
        client.vdi_close(handle)
    with cluster.client(1) as client:  # the lock moves to another sheep, which allocates
        handle = client.vdi_open(name, writable=True)["handle"]
        client.vdi_write(handle, object_size, second)
        client.vdi_write(handle, 2 * object_size, second)
        client.vdi_close(handle)
    with cluster.client(0) as client:  # and back
        handle = client.vdi_open(name, writable=True)["handle"]
        assert bytes(client.vdi_read(handle, object_size, len(second))) == second
        assert bytes(client.vdi_read(handle, 2 * object_size, len(second))) == second
        assert bytes(client.vdi_read(handle, 0, len(first))) == first
        client.vdi_close(handle)


def test_snapshot_fences_a_live_writer(cluster):
    name = "fenced"
    with cluster.client(2) as client:
        client.vdi_create(name, 64 * MiB)
    writer = Writer(cluster.sheep[0].port, name, (64 * MiB) // Writer.region_bytes,
                    cluster.credentials)
    writer.start()
    try:
        assert writer.ready.wait(10)
        wait_for(lambda: writer.acked_after(0) >= 30, 20, "30 writes before the snapshot")
        # Through another sheep than the writer's: it forwards to the lock holder.
        with cluster.client(1) as client:
            asked_s = time.monotonic()
            client.vdi_snapshot(name, "fence")
            answered_s = time.monotonic()
        wait_for(lambda: writer.acked_after(answered_s) >= 30, 20, "30 writes after it")
    finally:
        writer.finish()

    before = [w for w in writer.writes if w.acked_s < asked_s]
    after = [w for w in writer.writes if w.issued_s > answered_s]
    assert len(before) >= 30 and len(after) >= 30
    with cluster.client(2) as client:
        snapshot = read_all(client, name, "fence")
        head = read_all(client, name)
        snap_gen, head_gen = generation(client, name, "fence"), generation(client, name)
        for write in writer.writes:
            end = write.offset + len(write.data)
            held = snapshot[write.offset:end]
            assert head[write.offset:end] == write.data
            if write in before:
                assert held == write.data, f"acknowledged write at {write.offset} lost"
            elif write in after:
                assert held == bytes(len(held)), f"later write at {write.offset} leaked in"
            else:  # in flight during the snapshot: all or nothing
                assert held in (write.data, bytes(len(held)))
        untouched = len(writer.writes) * Writer.region_bytes
        assert snapshot[untouched:] == bytes(len(snapshot) - untouched)

        # Later writes land in the new generation; the snapshot's objects are frozen.
        assert snap_gen != head_gen
        last = after[-1].offset // object_size
        assert oid_generation(client.vdi_object(name, last)["oid"]) == head_gen
        frozen = client.vdi_object(name, 0, "fence")["oid"]
        assert oid_generation(frozen) == snap_gen
        with pytest.raises(ReadOnly, match="frozen generation"):
            client.write(frozen, b"sneaky", 0)
        disk = Disk.open(client, name, bytearray(head))
        disk.write(0, os.urandom(2 * object_size))
        disk.close()
        assert read_all(client, name, "fence") == snapshot
        assert read_all(client, name) == disk.contents


# --- space ------------------------------------------------------------------------------------


def test_deleting_every_vdi_frees_every_object(cluster):
    """Snapshots, clones, rollbacks, resizes and deletes interleaved, through all sheep."""
    rng = random.Random(14)
    with cluster.client(0) as zero, cluster.client(1) as one, cluster.client(2) as two:
        base = Disk.create(zero, "space-base", 24 * MiB)
        base.scribble(rng, 6)
        zero.vdi_snapshot("space-base", "a")
        base.scribble(rng, 4)
        one.vdi_snapshot("space-base", "b")  # forwarded to sheep 0, the writer's
        base.scribble(rng, 3)
        two.vdi_clone("space-base", "a", "space-clone")
        clone = Disk.open(one, "space-clone", bytearray(24 * MiB))
        clone.scribble(rng, 4)
        one.vdi_snapshot("space-clone", "c")
        clone.scribble(rng, 2)
        clone.close()
        base.close()
        two.vdi_rollback("space-base", "b")
        two.vdi_resize("space-clone", 5 << 30)  # a deeper tree over the old one
        clone = Disk.open(two, "space-clone", None)
        clone.write((5 << 30) - 10, b"at the end")
        clone.close()
        one.vdi_delete("space-base", "a")  # the clone still reads what it shared
        assert all_vdi_objects(cluster)

        for item in zero.vdi_list(usage=False):
            if not item["snapshot"]:
                zero.vdi_delete(item["name"], force=True)
        assert zero.vdi_list() == []
    leftover = vdi_object_files(cluster)
    assert all(not oids for oids in leftover.values()), {
        index: sorted(f"{oid:016x}" for oid in oids) for index, oids in leftover.items()}


@pytest.mark.parametrize("deleter", [
    0,
    1,
], ids=["delete-via-the-writers-sheep", "delete-via-another-sheep"])
def test_a_snapshot_deleted_before_its_data_is_overwritten_leaves_nothing(cluster, deleter):
    """A deleted snapshot's objects, still the VDI's, must go once it overwrites them."""
    name = f"shared-then-not-{deleter}"
    before = all_vdi_objects(cluster)
    with cluster.client(0) as writer, cluster.client(deleter) as other:
        disk = Disk.create(writer, name, 16 * MiB)
        disk.write(0, os.urandom(8 * MiB))
        writer.vdi_snapshot(name, "old")
        other.vdi_delete(name, "old")  # its objects are still the head's
        disk.write(0, os.urandom(8 * MiB))  # now they are nobody's
        disk.close()
        other.vdi_delete(name)
    assert all_vdi_objects(cluster) - before == set()


def test_a_write_in_flight_when_its_connection_closes_cannot_overwrite_the_next_holder(
        make_cluster):
    """The lock passes to a new writer only after the old connection's writes are done.

    A replica of the written object is stopped (SIGSTOP), so the old writer's write
    hangs; its connection closes; a new writer on another sheep must not get the lock
    until that write has landed, or the late write would overwrite the new one.
    """
    import signal

    cluster = make_cluster(3)
    cluster.format(2)
    writer_index = 0
    with cluster.client(writer_index) as client:
        client.vdi_create("handover", 16 << 20)
        handle = client.vdi_open("handover", writable=True)["handle"]
        client.vdi_write(handle, 0, b"FIRST")  # allocates: later writes go in place
        client.vdi_close(handle)
        replicas = client.vdi_object("handover", 0)["replicas"]
    ports = [node.port for node in cluster.sheep]
    replica_ports = {int(r["endpoint"].rsplit(":", 1)[1]) for r in replicas}
    stopped = next(i for i, port in enumerate(ports)
                   if port in replica_ports and i != writer_index)
    other = next(i for i in range(3) if i not in (writer_index, stopped))
    process = cluster.sheep[stopped].process
    assert process is not None

    async def old_writer() -> None:
        client = await Client.connect("127.0.0.1", ports[writer_index],
                                      credentials=cluster.credentials)
        handle = (await client.vdi_open("handover", writable=True))["handle"]
        process.send_signal(signal.SIGSTOP)
        asyncio.ensure_future(client.vdi_write(handle, 0, b"OLD!!"))
        await asyncio.sleep(0.3)  # the write reached the stopped replica and hangs there
        client.close()
        await asyncio.sleep(0.1)

    try:
        asyncio.run(old_writer())
        # Its handoff is refused while the old write is in flight (VdiLocked after
        # handoff_wait_s), or, if the stopped replica is declared dead meanwhile,
        # granted once that write is done: either way the reads below see NEW!!.
        with cluster.client(other) as client, contextlib.suppress(VdiLocked):
            client.vdi_write(client.vdi_open("handover", writable=True)["handle"], 0, b"NEW!!")
    finally:
        process.send_signal(signal.SIGCONT)
    with cluster.client(other) as client:
        handle = client.vdi_open("handover", writable=True)["handle"]
        deadline = time.monotonic() + 30
        while True:
            try:
                client.vdi_write(handle, 0, b"NEW!!")  # the first change takes the lock
                break
            except VdiLocked:
                assert time.monotonic() < deadline, "the lock never came free"
                time.sleep(0.1)
        assert client.vdi_read(handle, 0, 5) == b"NEW!!"
        time.sleep(0.5)
        assert client.vdi_read(handle, 0, 5) == b"NEW!!"
    with cluster.client(writer_index) as client:
        opened = client.vdi_open("handover")
        assert client.vdi_read(opened["handle"], 0, 5) == b"NEW!!"


def test_handoffs_that_name_no_member_or_no_other_contender_are_refused(cluster):
    """VDI_HANDOFF (admin caps; the sheep send it to each other) is checked: the
    contender must be another contender on a member (a lock handed to a node that does
    not exist would block every writer until a forced unlock), and limits fit what a
    sheep itself sends (an owner naming a long node id)."""
    with cluster.client(0) as holder, cluster.client(0) as admin:
        holder.vdi_create("asked", 8 * MiB)
        opened = holder.vdi_open("asked", writable=True, owner="holder")
        holder.vdi_write(opened["handle"], 0, b"h" * 4096)
        holder.flush(opened["handle"])
        time.sleep(0.6)  # flushed and idle: a real contender would get it
        contender = opened["contender"]
        members = [node["node_id"] for node in admin.node_list()]
        base = {"name": "asked", "from_session": contender, "owner": "x" * 300}
        for body, problem in [
                ({**base, "session": "other", "node_id": "10.9.9.9:1/" + "g" * 90},
                 "is on a member"),
                ({**base, "session": contender, "node_id": members[1]},
                 "from one contender to another")]:
            with pytest.raises(InvalidParameters, match=problem):
                admin._json(Op.VDI_HANDOFF, body)
        assert admin.vdi_list(["asked"], usage=False)[0]["lock"]["session"] == contender
        holder.vdi_write(opened["handle"], 4096, b"still mine")
        # A long owner (what a sheep with a long node id sends) is taken.
        time.sleep(0.6)
        holder.flush(opened["handle"])
        time.sleep(0.6)
        granted = admin._json(Op.VDI_HANDOFF, {**base, "session": "other",
                                                "node_id": members[1]})
        assert granted == {"granted": True}
        with pytest.raises(VdiLocked, match="moved to"):
            holder.vdi_write(opened["handle"], 0, b"fenced")


def test_a_holder_whose_write_waits_in_the_scheduler_keeps_its_lock(cluster):
    """A handoff asks whether the holder is busy: a write of its that waits for its
    turn in the I/O scheduler (its QoS limit) counts, so the handoff is refused and
    the write lands, rather than the lock moving and the write failing as fenced."""
    with cluster.client(0) as holder, cluster.client(0) as admin:
        holder.vdi_create("queued", 8 * MiB)
        admin.vdi_qos("queued", bps=2048, burst=0.01)  # a 4 KiB write: 2 s of debt
        opened = holder.vdi_open("queued", writable=True, owner="holder")
        holder.vdi_write(opened["handle"], 0, b"a" * 4096, fua=True)  # flushed
        time.sleep(0.6)  # flushed and idle: with nothing queued it could be handed over
        outcome: list[BaseException | None] = []

        def write() -> None:
            try:
                holder.vdi_write(opened["handle"], 4096, b"b" * 4096, fua=True)
                outcome.append(None)
            except BaseException as error:  # noqa: BLE001 - reported below
                outcome.append(error)

        thread = threading.Thread(target=write)
        thread.start()
        time.sleep(0.3)
        assert not outcome, "the write should still wait for the QoS limit"
        members = [node["node_id"] for node in admin.node_list()]
        answer = admin._json(Op.VDI_HANDOFF, {"name": "queued", "owner": "other",
                                              "from_session": opened["contender"],
                                              "session": "other", "node_id": members[1]})
        thread.join(10)
        assert answer["granted"] is False and "in flight" in answer["why"], answer
        assert outcome == [None]
        assert holder.vdi_read(opened["handle"], 4096, 4096) == b"b" * 4096
        admin.vdi_qos("queued", clear=True)
        holder.vdi_close(opened["handle"])


def test_a_handoff_whose_move_timed_out_fences_the_holder(tmp_path):
    """The holder's sheep sends the lock's move; the op times out (a slow or electing
    log), yet may still apply. Until the outcome is known the holder is fenced: a
    write let through the reopened gate would race the new holder's."""
    with InProcessCluster(str(tmp_path), nodes=1) as cluster:
        sheep = cluster.sheep[0]
        assert sheep.vdis is not None
        real = sheep.vdis.broadcast
        timed_out = threading.Event()
        go_on = threading.Event()

        async def slow_log(body: dict) -> object:
            if body.get("type") == "vdi_lock" and body.get("from_session"):
                if not timed_out.is_set():
                    timed_out.set()
                    raise Timeout("cluster operation vdi_lock was not applied in time")
                while not go_on.is_set():
                    await asyncio.sleep(0.01)
            return await real(body)

        sheep.vdis.broadcast = slow_log
        with cluster.client(0) as holder, cluster.client(0) as contender:
            holder.format(1, object_size)
            holder.vdi_create("moving", 8 * MiB)
            first = holder.vdi_open("moving", writable=True, owner="holder")
            holder.vdi_write(first["handle"], 0, b"old" * 1000, fua=True)
            time.sleep(0.6)
            second = contender.vdi_open("moving", writable=True, owner="contender")
            taken: list[BaseException | None] = []

            def take() -> None:
                try:
                    contender.vdi_write(second["handle"], 0, b"new" * 1000)
                    taken.append(None)
                except BaseException as error:  # noqa: BLE001 - reported below
                    taken.append(error)

            thread = threading.Thread(target=take)
            thread.start()
            assert timed_out.wait(10)
            with pytest.raises(VdiLocked, match="being handed"):
                holder.vdi_write(first["handle"], 0, b"late" * 1000)
            go_on.set()  # the contender's next ask is granted
            thread.join(30)
            assert taken == [None]
            with pytest.raises(VdiLocked, match="moved to"):
                holder.vdi_write(first["handle"], 0, b"late" * 1000)
            assert contender.vdi_read(second["handle"], 0, 3000) == b"new" * 1000


def test_a_raw_removal_of_an_object_a_locked_vdi_shares_is_refused(cluster):
    """A frozen object a locked VDI still reads (shared with its snapshot) cannot be
    removed behind its writer's back (dog object rm is admin's raw tool)."""
    with cluster.client(0) as client:
        client.vdi_create("shares", 8 * MiB)
        handle = client.vdi_open("shares", writable=True)["handle"]
        client.vdi_write(handle, 4 * MiB, b"s" * 4096)
        client.vdi_close(handle)
        client.vdi_snapshot("shares", "frozen")
        shared = radix.data_oid(generation(client, "shares", "frozen"), 1)
        handle = client.vdi_open("shares", writable=True)["handle"]
        client.vdi_write(handle, 0, b"w" * 4096)  # locked now; object 1 still shared
        with pytest.raises(VdiLocked, match="whose lock"):
            client.remove(shared)
        assert client.vdi_read(handle, 4 * MiB, 4096) == b"s" * 4096
        client.vdi_close(handle)


def test_a_shrink_cut_off_halfway_is_finished_by_running_it_again(tmp_path, monkeypatch):
    """The new size is logged before the tree is cut: if the cut fails, nothing past
    the end is read, a grow refuses (it would bring the old data back into view), and
    the same resize again finishes the cut."""
    real = VdiEngine.truncate
    failures = [SystemFailure("the store failed mid-cut")]

    async def failing(self: VdiEngine, root: radix.Root, size: int) -> list[int]:
        if failures:
            raise failures.pop()
        return await real(self, root, size)

    monkeypatch.setattr(VdiEngine, "truncate", failing)
    with InProcessCluster(str(tmp_path), nodes=1) as cluster, cluster.client(0) as client:
        client.format(1, object_size)
        client.vdi_create("halfway", 4 * object_size)
        handle = client.vdi_open("halfway", writable=True, owner="test")["handle"]
        client.vdi_write(handle, 3 * object_size, b"tail data")
        client.vdi_close(handle)
        with pytest.raises(SystemFailure, match="mid-cut"):
            client.vdi_resize("halfway", object_size, allow_shrink=True)
        assert client.vdi_list(["halfway"], usage=False)[0]["size"] == object_size
        assert client.vdi_list(["halfway"], usage=False)[0]["lock"] is None
        with pytest.raises(InvalidParameters, match="resize --allow-shrink halfway 4194304"):
            client.vdi_resize("halfway", 4 * object_size)
        assert client.vdi_resize("halfway", object_size, allow_shrink=True)["freed_objects"] == 1
        client.vdi_resize("halfway", 4 * object_size)
        handle = client.vdi_open("halfway")["handle"]
        assert client.vdi_read(handle, 3 * object_size, 9) == bytes(9)
