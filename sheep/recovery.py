"""Recovery: verifying the copies a sheep brings back, re-replication, removal of surplus copies.

A sheep that starts with objects in its store may have been away while they
changed or were removed. Until each copy is compared with the other replicas
of the current placement, the peer side treats it as unverified (see
sheep/peer.py). The verifier walks those copies in the background: a copy
whose version is the highest is verified as it is; one that is older is
replaced by the newest copy (or removed, when the newest is a removal's
tombstone) before it is verified. Copies that no reachable replica can vouch
for stay unverified and are tried again later: among them, copies that a node
away from the cluster may hold newer (sheep/replicas.py: verdict) wait for that
node to come back, or for the operator to declare it lost.

The Recoverer below does the rest: re-replication after every epoch change,
and the removal of copies a sheep no longer has to hold.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import zlib
from collections.abc import Callable
from typing import Any

from sheep import constants, proto, replicas
from sheep.background import PerKey
from sheep.cluster_state import Status
from sheep.errors import NoObject, SheepError, Timeout
from sheep.gateway import RETRYABLE, Gateway
from sheep.group import Group
from sheep.mclock import RecoveryTuner
from sheep.node import NodeInfo
from sheep.peer import Peer
from sheep.proto import Header, Op
from sheep.replicas import CopyStatus
from sheep.store import Store
from sheep.world import Clock

log = logging.getLogger(__name__)


class Fetch(enum.Enum):
    """What came of fetching one object (Recovery.fetch)."""

    COPIED = "copied"
    NOT_NEEDED = "not needed"  # removed, or a current copy is here already
    UNVERIFIED = "unverified"  # only copies not verified yet: a later pass fetches it
    NO_SOURCE = "no source"  # no copy anywhere to take it from


verify_retry_interval_s = 1.0
# A copy whose change failed here is compared with the others only once that change
# is surely over there: its gateway gives up on a replica after peer_timeout_ms.
failed_change_settle_s = constants.peer_timeout_ms / 1000 + 1.0


class _Worker:
    def __init__(self, store: Store, peer: Peer, group: Group, gateway: Gateway,
                 node_id: str) -> None:
        self.store = store
        self.peer = peer
        self.group = group
        self.gateway = gateway
        self.node_id = node_id
        self.clock = gateway.clock


class Verifier(_Worker):
    def __init__(self, store: Store, peer: Peer, group: Group, gateway: Gateway,
                 node_id: str) -> None:
        super().__init__(store, peer, group, gateway, node_id)
        self.verified = 0
        self.replaced = 0
        # Copies waiting for nodes away that may hold newer ones: oid -> their node ids.
        self.waiting: dict[int, list[str]] = {}

    async def run(self) -> None:
        while self.group.state.status is not Status.OK:
            # Waiting for the last epoch's nodes: the newest copy may be on one of them.
            await self.clock.sleep(verify_retry_interval_s)
        health = self.peer.health
        while health.unverified_count:
            replaced = self.replaced
            for oid in health.unverified_oids():
                if not health.is_unverified(oid):
                    self.waiting.pop(oid, None)
                    continue  # a write or removal settled it meanwhile
                if not health.ready_to_verify(oid, self.clock.monotonic(),
                                              failed_change_settle_s):
                    continue  # a change failed here just now: it may still reach the others
                try:
                    async with self.peer.scheduler.running("verify", 0):
                        await self.verify(oid)
                except (*RETRYABLE, SheepError) as error:
                    log.info("cannot verify %016x yet: %s", oid, error)
            if self.replaced != replaced:
                try:
                    await self.peer.sync_all()  # replaced copies count once durable
                except SheepError as error:  # the disk failed: the next pass syncs again
                    log.error("verifier: cannot sync the replaced copies: %s", error)
            if health.unverified_count:
                await self.clock.sleep(verify_retry_interval_s)
        self.waiting.clear()
        if self.store.config_get("unverified_since") is not None:
            # A restart no longer needs to look back for what these copies may lack.
            self.store.config_put("unverified_since", None)
        log.info("every copy verified (%d kept, %d replaced)", self.verified, self.replaced)

    async def verify(self, oid: int) -> None:
        """Compare the copy with every other member's (not only the placement's: after
        nodes came back, the newest copy may sit where an earlier epoch put it). The
        newest copy wins (sheep/replicas.py: verdict); a damaged copy here that nothing
        supersedes stays unverified until a good copy turns up. While a node that the
        placement named since this copy's ``since`` epoch is away, and no member's
        verified copy vouches for the answer, the copy waits for it."""
        if self.gateway.world.faults.buggify("verifier.stats-fail"):
            raise Timeout(f"no answer about {oid:016x} in time (buggify)")
        if self.store.is_partial(oid):
            return  # not a copy until recovery fills it in: compared after that
        epoch = self.group.epoch
        others = [node for node in self.group.state.nodes if node.node_id != self.node_id]
        version = self.store.version(oid)
        stats = await self.gateway.stats(oid, others, epoch)  # any failure: try again later
        best = replicas.newest(zip(others, stats, strict=True), verified_only=False)
        health = self.peer.health
        stat = self.store.stat(oid) if self.store.exists(oid) else {}
        mine = CopyStatus(version=version, digest=stat.get("digest"), unverified=True,
                          durable=bool(stat.get("durable", True)),
                          doubtful=bool(stat.get("doubtful")), damaged=health.is_damaged(oid),
                          since=health.since(oid))
        away = ([] if replicas.vouches(best, mine.version)
                else self.group.holders_away(oid, health.since(oid), self.node_id))
        verdict = replicas.verdict(mine, best, bool(away))
        if verdict is replicas.Verdict.WAIT:
            waiting_for = [node.node_id for node in away]
            if self.waiting.get(oid) != waiting_for:
                log.warning("copy of %016x waits for %s: not a member, it may hold a newer"
                            " copy ('dog cluster recover force' if it is gone for good)", oid,
                            ", ".join(waiting_for))
            self.waiting[oid] = waiting_for
            return
        self.waiting.pop(oid, None)
        if verdict is replicas.Verdict.REPLACE:
            assert best is not None
            if health.is_unverified(oid):
                await self._replace(oid, mine, best, epoch)
        elif mine.damaged:
            # No better copy: look at ours again. A read that failed with EIO marks a
            # copy damaged, yet the disk may have failed for a moment only.
            try:
                bad = self.store.verify(oid)
            except SheepError:
                bad = [-1]
            if bad:
                log.info("damaged copy of %016x: no good copy to replace it yet", oid)
                return
            log.warning("copy of %016x marked damaged reads back sound: kept", oid)
            health.found_sound(oid)
            self._kept(oid)
        else:
            self._kept(oid)
            await self._bring_up(oid, mine.version, list(zip(others, stats, strict=True)),
                                 epoch)

    async def _bring_up(self, oid: int, version: int, answers: list[tuple[NodeInfo, Any]],
                        epoch: int) -> None:
        """Ours was kept as the newest copy: a holder of the placement with an older
        verified copy gets ours (a repair). A write that failed reached this replica
        only, at a newer version, while the other was verified and stays so: nothing
        else compares them, and reads would see either (simulator, seed 67 with 3
        nodes). A repair that fails leaves ours unverified, to be compared again (a
        holder with no copy is recovery's to fill)."""
        placement = {node.node_id for node in self.group.placement(oid, epoch)}
        if self.node_id not in placement:
            return  # a surplus copy: the purge brings the holders up first
        holders = [answer for node, answer in answers
                   if node.node_id in placement and answer is not None]
        if not replicas.behind(version, holders):
            return
        try:
            result = await self.gateway.repairer.check_object(oid)
        except SheepError as error:
            log.info("cannot bring the holders of %016x up to the copy here yet: %s", oid,
                     error)
            self.peer.health.suspect([oid], self.group.epoch)
            return
        if result.get("unreachable"):
            self.peer.health.suspect([oid], self.group.epoch)
        elif result.get("repaired"):
            log.info("copy of %016x kept as the newest: copied to %s, which were behind", oid,
                     ", ".join(result["repaired"]))

    def _kept(self, oid: int) -> None:
        """Compared with every other copy and found current: verified, and no longer
        in doubt (nothing outranks it)."""
        self.verified += 1
        self.peer.health.verified(oid)
        self.store.clear_doubt(oid)

    async def _replace(self, oid: int, mine: CopyStatus, best: replicas.Copy[Any],
                       epoch: int) -> None:
        """Give way to the newest copy: remove ours (a newer removal), or copy it here."""
        version = best.version
        if best.removed:
            try:
                self.store.remove(oid, version)
            except NoObject:
                self.store.tombstone(oid, version)
            self.peer.health.forget(oid)
        else:
            self.peer.check_space()
            extents, _, read_version = await self.gateway.read_extents(best.node, oid, epoch)
            if not self.peer.health.is_unverified(oid):
                return  # a client's write got here first: it is current
            # The version read with the data: a write may have landed since the stat.
            version = read_version or version
            self.store.create_from_extents(oid, extents, version)
            self.peer.health.replaced(oid)
        self.replaced += 1
        log.info("copy of %016x was stale (version %d, newest %d): replaced", oid,
                 mine.version, version)


recovery_concurrency = 4  # objects fetched at once
intent_window = 64  # copies whose intents are committed together
purge_concurrency = 16  # surplus copies checked at once
purge_retry_interval_s = 1.0
list_tries = 5  # a member's object list, asked this many times
list_retry_s = 0.1


class RateLimiter:
    """Paces transfers to a rate read afresh at every call, so a change of the
    cluster's setting applies at once. take(n) waits until n more bytes fit."""

    def __init__(self, rate: Callable[[], int], clock: Clock) -> None:
        self.rate = rate
        self.clock = clock
        self._next = 0.0  # when the bytes granted so far will have gone at the rate

    async def take(self, nbytes: int) -> None:
        rate = self.rate()
        now = self.clock.monotonic()
        if rate <= 0:
            self._next = now
            return
        start = max(now, self._next)
        self._next = start + nbytes / rate
        if start > now:
            await self.clock.sleep(start - now)


class _IntentWindows:
    """The intents of a pass's copies, committed a window at a time and one window
    ahead of the fetches (Store.ensure_intents): one metadata commit, with its fsync,
    per intent_window copies instead of one per copy, which held every fetch up."""

    def __init__(self, store: Store, oids: list[int]) -> None:
        self.store = store
        self.windows = [oids[at:at + intent_window] for at in range(0, len(oids), intent_window)]
        self.tasks: list[asyncio.Future[None]] = []

    async def ready(self, index: int) -> None:
        """Once the intent of the pass's index-th copy is committed."""
        window = index // intent_window
        while len(self.tasks) < min(window + 2, len(self.windows)):
            self.tasks.append(asyncio.ensure_future(
                self.store.ensure_intents(self.windows[len(self.tasks)])))
        await asyncio.shield(self.tasks[window])

    async def close(self) -> None:
        """After the pass: the intents of copies not made go."""
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for window in self.windows:
            self.store.release_intents(window)


class Recoverer(_Worker):
    """Recovery after every epoch change, in two steps.

    Re-replication: every member's object list is gathered (LIST_PEER); for each
    object whose placement under the current epoch names this sheep and that is
    not here, the newest verified copy among the holders is fetched (a removal's
    tombstone newer than every copy means: nothing to fetch), paced by the
    cluster's recovery rate. A copy is only created while the object is still
    absent here: a client's write that reached this sheep meanwhile (the gateway
    copies a missing replica first, so objects clients wait on never wait for this
    pass) is newer.

    Removal of surplus copies: a copy this sheep holds but the current placement
    does not give it is dropped once every holder of the placement has a verified
    copy at least as new; until then it stays, a source for recovery and for
    reads that fall back to earlier epochs. So a copy count never drops below N
    on the way, and a drained node (no vnodes) empties itself.
    """

    def __init__(self, store: Store, peer: Peer, group: Group, gateway: Gateway,
                 node_id: str) -> None:
        super().__init__(store, peer, group, gateway, node_id)
        self.epoch = 0
        self.to_recover = 0
        self.recovered = 0
        self.skipped = 0  # wanted, but no copy needed after all (removed, or written here)
        self.failed = 0
        self.bytes = 0
        self.bytes_total = 0  # since this sheep started, over every pass
        self.surplus = 0  # copies held here that the placement no longer gives this sheep
        # Objects this pass wanted of which there were only unverified copies yet.
        self.unverified_sources = 0
        self.removed = 0
        self.started = 0.0
        self.finished = 0.0
        self.running = False
        # fetching, removing (surplus copies waiting for holders), waiting (for a verified
        # copy of some object), idle
        self.phase = "idle"
        self.limiter = RateLimiter(lambda: self.group.state.recovery_max_rate, self.clock)
        self.tuner = RecoveryTuner()
        self._again = False
        self._task: asyncio.Task[None] | None = None
        self._fills = PerKey()
        self.recovered_early = 0  # partial copies filled as soon as a write made them

    def status(self) -> dict[str, Any]:
        elapsed = (self.finished if not self.running else self.clock.monotonic()) - self.started
        return {"epoch": self.epoch, "to_recover": self.to_recover,
                "recovered": self.recovered, "skipped": self.skipped, "failed": self.failed,
                "running": self.running,
                "unverified": self.peer.health.unverified_count, "bytes": self.bytes,
                "bytes_total": self.bytes_total,
                "rate": self.bytes / elapsed if elapsed > 0 and self.bytes else 0.0,
                "elapsed": elapsed if self.started else 0.0,
                "max_rate": self.group.state.recovery_max_rate,
                "tuned_rate": self.tuner.rate, "held_by": self.tuner.reason,
                "surplus": self.surplus, "removed": self.removed, "phase": self.phase,
                "partial": len(self.store.partial_oids()), "filled": self.recovered_early}

    def trigger(self) -> None:
        """A new epoch: recover now, or once more after the pass that is running."""
        if self.group.state.status is not Status.OK:
            return  # not formatted, or waiting for the last epoch's nodes
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    def fill_soon(self, oid: int) -> None:
        """A write made a partial copy here: fill it in next, before the pass's other
        objects (a recovery request of its own, from the newest verified copy)."""

        async def fill() -> None:
            try:
                epoch = self.group.epoch
                async with self.peer.scheduler.running("recovery", self.group.state.object_size):
                    if self.store.is_partial(oid) and await self.fetch(
                            oid, list(self.group.state.nodes), epoch) is Fetch.COPIED:
                        self.recovered_early += 1
            except SheepError as error:
                log.info("cannot fill the partial copy of %016x yet: %s", oid, error)

        self._fills.start(oid, fill)

    async def tune(self) -> None:
        """Every tuner interval: recovery's rate in the scheduler from the clients'
        latency here (RecoveryTuner), the operator's --max-rate as its cap."""
        scheduler = self.peer.scheduler
        while True:
            await self.clock.sleep(self.tuner.interval_s)
            rate = self.tuner.tick(self.clock.monotonic(), scheduler.client_ops,
                                   scheduler.client_seconds, self.running,
                                   self.group.state.recovery_max_rate)
            if not scheduler.fifo:
                scheduler.set_limit("recovery", rate)

    async def stop(self) -> None:
        await self._fills.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._again = False
            self.running = True
            self.started = self.clock.monotonic()
            scheduler = self.peer.scheduler
            self.tuner.began(self.started, scheduler.client_ops, scheduler.client_seconds)
            try:
                self.phase = "fetching"
                await self.run_once()
                self.phase = "removing"
                while await self.purge_once(self.epoch) and not self._again:
                    await self.group.wait_epoch_after(self.epoch, purge_retry_interval_s)
                if self.unverified_sources and not self._again:
                    # Objects with only unverified copies yet: the pass runs again until
                    # one is verified (not a failure: everything else went on).
                    self.phase = "waiting"
                    await self.group.wait_epoch_after(self.epoch, verify_retry_interval_s)
                    self._again = True
            except SheepError as error:
                log.warning("recovery pass failed: %s; retrying", error)
                self._again = True
                await self.clock.sleep(verify_retry_interval_s)
            finally:
                self.running = False
                self.phase = "idle"
                self.finished = self.clock.monotonic()
            if not self._again:
                return

    async def run_once(self) -> None:
        epoch = self.group.epoch
        self.epoch = epoch
        holders: dict[int, list[Any]] = {}
        unlisted = []
        for node in self.group.state.nodes:
            if node.node_id == self.node_id:
                continue
            try:
                data = await self._list(node, epoch)
            except RETRYABLE:
                # Leaving, or cut off for a while: the objects only it lists are fetched
                # by the pass run again once it answers (or after its leave). Passing it
                # over for good left a copy nobody fetched, and the surplus copy it was
                # to replace waiting for ever (simulator, seed 80).
                unlisted.append(node.node_id)
                continue
            for oid in proto.decode_json(data):
                holders.setdefault(int(oid), []).append(node)
        # A partial copy (a write made it before recovery came) is wanted first.
        here = set(self.store.copies())
        wanted = sorted((oid for oid, nodes in holders.items()
                         if oid not in here and self._mine(oid, epoch)),
                        key=lambda oid: not self.store.is_partial(oid))
        self.to_recover = len(wanted)
        self.recovered = self.skipped = self.failed = self.bytes = self.unverified_sources = 0
        if wanted:
            log.info("epoch %d: recovering %d objects", epoch, len(wanted))
        semaphore = asyncio.Semaphore(recovery_concurrency)
        intents = _IntentWindows(self.store, wanted)

        async def one(index: int, oid: int) -> None:
            async with semaphore:
                if self.group.epoch != epoch:
                    return  # a newer epoch: its own pass takes over
                try:
                    await intents.ready(index)
                    async with self.peer.scheduler.running(
                            "recovery", self.group.state.object_size):
                        fetched = await self.fetch(oid, holders[oid], epoch)
                    if fetched is Fetch.COPIED:
                        self.recovered += 1
                    elif fetched is Fetch.UNVERIFIED:
                        self.unverified_sources += 1
                    elif fetched is Fetch.NOT_NEEDED:
                        self.skipped += 1  # (NO_SOURCE: counted nowhere, a gap that shows)
                except SheepError as error:
                    self.failed += 1
                    log.warning("cannot recover %016x: %s", oid, error)

        try:
            await asyncio.gather(*(one(index, oid) for index, oid in enumerate(wanted)))
        finally:
            await intents.close()
        if wanted:
            # The copies made count (for the old holders' surplus removal) once durable,
            # and the intents of those another path made first (a repair) go: left, a
            # crash had the next start recompute every such object's checksums.
            await self.peer.sync_all()
        if self.failed:
            raise SheepError(f"{self.failed} objects not recovered")
        if unlisted:
            raise SheepError(f"no object list from {', '.join(unlisted)} yet")
        if wanted:
            log.info("epoch %d: recovered %d objects (%d bytes)", epoch, self.recovered,
                     self.bytes)

    async def _list(self, node: Any, epoch: int) -> bytes:
        """A member's object list; asked a few times over half a second first (right
        after a format or a join it may not serve yet)."""
        for _ in range(list_tries - 1):
            try:
                data, _ = await self.gateway.call(node, Header(opcode=Op.LIST_PEER), b"", epoch)
                return bytes(data)
            except RETRYABLE:
                await self.clock.sleep(list_retry_s)
        data, _ = await self.gateway.call(node, Header(opcode=Op.LIST_PEER), b"", epoch)
        return bytes(data)

    def _mine(self, oid: int, epoch: int) -> bool:
        return any(node.node_id == self.node_id for node in self.group.placement(oid, epoch))

    async def fetch(self, oid: int, nodes: list[Any], epoch: int) -> Fetch:
        """Copy the newest verified copy of oid here. What came of it: COPIED;
        NOT_NEEDED (removed, or a current copy is here already); UNVERIFIED (only copies
        not verified yet: a pass run again fetches it); NO_SOURCE (no copy anywhere to
        take it from)."""
        if self.gateway.world.faults.buggify("recovery.fetch-fails"):
            raise Timeout(f"fetching {oid:016x} timed out (buggify)")
        placement = self.group.placement(oid, epoch)
        asked = {node.node_id: node for node in [*nodes, *placement]
                 if node.node_id != self.node_id}
        # Among equally new copies the first asked is read: an order that differs by
        # object spreads the reads over every holder, rather than on one sheep that may
        # be the one serving the clients.
        order = sorted(asked.values(),
                       key=lambda node: zlib.crc32(f"{oid}:{node.node_id}".encode()))
        found = list(zip(order, await self.gateway.stats(oid, order, epoch), strict=True))
        best = replicas.newest(found, verified_only=True)
        if best is None and replicas.verifiable(answer for _, answer in found):
            # Only unverified copies yet (their holders came back, or wait for a node
            # away that may hold a newer one). Taken as "nothing to fetch", it was
            # fetched by nobody, and the surplus copy it was to replace stayed for ever
            # (simulator seed 14, once copies wait for nodes away).
            return Fetch.UNVERIFIED
        if best is None:
            return Fetch.NO_SOURCE
        if best.removed:
            return Fetch.NOT_NEEDED
        self.peer.check_space()
        await self.limiter.take(self.group.state.object_size)
        # The copy comes as its extents and only they are written: holes stay holes.
        extents, _, version = await self.gateway.read_extents(best.node, oid, epoch)
        copied = proto.extents_bytes(extents)
        if self.store.is_partial(oid):  # what was written here since stays
            self.peer.fill(oid, extents, version or best.version)
            self.bytes += copied
            self.bytes_total += copied
            return Fetch.COPIED
        if self.store.exists(oid):
            return Fetch.NOT_NEEDED  # a client's write put a current copy here meanwhile
        # The version read with the data: a write may have landed since the stat.
        version = version or best.version
        # Written off the loop when the store knows nothing of the object (the common
        # case); over a tombstone, or after a write made a partial copy meanwhile, as
        # before (Store.adopt_extents).
        if not await self.store.adopt_extents(oid, extents, version):
            if self.store.is_partial(oid):
                self.peer.fill(oid, extents, version)
            elif self.store.exists(oid):
                return Fetch.NOT_NEEDED
            else:
                self.store.create_from_extents(oid, extents, version)
        self.bytes += copied
        self.bytes_total += copied
        return Fetch.COPIED

    async def purge_once(self, epoch: int) -> bool:
        """Drop the surplus copies whose holders all have them; True if some must wait."""
        surplus = [oid for oid in self.store.list_oids() if not self._mine(oid, epoch)]
        self.surplus = len(surplus)
        self._syncs: dict[str, asyncio.Future[Any]] = {}
        waiting = 0
        semaphore = asyncio.Semaphore(purge_concurrency)

        async def one(oid: int) -> None:
            nonlocal waiting
            async with semaphore:
                if self.group.epoch != epoch:
                    return
                try:
                    async with self.peer.scheduler.running("drain", 0):
                        held = await self._held_elsewhere(oid, epoch)
                except (*RETRYABLE, SheepError) as error:
                    log.info("cannot check the holders of %016x yet: %s", oid, error)
                    held = False
                if held:
                    await self.store.ensure_intent(oid)
                # No await between this check and the drop: a newer epoch that gives the
                # object back to this sheep cannot slip in between.
                if not held or self.group.epoch != epoch:
                    waiting += 1
                    return
                self.peer.health.forget(oid)
                self.store.drop(oid)
                self.removed += 1
                self.surplus -= 1

        await asyncio.gather(*(one(oid) for oid in surplus))
        if surplus:
            log.info("epoch %d: %d surplus copies removed, %d wait for their holders", epoch,
                     len(surplus) - waiting, waiting)
        return waiting > 0 and self.group.epoch == epoch

    async def _sync(self, node: NodeInfo, epoch: int) -> None:
        """Have a holder sync its store (FLUSH_PEER), once per purge pass however many
        surplus copies wait for it."""
        task = self._syncs.get(node.node_id)
        if task is None:
            task = self._syncs[node.node_id] = asyncio.ensure_future(
                self.gateway.call(node, Header(opcode=Op.FLUSH), b"", epoch))
        await asyncio.shield(task)

    async def _held_elsewhere(self, oid: int, epoch: int) -> bool:
        """Every holder of the placement has a verified, durable copy at least as new as
        ours, or a removal (sheep/replicas.py: may_drop_surplus).

        A holder whose verified copy is older than ours is brought up to the newest
        copy first (a repair, as dog cluster check makes it): nothing else would, since
        re-replication fetches only absent copies and verification only unverified ones.
        Copies with the same contents can differ in version (a raw write that carries
        none takes each replica's own version + 1), and waiting for such a holder to
        catch up on its own would keep the surplus copy forever."""
        mine = self.store.version(oid)
        placement = self.group.placement(oid, epoch)
        if not placement:
            return False
        stats = await self.gateway.stats(oid, placement, epoch)
        if replicas.may_drop_surplus(mine, stats):
            return True
        unsynced = replicas.waits_for_sync(mine, stats)
        if unsynced:
            await asyncio.gather(*(self._sync(placement[index], epoch) for index in unsynced))
            return replicas.may_drop_surplus(mine, await self.gateway.stats(oid, placement,
                                                                            epoch))
        if replicas.behind(mine, stats):
            me = [node for node in self.group.state.nodes if node.node_id == self.node_id]
            result = await self.gateway.repairer.check_object(oid, also=me)
            if result["repaired"]:
                log.info("surplus %016x: brought %s up to the newest copy", oid,
                         ", ".join(result["repaired"]))
        return False
