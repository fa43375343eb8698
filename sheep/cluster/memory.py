"""An in-process cluster driver: the ordered log is a list in memory.

For sheep that share one process and one event loop (the in-process test
cluster and simulations): every event reaches every member at once, and a
member's death is logged the moment ``crash`` is called, so tests run without
the local driver's polling delays.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sheep.cluster.driver import ClusterDriver
from sheep.cluster_state import Event, EventKind
from sheep.node import NodeInfo
from sheep.world import Clock


class MemoryBus:
    """The shared log and the members listening to it."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.log: list[Event] = []
        self.drivers: list[MemoryDriver] = []
        self.members: dict[str, NodeInfo] = {}

    def append(self, kind: EventKind, **fields: Any) -> None:
        event = Event(seq=len(self.log) + 1, kind=kind, time=self.clock.wall(), **fields)
        self.log.append(event)
        if kind is EventKind.JOIN:
            assert event.node is not None
            self.members[event.node.node_id] = event.node
        elif kind is EventKind.LEAVE:
            self.members.pop(event.node_id, None)
        for driver in self.drivers:
            driver.deliver(event)


class MemoryDriver(ClusterDriver):
    name = "memory"

    def __init__(self, bus: MemoryBus) -> None:
        super().__init__()
        self.bus = bus
        self.node: NodeInfo | None = None
        self._from_seq = 0

    def deliver(self, event: Event) -> None:
        if event.seq > self._from_seq:
            self.events.put_nowait(event)

    async def join(self, node: NodeInfo, from_seq: int) -> None:
        self.node = node
        self._from_seq = from_seq
        for event in self.bus.log:
            self.deliver(event)
        self.history_seq = len(self.bus.log)
        self.bus.drivers.append(self)
        if node.node_id in self.bus.members:
            self.bus.append(EventKind.LEAVE, node_id=node.node_id, reason="dead")
        self.bus.append(EventKind.JOIN, node=node)

    async def broadcast(self, op_id: str, body: dict[str, Any]) -> None:
        assert self.node is not None and self in self.bus.drivers
        await asyncio.sleep(0)
        self.bus.append(EventKind.OP, node_id=self.node.node_id, op_id=op_id, body=body)

    def _detach(self) -> None:
        if self in self.bus.drivers:
            self.bus.drivers.remove(self)

    async def leave(self) -> None:
        if self.node is not None and self in self.bus.drivers:
            self.bus.append(EventKind.LEAVE, node_id=self.node.node_id, reason="leave")
        self._detach()

    async def close(self) -> None:
        """A death: the others see it at once."""
        if self.node is not None and self in self.bus.drivers:
            self._detach()
            self.bus.append(EventKind.LEAVE, node_id=self.node.node_id, reason="dead")

    def info(self) -> dict[str, Any]:
        return {"driver": self.name, "members": len(self.bus.members)}
