"""The gateway role: a client's object request fanned out to the replicas.

Placement comes from the ring of the current epoch. A write is acknowledged
only when every replica has it; the local replica is called directly, without
a network hop. A read goes to one replica, the local one when it holds the
object, and falls back to the others.

When a replica cannot be reached or the epochs disagree, the request waits for
the next epoch (the driver notices a dead node within 2 s) and is retried on
the new placement, so clients see latency instead of errors, for up to
gateway_retry_total_ms.

Making copies agree again (dog cluster check, a damaged copy met on a read or
left by a partial write) is the repairer's work (sheep/repair.py): it reads
and writes copies through this gateway, which owns it (Gateway.repairer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sheep import auth, constants, proto, replicas
from sheep.client import Connection, raise_failed
from sheep.errors import (
    IOErrorResult,
    NetworkError,
    NewNodeVersion,
    NoObject,
    OldNodeVersion,
    ReadOnly,
    SheepError,
    Timeout,
    Unavailable,
    Unverified,
    fenced_message,
)
from sheep.group import Group
from sheep.net import Reply
from sheep.node import NodeInfo
from sheep.peer import Peer
from sheep.proto import Header, Op
from sheep.repair import Repairer
from sheep.replicas import Answer, Copy, CopyStatus
from sheep.world import REAL, Network, World

log = logging.getLogger(__name__)

RETRYABLE = (NetworkError, Timeout, OldNodeVersion, NewNodeVersion, Unavailable)

_peer_op = {
    Op.CREATE_AND_WRITE_OBJ: Op.CREATE_AND_WRITE_PEER,
    Op.READ_OBJ: Op.READ_PEER,
    Op.WRITE_OBJ: Op.WRITE_PEER,
    Op.REMOVE_OBJ: Op.REMOVE_PEER,
    Op.DISCARD_OBJ: Op.DISCARD_PEER,
    Op.FLUSH: Op.FLUSH_PEER,
    Op.STAT_OBJ: Op.STAT_PEER,
}

past_epochs_searched_max = 16

# Ops whose arg0 is the version the change gives the object (0: the replica's own +1).
_versioned_ops = frozenset({Op.CREATE_AND_WRITE_OBJ, Op.WRITE_OBJ, Op.DISCARD_OBJ,
                            Op.REMOVE_OBJ})


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" warning


def _close_opened(task: asyncio.Task[Connection]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


class PeerPool:
    """One pipelined connection per peer, opened on first use, reopened after failure."""

    def __init__(self, network: Network | None = None,
                 credentials: auth.Credentials | None = None) -> None:
        self.credentials = credentials
        self.network = network
        self._connections: dict[str, asyncio.Task[Connection]] = {}

    def ready(self, node: NodeInfo) -> Connection | None:
        """The open connection to node, if there is one (no await)."""
        task = self._connections.get(node.endpoint)
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        connection = task.result()
        return None if connection.closed else connection

    async def get(self, node: NodeInfo) -> Connection:
        task = self._connections.get(node.endpoint)
        if task is not None and task.done() and (
                task.exception() is not None or task.result().closed):
            task = None
        if task is None:
            task = asyncio.get_running_loop().create_task(
                Connection.open(node.address, node.port, self.credentials,
                                network=self.network))
            self._connections[node.endpoint] = task
        return await asyncio.shield(task)

    def forget(self, keep: set[str]) -> None:
        """Close the connections to every endpoint not in keep (the members): a request
        still waiting on a node that left fails now and is retried on the new epoch,
        instead of waiting out the peer timeout behind a silent cut."""
        for endpoint in [endpoint for endpoint in self._connections if endpoint not in keep]:
            task = self._connections.pop(endpoint)
            if not task.done():  # its callers still wait on it; what it opens is not kept
                task.add_done_callback(_close_opened)
            else:
                _close_opened(task)

    def close(self) -> None:
        for task in self._connections.values():
            if task.done() and task.exception() is None:
                task.result().close()
            else:
                task.cancel()
        self._connections.clear()


class Gateway:
    def __init__(self, group: Group, local: Peer, node_id: str, pool: PeerPool,
                 world: World = REAL) -> None:
        self.world = world
        self.clock = world.clock
        self.group = group
        self.local = local
        self.node_id = node_id
        self.pool = pool
        self._version = 0
        # Set while this sheep is fenced, for drivers that fence (see Sheep._watch_fence).
        self.fenced: asyncio.Event | None = None
        # Flushes (flush_changed): each change this sheep has acknowledged is numbered;
        # per member, the number of the last one made there, and the number up to which
        # a finished flush made them durable there. A flush syncs the members where
        # the first is past the second when it begins.
        self._changes = 0
        self._changed_on: dict[str, int] = {}
        self._durable_on: dict[str, int] = {}
        # The epoch of the last flush that reached every member: after a placement
        # change the next one does again (recovery moved copies, unsynced, to members
        # this sheep never changed anything on).
        self._flushed_epoch = -1
        # The tasks running work under _fenceable (how deep), and those of them that
        # the fence has cancelled.
        self._fenceable_tasks: dict[asyncio.Task[Any], int] = {}
        self._fenced_out: set[asyncio.Task[Any]] = set()
        # The driver's own answer, asked again before anything is answered as done: the
        # event above follows it by a poll, a lease runs out at an exact moment.
        self.fence_check: Callable[[], bool] = lambda: False
        self.repairer = Repairer(self)
        self.handlers: dict[Op, Callable[[Header, bytes], Awaitable[Reply]]] = {
            Op.CREATE_AND_WRITE_OBJ: self.write_all,
            Op.WRITE_OBJ: self.write_all,
            Op.DISCARD_OBJ: self.write_all,
            Op.REMOVE_OBJ: self.remove,
            Op.READ_OBJ: self.read,
            Op.FLUSH: self.flush,
            Op.STAT_OBJ: self.stat,
            Op.CHECK_OBJS: self.repairer.check,
        }
        proto.check_handlers(self.handlers, {proto.Kind.GATEWAY}, "Gateway.handlers")

    async def serve(self, header: Header, payload: bytes) -> Reply:
        """A client's object request. arg1, when set, overrides the copies of placement.
        A client's change never carries FLAG_DIRECT: on a change it marks a repair's
        copy (sheep/repair.py), which may replace a snapshot's (frozen) copy."""
        if header.flags & proto.FLAG_DIRECT and header.opcode in _versioned_ops:
            header = header._replace(flags=header.flags & ~proto.FLAG_DIRECT)
        return await self.handlers[Op(header.opcode)](header, payload)

    async def request(self, op: Op, oid: int, offset: int = 0, data: bytes | memoryview = b"",
                      count: int | None = None, flags: int = 0, copies: int = 0) -> Reply:
        """The same object ops for code inside the sheep (the VDI layer). Changes carry
        a version from next_version."""
        header = Header(opcode=op, oid=oid, offset=offset, flags=flags, length=len(data),
                        count=len(data) if count is None else count, arg1=copies,
                        arg0=self.next_version() if op in _versioned_ops else 0)
        # Payloads are any buffer (a view of the client's write, never copied): the
        # handlers only send or write them.
        return await self.handlers[op](header, data)  # type: ignore[arg-type]

    def next_version(self) -> int:
        """A version for a change this sheep makes to a VDI object: the cluster log's
        position in the high 32 bits, so that a later lock holder's changes (its lock
        came later in the log) rank above an earlier holder's, then a count. Replicas
        take max(theirs, this): a write applied twice (a retry after an epoch change,
        a client re-sending through another gateway, a recovery copy that already had
        it) leaves every replica at the same version."""
        self._version = max(self._version + 1, self.group.state.seq << 32)
        return self._version

    # --- calling one replica -----------------------------------------------

    def _peer_header(self, header: Header, epoch: int) -> Header:
        return Header(
            opcode=_peer_op.get(Op(header.opcode), header.opcode), epoch=epoch, oid=header.oid,
            offset=header.offset, count=header.count,
            flags=header.flags & (proto.FLAG_FUA | proto.FLAG_DIRECT | proto.FLAG_SCRUB
                                  | proto.FLAG_SPARSE | proto.FLAG_MAP),
            arg0=header.arg0 if header.opcode in _versioned_ops else 0)

    async def call(self, node: NodeInfo, header: Header, payload: bytes, epoch: int) -> Reply:
        peer_header = self._peer_header(header, epoch)
        if node.node_id == self.node_id:
            return await self.local.serve(peer_header, payload)
        connection = await self.pool.get(node)
        reply, data = await connection.call(peer_header, payload)
        self._maybe_lose_reply(node)
        return data, {"arg0": reply.arg0}

    def _maybe_lose_reply(self, node: NodeInfo) -> None:
        """Fault hook: the replica did the work, its reply never came (a cut after the
        request arrived). Retries must cope with a change applied twice."""
        if self.world.faults.buggify("gateway.reply-lost"):
            raise NetworkError(f"connection to {node.endpoint} lost (buggify)")

    async def call_all(self, nodes: list[NodeInfo], header: Header, payload: bytes,
                       epoch: int) -> list[Reply | BaseException]:
        """The request on every node, as gather(return_exceptions=True) of call() would
        give, but sent to every remote replica (whose connection is open) before the
        local copy is served, with no task per replica."""
        peer_header = self._peer_header(header, epoch)
        sent: list[Any] = []
        for node in nodes:
            connection = self.pool.ready(node) if node.node_id != self.node_id else None
            if connection is None:
                sent.append(None)
                continue
            try:
                sent.append(connection.send(peer_header, payload))
            except SheepError as error:
                sent.append(error)
        results: list[Reply | BaseException | None] = [None] * len(nodes)
        try:
            # The local copy (and any replica not connected yet) while the others'
            # requests are on their way, then the replies.
            for index, (node, request) in enumerate(zip(nodes, sent, strict=True)):
                if request is None:
                    try:
                        results[index] = await self.call(node, header, payload, epoch)
                    except Exception as error:  # as gather(return_exceptions=True) does
                        results[index] = error
                elif isinstance(request, BaseException):
                    results[index] = request
            for index, request in enumerate(sent):
                if isinstance(request, asyncio.Future):
                    try:
                        reply, data = raise_failed(*await request)
                        self._maybe_lose_reply(nodes[index])
                        results[index] = (data, {"arg0": reply.arg0})
                    except Exception as error:
                        results[index] = error
        finally:
            for request in sent:  # cancelled meanwhile: nobody waits for the rest
                if isinstance(request, asyncio.Future):
                    # Failed already (a connection lost) or later: retrieved either way.
                    request.add_done_callback(_retrieved)
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]  # every slot filled above

    async def _fenceable(self, work: Awaitable[Reply]) -> Reply:
        """Run work, but give up the moment this sheep is fenced (its driver lost its
        session): the others may be moving on without it, so nothing it still has in
        flight may be answered as done. A peer across a silent cut would otherwise
        hold the request for the full peer timeout.

        The work runs in the caller's own task, which the fence cancels when it comes
        (fence_in_flight): racing a task of its own against one waiting for the fence
        cost two tasks and a wait, 10 us, on every request."""
        if self.fenced is None:
            return await work
        if self.fence_check():  # and the event in line with it
            if asyncio.iscoroutine(work):
                work.close()  # never started
            raise Unavailable(fenced_message)
        task = asyncio.current_task()
        assert task is not None, "gateway ops run in a task"
        self._fenceable_tasks[task] = self._fenceable_tasks.get(task, 0) + 1
        try:
            result = await work
        except asyncio.CancelledError:
            if task not in self._fenced_out:
                raise  # cancelled by someone else: theirs to handle
            self._fenced_out.discard(task)
            if task.uncancel() > 0:
                raise  # someone else cancelled it too (a stop): that one stands
            raise Unavailable(fenced_message) from None
        finally:
            depth = self._fenceable_tasks.pop(task) - 1
            if depth:
                self._fenceable_tasks[task] = depth
            elif task in self._fenced_out:  # the work caught the cancellation itself
                self._fenced_out.discard(task)
                task.uncancel()  # (the work may answer late: it chose to go on)
        if self.fence_check():
            # Done, but the lease ran out meanwhile: the client must not take it as
            # done here (it retries through another sheep).
            raise Unavailable(fenced_message)
        return result

    def fence_in_flight(self) -> None:
        """The fence has just come: what runs under _fenceable gives up at once. Not
        the task that noticed it (a fence_check inside its work): that check's answer
        makes it give up, and a cancellation of a running task would also hit
        whatever it awaits while answering."""
        current = asyncio.current_task()
        for task in list(self._fenceable_tasks):
            if task is not current and task not in self._fenced_out and not task.done():
                self._fenced_out.add(task)
                task.cancel()

    async def _retrying(self, attempt: Callable[[int], Awaitable[Reply]]) -> Reply:
        """Run attempt(epoch) until it succeeds, retrying retryable failures on new epochs."""
        deadline = self.clock.monotonic() + constants.gateway_retry_total_ms / 1000
        while True:
            epoch = self.group.epoch
            if self.world.faults.buggify("gateway.retry-late"):
                await self.clock.sleep(0.3)  # fault hook: a retry that comes late
            try:
                return await self._fenceable(attempt(epoch))
            except RETRYABLE as error:
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0 or (self.fenced is not None and self.fenced.is_set()):
                    raise  # a fenced sheep does not wait: its client goes to another one
                log.info("retrying after %s (epoch %d)", error, epoch)
                await self.group.wait_epoch_after(epoch, min(remaining, 1.0))
                await self.clock.sleep(constants.gateway_retry_backoff_ms / 1000)

    async def _all(self, nodes: list[NodeInfo], header: Header, payload: bytes,
                   epoch: int) -> list[Reply]:
        if not nodes:
            raise Unavailable("no node is available to hold the object")
        results = await asyncio.gather(
            *(self.call(node, header, payload, epoch) for node in nodes), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:  # a non-retryable failure wins: it will not go away
            if not isinstance(error, RETRYABLE):
                raise error
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]

    # --- the ops -------------------------------------------------------------

    async def write_all(self, header: Header, payload: bytes) -> Reply:
        # The replicas that have applied this write, with their version after it. A retry
        # on a new epoch skips them: applying a write twice would bump a replica's
        # version twice, and versions are how copies are compared.
        applied: dict[str, int] = {}

        async def attempt(epoch: int) -> Reply:
            nodes = self.group.placement(header.oid, epoch, header.arg1)
            targets = [node for node in nodes if node.node_id not in applied]
            for _ in range(3):  # another round only after recovering a copy for those missing
                # A raw write (arg0 0: each replica takes its own version + 1) that some
                # replicas have applied goes to the rest with the version they took: a
                # copy recovered from one of them may have it already (not a second bump).
                sent = header if header.arg0 or not applied else header._replace(
                    arg0=max(applied.values()))
                results = await self.call_all(targets, sent, payload, epoch)
                for node, result in zip(targets, results, strict=True):
                    if not isinstance(result, BaseException):
                        applied[node.node_id] = result[1].get("arg0", 0)
                        self._changed(node.node_id)
                missing = [node for node, result in zip(targets, results, strict=True)
                           if isinstance(result, NoObject)]
                errors = [r for r in results if isinstance(r, BaseException)
                          and not isinstance(r, NoObject)]
                for error in errors:
                    if not isinstance(error, RETRYABLE):
                        if applied and not isinstance(error, ReadOnly):
                            # Some replicas have the change, the failed one some of it
                            # (it marked its copy suspect): make them agree now. Not a
                            # stale writer's change that a frozen generation refused: a
                            # repair would spread it over the snapshot's other copies.
                            self.repairer.repair_soon(header.oid, "change applied in part")
                        raise error
                if errors:
                    raise errors[0]
                if not missing:
                    break
                # The write goes to them again even when the copy came from a replica
                # it had reached: a copy that recovery made meanwhile may have been kept
                # instead (same version, yet without this write, which was still on its
                # way to that replica). Applying it twice changes nothing.
                await self._recover_for_write(header, nodes, missing, epoch)
                targets = missing
            short = [node.node_id for node in nodes if node.node_id not in applied]
            if short or not applied:
                raise Unavailable(f"object {header.oid:016x}: no copy to write on "
                                  f"{', '.join(short) or 'any node'} yet")
            return b"", {"arg0": max(applied.values())}

        return await self._retrying(attempt)

    async def _recover_for_write(self, header: Header, nodes: list[NodeInfo],
                                 missing: list[NodeInfo], epoch: int) -> None:
        """Give the replicas of this epoch that lack the object a copy, before the write
        counts: from a replica that has it (with the write already applied), else from
        where an earlier epoch put it. A write waits for this; it never fails on it.

        (The first piece of recovery: a replica that joined the placement after a
        node loss. Recovery of everything else is the self-healing stage's work.)
        """
        object_size = self.group.state.object_size
        # The copy travels as its extents (FLAG_SPARSE): holes stay holes on the new holders.
        read = Header(opcode=Op.READ_OBJ, oid=header.oid, offset=0, count=object_size,
                      arg1=header.arg1, flags=proto.FLAG_SPARSE)
        holders = [node for node in self._read_order(nodes) if node not in missing]
        found: Reply | None = None
        for node in holders:
            try:
                found = await self.call(node, read, b"", epoch)
                break
            except (NoObject, Unverified):
                continue
        if found is None:
            found = await self._read_from_past_epochs(read, epoch)
        if found is None:  # maybe only unverified copies: the newest of them
            found = await self._read_newest(read, nodes, epoch)
        data, fields = found
        proto.decode_extents(data, object_size)  # a malformed copy goes nowhere
        create = Header(opcode=Op.CREATE_AND_WRITE_OBJ, oid=header.oid, offset=0,
                        count=object_size, arg0=fields.get("arg0", 0), flags=proto.FLAG_SPARSE)
        await asyncio.gather(*(self.call(node, create, bytes(data), epoch) for node in missing))
        log.info("recovered object %016x onto %s for a write", header.oid,
                 ", ".join(node.node_id for node in missing))

    async def remove(self, header: Header, payload: bytes) -> Reply:
        async def attempt(epoch: int) -> Reply:
            nodes = self.group.placement(header.oid, epoch, header.arg1)
            results = await asyncio.gather(
                *(self.call(node, header, payload, epoch) for node in nodes),
                return_exceptions=True)
            for node in nodes:
                self._changed(node.node_id)
            errors = [r for r in results if isinstance(r, BaseException)]
            missing = [e for e in errors if isinstance(e, NoObject)]
            if len(missing) == len(nodes):
                raise NoObject(f"object {header.oid:016x} does not exist")
            for error in errors:
                if not isinstance(error, NoObject):
                    raise error
            return b"", {}

        return await self._retrying(attempt)

    def _read_order(self, nodes: list[NodeInfo]) -> list[NodeInfo]:
        return sorted(nodes, key=lambda node: node.node_id != self.node_id)

    async def read(self, header: Header, payload: bytes) -> Reply:
        async def attempt(epoch: int) -> Reply:
            retryable: SheepError | None = None
            damaged: SheepError | None = None
            unverified = False
            nodes = self.group.placement(header.oid, epoch, header.arg1)
            for node in self._read_order(nodes):
                try:
                    reply = await self.call(node, header, payload, epoch)
                except NoObject:
                    continue
                except Unverified:
                    unverified = True
                    continue
                except IOErrorResult as error:  # a damaged copy: the peer stops serving it
                    damaged = error
                    continue
                except RETRYABLE as error:
                    retryable = error
                    continue
                if damaged is not None:
                    self.repairer.repair_soon(header.oid)
                return reply
            if unverified and retryable is None:
                # Copies that came back with their nodes: the newest copy may still sit
                # where an earlier epoch put it, so those holders are asked too.
                try:
                    return await self._read_newest(
                        header, nodes + self._past_holders(header, nodes), epoch)
                except IOErrorResult as error:
                    damaged = error
            found = await self._read_from_past_epochs(header, epoch)
            if found is not None:
                if damaged is not None:
                    self.repairer.repair_soon(header.oid)
                return found
            if retryable is not None:
                raise retryable
            if damaged is not None:  # every copy is damaged: an error, never wrong bytes
                raise IOErrorResult(f"object {header.oid:016x}: no good copy left ({damaged})")
            raise NoObject(f"object {header.oid:016x} does not exist")

        return await self._retrying(attempt)

    def _past_holders(self, header: Header, nodes: list[NodeInfo]) -> list[NodeInfo]:
        """Members that the last epochs placed the object on, beyond nodes."""
        seen = {node.node_id for node in nodes}
        members = self.group.state.members
        holders = []
        for past in self.group.past_epochs(past_epochs_searched_max):
            for node in self.group.placement(header.oid, past, header.arg1):
                if node.node_id not in seen and node.node_id in members:
                    seen.add(node.node_id)
                    holders.append(members[node.node_id])
        return holders

    async def _read_from_past_epochs(self, header: Header, epoch: int) -> Reply | None:
        """Before recovery has moved an object, its copies sit where earlier epochs put them."""
        tried = {node.node_id for node in self.group.placement(header.oid, epoch, header.arg1)}
        members = self.group.state.members
        for past in self.group.past_epochs(past_epochs_searched_max):
            for node in self._read_order(self.group.placement(header.oid, past, header.arg1)):
                if node.node_id in tried or node.node_id not in members:
                    continue
                tried.add(node.node_id)
                try:
                    return await self.call(node, header, payload=b"", epoch=epoch)
                except (NoObject, Unverified, *RETRYABLE):
                    continue
        return None

    async def stats(self, oid: int, nodes: list[NodeInfo], epoch: int,
                    tolerant: bool = False, scrub: bool = False) -> list[Answer]:
        """Each node's STAT of its copy, None where it has none. A failure to reach a
        node (or a malformed reply) propagates, or with tolerant stands in the list in
        that node's place. With scrub, each node verifies every block of its copy first."""
        stat = Header(opcode=Op.STAT_OBJ, oid=oid, flags=proto.FLAG_SCRUB if scrub else 0)
        results = await asyncio.gather(*(self.call(node, stat, b"", epoch) for node in nodes),
                                       return_exceptions=True)
        values = [_copy_status(result) for result in results]
        for value in values:
            if isinstance(value, BaseException) and not tolerant:
                raise value
        return values

    async def read_copy(self, node: NodeInfo, header: Header, epoch: int) -> Reply:
        """Read this node's copy, verified or not (FLAG_DIRECT)."""
        direct = Header(opcode=Op.READ_OBJ, oid=header.oid, offset=header.offset,
                        count=header.count, flags=header.flags | proto.FLAG_DIRECT)
        return await self.call(node, direct, b"", epoch)

    async def read_extents(self, node: NodeInfo, oid: int,
                           epoch: int) -> tuple[list[proto.Extent], bytes | bytearray | memoryview, int]:
        """This node's copy, verified or not (FLAG_DIRECT), as its extents (FLAG_SPARSE):
        (the extents, the payload they are views of, the copy's version). A malformed
        reply is BadRequest, never a copy."""
        object_size = self.group.state.object_size
        data, fields = await self.read_copy(node, Header(
            opcode=Op.READ_OBJ, oid=oid, count=object_size, flags=proto.FLAG_SPARSE), epoch)
        return proto.decode_extents(data, object_size), data, fields.get("arg0", 0)

    async def _read_newest(self, header: Header, nodes: list[NodeInfo], epoch: int) -> Reply:
        """No verified copy answered (say, every sheep just restarted): read the copy
        with the highest version, whatever its state (a damaged one is passed over).
        Unless a node away from the cluster may hold a newer one (sheep/replicas.py:
        verdict): then the object waits for it (Unavailable, which is retried)."""
        stats = list(zip(nodes, await self.stats(header.oid, nodes, epoch), strict=True))
        damaged: SheepError | None = None
        while (best := replicas.newest(stats, verified_only=False)) is not None and not best.removed:
            self._check_none_newer_away(header.oid, best)
            try:
                return await self.read_copy(best.node, header, epoch)
            except IOErrorResult as error:
                damaged = error
                stats = [(node, stat) for node, stat in stats if node != best.node]
        if damaged is not None:
            raise damaged
        raise NoObject(f"object {header.oid:016x} does not exist")

    def _check_none_newer_away(self, oid: int, best: Copy[NodeInfo]) -> None:
        """Refuse to take an unverified copy as the newest while a node the placement
        named since its ``since`` epoch is away: that node may hold a newer copy (the
        verifier waits for it too)."""
        if replicas.vouches(best, best.version) or best.status.since is None:
            return
        away = self.group.holders_away(oid, best.status.since, best.node.node_id)
        if away:
            names = ", ".join(node.node_id for node in away)
            raise Unavailable(
                f"object {oid:016x}: its newest copy may be on {names}, not a member now;"
                " waiting for it ('dog cluster recover force' if it is gone for good)")

    async def flush(self, header: Header, payload: bytes) -> Reply:
        """Every member syncs what changed on it (a flush that names no VDI, and a
        writable handle's first: sheep/daemon.py)."""
        return await self._flush(everywhere=True)

    async def flush_changed(self) -> Reply:
        """A VDI writer's flush: only the members that this sheep made changes on, and
        acknowledged, that no flush finished since has made durable. Every change it
        acknowledged before this flush began is on one of them, or durable already;
        a flush still under way covers nothing for it (it may fail, or have begun
        before the change). A flush reaching every member cost a round trip to each,
        and waited for the slowest one's sync under way, whoever it was for: in a
        cluster of many sheep, most had nothing of ours."""
        return await self._flush(everywhere=self.group.epoch != self._flushed_epoch)

    def _changed(self, node_id: str) -> None:
        self._changes += 1
        self._changed_on[node_id] = self._changes

    async def _flush(self, everywhere: bool) -> Reply:
        marks = dict(self._changed_on)  # what this flush covers: changes acked so far
        epoch = self.group.epoch

        async def attempt(epoch: int) -> Reply:
            nodes = [node for node in self.group.state.nodes
                     if everywhere or marks.get(node.node_id, 0)
                     > self._durable_on.get(node.node_id, 0)]
            if nodes:  # members that left hold no copy that counts any more
                await self._all(nodes, Header(opcode=Op.FLUSH), b"", epoch)
            return b"", {}

        reply = await self._retrying(attempt)
        for node_id, mark in marks.items():
            self._durable_on[node_id] = max(self._durable_on.get(node_id, 0), mark)
        if everywhere:
            self._flushed_epoch = max(self._flushed_epoch, epoch)
        members = self.group.state.members
        for gone in [node_id for node_id in self._changed_on if node_id not in members]:
            del self._changed_on[gone]
            self._durable_on.pop(gone, None)
        return reply

    async def stat(self, header: Header, payload: bytes) -> Reply:
        epoch = self.group.epoch
        nodes = self.group.placement(header.oid, epoch, header.arg1)
        results = await asyncio.gather(
            *(self.call(node, header, b"", epoch) for node in nodes), return_exceptions=True)
        replicas: list[dict[str, Any]] = []
        for node, result in zip(nodes, results, strict=True):
            entry: dict[str, Any] = {"node_id": node.node_id, "endpoint": node.endpoint,
                                     "zone": node.zone, "rack": node.rack}
            if isinstance(result, BaseException):
                entry["error"] = str(result)
            else:
                entry.update(proto.decode_json(result[0]))
            replicas.append(entry)
        value = {"oid": header.oid, "epoch": epoch,
                 "copies": header.arg1 or self.group.copies_for(header.oid),
                 "replicas": replicas}
        return proto.encode_json(value), {}

def _copy_status(result: Reply | BaseException) -> Answer:
    """One node's STAT reply parsed: None for no copy; a failure, or a malformed
    reply (a SheepError), stands in its place."""
    if isinstance(result, NoObject):
        return None
    if isinstance(result, BaseException):
        return result
    try:
        return CopyStatus.from_json(proto.decode_json(result[0]))
    except SheepError as error:
        return error
