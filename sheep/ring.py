"""Placement: a consistent-hash ring with virtual nodes, sans-IO.

Every node puts ``node.vnodes`` points on a 64-bit ring (mmh3 of
"node_id/index"); an object sits at mmh3 of its oid. Its copies go to the
first nodes met clockwise from that point, skipping nodes whose zone already
holds a copy, so the copies of one object never share a failure domain.

Why this shape: vnodes spread each node's share over many small arcs, so load
follows weight (vnodes) and a membership change moves only the objects on the
arcs that changed hands, about 1/N of them. The answer must be a pure function
of (set of nodes, oid, copies), the same in every sheep and client: hashes are
mmh3 over fixed bytes (never Python's salted hash()), and vnode points that
collide are ordered by node id, so the order nodes are given in never matters.

The ring is immutable (a new epoch builds a new ring), which is what makes
caching placements safe; placement runs on every I/O.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import mmh3
from sortedcontainers import SortedList

from sheep import constants
from sheep.node import NodeInfo

# Placements remembered per ring: each entry is a few hundred bytes, and a busy
# gateway touches a working set of objects far smaller than this.
placement_cache_entries_max = 65_536

_oid_max = 2**64 - 1


def object_point(oid: int) -> int:
    """The object's point on the ring: mmh3 x64 of the oid as 8 little-endian bytes."""
    assert 0 <= oid <= _oid_max, oid
    return mmh3.hash64(oid.to_bytes(8, "little"), signed=False)[0]


def vnode_point(node_id: str, index: int) -> int:
    """The point of a node's index-th vnode: mmh3 x64 of "node_id/index"."""
    return mmh3.hash64(f"{node_id}/{index}".encode(), signed=False)[0]


class Ring:
    """The placement of every object for one node list (one epoch)."""

    def __init__(self, nodes: Sequence[NodeInfo]) -> None:
        self.nodes: tuple[NodeInfo, ...] = tuple(nodes)
        node_ids = [node.node_id for node in self.nodes]
        assert len(set(node_ids)) == len(node_ids), f"duplicate node ids in {node_ids}"
        assert len(self.nodes) <= constants.node_ids_per_cluster_max, len(self.nodes)
        for node in self.nodes:
            assert 0 <= node.vnodes <= constants.vnodes_max, node

        # Sorting on (point, node_id, index) makes colliding points land in one
        # order whatever the input order; (node_id, index) is unique per vnode.
        entries = sorted(
            (vnode_point(node.node_id, index), node.node_id, index, node)
            for node in self.nodes
            for index in range(node.vnodes))
        self._points: SortedList = SortedList(entry[0] for entry in entries)
        # Parallel to _points: position i of the ring belongs to _owners[i].
        self._owners: tuple[NodeInfo, ...] = tuple(entry[3] for entry in entries)
        # A node without vnodes (a gateway-only node) stores nothing, so its
        # zone cannot take a copy unless another node in that zone has vnodes.
        self._zones = len({node.zone for node in self._owners})
        self._placement_cached = functools.lru_cache(maxsize=placement_cache_entries_max)(
            self._placement_uncached)

    @property
    def zones(self) -> int:
        """The number of distinct zones that can hold copies."""
        return self._zones

    def placement(self, oid: int, copies: int) -> list[NodeInfo]:
        """The nodes holding the object's copies, primary first.

        One node per zone: fewer than ``copies`` nodes when there are fewer
        zones than copies (the caller decides whether that is an error).
        """
        return list(self._placement_cached(oid, copies))

    def _placement_uncached(self, oid: int, copies: int) -> tuple[NodeInfo, ...]:
        assert 1 <= copies <= constants.copies_max, copies
        point = object_point(oid)
        owners = self._owners
        count = len(owners)
        copies_placed = min(copies, self._zones)
        chosen: list[NodeInfo] = []
        zones_used: set[int] = set()
        start = self._points.bisect_left(point)
        # One lap at most: by then every zone has been met.
        for step in range(count):
            node = owners[(start + step) % count]
            if node.zone in zones_used:
                continue
            zones_used.add(node.zone)
            chosen.append(node)
            if len(chosen) == copies_placed:
                break
        assert len(chosen) == copies_placed, (oid, copies, chosen)
        return tuple(chosen)

    def _check(self) -> None:
        """Assert the ring's invariants; tests call it on every ring they build."""
        node_ids = [node.node_id for node in self.nodes]
        assert len(set(node_ids)) == len(node_ids)
        points = list(self._points)
        assert len(points) == len(self._owners) == sum(node.vnodes for node in self.nodes)
        for position in range(1, len(points)):
            previous, current = points[position - 1], points[position]
            assert previous <= current, position
            if previous == current:
                assert self._owners[position - 1].node_id <= self._owners[position].node_id
        # Every vnode of every node is on the ring at its hash point, and nothing else is.
        expected = sorted(
            (vnode_point(node.node_id, index), node.node_id)
            for node in self.nodes
            for index in range(node.vnodes))
        actual = [(point, owner.node_id) for point, owner in zip(points, self._owners, strict=True)]
        assert actual == expected
        given = set(self.nodes)
        assert all(owner in given for owner in self._owners)
        assert self._zones == len({node.zone for node in self.nodes if node.vnodes > 0})
        assert all(0 <= point <= _oid_max for point in points)
