"""Placement with real sheep: declared weights far apart get their shares, dog node
weight moves data until the shares follow (and the weight outlives a restart), dog
cluster reweight resets it, and copies go to distinct racks given -z RACK/HOST."""

from __future__ import annotations

import json
import subprocess
import sys

from sheep.oid import ObjectType, make_oid
from sheep.testing.cluster import LocalCluster

TiB = 1 << 40


def dog(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dog", *args, "-p", str(port)],
                          capture_output=True, text=True, timeout=120)


def start_with(cluster: LocalCluster, *per_sheep: list[str]) -> None:
    for node, args in zip(cluster.sheep, per_sheep, strict=True):
        node.extra_args = args  # after the defaults: the last -w and -z count
    cluster.start()


def write_objects(cluster: LocalCluster, count: int) -> list[int]:
    oids = [make_oid(ObjectType.RAW, 0, index) for index in range(count)]
    with cluster.client(0) as client:
        for oid in oids:
            client.create_and_write(oid, oid.to_bytes(8, "little"))
    return oids


def objects_per_sheep(cluster: LocalCluster) -> list[int]:
    with cluster.client(cluster.first_alive()) as client:
        nodes = {node["port"]: node for node in client.node_list()}
    return [int(nodes[node.port]["objects"]) for node in cluster.sheep]


def test_sheep_declared_1t_4t_and_16t_hold_objects_in_proportion(make_cluster):
    cluster: LocalCluster = make_cluster(3, start=False)
    start_with(cluster, ["-w", "1T"], ["-w", "4T"], ["-w", "16T"])
    cluster.format(1)
    write_objects(cluster, 12_000)
    counts = objects_per_sheep(cluster)
    assert sum(counts) == 12_000
    for count, weight in zip(counts, (1, 4, 16), strict=True):
        # The vnode ring capped every node at 512 GiB: each got a third.
        assert abs(count / (12_000 * weight / 21) - 1) <= 0.15, counts
    listing = dog(cluster.sheep[0].port, "node", "list")
    assert listing.returncode == 0, listing.stderr
    assert "16 TiB" in listing.stdout and "76.2%" in listing.stdout, listing.stdout
    # On one disk, the 16T sheep fills first: 76% of the copies for a third of the space.
    info = dog(cluster.sheep[0].port, "cluster", "info")
    with cluster.client(0) as client:
        ports = [node["port"] for node in client.node_list()]
    heavy = ports.index(cluster.sheep[2].port)
    assert f"Limited by node {heavy} (76.2% of the copies for 33.3% of the space)" in \
        info.stdout, info.stdout
    space = json.loads(dog(cluster.sheep[0].port, "cluster", "info", "--json").stdout)["space"]
    assert [item["index"] for item in space["limiting"]] == [heavy]
    # Full when the heavy one is: its third of the raw space holds 76.2% of the copies.
    assert abs(space["usable"] * (16 / 21) / (space["raw"] / 3) - 1) < 0.02, space


def test_dog_node_weight_moves_data_until_shares_follow_and_outlives_a_restart(make_cluster):
    cluster: LocalCluster = make_cluster(3, start=False)
    start_with(cluster, ["-w", "1T"], ["-w", "1T"], ["-w", "1T"])
    cluster.format(1)
    oids = write_objects(cluster, 3000)
    port = cluster.sheep[1].port
    with cluster.client(0) as client:
        node_id = next(node["node_id"] for node in client.node_list()
                       if node["port"] == cluster.sheep[0].port)

    result = dog(port, "node", "weight", node_id, "4T")
    assert result.returncode == 0, result.stderr
    assert "weight 1 TiB -> 4 TiB" in result.stdout, result.stdout
    cluster.wait_recovered(timeout_s=90)
    counts = objects_per_sheep(cluster)
    assert sum(counts) == 3000, counts  # surplus copies dropped, nothing lost
    for count, weight in zip(counts, (4, 1, 1), strict=True):
        assert abs(count / (3000 * weight / 6) - 1) <= 0.15, counts
    recovery = dog(port, "node", "recovery")
    assert recovery.returncode == 0, recovery.stderr

    # The weight belongs to the cluster, not to the sheep's command line.
    cluster.kill(0)
    cluster.start(0)
    cluster.wait_recovered(timeout_s=90)
    nodes = json.loads(dog(port, "node", "list", "--json").stdout)
    assert next(n for n in nodes if n["node_id"] == node_id)["weight"] == 4 * TiB

    again = dog(port, "node", "weight", node_id, "4T")
    assert again.returncode == 0 and "already weighs" in again.stdout
    bad = dog(port, "node", "weight", node_id, "lots")
    assert bad.returncode == 64 and "lots" in bad.stderr  # EXIT_USAGE
    unknown = dog(port, "node", "weight", "127.0.0.1:1", "1T")
    assert unknown.returncode != 0 and "127.0.0.1:1" in unknown.stderr

    reset = dog(port, "cluster", "reweight")
    assert reset.returncode == 0, reset.stderr
    assert "1 of 3 node(s) reweighted" in reset.stdout, reset.stdout
    cluster.wait_recovered(timeout_s=90)
    counts = objects_per_sheep(cluster)
    assert sum(counts) == 3000 and all(abs(count / 1000 - 1) <= 0.15 for count in counts)
    with cluster.client(2) as client:
        for oid in oids[::50]:
            assert client.read(oid, 0, 8) == oid.to_bytes(8, "little")


def test_copies_go_to_both_racks_and_format_names_the_hosts_it_lacks(make_cluster):
    cluster: LocalCluster = make_cluster(4, start=False)
    # Two racks of one host each, two sheep per host.
    start_with(cluster, ["-z", "0/1"], ["-z", "0/1"], ["-z", "1/2"], ["-z", "1/2"])
    refused = dog(cluster.sheep[0].port, "cluster", "format", "--copies", "3")
    assert refused.returncode != 0
    assert "cannot keep 3 copies on 2 hosts" in refused.stderr, refused.stderr
    assert "give fewer copies (--copies N)" in refused.stderr
    cluster.format(2)
    listing = dog(cluster.sheep[0].port, "node", "list")
    assert "0/1" in listing.stdout and "1/2" in listing.stdout, listing.stdout
    oids = write_objects(cluster, 200)
    rack_of = {0: 0, 1: 0, 2: 1, 3: 1}
    for oid in oids:
        holders = cluster.object_files(oid)
        assert sorted(rack_of[index] for index in holders) == [0, 1], (hex(oid), holders)
