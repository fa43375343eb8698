"""The composition root: a Sheep built from its config, store and driver.

No module-level state: several Sheep objects can live in one process (the
in-process test cluster does exactly that). The Sheep owns the event loop's
tasks: the driver's event stream feeding the cluster state machine, and the
server dispatching requests by the op table to the gateway, the peer side and
the admin handlers below.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sheep import __version__, auth, constants, proto
from sheep.client import Connection
from sheep.cluster.driver import ClusterDriver, Snapshot
from sheep.cluster_state import ApplyResult, ClusterState, Event, EventKind, Status, format_problem
from sheep.errors import (
    AuthFailed,
    NoObject,
    NotFormatted,
    PermissionDenied,
    Result,
    SheepError,
    ShuttingDown,
    Timeout,
    Unavailable,
    VdiLocked,
    error_for,
)
from sheep.gateway import Gateway, PeerPool
from sheep.group import Group
from sheep.metrics import Metrics
from sheep.net import Reply, Server, Session
from sheep.node import NodeInfo, from_member
from sheep.oid import VDI_TYPES, oid_generation, oid_type
from sheep.peer import Peer
from sheep.proto import Header, Kind, Op
from sheep.recovery import Recoverer, Verifier
from sheep.scrub import Scrubber
from sheep.store import Store
from sheep.vdi_service import Handle, VdiService
from sheep.world import REAL, World

log = logging.getLogger(__name__)

_empty: Reply = (b"", {})
shutdown_grace_s = 1.0  # how long a request waits for the last node of a restart
writeback_interval_s = 30.0
sweep_interval_s = 600.0  # how often the first member sweeps unreachable objects
trash_check_interval_s = 5.0  # how often the first member purges expired VDIs in the trash
fence_poll_s = 0.05
stop_start_grace_s = 1.0  # a stop during start lets a join under way finish this long
leave_timeout_s = 3.0  # a stop logs its leave within this, else ends as a death
snapshot_epochs = 64  # epochs a snapshot carries: placement looks back 16 at most
space_nearly_full_ratio = 0.10


@dataclass(frozen=True)
class SheepConfig:
    directory: str
    address: str = constants.address_default
    port: int = constants.port_default
    zone: int | None = None
    rack: int | None = None
    weight: int | None = None  # bytes; default: the free space of the store's filesystem
    io_scheduler: str = "mclock"  # or "fifo": no scheduling (sheep/mclock.py: Core.fifo)
    # The cluster's node key (sheep/auth.py): this sheep's credentials towards its peers,
    # and the key it accepts from them. None: a random one (a cluster of this sheep alone).
    node_key: bytes | None = None
    keyring_path: str | None = None  # the file it came from, named to clients on this host
    # How long a client's first write waits for a busy lock holder to hand the VDI's
    # lock over (sheep/vdi_service.py), before it is refused.
    handoff_wait_s: float = 3.0


def space_state(usage: dict[str, int], object_size: int) -> str:
    """'full' when writes are refused or about to be (the store is down to its reserve,
    or one more object from it), 'nearly full' under 10% free."""
    if usage["free"] < constants.space_reserve_bytes + object_size:
        return "full"
    if usage["free"] < usage["fs_size"] * space_nearly_full_ratio:
        return "nearly full"
    return "ok"


# VDI operations counted for metrics (sheep/metrics.py), by their label.
_measured_ops = {Op.VDI_READ: "read", Op.VDI_WRITE: "write", Op.VDI_DISCARD: "discard",
                 Op.FLUSH: "flush"}
# Raw object changes (Daemon._check_raw_change).
_raw_changes = frozenset({Op.WRITE_OBJ, Op.CREATE_AND_WRITE_OBJ, Op.DISCARD_OBJ, Op.REMOVE_OBJ})


class Sheep:
    def __init__(self, config: SheepConfig, store: Store, driver: ClusterDriver,
                 world: World = REAL) -> None:
        self.config = config
        self.metrics = Metrics(self._metrics_state)
        self.world = world
        self.clock = world.clock
        self.store = store
        self.driver = driver
        self.node: NodeInfo | None = None
        self.group = Group(ClusterState(), self.clock)
        self.credentials = auth.Credentials(auth.NODE, config.node_key or auth.new_key())
        self._node_entry = auth.Entry(self.credentials.key, auth.Caps(node=True))
        self.pool = PeerPool(world.network, self.credentials)
        self.server = Server(self.dispatch, self, world)
        self.joined = asyncio.Event()
        self.stopped = asyncio.Event()
        self.stopping = False
        self.started_at = self.clock.wall()
        self._start_begun = False
        self._start_task: asyncio.Task[None] | None = None
        self._start_finished = asyncio.Event()  # start returned or failed
        self._op_ids = itertools.count(1)
        self._op_waiters: dict[str, asyncio.Future[ApplyResult]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._applied = asyncio.Event()  # set after every applied event
        self.peer: Peer | None = None
        self.gateway: Gateway | None = None
        self.vdis: VdiService | None = None
        self.recoverer: Recoverer | None = None
        self.scrubber: Scrubber | None = None
        self._verifier: asyncio.Task[None] | None = None
        self._verifying: Verifier | None = None  # the last verifier run, for its status
        self._stopper: asyncio.Task[None] | None = None
        self.admin: dict[Op, Callable[[Header, bytes], Awaitable[Reply]]] = {
            Op.PING: self.ping,
            Op.CLUSTER_INFO: self.cluster_info,
            Op.FORMAT: self.format,
            Op.SHUTDOWN: self.shutdown,
            Op.NODE_INFO: self.node_info,
            Op.NODE_LIST: self.node_list,
            Op.KILL_NODE: self.kill_node,
            Op.FORCE_RECOVER: self.force_recover,
            Op.SET_RECOVERY: self.set_recovery,
            Op.ALTER_COPY: self.alter_copy,
            Op.REWEIGHT: self.reweight,
            Op.SET_SCRUB: self.set_scrub,
            Op.AUTH_ADD: self.auth_add,
            Op.AUTH_RM: self.auth_rm,
            Op.AUTH_ROTATE: self.auth_rotate,
            Op.AUTH_LIST: self.auth_list,
            Op.AUTH_GET: self.auth_get,
        }
        proto.check_handlers(self.admin, {Kind.ADMIN}, "Sheep.admin")

    # --- lifecycle -------------------------------------------------------------

    async def start(self, listener: Any) -> None:
        """Open the store, join the cluster, serve (on a bound socket, or what a simulated
        network listens on). Returns once this sheep is a member."""
        self._start_begun = True
        self._start_task = asyncio.get_running_loop().create_task(self._start(listener))
        try:
            await self._start_task
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            raise ShuttingDown("stopped while starting") from None
        finally:
            self._start_finished.set()

    async def _start(self, listener: Any) -> None:
        self.store.open()
        saved, epochs = self.store.load_cluster_state()
        if saved is not None:
            self.group.state = ClusterState.from_json(saved, epochs)
        if self.group.state.status is not Status.WAIT_FOR_FORMAT:
            self.store.set_object_size(self.group.state.object_size)
        self.node = self._make_node()
        self.peer = Peer(self.store, self.group, self.node.node_id, self.clock,
                         self.world.faults)
        self.peer.scheduler.set_qos(self.group.state.vdis.qos())
        self.peer.scheduler.fifo = self.config.io_scheduler == "fifo"
        self.gateway = Gateway(self.group, self.peer, self.node.node_id, self.pool, self.world)
        self.vdis = VdiService(self.group, self.gateway, self.node.node_id, self.broadcast,
                               self._member_connection, self.config.handoff_wait_s)
        self.peer.on_suspect = self._start_verifier
        if self.group.state.status is not Status.WAIT_FOR_FORMAT:
            # What this store holds may have changed elsewhere while it was away: since
            # the epoch it stopped in.
            self._start_unverified(self.group.state.epoch)
        await self.server.start(listener)
        self.driver.applied_seq = lambda: self.group.state.seq
        self.driver.snapshot_source = self._snapshot
        await self.driver.join(self.node, self.group.state.seq)
        self._tasks.append(asyncio.get_running_loop().create_task(self._apply_events()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._writeback()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._sweep()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._purge_expired()))
        if self.driver.can_fence:
            self.gateway.fenced = asyncio.Event()
            self.gateway.fence_check = self.peer.fence_check = self._fenced_now
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch_fence()))
        await self.joined.wait()
        log.info("sheep %s joined at epoch %d", self.node.node_id, self.group.epoch)
        self.recoverer = Recoverer(self.store, self.peer, self.group, self.gateway,
                                   self.node.node_id)
        self.peer.on_partial = self.recoverer.fill_soon
        self.recoverer.trigger()
        self._tasks.append(asyncio.get_running_loop().create_task(self.recoverer.tune()))
        self.scrubber = Scrubber(self.peer, self.group, self.gateway)
        self._tasks.append(asyncio.get_running_loop().create_task(self.scrubber.run()))
        if self.peer.health.unverified_count:
            self._start_verifier()

    def _start_verifier(self) -> None:
        assert self.peer is not None and self.gateway is not None and self.node is not None
        if self.stopping:
            return
        log.info("verifying %d copies against the other replicas", self.peer.health.unverified_count)
        if self._verifier is not None and not self._verifier.done():
            return  # the running one goes on until every copy is verified
        verifier = Verifier(self.store, self.peer, self.group, self.gateway, self.node.node_id)
        self._verifying = verifier
        self._verifier = asyncio.get_running_loop().create_task(verifier.run())
        self._tasks.append(self._verifier)

    def _fenced_now(self) -> bool:
        """The driver's fencing (decided on its threads, or by its lease's clock), and
        the gateway's event, which wakes what is in flight, brought in line with it."""
        fenced = self.driver.fenced
        event = self.gateway.fenced if self.gateway is not None else None
        if event is None:
            return fenced
        if fenced and not event.is_set():
            event.set()
            assert self.gateway is not None
            self.gateway.fence_in_flight()
            log.warning("fenced: refusing I/O until the cluster driver's session is sure"
                        " again and its log applied")
        elif not fenced and event.is_set():
            event.clear()
            log.info("unfenced: serving again")
        return fenced

    async def _watch_fence(self) -> None:
        """Mirror the driver's fencing into the gateway's event at least every
        fence_poll_s (requests bring it in line as they come: _fenced_now)."""
        while True:
            self._fenced_now()
            await self.clock.sleep(fence_poll_s)

    async def _writeback(self) -> None:
        """Sync what changed every writeback_interval_s, as the kernel writes back dirty
        pages: a crash then has little to sort out, and pending metadata stays small."""
        assert self.peer is not None
        while True:
            await self.clock.sleep(writeback_interval_s)
            if self.store.pending:
                try:
                    await self.peer.sync_all()
                except SheepError as error:
                    log.error("background sync failed: %s", error)

    async def _sweep(self) -> None:
        """Every sweep_interval_s the first member (by node id) removes the objects of
        frozen or deleted generations that nothing reaches (Collector.sweep in sheep/vdi_gc.py)."""
        while True:
            await self.clock.sleep(sweep_interval_s)
            state = self.group.state
            if (self.vdis is None or self.node is None or state.status is not Status.OK
                    or not state.members or min(state.members) != self.node.node_id):
                continue
            try:
                await self.vdis.gc.sweep()
            except SheepError as error:
                log.warning("sweep of unreachable objects failed: %s", error)

    async def _purge_expired(self) -> None:
        """Every trash_check_interval_s the first member purges the VDIs whose time in
        the trash ran out (dog vdi trash mv --expires-in): each as dog vdi trash purge
        does, its objects freed by the collector at the background-work rate."""
        while True:
            await self.clock.sleep(trash_check_interval_s)
            state = self.group.state
            if (self.vdis is None or self.node is None or state.status is not Status.OK
                    or not state.members or min(state.members) != self.node.node_id):
                continue
            now = self.clock.wall()
            for vdi in list(state.vdis.vdis.values()):
                expires = (vdi.trash or {}).get("expires")
                if expires is None or expires > now:
                    continue
                try:
                    await self.vdis.admin.delete({"name": vdi.name, "purge": True,
                                                  "expires": expires},
                                                 Header(opcode=Op.VDI_DELETE))
                    log.info("purged VDI %s from the trash: its time there ran out", vdi.name)
                except SheepError as error:
                    log.warning("could not purge VDI %s from the trash: %s", vdi.name, error)

    def _make_node(self) -> NodeInfo:
        from sheep.node import zone_for_address

        config = self.config
        weight = config.weight
        if weight is None:
            fs = os.statvfs(self.store.path)
            weight = fs.f_bavail * fs.f_frsize
        zone = config.zone if config.zone is not None else zone_for_address(
            config.address, config.port)
        node_id = f"{config.address}:{config.port}/{self.store.node_secret()}"
        weight = min(weight, constants.weight_max_bytes)
        return NodeInfo(node_id=node_id, address=config.address, port=config.port, zone=zone,
                        weight=weight, rack=config.rack, base_weight=weight)

    async def stop(self, leave: bool = True) -> None:
        """Finish in-flight requests, sync the store, leave the cluster, close."""
        if self.stopping:
            await self.stopped.wait()
            return
        self.stopping = True
        log.info("stopping (leave=%s)", leave)
        if self._start_begun and not self._start_finished.is_set():
            # A stop (SIGTERM) during start lets a join that is under way finish, for a
            # moment: closing the store under it would kill the event stream. A start
            # that cannot reach its cluster driver (ZooKeeper down) is given up.
            try:
                await self.clock.wait_for(asyncio.shield(self._start_finished.wait()),
                                          stop_start_grace_s)
            except TimeoutError:
                log.warning("stopping while still starting: giving up the join")
                await self.driver.close()
                if self._start_task is not None:
                    self._start_task.cancel()
                await self._start_finished.wait()
        await self.server.stop()
        if self.recoverer is not None:
            await self.recoverer.stop()
        if self.peer is not None:
            await self.peer.quiesce()  # the sync under way finishes before the last one
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            self.store.sync()
        except Exception:
            # Whatever broke it (a SheepError, or a bug such as a value that no longer
            # packs), the sheep still leaves and stops: a stop that never ends keeps the
            # node a member that serves nothing. The next start recovers from intents.
            log.exception("final sync failed")
        if leave:
            try:  # a service that cannot be reached must not hold the stop up
                await self.clock.wait_for(self.driver.leave(), leave_timeout_s)
            except TimeoutError:
                log.warning("could not log a graceful leave within %g s: the others will"
                            " see this sheep die instead", leave_timeout_s)
                await self.driver.close()
        else:
            await self.driver.close()
        self.pool.close()
        try:
            self.store.close()
        except Exception:
            log.exception("closing the store failed")
        self.stopped.set()

    def _stop_soon(self) -> None:
        """Stop from inside a request: the reply goes out before the server drains."""
        async def stop_soon() -> None:
            await self.clock.sleep(0.05)
            await self.stop()

        # Not one of self._tasks: stop cancels those.
        self._stopper = asyncio.get_running_loop().create_task(stop_soon())

    # --- the ordered event stream ----------------------------------------------

    async def _apply_events(self) -> None:
        while True:
            event = await self.driver.events.get()
            if isinstance(event, Snapshot):
                self._install(event)
                continue
            try:
                self._apply(event)
            except Exception:
                # Every sheep applies the same log: an event that breaks the state
                # machine is a bug, and serving on without it would diverge silently.
                log.critical("cannot apply event %d (%s); stopping", event.seq,
                             event.kind.value if event.kind is not EventKind.OP
                             else event.body.get("type"), exc_info=True)
                self.world.crash(f"cannot apply event {event.seq}")
                return

    def _install(self, snapshot: Snapshot) -> None:
        """The log was trimmed past our position: take the state at snapshot.seq."""
        if snapshot.seq <= self.group.state.seq:
            return
        log.info("catching up from a snapshot of the cluster state at log position %d",
                 snapshot.seq)
        self.group.state = ClusterState.from_json(snapshot.state, snapshot.epochs)
        self.store.save_cluster_state(self.group.state.to_json(), snapshot.epochs)
        if self.peer is not None:
            self.peer.scheduler.set_qos(self.group.state.vdis.qos())
        if self.group.state.status is not Status.WAIT_FOR_FORMAT:
            self.store.set_object_size(self.group.state.object_size)
        self.group.notify_epoch()
        if self.recoverer is not None and self.joined.is_set() and not self.stopping:
            self.recoverer.trigger()

    def _snapshot(self) -> Snapshot:
        state = self.group.state
        return Snapshot(seq=state.seq, state=state.to_json(),
                        epochs=[entry.to_json() for entry in state.epochs[-snapshot_epochs:]])

    def _apply(self, event: Event) -> None:
        state = self.group.state
        if event.seq <= state.seq:
            return
        epochs_before = len(state.epochs)
        epoch_before = state.epoch
        status_before = state.status
        copies_before = ((state.copies, state.vdis.copies_by_generation())
                         if event.kind is EventKind.OP
                         and event.body.get("type") in ("copies", "vdi_alter_copy") else None)
        result = state.apply(event)
        self.store.save_cluster_state(
            state.to_json(), [entry.to_json() for entry in state.epochs[epochs_before:]])
        if result.wipe_store:
            self.store.wipe()
            self.store.config_put("unverified_since", None)
            self.store.set_object_size(state.object_size)
            if self.vdis is not None:
                self.vdis.reset()
        if self.vdis is not None and event.kind is not EventKind.JOIN:
            self.vdis.forget_entries()  # a lock may have moved, a tree may have changed
        if self.peer is not None and event.kind is EventKind.OP:
            self.peer.scheduler.set_qos(state.vdis.qos())
        if result.epoch_changed:
            log.info("epoch %d: %s %s", state.epoch, event.kind.value,
                     event.node.node_id if event.node else event.node_id)
            self.group.notify_epoch()
            self.pool.forget({node.endpoint for node in state.members.values()})
            if self.joined.is_set() and epoch_before and not self.stopping:
                self._suspect_returning_copies(epoch_before, state.epoch)
        assert self.node is not None
        live = event.seq > self.driver.history_seq  # else replayed history
        if event.kind is EventKind.JOIN and event.node == self.node and live:
            # Before recovery is triggered: a sheep joining again after it was declared
            # dead recovers for its new epoch like any member (found by the simulator).
            # Only this incarnation's join: an earlier one's, replayed (a new store on a
            # cluster log that saw this node id before), is history.
            self.joined.set()
        copies_changed = copies_before is not None and result.result is Result.SUCCESS
        if copies_changed and self.joined.is_set() and not self.stopping:
            assert copies_before is not None
            self._suspect_copies_placed_here(*copies_before)
        serving_again = state.status is Status.OK and status_before is not Status.OK
        if ((result.epoch_changed or serving_again or copies_changed)
                and self.recoverer is not None
                and self.joined.is_set() and not self.stopping):
            self.recoverer.trigger()
        if (event.kind is EventKind.LEAVE and event.node_id == self.node.node_id
                and self.joined.is_set() and not self.stopping and self.peer is not None):
            # Declared dead while alive (a lost driver session): writes went on without
            # us, so every copy here is suspect until compared again, as after a restart.
            log.warning("this sheep was declared dead; it joins again with its copies unverified")
            # Not a member until its new join is applied: the others refuse its peer
            # requests meanwhile, so it serves no client either (found by the
            # simulator, once expired sessions are logged while their sheep is away).
            self.joined.clear()
            self._start_unverified(epoch_before)
            self._start_verifier()
        if result.mode_changed:
            log.info("frames are %s from now on: connections made before reconnect",
                     "encrypted" if state.encrypt else "signed")
            self.server.cut_mode(state.encrypt)
        if result.cut:
            cut = self.server.cut(result.cut)
            log.info("principal %s removed or its key rotated: %d connection(s) cut",
                     result.cut, cut)
        if result.shutdown and not self.stopping and live:
            # A shutdown replayed from before this sheep's join stopped an earlier
            # cluster (or this one while this sheep was away): not this sheep now.
            log.info("cluster shutdown requested")
            self._stop_soon()
        self._applied.set()
        waiter = self._op_waiters.pop(event.op_id, None) if event.op_id else None
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def _suspect_returning_copies(self, before: int, after: int) -> None:
        """A copy this sheep kept while the placement was elsewhere (a surplus copy not
        dropped yet) missed the writes made meanwhile. When the placement comes back to
        it, it is suspect until compared with the others: else the next write would give
        it the same version as the copies that have those writes (found by the
        simulator). Done as the epoch is applied, before any request of the new epoch
        is served here."""
        assert self.peer is not None and self.node is not None
        me = self.node.node_id
        returning = [oid for oid in self.store.copies()
                     if not self.peer.health.is_unverified(oid)
                     and any(node.node_id == me for node in self.group.placement(oid, after))
                     and not any(node.node_id == me
                                 for node in self.group.placement(oid, before))]
        if returning:
            log.info("%d copies kept outside the placement are back in it: verifying them",
                     len(returning))
            self.peer.health.suspect(returning, before)
            self._save_unverified_since()
            self._start_verifier()

    def _suspect_copies_placed_here(self, cluster_before: int,
                                    generations_before: dict[int, int]) -> None:
        """Copies changed (alter-copy): the placement of an object with more copies
        than before may now name this sheep, whose copy of it (a surplus one, kept from
        when it had more copies still) missed the writes since. As when an epoch brings
        the placement back to a copy, it is suspect until compared with the others."""
        assert self.peer is not None and self.node is not None
        me, epoch = self.node.node_id, self.group.epoch
        returning = []
        for oid in self.store.copies():
            if self.peer.health.is_unverified(oid):
                continue
            before = generations_before.get(oid_generation(oid)) if oid_type(
                oid) in VDI_TYPES else None
            before = before or cluster_before
            if before >= self.group.copies_for(oid):
                continue  # no more copies than before: the placement only shrank
            if (any(node.node_id == me for node in self.group.placement(oid, epoch))
                    and not any(node.node_id == me
                                for node in self.group.placement(oid, epoch, before))):
                returning.append(oid)
        if returning:
            log.info("%d copies kept here are in the placement again (more copies): verifying"
                     " them", len(returning))
            self.peer.health.suspect(returning, epoch)
            self._save_unverified_since()
            self._start_verifier()

    def _start_unverified(self, since: int) -> None:
        """Every copy here is suspect (a restart, or declared dead while alive): it may
        lack the changes made from epoch ``since`` on (the placement was elsewhere, or
        the others went on without this sheep), a copy in doubt those made from its
        doubt's epoch (a power loss took them), and a copy still unverified from before
        a restart those made from its own epoch (kept in the store, as the earliest of
        them). The verifier waits for the nodes placed since then that are away."""
        assert self.peer is not None
        saved = self.store.config_get("unverified_since")
        if saved is not None:
            since = min(since, int(saved))
        # Partial copies too: once filled, the ranges written here may be stale (this
        # sheep was away), so they are compared with the others like any copy here.
        self.store.partial_copies_unsure()
        self.peer.health.start_unverified(self.store.list_oids(), since, self.store.doubts())
        self._save_unverified_since()

    def _save_unverified_since(self) -> None:
        """Keep the earliest epoch an unverified copy may lack changes from, for a restart
        before the verifier is done (it clears it when every copy is verified)."""
        assert self.peer is not None
        oldest = self.peer.health.oldest_since()
        saved = self.store.config_get("unverified_since")
        if oldest is not None and (saved is None or oldest < int(saved)):
            self.store.config_put("unverified_since", oldest)

    def _trial(self, body: dict[str, Any]) -> None:
        """Refuse an op the cluster state would refuse now, before it reaches the log:
        only ops accepted when they were sent are logged (one that a concurrent op
        makes fail meanwhile is still logged, and refused by every sheep alike). The
        trial runs on a copy; an op that would break the state's invariants is refused
        here too, never applied."""
        assert self.node is not None
        trial = copy.deepcopy(self.group.state)
        event = Event(seq=trial.seq + 1, kind=EventKind.OP, time=self.clock.wall(),
                      node_id=self.node.node_id, body=body)
        try:
            result = trial.apply(event)
        except (AssertionError, ArithmeticError, KeyError, TypeError, ValueError) as error:
            log.error("refusing cluster op %s: it would break the cluster state (%r)",
                      str(body.get("type"))[:40], error)
            raise error_for(Result.INVALID_PARMS, f"cluster op {str(body.get('type'))[:40]}"
                            " refused: invalid for the cluster state") from None
        if result.result != Result.SUCCESS:
            raise error_for(result.result, result.message)

    async def broadcast(self, body: dict[str, Any]) -> ApplyResult:
        """Send a cluster op through the ordered log, if the state accepts it now; wait
        until it is applied here."""
        assert self.node is not None
        self._trial(body)
        op_id = f"{self.node.node_id}#{next(self._op_ids)}#{self.world.token(4)}"
        future: asyncio.Future[ApplyResult] = asyncio.get_running_loop().create_future()
        self._op_waiters[op_id] = future
        await self.driver.broadcast(op_id, body)
        try:
            result = await self.clock.wait_for(future, constants.op_timeout_ms / 1000)
        except TimeoutError:
            self._op_waiters.pop(op_id, None)
            raise Timeout(f"cluster operation {body.get('type')} was not applied in time") from None
        if result.result != Result.SUCCESS:
            raise error_for(result.result, result.message)
        await self._wait_members_applied(self.group.state.seq)
        return result

    async def _wait_members_applied(self, seq: int) -> None:
        """A barrier: every member has applied the log up to seq (dead ones are skipped),
        so a client may use the op's effect through any sheep once it is answered."""
        assert self.node is not None

        async def wait(node: NodeInfo) -> None:
            try:
                connection = await self.pool.get(node)
                await connection.call(Header(opcode=Op.PING, arg0=seq),
                                      timeout_ms=constants.epoch_wait_ms)
            except SheepError as error:
                log.warning("member %s did not confirm seq %d: %s", node.node_id, seq, error)

        await asyncio.gather(*(wait(node) for node in self.group.state.nodes
                               if node.node_id != self.node.node_id))

    async def wait_applied(self, seq: int, timeout_s: float) -> None:
        deadline = self.clock.monotonic() + timeout_s
        while self.group.state.seq < seq:
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                raise Timeout(f"log position {seq} not applied here in time")
            self._applied.clear()
            try:
                await self.clock.wait_for(self._applied.wait(), remaining)
            except TimeoutError:
                continue

    # --- dispatch ----------------------------------------------------------------

    # --- authentication (auth.Authority) --------------------------------------------

    def lookup(self, name: str) -> auth.Entry | None:
        """The key and caps of a principal: the node key is this sheep's own, the others
        are in the cluster state."""
        if name == auth.NODE:
            return self._node_entry
        return self.group.state.principals.get(name)

    def mode(self) -> str:
        return "encrypt" if self.group.state.encrypt else "sign"

    def keyring_hint(self) -> str | None:
        return self.config.keyring_path

    def _authorize(self, header: Header, payload: bytes, session: Session,
                   info: proto.OpInfo) -> bool:
        """Refuse what the session's principal may not do (PermissionDenied, naming the
        principal and what it lacks); True if a VDI list must be cut to its VDIs."""
        principal = session.principal
        if principal is None:
            raise AuthFailed("this connection has not authenticated")
        caps = principal.caps
        if info.caller is proto.Caller.PEER and not caps.node:
            raise PermissionDenied(f"{info.name} is for the sheep themselves (the node key),"
                                   f" not {principal.name}")
        if caps.privileged:
            return False
        if info.caller is proto.Caller.ADMIN:
            raise PermissionDenied(f"{info.name} needs admin caps; {principal.name} has"
                                   f" '{caps.text()}'")
        op = Op(header.opcode)
        if info.kind is Kind.GATEWAY and op is not Op.FLUSH:
            raise PermissionDenied(f"{info.name} (raw object I/O) needs admin caps;"
                                   f" {principal.name} has '{caps.text()}'")
        if op is Op.VDI_LIST or op is Op.VDI_ATTACHMENTS:
            return True
        if info.kind is Kind.VDI_ADMIN or op is Op.VDI_OPEN:
            body = proto.decode_json(payload)
            if not isinstance(body, dict):
                return False  # the handler refuses it
            names = [body.get("name")] + ([body.get("source")] if op is Op.VDI_CLONE else [])
            if op is Op.VDI_RENAME:  # both names: a rename must not carry a VDI out of reach
                names.append(body.get("new_name"))
            for name in names:
                if not isinstance(name, str) or not caps.may_touch(name):
                    raise PermissionDenied(f"{principal.name} may not touch VDI"
                                           f" {str(name)[:128]!r} (caps '{caps.text()}')")
            writes = op not in (Op.VDI_GETATTR, Op.VDI_OBJECT, Op.VDI_OPEN, Op.VDI_DIFF,
                                Op.VDI_DU, Op.VDI_INFO) or (
                op is Op.VDI_OPEN and body.get("writable"))
            if writes and caps.read_only:
                raise PermissionDenied(f"{principal.name} is read-only: {info.name} refused")
            if body.get("force") and op in (Op.VDI_ROLLBACK, Op.VDI_DELETE):
                # Forcing past another writer's lock takes it away, as VDI_UNLOCK does.
                raise PermissionDenied(f"{info.name} with force needs admin caps;"
                                       f" {principal.name} has '{caps.text()}'")
        return False

    def _visible(self, reply: Reply, session: Session) -> Reply:
        """A VDI list cut to the VDIs the session's principal may touch."""
        assert session.principal is not None
        caps = session.principal.caps
        data, fields = reply
        items = proto.decode_json(data)
        return proto.encode_json([item for item in items if caps.may_touch(item["name"])]), fields

    def dispatch(self, header: Header, payload: bytes, session: Session) -> Awaitable[Reply]:
        """The op's handler, once the session's principal may run it (no coroutine of its
        own: this runs for every frame)."""
        info = proto.OPS[Op(header.opcode)]
        if self._authorize(header, payload, session, info):
            return self._listed(header, payload, session, info)
        return self._dispatch(header, payload, session, info)

    async def _listed(self, header: Header, payload: bytes, session: Session,
                      info: proto.OpInfo) -> Reply:
        return self._visible(await self._dispatch(header, payload, session, info), session)

    async def _dispatch(self, header: Header, payload: bytes, session: Session,
                        info: proto.OpInfo) -> Reply:
        if info.kind is Kind.ADMIN:
            return await self.admin[Op(header.opcode)](header, payload)
        if self.stopping:
            raise ShuttingDown(f"sheep {self.config.address}:{self.config.port} is shutting down")
        if not self.joined.is_set():
            raise Unavailable("this sheep is not a member of the cluster now: it has not"
                              " joined yet, or joins again after it was declared dead")
        if self._fenced_now():
            raise Unavailable(f"sheep {self.config.address}:{self.config.port} is fenced: its"
                              " cluster driver's session is in doubt (its lease ran out) or"
                              " lost, or it is catching up with the cluster log")
        assert self.peer is not None and self.gateway is not None
        status = self.group.state.status
        if status is Status.SHUTDOWN and info.kind is not Kind.PEER:
            # The last node's join may be on its way here: give it a moment.
            deadline = self.clock.monotonic() + shutdown_grace_s
            while (self.group.state.status is Status.SHUTDOWN
                   and self.clock.monotonic() < deadline):
                await self.group.wait_epoch_after(self.group.epoch,
                                                  deadline - self.clock.monotonic())
            status = self.group.state.status
            if status is Status.SHUTDOWN:
                raise Unavailable(self.group.state.waiting_message())
        if status is Status.WAIT_FOR_FORMAT:
            if info.kind is Kind.PEER:  # the gateway saw a format that has not reached us yet
                raise Unavailable("this sheep has not applied the format yet")
            raise NotFormatted()
        if info.caller is proto.Caller.PEER:
            await self._check_member(header, session)
        if info.kind is Kind.PEER:
            return await self.peer.serve(header, payload)
        assert self.vdis is not None
        measured = _measured_ops.get(Op(header.opcode))
        if info.kind is Kind.VDI_ADMIN:
            return await self.vdis.admin.serve(header, payload)
        # A flush may name no VDI (dog vdi write): it is not scheduled, nor measured.
        handle = session.values.get("vdis", {}).get(header.arg0) if measured else None
        if handle is None or measured is None:
            if info.kind is Kind.VDI:
                return await self.vdis.serve_io(header, payload, session)
            if header.opcode in _raw_changes:
                self._check_raw_change(header)
            return await self.gateway.serve(header, payload)
        if measured == "read":
            return await self._scheduled(header, payload, session, handle, measured,
                                         info.kind)
        with self.vdis.arriving(handle):  # a holder with changes queued is busy
            return await self._scheduled(header, payload, session, handle, measured,
                                         info.kind)

    async def _scheduled(self, header: Header, payload: bytes, session: Session,
                         handle: Handle, measured: str, kind: Kind) -> Reply:
        """A VDI's I/O: it waits its turn in its own client queue (its QoS, its share)."""
        assert self.vdis is not None and self.peer is not None and self.gateway is not None
        flushed = None
        if header.opcode == Op.FLUSH and handle.writable:
            flushed = await self.vdis.flushing(header, session)  # a change: it locks
        queue = "client:" + handle.name
        nbytes = header.count if measured in ("read", "write") else 0
        scheduler = self.peer.scheduler
        request = await scheduler.start(queue, nbytes)
        started = self.clock.precise()
        try:
            if kind is Kind.VDI:
                reply = await self.vdis.serve_io(header, payload, session)
            elif header.opcode == Op.FLUSH and (handle.flushed_everywhere
                                                or not handle.writable):
                reply = await self.gateway.flush_changed()
            else:
                reply = await self.gateway.serve(header, payload)
                if header.opcode == Op.FLUSH:
                    handle.flushed_everywhere = True
        finally:
            scheduler.done(queue, request)
        if flushed is not None:
            flushed()
        self.metrics.observe(handle.name, measured, header.count if measured != "flush"
                             else 0, self.clock.precise() - started)
        return reply

    def _check_raw_change(self, header: Header) -> None:
        """Raw object changes (dog object put, admin only) to an object a locked VDI's
        tree may reach (its writable generation's, or a frozen one it still shares)
        would race its writer, behind the lock's back, or pull data from under it:
        refused, naming the holder."""
        if oid_type(header.oid) not in VDI_TYPES:
            return
        generation = oid_generation(header.oid)
        for vdi in self.group.state.vdis.vdis.values():
            if vdi.lock is None or generation not in (vdi.root.generation, *vdi.lineage):
                continue
            raise VdiLocked(f"object {header.oid:x} belongs to VDI {vdi.name!r}, whose lock"
                            f" {vdi.lock.get('owner') or vdi.lock.get('node_id')} holds: a raw"
                            " change would race its writer (dog vdi lock unlock it first)")

    async def _check_member(self, header: Header, session: Session) -> None:
        """Refuse a peer op from a connection that is not from a member (from_member).
        A node that has just joined may reach us before its join does: its request
        carries its epoch, which we wait for, as the peer side waits for epochs."""
        while not from_member(session.peer, self.group.state.members.values()):
            if header.epoch <= self.group.epoch or not await self.group.wait_epoch_after(
                    self.group.epoch, constants.epoch_wait_ms / 1000):
                raise PermissionDenied(f"{proto.OPS[Op(header.opcode)].name} is for cluster"
                                       f" members only, and {session.peer} is not one")

    async def _member_connection(self, node_id: str) -> Connection:
        node = self.group.state.members.get(node_id)
        if node is None:
            raise Unavailable(f"node {node_id} is not a member any more")
        return await self.pool.get(node)

    # --- admin ops -----------------------------------------------------------------

    async def ping(self, header: Header, payload: bytes) -> Reply:
        """Who and where this sheep is; with arg0, first wait until log position arg0 applies."""
        assert self.node is not None
        if header.arg0:
            await self.wait_applied(header.arg0, constants.epoch_wait_ms / 1000)
        value = {"node_id": self.node.node_id, "epoch": self.group.epoch,
                 "seq": self.group.state.seq,
                 "version": __version__, "joined": self.joined.is_set()}
        return proto.encode_json(value), {}

    async def cluster_info(self, header: Header, payload: bytes) -> Reply:
        state = self.group.state
        value = {
            **{key: value for key, value in state.to_json().items() if key != "principals"},
            "zones": state.zones, "racks": state.racks, "copies_max": state.copies_max,
            "epochs": [entry.to_json() for entry in state.epochs],
            "driver": self.driver.info(),
            "node_id": self.node.node_id if self.node else None,
        }
        return proto.encode_json(value), {}

    async def format(self, header: Header, payload: bytes) -> Reply:
        body = proto.decode_json(payload)
        if not isinstance(body, dict):
            raise error_for(Result.INVALID_PARMS, "format takes a JSON object")
        copies = body.get("copies", constants.copies_default)
        object_size = body.get("object_size", constants.object_size_default_bytes)
        problem = format_problem(copies, object_size, self.group.state.zones,
                                 self.group.state.racks)
        if problem is not None:
            raise error_for(*problem)
        encrypt = body.get("encrypt", False)
        if not isinstance(encrypt, bool):
            raise error_for(Result.INVALID_PARMS, "format: encrypt must be true or false")
        admin = {"name": auth.ADMIN, "key": auth.encode_key(auth.new_key()), "caps": "admin"}
        result = await self.broadcast({"type": "format", "copies": copies,
                                       "object_size": object_size,
                                       "force": bool(body.get("force")), "encrypt": encrypt,
                                       "principals": [admin]})
        # The reply is sealed (proto.SEALED_OPS): the first admin key, for dog's keyring.
        return proto.encode_json({**result.value, "admin": admin}), {}

    # --- principals (dog auth) --------------------------------------------------------

    def _auth_name(self, payload: bytes) -> tuple[str, dict[str, Any]]:
        body = proto.decode_json(payload)
        if not isinstance(body, dict):
            raise error_for(Result.INVALID_PARMS, "takes a JSON object")
        name = body.get("name")
        problem = auth.name_problem(name)
        if problem is not None or not isinstance(name, str):
            raise error_for(Result.INVALID_PARMS, problem or "bad name")
        if name == auth.NODE:
            raise error_for(Result.INVALID_PARMS, "the node key is in the sheep's keyring"
                            " files, not in the cluster: it cannot be changed from here")
        return name, body

    def _principal_reply(self, name: str) -> Reply:
        entry = self.group.state.principals.get(name)
        if entry is None:
            raise NoObject(f"no principal {name}")
        return proto.encode_json({"name": name, "key": auth.encode_key(entry.key),
                                  "caps": entry.caps.text()}), {}

    async def auth_add(self, header: Header, payload: bytes) -> Reply:
        name, body = self._auth_name(payload)
        try:
            caps = auth.Caps.parse(body.get("caps"))
        except ValueError as error:
            raise error_for(Result.INVALID_PARMS, str(error)) from None
        if caps.node:
            raise error_for(Result.INVALID_PARMS, "no principal but node has caps 'node'")
        await self.broadcast({"type": "auth_add", "name": name, "caps": caps.text(),
                              "key": auth.encode_key(auth.new_key())})
        return self._principal_reply(name)

    async def auth_rm(self, header: Header, payload: bytes) -> Reply:
        name, _ = self._auth_name(payload)
        await self.broadcast({"type": "auth_rm", "name": name})
        return proto.encode_json({"name": name}), {}

    async def auth_rotate(self, header: Header, payload: bytes) -> Reply:
        name, _ = self._auth_name(payload)
        await self.broadcast({"type": "auth_rotate", "name": name,
                              "key": auth.encode_key(auth.new_key())})
        return self._principal_reply(name)

    async def auth_get(self, header: Header, payload: bytes) -> Reply:
        name, _ = self._auth_name(payload)
        return self._principal_reply(name)

    async def auth_list(self, header: Header, payload: bytes) -> Reply:
        principals = self.group.state.principals
        return proto.encode_json([{"name": name, "caps": entry.caps.text()}
                                  for name, entry in sorted(principals.items())]), {}

    async def shutdown(self, header: Header, payload: bytes) -> Reply:
        await self.broadcast({"type": "shutdown"})
        return _empty

    async def node_info(self, header: Header, payload: bytes) -> Reply:
        return proto.encode_json(self.local_node_info()), {}

    def local_node_info(self) -> dict[str, Any]:
        assert self.node is not None
        usage = self.store.usage()
        # The member record: its weight is the cluster's ('dog node weight'), not -w.
        node = self.group.state.members.get(self.node.node_id, self.node)
        return {
            **node.to_json(), **usage, "space": space_state(usage, self.store.object_size),
            "epoch": self.group.epoch,
            "status": "stopping" if self.stopping else (
                "ok" if self.joined.is_set() else "joining"),
            "store": self.store.path, "pid": os.getpid(), "version": __version__,
            "recovery": self._recovery_status(),
            "integrity": {**self.store.counters, "checksums": self.store.checksums,
                          "damaged": self.peer.health.damaged_count if self.peer else 0,
                          "repaired": self.peer.health.repaired if self.peer else 0,
                          "scrub": self.scrubber.status() if self.scrubber else None},
            "uptime": self.clock.wall() - self.started_at,
            "driver": self.driver.info(),
            "io": self.metrics.by_op(),
            "scheduler": self.peer.scheduler.status() if self.peer else None,
            # Clients' flushes that reached this sheep, and syncs that had data to sync.
            "flushes": {"served": self.peer.flushes if self.peer else 0,
                        "synced": self.peer.syncs if self.peer else 0},
        }

    def _recovery_status(self) -> dict[str, Any] | None:
        """The recoverer's status, with the copies that wait for nodes away (Verifier)."""
        if self.recoverer is None:
            return None
        waiting = self._verifying.waiting if self._verifying is not None else {}
        return {**self.recoverer.status(), "waiting": len(waiting),
                "waiting_for": sorted({node_id for nodes in waiting.values()
                                       for node_id in nodes})}

    def _metrics_state(self) -> dict[str, Any]:
        """What a metrics scrape reads from the sheep (sheep/metrics.py); it may come
        from the endpoint's thread, so it only reads."""
        return {"up": self.joined.is_set() and not self.stopping and not self.driver.fenced,
                "recovery": self.recoverer.status() if self.recoverer else None,
                "usage": self.store.usage(),
                "damaged_found": self.peer.health.found_count if self.peer else 0,
                "queues": self.peer.scheduler.depths() if self.peer else {},
                "flushes": self.peer.flushes if self.peer else 0}

    async def node_list(self, header: Header, payload: bytes) -> Reply:
        nodes = sorted(self.group.state.nodes, key=lambda n: (n.address, n.port, n.node_id))

        async def info(node: NodeInfo) -> dict[str, Any]:
            if self.node is not None and node.node_id == self.node.node_id:
                return self.local_node_info()
            try:
                connection = await self.pool.get(node)
                _, data = await connection.call(Header(opcode=Op.NODE_INFO), timeout_ms=5000)
                value: dict[str, Any] = proto.decode_json(data)
                return value
            except SheepError as error:
                return {**node.to_json(), "status": "unreachable", "error": error.message}

        infos = await asyncio.gather(*(info(node) for node in nodes))
        return proto.encode_json(infos), {}

    async def force_recover(self, header: Header, payload: bytes) -> Reply:
        body = proto.decode_json(payload) if payload else {}
        if not isinstance(body, dict):
            raise error_for(Result.INVALID_PARMS, "force_recover takes a JSON object")
        op: dict[str, Any] = {"type": "force_recover"}
        if "nodes" in body:
            op["nodes"] = body["nodes"]
        result = await self.broadcast(op)
        return proto.encode_json(result.value), {}

    async def set_recovery(self, header: Header, payload: bytes) -> Reply:
        body = proto.decode_json(payload)
        if not isinstance(body, dict):
            raise error_for(Result.INVALID_PARMS, "set_recovery takes a JSON object")
        result = await self.broadcast({"type": "recovery", "max_rate": body.get("max_rate")})
        return proto.encode_json(result.value), {}

    async def alter_copy(self, header: Header, payload: bytes) -> Reply:
        body = proto.decode_json(payload)
        if not isinstance(body, dict):
            raise error_for(Result.INVALID_PARMS, "alter_copy takes a JSON object")
        result = await self.broadcast({"type": "copies", "copies": body.get("copies")})
        return proto.encode_json(result.value), {}

    async def set_scrub(self, header: Header, payload: bytes) -> Reply:
        body = proto.decode_json(payload)
        if not isinstance(body, dict):
            raise error_for(Result.INVALID_PARMS, "set_scrub takes a JSON object")
        settings = {key: body[key] for key in ("max_rate", "interval") if key in body}
        result = await self.broadcast({"type": "scrub", **settings})
        return proto.encode_json(result.value), {}

    async def reweight(self, header: Header, payload: bytes) -> Reply:
        body = proto.decode_json(payload)
        if not isinstance(body, dict):
            raise error_for(Result.INVALID_PARMS, "reweight takes a JSON object")
        result = await self.broadcast({"type": "reweight", "node_id": body.get("node_id"),
                                       "weight": body.get("weight")})
        return proto.encode_json(result.value), {}

    async def kill_node(self, header: Header, payload: bytes) -> Reply:
        self._stop_soon()
        return _empty
