"""Garbage collection of VDI objects: what no live VDI or snapshot reaches is removed.

Four ways an object becomes garbage, and who finds it:

- a delete or a rollback leaves roots that no VDI or snapshot holds any more:
  collect walks them and frees what no live root reaches, before the op is
  answered (VdiEngine.garbage);
- a shrink cuts subtrees and objects past the new end off the writable tree
  (VdiEngine.truncate): collect takes them as it takes dead roots;
- a write copies an object away from a generation whose snapshot was deleted:
  reap_released frees the original on the writer's sheep, before the write is
  answered;
- a write that failed or was cut off halfway leaves a copy-up that no tree
  entry points at: sweep finds it by listing every store (Sheep._sweep runs it
  on the first member).

Every store is flushed before anything is freed (_durable_before_free).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sheep import proto, radix
from sheep.errors import NoObject
from sheep.gateway import Gateway
from sheep.group import Group
from sheep.oid import ObjectType, oid_type
from sheep.proto import Header, Op
from sheep.vdi import Objects, Root, VdiEngine
from sheep.vdi_changes import remove_pages

log = logging.getLogger(__name__)


class Collector:
    """Frees the objects of one sheep's VDI engine that nothing live reaches."""

    def __init__(self, group: Group, engine: Callable[[], VdiEngine], objects: Objects,
                 gateway: Gateway) -> None:
        self.group = group
        self.engine = engine  # the engine of the current object size (VdiService.engine)
        self.objects = objects
        self.gateway = gateway

    async def reap_released(self) -> None:
        """Free what a write stopped sharing with a deleted snapshot, at once.

        A write that copies an object away releases the original. If the
        original's generation still has a root (a snapshot, or a VDI), that root
        keeps it; if not (its snapshot was deleted while this VDI still shared
        it), it is garbage unless another live tree (a clone) still reaches it.
        Deciding here, on the writer's sheep and before the write is answered,
        means no later delete elsewhere has to remember it.
        """
        engine = self.engine()
        released = engine.released
        if not released:
            return
        live = self._live_generations()
        kept = frozenset(oid for oid in released if radix.generation_of(oid) in live)
        engine.drop_released(kept)
        if kept != released:
            await self.collect([])

    def _live_generations(self) -> set[int]:
        generations = set()
        for vdi in self.group.state.vdis.vdis.values():
            generations.add(vdi.root.generation)
            generations.update(snap.root.generation for snap in vdi.snapshots)
        return generations

    async def collect(self, dead_roots: list[Root], cut: list[int] | None = None) -> int:
        """Remove every object the dead roots reached that no live root reaches; and
        of what a shrink cut off (tree nodes, with what is below them, and data
        objects), the same."""
        engine = self.engine()
        dead = [await engine.root_node(root) for root in dead_roots] + (cut or [])
        live = []
        for vdi in list(self.group.state.vdis.vdis.values()):
            for root in [vdi.root, *(s.root for s in vdi.snapshots)]:
                live.append(await engine.root_node(root))
        garbage = await engine.garbage([node for node in dead if node], live)
        if garbage:
            await self._durable_before_free()
        # Data first, then the nodes that pointed at it, leaves before their parents.
        order = sorted(garbage, key=lambda oid: (radix.is_tree(oid), radix.node_level(oid)
                                                 if radix.is_tree(oid) else 0))
        for oid in order:
            try:
                async with self.gateway.local.scheduler.running("gc", 0):
                    await self.objects.remove(oid)
            except NoObject:
                pass
        engine.forget(garbage)
        return len(garbage)

    async def forget_generations(self, generations: set[int]) -> None:
        """Free the change pages (sheep/changes.py) of those of these generations that no
        live tree's lineage names any more (a delete or rollback just ended them). The
        sweep frees any a failure here leaves behind."""
        state = self.group.state
        alive = set(state.vdis.copies_by_generation()) | state.vdis.writable_generations()
        for generation in sorted(generations - alive):
            async with self.gateway.local.scheduler.running("gc", 0):
                await remove_pages(self.objects, state.object_size, generation)

    async def _durable_before_free(self) -> None:
        """Flush every store before freeing objects found unreachable. A tree entry
        that stopped pointing at an object (a copy-up moved it to a new copy) may not
        be on disk yet: after a power loss it would point at the freed object again,
        a dangling pointer. Objects of frozen generations never become reachable
        again, so what was unreachable before this flush stays unreachable in what
        the flush made durable (found by the simulator)."""
        await self.objects.flush()

    async def sweep(self) -> int:
        """Remove the objects of frozen or deleted generations that no live VDI or
        snapshot reaches: what a write that failed or was cut off halfway left behind
        (a copy-up made on some replicas, its tree entry never written). The collection
        at delete time cannot see these: no tree reaches them.

        Race-free without a lock: the writable generations are read before the stores
        are listed, and no store accepts a new object of any other generation (fencing),
        so an object of a frozen generation that nothing reaches now never will; new
        roots (clones, rollbacks) only copy roots that exist. Objects of writable
        generations are left alone: a writer may be between a copy-up and its entry.
        They are swept once their generation is frozen or deleted."""
        state = self.group.state
        writable = set(state.vdis.writable_generations())
        epoch = self.group.epoch
        held: set[int] = set()
        listing = Header(opcode=Op.LIST_PEER)
        for node in list(state.nodes):
            data, _ = await self.gateway.call(node, listing, b"", epoch)
            held.update(int(oid) for oid in proto.decode_json(data))
        candidates = {oid for oid in held if (radix.is_tree(oid) or radix.is_data(oid))
                      and radix.generation_of(oid) not in writable}
        # Change pages (sheep/changes.py) live as long as some live tree's lineage
        # names their generation: a diff across it reads them.
        lineages = set(state.vdis.copies_by_generation()) | writable
        pages = {oid for oid in held if oid_type(oid) == ObjectType.CHANGES
                 and radix.generation_of(oid) not in lineages}
        if not candidates and not pages:
            return 0
        engine = self.engine()
        reachable: set[int] = set()
        for vdi in list(self.group.state.vdis.vdis.values()):
            for root in [vdi.root, *(s.root for s in vdi.snapshots)]:
                node_oid = await engine.root_node(root)
                if node_oid:
                    await engine.walk(node_oid, found=reachable)
        garbage = sorted((candidates - reachable) | pages, key=lambda oid: (
            radix.is_tree(oid), radix.node_level(oid) if radix.is_tree(oid) else 0))
        if garbage:
            await self._durable_before_free()
        for oid in garbage:
            try:
                async with self.gateway.local.scheduler.running("gc", 0):
                    await self.objects.remove(oid)
            except NoObject:
                pass
        engine.forget(set(garbage))
        if garbage:
            log.info("sweep: removed %d objects that no VDI or snapshot reaches", len(garbage))
        return len(garbage)
