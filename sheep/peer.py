"""The replica side of object I/O: peer requests served from the local store.

Every peer request carries the sender's epoch. One that is older than ours is
refused (the sender's placement may be wrong); one that is newer is held until
our driver delivers that epoch. A request is never served under a placement
that the two sides disagree on.

Copies a sheep held when it started are unverified until sheep/recovery.py has
compared them with the other replicas: the node may have been away while they
changed. An unverified copy is not read (Unverified: the gateway reads another
replica, or the newest version) unless a read asks for it by FLAG_DIRECT, and
is not written into (NoObject: the gateway first copies a current one over it).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from sheep import constants, proto, scheduler
from sheep.errors import (
    InvalidParameters,
    IOErrorResult,
    NoObject,
    NoSpace,
    OldNodeVersion,
    ReadOnly,
    SheepError,
    SystemFailure,
    Unavailable,
    Unverified,
    fenced_message,
)
from sheep.group import Group
from sheep.net import Reply
from sheep.proto import Header, Kind, Op
from sheep.replicas import CopyHealth, keeps_own
from sheep.scheduler import Scheduler
from sheep.store import Store
from sheep.store.store import SyncJob, pending_objects_max
from sheep.world import Clock, Faults

log = logging.getLogger(__name__)

PeerHandler = Callable[[Header, bytes], Awaitable[Reply]]

_empty: Reply = (b"", {})
_changes = frozenset({Op.CREATE_AND_WRITE_PEER, Op.WRITE_PEER, Op.DISCARD_PEER})
_intended = _changes | {Op.REMOVE_PEER}  # need the store's intent first (sheep/store)
_allocating = frozenset({Op.CREATE_AND_WRITE_PEER, Op.WRITE_PEER})  # may need new space
space_check_interval_s = 0.2


def _log_failed_writeback(task: asyncio.Task[None]) -> None:
    # The objects stay dirty (Store.sync_failed): the next sync tries them again.
    if not task.cancelled() and task.exception() is not None:
        log.error("background sync failed: %s", task.exception())


# Peer ops that move an object's data, accounted in the scheduler.
_data_ops = frozenset({Op.READ_PEER, Op.WRITE_PEER, Op.CREATE_AND_WRITE_PEER, Op.DISCARD_PEER})


class Peer:
    def __init__(self, store: Store, group: Group, node_id: str = "",
                 clock: Clock | None = None, faults: Faults | None = None) -> None:
        self.clock = clock or Clock()
        self.faults = faults or Faults()
        self.store = store
        self.group = group
        self.node_id = node_id
        self.health = CopyHealth()  # which copies here are unverified, damaged
        # The sheep's one I/O scheduler (sheep/scheduler.py): peer ops are accounted
        # in it, the work this sheep starts waits its turn in it.
        self.scheduler = Scheduler(self.clock.monotonic)
        self._writeback: asyncio.Task[None] | None = None
        # Called when a copy becomes suspect at run time (the verifier must look at it).
        self.on_suspect: Callable[[], None] | None = None
        # Called when a write made a partial copy here (recovery must fill it in next).
        self.on_partial: Callable[[int], None] | None = None
        # Whether this sheep is fenced now (set by the daemon): asked again after any
        # wait, since a request let in while the session's lease held may have waited
        # past its end, when the others may be moving on without this sheep.
        self.fence_check: Callable[[], bool] = lambda: False
        self._sync_lock = asyncio.Lock()
        self.flushes = 0  # FLUSH_PEER served: a client's flush that reached this sheep
        self.syncs = 0  # syncs that had anything to make durable
        self._free = 0
        self._space_checked = -1e9
        self.handlers: dict[Op, PeerHandler] = {
            Op.CREATE_AND_WRITE_PEER: self.create_and_write,
            Op.READ_PEER: self.read,
            Op.WRITE_PEER: self.write,
            Op.REMOVE_PEER: self.remove,
            Op.DISCARD_PEER: self.discard,
            Op.FLUSH_PEER: self.flush,
            Op.STAT_PEER: self.stat,
            Op.LIST_PEER: self.list_objects,
        }
        proto.check_handlers(self.handlers, {Kind.PEER}, "Peer.handlers")

    def _refuse_if_fenced(self) -> None:
        if self.fence_check():
            raise Unavailable(fenced_message)

    async def serve(self, header: Header, payload: bytes) -> Reply:
        """A peer op, accounted in the scheduler as its class: a copy's source or
        target (FLAG_DIRECT) as recovery, anything else as a client's."""
        if header.opcode not in _data_ops:
            return await self._serve(header, payload)
        name = "recovery" if header.flags & proto.FLAG_DIRECT else scheduler.CLIENT
        if name == "recovery" and header.opcode == Op.READ_PEER:
            await self.scheduler.pace_source(header.count)
        request = self.scheduler.account(name, header.count)
        try:
            return await self._serve(header, payload)
        finally:
            self.scheduler.done(name, request)

    async def _serve(self, header: Header, payload: bytes) -> Reply:
        if self.faults.buggify("peer.slow"):
            await self.clock.sleep(0.2)  # fault hook: a replica slow to take a request
        if header.opcode != Op.LIST_PEER:
            await self.group.check_epoch(header.epoch, constants.epoch_wait_ms / 1000)
        elif header.epoch > self.group.epoch:
            # A list for a newer epoch's recovery waits for that epoch here: listed
            # before it, a copy the old epoch's placement makes next would be in no
            # list the new holder reads (simulator, seed 702). Any epoch may list.
            await self.group.wait_epoch_reached(header.epoch, constants.epoch_wait_ms / 1000)
        self._refuse_if_fenced()
        if (header.opcode in _changes and not self.group.writable_object(header.oid)
                and not (header.opcode == Op.CREATE_AND_WRITE_PEER
                         and header.flags & proto.FLAG_DIRECT)):
            # Fencing: a snapshot froze this generation; whoever still writes it is stale.
            # A repair's copy (FLAG_DIRECT, from a sheep: the newest verified copy, never
            # over a newer one) is not a write: a snapshot's damaged copy needs one too.
            raise ReadOnly(f"object {header.oid:016x} belongs to a frozen generation")
        try:
            if header.opcode in _allocating:
                self.check_space()
            if header.opcode in _intended:
                if self.store.pending > 2 * pending_objects_max:
                    # Changes outrun the writeback: wait for it, or the metadata of the
                    # changed objects (4 KiB of checksums each) grows without bound.
                    self.writeback_soon()
                    assert self._writeback is not None
                    await asyncio.wait({self._writeback})  # its failure is not this change's
                # The version this change gives the copy (a raw write: one past ours).
                promised = header.arg0 or self.store.version(header.oid) + 1
                await self.store.ensure_intent(header.oid, promised)
            if (header.opcode in (Op.READ_PEER, Op.STAT_PEER)
                    and self.store.is_partial(header.oid)):
                # Only what was written since it was made is here: to everyone else
                # the copy is not here yet (never read, never a source, never counted).
                raise NoObject(f"object {header.oid:016x} is only partly here yet (being"
                               " recovered)")
            # After the await: a copy found damaged meanwhile must not take the change.
            if self.health.is_unverified(header.oid):
                if header.opcode == Op.READ_PEER and not header.flags & proto.FLAG_DIRECT:
                    raise Unverified(f"the copy of {header.oid:016x} here is not verified yet")
                if header.opcode in (Op.WRITE_PEER, Op.DISCARD_PEER):
                    raise NoObject(f"the copy of {header.oid:016x} here is not verified yet")
            self._refuse_if_fenced()
            if header.opcode in _intended and header.epoch != self.group.epoch:
                # A new epoch came while this change waited (the scheduler, its intent):
                # a joiner may have listed the objects here already, so a copy made now
                # for the old placement would never reach it (simulator, seed 702). The
                # gateway sends it again to the new placement.
                self.store.release_intents([header.oid])
                raise OldNodeVersion(f"request epoch {header.epoch} is older than"
                                     f" {self.group.epoch} (it changed meanwhile)")
            try:
                reply = await self.handlers[Op(header.opcode)](header, payload)
            except (NoSpace, IOErrorResult, SystemFailure):
                if header.opcode in _changes and self.store.exists(header.oid):
                    self.health.change_failed(header.oid, self.clock.monotonic(),
                                              self.group.epoch)
                    self._suspect()
                raise
        except NoSpace as error:
            free = shutil.disk_usage(self.store.path).free
            raise NoSpace(f"node {self.node_id or self.store.path}: {error.message} "
                          f"(store {self.store.path}, {free} bytes free)") from error
        if self.store.pending > pending_objects_max:
            self.writeback_soon()
        return reply

    def check_space(self) -> None:
        """Refuse a change that may need space when the store is down to its reserve."""
        now = self.clock.monotonic()
        # A refusal is never made on an old figure: space may just have been freed.
        if (now - self._space_checked > space_check_interval_s
                or self._free < constants.space_reserve_bytes):
            self._free = shutil.disk_usage(self.store.path).free
            self._space_checked = now
        if self._free < constants.space_reserve_bytes:
            raise NoSpace(f"no space left for new data (the last "
                          f"{constants.space_reserve_bytes} bytes are kept for metadata)")

    def writeback_soon(self) -> None:
        """Sync in the background (many changed objects pending): bounds the memory
        their metadata takes, and the work a crash leaves."""
        if self._writeback is None or self._writeback.done():
            self._writeback = asyncio.get_running_loop().create_task(self.sync_all())
            self._writeback.add_done_callback(_log_failed_writeback)

    async def sync_all(self) -> None:
        await self._sync(self.store.begin_sync)

    async def create_and_write(self, header: Header, payload: bytes) -> Reply:
        # arg0, when set, is the version of the copy this one is made from (recovery).
        # Such a copy never replaces a verified one at least as new: a client's write
        # may have recovered and changed the object here since the source was read.
        # A repair (FLAG_DIRECT) replaces a copy as new as its source too (damaged, or
        # with other contents), but not one that a write has made newer since.
        # With FLAG_SPARSE the payload is the whole object's extents (a copy made by
        # recovery, a repair or a write's recovery): only they are written.
        extents: list[proto.Extent] | None = None
        if header.flags & proto.FLAG_SPARSE:
            if header.count != self.store.object_size:
                raise InvalidParameters(f"a sparse copy is of the whole object"
                                        f" ({self.store.object_size} bytes), not {header.count}")
            extents = proto.decode_extents(payload, header.count)
        elif not header.offset and len(payload) == self.store.object_size:
            extents = [(0, memoryview(payload))]
        if header.arg0 and self.store.is_partial(header.oid) and extents is not None:
            # A copy of the whole object for a partial one: it fills in what was not
            # written here since (Store.fill_extents), never over what was.
            version = self.fill(header.oid, extents, header.arg0)
            if header.flags & proto.FLAG_FUA:
                await self._sync(lambda: self.store.begin_sync_object(header.oid))
            return b"", {"arg0": version}
        if (header.arg0 and not self.health.is_unverified(header.oid)
                and self.store.exists(header.oid)):
            current = self.store.version(header.oid)
            if keeps_own(current, header.arg0, repair=bool(header.flags & proto.FLAG_DIRECT)):
                return b"", {"arg0": current}
        if header.flags & proto.FLAG_SPARSE:
            assert extents is not None
            version = self.store.create_from_extents(header.oid, extents, header.arg0 or None)
        else:
            version = self.store.create_and_write(header.oid, header.offset, payload,
                                                  header.arg0 or None)
        if self.health.replaced(header.oid):  # a whole new copy: current by definition
            log.warning("damaged copy of %016x replaced by a good one", header.oid)
        if header.flags & proto.FLAG_FUA:
            await self._sync(lambda: self.store.begin_sync_object(header.oid))
        return b"", {"arg0": version}

    async def _sync(self, begin: Callable[[], SyncJob]) -> None:
        """One sync at a time (a flush that comes meanwhile waits, then syncs what is
        dirty by then): two syncs racing could commit older metadata last, or answer
        a flush before the other's fdatasync is done."""
        loop = asyncio.get_running_loop()
        async with self._sync_lock:
            job = begin()
            try:
                # Nothing changed here since the last sync (a flush reaches every
                # member): no trip through a worker thread, which costs more than the
                # nothing it would do. The lock was still waited for: a sync under way
                # may hold writes acknowledged before this flush.
                if job.fds or job.directories:
                    self.syncs += 1
                    await loop.run_in_executor(None, self.store.sync_files, job)
                if self.store.commit_needed(job):
                    await loop.run_in_executor(self.store.meta_executor, self.store.commit,
                                               job)
            except BaseException:
                self.store.sync_failed(job)
                raise
            self.store.sync_done(job)

    async def quiesce(self) -> None:
        """Wait for the sync under way and let no other start (the sheep is stopping)."""
        await self._sync_lock.acquire()

    async def read(self, header: Header, payload: bytes) -> Reply:
        data: bytes | memoryview
        try:
            if header.flags & proto.FLAG_SPARSE:
                # The whole object as its extents (FLAG_SPARSE), for a copy elsewhere.
                if header.count != self.store.object_size:
                    raise InvalidParameters(
                        f"a sparse read is of the whole object ({self.store.object_size}"
                        f" bytes), not {header.count}")
                room = proto.extent_table_bytes(header.count)
                extents, buffer = self.store.read_extents(header.oid, room)
                data = proto.encode_extents_into(buffer, room, extents)
            else:
                data = self.store.read(header.oid, header.offset, header.count)
        except IOErrorResult as error:
            # Damage (a checksum mismatch, a lost file): this copy serves nothing more
            # until a good one replaces it (the gateway reads another replica and
            # copies it here; a write recovers it first, as for any unverified copy).
            self._damaged(header.oid, error)
            raise
        return data, {"arg0": self.store.version(header.oid)}

    def _damaged(self, oid: int, error: SheepError) -> None:
        if self.health.found_damaged(oid, self.group.epoch):
            log.error("%s", error)
        self._suspect()

    def _suspect(self) -> None:
        """A copy became unverified at run time: the verifier has work."""
        if self.on_suspect is not None:
            self.on_suspect()

    def fill(self, oid: int, extents: list[proto.Extent], version: int) -> int:
        """Complete the partial copy here from a whole copy's extents (Store.fill_extents).
        One a crash caught with changes not synced stays in doubt: unverified, compared
        with the others before it counts."""
        version = self.store.fill_extents(oid, extents, version)
        doubt = self.store.doubt(oid)
        if doubt is not None:
            self.health.suspect([oid], doubt)
            self._suspect()
        return version

    def _refuse_damaged(self, oid: int, error: SheepError) -> SheepError:
        """A change that met damage (sheep/store: a partial block is verified before
        it is merged): marked as a read marks it, and answered as an unverified copy
        is, so the gateway copies a good one over it and sends the change again."""
        self._damaged(oid, error)
        return NoObject(f"the copy of {oid:016x} here is damaged: {error.message}")

    async def write(self, header: Header, payload: bytes) -> Reply:
        # arg0, when set, is the version the gateway gave this write (see Gateway.next_version).
        try:
            if header.arg0 and not self.store.knows(header.oid):
                # A holder that lacks the object (recovery has not copied it here yet):
                # it keeps what is written as a partial copy, and recovery fills in the
                # rest next, so the write does not wait for a whole copy.
                version = self.store.write_partial(header.oid, header.offset, payload,
                                                   header.arg0)
                if self.on_partial is not None:
                    self.on_partial(header.oid)
            else:
                version = self.store.write(header.oid, header.offset, payload,
                                           version=header.arg0 or None)
        except IOErrorResult as error:
            raise self._refuse_damaged(header.oid, error) from error
        if header.flags & proto.FLAG_FUA:
            await self._sync(lambda: self.store.begin_sync_object(header.oid))
        return b"", {"arg0": version}

    async def remove(self, header: Header, payload: bytes) -> Reply:
        self.health.forget(header.oid)
        self.store.remove(header.oid, header.arg0 or None)
        return _empty

    async def discard(self, header: Header, payload: bytes) -> Reply:
        try:
            version = self.store.discard(header.oid, header.offset, header.count,
                                         version=header.arg0 or None)
        except IOErrorResult as error:
            raise self._refuse_damaged(header.oid, error) from error
        return b"", {"arg0": version}

    async def flush(self, header: Header, payload: bytes) -> Reply:
        self.flushes += 1
        await self._sync(self.store.begin_sync)
        return _empty

    async def stat(self, header: Header, payload: bytes) -> Reply:
        if header.flags & proto.FLAG_SCRUB:
            self.scrub(header.oid)
        value = self.store.stat(header.oid)
        if header.flags & proto.FLAG_MAP and not value.get("deleted") and not value.get("missing"):
            value["map"] = format(self.store.data_map(header.oid), "x")
        if self.health.is_unverified(header.oid):
            value["unverified"] = True
            value["since"] = self.health.since(header.oid)
        if self.health.is_damaged(header.oid):
            value["damaged"] = True
        return proto.encode_json(value), {}

    def scrub(self, oid: int) -> list[int]:
        """Verify every block of the local copy; a damaged one is marked as a read
        that met the damage marks it (and stays so until a good copy replaces it)."""
        try:
            bad = self.store.verify(oid)
        except NoObject:
            return []
        except IOErrorResult as error:
            log.error("scrub: %s", error)
            bad = [-1]
        if self.health.scrubbed(oid, damaged=bool(bad), since=self.group.epoch):
            self.store.counters["checksum_errors"] += 1
            log.error("scrub: object %016x is damaged in blocks %s", oid, bad[:8])
            self._suspect()
        return bad

    async def list_objects(self, header: Header, payload: bytes) -> Reply:
        value: list[Any] = self.store.copies()
        return proto.encode_json(value), {}
