"""Snapshot diffs over in-memory objects: the tree plus change masks (sheep/changes.py,
sheep/vdi_changes.py, sheep/vdi_diff.py) give exactly what changed, at 4 KiB."""

from __future__ import annotations

import random

import pytest

from sheep import changes
from sheep.constants import KiB
from sheep.errors import InvalidParameters
from sheep.radix import Root
from sheep.vdi_changes import ChangeLog
from sheep.vdi_diff import diff
from sheep.vdi_registry import VdiRegistry
from tests.unit.test_vdi_engine import Harness

object_size = 64 * KiB


class Vdi:
    """A VDI as the registry and VdiService keep it: writes noted, snapshots saved."""

    def __init__(self, h: Harness, size: int) -> None:
        self.h = h
        self.size = size
        self.root = h.create(size)
        self.lineage: list[int] = []
        self.log = ChangeLog(h.objects, lambda: object_size)
        self.registry = VdiRegistry()
        self.snaps: dict[str, tuple[Root, list[int], bytes]] = {}

    async def write(self, offset: int, data: bytes) -> None:
        self.log.note(self.root.generation, offset, len(data))
        await self.h.engine.write(self.root, offset, data)

    async def discard(self, offset: int, count: int) -> None:
        self.log.note(self.root.generation, offset, count)
        await self.h.engine.discard(self.root, offset, count, self.size)

    async def snapshot(self, tag: str) -> None:
        await self.log.save(self.root.generation)
        frozen, self.root = await self.h.snapshot(self.root)
        self.snaps[tag] = (frozen, list(self.lineage), await self.h.engine.read(frozen, 0, self.size))
        self.lineage = [frozen.generation, *self.lineage]

    async def ranges(self, since: str | None, to: str) -> list[list]:
        root, lineage, _ = self.snaps[to]
        found: list[list] = []
        step = 4 * object_size  # several windows, as dog asks
        for offset in range(0, self.size, step):
            found += await diff(self.h.engine, self.h.objects, self.registry, object_size, root,
                                lineage, self.size, self.snaps[since][0] if since else None,
                                offset, step)
        return found


def apply(base: bytes, target: bytes, ranges: list[list]) -> bytes:
    out = bytearray(base)
    for offset, length, kind in ranges:
        out[offset:offset + length] = target[offset:offset + length] if kind == "data" else bytes(length)
    return bytes(out)


