"""VDIs on the gateway: open sessions and byte I/O; the management ops and garbage
collection are delegated (sheep/vdi_admin.py, sheep/vdi_gc.py).

A client opens a VDI (or a snapshot, read-only) on its connection and gets a
handle; reads and writes name the handle and a byte offset. Opening never locks:
a read-write handle takes the VDI's cluster-wide lock (an ordered cluster op) at
its first change (a write, a trim or a flush naming it); the lock goes when the
connection ends, or when its sheep dies (the state machine drops a dead node's
locks). Who contends for a lock is a connection, or one client of it when its
opens name one (the NBD plugin names each NBD client): Handle.contender.

A contender whose lock someone else holds asks the holder's sheep to hand it
over (VdiService.handoff): granted once the holder has flushed everything it
wrote and been idle for handoff_idle_s, which is what a live migration's source
does at the switchover. The old holder is fenced from then on: its writes fail,
saying the lock moved. While the holder keeps writing, the contender asks again
until handoff_wait_s has passed, then is refused (VDI_LOCKED).

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
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sheep import changes, constants, proto, radix
from sheep.client import Connection
from sheep.errors import (
    InvalidParameters,
    NetworkError,
    NoObject,
    NoTag,
    NoVdi,
    ReadOnly,
    SheepError,
    ShuttingDown,
    Timeout,
    Unavailable,
    VdiLocked,
    fenced_message,
)
from sheep.gateway import Gateway
from sheep.group import Group
from sheep.net import Reply, Session
from sheep.proto import FLAG_FUA, FLAG_MAP, FLAG_SPARSE, Header, Kind, Op
from sheep.vdi import Root, VdiEngine, check_range
from sheep.vdi_admin import Broadcast, VdiAdmin, snapshot_named, vdi_named
from sheep.vdi_changes import ChangeLog
from sheep.vdi_gc import Collector
from sheep.vdi_registry import Vdi

log = logging.getLogger(__name__)

settle_concurrency = 16  # objects checked at once when a VDI is settled (Vdi.unsettled)
unlock_retry_first_s = 0.2  # a lock release the cluster log refused is retried after this,
unlock_retry_max_s = 5.0  # doubling up to this
handoff_idle_s = 0.5  # a holder flushed and idle this long hands its lock over
handoff_wait_s = 3.0  # a contender asks that long, then is refused (sheep --lock-handoff-wait)
# A holder whose sheep does not answer is waited for this long besides: if that sheep
# is cut off, the cluster declares it dead meanwhile, which releases its locks.
handoff_unreachable_wait_s = 25.0  # under a client call's 30 s timeout (peer_timeout_ms)
handoff_poll_s = 0.1  # between two asks
# An ask the holder's sheep does not answer by then is asked again (a silent cut would
# hold it for the whole request timeout); an answer granted too late is seen in the log.
handoff_ask_ms = 5_000
client_max_chars = 128  # the client an open names (its contender within the connection)


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

    async def create_sparse(self, oid: int, extents: list[tuple[int, bytes]]) -> None:
        object_size = self.gateway.group.state.object_size
        await self.gateway.request(Op.CREATE_AND_WRITE_OBJ, oid, 0,
                                   proto.encode_extents(extents),  # type: ignore[arg-type]
                                   count=object_size, flags=FLAG_FUA | FLAG_SPARSE)

    async def write(self, oid: int, offset: int, data: bytes | memoryview,
                    fua: bool = False) -> None:
        await self.gateway.request(Op.WRITE_OBJ, oid, offset, data,
                                   flags=FLAG_FUA if fua else 0)

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

    async def data_map(self, oid: int) -> int:
        """The object's allocation (sheep/changes.py mask) as a verified copy reports
        it: every copy holds the same bytes, so a hole in one is zeros in all. Without
        such a copy, the whole object (it may hold data anywhere)."""
        data, _ = await self.gateway.request(Op.STAT_OBJ, oid, flags=FLAG_MAP)
        for replica in proto.decode_json(data).get("replicas", []):
            if ("map" in replica and not replica.get("unverified")
                    and not replica.get("damaged") and not replica.get("doubtful")):
                try:
                    return int(str(replica["map"]), 16) & changes.whole(
                        self.gateway.group.state.object_size)
                except ValueError:
                    continue
        return changes.whole(self.gateway.group.state.object_size)


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
        # Woken by a reopening, a write may find the gate closed again by the time it
        # runs (a snapshot or handoff that was queued behind the last one): it waits on.
        while not self._open.is_set():
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
    owner: str = ""  # who opened it: the lock names it (dog vdi lock list)
    contender: str = ""  # who contends for the lock: the session, or "SESSION/CLIENT"
    client: str = ""  # the client the open named, if any
    peer: str = ""  # the connection's address
    since: float = 0.0  # when it was opened (wall clock)
    # The contender this open continues (the NBD plugin failing over to this sheep):
    # it takes the lock only if that one's lock is gone, never by a handoff.
    resumed: tuple[str, ...] = ()
    fenced: bool = False  # resumed, and the lock had moved to someone else meanwhile
    # A writer's first flush goes to every member: its client may have written the
    # VDI through another sheep before (a failover), whose changes this one does not
    # know (Gateway.flush_changed).
    flushed_everywhere: bool = False

    def attachment(self, node_id: str, vdi: Vdi | None) -> dict[str, Any]:
        """What dog vdi lock list shows of it."""
        holds = vdi is not None and _holds_lock(self, vdi)
        return {"name": self.name, "snapshot": self.snapshot_id,
                "mode": "rw" if self.writable else "ro", "holds_lock": holds,
                "owner": self.owner, "client": self.client, "peer": self.peer,
                "node_id": node_id, "since": self.since}


def _holds_lock(handle: Handle, vdi: Vdi) -> bool:
    """I/O on the VDI itself by the contender holding its lock: no other sheep can
    change its tree meanwhile, so the engine may use its cached entries."""
    return (handle.writable and handle.snapshot_id is None and vdi.lock is not None
            and vdi.lock.get("session") == handle.contender)


@dataclass
class Writer:
    """What a lock holder's sheep knows of its activity: what a handoff asks about."""

    name: str
    changes: int = 0  # writes and trims begun
    flushed: int = 0  # of those, how many a flush (or their own FUA) made durable
    in_flight: int = 0
    taking: int = 0  # changes waiting for the lock to be logged as theirs
    # Changes and flushes arrived and not yet answered: waiting in the I/O scheduler,
    # for the lock or at the write gate, or running (VdiService.arriving).
    queued: int = 0
    last_change: float = float("-inf")  # monotonic: when the latest change began or ended

    def begin(self, now: float) -> tuple[int, bool]:
        self.changes += 1
        self.in_flight += 1
        self.last_change = now
        return self.changes, self.flushed == self.changes - 1

    def end(self, now: float, change: tuple[int, bool], durable: bool) -> None:
        self.in_flight -= 1
        self.last_change = now
        number, clean_before = change
        if durable and clean_before:  # a FUA write to a clean VDI leaves it clean
            self.flushed = max(self.flushed, number)

    def busy(self, now: float) -> str | None:
        """Why its lock cannot be handed over now, or None."""
        if self.in_flight or self.taking or self.queued:
            count = max(self.in_flight, self.queued) + self.taking
            return f"{count} of its writes are in flight"
        if self.flushed < self.changes:
            return "it has not flushed its latest writes"
        quiet = now - self.last_change
        if quiet < handoff_idle_s:
            return f"it wrote {quiet:.2f} s ago (a handoff needs {handoff_idle_s:g} s idle)"
        return None


