"""Recovery under the operator's control: surplus copies leave once their new holders
have them, a drained node empties itself and stops, the rate limit applies at run
time, dog cluster check repairs missing copies, dog shows the cluster's health, and
a cluster whose sheep all died waits for the last ones before serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sheep.errors import Unavailable
from sheep.testing.cluster import LocalCluster


def dog(port: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dog", *args, "-p", str(port)],
                          capture_output=True, text=True, timeout=timeout)


def write_disk(cluster: LocalCluster, size: int = 48 << 20) -> bytes:
    data = os.urandom(size)
    with cluster.client(0) as client:
        client.vdi_create("disk", size)
        handle = client.vdi_open("disk", writable=True)["handle"]
        for offset in range(0, size, 4 << 20):
            client.vdi_write(handle, offset, data[offset:offset + (4 << 20)])
        client.vdi_close(handle)
    return data


def read_disk(cluster: LocalCluster, index: int, size: int) -> bytes:
    with cluster.client(index) as client:
        handle = client.vdi_open("disk")["handle"]
        data = b"".join(client.vdi_read(handle, offset, 4 << 20)
                        for offset in range(0, size, 4 << 20))
        client.vdi_close(handle)
    return data


def all_oids(cluster: LocalCluster) -> list[int]:
    return sorted(cluster.all_oids())


def placed_on(cluster: LocalCluster, index: int, oid: int) -> list[int]:
    """Indexes of the sheep the current placement gives the object to."""
    with cluster.client(index) as client:
        replicas = client.stat(oid)["replicas"]
    return sorted(cluster.index_of(replica["endpoint"]) for replica in replicas)


def dog_index(cluster: LocalCluster, index: int) -> str:
    """The index dog shows for cluster.sheep[index] (dog sorts nodes by address)."""
    with cluster.client(cluster.first_alive()) as client:
        ports = [node["port"] for node in client.node_list()]
    return str(ports.index(cluster.sheep[index].port))


def wait_settled(cluster: LocalCluster, timeout_s: float = 60) -> dict:
    """Until every live node has finished recovering (and removing surplus copies);
    then each node's info by node id."""
    cluster.wait_recovered(timeout_s)
    with cluster.client(cluster.first_alive()) as client:
        return {node["node_id"]: node for node in client.node_list()}


def test_a_new_node_takes_its_share_and_the_old_holders_drop_their_surplus(make_cluster):
    cluster: LocalCluster = make_cluster(3)
    cluster.format(2)
    data = write_disk(cluster, 96 << 20)  # 25 objects: the new node's share is never empty
    oids = all_oids(cluster)
    assert all(len(cluster.object_files(oid)) == 2 for oid in oids)
    before = [len(os.listdir(os.path.join(s.directory, "obj"))) for s in cluster.sheep]
    assert before
    cluster.add()
    cluster.start(3)
    wait_settled(cluster)
    moved = 0
    for oid in oids:
        holders = placed_on(cluster, 0, oid)
        # Exactly the placement holds each object: copies moved, none left behind.
        assert cluster.object_files(oid) == holders, hex(oid)
        moved += 3 in holders
    # Its share is what the ring gives it (random node ids: 20-50% of the objects
    # here); every object placed on it moved there (checked above).
    assert moved > 0, "the new node got its share"
    removed = sum(node["recovery"]["removed"] for node in wait_settled(cluster).values())
    assert removed == moved
    assert read_disk(cluster, 3, len(data)) == data
    listing = json.loads(dog(cluster.sheep[0].port, "node", "list", "--json").stdout)
    assert all(node["objects"] > 0 for node in listing)


def test_drain_moves_every_copy_off_then_stops_the_node(make_cluster):
    cluster: LocalCluster = make_cluster(4)
    cluster.format(3)
    data = write_disk(cluster)
    oids = all_oids(cluster)
    assert any(3 in cluster.object_files(oid) for oid in oids)
    with cluster.client(0) as client:  # by node id (an index shifts as nodes leave)
        node_id = next(node["node_id"] for node in client.node_list()
                       if node["port"] == cluster.sheep[3].port)
    result = dog(cluster.sheep[0].port, "node", "drain", node_id)
    assert result.returncode == 0, result.stderr
    assert "holds no copies" in result.stderr and "is stopping" in result.stdout
    assert cluster.sheep[3].process is not None
    assert cluster.sheep[3].process.wait(timeout=20) == 0
    cluster.wait_epoch(0, 3)
    for oid in oids:
        files = cluster.object_files(oid)
        assert 3 not in files and len(files) == 3, hex(oid)
    assert read_disk(cluster, 1, len(data)) == data


def test_drain_is_refused_when_the_rest_cannot_keep_the_copies(make_cluster):
    cluster: LocalCluster = make_cluster(3)
    cluster.format(3)
    result = dog(cluster.sheep[0].port, "node", "drain", dog_index(cluster, 2))
    assert result.returncode == 1
    assert "fewer than the 3 copies" in result.stderr
    assert cluster.sheep[2].alive
    with cluster.client(0) as client:
        assert all(node["weight"] > 0 for node in client.node_list())


