"""The world a sheep lives in: its clock, its network, its fault hooks and its
source of random tokens, injected so that a simulator can replace each one.

Outside these adapters no code under sheep/ reads the time, sleeps, opens a
socket or draws a random token. The real world below is what the `sheep`
command runs on; sheep/testing/sim.py builds a simulated one (virtual time, an
in-memory network with latency, cuts and partitions, faults chosen by a seed),
so that many sheep run in one process and a run is replayed exactly from its
seed.

The clock is the running event loop's clock for everything that measures
intervals (deadlines, rates, timeouts), so a loop with virtual time makes every
interval virtual; wall time (what is shown to people and stamped into the
cluster log) comes from ``wall``.

``buggify`` is FoundationDB's idea: a call in an error or retry path that is
always false in production, and in simulation true now and then, as the seed
decides, so that rare paths (a lost reply, a slow disk, a retry on a new epoch)
run in every simulation instead of once a year in production.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from sheep import constants

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class Clock:
    """Real time: the loop's monotonic clock and the system's wall clock."""

    def monotonic(self) -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # outside a loop (a blocking caller): the same clock
            return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def precise(self) -> float:
        """A monotonic clock fine enough to time one request (the loop's is cached per
        iteration, to the millisecond under uvloop)."""
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_for(self, awaitable: Any, timeout_s: float | None) -> Any:
        return await asyncio.wait_for(awaitable, timeout_s)


class Listener(Protocol):
    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class Network:
    """Real TCP (or unix sockets): connect to an endpoint, serve on a bound socket."""

    async def connect(self, host: str, port: int, factory: ProtocolFactory,
                      timeout_s: float) -> asyncio.BaseTransport:
        loop = asyncio.get_running_loop()
        transport, _ = await asyncio.wait_for(loop.create_connection(factory, host, port),
                                              timeout_s)
        return transport

    async def serve(self, factory: ProtocolFactory, where: Any) -> Listener:
        """Serve connections on ``where``: a bound, listening socket."""
        assert isinstance(where, socket.socket), "the real network serves on a socket"
        return await asyncio.get_running_loop().create_server(factory, sock=where)


def bind(address: str, port: int) -> socket.socket:
    """The listening socket, bound before the daemon forks so errors reach the user."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(constants.listen_backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Faults:
    """Fault hooks: never fire in the real world."""

    def buggify(self, site: str) -> bool:
        return False


class World:
    """Everything a sheep takes from outside itself, besides its store and driver."""

    def __init__(self, clock: Clock | None = None, network: Network | None = None,
                 faults: Faults | None = None,
                 token: Callable[[int], str] | None = None,
                 crash: Callable[[str], None] | None = None) -> None:
        self.clock = clock or Clock()
        self.network = network or Network()
        self.faults = faults or Faults()
        self._token = token or secrets.token_hex
        self._crash = crash

    def token(self, nbytes: int) -> str:
        """A random hex token (ids that must not collide, never keys)."""
        return self._token(nbytes)

    def crash(self, reason: str) -> None:
        """A broken invariant: the process ends at once (exit 70), as an assert would end
        it, rather than serve on in a state nobody designed. A simulation records it."""
        if self._crash is not None:
            self._crash(reason)
            return
        os._exit(70)


REAL = World()
