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


def crcs(data: bytes | bytearray | memoryview) -> list[int]:
    """The crc of every whole block of data."""
    view = memoryview(data)
    return [crc32c.crc32c(view[at:at + BLOCK])
            for at in range(0, len(view) - len(view) % BLOCK, BLOCK)]


def compute(data: bytes | bytearray | memoryview, first: int,
            sums: array.array[int]) -> None:
    """Set the entries of whole blocks of data that start at block ``first``."""
    found = crcs(data)
    sums[first:first + len(found)] = array.array("I", found)


def mismatches(found: list[int], first: int, sums: array.array[int]) -> list[int]:
    """The blocks from block ``first`` whose crc (of found) is not the one stored."""
    stored = sums[first:first + len(found)].tolist()
    if found == stored:
        return []
    return [first + index for index, (got, kept) in enumerate(zip(found, stored, strict=True))
            if got != kept]


def bad_blocks(data: bytes | bytearray | memoryview, first: int,
               sums: array.array[int]) -> list[int]:
    """The blocks of data (whole blocks from block ``first``) whose crc is not stored."""
    return mismatches(crcs(data), first, sums)


def not_zeros(sums: array.array[int], first: int, end: int) -> list[int]:
    """The blocks in [first, end) whose stored crc is not a zero block's: where a copy
    has a hole (which reads as zeros), these are damage."""
    if sums[first:end].count(ZERO_CRC) == end - first:
        return []
    return [block for block in range(first, end) if sums[block] != ZERO_CRC]


_zero_block = bytes(BLOCK)


def nonzero_runs(data: bytes | bytearray | memoryview, found: list[int]) -> list[tuple[int, int]]:
    """The [start, end) byte runs of data (whole blocks, whose crcs are found) that are
    not all zeros: a copy writes only these, so zeros stay holes. A block whose crc is
    a zero block's is compared with zeros before it is left out (the crc alone proves
    nothing), and only then: comparing every block costs more than its crc."""
    view = memoryview(data)
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for index, value in enumerate(found):
        at = index * BLOCK
        zero = value == ZERO_CRC and view[at:at + BLOCK].tobytes() == _zero_block
        if zero and start is not None:
            runs.append((start, at))
            start = None
        elif not zero and start is None:
            start = at
    if start is not None:
        runs.append((start, len(found) * BLOCK))
    return runs


def digest(sums: array.array[int]) -> int:
    """One number for a copy's contents: equal copies have equal digests."""
    return crc(sums.tobytes())
