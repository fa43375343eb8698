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
from sheep.errors import NoObject, SheepError
from sheep.gateway import RETRYABLE, Gateway
from sheep.group import Group
from sheep.peer import Peer
from sheep.proto import Header, Op
from sheep.store import Store

log = logging.getLogger(__name__)

verify_retry_interval_s = 1.0


class Verifier:
    def __init__(self, store: Store, peer: Peer, group: Group, gateway: Gateway,
                 node_id: str) -> None:
        self.store = store
        self.peer = peer
        self.group = group
        self.gateway = gateway
        self.node_id = node_id
        self.verified = 0
        self.replaced = 0

    async def run(self) -> None:
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
        best: tuple[int, bool, Any] | None = None
        for node in others:
            try:
                data, _ = await self.gateway.call(node, Header(opcode=Op.STAT_OBJ, oid=oid), b"",
                                                  epoch)
            except NoObject:
                continue
            value = proto.decode_json(data)
            version = int(value["version"])
            if best is None or version > best[0]:
                best = (version, bool(value.get("deleted")), node)
        if best is not None and best[0] > mine and oid in self.peer.unverified:
            version, deleted, node = best
            if deleted:
                try:
                    self.store.remove(oid, version)
                except NoObject:
                    self.store.tombstone(oid, version)
            else:
                read = Header(opcode=Op.READ_OBJ, oid=oid, offset=0,
                              count=self.group.state.object_size, flags=proto.FLAG_DIRECT)
                data, _ = await self.gateway.call(node, read, b"", epoch)
                if oid not in self.peer.unverified:
                    return  # a client's write got here first: it is current
                self.store.create_and_write(oid, 0, bytes(data), version)
            self.replaced += 1
            log.info("copy of %016x was stale (version %d < %d): replaced", oid, mine, version)
        else:
            self.verified += 1
        self.peer.unverified.discard(oid)
