"""The background scrubber: every sheep verifies its own copies, block by block,
at the cluster's scrub rate, and has a damaged copy replaced from a good replica.

A pass walks every object of the local store; after a pass it waits the scrub
interval before the next. A damaged copy is marked as a read that meets the
damage marks it (sheep/peer.py), so nothing serves it, and the gateway copies
the newest good copy over it (Repairer.repair_soon, sheep/repair.py).
``dog cluster scrub`` does the same at once for the whole cluster, comparing
the replicas too.
"""

from __future__ import annotations

import logging
from typing import Any

from sheep.cluster_state import Status
from sheep.gateway import Gateway
from sheep.group import Group
from sheep.peer import Peer
from sheep.recovery import RateLimiter

log = logging.getLogger(__name__)

idle_poll_s = 5.0  # how often a scrubber that is off or waiting looks again


class Scrubber:
    def __init__(self, peer: Peer, group: Group, gateway: Gateway) -> None:
        self.peer = peer
        self.group = group
        self.gateway = gateway
        self.clock = gateway.clock
        self.limiter = RateLimiter(lambda: self.group.state.scrub_max_rate, self.clock)
        self.passes = 0
        self.scrubbed = 0
        self.damaged = 0
        self.position = 0  # objects done in the current pass
        self.objects = 0  # objects in the current pass
        self.last_pass_end = 0.0
        self._last_pass_monotonic: float | None = None

    def status(self) -> dict[str, Any]:
        return {"passes": self.passes, "scrubbed": self.scrubbed, "damaged": self.damaged,
                "position": self.position, "objects": self.objects,
                "last_pass_end": self.last_pass_end,
                "max_rate": self.group.state.scrub_max_rate,
                "interval": self.group.state.scrub_interval}

    def _due(self) -> bool:
        state = self.group.state
        if state.status is not Status.OK or state.scrub_max_rate <= 0:
            return False
        return (self._last_pass_monotonic is None
                or self.clock.monotonic() - self._last_pass_monotonic >= state.scrub_interval)

    async def run(self) -> None:
        while True:
            if not self._due():
                await self.clock.sleep(idle_poll_s)
                continue
            await self.scrub_pass()

    async def scrub_pass(self) -> None:
        oids = self.peer.store.list_oids()
        self.objects, self.position = len(oids), 0
        for oid in oids:
            if self.group.state.scrub_max_rate <= 0:
                return  # turned off: a later pass starts over
            await self.limiter.take(self.peer.store.object_size)
            if self.peer.health.is_damaged(oid):
                continue
            async with self.peer.scheduler.running("scrub", self.peer.store.object_size):
                damaged = self.peer.scrub(oid)
            if damaged:
                self.damaged += 1
                self.gateway.repairer.repair_soon(oid)
            self.scrubbed += 1
            self.position += 1
        self.passes += 1
        self.last_pass_end = self.clock.wall()
        self._last_pass_monotonic = self.clock.monotonic()
        log.info("scrub pass %d done: %d objects, %d damaged so far", self.passes,
                 len(oids), self.damaged)
