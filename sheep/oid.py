"""Object ids: 64 bits = 4 bits type | 28 bits generation | 32 bits index.

The generation names the writable tree root (a VDI's current state, frozen at
a snapshot) that created the object; the index is the object's position in the
VDI for data objects, or a node number for tree nodes. With 4 MiB objects a VDI
addresses 2^32 objects = 16 PiB.
"""

from __future__ import annotations

import enum

from sheep import constants

TYPE_SHIFT = constants.generation_bits + constants.index_bits
GENERATION_SHIFT = constants.index_bits
GENERATION_MAX = (1 << constants.generation_bits) - 1
INDEX_MAX = (1 << constants.index_bits) - 1


class ObjectType(enum.IntEnum):
    RAW = 0  # objects written directly by clients (tests, benchmarks)
    DATA = 1
    TREE = 2
    INODE = 3
    ATTR = 4
    CHANGES = 5  # a generation's change pages (sheep/changes.py)


# The objects of a VDI's generations: their copies follow the VDI's, and stores
# refuse changes to them once their generation is frozen.
VDI_TYPES = frozenset({ObjectType.DATA, ObjectType.TREE, ObjectType.CHANGES})


def make_oid(kind: ObjectType, generation: int, index: int) -> int:
    assert 0 <= generation <= GENERATION_MAX, generation
    assert 0 <= index <= INDEX_MAX, index
    return (int(kind) << TYPE_SHIFT) | (generation << GENERATION_SHIFT) | index


def oid_type(oid: int) -> int:
    return oid >> TYPE_SHIFT


def oid_generation(oid: int) -> int:
    return (oid >> GENERATION_SHIFT) & GENERATION_MAX


def oid_index(oid: int) -> int:
    return oid & INDEX_MAX


def format_oid(oid: int) -> str:
    return f"{oid:016x}"
