"""Placement (issue #19): build time, lookups per second, memory and the spread of
shares against weights, at 100, 1,000 and 10,000 nodes; the vnode ring that came
before (sheep/legacy_ring.py, which still places epochs recorded before weights)
measured in the same run as baseline.

- build: Ring(nodes) and its table for 3 copies (the compensation of weights);
- lookups: placements of distinct oids with 3 copies, uncached (the per-ring cache
  is bypassed) and cached (the same oids again);
- memory: tracemalloc's peak while building, i.e. what one ring holds;
- spread: each node's share of the objects (one copy) over its share of the weight,
  max and min over the nodes (for the sample: those it can measure, 150 objects or
  more expected). The new placement is sampled (it is exact in
  expectation by construction); the vnode ring's is its exact arc share. 1,000 objects per node at 100
  nodes (binomial noise about 3%), 200 at 1,000 (about 7%); none at 10,000, where a
  sample big enough would take hours of lookups. Two weight mixes: equal
  weights, and weights log-uniform from 10 GiB to 100 TiB.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import tracemalloc
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from sheep.legacy_ring import VnodeRing  # noqa: E402
from sheep.node import NodeInfo  # noqa: E402
from sheep.ring import Ring  # noqa: E402

GiB = 1 << 30
TiB = 1 << 40


def make_nodes(count: int, mix: str, seed: int = 1) -> list[NodeInfo]:
    rng = random.Random(seed * 1_000_003 + count)
    nodes = []
    for number in range(count):
        if mix == "equal":
            weight = 4 * TiB
        else:
            weight = int(math.exp(rng.uniform(math.log(10 * GiB), math.log(100 * TiB))))
        nodes.append(NodeInfo(node_id=f"10.{number >> 16}.{number >> 8 & 255}.{number & 255}"
                              f":7000/{rng.getrandbits(64):016x}", address="10.0.0.1",
                              port=7000, zone=number, weight=weight, base_weight=weight))
    return nodes


def _build(nodes: list[NodeInfo]) -> tuple[Ring, float, int]:
    tracemalloc.start()
    started = time.perf_counter()
    ring = Ring(nodes)
    ring.table(3)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return ring, elapsed, peak


def _timed_build(nodes: list[NodeInfo]) -> float:
    """Seconds to build a ring and its 3-copy table, without tracemalloc's overhead."""
    started = time.perf_counter()
    Ring(nodes).table(3)
    return time.perf_counter() - started


def _old_build(nodes: list[NodeInfo]) -> tuple[VnodeRing, float, int]:
    tracemalloc.start()
    started = time.perf_counter()
    ring = VnodeRing(nodes)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return ring, elapsed, peak


def _rate(place: Any, oids: range) -> float:
    started = time.perf_counter()
    for oid in oids:
        place(oid, 3)
    return len(oids) / (time.perf_counter() - started)


def _spread(shares: dict[str, float], nodes: list[NodeInfo],
            objects: int | None = None) -> tuple[float, float]:
    """Max and min of share / weight share; for a sample of ``objects``, over the nodes
    it can measure (at least 150 expected: a binomial noise of 8% or less)."""
    total = sum(node.weight for node in nodes)
    ratios = [shares.get(node.node_id, 0.0) / (node.weight / total) for node in nodes
              if objects is None or objects * node.weight / total >= 150]
    return max(ratios), min(ratios)


def _sampled_shares(ring: Ring, nodes: list[NodeInfo], objects: int) -> dict[str, float]:
    counts: dict[str, int] = {}
    for oid in range(objects):
        node = ring._placement_uncached(oid, 1)[0]
        counts[node.node_id] = counts.get(node.node_id, 0) + 1
    return {node_id: count / objects for node_id, count in counts.items()}


def run(quick: bool = False, reps: int | None = None) -> dict[str, Any]:
    sizes = (100, 1000) if quick else (100, 1000, 10_000)
    results: list[dict[str, Any]] = []
    for count in sizes:
        nodes = make_nodes(count, "equal")
        build_s = _timed_build(nodes)
        ring, _, peak = _build(nodes)
        lookups = max(300, 200_000 // count)
        uncached = _rate(ring._placement_uncached, range(lookups))
        cached_oids = range(lookups)
        _rate(ring.placement, cached_oids)  # fill the cache
        cached = _rate(ring.placement, cached_oids)
        row: dict[str, Any] = {
            "nodes": count, "build_s": build_s, "lookups_per_s": uncached,
            "cached_lookups_per_s": cached, "memory_mib": peak / 2**20}
        if count <= 1000:  # the vnode ring took 1,024 nodes at most (3.5 GB at 10,000)
            old, row["old_build_s"], old_peak = _old_build(nodes)
            row["old_memory_mib"] = old_peak / 2**20
            row["old_lookups_per_s"] = _rate(old.placement, range(20_000))
        # Build with mixed weights too: the compensation works harder.
        mixed = make_nodes(count, "mixed")
        row["mixed_build_s"] = _timed_build(mixed)
        if count <= 1000 and not (quick and count > 100):
            objects = (1000 if count <= 100 else 200) * count
            for mix, group in (("equal", nodes), ("mixed", mixed)):
                sampled = Ring(group)
                high, low = _spread(_sampled_shares(sampled, group, objects), group, objects)
                old_high, old_low = _spread(VnodeRing(group).arc_shares(), group)
                # What sampling alone gives: the largest of the nodes' binomial noises
                # is about 2.5 standard deviations at 100 nodes, 3.2 at 1,000.
                noise = (2.5 if count <= 100 else 3.2) / math.sqrt(objects / count)
                row[f"spread_{mix}"] = {"max": high, "min": low, "objects": objects,
                                        "sampling_noise": noise,
                                        "old_max": old_high, "old_min": old_low}
        results.append(row)
        old_text = (f"; vnode ring: build {row['old_build_s']:.3f} s,"
                    f" {row['old_lookups_per_s']:,.0f} lookups/s, {row['old_memory_mib']:.1f} MiB"
                    if "old_build_s" in row else "")
        print(f"  {count:>6} nodes: build {build_s:.3f} s (mixed weights"
              f" {row['mixed_build_s']:.3f} s), {uncached:,.0f} lookups/s uncached,"
              f" {cached:,.0f} cached, {row['memory_mib']:.1f} MiB{old_text}", flush=True)
        for mix in ("equal", "mixed"):
            spread = row.get(f"spread_{mix}")
            if spread:
                print(f"          {mix} weights: share/weight max {spread['max']:.3f} min"
                      f" {spread['min']:.3f} ({spread['objects']:,} objects sampled: noise"
                      f" alone gives about 1 +- {spread['sampling_noise']:.3f} with equal"
                      " weights);"
                      f" vnode ring exact max {spread['old_max']:.3f} min"
                      f" {spread['old_min']:.3f}", flush=True)
    return {"sizes": results}


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
