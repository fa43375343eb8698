"""The VDI engine over in-memory objects: copy-on-write, holes, discard, growth, concurrency.

Each test plays the registry's part by hand: a set of writable generations, and
snapshot/clone as "resolve the root node, start a new generation from it".
The store refuses writes to frozen generations, as real stores do.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from sheep import radix
from sheep.constants import KiB, MiB, PiB
from sheep.testing.memory import FencedObjects
from sheep.vdi import Extent, Root, VdiEngine

object_size = 64 * KiB


class Harness:
    def __init__(self, object_size: int = object_size) -> None:
        self.writable: set[int] = set()
        self.objects = FencedObjects(object_size, self.writable.__contains__)
        self.engine = VdiEngine(self.objects, object_size, lambda g: g not in self.writable)
        self.next_generation = 1

    def create(self, size: int) -> Root:
        root = Root(self.next_generation, radix.depth_for(-(-size // self.objects.object_size)), 0)
        self.writable.add(root.generation)
        self.next_generation += 1
        return root

    async def branch(self, frozen: Root) -> Root:
        """A new writable generation starting from ``frozen``'s tree (a clone)."""
        root = Root(self.next_generation, frozen.depth, await self.engine.root_node(frozen))
        self.writable.add(root.generation)
        self.next_generation += 1
        return root

    async def snapshot(self, root: Root) -> tuple[Root, Root]:
        """(the frozen snapshot, the VDI's new writable root)."""
        new = await self.branch(root)
        self.writable.discard(root.generation)
        return root, new


def pattern(length: int, seed: int) -> bytes:
    return bytes((seed + i * 7) % 251 for i in range(length))


async def test_write_in_a_fresh_vdi():
    h = Harness()
    root = h.create(4 * MiB)
    assert h.objects.data == {}, "a fresh VDI holds no space"
    await h.engine.write(root, 100, b"hello")
    assert await h.engine.read(root, 0, 110) == bytes(100) + b"hello" + bytes(5)
    assert set(h.objects.data) == {root.own(), radix.data_oid(root.generation, 0)}
    assert await h.engine.read(root, object_size, 10) == bytes(10)


