"""A node's identity as the cluster sees it: id, address, failure domains and weight.

The node id is "host:port/<random>" where the random part is made at the
store's first start and kept in the store, so a sheep restarted on the same
directory is the same node, and two stores on one address are never confused.
"""

from __future__ import annotations

import functools
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
    zone: int  # the host: copies of an object are on distinct hosts
    weight: int  # bytes; placement gives the node copies in proportion; 0: none
    rack: int | None = None  # the rack above the host; None: the host is its own rack
    base_weight: int = 0  # the weight the sheep started with (-w, or its free space)
    # Set only in records from before weights (an epoch placed by sheep/legacy_ring.py).
    vnodes: int | None = None

    def to_json(self) -> dict[str, Any]:
        value = asdict(self)
        if self.vnodes is None:
            del value["vnodes"]
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> NodeInfo:
        if "weight" in value:
            weight = int(value["weight"])
        else:  # an epoch log from before weights: a vnode stood for 256 MiB
            weight = int(value["vnodes"]) * legacy_vnode_bytes
        rack, vnodes = value.get("rack"), value.get("vnodes")
        return cls(
            node_id=str(value["node_id"]), address=str(value["address"]),
            port=int(value["port"]), zone=int(value["zone"]), weight=weight,
            rack=None if rack is None else int(rack),
            base_weight=int(value.get("base_weight", weight)),
            vnodes=None if vnodes is None else int(vnodes))

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


legacy_vnode_bytes = 256 * constants.MiB


def parse_domain(text: str) -> tuple[int | None, int]:
    """(rack, host) from sheep -z: HOST, or RACK/HOST; each 0 to zones_max."""
    parts = text.strip().split("/")
    if len(parts) > 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"{text!r} is not HOST or RACK/HOST (whole numbers)")
    numbers = [int(part) for part in parts]
    for number in numbers:
        if number > constants.zones_max:
            raise ValueError(f"{number} is above {constants.zones_max}")
    return (numbers[0], numbers[1]) if len(numbers) == 2 else (None, numbers[0])


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


@functools.lru_cache(maxsize=1024)
def _canonical_address(address: str) -> str:
    """One spelling per address: 127.0.0.1 as itself and as ::ffff:127.0.0.1. Cached:
    every peer request asks it of its sender and of each member (15 us a request
    on a replica, parsed anew each time)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address  # a host name: compared as written
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)
