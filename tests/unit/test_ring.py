"""Placement (sheep/ring.py): shares that follow weights at any size, movement on
membership and weight changes, two levels of failure domains, determinism."""

from __future__ import annotations

import collections
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sheep
from sheep import constants, ring
from sheep.constants import GiB
from sheep.node import NodeInfo, parse_domain
from sheep.ring import Ring, compensate, draw, inclusion, node_salt, object_point

TiB = 1024 * GiB
repo_root = Path(sheep.__file__).resolve().parent.parent


def make_node(number: int, weight: int = 80 * GiB, zone: int | None = None,
              rack: int | None = None, seed: int = 0) -> NodeInfo:
    # Ids shaped like real ones: host:port plus a random part.
    random_part = random.Random(seed * 100_000 + number).getrandbits(64)
    return NodeInfo(
        node_id=f"127.0.0.1:{7000 + number}/{random_part:016x}", address="127.0.0.1",
        port=7000 + number, zone=number if zone is None else zone, weight=weight, rack=rack)


def copies_per_node(r: Ring, copies: int, objects: int, start: int = 0) -> collections.Counter:
    counts: collections.Counter[str] = collections.Counter()
    for oid in range(start, start + objects):
        for node in r.placement(oid, copies):
            counts[node.node_id] += 1
    return counts


def target_shares(nodes: list[NodeInfo], copies: int) -> dict[str, float]:
    """Each node's expected fraction of the objects that have a copy on it, when every
    node is its own rack: copies * weight / total, a node too heavy for that (more
    than 1/copies) holding every object and the rest sharing what is left."""
    weights = {node.node_id: float(node.weight) for node in nodes}
    always: set[str] = set()
    while True:
        left = copies - len(always)
        rest = sum(w for n, w in weights.items() if n not in always)
        grown = {n for n, w in weights.items() if n not in always and left * w >= rest}
        if not grown:
            break
        always |= grown
    left = copies - len(always)
    rest = sum(w for n, w in weights.items() if n not in always)
    return {n: 1.0 if n in always else left * w / rest for n, w in weights.items()}


# --- shares follow weights ------------------------------------------------------------

def test_the_weights_of_the_issue_get_their_shares_with_two_copies():
    """1, 1, 4, 4, 16 and 16 TiB: the vnode ring gave each 1/6; successive picks without
    compensation give the 1 TiB nodes 1.23x their share."""
    weights = [1, 1, 4, 4, 16, 16]
    nodes = [make_node(number, weight * TiB) for number, weight in enumerate(weights)]
    r = Ring(nodes)
    r._check()
    objects = 60_000
    counts = copies_per_node(r, 2, objects)
    for node, weight in zip(nodes, weights, strict=True):
        share = counts[node.node_id] / (2 * objects)
        assert share / (weight / 42) == pytest.approx(1, abs=0.06), (weight, share)


def test_weights_far_above_the_old_512_gib_cap_are_followed():
    weights = [600 * GiB, 2 * TiB, 8 * TiB, 30 * TiB, 100 * TiB]
    nodes = [make_node(number, weight) for number, weight in enumerate(weights)]
    r = Ring(nodes)
    objects = 40_000
    counts = copies_per_node(r, 1, objects)
    total = sum(weights)
    for node, weight in zip(nodes, weights, strict=True):
        expected = objects * weight / total
        # Binomial: within 5 standard deviations (and 10% for all but the lightest).
        assert abs(counts[node.node_id] - expected) <= 5 * math.sqrt(expected) + 1, weight


weight_mixes = st.lists(st.floats(math.log(10 * GiB), math.log(100 * TiB)),
                        min_size=4, max_size=9).filter(
    lambda logs: max(logs) - min(logs) > math.log(1000))  # at least 3 orders of magnitude


@given(logs=weight_mixes, copies=st.integers(1, 3), seed=st.integers(0, 2**16))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_shares_are_within_10_percent_of_weights_over_four_orders_of_magnitude(
        logs, copies, seed):
    """Random mixes from 10 GiB to 100 TiB. Each node's share of the copies is within
    10% of its weight's: exactly in expectation (the compensated weights give every
    domain its target chance, checked by integration), and in a sample of objects for
    every node that the sample can measure to better than 10%."""
    nodes = [make_node(number, int(math.exp(log)), seed=seed)
             for number, log in enumerate(logs)]
    r = Ring(nodes)
    targets = target_shares(nodes, copies)
    table = r.table(copies)
    # Expectation: the chances the compensated weights give, against the targets.
    free = [i for i, node in enumerate(r._holders) if i not in table.always]
    if len(table.always) < copies and len(free) > copies - len(table.always):
        chances = inclusion([1 / table.inverse[i] for i in free], copies - len(table.always))
        for i, chance in zip(free, chances, strict=True):
            node = r._holders[i]
            assert chance / targets[node.node_id] == pytest.approx(1, abs=1e-3), node
    # A sample of objects: nodes expected to hold at least 1,500 copies are measured to
    # within 10% at about 4 standard deviations.
    objects = 12_000
    counts = copies_per_node(r, copies, objects, start=seed * objects)
    measured = 0
    for node in nodes:
        expected = targets[node.node_id] * objects
        if expected >= 1500:
            measured += 1
            assert counts[node.node_id] / expected == pytest.approx(1, abs=0.1), node
        else:
            assert abs(counts[node.node_id] - expected) <= 5 * math.sqrt(expected) + 2
    assert measured >= 1


