"""A cluster of Sheep objects in one process, on one event loop in a thread.

Real protocol, real TCP on 127.0.0.1, real stores in a temporary directory,
but no process start-up and no driver polling: the memory driver delivers
events at once. Tests talk to it with the ordinary SyncClient from their own
thread, which is how the VDI model test runs hundreds of examples quickly. A
cluster may be given other drivers instead (a ZooKeeper one with a cluster key,
which the sheep command cannot be given yet).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from sheep import auth, world
from sheep.client import SyncClient
from sheep.cluster.driver import ClusterDriver
from sheep.cluster.memory import MemoryBus, MemoryDriver
from sheep.cluster_state import EventKind
from sheep.daemon import Sheep, SheepConfig
from sheep.store import Store
from sheep.testing.cluster import free_port

T = TypeVar("T")


class InProcessCluster:
    def __init__(self, base: str, nodes: int = 3, zones: list[int] | None = None,
                 driver: Callable[[int], ClusterDriver] | None = None) -> None:
        self.base = base
        self.make_driver = driver  # sheep index -> its driver; None: the memory bus
        self.zones = zones if zones is not None else list(range(nodes))
        self.bus = MemoryBus()
        self.credentials = auth.Credentials(auth.NODE, auth.new_key())  # the node key
        self.sheep: list[Sheep] = []
        self.ports: list[int] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def start(self) -> InProcessCluster:
        self._thread.start()
        for index, zone in enumerate(self.zones):
            self.add(zone, index)
        return self

    def add(self, zone: int, index: int | None = None) -> int:
        index = len(self.sheep) if index is None else index
        directory = os.path.join(self.base, f"store{index}")
        port = free_port()
        config = SheepConfig(directory=directory, port=port, zone=zone, weight=80 << 30,
                             node_key=self.credentials.key)

        async def start() -> Sheep:
            driver = (MemoryDriver(self.bus) if self.make_driver is None
                      else self.make_driver(index))
            sheep = Sheep(config, Store(directory), driver)
            await sheep.start(world.bind("127.0.0.1", port))
            return sheep

        self.sheep.append(self.run(start()))
        self.ports.append(port)
        return index

    def client(self, index: int = 0) -> SyncClient:
        return SyncClient("127.0.0.1", self.ports[index], self.credentials)

    def crash(self, index: int) -> None:
        """Stop a sheep without leaving: the others see a death."""
        self.run(self.sheep[index].stop(leave=False))

    def declare_dead(self, index: int) -> None:
        """Log a sheep's death while it still runs, as a driver does when its session
        is lost: its locks go with the leave, not with a clean unlock."""
        node = self.sheep[index].node
        assert node is not None

        async def leave() -> None:
            self.bus.append(EventKind.LEAVE, node_id=node.node_id, reason="dead")

        self.run(leave())

    def close(self) -> None:
        for sheep in self.sheep:
            if not sheep.stopping:
                try:
                    self.run(sheep.stop(leave=False), timeout_s=30)
                except Exception:  # a test that failed may leave a sheep half-stopped
                    pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> InProcessCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
