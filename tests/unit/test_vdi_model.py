"""VDIs against a model: the registry and the engine driven as the gateway drives them.

A hypothesis state machine creates, writes, discards, snapshots, clones, rolls
back, grows, shrinks and deletes VDIs and snapshots in a VdiRegistry and a VdiEngine
over in-memory objects, and mirrors each step in a model where a disk is a
size and a dict of object index -> contents (an index is present exactly when
the engine should hold a data object for it: written, and not since discarded
whole). After every step:

- every VDI and snapshot reads back as the model says (all of it when small,
  every written object plus the ends when large);
- the data objects reachable from each root are exactly the model's indexes;
- nothing dangles: every object a live root reaches is stored;
- after every GC (which follows each delete, rollback and shrink, and also runs on
  its own now and then), the store holds exactly the objects the live roots reach.
  Between GCs an object can be unreachable only if the engine knows it released
  it (a write copied it away from a tree that was its last reader).
- the registry checks itself and survives a JSON round trip.

The store fails any write to an object of a frozen generation (the fencing the
real stores do), and yields to the event loop on every call so the pieces of
one write really run concurrently.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sheep import radix
from sheep.constants import GiB, KiB, MiB
from sheep.errors import Result
from sheep.oid import oid_index
from sheep.testing.memory import FencedObjects
from sheep.vdi import Root, VdiEngine
from sheep.vdi_registry import Outcome, VdiRegistry, vdi_size_max

object_size = 64 * KiB
whole_read_max_bytes = 1 * MiB  # disks up to this size are read whole after every step
disks_max = 14  # VDIs plus snapshots alive at once
write_max_bytes = 3 * object_size + 1000
depth2_size = 1024 * object_size  # the smallest size past depth 1 is this + 1
depth3_size = 1024 * 1024 * object_size
depth4_size = 1024 * depth3_size
size_max = vdi_size_max(object_size)  # 256 TiB: depth 4

T = TypeVar("T")


class Disk:
    """The model of one VDI or snapshot."""

    zeros = bytes(object_size)

    def __init__(self, size: int, blocks: dict[int, bytes] | None = None) -> None:
        self.size = size
        self.blocks = dict(blocks or {})

    def copy(self) -> Disk:
        return Disk(self.size, self.blocks)

    @staticmethod
    def pieces(offset: int, length: int) -> list[tuple[int, int, int]]:
        pieces = []
        end = offset + length
        while offset < end:
            index, inner = divmod(offset, object_size)
            count = min(object_size - inner, end - offset)
            pieces.append((index, inner, count))
            offset += count
        return pieces

    def write(self, offset: int, data: bytes) -> None:
        at = 0
        for index, inner, count in self.pieces(offset, len(data)):
            old = self.blocks.get(index, self.zeros)
            self.blocks[index] = old[:inner] + data[at:at + count] + old[inner + count:]
            at += count

    def discard(self, offset: int, length: int) -> None:
        for index, inner, count in self.pieces(offset, length):
            if index not in self.blocks:
                continue
            if count == object_size:
                del self.blocks[index]
            else:
                old = self.blocks[index]
                self.blocks[index] = old[:inner] + bytes(count) + old[inner + count:]

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(self.blocks.get(index, self.zeros)[inner:inner + count]
                        for index, inner, count in self.pieces(offset, length))


def sizes() -> st.SearchStrategy[int]:
    """Mostly small VDIs, some past depth 1, a few past depth 2; often not object-aligned."""
    small = st.integers(1, 16 * object_size)
    return st.one_of(
        small, small, small,
        st.integers(1, 16).map(lambda n: n * object_size),
        st.integers(depth2_size + 1, depth2_size + 64 * object_size),
        st.integers(depth3_size + 1, 2 * depth3_size),
        st.integers(size_max - 1000, size_max),
    )


def draw_offset(data: st.DataObject, size: int) -> int:
    """An offset in [0, size): anywhere, near an object, leaf or tree boundary, or the end."""
    last = size - 1
    objects = -(-size // object_size)
    near = st.integers(-300, 300)
    choices = [
        st.integers(0, last),
        st.builds(lambda i, d: i * object_size + d, st.integers(0, objects), near),
        st.builds(lambda d: size + d, st.integers(-object_size - 300, -1)),
    ]
    for level in range(1, radix.depth_for(objects)):  # a node boundary of each level
        span = radix.capacity(level) * object_size
        choices.append(st.builds(lambda i, d, span=span: i * span + d,
                                 st.integers(0, objects // radix.capacity(level)), near))
    offset = data.draw(st.one_of(*choices))
    return min(max(offset, 0), last)


def draw_range(data: st.DataObject, size: int) -> tuple[int, int]:
    """A range inside [0, size): arbitrary, or whole objects."""
    if data.draw(st.booleans()):
        objects = -(-size // object_size)
        first = data.draw(st.integers(0, objects - 1))
        count = data.draw(st.integers(1, min(3, objects - first)))
        offset = first * object_size
        return offset, min(count * object_size, size - offset)
    offset = draw_offset(data, size)
    length = data.draw(st.integers(1, min(write_max_bytes, size - offset)))
    return offset, length


class VdiMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.registry = VdiRegistry()
        self.objects = FencedObjects(
            object_size, lambda g: g in self.registry.writable_generations())
        self.engine = VdiEngine(self.objects, object_size,
                                lambda g: g not in self.registry.writable_generations())
        self.vdis: dict[str, Disk] = {}
        self.snapshots: dict[tuple[str, str], Disk] = {}
        self.serial = 0
        self.time = 0.0

    def teardown(self) -> None:
        pending = asyncio.all_tasks(self.loop)  # left behind by a step that failed
        for task in pending:
            task.cancel()

        async def drain() -> None:
            await asyncio.gather(*pending, return_exceptions=True)

        self.loop.run_until_complete(drain())
        self.loop.close()

    # --- driving the registry and the engine as the gateway does -------------

    def run(self, job: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(job)

    def apply(self, kind: str, **body: Any) -> Outcome:
        self.time += 1
        return self.registry.apply(kind, body, self.time, 1, object_size, 1)

    def new_name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def roots(self) -> list[tuple[Root, Disk]]:
        """Every live root with its model: VDIs and snapshots."""
        found = []
        for name, vdi in self.registry.vdis.items():
            found.append((vdi.root, self.vdis[name]))
            for snap in vdi.snapshots:
                found.append((snap.root, self.snapshots[name, snap.tag]))
        return found

    def collect(self, dead: list[dict[str, Any]], cut: list[int] | None = None) -> None:
        """The gateway's GC after a delete, a rollback or a shrink (what it cut), then
        a check that it left exactly what the live roots reach."""
        async def job() -> set[int]:
            dead_nodes = [await self.engine.root_node(Root.from_json(r)) for r in dead]
            dead_nodes += cut or []
            live = [await self.engine.root_node(root) for root, _ in self.roots()]
            garbage = await self.engine.garbage(dead_nodes, live)
            writable = self.registry.writable_generations()
            cut_off: set[int] = set()  # a writable tree's own objects a shrink cut off
            for node in cut or []:
                await self.engine.walk(node, found=cut_off)
            for oid in garbage:
                assert radix.generation_of(oid) not in writable or oid in cut_off, (
                    f"GC of live {oid:016x}")
                await self.objects.remove(oid)
            self.engine.forget(garbage)
            return garbage

        self.run(job())
        stored = set(self.objects.data)
        reachable = self.reachable()
        assert stored <= reachable, f"leaked: {sorted(stored - reachable)}"

    def pick_vdi(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.vdis)))

    def pick_snapshot(self, data: st.DataObject) -> tuple[str, str]:
        return data.draw(st.sampled_from(sorted(self.snapshots)))

    def has_room(self) -> bool:
        return len(self.vdis) + len(self.snapshots) < disks_max

    # --- rules ---------------------------------------------------------------

    @initialize(size=sizes())
    def create_first(self, size: int) -> None:
        self.create(size)

    @precondition(lambda self: self.has_room())
    @rule(size=sizes())
    def create(self, size: int) -> None:
        before = set(self.objects.data)
        name = self.new_name("v")
        outcome = self.apply("vdi_create", name=name, size=size, copies=1)
        assert outcome.result == Result.SUCCESS, outcome.message
        assert set(self.objects.data) == before, "a fresh VDI holds no space"
        self.vdis[name] = Disk(size)
        registry = self.registry.to_json()
        assert self.apply("vdi_create", name=name, size=size).result == Result.EXISTS
        assert self.registry.to_json() == registry

    @precondition(lambda self: self.vdis)
    @rule(data=st.data(), seed=st.integers(0, 2**32), count=st.integers(1, 4))
    def write(self, data: st.DataObject, seed: int, count: int) -> None:
        """One to four writes to a VDI at once, to ranges that do not overlap."""
        name = self.pick_vdi(data)
        disk = self.vdis[name]
        writes: list[tuple[int, bytes]] = []
        for number in range(count):
            offset, length = draw_range(data, disk.size)
            if any(offset < at + len(payload) and at < offset + length for at, payload in writes):
                continue
            writes.append((offset, random.Random(seed + number).randbytes(length)))
        root = self.registry.vdis[name].root

        async def job() -> None:
            await asyncio.gather(*(self.engine.write(root, at, payload)
                                   for at, payload in writes))

        self.run(job())
        for at, payload in writes:
            disk.write(at, payload)

    @precondition(lambda self: self.vdis)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        name = self.pick_vdi(data)
        disk = self.vdis[name]
        offset, length = draw_range(data, disk.size)
        self.run(self.engine.discard(self.registry.vdis[name].root, offset, length))
        disk.discard(offset, length)

    @precondition(lambda self: self.vdis and self.has_room())
    @rule(data=st.data())
    def snapshot(self, data: st.DataObject) -> None:
        name = self.pick_vdi(data)
        vdi = self.registry.vdis[name]
        tag = self.new_name("t")
        base = self.run(self.engine.root_node(vdi.root))
        outcome = self.apply("vdi_snapshot", name=name, tag=tag,
                             generation=vdi.root.generation, base=base)
        assert outcome.result == Result.SUCCESS, outcome.message
        self.snapshots[name, tag] = self.vdis[name].copy()
        again = self.apply("vdi_snapshot", name=name, tag=tag,
                           generation=vdi.root.generation, base=base)
        assert again.result == Result.EXISTS

    @precondition(lambda self: self.snapshots and self.has_room())
    @rule(data=st.data(), by_id=st.booleans())
    def clone(self, data: st.DataObject, by_id: bool) -> None:
        source, tag = self.pick_snapshot(data)
        snap = self.registry.vdis[source].snapshot(tag)
        assert snap is not None
        name = self.new_name("c")
        base = self.run(self.engine.root_node(snap.root))
        outcome = self.apply("vdi_clone", source=source, snapshot=snap.id if by_id else tag,
                             name=name, base=base)
        assert outcome.result == Result.SUCCESS, outcome.message
        self.vdis[name] = self.snapshots[source, tag].copy()

    @precondition(lambda self: self.snapshots)
    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        name, tag = self.pick_snapshot(data)
        snap = self.registry.vdis[name].snapshot(tag)
        assert snap is not None
        base = self.run(self.engine.root_node(snap.root))
        outcome = self.apply("vdi_rollback", name=name, snapshot=tag, base=base)
        assert outcome.result == Result.SUCCESS, outcome.message
        self.vdis[name] = self.snapshots[name, tag].copy()
        self.collect(outcome.value["dead"])

    @precondition(lambda self: self.vdis)
    @rule(data=st.data())
    def resize(self, data: st.DataObject) -> None:
        name = self.pick_vdi(data)
        vdi = self.registry.vdis[name]
        a_little = st.integers(vdi.size, vdi.size + 4 * object_size)
        size = min(size_max, data.draw(st.one_of(
            a_little, a_little,
            st.integers(max(vdi.size, depth2_size + 1), max(vdi.size, depth2_size) * 2),
            st.integers(max(vdi.size, depth3_size + 1), max(vdi.size, depth3_size) * 2),
            st.integers(max(vdi.size, depth4_size + 1), size_max),
        )))
        depth = max(vdi.root.depth, radix.depth_for(-(-size // object_size)))
        root = self.run(self.engine.grow(vdi.root, depth))
        outcome = self.apply("vdi_resize", name=name, size=size, root=root.to_json())
        assert outcome.result == Result.SUCCESS, outcome.message
        self.vdis[name].size = size
        too_big = self.apply("vdi_resize", name=name, size=size_max + 1, root=root.to_json())
        assert too_big.result == Result.INVALID_PARMS
        if size > vdi.size:
            shrink = self.apply("vdi_resize", name=name, size=size - 1, root=root.to_json())
            assert shrink.result == Result.INVALID_PARMS

    @precondition(lambda self: self.vdis)
    @rule(data=st.data(), again=st.booleans())
    def shrink(self, data: st.DataObject, again: bool) -> None:
        """As the VDI's writer does it: the smaller size logged under its lock, then
        the tree cut past it and what nothing live reaches freed (the same size again
        finishes a cut). Snapshots keep their size and data."""
        name = self.pick_vdi(data)
        vdi = self.registry.vdis[name]
        disk = self.vdis[name]
        size = disk.size if again else max(1, draw_offset(data, disk.size))
        index, inner = divmod(size, object_size)
        tail = self.run(self.engine.lookup(vdi.root, index)) if inner else 0
        self.apply("vdi_lock", name=name, node_id="n1", session="shrinker")
        outcome = self.apply("vdi_resize", name=name, size=size, root=vdi.root.to_json(),
                             session="shrinker", shrink=True)
        assert outcome.result == Result.SUCCESS, outcome.message
        cut = self.run(self.engine.truncate(self.registry.vdis[name].root, size))
        self.apply("vdi_unlock", name=name, session="shrinker")
        disk.size = size
        keep = -(-size // object_size)
        for gone in [i for i in disk.blocks if i >= keep]:
            del disk.blocks[gone]
        if tail:
            old = disk.blocks[index]
            head_blocks = -(-inner // 4096) * 4096  # a frozen one is copied up if these hold data
            if radix.generation_of(tail) == vdi.root.generation or any(old[:head_blocks]):
                disk.blocks[index] = old[:inner] + bytes(object_size - inner)
            else:
                del disk.blocks[index]
        self.collect([], cut)

    @precondition(lambda self: self.snapshots)
    @rule(data=st.data())
    def delete_snapshot(self, data: st.DataObject) -> None:
        name, tag = self.pick_snapshot(data)
        outcome = self.apply("vdi_delete", name=name, snapshot=tag)
        assert outcome.result == Result.SUCCESS, outcome.message
        del self.snapshots[name, tag]
        self.collect(outcome.value["dead"])

    @precondition(lambda self: self.vdis)
    @rule(data=st.data())
    def delete_vdi(self, data: st.DataObject) -> None:
        name = self.pick_vdi(data)
        outcome = self.apply("vdi_delete", name=name)
        assert outcome.result == Result.SUCCESS, outcome.message
        del self.vdis[name]
        for key in [key for key in self.snapshots if key[0] == name]:
            del self.snapshots[key]
        self.collect(outcome.value["dead"])

    @precondition(lambda self: self.engine.released)
    @rule(restart=st.booleans())
    def collect_garbage(self, restart: bool) -> None:
        """GC with nothing deleted: frees what writes released. Then perhaps a
        gateway restart: a fresh engine (empty caches) over the same objects."""
        self.collect([])
        if restart:
            self.engine = VdiEngine(self.objects, object_size,
                                    lambda g: g not in self.registry.writable_generations())

    @precondition(lambda self: self.vdis)
    @rule(data=st.data())
    def read_range(self, data: st.DataObject) -> None:
        roots = self.roots()
        root, disk = roots[data.draw(st.integers(0, len(roots) - 1))]
        offset, length = draw_range(data, disk.size)
        assert self.run(self.engine.read(root, offset, length)) == disk.read(offset, length)

    # --- invariants ----------------------------------------------------------

    @invariant()
    def registry_is_consistent(self) -> None:
        self.registry._check()
        value = self.registry.to_json()
        assert VdiRegistry.from_json(value).to_json() == value
        assert set(self.registry.vdis) == set(self.vdis)
        for name, vdi in self.registry.vdis.items():
            assert vdi.size == self.vdis[name].size
            assert {(name, s.tag) for s in vdi.snapshots} == {
                key for key in self.snapshots if key[0] == name}
            for root, size in [(vdi.root, vdi.size), *((s.root, s.size) for s in vdi.snapshots)]:
                # A shrink keeps the depth: a tree may be deeper than its size needs.
                assert root.depth >= radix.depth_for(-(-size // object_size))

    @invariant()
    def every_disk_reads_as_the_model(self) -> None:
        async def job() -> None:
            for root, disk in self.roots():
                if disk.size <= whole_read_max_bytes:
                    assert await self.engine.read(root, 0, disk.size) == disk.read(0, disk.size)
                    continue
                last = (disk.size - 1) // object_size
                for index in sorted({0, last, *disk.blocks}):
                    offset = index * object_size
                    length = min(object_size, disk.size - offset)
                    got = await self.engine.read(root, offset, length)
                    assert got == disk.read(offset, length), (root, index)

        self.run(job())

    def reachable(self) -> set[int]:
        """Every object the live roots reach, checking each root's data against the model."""
        async def job() -> set[int]:
            reachable: set[int] = set()
            for root, disk in self.roots():
                node = await self.engine.root_node(root)
                if node:
                    assert radix.node_level(node) == root.depth
                found = await self.engine.walk(node)
                indexes = {oid_index(oid) for oid in found if radix.is_data(oid)}
                assert indexes == set(disk.blocks), (root, indexes ^ set(disk.blocks))
                assert all(radix.generation_of(oid) <= root.generation for oid in found)
                reachable |= found
            return reachable

        return self.run(job())

    @invariant()
    def space_is_what_live_roots_reach_or_was_released(self) -> None:
        stored = set(self.objects.data)
        reachable = self.reachable()
        assert reachable <= stored, f"dangling: {sorted(reachable - stored)}"
        unknown = stored - reachable - self.engine.released
        assert not unknown, f"leaked: {sorted(unknown)}"

VdiMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
TestVdiModel = VdiMachine.TestCase

assert depth2_size < GiB and depth3_size == 64 * GiB
