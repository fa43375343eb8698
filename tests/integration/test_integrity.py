"""End-to-end integrity with real sheep: a damaged copy is never served; reads go to
a good copy, the damaged one is repaired and the repair counted; when every copy
is damaged the read is an I/O error, and other objects read fine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sheep import proto
from sheep.errors import IOErrorResult, ReadOnly
from sheep.oid import ObjectType, oid_type
from sheep.proto import Header, Op
from sheep.testing.cluster import LocalCluster


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def integrity(cluster: LocalCluster) -> dict[int, dict]:
    with cluster.client(cluster.first_alive()) as client:
        nodes = client.node_list()
    return {cluster.index_of(f"{n['address']}:{n['port']}"): n["integrity"] for n in nodes}


def write_objects(cluster: LocalCluster, count: int) -> dict[int, bytes]:
    payloads = {oid: os.urandom(64 * 1024) for oid in range(1, count + 1)}
    with cluster.client(0) as client:
        for oid, payload in payloads.items():
            client.create_and_write(oid, payload)
        client.flush()
    return payloads


def test_a_flipped_byte_in_one_replica_is_served_around_and_repaired(make_cluster):
    cluster: LocalCluster = make_cluster(3)
    cluster.format(3)
    payloads = write_objects(cluster, 8)
    victim = 1
    flip(cluster.object_path(victim, 5), 40_000)
    with cluster.client(victim) as client:  # the local copy is read first: it is damaged
        assert client.read(5, 0, 64 * 1024) == payloads[5]
    deadline = time.monotonic() + 10
    while integrity(cluster)[victim]["repaired"] < 1:
        assert time.monotonic() < deadline, integrity(cluster)
        time.sleep(0.1)
    counts = integrity(cluster)[victim]
    assert counts["checksum_errors"] >= 1 and counts["repaired"] == 1 and counts["damaged"] == 0
    with open(cluster.object_path(victim, 5), "rb") as file:  # the copy on disk is good again
        assert file.read(64 * 1024) == payloads[5]
    with cluster.client(victim) as client:
        assert client.stat(5)["replicas"][0].get("unverified") is None
        for oid, payload in payloads.items():
            assert client.read(oid, 0, 64 * 1024) == payload
    info = subprocess.run([sys.executable, "-m", "dog", "node", "info", "--json", "-p",
                           str(cluster.sheep[0].port)], capture_output=True, text=True, timeout=60)
    assert sum(node["integrity"]["repaired"] for node in json.loads(info.stdout)) == 1


def test_every_replica_damaged_is_an_io_error_and_the_rest_reads_fine(make_cluster):
    cluster: LocalCluster = make_cluster(3)
    cluster.format(2)
    payloads = write_objects(cluster, 6)
    holders = cluster.object_files(3)
    assert len(holders) == 2
    for index in holders:
        flip(cluster.object_path(index, 3), 100)
    with cluster.client(0) as client:
        with pytest.raises(IOErrorResult, match="no good copy left"):
            client.read(3, 0, 4096)
        assert client.read(3, 8192, 4096) == payloads[3][8192:12288]  # other blocks are fine
        for oid, payload in payloads.items():
            if oid != 3:
                assert client.read(oid, 0, 64 * 1024) == payload
    result = subprocess.run([sys.executable, "-m", "dog", "object", "get", "3", "-p",
                             str(cluster.sheep[0].port)], capture_output=True, timeout=60)
    assert result.returncode == 2 and b"no good copy left" in result.stderr


def dog(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dog", *args, "-p", str(cluster.sheep[0].port)],
                          capture_output=True, text=True, timeout=120)


def test_scrub_finds_and_repairs_each_kind_of_damage(make_cluster):
    import lmdb

    cluster: LocalCluster = make_cluster(3)
    cluster.format(3)
    payloads = write_objects(cluster, 12)
    with cluster.client(0) as client:
        client.vdi_create("disk", 16 << 20)
        handle = client.vdi_open("disk", writable=True)["handle"]
        client.vdi_write(handle, 0, b"disk data" * 1000)
        client.vdi_close(handle)
    clean = json.loads(dog(cluster, "cluster", "scrub", "--json").stdout)
    assert clean["damaged_copies"] == 0 and clean["repaired"] == 0
    flip(cluster.object_path(0, 1), 1000)                 # flipped bytes
    os.unlink(cluster.object_path(1, 2))                  # a missing file
    os.truncate(cluster.object_path(2, 3), 4096)          # a truncated file
    env = lmdb.open(os.path.join(cluster.sheep[0].directory, "meta"), max_dbs=8)
    with env.begin(write=True) as txn:                    # a lost metadata entry
        for name in (b"objects", b"sums"):
            assert txn.delete((4).to_bytes(8, "big"), db=env.open_db(name, txn=txn))
    env.close()
    result = dog(cluster, "cluster", "scrub", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["repaired"] == 4 and report["copies_made"] == 4, report
    assert report["damaged_copies"] >= 3  # the lost file shows as missing, not damaged
    for index in range(3):
        for oid, payload in payloads.items():
            with open(cluster.object_path(index, oid), "rb") as file:
                assert file.read(64 * 1024) == payload, (index, oid)
    again = dog(cluster, "cluster", "scrub")
    assert again.returncode == 0 and "0 repaired" in again.stdout, again.stdout
    only_disk = json.loads(dog(cluster, "cluster", "scrub", "--vdi", "disk", "--json").stdout)
    assert 0 < only_disk["objects"] < report["objects"]
    missing = dog(cluster, "cluster", "scrub", "--vdi", "nope")
    assert missing.returncode == 5 and "no VDI named 'nope'" in missing.stderr
    # A snapshot's copy is repaired too: its generation is frozen to writers, not to a
    # repair (it was refused as "belongs to a frozen generation").
    with cluster.client(0) as client:
        client.vdi_snapshot("disk", "snap")
    (frozen,) = [oid for oid in cluster.all_oids() if oid_type(oid) == ObjectType.DATA]
    holder = cluster.object_files(frozen)[0]
    flip(cluster.object_path(holder, frozen), 10)
    snap = dog(cluster, "cluster", "scrub", "--vdi", "disk", "--json")
    assert snap.returncode == 0, snap.stdout + snap.stderr
    assert json.loads(snap.stdout)["repaired"] == 1, snap.stdout
    with open(cluster.object_path(holder, frozen), "rb") as file:
        assert file.read(9000) == b"disk data" * 1000
    # Only a repair's copy may: a client's raw change asking for FLAG_DIRECT is a
    # change like any other, refused on a frozen generation.
    forged = Header(opcode=Op.CREATE_AND_WRITE_OBJ, oid=frozen, count=4096,
                    flags=proto.FLAG_DIRECT)
    with cluster.client(0) as client, pytest.raises(ReadOnly, match="frozen generation"):
        client._loop.run_until_complete(client._client.connection.call(forged, bytes(4096)))
    with open(cluster.object_path(holder, frozen), "rb") as file:
        assert file.read(9000) == b"disk data" * 1000


def test_the_background_scrubber_finds_and_repairs_damage(make_cluster):
    cluster: LocalCluster = make_cluster(3)
    cluster.format(3)
    payloads = write_objects(cluster, 4)
    setting = dog(cluster, "cluster", "scrub", "--background-rate", "64M", "--every", "1s")
    assert setting.returncode == 0
    assert "64 MiB/s per node, a pass every 1s" in setting.stdout, setting.stdout
    flip(cluster.object_path(2, 4), 7)
    deadline = time.monotonic() + 20
    while integrity(cluster)[2]["repaired"] < 1:
        assert time.monotonic() < deadline, integrity(cluster)
        time.sleep(0.2)
    scrub = integrity(cluster)[2]["scrub"]
    assert scrub["damaged"] >= 1 and scrub["passes"] >= 1 and scrub["max_rate"] == 64 << 20
    with open(cluster.object_path(2, 4), "rb") as file:
        assert file.read(64 * 1024) == payloads[4]
    off = dog(cluster, "cluster", "scrub", "--background-rate", "0")
    assert "background scrub: off" in off.stdout


def test_sigkill_in_the_middle_of_writes_leaves_no_false_damage(make_cluster):
    """A sheep killed while writes and flushes stream through the cluster restarts
    with its copies intact: every acknowledged write reads back, and a scrub of the
    whole cluster finds no damaged copy (writes since the last flush are covered by
    the store's intents)."""
    import random
    import threading

    cluster: LocalCluster = make_cluster(3)
    cluster.format(2)
    rng = random.Random(3)
    written: dict[int, bytes] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with cluster.client(0) as client:
                client.vdi_create("disk", 64 << 20)
                handle = client.vdi_open("disk", writable=True)["handle"]
                step = 0
                while not stop.is_set():
                    offset = rng.randrange(0, (64 << 20) // 4096) * 4096
                    data = rng.randbytes(4096)
                    client.vdi_write(handle, offset, data)
                    written[offset] = data
                    step += 1
                    if step % 16 == 0:
                        client.flush()
                client.vdi_close(handle)
        except BaseException as error:  # noqa: BLE001 - reported by the test below
            errors.append(error)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(1.5)
    cluster.kill(1)  # a replica, mid-stream
    time.sleep(1.0)
    cluster.start(1)
    time.sleep(1.0)
    stop.set()
    thread.join(timeout=60)
    assert not errors, errors
    cluster.wait_recovered(60)
    with cluster.client(1) as client:
        handle = client.vdi_open("disk")["handle"]
        for offset, data in written.items():
            assert client.vdi_read(handle, offset, 4096) == data, offset
        client.vdi_close(handle)
    assert len(written) > 50
    scrub = json.loads(dog(cluster, "cluster", "scrub", "--json").stdout)
    assert scrub["damaged_copies"] == 0 and scrub["lost"] == 0, scrub
    assert all(counts["checksum_errors"] == 0 for counts in integrity(cluster).values())