async def test_a_diff_holds_the_changed_blocks_only():
    h = Harness(object_size)
    v = Vdi(h, 16 * object_size)
    await v.write(0, random.randbytes(8 * object_size))
    await v.snapshot("s1")
    await v.write(5, b"x")  # one block of object 0
    await v.write(3 * object_size - 100, b"y" * 200)  # across objects 2 and 3
    await v.write(10 * object_size, random.randbytes(8192))  # a new object
    await v.discard(5 * object_size, object_size)  # a whole object, dropped
    await v.write(6 * object_size + 4096, bytes(4096))  # zeros written
    await v.snapshot("s2")
    ranges = await v.ranges("s1", "s2")
    assert apply(v.snaps["s1"][2], v.snaps["s2"][2], ranges) == v.snaps["s2"][2]
    data = sum(length for _, length, kind in ranges if kind == "data")
    assert data == 4096 + 2 * 4096 + 8192
    zeros = [(offset, length) for offset, length, kind in ranges if kind == "zero"]
    # The dropped object, and the block of zeros written, where s1 had data.
    assert zeros == [(5 * object_size, object_size), (6 * object_size + 4096, 4096)]
    # Nothing from unchanged objects: the ranges lie in objects 0, 2, 3, 5, 6, 10.
    touched = {index for offset, length, _ in ranges
               for index in range(offset // object_size, (offset + length - 1) // object_size + 1)}
    assert touched == {0, 2, 3, 5, 6, 10}


@pytest.mark.parametrize("seed", range(6))
async def test_random_histories_diff_exactly(seed: int):
    rng = random.Random(seed)
    h = Harness(object_size)
    v = Vdi(h, 24 * object_size - 4096)  # a partial last object
    for step in range(5):
        for _ in range(rng.randrange(1, 12)):
            offset = rng.randrange(v.size)
            length = min(rng.choice([1, 512, 4096, 5000, object_size, 3 * object_size]),
                         v.size - offset)
            if rng.random() < 0.25:
                await v.discard(offset, length)
            elif rng.random() < 0.2:
                await v.write(offset, bytes(length))
            else:
                await v.write(offset, rng.randbytes(length))
        await v.snapshot(f"s{step}")
    for since in (None, "s0", "s1", "s3"):
        for to in ("s1", "s3", "s4"):
            if since is not None and int(since[1:]) > int(to[1:]):
                continue
            ranges = await v.ranges(since, to)
            base = v.snaps[since][2] if since else bytes(v.size)
            assert apply(base, v.snaps[to][2], ranges) == v.snaps[to][2], (since, to)
            ends = [offset + length for offset, length, _ in ranges]
            assert all(end <= v.size for end in ends)
            assert [r[0] for r in ranges] == sorted(r[0] for r in ranges)


async def test_untracked_generations_send_whole_objects():
    h = Harness(object_size)
    v = Vdi(h, 8 * object_size)
    await v.write(0, random.randbytes(2 * object_size))
    await v.snapshot("s1")
    await v.write(100, b"z")
    v.registry.untracked.add(v.root.generation)  # its writer died before saving
    v.log.forget(v.root.generation)
    await v.snapshot("s2")
    ranges = await v.ranges("s1", "s2")
    assert ranges == [[0, object_size, "data"]]  # object 0 whole, object 1 untouched
    assert apply(v.snaps["s1"][2], v.snaps["s2"][2], ranges) == v.snaps["s2"][2]


async def test_from_a_later_snapshot_is_refused():
    h = Harness(object_size)
    v = Vdi(h, 4 * object_size)
    await v.write(0, b"a")
    await v.snapshot("s1")
    await v.write(0, b"b")
    await v.snapshot("s2")
    with pytest.raises(InvalidParameters, match="not an earlier state"):
        await v.ranges("s2", "s1")


def test_masks_and_pages():
    assert changes.mask(0, 1) == 1
    assert changes.mask(4095, 2) == 0b11
    assert changes.masks_of_range(object_size - 1, 2, object_size) == {0: 1 << 15, 1: 1}
    assert changes.runs(0b1110011) == [(0, 2), (4, 3)]
    page = changes.encode_page({0: 5, 63: changes.whole(object_size)}, object_size)
    assert changes.decode_page(page, object_size) == {0: 5, 63: changes.whole(object_size)}
    assert changes.decode_page(page[:3], object_size) == {0: 5}


async def test_a_diff_costs_the_changed_objects_not_the_written_ones():
    """Design goal of issue #17: a diff costs O(changed objects) and never reads
    data. Two VDIs with the same two objects changed between the snapshots, one with
    16 objects of data and one with 256: the diff asks the stores the same number of
    times, and never reads a data object."""
    from sheep import radix
    from sheep.vdi import VdiEngine
    from tests.unit.test_vdi_engine import Counting

    costs = []
    for written in (16, 256):
        h = Harness(object_size)
        v = Vdi(h, 512 * object_size)
        for index in range(written):
            await v.write(index * object_size, b"d" * 8192)
        await v.snapshot("s1")
        await v.write(3 * object_size + 5, b"x")
        await v.write(9 * object_size, b"y" * 4096)
        await v.snapshot("s2")
        counting = Counting(h.objects)
        engine = VdiEngine(counting, object_size, h.engine.is_frozen)
        root, lineage, image = v.snaps["s2"]
        ranges = await diff(engine, counting, v.registry, object_size, root, lineage, v.size,
                            v.snaps["s1"][0], 0, v.size)
        assert apply(v.snaps["s1"][2], image, ranges) == image
        assert sum(length for _, length, kind in ranges if kind == "data") == 2 * 4096
        reads = counting.read_oids  # tree nodes only
        assert reads and not [oid for oid in reads if radix.is_data(oid)], reads
        costs.append(counting.calls)
    assert costs[0] == costs[1] and costs[0] > 0, costs
