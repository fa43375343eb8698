"""The VDI engine: byte I/O on a VDI, through its radix tree of objects.

It runs in the gateway sheep, over an ``Objects`` interface (the gateway's
replicated object I/O; an in-memory dict in tests), so the whole copy-on-write
logic is exercised without sockets.

A VDI's state at one moment is a ``Root``: the writable (or, for a snapshot,
frozen) generation g, the tree depth, and ``base``, the root node this
generation started from. Snapshot, clone and rollback create a generation
whose own root node does not exist yet: it is made on the first write, as a
copy of ``base``; until then reads go straight to ``base``. That keeps every
one of those operations O(1): no object is copied when they happen.

Writes (only ever from the one gateway holding the VDI's lock):
- path copy: a tree node of another generation on the path is copied into g
  (same level and position, so its name is known) before it is changed;
- copy-up: a data object of another generation is read whole, the write is
  applied to the copy, and the copy is created in g;
- ordering: an object is complete on every replica before the entry that
  points at it is written, so a crash leaves at worst an unreferenced object.

Allocation (new objects, entry updates) is serialized per generation; writes
into objects g already owns go straight through, in parallel.

Lookups: frozen nodes are cached whole (they never change). Entries of writable
nodes are cached too, but only for I/O through the session that holds the VDI's
lock (``cached=True``): while it holds it, no other sheep can change the tree,
and every change this sheep makes goes through ``_set_entry``, which updates
the cache. The owner clears it (``forget_entries``) whenever the cluster log
changes anything (a lock moving, a snapshot, a rollback). A lookup that raced an
entry change is not cached. So a random read is one object read, not two.

Space: a delete or rollback hands its dead roots to ``garbage``, which frees
what no live root reaches. That is not all: a deleted snapshot's objects can
still be shared by the VDI that followed it (or by clones), and become garbage
only later, when that tree copies them away. So every frozen object a write
stops pointing at (a base root, a path-copied node, a copied-up or discarded
data object) is remembered as released, and the next ``garbage`` checks those
too. Only the object itself: its children are still in the copy that replaced
it, and are released in their turn.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from sheep import changes, radix
from sheep.errors import InvalidParameters, NoObject
from sheep.oid import oid_index
from sheep.radix import Root

node_cache_max = 2048  # frozen tree nodes kept in memory (8 KiB each)
entry_nodes_max = 4096  # writable tree nodes whose entries are cached (a dict each)
read_retries_max = 3  # lookups redone when a concurrent copy-up freed what a read found
map_cache_max = 1 << 16  # allocation masks of frozen data objects kept in memory
maps_in_flight = 32  # allocation masks block status asks for at once


def _runs(value: int, inner: int, count: int) -> list[tuple[int, int]]:
    """The [start, end) byte ranges of an allocation mask within [inner, inner+count)."""
    value &= changes.mask(inner, count)
    return [(max(inner, first * changes.BLOCK),
             min(inner + count, (first + blocks) * changes.BLOCK))
            for first, blocks in changes.runs(value)]
released_max = 1 << 16  # frozen objects replaced since the last garbage(); past it, forgotten


class Objects(Protocol):
    """Replicated object I/O as the engine needs it."""

    async def read(self, oid: int, offset: int, count: int) -> bytes: ...

    async def create(self, oid: int, data: bytes | memoryview, offset: int = 0) -> None: ...

    async def create_sparse(self, oid: int, extents: list[tuple[int, bytes]]) -> None:
        """Create a whole object holding these (offset, bytes) extents (whole 4 KiB
        blocks, in order, apart) and zeros elsewhere, which take no space."""

    async def write(self, oid: int, offset: int, data: bytes | memoryview,
                    fua: bool = False) -> None: ...

    async def discard(self, oid: int, offset: int, count: int) -> None: ...

    async def remove(self, oid: int) -> None: ...

    async def exists(self, oid: int) -> bool: ...

    async def flush(self) -> None: ...

    async def data_map(self, oid: int) -> int: ...


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    allocated: bool


class VdiEngine:
    def __init__(self, objects: Objects, object_size: int,
                 is_frozen: Callable[[int], bool],
                 on_root_made: Callable[[Root], Awaitable[None]] | None = None) -> None:
        self.objects = objects
        # Records a generation's own root node in the cluster log once made (Root.made);
        # without it (tests of the engine alone) the stores are asked whether it exists.
        self.on_root_made = on_root_made
        self.object_size = object_size
        self.is_frozen = is_frozen
        self._nodes: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._maps: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._roots_made: set[int] = set()
        self._allocation: dict[int, asyncio.Lock] = {}
        self._released: set[int] = set()
        # node oid -> {slot: entry} of writable nodes, for lock-holding I/O only
        self._entries: dict[int, dict[int, int]] = {}
        self._entry_changes = 0  # bumped by every entry change: racing reads don't cache

    def forget_entries(self) -> None:
        """Drop every cached writable entry (the cluster log changed something)."""
        self._entries.clear()
        self._entry_changes += 1

    def _entries_changed(self, node: int) -> None:
        self._entries.pop(node, None)
        self._entry_changes += 1

    # --- tree reading --------------------------------------------------------

    async def _node(self, oid: int) -> bytes:
        """A frozen node's whole contents, cached (it can never change)."""
        data = self._nodes.get(oid)
        if data is not None:
            self._nodes.move_to_end(oid)
            return data
        data = bytes(await self.objects.read(oid, 0, radix.NODE_BYTES))
        self._nodes[oid] = data
        if len(self._nodes) > node_cache_max:
            self._nodes.popitem(last=False)
        return data

    async def _entry(self, node: int, index: int, level: int, cached: bool = False) -> int:
        slot = radix.slot(index, level)
        at = slot * radix.ENTRY_BYTES
        if self.is_frozen(radix.generation_of(node)):
            data = await self._node(node)
            return int.from_bytes(data[at:at + radix.ENTRY_BYTES], "little")
        if cached:
            value = self._entries.get(node, {}).get(slot)
            if value is not None:
                return value
        changes = self._entry_changes
        raw = await self.objects.read(node, at, radix.ENTRY_BYTES)
        value = int.from_bytes(raw, "little")
        if cached and changes == self._entry_changes:
            if node not in self._entries and len(self._entries) >= entry_nodes_max:
                self._entries.clear()
            self._entries.setdefault(node, {})[slot] = value
        return value

    async def root_node(self, root: Root) -> int:
        """The root node in effect: the generation's own once written, else its base."""
        own = root.own()
        if own in self._roots_made or root.made:
            return own
        if self._asks_stores(root) and await self.objects.exists(own):
            self._roots_made.add(own)
            return own
        return root.base

    def _asks_stores(self, root: Root) -> bool:
        return root.made is None or self.on_root_made is None

    async def lookup(self, root: Root, index: int, cached: bool = False) -> int:
        """The data oid holding object ``index``, or 0 if it was never written.
        ``cached``: only for I/O under the VDI's lock held here (module comment)."""
        node = await self.root_node(root)
        if node == 0:
            return 0
        for level in range(radix.node_level(node), 0, -1):
            node = await self._entry(node, index, level, cached)
            if node == 0:
                return 0
        return node

    # --- reads ---------------------------------------------------------------

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(object index, offset inside it, length) for a byte range."""
        pieces = []
        end = offset + length
        while offset < end:
            index, inner = divmod(offset, self.object_size)
            step = min(self.object_size - inner, end - offset)
            pieces.append((index, inner, step))
            offset += step
        return pieces

    async def read(self, root: Root, offset: int, length: int, cached: bool = False) -> bytes:
        async def piece(index: int, inner: int, count: int) -> bytes:
            for attempt in range(read_retries_max):
                try:
                    oid = await self.lookup(root, index, cached and attempt == 0)
                    if oid == 0:
                        return bytes(count)
                    return await self.objects.read(oid, inner, count)
                except NoObject:
                    # A write copied the object (or a node on the way) away and freed
                    # the original between our lookup and our read: look again.
                    if attempt == read_retries_max - 1:
                        raise
            raise AssertionError("unreachable")

        pieces = self._pieces(offset, length)
        if len(pieces) == 1:  # the usual case: no task for it
            return await piece(*pieces[0])
        parts = await asyncio.gather(*(piece(*p) for p in pieces))
        return b"".join(parts)

    async def extents(self, root: Root, offset: int, length: int,
                      cached: bool = False) -> list[Extent]:
        """Allocated and unallocated ranges, merged, covering [offset, offset+length).

        It walks only the allocated part of the tree (VdiEngine.changed), then asks
        the allocated objects' maps, maps_in_flight at a time: the cost follows the
        data, never the VDI's size, however deep its snapshots and clones."""
        result: list[Extent] = []
        if length <= 0:
            return result

        def add(start: int, count: int, allocated: bool) -> None:
            if count <= 0:
                return
            if result and result[-1].allocated == allocated:
                last = result[-1]
                result[-1] = Extent(last.offset, last.length + count, allocated)
            else:
                result.append(Extent(start, count, allocated))

        end = offset + length
        size = self.object_size
        found = await self.changed(root, None, None, offset // size, (end - 1) // size + 1)
        slots = asyncio.Semaphore(maps_in_flight)

        async def ranges(index: int, oid: int) -> list[tuple[int, int]]:
            base = index * size
            inner = max(offset, base) - base
            count = min(end, base + size) - base - inner
            async with slots:
                try:
                    value = await self.data_map(oid)
                except NoObject:  # copied away and freed since the walk: look it up again
                    return [(base + low, base + high) for low, high in
                            await self.data_ranges(root, index, inner, count, cached)]
            return [(base + low, base + high) for low, high in _runs(value, inner, count)]

        at = offset
        for found_ranges in await asyncio.gather(*(ranges(index, oid)
                                                   for index, oid, _ in found)):
            for low, high in found_ranges:
                add(at, low - at, False)
                add(low, high - low, True)
                at = high
        add(at, end - at, False)
        return result

    async def data_ranges(self, root: Root, index: int, inner: int, count: int,
                          cached: bool = False) -> list[tuple[int, int]]:
        """The [start, end) byte ranges inside object ``index``, within [inner, inner +
        count), that may hold data, at 4 KiB granularity (sheep/changes.py): the
        rest reads as zeros. No data is read."""
        for attempt in range(read_retries_max):
            oid = await self.lookup(root, index, cached and attempt == 0)
            if oid == 0:
                return []
            try:
                value = await self.data_map(oid)
                break
            except NoObject:
                if attempt == read_retries_max - 1:
                    raise
        return _runs(value, inner, count)

    async def data_map(self, oid: int) -> int:
        """An object's allocation mask; a frozen object's is cached (it never changes)."""
        value = self._maps.get(oid)
        if value is not None:
            self._maps.move_to_end(oid)
            return value
        value = await self.objects.data_map(oid)
        if self.is_frozen(radix.generation_of(oid)):
            self._maps[oid] = value
            if len(self._maps) > map_cache_max:
                self._maps.popitem(last=False)
        return value

    # --- writes --------------------------------------------------------------

    def _lock(self, generation: int) -> asyncio.Lock:
        lock = self._allocation.get(generation)
        if lock is None:
            lock = self._allocation[generation] = asyncio.Lock()
        return lock

    async def write(self, root: Root, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        pieces = self._pieces(offset, len(view))
        position = 0
        jobs = []
        for index, inner, count in pieces:
            jobs.append(self._write_object(root, index, inner, view[position:position + count]))
            position += count
        if len(jobs) == 1:  # the usual case: no task for it
            await jobs[0]
        else:
            await asyncio.gather(*jobs)

    async def _write_object(self, root: Root, index: int, inner: int,
                            data: memoryview) -> None:
        want = radix.data_oid(root.generation, index)
        if await self.lookup(root, index, cached=True) == want:
            try:
                await self.objects.write(want, inner, data)  # no copy: sent as it came
                return
            except NoObject:
                pass  # a discard freed it meanwhile: allocate it again below
        async with self._lock(root.generation):
            leaf = await self._owned_path(root, index)
            current = await self._entry(leaf, index, 1, cached=True)
            if current == want:
                await self.objects.write(want, inner, data)
                return
            if current == 0 or len(data) == self.object_size:
                await self.objects.create(want, data, inner)
            else:
                await self._copy_up(current, want, inner, data)
            await self._set_entry(leaf, index, 1, want)
            self._release(current)

    async def _copy_up(self, current: int, want: int, inner: int, data: memoryview) -> None:
        """Make ``want`` a copy of frozen ``current`` with data written at inner:
        only the blocks current allocates, and those the write touches, are read and
        copied, so a copy-up keeps the holes of what it copies."""
        keep = await self.data_map(current) | changes.mask(inner, len(data))
        runs = [(first * changes.BLOCK, count * changes.BLOCK)
                for first, count in changes.runs(keep)]
        parts = await asyncio.gather(*(self.objects.read(current, start, length)
                                       for start, length in runs))
        extents: list[tuple[int, bytes]] = []
        for (start, length), part in zip(runs, parts, strict=True):
            low, high = max(start, inner), min(start + length, inner + len(data))
            if low < high:  # the write lands in this run
                buffer = bytearray(part)
                buffer[low - start:high - start] = data[low - inner:high - inner]
                part = bytes(buffer)
            extents.append((start, part))
        await self.objects.create_sparse(want, extents)

    @property
    def released(self) -> frozenset[int]:
        """Frozen objects writes stopped pointing at since the last ``garbage``."""
        return frozenset(self._released)

    def drop_released(self, oids: set[int] | frozenset[int]) -> None:
        """Stop tracking released objects known to be alive (their generation has a root)."""
        self._released -= oids

    def _release(self, oid: int) -> None:
        """A writable tree stopped pointing at frozen ``oid``: it may be garbage now."""
        if oid and len(self._released) < released_max:
            self._released.add(oid)

    async def _set_entry(self, node: int, index: int, level: int, child: int) -> None:
        radix.check_entry(level, child)
        slot = radix.slot(index, level)
        self._entries_changed(node)  # lookups under way now are not cached
        await self.objects.write(node, slot * radix.ENTRY_BYTES, radix.entry_bytes(child))
        self._entries_changed(node)
        self._entries[node] = {slot: child}

    async def _own_root(self, root: Root) -> int:
        own = root.own()
        if own in self._roots_made or root.made or (
                self._asks_stores(root) and await self.objects.exists(own)):
            self._roots_made.add(own)
            return own
        self._entries_changed(own)
        if root.base:
            contents = await self._node(root.base)
            await self.objects.create(own, contents)
            self._release(root.base)
        else:
            await self.objects.create(own, b"")
        self._entries_changed(own)
        self._roots_made.add(own)
        if self.on_root_made is not None:
            # Before any entry goes into it: until then it holds what base holds, so a
            # reader that still takes base, or a writer that makes it again, loses nothing.
            await self.on_root_made(root)
        return own

    async def _owned_path(self, root: Root, index: int) -> int:
        """Make every node on the path to index belong to the generation; return the leaf.

        Caller holds the generation's allocation lock.
        """
        node = await self._own_root(root)
        for level in range(root.depth, 1, -1):
            want = radix.node_oid(root.generation, level - 1, radix.position(index, level - 1))
            child = await self._entry(node, index, level, cached=True)
            if child != want:
                self._entries_changed(want)
                if child == 0:
                    await self.objects.create(want, b"")
                else:
                    await self.objects.create(want, await self._node(child))
                self._entries_changed(want)
                await self._set_entry(node, index, level, want)
                self._release(child)
            node = want
        return node

    async def discard(self, root: Root, offset: int, length: int,
                      size: int | None = None) -> None:
        """Make a range read as zeros, freeing whole objects where it covers them.

        With ``size`` (the VDI's), a range reaching the end of the VDI covers its
        last, partial object whole.
        """
        for index, inner, count in self._pieces(offset, length):
            if await self.lookup(root, index, cached=True) == 0:
                continue
            start = index * self.object_size
            whole = count == self.object_size or (
                inner == 0 and size is not None and start + count >= size)
            own = radix.data_oid(root.generation, index)
            if whole:
                async with self._lock(root.generation):
                    leaf = await self._owned_path(root, index)
                    current = await self._entry(leaf, index, 1, cached=True)
                    if current == 0:
                        continue
                    await self._set_entry(leaf, index, 1, 0)
                    if current == own:
                        try:
                            await self.objects.remove(own)
                        except NoObject:
                            pass
                    else:
                        self._release(current)
            elif await self.lookup(root, index, cached=True) == own:
                try:
                    await self.objects.discard(own, inner, count)
                except NoObject:
                    pass  # freed whole meanwhile: reads as zeros already
            else:
                await self._write_object(root, index, inner, memoryview(bytes(count)))

    async def grow(self, root: Root, depth: int) -> Root:
        """A deeper tree for a larger VDI: new root levels above the current root."""
        assert depth >= root.depth
        if depth == root.depth:
            return root
        below = await self.root_node(root)
        for level in range(root.depth + 1, depth + 1):
            node = radix.node_oid(root.generation, level, 0)
            entries = [0] * radix.FANOUT
            entries[0] = below
            self._entries_changed(node)
            await self.objects.create(node, radix.encode_node(entries))
            below = node
        self._roots_made.add(below)
        return Root(root.generation, depth, 0, made=True)  # its own root made just now

    async def truncate(self, root: Root, size: int) -> list[int]:
        """Make everything from byte ``size`` on read as zeros (a VDI shrunk to
        ``size``): the object that straddles it loses its tail, and every entry past
        it is cut from the writable tree, as high up as it can be (a subtree wholly
        past the end goes with its one entry). Returns what was cut off: tree nodes,
        with all below them, and data objects; the collector frees those no live tree
        (a snapshot, a clone) reaches. Its caller is the VDI's writer, writes paused;
        done again, it does nothing more."""
        await self._cut_tail(root, size)
        keep = -(-size // self.object_size)  # objects [0, keep) stay
        if keep >= radix.capacity(root.depth):
            return []
        # First, reading only: along the path to index keep, from which slot on each
        # node's entries lie past the end, and whether any is set.
        path: list[tuple[int, int, bool]] = []  # (level, first slot past the end, any)
        node, level = await self.root_node(root), root.depth
        while node:
            entries = await self._node_entries(node)
            at = radix.slot(keep, level)
            straddles = keep % radix.capacity(level - 1) != 0  # the child at `at` does
            first = at + 1 if straddles else at
            path.append((level, first, any(entries[first:])))
            if not straddles:
                break
            node, level = entries[at], level - 1
        deepest = min((level for level, _, cuts in path if cuts), default=None)
        if deepest is None:
            return []
        cut: list[int] = []
        async with self._lock(root.generation):
            node = await self._own_root(root)
            for level, first, cuts in path:
                if cuts:
                    entries = await self._node_entries(node)
                    cut += [entry for entry in entries[first:] if entry]
                    self._entries_changed(node)
                    await self.objects.write(node, first * radix.ENTRY_BYTES,
                                             bytes((radix.FANOUT - first) * radix.ENTRY_BYTES))
                    self._entries_changed(node)
                if level == deepest:
                    break
                node = await self._own_child(root, node, keep, level)
        return cut

    async def _own_child(self, root: Root, node: int, index: int, level: int) -> int:
        """The generation's own copy of the child of its ``node`` on the path to
        ``index`` (a path copy, as a write makes). Caller holds the allocation lock."""
        want = radix.node_oid(root.generation, level - 1, radix.position(index, level - 1))
        child = await self._entry(node, index, level, cached=True)
        assert child, "a node on the path to entries past the end exists"
        if child != want:
            self._entries_changed(want)
            await self.objects.create(want, await self._node(child))
            self._entries_changed(want)
            await self._set_entry(node, index, level, want)
            self._release(child)
        return want

    async def _cut_tail(self, root: Root, size: int) -> None:
        """The bytes of the object straddling ``size`` past it become a hole: punched in
        the generation's own object; a frozen one is copied up without them."""
        index, inner = divmod(size, self.object_size)
        if not inner or await self.lookup(root, index, cached=True) == 0:
            return
        own = radix.data_oid(root.generation, index)
        async with self._lock(root.generation):
            leaf = await self._owned_path(root, index)
            current = await self._entry(leaf, index, 1, cached=True)
            if current == own:
                try:
                    await self.objects.discard(own, inner, self.object_size - inner)
                except NoObject:
                    pass  # freed whole meanwhile: reads as zeros already
                return
            if current == 0:
                return
            head = await self.data_map(current) & changes.mask(0, inner)
            if head:
                runs = [(first * changes.BLOCK, count * changes.BLOCK)
                        for first, count in changes.runs(head)]
                parts = await asyncio.gather(*(self.objects.read(current, start, length)
                                               for start, length in runs))
                extents = []
                for (start, length), part in zip(runs, parts, strict=True):
                    if start + length > inner:  # the block with the end in it: zeros after
                        part = part[:inner - start] + bytes(start + length - inner)
                    extents.append((start, part))
                await self.objects.create_sparse(own, extents)
            await self._set_entry(leaf, index, 1, own if head else 0)
            self._release(current)

    # --- diffs ---------------------------------------------------------------

    async def _node_entries(self, node: int) -> list[int]:
        if self.is_frozen(radix.generation_of(node)):
            return radix.decode_node(await self._node(node))
        return radix.decode_node(await self.objects.read(node, 0, radix.NODE_BYTES))

    async def _leaf(self, root: Root, position: int) -> list[int] | None:
        """The entries of the root's level-1 node at ``position`` (None: none there)."""
        node = await self.root_node(root)
        index = position << radix.FANOUT_BITS
        if node == 0 or index >= radix.capacity(radix.node_level(node)):
            return None
        for level in range(radix.node_level(node), 1, -1):
            node = await self._entry(node, index, level)
            if node == 0:
                return None
        return await self._node_entries(node)

    async def changed(self, root: Root, generations: set[int] | None, since: Root | None,
                      first: int, end: int) -> list[tuple[int, int, int]]:
        """(index, entry now, entry in ``since``) for every object index in [first,
        end) whose entry differs between ``since`` and ``root``, in index order.

        ``root`` descends from ``since`` through ``generations`` (the generations
        newer than since's): a node of any other generation was not touched since
        and is skipped whole, so this costs the changed part of the tree. Without
        ``generations`` (and ``since``), every allocated index."""
        found: list[tuple[int, int, int]] = []
        node = await self.root_node(root)
        if node:
            await self._changed(node, generations, since, first, end, found)
        return found

    async def _changed(self, node: int, generations: set[int] | None, since: Root | None,
                       first: int, end: int, found: list[tuple[int, int, int]]) -> None:
        if generations is not None and radix.generation_of(node) not in generations:
            return
        level, position = radix.node_level(node), radix.node_position(node)
        entries = await self._node_entries(node)
        if level > 1:
            span = 1 << (radix.FANOUT_BITS * (level - 1))
            for slot_, child in enumerate(entries):
                low = radix.child_position(position, slot_) * span
                if child and low < end and low + span > first:
                    await self._changed(child, generations, since, first, end, found)
            return
        before = await self._leaf(since, position) if since is not None else None
        for slot_, entry in enumerate(entries):
            index = radix.child_position(position, slot_)
            if not first <= index < end:
                continue
            old = before[slot_] if before is not None else 0
            if generations is None:
                if entry:
                    found.append((index, entry, 0))
            elif entry != old:
                found.append((index, entry, old))

    # --- whole trees ---------------------------------------------------------

    async def walk(self, node: int, positions: set[tuple[int, int]] | None = None,
                   found: set[int] | None = None) -> set[int]:
        """Every tree node and data object reachable from a root node.

        With ``positions``, only descend into children at (level, position) pairs
        in that set (the GC's pruning: nothing elsewhere can be garbage).
        """
        found = set() if found is None else found
        if node == 0 or node in found:
            return found
        found.add(node)
        if radix.is_data(node):  # what a shrink cut off may be a data object
            return found
        level = radix.node_level(node)
        if self.is_frozen(radix.generation_of(node)):
            entries = radix.decode_node(await self._node(node))
        else:
            entries = radix.decode_node(await self.objects.read(node, 0, radix.NODE_BYTES))
        base_position = radix.node_position(node)
        for slot_, child in enumerate(entries):
            if child == 0:
                continue
            if level == 1:
                found.add(child)
                continue
            child_position = radix.child_position(base_position, slot_)
            if positions is not None and (level - 1, child_position) not in positions:
                continue
            await self.walk(child, positions, found)
        return found

    async def garbage(self, dead: list[int], live: list[int]) -> set[int]:
        """Objects reachable from no live root node: those the dead root nodes reach,
        and those released since the last call (see the module comment)."""
        candidates: set[int] = set()
        for node in dead:
            await self.walk(node, found=candidates)
        # A live root node is its generation's own root, and reaches every object
        # of that generation: released objects of those generations are not garbage.
        live_generations = {radix.generation_of(node) for node in live if node}
        released, self._released = self._released, set()
        for oid in released - candidates:
            if radix.generation_of(oid) not in live_generations and await self.objects.exists(oid):
                candidates.add(oid)
        # Every (level, position) at or above a candidate: a live subtree can hold
        # candidates only under one of these (a tree grown by resize puts old
        # roots under new levels, so ancestors count too; a data object's is its leaf).
        covered: set[tuple[int, int]] = set()
        for oid in candidates:
            if radix.is_tree(oid):
                level, position = radix.node_level(oid), radix.node_position(oid)
            else:
                level, position = 1, radix.position(oid_index(oid), 1)
            for above in range(level, radix.DEPTH_MAX + 1):
                covered.add((above, position >> (radix.FANOUT_BITS * (above - level))))
        reachable: set[int] = set()
        for node in live:
            await self.walk(node, covered, reachable)
        for oid in candidates & reachable:
            self._nodes.pop(oid, None)
        return candidates - reachable

    def forget(self, oids: set[int]) -> None:
        for oid in oids:
            self._nodes.pop(oid, None)
            self._maps.pop(oid, None)
            self._roots_made.discard(oid)
            self._entries_changed(oid)


def check_range(size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidParameters(
            f"range {offset}+{length} is past the end of the VDI ({size} bytes)")