def test_compensation_gives_each_domain_its_share_by_integration():
    weights = [1.0, 1.0, 4.0, 4.0, 16.0, 16.0, 9.0]
    for copies in (2, 3):
        compensation = compensate(weights, copies)
        total = sum(weights)
        assert not compensation.always
        adjusted = [w * f for w, f in zip(weights, compensation.factors, strict=True)]
        for weight, chance in zip(weights, inclusion(adjusted, copies), strict=True):
            assert chance == pytest.approx(copies * weight / total, rel=1e-4)
    # Uncompensated, the light ones get too much: what the compensation is for.
    plain = inclusion(weights, 2)
    assert plain[0] > 1.15 * 2 * weights[0] / sum(weights)


def test_compensation_converges_for_domains_near_a_copy_of_every_object():
    # Two domains of a third each with 3 copies: targets of 0.98 and 0.97. A plain
    # weight-ratio step was still 0.3% off after 30 rounds (found by hypothesis).
    for weights, copies in (([17, 42, 839, 3267, 594, 198, 3233, 1811], 3),
                            ([math.exp(x) for x in (28.0, 30.0, 23.5, 29.625, 30.5625)], 2)):
        compensation = compensate(weights, copies)
        assert not compensation.always
        adjusted = [w * f for w, f in zip(weights, compensation.factors, strict=True)]
        total = sum(weights)
        for weight, chance in zip(weights, inclusion(adjusted, copies), strict=True):
            assert chance == pytest.approx(copies * weight / total, rel=2e-4)


def test_a_domain_heavier_than_one_copy_allows_gets_every_object():
    # 10 TiB next to two 1 TiB nodes with 2 copies: the big one cannot hold more than
    # one copy of each object, so it holds one of every object.
    nodes = [make_node(0, 10 * TiB), make_node(1, TiB), make_node(2, TiB)]
    r = Ring(nodes)
    assert compensate([10.0, 1.0, 1.0], 2).always == {0}
    counts = copies_per_node(r, 2, 5000)
    assert counts[nodes[0].node_id] == 5000
    assert counts[nodes[1].node_id] == pytest.approx(2500, abs=250)


def test_inclusion_sums_to_the_picks_and_matches_a_sample():
    weights = [5.0, 3.0, 1.0, 1.0, 0.5]
    chances = inclusion(weights, 2)
    assert sum(chances) == pytest.approx(2, rel=1e-6)
    rng = random.Random(1)
    hits = [0] * len(weights)
    trials = 40_000
    for _ in range(trials):
        times = sorted((rng.expovariate(w), i) for i, w in enumerate(weights))
        for _, i in times[:2]:
            hits[i] += 1
    for chance, hit in zip(chances, hits, strict=True):
        assert hit / trials == pytest.approx(chance, abs=0.01)


# --- movement ------------------------------------------------------------------------

def movement(before: Ring, after: Ring, copies: int, objects: int) -> tuple[int, int]:
    """(copies moved, the least any placement must move): a copy moves when a node
    holds an object after and did not before; the least is what the nodes whose
    count grew gained."""
    moved = 0
    gained: collections.Counter[str] = collections.Counter()
    for oid in range(objects):
        old = {node.node_id for node in before.placement(oid, copies)}
        new = {node.node_id for node in after.placement(oid, copies)}
        moved += len(new - old)
        for node_id in new - old:
            gained[node_id] += 1
        for node_id in old - new:
            gained[node_id] -= 1
    return moved, sum(count for count in gained.values() if count > 0)


mixed_weights = st.lists(st.integers(100, 20_000), min_size=5, max_size=10)


