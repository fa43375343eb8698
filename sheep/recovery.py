"""Recovery, its first part: verifying the copies a sheep brings back.

A sheep that starts with objects in its store may have been away while they
changed or were removed. Until each copy is compared with the other replicas
of the current placement, the peer side treats it as unverified (see
sheep/peer.py). The verifier walks those copies in the background: a copy
whose version is the highest is verified as it is; one that is older is
replaced by the newest copy (or removed, when the newest is a removal's
tombstone) before it is verified. Copies that no reachable replica can vouch
for stay unverified and are tried again later.

(Re-replication after a node loss, the rest of recovery, is the self-healing
stage's work; a write already copies a missing replica first, in the gateway.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sheep import proto
from sheep.cluster_state import Status
from sheep.errors import NoObject, SheepError
from sheep.gateway import RETRYABLE, Gateway
from sheep.group import Group
from sheep.peer import Peer
from sheep.proto import Header, Op
from sheep.store import Store

log = logging.getLogger(__name__)

verify_retry_interval_s = 1.0


class _Worker:
    def __init__(self, store: Store, peer: Peer, group: Group, gateway: Gateway,
                 node_id: str) -> None:
        self.store = store
        self.peer = peer
        self.group = group
        self.gateway = gateway
        self.node_id = node_id


class Verifier(_Worker):
    def __init__(self, store: Store, peer: Peer, group: Group, gateway: Gateway,
                 node_id: str) -> None:
        super().__init__(store, peer, group, gateway, node_id)
        self.verified = 0
        self.replaced = 0

    async def run(self) -> None:
        while self.group.state.status is not Status.OK:
            # Waiting for the last epoch's nodes: the newest copy may be on one of them.
            await asyncio.sleep(verify_retry_interval_s)
        while self.peer.unverified:
            for oid in sorted(self.peer.unverified):
                if oid not in self.peer.unverified:
                    continue  # a write or removal settled it meanwhile
                try:
                    await self.verify(oid)
                except (*RETRYABLE, SheepError) as error:
                    log.info("cannot verify %016x yet: %s", oid, error)
            if self.peer.unverified:
                await asyncio.sleep(verify_retry_interval_s)
        log.info("every copy verified (%d kept, %d replaced)", self.verified, self.replaced)

    async def verify(self, oid: int) -> None:
        epoch = self.group.epoch
        others = [node for node in self.group.placement(oid, epoch)
                  if node.node_id != self.node_id]
        mine = self.store.version(oid)
        best = await self.gateway.newest(oid, others, epoch)
        if best is not None and best[0] > mine and oid in self.peer.unverified:
            version, removed, node = best
            if removed:
                try:
                    self.store.remove(oid, version)
                except NoObject:
                    self.store.tombstone(oid, version)
            else:
                data, _ = await self.gateway.read_copy(node, _whole(self.group, oid), epoch)
                if oid not in self.peer.unverified:
                    return  # a client's write got here first: it is current
                self.store.create_and_write(oid, 0, bytes(data), version)
            self.replaced += 1
            log.info("copy of %016x was stale (version %d < %d): replaced", oid, mine, version)
        else:
            self.verified += 1
        self.peer.unverified.discard(oid)


def _whole(group: Group, oid: int) -> Header:
    return Header(opcode=Op.READ_OBJ, oid=oid, offset=0, count=group.state.object_size)

recovery_concurrency = 4  # objects fetched at once


class Recoverer(_Worker):
    """Re-replication: after every epoch change, fetch the objects the new
    placement gives this sheep and that it lacks.

    Every member's object list is gathered (LIST_PEER); for each object whose
    placement under the current epoch names this sheep and that is not here, the
    newest verified copy among the holders is fetched (a removal's tombstone
    newer than every copy means: nothing to fetch). A copy is only created while
    the object is still absent here: a client's write that reached this sheep
    meanwhile (the gateway copies a missing replica first) is newer. Copies this
    sheep no longer needs are kept (removing them safely is the self-healing
    stage's work).
    """

    def __init__(self, store: Store, peer: Peer, group: Group, gateway: Gateway,
                 node_id: str) -> None:
        super().__init__(store, peer, group, gateway, node_id)
        self.epoch = 0
        self.to_recover = 0
        self.recovered = 0
        self.failed = 0
        self.running = False
        self._again = False
        self._task: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "to_recover": self.to_recover,
                "recovered": self.recovered, "failed": self.failed, "running": self.running,
                "unverified": len(self.peer.unverified)}

    def trigger(self) -> None:
        """A new epoch: recover now, or once more after the pass that is running."""
        if self.group.state.status is not Status.OK:
            return  # not formatted, or waiting for the last epoch's nodes
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._again = False
            self.running = True
            try:
                await self.run_once()
            except SheepError as error:
                log.warning("recovery pass failed: %s; retrying", error)
                self._again = True
                await asyncio.sleep(verify_retry_interval_s)
            finally:
                self.running = False
            if not self._again:
                return

    async def run_once(self) -> None:
        epoch = self.group.epoch
        self.epoch = epoch
        holders: dict[int, list[Any]] = {}
        for node in self.group.state.nodes:
            if node.node_id == self.node_id:
                continue
            try:
                data, _ = await self.gateway.call(node, Header(opcode=Op.LIST_PEER), b"", epoch)
            except RETRYABLE:
                continue  # it is leaving; the next epoch's pass will do without it
            for oid in proto.decode_json(data):
                holders.setdefault(int(oid), []).append(node)
        here = set(self.store.list_oids())
        wanted = [oid for oid, nodes in holders.items() if oid not in here and any(
            node.node_id == self.node_id for node in self.group.placement(oid, epoch))]
        self.to_recover = len(wanted)
        self.recovered = self.failed = 0
        if wanted:
            log.info("epoch %d: recovering %d objects", epoch, len(wanted))
        semaphore = asyncio.Semaphore(recovery_concurrency)

        async def one(oid: int) -> None:
            async with semaphore:
                if self.group.epoch != epoch:
                    return  # a newer epoch: its own pass takes over
                try:
                    if await self.fetch(oid, holders[oid], epoch):
                        self.recovered += 1
                except SheepError as error:
                    self.failed += 1
                    log.warning("cannot recover %016x: %s", oid, error)

        await asyncio.gather(*(one(oid) for oid in wanted))
        if self.failed:
            raise SheepError(f"{self.failed} objects not recovered")
        if wanted:
            log.info("epoch %d: recovered %d objects", epoch, self.recovered)

    async def fetch(self, oid: int, nodes: list[Any], epoch: int) -> bool:
        """Copy the newest verified copy of oid here; False if there is none to copy."""
        placement = self.group.placement(oid, epoch)
        asked = {node.node_id: node for node in [*nodes, *placement]
                 if node.node_id != self.node_id}
        best = await self.gateway.newest(oid, list(asked.values()), epoch, verified_only=True)
        if best is None or best[1]:
            return False
        data, _ = await self.gateway.read_copy(best[2], _whole(self.group, oid), epoch)
        if self.store.exists(oid):
            return False  # a client's write put a current copy here meanwhile
        self.store.create_and_write(oid, 0, bytes(data), best[0])
        return True
