"""Re-replication: after a node loss, every object gets back to N copies."""

from __future__ import annotations

import os
import time

from sheep import radix
from sheep.testing.cluster import LocalCluster


def live_copies(cluster: LocalCluster, oid: int) -> int:
    return sum(1 for index in cluster.object_files(oid) if cluster.sheep[index].alive)


def test_a_lost_node_is_re_replicated_on_the_survivors(make_cluster):
    cluster: LocalCluster = make_cluster(4)
    cluster.format(3)
    payloads = {}
    with cluster.client(0) as client:
        for oid in range(1, 61):
            payloads[oid] = os.urandom(200_000)
            client.create_and_write(oid, payloads[oid])
        client.vdi_create("disk", 64 << 20)
        handle = client.vdi_open("disk", writable=True)["handle"]
        client.vdi_write(handle, 0, os.urandom(32 << 20))
        client.vdi_close(handle)
    oids_seen: set[int] = set()
    for index in range(4):
        with cluster.client(index) as client:
            oids_seen.update(client.list_objects())  # the VDI's objects too
    oids = sorted(oids_seen)
    assert len(oids) > 60
    victim = 3
    lost = [oid for oid in oids if victim in cluster.object_files(oid)]
    assert lost, "the victim held copies"
    started = time.monotonic()
    cluster.kill(victim)
    deadline = started + 30
    while True:
        short = [oid for oid in oids if live_copies(cluster, oid) < 3]
        if not short:
            break
        assert time.monotonic() < deadline, f"{len(short)} objects still short of 3 copies"
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    with cluster.client(1) as client:
        for oid, payload in payloads.items():
            assert client.read(oid, 0, 200_000) == payload
        recovery = [node["recovery"] for node in client.node_list()]
    assert sum(r["recovered"] for r in recovery if r) >= len(lost)
    assert elapsed < 30


def test_dog_node_recovery_reports_every_node(make_cluster):
    import json
    import subprocess
    import sys

    cluster: LocalCluster = make_cluster(3)
    cluster.format(2)
    command = [sys.executable, "-m", "dog", "node", "recovery", "-p", str(cluster.sheep[0].port)]
    table = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "To recover" in table.stdout
    lines = table.stdout.strip().splitlines()
    assert len(lines) == 6 and lines[4] == ""  # header, a row per node, the summary
    assert lines[5] == ("healthy: every node reachable, done recovering, a zone for every"
                        " copy (0/0 objects done); rate limit: none")
    listing = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True,
                                        timeout=60).stdout)
    assert [item["index"] for item in listing] == [0, 1, 2]
    assert all(item["failed"] == 0 and item["unverified"] == 0 for item in listing)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_recovered_copies_take_the_space_of_their_data_not_of_the_object(make_cluster):
    """Thin recovery: a VDI with 64 KiB written at the start of each of its objects
    loses a sheep (SIGKILL); the copies recovery makes on the survivors allocate about
    what their sources do (64 KiB each), not 4 MiB, and hold the same bytes. Before
    copies travelled as extents, each recovered copy took the whole object."""
    cluster: LocalCluster = make_cluster(4)
    cluster.format(3)
    objects, written = 32, 64 << 10
    object_size = 4 << 20
    expected: dict[int, bytes] = {}
    with cluster.client(0) as client:
        client.vdi_create("thin", objects * object_size)
        handle = client.vdi_open("thin", writable=True)["handle"]
        for index in range(objects):
            data = os.urandom(written)
            client.vdi_write(handle, index * object_size, data)
            expected[index] = data + bytes(object_size - written)
        client.vdi_close(handle)
        client.flush()
        generation = client.vdi_list(["thin"], usage=False)[0]["generation"]
    oids = {radix.data_oid(generation, index): index for index in range(objects)}
    held = {oid: set(cluster.object_files(oid)) for oid in oids}
    assert all(len(holders) == 3 for holders in held.values()), held
    sources = {oid: max(allocated(cluster.object_path(index, oid)) for index in holders)
               for oid, holders in held.items()}
    victim = 3
    lost = [oid for oid in oids if victim in held[oid]]
    assert lost, "the victim held copies"
    cluster.kill(victim)
    cluster.wait_recovered(60)
    recovered = {oid: [index for index in cluster.object_files(oid)
                       if index != victim and index not in held[oid]] for oid in lost}
    assert all(len(new) == 1 for new in recovered.values()), recovered
    copies_bytes = sum(allocated(cluster.object_path(new[0], oid))
                       for oid, new in recovered.items())
    sources_bytes = sum(sources[oid] for oid in lost)
    print(f"\n{len(lost)} objects recovered: their copies allocate {copies_bytes} bytes,"
          f" their sources {sources_bytes} bytes ({len(lost) * object_size} if whole)")
    for oid, [index] in recovered.items():
        path = cluster.object_path(index, oid)
        assert allocated(path) <= 1.1 * sources[oid], (oid, allocated(path), sources[oid])
        with open(path, "rb") as file:
            assert file.read() == expected[oids[oid]]
    # And through the cluster, every object byte for byte, from a survivor.
    with cluster.client(0) as client:
        handle = client.vdi_open("thin")["handle"]
        for index in range(objects):
            assert client.vdi_read(handle, index * object_size, object_size) == expected[index]
        client.vdi_close(handle)