# Derandomized: the same examples in every run (a random one that fails is shrunk for
# minutes, each example placing 6,000 objects twice). 1.5x: compensation for many copies
# changes every domain's factor when one joins, so more than the ideal moves (CI found
# 1.37x: test_a_light_node_joining_heavy_ones_with_3_copies).
@given(weights=mixed_weights, copies=st.integers(1, 3), change=st.sampled_from(
    ["join", "leave", "reweight"]), data=st.data())
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
def test_a_join_leave_or_reweight_moves_at_most_1_5_times_the_ideal(
        weights, copies, change, data):
    nodes = [make_node(number, weight * GiB) for number, weight in enumerate(weights)]
    changed = list(nodes)
    if change == "join":
        changed.append(make_node(99, data.draw(st.integers(100, 20_000)) * GiB))
    elif change == "leave":
        del changed[data.draw(st.integers(0, len(nodes) - 1))]
    else:
        index = data.draw(st.integers(0, len(nodes) - 1))
        factor = data.draw(st.sampled_from([0.25, 0.5, 2.0, 4.0]))
        changed[index] = NodeInfo(**{**nodes[index].to_json(),
                                     "weight": int(nodes[index].weight * factor)})
    moved, ideal = movement(Ring(nodes), Ring(changed), copies, 6000)
    assert moved <= 1.5 * ideal + 30, (moved, ideal)


def test_a_light_node_joining_heavy_ones_with_3_copies():
    nodes = [make_node(number, weight * GiB)
             for number, weight in enumerate([920, 100, 1309, 270, 1206])]
    moved, ideal = movement(Ring(nodes), Ring([*nodes, make_node(99, 100 * GiB)]), 3, 6000)
    assert ideal <= moved <= 1.5 * ideal + 30, (moved, ideal)


def test_adding_one_of_ten_equal_nodes_moves_about_a_tenth_of_the_copies():
    nodes = [make_node(number) for number in range(10)]
    moved, ideal = movement(Ring(nodes), Ring([*nodes, make_node(10)]), 3, 20_000)
    # Copies on the new node: 3/11 of the objects; nothing else moves.
    assert moved == ideal
    assert moved / 20_000 == pytest.approx(3 / 11, rel=0.05)


# --- failure domains -----------------------------------------------------------------

