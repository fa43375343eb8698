"""Ring placement: balance, movement on membership change, determinism, zones."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sheep
from sheep import constants, ring
from sheep.constants import GiB
from sheep.node import NodeInfo, vnodes_for_weight
from sheep.ring import Ring, object_point, vnode_point

objects_count = 100_000
repo_root = Path(sheep.__file__).resolve().parent.parent


def make_node(number: int, zone: int | None = None, vnodes: int = 16, seed: int = 0) -> NodeInfo:
    # Ids shaped like real ones: host:port plus a random part.
    random_part = random.Random(seed * 10_000 + number).getrandbits(64)
    return NodeInfo(
        node_id=f"127.0.0.1:{7000 + number}/{random_part:016x}", address="127.0.0.1",
        port=7000 + number, zone=number if zone is None else zone, vnodes=vnodes)


def equal_nodes(count: int) -> list[NodeInfo]:
    vnodes = vnodes_for_weight(80 * GiB)
    return [make_node(number, vnodes=vnodes) for number in range(count)]


def primaries(r: Ring) -> collections.Counter[str]:
    return collections.Counter(r.placement(oid, 1)[0].node_id for oid in range(objects_count))


def replica_sets(r: Ring, copies: int) -> list[frozenset[str]]:
    return [
        frozenset(node.node_id for node in r.placement(oid, copies))
        for oid in range(objects_count)]


# --- balance -----------------------------------------------------------------

def test_equal_weights_balance():
    r = Ring(equal_nodes(10))
    r._check()
    counts = primaries(r)
    assert len(counts) == 10
    average = objects_count / 10
    # Measured 1.106 (min 0.906) with 320 vnodes per node and these ids. Over
    # 200 random id sets the exact arc share of the busiest node had median
    # 1.08, p95 1.13 and exceeded 1.15 in 1.5% of them; 640 vnodes never did.
    assert max(counts.values()) <= 1.15 * average, counts


def test_weight_proportional():
    # One node of 160 GiB among four of 80 GiB: twice the vnodes, twice the objects.
    nodes = [make_node(number, vnodes=vnodes_for_weight(80 * GiB)) for number in range(5)]
    nodes[0] = make_node(0, vnodes=vnodes_for_weight(160 * GiB))
    assert nodes[0].vnodes == 2 * nodes[1].vnodes
    counts = primaries(Ring(nodes))
    others = [counts[node.node_id] for node in nodes[1:]]
    ratio = counts[nodes[0].node_id] / (sum(others) / len(others))
    # Measured 1.90. The share of a node with k vnodes varies by about
    # 1/sqrt(k), so this ratio has a spread of about 0.1: allow 3 of it.
    assert 1.7 <= ratio <= 2.3, (ratio, counts)


# --- movement when a node joins ----------------------------------------------

def test_adding_a_node_moves_about_one_nth_single_copy():
    before = Ring(equal_nodes(10))
    after = Ring(equal_nodes(11))
    newcomer = equal_nodes(11)[10].node_id
    moved = 0
    for oid in range(objects_count):
        old, new = before.placement(oid, 1)[0], after.placement(oid, 1)[0]
        if old != new:
            moved += 1
            assert new.node_id == newcomer, "objects move only to the new node"
    # Measured 0.0865, 0.95x the ideal 1/11.
    assert moved <= 1.3 * objects_count / 11, moved


def test_adding_a_node_moves_about_one_nth_of_replicas_three_copies():
    copies = 3
    nodes = equal_nodes(11)
    newcomer = nodes[10].node_id
    old_sets = replica_sets(Ring(nodes[:10]), copies)
    new_sets = replica_sets(Ring(nodes), copies)
    changed = 0
    replicas_moved = 0
    for old, new in zip(old_sets, new_sets, strict=True):
        if old == new:
            continue
        changed += 1
        # With one node per zone the walk clockwise is unchanged except that
        # the newcomer may step in among the first three: it takes one slot
        # and pushes exactly one old holder out, so one replica moves.
        assert new - old == {newcomer}
        assert len(old - new) == 1
        replicas_moved += len(new - old)
    # An object's set changes iff the newcomer is among its first 3 distinct
    # nodes, ideally 3/11 of objects (measured 0.272, 1.00x), and each such
    # change moves one replica of three, so 1/11 of all replicas move (measured
    # 0.0907); the two counts are equal here. Same 1.3x slack as for one copy.
    assert changed <= 1.3 * copies * objects_count / 11, changed
    assert replicas_moved <= 1.3 * copies * objects_count / 11, replicas_moved


# --- determinism -------------------------------------------------------------

_placement_script = """
import json, sys
from sheep.node import NodeInfo
from sheep.ring import Ring
request = json.load(sys.stdin)
r = Ring([NodeInfo.from_json(node) for node in request["nodes"]])
json.dump([[node.node_id for node in r.placement(oid, 3)] for oid in request["oids"]], sys.stdout)
"""


def placements_in_subprocess(nodes: list[NodeInfo], oids: list[int], hash_seed: str) -> list:
    environment = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(repo_root))
    completed = subprocess.run(
        [sys.executable, "-c", _placement_script], cwd=repo_root, env=environment, check=True,
        input=json.dumps({"nodes": [node.to_json() for node in nodes], "oids": oids}),
        capture_output=True, text=True, timeout=60)
    return json.loads(completed.stdout)


def test_placement_identical_across_processes_and_node_orders():
    nodes = [make_node(number, zone=number % 4, vnodes=64) for number in range(8)]
    generator = random.Random(7)
    oids = [generator.getrandbits(64) for _ in range(1000)]
    r = Ring(nodes)
    expected = [[node.node_id for node in r.placement(oid, 3)] for oid in oids]
    shuffled = list(nodes)
    random.Random(3).shuffle(shuffled)
    assert shuffled != nodes
    assert placements_in_subprocess(nodes, oids, "1") == expected
    assert placements_in_subprocess(shuffled, oids, "2") == expected
    assert [[n.node_id for n in Ring(shuffled).placement(oid, 3)] for oid in oids] == expected


def test_hashes_are_pinned():
    # Placement is part of the on-disk format: a change to these hashes would
    # make every existing cluster look for its objects in the wrong places.
    assert object_point(0) == 0x28DF63B7CC57C3CB
    assert object_point(2**64 - 1) == 0xA0E4B27A1ABAED73
    assert vnode_point("127.0.0.1:7000/ab", 0) == 0x5F895AC773085E36


def test_colliding_vnode_points_are_ordered_by_node_id(monkeypatch):
    # Force every node's i-th vnode onto the same point.
    monkeypatch.setattr(ring, "vnode_point", lambda node_id, index: index * 2**56)
    nodes = [make_node(number, vnodes=8) for number in range(5)]
    r = Ring(nodes)
    r._check()
    lowest = min(nodes, key=lambda node: node.node_id)
    for order in (nodes, nodes[::-1], nodes[2:] + nodes[:2]):
        other = Ring(order)
        other._check()
        for oid in range(200):
            assert other.placement(oid, 3) == r.placement(oid, 3)
            assert other.placement(oid, 1) == [lowest]


# --- zones -------------------------------------------------------------------

def test_two_copies_in_four_zones():
    r = Ring([make_node(number, vnodes=32) for number in range(4)])
    assert r.zones == 4
    for oid in range(1000):
        placed = r.placement(oid, 2)
        assert len(placed) == 2
        assert placed[0].zone != placed[1].zone


def test_three_copies_in_three_zones_of_two_nodes():
    r = Ring([make_node(number, zone=number // 2, vnodes=32) for number in range(6)])
    assert r.zones == 3
    for oid in range(1000):
        assert sorted(node.zone for node in r.placement(oid, 3)) == [0, 1, 2]


def test_fewer_zones_than_copies_gives_one_node_per_zone():
    r = Ring([make_node(number, zone=number % 2, vnodes=32) for number in range(5)])
    assert r.zones == 2
    for oid in range(1000):
        assert sorted(node.zone for node in r.placement(oid, 3)) == [0, 1]


def test_empty_ring():
    r = Ring([])
    r._check()
    assert r.zones == 0
    assert r.nodes == ()
    assert r.placement(12345, 3) == []


def test_nodes_keep_the_given_order():
    nodes = [make_node(number) for number in (3, 1, 2)]
    assert Ring(nodes).nodes == tuple(nodes)


def test_gateway_only_node_holds_nothing():
    gateway = make_node(9, vnodes=0)
    r = Ring([make_node(0), make_node(1), gateway])
    r._check()
    assert r.zones == 2
    for oid in range(500):
        assert gateway not in r.placement(oid, 3)


def test_duplicate_node_ids_are_refused():
    node = make_node(0)
    with pytest.raises(AssertionError):
        Ring([node, node])


def test_placement_result_is_a_fresh_list():
    r = Ring([make_node(number) for number in range(3)])
    first = r.placement(1, 2)
    first.clear()
    assert len(r.placement(1, 2)) == 2


# --- properties --------------------------------------------------------------

def model_placement(nodes: list[NodeInfo], oid: int, copies: int) -> list[NodeInfo]:
    """The definition, done slowly: sort every vnode, walk one lap clockwise."""
    points = sorted(
        (vnode_point(node.node_id, index), node.node_id, node)
        for node in nodes for index in range(node.vnodes))
    point = object_point(oid)
    start = next((i for i, entry in enumerate(points) if entry[0] >= point), 0)
    chosen: list[NodeInfo] = []
    for entry in points[start:] + points[:start]:
        if entry[2].zone not in {node.zone for node in chosen}:
            chosen.append(entry[2])
    return chosen[:copies]


node_sets = st.lists(
    st.builds(
        NodeInfo, node_id=st.text("abcdef:/0123", min_size=1, max_size=6),
        address=st.just("127.0.0.1"), port=st.integers(1, 65535),
        zone=st.integers(0, 5), vnodes=st.integers(1, 6)),
    max_size=10, unique_by=lambda node: node.node_id)


@given(nodes=node_sets, oids=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=10),
       copies=st.integers(1, constants.copies_max), data=st.data())
@settings(max_examples=300, deadline=None)
def test_placement_properties(nodes, oids, copies, data):
    r = Ring(nodes)
    r._check()
    zones = {node.zone for node in nodes}
    assert r.zones == len(zones)
    shuffled = data.draw(st.permutations(nodes))
    other = Ring(shuffled)
    for oid in oids:
        placed = r.placement(oid, copies)
        assert len(placed) == min(copies, len(zones))
        assert len({node.zone for node in placed}) == len(placed)
        assert all(node in nodes for node in placed)
        assert placed == model_placement(nodes, oid, copies)
        assert other.placement(oid, copies) == placed