def test_the_rate_limit_paces_recovery_and_lifts_at_run_time(make_cluster):
    cluster: LocalCluster = make_cluster(4)
    cluster.format(3)
    write_disk(cluster, 64 << 20)
    result = dog(cluster.sheep[0].port, "node", "recovery", "--max-rate", "4M")
    assert result.returncode == 0 and "4 MiB/s" in result.stdout, result
    with cluster.client(1) as client:
        assert {node["recovery"]["max_rate"] for node in client.node_list()} == {4 << 20}
    cluster.kill(3)
    cluster.wait_epoch(0, 3)
    time.sleep(2.0)
    with cluster.client(0) as client:
        status = [node["recovery"] for node in client.node_list()]
    assert any(s["running"] for s in status), "at 4 MiB/s the recovery is still going"
    for s in status:
        # A burst of at most one object per fetch slot, then the pace holds.
        assert s["bytes"] <= (4 << 20) * (s["elapsed"] + 1) + 4 * (4 << 20), s
    assert dog(cluster.sheep[0].port, "node", "recovery", "--max-rate", "0").returncode == 0
    nodes = wait_settled(cluster, timeout_s=30)
    assert all(node["recovery"]["failed"] == 0 for node in nodes.values())
    for oid in all_oids(cluster):
        assert len([i for i in cluster.object_files(oid) if i != 3]) == 3


def test_watch_follows_recovery_to_the_end_and_info_shows_health(make_cluster):
    cluster: LocalCluster = make_cluster(4)
    cluster.format(3)
    write_disk(cluster)
    port = cluster.sheep[0].port
    assert dog(port, "node", "recovery", "--max-rate", "8M").returncode == 0
    cluster.kill(3)
    cluster.wait_epoch(0, 3)
    time.sleep(0.5)
    info = json.loads(dog(port, "cluster", "info", "--json").stdout)
    assert info["health"]["state"] == "recovering"
    oid = next(iter(all_oids(cluster)))
    # One notion of health (sheep/health.py), the same in every command.
    assert "Cluster health: recovering: " in dog(port, "cluster", "info").stdout
    assert "\nrecovering: " in dog(port, "node", "recovery").stdout
    assert "Cluster health: recovering: " in dog(port, "object", "stat", hex(oid)).stdout
    watch = dog(port, "node", "recovery", "--watch", "--max-rate", "0", timeout=60)
    assert watch.returncode == 0
    assert watch.stderr.strip().splitlines()[-1].startswith("healthy")
    settled = wait_settled(cluster, timeout_s=5)  # --watch returned only once done
    assert all(node["recovery"]["failed"] == 0 for node in settled.values())
    text = dog(port, "cluster", "info").stdout
    assert "Cluster health: healthy" in text
    check = dog(port, "cluster", "check")
    assert check.returncode == 0 and "Cluster health: healthy" in check.stdout
    stat = dog(port, "object", "stat", hex(oid)).stdout
    assert stat.startswith(f"object {oid:016x}: healthy: 3 of 3 copies")

    cluster.kill(2)  # two zones left for three copies: degraded, whatever recovery does
    cluster.wait_epoch(0, 2)
    for command in (["cluster", "info"], ["cluster", "check"], ["object", "stat", hex(oid)]):
        result = dog(port, *command, timeout=60)
        assert "Cluster health: degraded: only 2 zone(s) for 3 copies" in result.stdout, command
    assert "\ndegraded: only 2 zone(s) for 3 copies" in dog(port, "node", "recovery").stdout
    assert dog(port, "cluster", "check", timeout=60).returncode == 1  # objects short
    stat = dog(port, "object", "stat", hex(oid)).stdout
    assert stat.startswith(f"object {oid:016x}: degraded: 2 of 3 copies"), stat


def test_check_restores_copies_lost_from_a_store(make_cluster):
    cluster: LocalCluster = make_cluster(3)
    cluster.format(3)
    data = write_disk(cluster, 16 << 20)
    oids = all_oids(cluster)
    victim = cluster.sheep[1]
    for oid in oids[:3]:
        name = f"{oid:016x}"
        os.unlink(os.path.join(victim.directory, "obj", name[-2:], name))
    result = dog(cluster.sheep[0].port, "cluster", "check", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["objects"] == len(oids)
    assert report["repaired"] == 3 and report["copies_made"] == 3
    assert report["ok"] == len(oids) - 3
    for oid in oids:
        assert cluster.object_files(oid) == [0, 1, 2]
    again = dog(cluster.sheep[0].port, "cluster", "check")
    assert again.returncode == 0 and f"{len(oids)} fine" in again.stdout
    cluster.kill(0)
    cluster.kill(2)
    cluster.wait_epoch(1, 1)  # the repaired copies alone serve the disk
    assert read_disk(cluster, 1, len(data)) == data


def test_after_every_sheep_died_the_cluster_waits_for_the_last_ones(make_cluster):
    cluster: LocalCluster = make_cluster(3)
    cluster.format(3)
    data = write_disk(cluster, 8 << 20)
    last = []
    for index in (1, 2):
        with cluster.client(index) as client:
            last.append(client.ping()["node_id"])
    cluster.kill(0)
    cluster.wait_epoch(1, 2)
    with cluster.client(1) as client:  # written while node 0 was away: it holds old data
        handle = client.vdi_open("disk", writable=True)["handle"]
        client.vdi_write(handle, 0, b"new" * 1000)
        client.vdi_close(handle)
    data = b"new" * 1000 + data[3000:]
    cluster.kill(1)
    cluster.kill(2)
    cluster.start(0)
    with cluster.client(0) as client:
        info = client.cluster_info()
        assert info["status"] == "shutdown"
        assert sorted(info["waiting_for"]) == sorted(last)
        with pytest.raises(Unavailable, match="waiting for 2 node"):
            client.vdi_open("disk")
    assert "waiting for 2 node(s)" in dog(cluster.sheep[0].port, "cluster", "info").stdout
    cluster.start(2)
    cluster.start(1)
    assert read_disk(cluster, 0, len(data)) == data
