"""Which blocks of a VDI's objects a generation changed: change maps, sans-IO.

A snapshot diff (dog vdi export-diff) must say what changed between two snapshots
without reading what did not. The tree says which objects changed (an entry of a
generation newer than the older snapshot); this says which 4 KiB blocks inside each.

- A *mask* is an int with bit b set when block b of the object (bytes b*4096 up to
  (b+1)*4096) was written, zeroed or discarded in the generation.
- The lock holder's sheep collects the masks of the writable generation in memory
  (VdiService), and saves them, ORed into what is saved already, in *change pages*:
  objects oid(CHANGES, generation, page), each holding the masks of PAGE_OBJECTS
  consecutive object indexes, before anything can depend on them being complete (a
  snapshot freezing the generation, a lock handed over, a VDI closed).
- A generation whose masks may be incomplete (its holder's sheep died, or its lock
  was taken away by force, before it saved them) is *untracked* in the registry;
  a diff across it treats every changed object as changed whole (its data blocks).
"""

from __future__ import annotations

import array

from sheep.oid import INDEX_MAX, ObjectType, make_oid

BLOCK = 4096  # the granularity of change maps, allocation maps and diffs
PAGE_OBJECTS = 64  # object indexes whose masks one change page holds


def blocks(object_size: int) -> int:
    return object_size // BLOCK


def record_bytes(object_size: int) -> int:
    """Bytes of one object's mask in a page (one bit per block)."""
    return -(-blocks(object_size) // 8)


def page_bytes(object_size: int) -> int:
    return PAGE_OBJECTS * record_bytes(object_size)


def directory_oid(generation: int) -> int:
    """The generation's page directory: the numbers of the pages it has, so that they
    can be found and freed when the generation dies (no page number reaches it)."""
    return make_oid(ObjectType.CHANGES, generation, INDEX_MAX)


def encode_directory(pages: set[int]) -> bytes:
    return array.array("I", sorted(pages)).tobytes()


def decode_directory(data: bytes | bytearray | memoryview) -> set[int]:
    """Page numbers; the zeros past the end of the written part are not pages (page 0
    is listed first when present, and numbers are kept sorted)."""
    raw = bytes(data)
    values = array.array("I")
    values.frombytes(raw[:len(raw) // 4 * 4])
    found: set[int] = set()
    last = -1
    for value in values:
        if value <= last:
            break  # sorted and unique: what follows is the zeros past the end
        found.add(value)
        last = value
    return found


def page_oid(generation: int, index: int) -> int:
    """The change page holding object ``index``'s mask in ``generation``."""
    return make_oid(ObjectType.CHANGES, generation, index // PAGE_OBJECTS)


def mask(offset: int, count: int) -> int:
    """The blocks touched by bytes [offset, offset + count) of one object."""
    if count <= 0:
        return 0
    first = offset // BLOCK
    end = -(-(offset + count) // BLOCK)
    return ((1 << (end - first)) - 1) << first


def whole(object_size: int) -> int:
    return (1 << blocks(object_size)) - 1


def masks_of_range(offset: int, count: int, object_size: int) -> dict[int, int]:
    """{object index: mask} for bytes [offset, offset + count) of a VDI."""
    found: dict[int, int] = {}
    end = offset + count
    while offset < end:
        index, inner = divmod(offset, object_size)
        step = min(object_size - inner, end - offset)
        found[index] = found.get(index, 0) | mask(inner, step)
        offset += step
    return found


def encode_page(masks: dict[int, int], object_size: int) -> bytes:
    """A page from {slot (index % PAGE_OBJECTS): mask}."""
    size = record_bytes(object_size)
    out = bytearray(page_bytes(object_size))
    for slot, value in masks.items():
        assert 0 <= slot < PAGE_OBJECTS, slot
        out[slot * size:(slot + 1) * size] = value.to_bytes(size, "little")
    return bytes(out)


def decode_page(data: bytes | bytearray | memoryview, object_size: int) -> dict[int, int]:
    """{slot: mask} of a page's non-empty records; a short page reads as zeros past
    its end, a record's bits past the object's blocks are ignored."""
    size = record_bytes(object_size)
    limit = whole(object_size)
    found: dict[int, int] = {}
    view = bytes(data)
    for slot in range(PAGE_OBJECTS):
        value = int.from_bytes(view[slot * size:(slot + 1) * size], "little") & limit
        if value:
            found[slot] = value
    return found


def runs(value: int) -> list[tuple[int, int]]:
    """The (first block, count) runs of set bits of a mask, in order."""
    found: list[tuple[int, int]] = []
    block = 0
    while value:
        skip = (value & -value).bit_length() - 1
        value >>= skip
        block += skip
        length = (~value & (value + 1)).bit_length() - 1
        found.append((block, length))
        value >>= length
        block += length
    return found


def count(value: int) -> int:
    return bin(value).count("1")
