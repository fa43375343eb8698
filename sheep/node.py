"""A node's identity as the cluster sees it: id, address, zone and vnodes.

The node id is "host:port/<random>" where the random part is made at the
store's first start and kept in the store, so a sheep restarted on the same
directory is the same node, and two stores on one address are never confused.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sheep import constants


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    address: str
    port: int
    zone: int
    vnodes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> NodeInfo:
        return cls(
            node_id=str(value["node_id"]), address=str(value["address"]),
            port=int(value["port"]), zone=int(value["zone"]), vnodes=int(value["vnodes"]))

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


def vnodes_for_weight(weight_bytes: int) -> int:
    """Vnodes in proportion to weight, one per vnode_weight_bytes, within bounds."""
    vnodes = weight_bytes // constants.vnode_weight_bytes
    return max(constants.vnodes_min, min(constants.vnodes_max, vnodes))


def zone_for_address(address: str, port: int) -> int:
    """The default zone: the node itself (a stable number from its address)."""
    import zlib

    return zlib.crc32(f"{address}:{port}".encode())


def from_member(peer: Any, members: Iterable[NodeInfo]) -> bool:
    """Whether a connection comes from a member's host, by its remote address (asyncio's
    peername, or what a simulated network supplies): until connections carry
    credentials, that is all the evidence there is. No address (a unix socket) is no
    member. A member's connections must leave from the address it advertises."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    host = _canonical_address(peer[0])
    return any(_canonical_address(node.address) == host for node in members)


def _canonical_address(address: str) -> str:
    """One spelling per address: 127.0.0.1 as itself and as ::ffff:127.0.0.1."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address  # a host name: compared as written
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)