def test_copies_go_to_distinct_racks_when_there_are_enough():
    # 4 racks of 3 hosts of 2 sheep each.
    nodes = [make_node(number, zone=number // 2, rack=number // 6) for number in range(24)]
    r = Ring(nodes)
    r._check()
    assert (r.racks, r.zones) == (4, 12)
    for oid in range(3000):
        placed = r.placement(oid, 3)
        assert len({node.rack for node in placed}) == 3, placed


def test_with_fewer_racks_than_copies_hosts_are_distinct_and_every_rack_is_used():
    # 2 racks of 3 hosts each; 3 copies: both racks, on 3 distinct hosts.
    nodes = [make_node(number, zone=number, rack=number // 3) for number in range(6)]
    r = Ring(nodes)
    assert (r.racks, r.zones) == (2, 6)
    for oid in range(3000):
        placed = r.placement(oid, 3)
        assert len({node.zone for node in placed}) == 3
        assert {node.rack for node in placed} == {0, 1}


def test_hosts_without_racks_are_their_own_racks():
    nodes = [make_node(number, zone=number // 2) for number in range(6)]  # 3 hosts
    r = Ring(nodes)
    assert (r.racks, r.zones) == (3, 3)
    for oid in range(1000):
        assert sorted(node.zone for node in r.placement(oid, 3)) == [0, 1, 2]


def test_fewer_hosts_than_copies_gives_one_copy_per_host():
    r = Ring([make_node(number, zone=number % 2) for number in range(5)])
    assert r.zones == 2
    for oid in range(1000):
        assert sorted(node.zone for node in r.placement(oid, 3)) == [0, 1]


rack_layouts = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5),
                                  st.integers(1, 50)), min_size=1, max_size=12)


@given(layout=rack_layouts, copies=st.integers(1, 4),
       oids=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20))
@settings(max_examples=150, deadline=None)
def test_domain_rules_hold_for_any_layout(layout, copies, oids):
    # (rack, host, weight in GiB); a host sits in the first rack it is given with.
    rack_of_host: dict[int, int] = {}
    nodes = []
    for number, (rack, host, weight) in enumerate(layout):
        rack_of_host.setdefault(host, rack)
        nodes.append(make_node(number, weight * GiB, zone=host, rack=rack_of_host[host]))
    r = Ring(nodes)
    r._check()
    racks = {node.rack for node in nodes}
    hosts = {node.zone for node in nodes}
    placed_count = min(copies, len(hosts))
    for oid in oids:
        placed = r.placement(oid, copies)
        assert len(placed) == placed_count
        assert len({node.zone for node in placed}) == placed_count  # distinct hosts
        if len(racks) >= placed_count:
            assert len({node.rack for node in placed}) == placed_count
        else:
            assert {node.rack for node in placed} == racks  # spread over every rack


def test_domains_parse_as_host_or_rack_slash_host():
    assert parse_domain("7") == (None, 7)
    assert parse_domain("2/7") == (2, 7)
    for bad in ("", "a", "1/2/3", "-1", "1/", f"{constants.zones_max + 1}"):
        with pytest.raises(ValueError):
            parse_domain(bad)


# --- determinism ---------------------------------------------------------------------

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
    rng = random.Random(5)
    nodes = [make_node(number, rng.randrange(10, 100_000) * GiB, zone=number % 6,
                       rack=number % 6 // 2) for number in range(12)]
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
    # Placement is part of the on-disk format: a change to these hashes would make
    # every existing cluster look for its objects in the wrong places.
    assert object_point(0) == 0x28DF63B7CC57C3CB
    assert object_point(2**64 - 1) == 0xA0E4B27A1ABAED73
    assert node_salt("127.0.0.1:7000/ab").hex() == "f476e16f1cee3e12"
    assert draw(0, node_salt("127.0.0.1:7000/ab")) == -0.09107986505631516
    assert draw(2**64 - 1, node_salt("x")) == -0.3094343651590634


def test_equal_keys_go_to_the_smaller_node_id(monkeypatch):
    monkeypatch.setattr(ring, "node_salt", lambda node_id: b"\0" * 8)
    nodes = [make_node(number) for number in range(5)]
    lowest = min(nodes, key=lambda node: node.node_id)
    for order in (nodes, nodes[::-1]):
        for oid in range(100):
            assert Ring(order).placement(oid, 1) == [lowest]


# --- edges ---------------------------------------------------------------------------

def test_empty_ring():
    r = Ring([])
    r._check()
    assert (r.zones, r.racks) == (0, 0)
    assert r.nodes == ()
    assert r.placement(12345, 3) == []


def test_nodes_keep_the_given_order():
    nodes = [make_node(number) for number in (3, 1, 2)]
    assert Ring(nodes).nodes == tuple(nodes)


def test_a_node_without_weight_holds_nothing():
    gateway = make_node(9, weight=0)
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


def test_an_epoch_log_from_before_weights_reads_vnodes_as_256_mib_each():
    node = NodeInfo.from_json({"node_id": "a:1/x", "address": "a", "port": 1, "zone": 3,
                               "vnodes": 320})
    assert (node.weight, node.base_weight, node.rack) == (80 * GiB, 80 * GiB, None)
    assert NodeInfo.from_json(node.to_json()) == node


def test_ten_thousand_nodes_build_and_place():
    nodes = [make_node(number, (1 + number % 7) * TiB) for number in range(10_000)]
    r = Ring(nodes)
    placed = r.placement(42, 3)
    assert len({node.zone for node in placed}) == 3


def test_weights_at_the_edge_of_a_copy_of_every_object_never_break_placement():
    """A domain just under 1/copies of the total once drove the compensation to a
    zero chance (ZeroDivisionError) or a complex power (found in review): placement
    would have failed on every sheep, for one weight setting."""
    T = 10**12
    for weights, copies in (([4 * T * (1 - 1e-6), T, T, T, T], 2),
                            ([10**15, 5 * 10**14, 5 * 10**14 + 1], 2),
                            ([10**15, 2 * 10**14, 2 * 10**14, 6 * 10**14 + 1], 2),
                            ([4 * T, 2 * T, 2 * T, 1], 2), ([4 * T, 2 * T, 2 * T + 1], 2)):
        compensation = compensate([float(w) for w in weights], copies)
        assert all(math.isfinite(f) and f > 0 for f in compensation.factors)
        nodes = [make_node(number, weight) for number, weight in enumerate(weights)]
        for oid in range(200):
            assert len({node.zone for node in Ring(nodes).placement(oid, copies)}) == copies


@given(weights=st.lists(st.integers(1, 2**60), min_size=2, max_size=8),
       copies=st.integers(2, 4))
@settings(max_examples=60, deadline=None)
def test_compensation_never_raises_and_gives_finite_factors(weights, copies):
    compensation = compensate([float(w) for w in weights], copies)
    assert len(compensation.factors) == len(weights)
    assert all(math.isfinite(f) and f > 0 for f in compensation.factors)


def test_a_host_number_under_two_racks_still_gets_one_copy():
    # Per-rack host numbers (1/1, 2/1, 3/1) name three machines as one host: the copies
    # stay on distinct hosts, which placement never gives up.
    layouts = ([(1, 1), (2, 1), (3, 1), (1, 2)], [(None, 5), (1, 5), (None, 6)],
               [(1, 1), (1, 2), (2, 1)])
    for layout in layouts:
        nodes = [make_node(number, zone=host, rack=rack)
                 for number, (rack, host) in enumerate(layout)]
        r = Ring(nodes)
        for oid in range(2000):
            placed = r.placement(oid, 3)
            assert len(placed) == min(3, r.zones)
            assert len({node.zone for node in placed}) == len(placed)