async def test_write_crossing_objects():
    h = Harness()
    root = h.create(1 * MiB)
    data = pattern(3 * object_size, 1)
    await h.engine.write(root, object_size // 2, data)
    assert await h.engine.read(root, object_size // 2, len(data)) == data
    data_objects = {oid for oid in h.objects.data if radix.is_data(oid)}
    assert data_objects == {radix.data_oid(root.generation, i) for i in range(4)}


async def test_copy_up_after_snapshot_leaves_the_snapshot_intact():
    h = Harness()
    root = h.create(1 * MiB)
    old = pattern(2 * object_size, 3)
    await h.engine.write(root, 0, old)
    snap, root = await h.snapshot(root)
    await h.engine.write(root, 10, b"new")
    assert await h.engine.read(snap, 0, len(old)) == old
    expect = bytearray(old)
    expect[10:13] = b"new"
    assert await h.engine.read(root, 0, len(old)) == expect
    # Copy-up copied object 0 whole; object 1 is still shared.
    assert await h.engine.lookup(root, 0) == radix.data_oid(root.generation, 0)
    assert await h.engine.lookup(root, 1) == radix.data_oid(snap.generation, 1)
    assert await h.engine.root_node(snap) == snap.own()
    assert await h.engine.root_node(root) == root.own()


async def test_snapshot_of_an_unwritten_vdi():
    h = Harness()
    root = h.create(1 * MiB)
    snap, root = await h.snapshot(root)
    assert root.base == 0 and h.objects.data == {}
    await h.engine.write(root, 0, b"x")
    assert await h.engine.read(snap, 0, 1) == b"\0"
    assert await h.engine.read(root, 0, 1) == b"x"
    assert all(radix.generation_of(oid) == root.generation for oid in h.objects.data)


async def test_snapshot_is_o1_and_unwritten_generation_reads_its_base():
    h = Harness()
    root = h.create(1 * MiB)
    await h.engine.write(root, 0, b"abc")
    before = dict(h.objects.data)
    snap, root = await h.snapshot(root)
    assert h.objects.data.keys() == before.keys(), "a snapshot copies nothing"
    assert root.base == snap.own()
    assert await h.engine.root_node(root) == snap.own()
    assert await h.engine.read(root, 0, 3) == b"abc"


async def test_clone_reads_the_snapshot_and_diverges():
    h = Harness()
    root = h.create(1 * MiB)
    await h.engine.write(root, 0, pattern(object_size + 5, 9))
    snap, root = await h.snapshot(root)
    clone = await h.branch(snap)
    assert await h.engine.read(clone, 0, object_size + 5) == pattern(object_size + 5, 9)
    await h.engine.write(clone, 1, b"clone")
    await h.engine.write(root, 1, b"vdi!!")
    assert await h.engine.read(clone, 0, 7) == pattern(1, 9) + b"clone" + pattern(7, 9)[6:]
    assert await h.engine.read(root, 1, 5) == b"vdi!!"
    assert await h.engine.read(snap, 0, object_size + 5) == pattern(object_size + 5, 9)


async def test_discard_frees_whole_objects():
    h = Harness()
    root = h.create(1 * MiB)
    await h.engine.write(root, 0, pattern(3 * object_size, 2))
    await h.engine.discard(root, object_size, object_size)
    assert radix.data_oid(root.generation, 1) not in h.objects.data
    assert await h.engine.lookup(root, 1) == 0
    assert await h.engine.read(root, object_size, object_size) == bytes(object_size)
    # A partial discard zeroes in place and keeps the object.
    await h.engine.discard(root, 10, 20)
    assert radix.data_oid(root.generation, 0) in h.objects.data
    assert await h.engine.read(root, 0, 40) == pattern(10, 2) + bytes(20) + pattern(40, 2)[30:]
    # Discarding an unwritten range allocates nothing.
    before = set(h.objects.data)
    await h.engine.discard(root, 5 * object_size, 3 * object_size)
    assert set(h.objects.data) == before


async def test_discard_of_a_frozen_object_clears_the_entry_and_keeps_the_snapshot():
    h = Harness()
    root = h.create(1 * MiB)
    await h.engine.write(root, 0, pattern(2 * object_size, 4))
    snap, root = await h.snapshot(root)
    await h.engine.discard(root, 0, object_size)
    await h.engine.discard(root, object_size + 1, 1)
    assert await h.engine.lookup(root, 0) == 0
    assert radix.data_oid(snap.generation, 0) in h.objects.data
    assert await h.engine.read(snap, 0, 2 * object_size) == pattern(2 * object_size, 4)
    expect = bytearray(pattern(2 * object_size, 4))
    expect[:object_size] = bytes(object_size)
    expect[object_size + 1] = 0
    assert await h.engine.read(root, 0, 2 * object_size) == expect


async def test_extents_report_holes():
    h = Harness()
    root = h.create(1 * MiB)
    await h.engine.write(root, object_size + 3, b"x")
    await h.engine.write(root, 3 * object_size, b"y")
    extents = await h.engine.extents(root, 100, 4 * object_size)
    # At 4 KiB: each written byte's block is data, the rest of its object a hole.
    assert extents == [
        Extent(100, object_size - 100, False),
        Extent(object_size, 4096, True),
        Extent(object_size + 4096, 2 * object_size - 4096, False),
        Extent(3 * object_size, 4096, True),
        Extent(3 * object_size + 4096, object_size - 4096 + 100, False),
    ]


class Counting:
    """Counts the store calls an engine makes (reads, existence checks, maps)."""

    def __init__(self, objects: object) -> None:
        self.objects = objects
        self.calls = 0
        self.read_oids: list[int] = []

    def __getattr__(self, name: str) -> object:
        method = getattr(self.objects, name)
        if name not in ("read", "exists", "data_map"):
            return method

        async def counted(*args: object) -> object:
            self.calls += 1
            if name == "read":
                self.read_oids.append(int(args[0]))  # type: ignore[call-overload]
            return await method(*args)

        return counted


@pytest.mark.parametrize("chain", [1, 100])
async def test_block_status_costs_the_data_not_the_size(chain):
    """A VDI with 3 bytes written, a snapshot and a clone (or 100 of each, one on
    top of another): block status asks the stores as often at 64 GiB as at 4 TiB
    (the same depth; issue #18: it used to look up every object of the range)."""
    calls = []
    for size in (64 << 30, 4 << 40):
        h = Harness(4 * MiB)
        root = h.create(size)
        await h.engine.write(root, 0, b"abc")
        for _ in range(chain):
            snap, root = await h.snapshot(root)
            root = await h.branch(snap)
        engine = VdiEngine(Counting(h.objects), 4 * MiB, h.engine.is_frozen)
        extents = await engine.extents(root, 0, size)
        assert extents == [Extent(0, 4096, True), Extent(4096, size - 4096, False)]
        calls.append(engine.objects.calls)
    assert calls[0] == calls[1] <= 8, calls


async def test_copy_up_copies_only_allocated_blocks():
    h = Harness()
    root = h.create(1 * MiB)
    await h.engine.write(root, 0, b"a" * 4096)
    await h.engine.write(root, 8 * 4096 + 10, b"b" * 5000)
    snap, root = await h.snapshot(root)
    await h.engine.write(root, 12 * 4096 - 1, b"c" * 2)  # crosses into a hole block
    copy = h.objects.data[radix.data_oid(root.generation, 0)]
    expect = bytearray(object_size)
    expect[:4096] = b"a" * 4096
    expect[8 * 4096 + 10:8 * 4096 + 5010] = b"b" * 5000
    expect[12 * 4096 - 1:12 * 4096 + 1] = b"cc"
    assert copy == expect
    assert h.objects.sparse_creates == 1
    extents = await h.engine.extents(root, 0, object_size)
    assert [(e.offset, e.length) for e in extents if e.allocated] == [
        (0, 4096), (8 * 4096, 2 * 4096), (11 * 4096, 2 * 4096)]


async def test_one_pib_vdi_written_at_its_last_byte_uses_depth_plus_one_objects():
    h = Harness(4 * MiB)
    size = 1 * PiB
    root = h.create(size)
    assert root.depth == 3
    await h.engine.write(root, size - 1, b"\xff")
    assert len(h.objects.data) == root.depth + 1
    assert await h.engine.read(root, size - 2, 2) == b"\0\xff"
    assert await h.engine.read(root, 0, 16) == bytes(16)


async def test_grow_keeps_the_data_and_extends_the_tree():
    h = Harness()
    root = h.create(1 * MiB)
    await h.engine.write(root, 0, b"before")
    snap, root = await h.snapshot(root)
    grown = await h.engine.grow(root, 3)
    assert grown.depth == 3 and grown.generation == root.generation
    assert await h.engine.read(grown, 0, 6) == b"before"
    far = 1025 * 1024 * object_size  # past what depth 2 addresses
    await h.engine.write(grown, far, b"far")
    await h.engine.write(grown, 0, b"after")
    assert await h.engine.read(grown, far, 3) == b"far"
    assert await h.engine.read(grown, 0, 6) == b"aftere"
    assert await h.engine.read(snap, 0, 6) == b"before"
    reached = await h.engine.walk(await h.engine.root_node(grown))
    assert reached <= set(h.objects.data)


async def test_concurrent_writes_to_one_new_object_all_land():
    h = Harness()
    root = h.create(1 * MiB)
    writes = [(i * 1000, pattern(700, i)) for i in range(40)]
    await asyncio.gather(*(h.engine.write(root, offset, data) for offset, data in writes))
    for offset, data in writes:
        assert await h.engine.read(root, offset, len(data)) == data


async def test_concurrent_writes_under_one_new_leaf_all_land():
    h = Harness()
    root = h.create(256 * MiB)  # depth 2: every write also makes the path
    assert root.depth == 2
    writes = [(i * object_size + i, pattern(300, i)) for i in range(0, 1024, 37)]
    await asyncio.gather(*(h.engine.write(root, offset, data) for offset, data in writes))
    for offset, data in writes:
        assert await h.engine.read(root, offset, len(data)) == data
    leaves = [oid for oid in h.objects.data if radix.is_tree(oid) and radix.node_level(oid) == 1]
    assert len(leaves) == 1


async def test_concurrent_copy_ups_after_a_snapshot_all_land():
    h = Harness()
    root = h.create(256 * MiB)
    old = pattern(4 * object_size, 5)
    await h.engine.write(root, 0, old)
    snap, root = await h.snapshot(root)
    writes = [(i * 5000, pattern(100, i)) for i in range(50)]
    await asyncio.gather(*(h.engine.write(root, offset, data) for offset, data in writes))
    expect = bytearray(old)
    for offset, data in writes:
        expect[offset:offset + len(data)] = data
    assert await h.engine.read(root, 0, len(old)) == expect
    assert await h.engine.read(snap, 0, len(old)) == old


async def test_garbage_of_a_deleted_snapshot_spares_what_the_vdi_shares():
    h = Harness()
    root = h.create(1 * MiB)
    await h.engine.write(root, 0, pattern(2 * object_size, 6))
    snap, root = await h.snapshot(root)
    await h.engine.write(root, 0, b"changed")
    dead = [await h.engine.root_node(snap)]
    live = [await h.engine.root_node(root)]
    garbage = await h.engine.garbage(dead, live)
    assert garbage == {snap.own(), radix.data_oid(snap.generation, 0)}
    for oid in garbage:
        await h.objects.remove(oid)
    h.engine.forget(garbage)
    assert await h.engine.read(root, object_size, object_size) == pattern(
        2 * object_size, 6)[object_size:]
    assert set(h.objects.data) == await h.engine.walk(live[0])


async def test_a_deleted_snapshot_still_shared_is_freed_once_the_vdi_copies_it_away():
    """The snapshot's objects outlive its delete (the VDI reads them through its
    base); the write that copies them away releases them to the next GC."""
    h = Harness(object_size)
    root = h.create(256 * MiB)
    await h.engine.write(root, 0, pattern(2 * object_size, 8))
    snap, root = await h.snapshot(root)
    shared = set(h.objects.data)
    assert await h.engine.garbage([await h.engine.root_node(snap)],
                                  [await h.engine.root_node(root)]) == set()
    await h.engine.write(root, 5, b"copy")  # copies the root, the leaf and object 0
    live = await h.engine.root_node(root)
    garbage = await h.engine.garbage([], [live])
    assert garbage == {snap.own(), radix.node_oid(snap.generation, 1, 0),
                       radix.data_oid(snap.generation, 0)}
    for oid in garbage:
        await h.objects.remove(oid)
    h.engine.forget(garbage)
    assert set(h.objects.data) == await h.engine.walk(live)
    assert radix.data_oid(snap.generation, 1) in shared & set(h.objects.data)
    await h.engine.discard(root, object_size, object_size)  # drops the last shared object
    assert await h.engine.garbage([], [live]) == {radix.data_oid(snap.generation, 1)}


async def test_released_objects_a_live_snapshot_holds_are_not_garbage():
    h = Harness()
    root = h.create(1 * MiB)
    await h.engine.write(root, 0, b"a")
    snap, root = await h.snapshot(root)
    await h.engine.write(root, 0, b"b")
    live = [await h.engine.root_node(snap), await h.engine.root_node(root)]
    assert await h.engine.garbage([], live) == set()
    assert await h.engine.read(snap, 0, 1) == b"a"


@pytest.mark.parametrize("depth", [1, 2, 3])
async def test_walk_finds_every_node_and_data_object(depth):
    h = Harness()
    root = Root(1, depth, 0)
    h.writable.add(1)
    await h.engine.write(root, 0, b"a")
    await h.engine.write(root, (1024 ** (depth - 1)) * object_size * 3 // 2, b"b")
    assert await h.engine.walk(root.own()) == set(h.objects.data)


async def test_discard_to_the_end_frees_a_partial_last_object():
    h = Harness()
    size = 2 * object_size + 1000  # the last object covers only 1000 bytes of the VDI
    root = h.create(size)
    await h.engine.write(root, 2 * object_size, b"tail")
    last = radix.data_oid(root.generation, 2)
    assert last in h.objects.data
    await h.engine.discard(root, 2 * object_size, 1000)  # without the size: kept, zeroed
    assert last in h.objects.data
    await h.engine.write(root, 2 * object_size, b"tail")
    await h.engine.discard(root, 2 * object_size, 1000, size)
    assert last not in h.objects.data
    assert await h.engine.read(root, 2 * object_size, 1000) == bytes(1000)


async def test_discards_racing_writes_neither_fail_nor_leak():
    h = Harness()
    root = h.create(4 * object_size)
    await h.engine.write(root, 0, pattern(4 * object_size, 1))
    rng = random.Random(3)
    jobs = []
    for _ in range(60):
        index = rng.randrange(4)
        if rng.random() < 0.5:
            jobs.append(h.engine.discard(root, index * object_size, object_size))
        else:
            jobs.append(h.engine.write(root, index * object_size + 10, b"x" * 100))
    await asyncio.gather(*jobs)
    reachable = await h.engine.walk(await h.engine.root_node(root))
    assert set(h.objects.data) == reachable, "every stored object is in the tree"


async def test_an_unanswered_own_root_is_never_made_again_from_base():
    """Once a generation's own root node is recorded as made (Root.made), the engine
    never asks the stores whether it exists: holders that do not answer (both down)
    must not read as "never made", or a write would make it again from base and lose
    every entry written since (found by the simulator). Until it is recorded, base is
    in effect, and making it is recorded before any entry goes in."""
    made: list[Root] = []
    harness = Harness()

    async def record(root: Root) -> None:
        made.append(root)

    harness.engine.on_root_made = record
    root = harness.create(4 * object_size)
    await harness.engine.write(root, 0, b"first")
    assert made == [root]
    recorded = Root(root.generation, root.depth, root.base, made=True)

    class Silent:  # every holder of the own root is gone: reads fail as absent
        async def exists(self, oid: int) -> bool:
            return False

    fresh = VdiEngine(harness.objects, object_size, lambda g: g not in harness.writable,
                      record)
    fresh.objects.exists = Silent().exists  # type: ignore[method-assign]
    assert await fresh.root_node(recorded) == root.own()
    await fresh.write(recorded, object_size, b"second")
    assert made == [root]  # not made again
    assert await fresh.read(recorded, 0, 5) == b"first"
    other = VdiEngine(harness.objects, object_size, lambda g: g not in harness.writable,
                      record)
    other.objects.exists = Silent().exists  # type: ignore[method-assign]
    unrecorded = Root(root.generation, root.depth, 0, made=False)
    assert await other.root_node(unrecorded) == 0  # base (an empty tree), stores not asked


async def test_truncate_cuts_whole_subtrees_by_one_entry_and_copies_a_frozen_tail_up_short():
    """A shrink of a depth-2 tree: the leaf wholly past the end goes with its one entry;
    in the leaf that straddles the end, the objects past it are cut, and the object
    with the end in it keeps only its head (a frozen one is copied up without its tail,
    taking no space there). The snapshot before keeps all of its data."""
    h = Harness()
    root = h.create(2000 * object_size)  # depth 2: leaves 0 and 1
    old = pattern(4 * object_size, 9)
    await h.engine.write(root, 0, old)
    await h.engine.write(root, 1500 * object_size, b"far")  # in leaf 1
    snap, root = await h.snapshot(root)
    await h.engine.write(root, 3 * object_size, b"mine")  # its own copy of object 3
    size = object_size + 5000  # the end falls inside object 1, in its second block
    cut = await h.engine.truncate(root, size)
    leaf_1 = radix.node_oid(snap.generation, 1, 1)
    own = radix.data_oid(root.generation, 3)
    assert set(cut) == {radix.data_oid(snap.generation, 2), own, leaf_1}
    live = [await h.engine.root_node(snap), await h.engine.root_node(root)]
    assert await h.engine.garbage(cut, live) == {own}, "the snapshot keeps the rest"
    assert await h.engine.read(root, 0, size) == old[:size]
    tail = radix.data_oid(root.generation, 1)
    assert bytes(h.objects.data[tail][5000:]) == bytes(object_size - 5000)
    assert await h.objects.data_map(tail) == 0b11, "its head's two blocks, no more"
    assert await h.engine.read(snap, 0, len(old)) == old
    assert await h.engine.read(snap, 1500 * object_size, 3) == b"far"
    assert await h.engine.truncate(root, size) == [], "done again, nothing more to cut"
