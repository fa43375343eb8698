"""Per-block checksums: crc32c of every 4 KiB block of an object, sans-IO.

An object's checksums are one array of u32, one entry per block (1024 for a 4
MiB object), kept in the store's metadata beside its version. A block never
written is all zeros, and its entry is the crc of a zero block, so a fresh
object's array is that value repeated, and two copies with the same bytes have
the same array whatever their history: the array's own crc (the digest) tells
in one number whether two copies agree.
"""

from __future__ import annotations

import array

import crc32c

BLOCK = 4096


def crc(data: bytes | bytearray | memoryview) -> int:
    return crc32c.crc32c(data)


ZERO_CRC = crc(bytes(BLOCK))


def blocks(object_size: int) -> int:
    assert object_size % BLOCK == 0, object_size
    return object_size // BLOCK


def fresh(object_size: int) -> array.array[int]:
    """The checksums of an object of zeros."""
    return array.array("I", [ZERO_CRC]) * blocks(object_size)


def load(raw: bytes | None, object_size: int) -> array.array[int]:
    """Checksums as stored; an object without stored checksums is taken as zeros,
    so a copy whose metadata was lost fails verification where it holds data."""
    if raw is None:
        return fresh(object_size)
    sums = array.array("I")
    sums.frombytes(raw)
    if len(sums) != blocks(object_size):
        return fresh(object_size)
    return sums


def covering(offset: int, count: int) -> tuple[int, int]:
    """The first block and the block past the last one that [offset, offset+count) touches."""
    first = offset // BLOCK
    end = -(-(offset + count) // BLOCK) if count else first
    return first, end


def _crcs(data: bytes | bytearray | memoryview) -> list[int]:
    view = memoryview(data)
    return [crc32c.crc32c(view[at:at + BLOCK])
            for at in range(0, len(view) - len(view) % BLOCK, BLOCK)]


def compute(data: bytes | bytearray | memoryview, first: int,
            sums: array.array[int]) -> None:
    """Set the entries of whole blocks of data that start at block ``first``."""
    crcs = _crcs(data)
    sums[first:first + len(crcs)] = array.array("I", crcs)


def bad_blocks(data: bytes | bytearray | memoryview, first: int,
               sums: array.array[int]) -> list[int]:
    """The blocks of data (whole blocks from block ``first``) whose crc is not stored."""
    crcs = _crcs(data)
    stored = sums[first:first + len(crcs)].tolist()
    if crcs == stored:
        return []
    return [first + index for index, (got, kept) in enumerate(zip(crcs, stored, strict=True))
            if got != kept]


def digest(sums: array.array[int]) -> int:
    """One number for a copy's contents: equal copies have equal digests."""
    return crc(sums.tobytes())
