"""VDIs on the gateway: open sessions and byte I/O; the management ops and garbage
collection are delegated (sheep/vdi_admin.py, sheep/vdi_gc.py).

A client opens a VDI (or a snapshot, read-only) on its connection and gets a
handle; reads and writes name the handle and a byte offset. Opening never locks:
a read-write handle takes the VDI's cluster-wide lock (an ordered cluster op) at
its first change (a write, a trim or a flush naming it); the lock goes when the
connection ends, or when its sheep dies (the state machine drops a dead node's
locks).

Writes to a VDI pass its write gate (WriteGate), which a snapshot or resize on
the lock holder's sheep closes while it runs (VdiService.paused), so the
snapshot holds exactly the writes acknowledged before it. A write that copied
an object away from a deleted snapshot's generation frees the original before
it is answered (Collector.reap_released).

This class owns what sessions and management share: the engine (its cached
tree entries) and the write gates; it builds the VdiAdmin and the Collector.
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
from sheep.errors import (
    InvalidParameters,
    NoObject,
    NoTag,
    NoVdi,
    ReadOnly,
    SheepError,
    Unavailable,
    VdiLocked,
    fenced_message,
)
from sheep.gateway import Gateway
from sheep.group import Group
from sheep.net import Reply, Session
from sheep.proto import FLAG_FUA, Header, Kind, Op
from sheep.vdi import Root, VdiEngine, check_range
from sheep.vdi_admin import Broadcast, VdiAdmin, snapshot_named, vdi_named
from sheep.vdi_gc import Collector
from sheep.vdi_registry import Vdi

log = logging.getLogger(__name__)

settle_concurrency = 16  # objects checked at once when a VDI is settled (Vdi.unsettled)
unlock_retry_first_s = 0.2  # a lock release the cluster log refused is retried after this,
unlock_retry_max_s = 5.0  # doubling up to this


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


@dataclass
class Handle:
    name: str
    vdi_id: int
    snapshot_id: int | None
    writable: bool  # may write: the lock is taken at its first change, never at open
    owner: str = ""  # who the lock will name (dog vdi lock list)


def _holds_lock(handle: Handle, vdi: Vdi, session: Session) -> bool:
    """I/O on the VDI itself through the session holding its lock: no other sheep can
    change its tree meanwhile, so the engine may use its cached entries."""
    return (handle.writable and handle.snapshot_id is None and vdi.lock is not None
            and vdi.lock.get("session") == session.id)


owner_max_chars = 256  # who a lock names (dog vdi lock list): it goes into the cluster log


class VdiService:
    def __init__(self, group: Group, gateway: Gateway, node_id: str, broadcast: Broadcast,
                 peer_connection: Callable[[str], Awaitable[Connection]]) -> None:
        self.group = group
        self.gateway = gateway
        self.node_id = node_id
        self.broadcast = broadcast
        self.objects = GatewayObjects(gateway)
        self._engine: VdiEngine | None = None
        self._gates: dict[str, WriteGate] = {}
        # Settles for read-only opens, shared by the opens that wait for the same one:
        # (name, releases) -> the settle under way.
        self._settling: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._handles = itertools.count(1)
        self._unlocking: set[asyncio.Task[None]] = set()  # releases retried (_unlock_quietly)
        self.io: dict[Op, Callable[[Header, bytes, Session], Awaitable[Reply]]] = {
            Op.VDI_OPEN: self.open,
            Op.VDI_CLOSE: self.close,
            Op.VDI_READ: self.read,
            Op.VDI_WRITE: self.write,
            Op.VDI_DISCARD: self.discard,
            Op.VDI_EXTENTS: self.extents,
        }
        proto.check_handlers(self.io, {Kind.VDI}, "VdiService.io")
        self.gc = Collector(group, lambda: self.engine, self.objects, gateway)
        self.admin = VdiAdmin(group, gateway, node_id, broadcast, peer_connection,
                              self.objects, lambda: self.engine, self.gc, self.paused)

    @property
    def engine(self) -> VdiEngine:
        object_size = self.group.state.object_size
        if self._engine is None or self._engine.object_size != object_size:
            self._engine = VdiEngine(self.objects, object_size, self.group.is_frozen,
                                     self._root_made)
        return self._engine

    async def _root_made(self, root: Root) -> None:
        """Record in the cluster log that the writable generation's own root node
        exists (Root.made): from then on nobody takes the holders' silence for its
        absence."""
        vdi = self.group.state.vdis.by_generation(root.generation)
        if vdi is None or vdi.root.generation != root.generation or vdi.root.made:
            return
        await self.broadcast({"type": "vdi_root_made", "name": vdi.name,
                              "generation": root.generation, "depth": root.depth})

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
        if self.gateway.fence_check():
            # Checked here too: a lookup answered from cached tree entries (an unwritten
            # object reads as zeros) does no object I/O for the gateway to refuse.
            raise Unavailable(fenced_message)
        return await self.io[Op(header.opcode)](header, payload, session)

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

    async def paused(self, name: str, work: Callable[[], Awaitable[Any]]) -> Any:
        """Run work with new writes to the VDI held and those in flight done."""
        return await self._gate(name).closed(work)

    # --- sessions and I/O ------------------------------------------------------------

    async def open(self, header: Header, payload: bytes, session: Session) -> Reply:
        body = proto.decode_json(payload)
        if not isinstance(body, dict):
            raise InvalidParameters("open takes a JSON object")
        vdi = vdi_named(self.group, body.get("name"))
        snapshot = body.get("snapshot")
        writable = bool(body.get("writable")) and snapshot is None
        snap = snapshot_named(vdi, snapshot) if snapshot is not None else None
        if writable:
            peer = session.peer
            client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
            named = body.get("owner")
            if named is not None and (not isinstance(named, str) or len(named) > owner_max_chars
                                      or not named.isprintable()):
                raise InvalidParameters(f"owner must be printable text of at most"
                                        f" {owner_max_chars} characters")
            owner = f"{named or 'client ' + client} (via sheep {self.node_id})"
        handle_id = next(self._handles)
        handles = session.values.setdefault("vdis", {})
        handles[handle_id] = Handle(vdi.name, vdi.id, snap.id if snap else None, writable,
                                    owner if writable else "")
        if writable and not session.values.get("unlock_on_close"):
            session.values["unlock_on_close"] = True
            session.on_close(lambda: self._release(session))
        if snap is None and vdi.unsettled:  # a writer settles it again when it locks
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
                return await self.gateway.repairer.check_object(oid)

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
        """Release the session's lock on name. If the cluster log cannot take the
        release now (its coordination service is electing, say), it is retried in the
        background until it is logged or the lock is no longer the session's (its
        sheep was declared dead): a closed session must never keep a VDI locked."""
        if not await self._unlock_once(name, session_id):
            self._unlock_soon(name, session_id)

    def _unlock_soon(self, name: str, session_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._unlock_later(name, session_id))
        self._unlocking.add(task)
        task.add_done_callback(self._unlocking.discard)

    async def _unlock_once(self, name: str, session_id: str) -> bool:
        vdi = self.group.state.vdis.vdis.get(name)
        if vdi is None or vdi.lock is None or vdi.lock.get("session") != session_id:
            return True
        try:
            await self.broadcast({"type": "vdi_unlock", "name": name, "session": session_id})
        except SheepError as error:
            log.warning("could not release the lock on %s: %s; retrying", name, error)
            return False
        return True

    async def _unlock_later(self, name: str, session_id: str) -> None:
        delay = unlock_retry_first_s
        while True:
            await self.gateway.clock.sleep(delay)
            if await self._unlock_once(name, session_id):
                return
            delay = min(delay * 2, unlock_retry_max_s)

    async def close(self, header: Header, payload: bytes, session: Session) -> Reply:
        handle = self._handle(header, session)
        del session.values["vdis"][header.arg0]
        if handle.writable and not any(
                h.writable and h.name == handle.name for h in session.values["vdis"].values()):
            # Let go of by its holder, not taken away: a later open may lock it again.
            session.values.get("held", set()).discard(handle.name)
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

    async def locked(self, header: Header, session: Session) -> tuple[Handle, Vdi]:
        """The handle's VDI under this session's lock, taken now if this is its first
        change (a write, a trim, a flush). Attaching never locks: readers, and a
        migration's destination until it writes, sit beside the writer. A session
        that held the lock and lost it (forced away) does not take it back: its
        writes fail from then on, where silently locking again would interleave
        them with the new holder's."""
        handle = self._handle(header, session)
        if not handle.writable:
            raise ReadOnly(f"{handle.name!r} is open read-only")
        vdi, _, _ = self._target(handle)
        if vdi.lock is not None and vdi.lock.get("session") == session.id:
            return handle, vdi
        held: set[str] = session.values.setdefault("held", set())
        if handle.name in held:
            raise VdiLocked(f"this connection no longer holds the lock on {vdi.name!r}")
        locking: dict[str, asyncio.Lock] = session.values.setdefault("locking", {})
        async with locking.setdefault(handle.name, asyncio.Lock()):
            vdi, _, _ = self._target(handle)
            if vdi.lock is None or vdi.lock.get("session") != session.id:
                if handle.name in held:
                    raise VdiLocked(f"this connection no longer holds the lock on {vdi.name!r}")
                await self.broadcast({"type": "vdi_lock", "name": vdi.name,
                                      "node_id": self.node_id, "session": session.id,
                                      "owner": handle.owner})
                held.add(handle.name)
                vdi, _, _ = self._target(handle)
                if vdi.unsettled:
                    await self._settle(vdi, session)
        return self._writable(header, session)

    async def _gated(self, header: Header, session: Session,
                     work: Callable[[Root, int], Awaitable[None]]) -> Reply:
        """A change to the VDI: through its write gate, under its lock, then reap."""
        handle, vdi = await self.locked(header, session)
        check_range(vdi.size, header.offset, header.count)
        gate = self._gate(handle.name)
        await gate.enter()
        try:
            self._writable(header, session)  # still ours after waiting at the gate?
            _, root, size = self._target(handle)  # the root after any snapshot we waited for
            await work(root, size)
            await self.gc.reap_released()
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

    async def extents(self, header: Header, payload: bytes, session: Session) -> Reply:
        handle = self._handle(header, session)
        vdi, root, size = self._target(handle)
        check_range(size, header.offset, header.count)
        extents = await self.engine.extents(root, header.offset, header.count,
                                            cached=_holds_lock(handle, vdi, session))
        value = [[e.offset, e.length, e.allocated] for e in extents]
        return proto.encode_json(value), {}
