"""VDIs on the gateway: open sessions, byte I/O, and the VDI management ops.

A client opens a VDI (or a snapshot, read-only) on its connection and gets a
handle; reads and writes name the handle and a byte offset. Opening read-write
takes the VDI's cluster-wide lock (an ordered cluster op); the lock goes when
the connection ends, or when its sheep dies (the state machine drops a dead
node's locks).

Management ops that change what a writer writes into (snapshot, resize) run on
the sheep that holds the lock: any other sheep forwards them there. That sheep
pauses new writes to the VDI, waits for those in flight, resolves the root
node, broadcasts the op and resumes: the snapshot then holds exactly the
writes acknowledged before it. The state machine refuses such an op from a
sheep that is not the holder, so a lock taken meanwhile cannot slip past it.

Deleting a VDI or snapshot, and rolling back, frees every object that no live
root reaches any more (VdiEngine.garbage), before the op is answered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sheep import constants, proto, radix
from sheep.client import Connection
from sheep.cluster_state import ApplyResult
from sheep.errors import (
    InvalidParameters,
    NoObject,
    NoTag,
    NoVdi,
    ReadOnly,
    SheepError,
    Unavailable,
    VdiLocked,
)
from sheep.gateway import Gateway, fenced_message
from sheep.group import Group
from sheep.net import Reply, Session
from sheep.proto import FLAG_FUA, Header, Kind, Op
from sheep.vdi import Root, VdiEngine, check_range
from sheep.vdi_registry import Snapshot, Vdi, vdi_size_max

log = logging.getLogger(__name__)

settle_concurrency = 16  # objects checked at once when a VDI is settled (Vdi.unsettled)

Broadcast = Callable[[dict[str, Any]], Awaitable[ApplyResult]]

FLAG_FORWARDED = 1  # arg1 of a management op: already forwarded once, do not forward again


class GatewayObjects:
    """The engine's Objects interface over the gateway's replicated object I/O."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def read(self, oid: int, offset: int, count: int) -> bytes:
        data, _ = await self.gateway.request(Op.READ_OBJ, oid, offset, count=count)
        return bytes(data)

    async def create(self, oid: int, data: bytes | memoryview, offset: int = 0) -> None:
        # Durable (FUA) before the engine writes the entry that points at it: after
        # a power loss an entry must never point at a copy that did not survive.
        await self.gateway.request(Op.CREATE_AND_WRITE_OBJ, oid, offset, data, flags=FLAG_FUA)

    async def write(self, oid: int, offset: int, data: bytes | memoryview) -> None:
        await self.gateway.request(Op.WRITE_OBJ, oid, offset, data)

    async def discard(self, oid: int, offset: int, count: int) -> None:
        await self.gateway.request(Op.DISCARD_OBJ, oid, offset, count=count)

    async def remove(self, oid: int) -> None:
        await self.gateway.request(Op.REMOVE_OBJ, oid, copies=constants.copies_max)

    async def exists(self, oid: int) -> bool:
        try:
            await self.gateway.request(Op.READ_OBJ, oid, 0, count=0)
        except NoObject:
            return False
        return True

    async def flush(self) -> None:
        await self.gateway.request(Op.FLUSH, 0)