# A handoff's ask that got no answer (the holder's sheep dead, cut off or stopping),
# as opposed to one it answered with a refusal.
_unanswered = (NetworkError, Timeout, Unavailable, ShuttingDown)

owner_max_chars = 256  # who a lock names (dog vdi lock list): it goes into the cluster log
node_id_max_chars = 320  # address:port/RANDOM, the address a host name of up to 253
# A contender: the session id (16 hex digits), then "/CLIENT".
contender_max_chars = 32 + client_max_chars
# A lock's owner: what the open named, " (via sheep NODE_ID)".
lock_owner_max_chars = owner_max_chars + len(" (via sheep )") + node_id_max_chars


resumed_max = 8  # earlier contenders one open may resume


def _contenders(value: Any) -> tuple[str, ...]:
    """VDI_OPEN's "resume": the contenders (one, or a list) a failing-over client
    was, any of which may still hold the lock."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if (not isinstance(items, list) or len(items) > resumed_max
            or not all(isinstance(item, str) and 0 < len(item) <= contender_max_chars
                       and item.isprintable() for item in items)):
        raise InvalidParameters(f"resume names at most {resumed_max} earlier contenders, each"
                                f" printable text of at most {contender_max_chars} characters")
    return tuple(items)


def _text(body: dict[str, Any], key: str, limit: int) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise InvalidParameters(f"{key} must be printable text of at most {limit} characters")
    return value


class VdiService:
    def __init__(self, group: Group, gateway: Gateway, node_id: str, broadcast: Broadcast,
                 peer_connection: Callable[[str], Awaitable[Connection]],
                 handoff_wait: float = handoff_wait_s) -> None:
        self.group = group
        self.handoff_wait_s = handoff_wait
        self.gateway = gateway
        self.node_id = node_id
        self.broadcast = broadcast
        self.peer_connection = peer_connection
        self.objects = GatewayObjects(gateway)
        self.changes = ChangeLog(self.objects, lambda: self.group.state.object_size)
        self._engine: VdiEngine | None = None
        self._gates: dict[str, WriteGate] = {}
        # Settles for read-only opens, shared by the opens that wait for the same one:
        # (name, releases) -> the settle under way.
        self._settling: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._handles = itertools.count(1)
        self._unlocking: set[asyncio.Task[None]] = set()  # releases retried (_unlock_quietly)
        self._attached: dict[int, Handle] = {}  # every handle open here, by id
        # Lock holders here (or would-be ones), by (contender, VDI name).
        self._writers: dict[tuple[str, str], Writer] = {}
        # (contender, VDI) whose lock this sheep sent away, the outcome maybe unknown:
        # fenced as if it had moved (until the contender's handles close).
        self._handing: set[tuple[str, str]] = set()
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
                              self.objects, lambda: self.engine, self.gc, self.paused,
                              self.handoff, self.attachments, self.changes.save,
                              self.changes.note, self.as_writer)

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

    @property
    def busy(self) -> str:
        """Why this sheep's VDI layer is not idle ("" when it is): VDIs still attached,
        or change masks being saved (what the simulator waits out before it checks)."""
        if self._attached:
            return f"{len(self._attached)} VDI handles open"
        if self.changes.saving:
            return "change masks being saved"
        return ""

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
        vdis = self.group.state.vdis.vdis
        vdi = vdis.get(handle.name)
        if vdi is None or vdi.id != handle.vdi_id:
            renamed = next((v.name for v in vdis.values() if v.id == handle.vdi_id), None)
            if renamed is not None:  # handles, gates and queues go by name: open it anew
                raise NoVdi(f"VDI {handle.name!r} was renamed to {renamed!r}: open it by"
                            " its new name")
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

    async def as_writer(self, name: str, owner: str,
                        work: Callable[[str], Awaitable[Any]]) -> Any:
        """Run work(contender) as the writer of a VDI whose lock nobody holds (a shrink
        changes its tree): under a lock of its own, taken now and let go after, with
        its write gate closed, so a contender that comes meanwhile waits for the
        handoff it asks for (which needs the gate). A VDI whose last writer's sheep
        left mid-write is settled first, as a writer's first change does."""
        vdi = vdi_named(self.group, name)
        contender = f"{self.gateway.world.token(8)}/admin"  # as an open's SESSION/CLIENT
        await self.broadcast({"type": "vdi_lock", "name": vdi.name, "node_id": self.node_id,
                              "session": contender,
                              "owner": f"{owner} (via sheep {self.node_id})"})
        handle = Handle(vdi.name, vdi.id, None, True, owner, contender)

        async def run() -> Any:
            current, _, _ = self._target(handle)
            if current.unsettled:
                await self._settle(current, contender)
            return await work(contender)

        try:
            return await self.paused(vdi.name, run)
        finally:
            self._handing.discard((contender, vdi.name))
            await self._let_go(handle)

    # --- sessions and I/O ------------------------------------------------------------

    async def open(self, header: Header, payload: bytes, session: Session) -> Reply:
        body = proto.decode_json(payload)
        if not isinstance(body, dict):
            raise InvalidParameters("open takes a JSON object")
        vdi = vdi_named(self.group, body.get("name"))
        snapshot = body.get("snapshot")
        writable = bool(body.get("writable")) and snapshot is None
        snap = snapshot_named(vdi, snapshot) if snapshot is not None else None
        peer = session.peer
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        named = _text(body, "owner", owner_max_chars)
        client = _text(body, "client", client_max_chars)
        resumed = _contenders(body.get("resume"))
        owner = f"{named or 'client ' + address} (via sheep {self.node_id})"
        handle_id = next(self._handles)
        handle = Handle(vdi.name, vdi.id, snap.id if snap else None, writable, owner,
                        f"{session.id}/{client}" if client else session.id, client, address,
                        self.gateway.clock.wall(), resumed if writable else ())
        session.values.setdefault("vdis", {})[handle_id] = handle
        self._attached[handle_id] = handle
        if not session.values.get("release_on_close"):
            session.values["release_on_close"] = True
            session.on_close(lambda: self._release(session))
        if snap is None and vdi.unsettled:  # a writer settles it again when it locks
            await self._settle_for_reader(vdi)
        size = snap.size if snap else vdi.size
        value = {"handle": handle_id, "name": vdi.name, "id": vdi.id, "size": size,
                 "snapshot": snap.id if snap else None, "writable": writable,
                 "object_size": self.group.state.object_size, "contender": handle.contender}
        return proto.encode_json(value), {}

    async def attachments(self, body: dict[str, Any], header: Header) -> Any:
        """Every VDI open on this sheep, read-only or not, and who holds which lock."""
        vdis = self.group.state.vdis.vdis
        return [handle.attachment(self.node_id, vdis.get(handle.name))
                for handle in self._attached.values()]

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

    async def _settle(self, vdi: Vdi, contender: str | None) -> None:
        """The previous writer's sheep left holding the lock: a write it had in flight
        may have reached some replicas only. Before this contender writes (a new write
        would give every replica the same version and hide the difference for good),
        or anyone reads (contender None: see _settle_for_reader), each object of the
        writable generation gets its newest copy everywhere."""
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
                              "session": contender, "releases": vdi.releases})
        log.warning("VDI %s: its previous writer's sheep left holding the lock; %d objects "
                    "checked, %d made to agree, in %.1f s", vdi.name, len(oids), repaired,
                    self.gateway.clock.monotonic() - started)

    async def _release(self, session: Session) -> None:
        for handle_id, handle in session.values.get("vdis", {}).items():
            self._attached.pop(handle_id, None)
            self._writers.pop((handle.contender, handle.name), None)
            self._handing.discard((handle.contender, handle.name))
            if handle.writable:
                await self._let_go_paused(handle)

    async def _let_go_paused(self, handle: Handle) -> None:
        """_let_go once the handle's writes in flight are done: the next holder must
        never see one of them land on top of its own."""
        vdi = self.group.state.vdis.vdis.get(handle.name)
        if vdi is None or vdi.lock is None or vdi.lock.get("session") != handle.contender:
            await self._let_go(handle)  # not its lock: nothing to wait for
        else:
            await self.paused(handle.name, lambda: self._let_go(handle))

    async def _let_go(self, handle: Handle) -> None:
        """A writable handle's last close: save the change masks of what it wrote
        (sheep/changes.py), then release its lock. Masks that cannot be saved make
        the release mark the generation untracked: diffs across it then take each
        changed object whole, rather than miss a change."""
        vdi = self.group.state.vdis.vdis.get(handle.name)
        untracked = False
        if vdi is not None and vdi.lock is not None and vdi.lock.get("session") == handle.contender:
            try:
                await self.changes.save(vdi.root.generation)
            except SheepError as error:
                log.warning("VDI %s: could not save its change masks (%s); its generation"
                            " is marked untracked", handle.name, error)
                untracked = True
                self.changes.forget(vdi.root.generation)
        await self._unlock_quietly(handle.name, handle.contender, untracked)

    async def _unlock_quietly(self, name: str, contender: str, untracked: bool = False) -> None:
        """Release the contender's lock on name. If the cluster log cannot take the
        release now (its coordination service is electing, say), it is retried in the
        background until it is logged or the lock is no longer the contender's (its
        sheep was declared dead): a closed session must never keep a VDI locked."""
        if not await self._unlock_once(name, contender, untracked):
            self._unlock_soon(name, contender, untracked)

    def _unlock_soon(self, name: str, contender: str, untracked: bool) -> None:
        task = asyncio.get_running_loop().create_task(
            self._unlock_later(name, contender, untracked))
        self._unlocking.add(task)
        task.add_done_callback(self._unlocking.discard)

    async def _unlock_once(self, name: str, contender: str, untracked: bool) -> bool:
        vdi = self.group.state.vdis.vdis.get(name)
        if vdi is None or vdi.lock is None or vdi.lock.get("session") != contender:
            return True
        try:
            await self.broadcast({"type": "vdi_unlock", "name": name, "session": contender,
                                  "untracked": untracked})
        except SheepError as error:
            log.warning("could not release the lock on %s: %s; retrying", name, error)
            return False
        return True

    async def _unlock_later(self, name: str, contender: str, untracked: bool) -> None:
        delay = unlock_retry_first_s
        while True:
            await self.gateway.clock.sleep(delay)
            if await self._unlock_once(name, contender, untracked):
                return
            delay = min(delay * 2, unlock_retry_max_s)

    async def close(self, header: Header, payload: bytes, session: Session) -> Reply:
        handle = self._handle(header, session)
        del session.values["vdis"][header.arg0]
        self._attached.pop(header.arg0, None)
        if handle.writable and not any(
                h.writable and h.name == handle.name and h.contender == handle.contender
                for h in session.values["vdis"].values()):
            # Let go of by its holder, not taken away: a later open may lock it again.
            session.values.get("held", set()).discard((handle.contender, handle.name))
            self._writers.pop((handle.contender, handle.name), None)
            self._handing.discard((handle.contender, handle.name))
            await self._let_go_paused(handle)
        return b"", {}

    async def read(self, header: Header, payload: bytes, session: Session) -> Reply:
        handle = self._handle(header, session)
        vdi, root, size = self._target(handle)
        check_range(size, header.offset, header.count)
        return await self.engine.read(root, header.offset, header.count,
                                      cached=_holds_lock(handle, vdi)), {}

    def _lost(self, vdi: Vdi, handle: Handle | None = None) -> SheepError:
        """The error a fenced holder's changes get: it held the lock and lost it."""
        lock = vdi.lock
        if handle is not None and lock is not None and lock.get("session") == handle.contender:
            return VdiLocked(f"the lock on VDI {vdi.name!r} is being handed to another"
                             " writer: this client's writes are refused from now on")
        if lock is None:
            return VdiLocked(f"the lock on VDI {vdi.name!r} was taken from this client (a"
                             " forced unlock): its writes are refused until it opens the"
                             " VDI again")
        return VdiLocked(f"the lock on VDI {vdi.name!r} moved to"
                         f" {lock.get('owner') or 'another writer'}: this client's writes"
                         " are refused from now on")

    def _writable(self, header: Header, session: Session) -> tuple[Handle, Vdi]:
        handle = self._handle(header, session)
        if not handle.writable:
            raise ReadOnly(f"{handle.name!r} is open read-only")
        vdi, _, _ = self._target(handle)
        if not _holds_lock(handle, vdi) or (handle.contender, handle.name) in self._handing:
            raise self._lost(vdi, handle)
        return handle, vdi

    def _writer(self, handle: Handle) -> Writer:
        key = (handle.contender, handle.name)
        writer = self._writers.get(key)
        if writer is None:
            writer = self._writers[key] = Writer(handle.name)
        return writer

    @contextlib.contextmanager
    def arriving(self, handle: Handle) -> Iterator[None]:
        """A change or flush through the handle, from its arrival (before the I/O
        scheduler) to its answer: its writer is busy all that time, so a handoff does
        not take the lock from under a write that is still queued."""
        if not handle.writable:
            yield
            return
        writer = self._writer(handle)
        writer.queued += 1
        try:
            yield
        finally:
            writer.queued -= 1

    async def locked(self, header: Header, session: Session) -> tuple[Handle, Vdi, Writer]:
        """The handle's VDI under its contender's lock, taken now if this is its first
        change (a write, a trim, a flush); and what the holder's sheep tracks of its
        activity. Attaching never locks: readers, and a migration's destination until
        it writes, sit beside the writer. A contender that held the lock and lost it
        (handed over, or forced away) does not take it back: its writes fail from then
        on, where silently locking again would interleave them with the new holder's."""
        handle = self._handle(header, session)
        if not handle.writable:
            raise ReadOnly(f"{handle.name!r} is open read-only")
        vdi, _, _ = self._target(handle)
        key = (handle.contender, handle.name)
        writer = self._writer(handle)
        held: set[tuple[str, str]] = session.values.setdefault("held", set())
        if _holds_lock(handle, vdi):
            # Seen holding it (taken here, or by the contender through another handle
            # or sheep): should it move, this contender never takes it back.
            held.add(key)
        else:
            if key in held or handle.fenced or key in self._handing:
                raise self._lost(vdi, handle)
            locking: dict[tuple[str, str], asyncio.Lock] = session.values.setdefault(
                "locking", {})
            async with locking.setdefault(key, asyncio.Lock()):
                vdi, _, _ = self._target(handle)
                if not _holds_lock(handle, vdi):
                    if key in held:
                        raise self._lost(vdi)
                    # Busy from before the lock is logged as ours: a handoff asked for
                    # meanwhile must not take it from under the change that took it.
                    writer.taking += 1
                    try:
                        await self._take(handle)
                        await self._until_held(handle)
                        held.add(key)
                        vdi, _, _ = self._target(handle)
                        if vdi.unsettled:
                            await self._settle(vdi, handle.contender)
                    finally:
                        writer.taking -= 1
        handle, vdi = self._writable(header, session)
        return handle, vdi, writer

    async def _until_held(self, handle: Handle) -> None:
        """After a grant: until this sheep has applied it (a member that did not confirm
        the op's barrier may lag), else the change would be refused as fenced."""
        clock = self.gateway.clock
        deadline = clock.monotonic() + handoff_unreachable_wait_s
        while True:
            vdi, _, _ = self._target(handle)
            if _holds_lock(handle, vdi):
                return
            if clock.monotonic() >= deadline:
                raise Unavailable(f"the lock on VDI {vdi.name!r} was granted, but this sheep"
                                  " has not applied the grant yet; try again")
            await clock.sleep(handoff_poll_s)

    async def _take(self, handle: Handle) -> None:
        """Take the VDI's lock for the handle's contender: at once if nobody holds it,
        else by a handoff from its holder (handoff), asked for until handoff_wait_s."""
        clock = self.gateway.clock
        started = clock.monotonic()
        if handle.resumed:
            await self._take_resumed(handle)
            return
        deadline = started + self.handoff_wait_s
        why = ""
        while True:
            vdi, _, _ = self._target(handle)
            lock = vdi.lock
            if _holds_lock(handle, vdi):  # granted by an answer that came too late
                return
            try:
                if lock is None:
                    await self.broadcast({"type": "vdi_lock", "name": vdi.name,
                                          "node_id": self.node_id,
                                          "session": handle.contender, "owner": handle.owner})
                    return
                answer = await self._ask_handoff(vdi.name, lock, handle)
                if answer.get("granted"):
                    return
                why = str(answer.get("why", ""))
            except VdiLocked as error:  # taken meanwhile: ask its new holder
                why = error.message
            except (*_unanswered, OSError) as error:  # the holder's sheep did not answer
                why = f"its sheep did not answer ({error})"
                # Until it is declared dead (its locks go with it), or answers again.
                deadline = max(deadline, started + handoff_unreachable_wait_s)
            except SheepError as error:  # it answered, and refused the request
                why = f"its sheep refused the handoff ({error})"
            if clock.monotonic() >= deadline:
                holder = (lock or {}).get("owner") or "another writer"
                raise VdiLocked(f"VDI {vdi.name!r} is in use by {holder}: it did not hand the"
                                f" lock over within {self.handoff_wait_s:g} s ({why}); a writer"
                                f" hands over after a flush and {handoff_idle_s:g} s idle")
            await clock.sleep(handoff_poll_s)

    async def _take_resumed(self, handle: Handle) -> None:
        """The lock for an open that continues a contender that held it (a client
        failing over from another sheep): taken only once that contender's lock is
        gone (its sheep's death, or its connection's end, releases it), never by a
        handoff. Held by anyone else, it moved while the client was away: the client
        is fenced, as if it had seen the lock move."""
        clock = self.gateway.clock
        deadline = clock.monotonic() + handoff_unreachable_wait_s
        while True:
            vdi, _, _ = self._target(handle)
            lock = vdi.lock
            if _holds_lock(handle, vdi):
                return
            if lock is None and vdi.last_holder and vdi.last_holder not in handle.resumed:
                # Free, but another writer took it (and let it go) since this client's
                # contender held it: its data is newer than what this client knows.
                handle.fenced = True
                raise VdiLocked(f"another writer locked VDI {vdi.name!r} while this client"
                                " failed over: its writes are refused from now on")
            if lock is None:
                try:
                    await self.broadcast({"type": "vdi_lock", "name": vdi.name,
                                          "node_id": self.node_id,
                                          "session": handle.contender, "owner": handle.owner})
                    return
                except VdiLocked:
                    continue  # taken meanwhile: by whom decides
            elif lock.get("session") not in handle.resumed:
                handle.fenced = True
                raise VdiLocked(f"the lock on VDI {vdi.name!r} moved to"
                                f" {lock.get('owner') or 'another writer'} while this client"
                                " failed over: its writes are refused from now on")
            elif clock.monotonic() >= deadline:
                # Unavailable, which clients retry (the NBD plugin within its budget).
                raise Unavailable(f"VDI {vdi.name!r} is still locked by this client's"
                                  f" earlier session (via {lock.get('node_id')}) after"
                                  f" {handoff_unreachable_wait_s:g} s; try again")
            await clock.sleep(handoff_poll_s)

    async def _ask_handoff(self, name: str, lock: dict[str, str], handle: Handle) -> Any:
        body = {"name": name, "from_session": lock.get("session"), "node_id": self.node_id,
                "session": handle.contender, "owner": handle.owner}
        if lock.get("node_id") == self.node_id:
            return await self.handoff(body, Header(opcode=Op.VDI_HANDOFF))
        connection = await self.peer_connection(str(lock.get("node_id")))
        _, data = await connection.call(Header(opcode=Op.VDI_HANDOFF),
                                        proto.encode_json(body), timeout_ms=handoff_ask_ms)
        return proto.decode_json(data)

    async def handoff(self, body: dict[str, Any], header: Header) -> Any:
        """On the lock holder's sheep: hand the VDI's lock from its holder to the
        contender named, if the holder has flushed and been idle for handoff_idle_s
        (or its connection is gone). {"granted": bool, "why": text}. The holder is
        fenced from then on: it may not take the lock back (locked)."""
        vdi = vdi_named(self.group, body.get("name"))
        holder = body.get("from_session")
        contender = _text(body, "session", contender_max_chars)
        owner = _text(body, "owner", lock_owner_max_chars)
        node_id = _text(body, "node_id", node_id_max_chars)
        if not (holder and contender and node_id):
            raise InvalidParameters("a handoff names the holder (from_session), and the"
                                    " contender (session, node_id)")
        if contender == holder:
            raise InvalidParameters("a handoff is from one contender to another")
        if node_id not in self.group.state.members:
            raise InvalidParameters(f"a handoff's contender is on a member, not {node_id!r}")
        clock = self.gateway.clock

        def refusal() -> str | None:
            current = vdi_named(self.group, vdi.name)
            if current.lock is None or current.lock.get("session") != holder:
                return "the lock changed hands meanwhile"
            if current.lock.get("node_id") != self.node_id:
                return "its holder is on another sheep"
            writer = self._writers.get((str(holder), vdi.name))
            return writer.busy(clock.monotonic()) if writer is not None else None

        why = refusal()
        if why is not None:
            return {"granted": False, "why": why}
        try:  # while writes go on: under the gate, only what came meanwhile is saved
            await self.changes.save(vdi.root.generation)
        except SheepError as error:
            return {"granted": False, "why": f"its change masks could not be saved: {error}"}

        async def hand_over() -> Any:
            why = refusal()  # a write may have come while the gate closed
            if why is not None:
                return {"granted": False, "why": why}
            current = vdi_named(self.group, vdi.name)
            before = current.lock or {}
            try:  # the next holder's diffs must see what this one wrote
                await self.changes.save(current.root.generation)
            except SheepError as error:
                return {"granted": False, "why": f"its change masks could not be saved: {error}"}
            # Fenced from the moment the move is sent: should the op time out, it may
            # still apply, and a write let through meanwhile would race the new holder.
            # Only a refusal (the log applied it, and said no) lifts the fence.
            key = (str(holder), vdi.name)
            self._handing.add(key)
            try:
                await self.broadcast({"type": "vdi_lock", "name": vdi.name,
                                      "node_id": node_id, "session": contender,
                                      "owner": owner, "from_session": holder})
            except SheepError as error:
                if not isinstance(error, _unanswered):
                    self._handing.discard(key)
                raise
            self._writers.pop(key, None)
            log.warning("VDI %s: lock handed over from %s to %s (the old holder had flushed"
                        " and gone idle); its further writes are refused", vdi.name,
                        before.get("owner") or holder, owner or contender)
            return {"granted": True}

        return await self.paused(vdi.name, hand_over)

    async def _gated(self, header: Header, session: Session, durable: bool,
                     work: Callable[[Root, int], Awaitable[None]]) -> Reply:
        """A change to the VDI: through its write gate, under its lock, then reap."""
        handle, vdi, writer = await self.locked(header, session)
        check_range(vdi.size, header.offset, header.count)
        gate = self._gate(handle.name)
        await gate.enter()
        clock = self.gateway.clock
        change = writer.begin(clock.monotonic())
        done = False
        try:
            self._writable(header, session)  # still ours after waiting at the gate?
            _, root, size = self._target(handle)  # the root after any snapshot we waited for
            self.changes.note(root.generation, header.offset, header.count)
            await work(root, size)
            await self.gc.reap_released()
            done = True
        finally:
            writer.end(clock.monotonic(), change, durable and done)
            gate.leave()
        return b"", {}

    async def flushing(self, header: Header, session: Session) -> Callable[[], None]:
        """A flush naming a writable handle is a change: it locks. What it returns
        records, once the flush is done, that the writes begun before it are durable
        (what a handoff waits for)."""
        _, _, writer = await self.locked(header, session)
        # Writes still in flight may land after the flush passes: it covers them only
        # when there are none (a migration's source drains its I/O before it flushes).
        covered = writer.changes if not writer.in_flight else writer.flushed

        def done() -> None:
            writer.flushed = max(writer.flushed, covered)

        return done

    async def write(self, header: Header, payload: bytes, session: Session) -> Reply:
        fua = bool(header.flags & FLAG_FUA)

        async def work(root: Root, size: int) -> None:
            await self.engine.write(root, header.offset, payload)
            if fua:
                await self.objects.flush()

        return await self._gated(header, session, fua, work)

    async def discard(self, header: Header, payload: bytes, session: Session) -> Reply:
        async def work(root: Root, size: int) -> None:
            await self.engine.discard(root, header.offset, header.count, size)

        return await self._gated(header, session, False, work)

    async def extents(self, header: Header, payload: bytes, session: Session) -> Reply:
        handle = self._handle(header, session)
        vdi, root, size = self._target(handle)
        check_range(size, header.offset, header.count)
        extents = await self.engine.extents(root, header.offset, header.count,
                                            cached=_holds_lock(handle, vdi))
        value = [[e.offset, e.length, e.allocated] for e in extents]
        return proto.encode_json(value), {}
