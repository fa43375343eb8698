"""Radix-tree geometry and node format, sans-IO (Parallax's idea).

A VDI's tree maps an object index (32 bits) to the oid of the data object that
holds it. Every tree node is an object holding 1024 little-endian u64 entries
(8 KiB); an entry of 0 means "never written: reads as zeros". Level 1 nodes
point at data objects; a node at level l > 1 points at nodes of level l - 1.
The depth is the fewest levels that cover the VDI's objects: 1 up to 1024
objects (4 GiB with 4 MiB objects), 2 up to 4 TiB, 3 up to 4 PiB, 4 beyond.

Names are deterministic: the node of generation g at (level, position) is
oid(TREE, g, level << 28 | position), and the data object of index i written
in generation g is oid(DATA, g, i). So an entry's generation tells at once
whether the object belongs to the writable generation (write in place) or to
a frozen one (copy it first), and a copy's name needs no allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from sheep.oid import INDEX_MAX, ObjectType, make_oid, oid_generation, oid_index, oid_type

FANOUT_BITS = 10
FANOUT = 1 << FANOUT_BITS
ENTRY_BYTES = 8
NODE_BYTES = FANOUT * ENTRY_BYTES
DEPTH_MAX = 4
LEVEL_SHIFT = 28
POSITION_MAX = (1 << LEVEL_SHIFT) - 1

_node = struct.Struct(f"<{FANOUT}Q")
assert _node.size == NODE_BYTES
assert FANOUT_BITS * DEPTH_MAX >= 32, "four levels cover every 32-bit index"


def depth_for(objects: int) -> int:
    """Levels needed to address ``objects`` object indexes."""
    assert 0 <= objects <= INDEX_MAX + 1, objects
    depth = 1
    while (1 << (FANOUT_BITS * depth)) < objects:
        depth += 1
    return depth


def capacity(depth: int) -> int:
    """How many object indexes a tree of this depth addresses."""
    return min(1 << (FANOUT_BITS * depth), INDEX_MAX + 1)


def position(index: int, level: int) -> int:
    """The position of the level-``level`` node on the path to ``index``."""
    return index >> (FANOUT_BITS * level)


def slot(index: int, level: int) -> int:
    """The entry, inside the level-``level`` node, on the path to ``index``."""
    return (index >> (FANOUT_BITS * (level - 1))) & (FANOUT - 1)


def child_position(parent_position: int, entry: int) -> int:
    return (parent_position << FANOUT_BITS) | entry


def node_oid(generation: int, level: int, position_: int) -> int:
    assert 1 <= level <= DEPTH_MAX and 0 <= position_ <= POSITION_MAX, (level, position_)
    return make_oid(ObjectType.TREE, generation, (level << LEVEL_SHIFT) | position_)


def node_level(oid: int) -> int:
    return oid_index(oid) >> LEVEL_SHIFT


def node_position(oid: int) -> int:
    return oid_index(oid) & POSITION_MAX


def data_oid(generation: int, index: int) -> int:
    return make_oid(ObjectType.DATA, generation, index)


def is_tree(oid: int) -> bool:
    return oid_type(oid) == ObjectType.TREE


def is_data(oid: int) -> bool:
    return oid_type(oid) == ObjectType.DATA


def generation_of(oid: int) -> int:
    return oid_generation(oid)


def decode_node(data: bytes | bytearray | memoryview) -> list[int]:
    """A node's entries; a short or empty read is padded with zeros (never-written)."""
    if len(data) < NODE_BYTES:
        data = bytes(data) + bytes(NODE_BYTES - len(data))
    return list(_node.unpack_from(data, 0))


def encode_node(entries: list[int]) -> bytes:
    assert len(entries) == FANOUT
    return _node.pack(*entries)


def entry_bytes(oid: int) -> bytes:
    return oid.to_bytes(ENTRY_BYTES, "little")


def check_entry(parent_level: int, child: int) -> None:
    """An entry of a level-l node names a node of level l-1, or a data object at level 1."""
    if child == 0:
        return
    if parent_level == 1:
        assert is_data(child), f"leaf entry {child:016x} is not a data object"
    else:
        assert is_tree(child) and node_level(child) == parent_level - 1, (
            f"entry {child:016x} of a level-{parent_level} node is not a level-"
            f"{parent_level - 1} node")


@dataclass(frozen=True)
class Root:
    """A VDI's tree at one moment (sheep/vdi.py): its generation, its depth, and the
    root node of another generation it started from (0: an empty tree)."""

    generation: int
    depth: int
    base: int  # a root node oid of another generation, or 0 for an empty tree
    # Whether the generation's own root node was made (by its first write): recorded
    # in the cluster log, because "its holders did not answer" must never read as
    # "it was never made" (the engine would make it again from base, losing every
    # entry written since: found by the simulator). None: a state from before the
    # flag, where the engine asks the stores as it used to.
    made: bool | None = False

    def own(self) -> int:
        return node_oid(self.generation, self.depth, 0)

    def to_json(self) -> dict[str, Any]:
        return {"generation": self.generation, "depth": self.depth, "base": self.base,
                "made": self.made}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Root:
        made = value.get("made")
        return cls(int(value["generation"]), int(value["depth"]), int(value["base"]),
                   None if made is None else bool(made))
