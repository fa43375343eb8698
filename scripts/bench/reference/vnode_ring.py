"""The placement before issue #19, kept as the placement benchmark's baseline: a
consistent-hash ring with vnodes (one per 256 MiB of weight, 16 to 2,048 per node),
mmh3 points, copies on the first distinct zones clockwise. Not used by the sheep."""

from __future__ import annotations

import bisect

import mmh3

vnode_weight_bytes = 256 << 20
vnodes_min, vnodes_max = 16, 2048


def vnodes_for_weight(weight: int) -> int:
    return max(vnodes_min, min(vnodes_max, weight // vnode_weight_bytes))


def object_point(oid: int) -> int:
    return mmh3.hash64(oid.to_bytes(8, "little"), signed=False)[0]


class VnodeRing:
    def __init__(self, nodes: list[tuple[str, int, int]]) -> None:
        """nodes: (node_id, zone, weight in bytes)."""
        entries = sorted(
            (mmh3.hash64(f"{node_id}/{index}".encode(), signed=False)[0], node_id, zone)
            for node_id, zone, weight in nodes for index in range(vnodes_for_weight(weight)))
        self.points = [entry[0] for entry in entries]
        self.owners = [(entry[1], entry[2]) for entry in entries]
        self.zones = len({zone for _, zone, _ in nodes})

    def placement(self, oid: int, copies: int) -> list[str]:
        start = bisect.bisect_left(self.points, object_point(oid))
        count = len(self.owners)
        chosen: list[str] = []
        zones: set[int] = set()
        for step in range(count):
            node_id, zone = self.owners[(start + step) % count]
            if zone not in zones:
                zones.add(zone)
                chosen.append(node_id)
                if len(chosen) == min(copies, self.zones):
                    break
        return chosen

    def arc_shares(self) -> dict[str, float]:
        """Each node's exact share of the ring (of single-copy objects)."""
        shares: dict[str, float] = {}
        count = len(self.points)
        for position in range(count):
            previous = self.points[position - 1] if position else self.points[-1] - 2**64
            node_id = self.owners[position][0]
            shares[node_id] = shares.get(node_id, 0.0) + (self.points[position] - previous) / 2**64
        return shares
