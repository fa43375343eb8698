"""The placement before issue #19, for epochs recorded before it: a consistent-hash
ring with vnodes, sans-IO.

Every node put ``vnodes`` points on a 64-bit ring (mmh3 of "node_id/index"); an
object sits at mmh3 of its oid; its copies go to the first nodes met clockwise,
skipping nodes whose zone already holds a copy. An epoch log written before weights
names each node's vnodes: an epoch with such a record is placed this way
(sheep/group.py), so the placement under that epoch, which put the data where it is,
is recomputed exactly. A node without a vnode count (one that joined since) gets one
per 256 MiB of weight, 16 to 2,048, as it would have then. The benchmark measures the
new placement against this one (scripts/bench/placement_bench.py).
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence

import mmh3

from sheep.node import NodeInfo, legacy_vnode_bytes

vnodes_min, vnodes_max = 16, 2048
placement_cache_entries_max = 65_536


def vnodes_of(node: NodeInfo) -> int:
    """The node's vnodes: recorded, else one per 256 MiB of weight within bounds (none
    without weight)."""
    if node.vnodes is not None:
        return node.vnodes
    if node.weight == 0:
        return 0
    return max(vnodes_min, min(vnodes_max, node.weight // legacy_vnode_bytes))


def object_point(oid: int) -> int:
    return mmh3.hash64(oid.to_bytes(8, "little"), signed=False)[0]


def vnode_point(node_id: str, index: int) -> int:
    return mmh3.hash64(f"{node_id}/{index}".encode(), signed=False)[0]


class VnodeRing:
    """The placement of every object for one node list, the way before weights."""

    def __init__(self, nodes: Sequence[NodeInfo]) -> None:
        self.nodes: tuple[NodeInfo, ...] = tuple(nodes)
        # Sorting on (point, node_id, index) makes colliding points land in one order
        # whatever the input order.
        entries = sorted((vnode_point(node.node_id, index), node.node_id, index, node)
                         for node in self.nodes for index in range(vnodes_of(node)))
        self.points = [entry[0] for entry in entries]
        self.owners = [entry[3] for entry in entries]
        self.zones = len({node.zone for node in self.owners})
        self.racks = self.zones
        self._cached = functools.lru_cache(maxsize=placement_cache_entries_max)(self._place)

    def placement(self, oid: int, copies: int) -> list[NodeInfo]:
        return list(self._cached(oid, copies))

    def _place(self, oid: int, copies: int) -> tuple[NodeInfo, ...]:
        count = len(self.owners)
        wanted = min(copies, self.zones)
        start = bisect.bisect_left(self.points, object_point(oid))
        chosen: list[NodeInfo] = []
        zones: set[int] = set()
        for step in range(count):  # one lap at most: by then every zone was met
            if len(chosen) == wanted:
                break
            node = self.owners[(start + step) % count]
            if node.zone not in zones:
                zones.add(node.zone)
                chosen.append(node)
        return tuple(chosen)

    def arc_shares(self) -> dict[str, float]:
        """Each node's exact share of the ring (of single-copy objects)."""
        shares: dict[str, float] = {}
        for position, point in enumerate(self.points):
            previous = self.points[position - 1] if position else self.points[-1] - 2**64
            node_id = self.owners[position].node_id
            shares[node_id] = shares.get(node_id, 0.0) + (point - previous) / 2**64
        return shares