class WriteGate:
    """Lets writes through, or holds new ones while a snapshot waits for the old ones."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._exclusive = asyncio.Lock()

    async def enter(self) -> None:
        await self._open.wait()
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        assert self.in_flight >= 0
        if self.in_flight == 0:
            self._idle.set()

    async def closed(self, work: Callable[[], Awaitable[Any]]) -> Any:
        async with self._exclusive:
            self._open.clear()
            try:
                await self._idle.wait()
                return await work()
            finally:
                self._open.set()


def _is_text(value: Any) -> bool:
    """False for a string that cannot be encoded as UTF-8; True for anything else."""
    if not isinstance(value, str):
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Handle:
    name: str
    vdi_id: int
    snapshot_id: int | None
    writable: bool


def _holds_lock(handle: Handle, vdi: Vdi, session: Session) -> bool:
    """I/O on the VDI itself through the session holding its lock: no other sheep can
    change its tree meanwhile, so the engine may use its cached entries."""
    return (handle.writable and handle.snapshot_id is None and vdi.lock is not None
            and vdi.lock.get("session") == session.id)


class VdiService:
    def __init__(self, group: Group, gateway: Gateway, node_id: str, broadcast: Broadcast,
                 peer_connection: Callable[[str], Awaitable[Connection]]) -> None:
        self.group = group
        self.gateway = gateway
        self.node_id = node_id
        self.broadcast = broadcast
        self.peer_connection = peer_connection
        self.objects = GatewayObjects(gateway)
        self._engine: VdiEngine | None = None
        self._gates: dict[str, WriteGate] = {}
        # Settles for read-only opens, shared by the opens that wait for the same one:
        # (name, releases) -> the settle under way.
        self._settling: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._handles = itertools.count(1)
        self.io: dict[Op, Callable[[Header, bytes, Session], Awaitable[Reply]]] = {
            Op.VDI_OPEN: self.open,
            Op.VDI_CLOSE: self.close,
            Op.VDI_READ: self.read,
            Op.VDI_WRITE: self.write,
            Op.VDI_DISCARD: self.discard,
            Op.VDI_EXTENTS: self.extents,
        }
        self.admin: dict[Op, Callable[[dict[str, Any], Header], Awaitable[Any]]] = {
            Op.VDI_CREATE: self.create,
            Op.VDI_DELETE: self.delete,
            Op.VDI_SNAPSHOT: self.snapshot,
            Op.VDI_CLONE: self.clone,
            Op.VDI_ROLLBACK: self.rollback,
            Op.VDI_RESIZE: self.resize,
            Op.VDI_LIST: self.list,
            Op.VDI_SETATTR: self.setattr,
            Op.VDI_GETATTR: self.getattr,
            Op.VDI_OBJECT: self.locate,
            Op.VDI_UNLOCK: self.unlock,
        }
        proto.check_handlers(self.io, {Kind.VDI}, "VdiService.io")
        proto.check_handlers(self.admin, {Kind.VDI_ADMIN}, "VdiService.admin")

    @property
    def engine(self) -> VdiEngine:
        object_size = self.group.state.object_size
        if self._engine is None or self._engine.object_size != object_size:
            self._engine = VdiEngine(self.objects, object_size, self.group.is_frozen)
        return self._engine

    def reset(self) -> None:
        """Forget every cached node (the cluster was formatted anew)."""
        self._engine = None

    def forget_entries(self) -> None:
        """The cluster log changed something (a lock, a snapshot...): cached entries of
        writable trees may be stale."""
        if self._engine is not None:
            self._engine.forget_entries()

    # --- dispatch --------------------------------------------------------------

    async def serve_io(self, header: Header, payload: bytes, session: Session) -> Reply:
        fenced = self.gateway.fenced
        if fenced is not None and fenced.is_set():
            # Checked here too: a lookup answered from cached tree entries (an unwritten
            # object reads as zeros) does no object I/O for the gateway to refuse.
            raise Unavailable(fenced_message)
        return await self.io[Op(header.opcode)](header, payload, session)

    async def serve_admin(self, header: Header, payload: bytes) -> Reply:
        body = proto.decode_json(payload)
        if not isinstance(body, dict):
            raise InvalidParameters("VDI operations take a JSON object")
        value = await self.admin[Op(header.opcode)](body, header)
        return proto.encode_json(value), {}

    # --- looking things up -------------------------------------------------------

    def _vdi(self, name: Any) -> Vdi:
        vdi = self.group.state.vdis.vdis.get(name) if isinstance(name, str) else None
        if vdi is None:
            raise NoVdi(f"no VDI named {name!r}")
        return vdi

    def _snapshot(self, vdi: Vdi, ref: Any) -> Any:
        snap = vdi.snapshot(ref)
        if snap is None:
            raise NoTag(f"VDI {vdi.name!r} has no snapshot {ref!r}")
        return snap

    def _handle(self, header: Header, session: Session) -> Handle:
        handle = session.values.get("vdis", {}).get(header.arg0)
        if handle is None:
            raise InvalidParameters(f"no open VDI with handle {header.arg0} on this connection")
        assert isinstance(handle, Handle)
        return handle

    def _target(self, handle: Handle) -> tuple[Vdi, Root, int]:
        vdi = self.group.state.vdis.vdis.get(handle.name)
        if vdi is None or vdi.id != handle.vdi_id:
            raise NoVdi(f"VDI {handle.name!r} was deleted")
        if handle.snapshot_id is None:
            return vdi, vdi.root, vdi.size
        for snap in vdi.snapshots:
            if snap.id == handle.snapshot_id:
                return vdi, snap.root, snap.size
        raise NoTag(f"snapshot {handle.snapshot_id} of VDI {handle.name!r} was deleted")

    def _gate(self, name: str) -> WriteGate:
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = WriteGate()
        return gate

    # --- sessions and I/O ------------------------------------------------------------

    async def open(self, header: Header, payload: bytes, session: Session) -> Reply:
        body = proto.decode_json(payload)
        if not isinstance(body, dict):
            raise InvalidParameters("open takes a JSON object")
        vdi = self._vdi(body.get("name"))
        snapshot = body.get("snapshot")
        writable = bool(body.get("writable")) and snapshot is None
        snap = self._snapshot(vdi, snapshot) if snapshot is not None else None
        if writable:
            peer = session.peer
            client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
            owner = f"{body.get('owner') or 'client ' + client} (via sheep {self.node_id})"
            await self.broadcast({"type": "vdi_lock", "name": vdi.name, "node_id": self.node_id,
                                  "session": session.id, "owner": owner})
        handle_id = next(self._handles)
        handles = session.values.setdefault("vdis", {})
        handles[handle_id] = Handle(vdi.name, vdi.id, snap.id if snap else None, writable)
        if writable and not session.values.get("unlock_on_close"):
            session.values["unlock_on_close"] = True
            session.on_close(lambda: self._release(session))
        if writable:
            vdi = self._vdi(vdi.name)
            if vdi.unsettled:
                await self._settle(vdi, session)
        elif snap is None and vdi.unsettled:
            await self._settle_for_reader(vdi)
        size = snap.size if snap else vdi.size
        value = {"handle": handle_id, "name": vdi.name, "id": vdi.id, "size": size,
                 "snapshot": snap.id if snap else None, "writable": writable,
                 "object_size": self.group.state.object_size}
        return proto.encode_json(value), {}

    async def _settle_for_reader(self, vdi: Vdi) -> None:
        """A read-only open of an unsettled VDI settles it too: reads are served from
        the gateway's own replica first, so without it two readers through different
        sheep could see the half-applied write and not see it. One settle per sheep
        at a time for each unsettling; the opens that come meanwhile wait for it."""
        key = (vdi.name, vdi.releases)
        settling = self._settling.get(key)
        if settling is None:
            settling = asyncio.get_running_loop().create_task(self._settle(vdi, None))
            self._settling[key] = settling
            settling.add_done_callback(lambda _: self._settling.pop(key, None))
        await asyncio.shield(settling)

    async def _settle(self, vdi: Vdi, session: Session | None) -> None:
        """The previous writer's sheep left holding the lock: a write it had in flight
        may have reached some replicas only. Before this session writes (a new write
        would give every replica the same version and hide the difference for good),
        or reads (session None: see _settle_for_reader), each object of the writable
        generation gets its newest copy everywhere."""
        root_node = await self.engine.root_node(vdi.root)
        oids = [oid for oid in await self.engine.walk(root_node)
                if radix.generation_of(oid) == vdi.root.generation]
        started = self.gateway.clock.monotonic()
        semaphore = asyncio.Semaphore(settle_concurrency)

        async def check(oid: int) -> dict[str, Any]:
            async with semaphore:
                return await self.gateway.check_object(oid)

        reports = await asyncio.gather(*(check(oid) for oid in oids))
        repaired = sum(1 for report in reports if report.get("repaired"))
        await self.broadcast({"type": "vdi_settled", "name": vdi.name,
                              "session": session.id if session else None,
                              "releases": vdi.releases})
        log.warning("VDI %s: its previous writer's sheep left holding the lock; %d objects "
                    "checked, %d made to agree, in %.1f s", vdi.name, len(oids), repaired,
                    self.gateway.clock.monotonic() - started)

    async def _release(self, session: Session) -> None:
        for handle in session.values.get("vdis", {}).values():
            if handle.writable:
                await self._unlock_quietly(handle.name, session.id)

    async def _unlock_quietly(self, name: str, session_id: str) -> None:
        vdi = self.group.state.vdis.vdis.get(name)
        if vdi is None or vdi.lock is None or vdi.lock.get("session") != session_id:
            return
        try:
            await self.broadcast({"type": "vdi_unlock", "name": name, "session": session_id})
        except SheepError as error:
            log.warning("could not release the lock on %s: %s", name, error)

    async def close(self, header: Header, payload: bytes, session: Session) -> Reply:
        handle = self._handle(header, session)
        del session.values["vdis"][header.arg0]
        if handle.writable and not any(
                h.writable and h.name == handle.name for h in session.values["vdis"].values()):
            await self._unlock_quietly(handle.name, session.id)
        return b"", {}

    async def read(self, header: Header, payload: bytes, session: Session) -> Reply:
        handle = self._handle(header, session)
        vdi, root, size = self._target(handle)
        check_range(size, header.offset, header.count)
        return await self.engine.read(root, header.offset, header.count,
                                      cached=_holds_lock(handle, vdi, session)), {}

    def _writable(self, header: Header, session: Session) -> tuple[Handle, Vdi]:
        handle = self._handle(header, session)
        if not handle.writable:
            raise ReadOnly(f"{handle.name!r} is open read-only")
        vdi, _, _ = self._target(handle)
        if vdi.lock is None or vdi.lock.get("session") != session.id:
            raise VdiLocked(f"this connection no longer holds the lock on {vdi.name!r}")
        return handle, vdi

    async def _gated(self, header: Header, session: Session,
                     work: Callable[[Root, int], Awaitable[None]]) -> Reply:
        """A change to the VDI: through its write gate, under its lock, then reap."""
        handle, vdi = self._writable(header, session)
        check_range(vdi.size, header.offset, header.count)
        gate = self._gate(handle.name)
        await gate.enter()
        try:
            self._writable(header, session)  # still ours after waiting at the gate?
            _, root, size = self._target(handle)  # the root after any snapshot we waited for
            await work(root, size)
            await self._reap_released()
        finally:
            gate.leave()
        return b"", {}

    async def write(self, header: Header, payload: bytes, session: Session) -> Reply:
        async def work(root: Root, size: int) -> None:
            await self.engine.write(root, header.offset, payload)
            if header.flags & FLAG_FUA:
                await self.objects.flush()

        return await self._gated(header, session, work)

    async def discard(self, header: Header, payload: bytes, session: Session) -> Reply:
        async def work(root: Root, size: int) -> None:
            await self.engine.discard(root, header.offset, header.count, size)

        return await self._gated(header, session, work)

    async def _reap_released(self) -> None:
        """Free what a write stopped sharing with a deleted snapshot, at once.

        A write that copies an object away releases the original. If the
        original's generation still has a root (a snapshot, or a VDI), that root
        keeps it; if not (its snapshot was deleted while this VDI still shared
        it), it is garbage unless another live tree (a clone) still reaches it.
        Deciding here, on the writer's sheep and before the write is answered,
        means no later delete elsewhere has to remember it.
        """
        engine = self.engine
        released = engine.released
        if not released:
            return
        live = self._live_generations()
        kept = frozenset(oid for oid in released if radix.generation_of(oid) in live)
        engine.drop_released(kept)
        if kept != released:
            await self._collect([])

    def _live_generations(self) -> set[int]:
        generations = set()
        for vdi in self.group.state.vdis.vdis.values():
            generations.add(vdi.root.generation)
            generations.update(snap.root.generation for snap in vdi.snapshots)
        return generations

    async def extents(self, header: Header, payload: bytes, session: Session) -> Reply:
        handle = self._handle(header, session)
        vdi, root, size = self._target(handle)
        check_range(size, header.offset, header.count)
        extents = await self.engine.extents(root, header.offset, header.count,
                                            cached=_holds_lock(handle, vdi, session))
        value = [[e.offset, e.length, e.allocated] for e in extents]
        return proto.encode_json(value), {}

    # --- management --------------------------------------------------------------------

    async def create(self, body: dict[str, Any], header: Header) -> Any:
        result = await self.broadcast({"type": "vdi_create", "name": body.get("name"),
                                       "size": body.get("size"), "copies": body.get("copies")})
        return result.value

    async def _on_holder(self, vdi: Vdi, header: Header, body: dict[str, Any],
                         work: Callable[[str | None], Awaitable[Any]]) -> Any:
        """Run work where the VDI's writer is: here with writes paused, or forwarded."""
        lock = vdi.lock
        if lock is not None and lock.get("node_id") != self.node_id:
            if header.arg1 & FLAG_FORWARDED:
                raise VdiLocked(f"VDI {vdi.name!r} moved to another writer; try again")
            return await self._forward(lock["node_id"], header, body)
        if lock is None:
            return await work(None)
        return await self._gate(vdi.name).closed(lambda: work(lock.get("session")))

    async def _forward(self, node_id: str, header: Header, body: dict[str, Any]) -> Any:
        connection = await self.peer_connection(node_id)
        forwarded = Header(opcode=header.opcode, arg1=header.arg1 | FLAG_FORWARDED)
        _, data = await connection.call(forwarded, proto.encode_json(body),
                                        timeout_ms=constants.op_timeout_ms)
        return proto.decode_json(data)

    async def snapshot(self, body: dict[str, Any], header: Header) -> Any:
        vdi = self._vdi(body.get("name"))

        async def work(session: str | None) -> Any:
            current = self._vdi(vdi.name)
            base = await self.engine.root_node(current.root)
            result = await self.broadcast({
                "type": "vdi_snapshot", "name": current.name, "tag": body.get("tag", ""),
                "generation": current.root.generation, "base": base, "session": session})
            return result.value

        return await self._on_holder(vdi, header, body, work)

    async def resize(self, body: dict[str, Any], header: Header) -> Any:
        vdi = self._vdi(body.get("name"))
        size = body.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise InvalidParameters(f"size must be a positive number of bytes, not {size!r}")
        object_size = self.group.state.object_size

        async def work(session: str | None) -> Any:
            current = self._vdi(vdi.name)
            if size < current.size:
                raise InvalidParameters(
                    f"VDI {current.name!r} can only grow ({size} < {current.size} bytes)")
            limit = vdi_size_max(object_size)
            if size > limit:
                raise InvalidParameters(f"size {size} exceeds the largest VDI ({limit} bytes)")
            depth = radix.depth_for(-(-size // object_size))
            root = await self.engine.grow(current.root, depth)
            try:
                result = await self.broadcast({"type": "vdi_resize", "name": current.name,
                                               "size": size, "root": root.to_json(),
                                               "session": session})
            except SheepError:
                for level in range(current.root.depth + 1, depth + 1):  # the grown levels
                    node = radix.node_oid(current.root.generation, level, 0)
                    try:
                        await self.objects.remove(node)
                    except NoObject:
                        pass
                    self.engine.forget({node})
                raise
            return result.value

        return await self._on_holder(vdi, header, body, work)

    async def clone(self, body: dict[str, Any], header: Header) -> Any:
        source = self._vdi(body.get("source"))
        snap = self._snapshot(source, body.get("snapshot"))
        base = await self.engine.root_node(snap.root)
        result = await self.broadcast({"type": "vdi_clone", "source": source.name,
                                       "snapshot": snap.id, "name": body.get("name"),
                                       "base": base})
        return result.value

    async def rollback(self, body: dict[str, Any], header: Header) -> Any:
        vdi = self._vdi(body.get("name"))
        snap = self._snapshot(vdi, body.get("snapshot"))
        base = await self.engine.root_node(snap.root)
        result = await self.broadcast({"type": "vdi_rollback", "name": vdi.name,
                                       "snapshot": snap.id, "base": base,
                                       "force": bool(body.get("force"))})
        freed = await self._collect([Root.from_json(r) for r in result.value["dead"]])
        return {**result.value["vdi"], "freed_objects": freed}

    async def delete(self, body: dict[str, Any], header: Header) -> Any:
        vdi = self._vdi(body.get("name"))
        op: dict[str, Any] = {"type": "vdi_delete", "name": vdi.name,
                              "force": bool(body.get("force"))}
        if body.get("snapshot") is not None:
            op["snapshot"] = self._snapshot(vdi, body["snapshot"]).id
        result = await self.broadcast(op)
        freed = await self._collect([Root.from_json(r) for r in result.value["dead"]])
        return {"name": vdi.name, "snapshot": body.get("snapshot"), "freed_objects": freed}

    async def _collect(self, dead_roots: list[Root]) -> int:
        """Remove every object the dead roots reached that no live root reaches."""
        engine = self.engine
        dead = [await engine.root_node(root) for root in dead_roots]
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
                await self.objects.remove(oid)
            except NoObject:
                pass
        engine.forget(garbage)
        return len(garbage)

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
        if not candidates:
            return 0
        engine = self.engine
        reachable: set[int] = set()
        for vdi in list(self.group.state.vdis.vdis.values()):
            for root in [vdi.root, *(s.root for s in vdi.snapshots)]:
                node_oid = await engine.root_node(root)
                if node_oid:
                    await engine.walk(node_oid, found=reachable)
        garbage = sorted(candidates - reachable, key=lambda oid: (
            radix.is_tree(oid), radix.node_level(oid) if radix.is_tree(oid) else 0))
        if garbage:
            await self._durable_before_free()
        for oid in garbage:
            try:
                await self.objects.remove(oid)
            except NoObject:
                pass
        engine.forget(set(garbage))
        if garbage:
            log.info("sweep: removed %d objects that no VDI or snapshot reaches", len(garbage))
        return len(garbage)

    async def list(self, body: dict[str, Any], header: Header) -> Any:
        names = body.get("names")
        usage = body.get("usage", True)
        result = []
        for vdi in list(self.group.state.vdis.vdis.values()):
            if names and vdi.name not in names:
                continue
            entries: list[tuple[Snapshot | None, Root, int, float]] = [
                (None, vdi.root, vdi.size, vdi.ctime)]
            entries += [(snap, snap.root, snap.size, snap.time) for snap in vdi.snapshots]
            for snap, root, size, ctime in entries:
                item: dict[str, Any] = {
                    "name": vdi.name, "id": snap.id if snap else vdi.id, "size": size,
                    "ctime": ctime, "snapshot": snap is not None,
                    "tag": snap.tag if snap else "", "copies": vdi.copies,
                    "parent": vdi.parent, "generation": root.generation,
                    "lock": None if snap else vdi.lock, "vdi_id": vdi.id,
                    "unsettled": False if snap else vdi.unsettled, "attrs": len(vdi.attrs)}
                if usage:
                    used, shared = await self._usage(root)
                    item["used"] = used
                    item["shared"] = shared
                result.append(item)
        return result

    async def _usage(self, root: Root) -> tuple[int, int]:
        """Bytes in data objects this root's generation wrote, and in those it shares."""
        node = await self.engine.root_node(root)
        if node == 0:
            return 0, 0
        objects = await self.engine.walk(node)
        object_size = self.group.state.object_size
        used = shared = 0
        for oid in objects:
            if radix.is_data(oid):
                if radix.generation_of(oid) == root.generation:
                    used += object_size
                else:
                    shared += object_size
        return used, shared

    async def setattr(self, body: dict[str, Any], header: Header) -> Any:
        vdi = self._vdi(body.get("name"))
        # JSON carries lone surrogates (undecodable bytes from argv or stdin) that
        # are not text: refused here, they never reach the state machine.
        for part in ("key", "value"):
            if not _is_text(body.get(part)):
                raise InvalidParameters(f"attribute {part} must be valid UTF-8 text")
        await self.broadcast({"type": "vdi_setattr", "name": vdi.name, "key": body.get("key"),
                              "value": body.get("value"),
                              "exclusive": bool(body.get("exclusive"))})
        return {}

    async def getattr(self, body: dict[str, Any], header: Header) -> Any:
        vdi = self._vdi(body.get("name"))
        key = body.get("key")
        if key is None:
            return dict(vdi.attrs)
        if key not in vdi.attrs:
            raise NoObject(f"VDI {vdi.name!r} has no attribute {key!r}")
        return {"key": key, "value": vdi.attrs[key]}

    async def locate(self, body: dict[str, Any], header: Header) -> Any:
        vdi = self._vdi(body.get("name"))
        root, size = vdi.root, vdi.size
        if body.get("snapshot") is not None:
            snap = self._snapshot(vdi, body["snapshot"])
            root, size = snap.root, snap.size
        object_size = self.group.state.object_size
        index = body.get("index", 0)
        count = -(-size // object_size)
        if not isinstance(index, int) or not 0 <= index < count:
            raise InvalidParameters(f"index must be 0 to {count - 1}, not {index!r}")
        oid = await self.engine.lookup(root, index)
        value: dict[str, Any] = {"name": vdi.name, "index": index, "oid": oid,
                                 "offset": index * object_size, "object_size": object_size}
        if oid:
            data, _ = await self.gateway.request(Op.STAT_OBJ, oid)
            value.update(proto.decode_json(data))
        return value

    async def unlock(self, body: dict[str, Any], header: Header) -> Any:
        vdi = self._vdi(body.get("name"))
        result = await self.broadcast({"type": "vdi_unlock", "name": vdi.name})
        return result.value
