"""Re-replication: after a node loss, every object gets back to N copies."""

from __future__ import annotations

import os
import time

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
    assert lines[5] == "healthy: 0/0 objects recovered; rate limit: none"
    listing = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True,
                                        timeout=60).stdout)
    assert [item["index"] for item in listing] == [0, 1, 2]
    assert all(item["failed"] == 0 and item["unverified"] == 0 for item in listing)
