"""The simulated world: an event loop on virtual time, an in-memory network, a
cluster bus with ZooKeeper-like sessions, and seeded fault hooks.

Everything here is driven by one seeded PRNG and by virtual time, so a run is a
pure function of its seed (see sheep/testing/sim.py, which builds sheep on it).

- **VirtualLoop** is an asyncio loop whose clock only moves when nothing is
  ready to run: it then jumps to the next timer (CPython's old TestLoop and
  looptime do the same). Work sent to executors runs inline, at once, so no
  thread ever decides an order of events.
- **SimNetwork** connects hosts by pairs of in-memory transports. Bytes arrive
  in order, after a latency the seed picks per link, and are handed to the
  receiving BufferedProtocol as TCP would (any chunking). A partition holds the
  bytes crossing it (TCP retransmits) and, once it has lasted the dead-peer
  timeout, resets the connections across it; connecting across it times out.
  A killed host's connections close on the far side after the bytes it had
  sent (the kernel sends what it holds, then FIN); a host that lost power
  falls silent, and its peers notice only after the dead-peer timeout.
- **SimBus** is the cluster driver's ordered log, delivered to each member after
  its own delay, with deaths noticed after a detection delay, and sessions that
  can be suspended (the member is fenced, and hears nothing) and then resume or
  expire (its death is logged; it rejoins as a new incarnation).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import errno
import random
import selectors
from collections.abc import Callable, Coroutine
from typing import Any

from sheep import constants
from sheep.cluster.memory import MemoryBus, MemoryDriver
from sheep.cluster_state import Event, EventKind
from sheep.node import NodeInfo
from sheep.world import Clock, Faults, Listener, Network, ProtocolFactory

# The host whose code is running: set in the context of every task a sheep or a
# client starts, so a kill can find its tasks, and deliveries run as their receiver.
current_host: contextvars.ContextVar[str] = contextvars.ContextVar("current_host", default="")

wall_clock_base_s = 1_800_000_000.0  # the virtual wall clock's start (2027)


class Deadlock(Exception):
    """Nothing is ready and no timer is set: every task waits for something that
    can never happen."""


class _VirtualSelector(selectors.BaseSelector):
    """Registers what the loop asks (its self-pipe) and never reports it; a select
    with a timeout moves the virtual clock instead of sleeping."""

    def __init__(self, loop: VirtualLoop) -> None:
        self.loop = loop
        self._map: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._map[fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._map.pop(fd)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self.unregister(fileobj)
        return self.register(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise Deadlock("every task waits and no timer is set")
        if timeout > 0:
            self.loop.advance(timeout)
        return []

    def get_map(self) -> Any:
        return self._map

    def close(self) -> None:
        self._map.clear()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(_VirtualSelector(self))
        self._clock_resolution = 1e-9
        self.tasks_by_host: dict[str, dict[asyncio.Task[Any], None]] = {}
        self.set_task_factory(self._make_task)  # type: ignore[arg-type]

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def run_in_executor(self, executor: Any, func: Callable[..., Any],  # type: ignore[override]
                        *args: Any) -> asyncio.Future[Any]:
        future = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as error:
            future.set_exception(error)
        return future

    def _make_task(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                   context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        context = context if context is not None else contextvars.copy_context()
        task = asyncio.Task(coro, loop=loop, context=context)
        host = context.get(current_host)
        if host:
            tasks = self.tasks_by_host.setdefault(host, {})
            tasks[task] = None
            task.add_done_callback(lambda done: tasks.pop(done, None))
        return task

    def kill_tasks(self, host: str) -> None:
        """Cancel every task the host started: its process is gone."""
        for task in list(self.tasks_by_host.pop(host, {})):
            task.cancel()


class InlineExecutor(concurrent.futures.Executor):
    """An executor that runs each job at once, in the caller's thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any,  # type: ignore[override]
               **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)
        return future


class SimClock(Clock):
    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        return wall_clock_base_s + asyncio.get_running_loop().time()

    def precise(self) -> float:
        return asyncio.get_running_loop().time()


class SimFaults(Faults):
    """FoundationDB's buggify: each site is switched on for a whole run with
    probability site_on_ratio (decided at its first call), and an enabled site fires
    with probability fire_ratio. Off entirely when ``enabled`` is false."""

    site_on_ratio = 0.25
    fire_ratio = 0.05

    def __init__(self, rng: random.Random, enabled: bool) -> None:
        self.rng = rng
        self.enabled = enabled
        self.sites: dict[str, bool] = {}
        self.fired: dict[str, int] = {}

    def buggify(self, site: str) -> bool:
        if not self.enabled:
            return False
        on = self.sites.get(site)
        if on is None:
            on = self.sites[site] = self.rng.random() < self.site_on_ratio
        if on and self.rng.random() < self.fire_ratio:
            self.fired[site] = self.fired.get(site, 0) + 1
            return True
        return False


# --- the network -------------------------------------------------------------------


class Host:
    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self.alive = True
        self.context = contextvars.copy_context()
        self.context.run(current_host.set, name)
        self.ends: list[_End] = []
        self.ports = iter(range(40000, 65000))

    def reborn(self) -> None:
        """A new process on this host: a fresh context for its tasks."""
        self.alive = True
        self.context = contextvars.copy_context()
        self.context.run(current_host.set, self.name)


class _End(asyncio.Transport):
    """One side of a simulated TCP connection."""

    def __init__(self, network: SimNetwork, host: Host, peername: tuple[str, int],
                 sockname: tuple[str, int]) -> None:
        super().__init__()
        self.network = network
        self.host = host
        self.protocol: Any = None
        self.other: _End | None = None
        self.peername = peername
        self.sockname = sockname
        self.closing = False
        self.lost = False
        self.reading = True
        self.inbox = bytearray()
        self.next_arrival = 0.0  # bytes sent from this end arrive in order
        self.in_flight: collections.deque[bytes | None] = collections.deque()
        host.ends.append(self)

    # asyncio.Transport
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peername, "sockname": self.sockname}.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: Any) -> None:
        if self.closing or not self.host.alive:
            return
        self.network.send(self, bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(bytes(chunk) for chunk in chunks))

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.network.send(self, None)  # FIN, after the bytes before it
        self.network.loop.call_soon(self.lose, None, context=self.host.context)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.network.loop.call_soon(self.drain, context=self.host.context)

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    # the network's side
    def arrive_next(self, sender: _End) -> None:
        self.arrive(sender.in_flight.popleft())

    def arrive(self, data: bytes | None) -> None:
        if self.lost or not self.host.alive:
            return
        if data is None:
            self.lose(None)
            return
        self.inbox += data
        self.drain()

    def drain(self) -> None:
        while self.inbox and self.reading and not self.lost:
            buffer = self.protocol.get_buffer(len(self.inbox))
            count = min(len(buffer), len(self.inbox))
            buffer[:count] = self.inbox[:count]
            del self.inbox[:count]
            self.protocol.buffer_updated(count)

    def lose(self, error: Exception | None) -> None:
        """The connection is gone for this end's protocol (a FIN, a reset, a timeout)."""
        if self.lost:
            return
        self.lost = True
        self.closing = True
        self.inbox.clear()
        if self in self.host.ends:
            self.host.ends.remove(self)
        if self.host.alive:
            self.protocol.connection_lost(error)


class _SimListener:
    def __init__(self, network: SimNetwork, key: tuple[str, int]) -> None:
        self.network = network
        self.key = key

    def close(self) -> None:
        self.network.listeners.pop(self.key, None)

    async def wait_closed(self) -> None:
        return None


class SimNetwork:
    """Hosts, links and listeners. ``view(host)`` is the Network a host's code uses."""

    def __init__(self, loop: VirtualLoop, rng: random.Random) -> None:
        self.loop = loop
        self.rng = rng
        self.hosts: dict[str, Host] = {}  # by address
        self.listeners: dict[tuple[str, int], tuple[ProtocolFactory, Host]] = {}
        self.blocked: set[tuple[str, str]] = set()  # (from address, to address)
        self.held: dict[tuple[str, str], list[tuple[_End, bytes | None]]] = {}
        self.slow: dict[tuple[str, str], float] = {}  # extra latency of a slow link, s
        self.latency_s = (0.00005, 0.0005)
        self.connections = 0
        self.resets = 0

    def add_host(self, name: str, address: str) -> Host:
        host = Host(name, address)
        self.hosts[address] = host
        return host

    def view(self, host: Host) -> Network:
        return _HostNetwork(self, host)

    def latency(self, source: Host, target: Host) -> float:
        base = self.rng.uniform(*self.latency_s)
        return base + self.slow.get((source.address, target.address), 0.0)

    def send(self, end: _End, data: bytes | None) -> None:
        other = end.other
        assert other is not None
        link = (end.host.address, other.host.address)
        if link in self.blocked:
            self.held.setdefault(link, []).append((end, data))
            return
        arrival = max(self.loop.time() + self.latency(end.host, other.host), end.next_arrival)
        end.next_arrival = arrival
        # The loop's heap does not keep the order of timers due at the same moment:
        # each timer delivers the oldest bytes in flight, so the order is the sending one.
        end.in_flight.append(data)
        self.loop.call_at(arrival, other.arrive_next, end, context=other.host.context)

    # --- faults ---------------------------------------------------------------

    def partition(self, side_a: set[str], side_b: set[str], one_way: bool = False) -> None:
        """Cut the links from side_a to side_b (and back, unless one_way)."""
        for a in side_a:
            for b in side_b:
                self.blocked.add((a, b))
                if not one_way:
                    self.blocked.add((b, a))
        self.loop.call_later(constants.dead_peer_timeout_ms / 1000, self._time_out_cut,
                             frozenset(self.blocked))

    def _time_out_cut(self, cut: frozenset[tuple[str, str]]) -> None:
        """Connections whose bytes could not cross for the whole dead-peer timeout fail
        on both sides, as TCP_USER_TIMEOUT and keepalive make them."""
        still = cut & self.blocked
        for host in list(self.hosts.values()):
            for end in list(host.ends):
                other = end.other
                if other is None or end.lost:
                    continue
                if (host.address, other.host.address) in still:
                    self.resets += 1
                    self.held.pop((host.address, other.host.address), None)
                    self.loop.call_soon(end.lose, TimeoutError("peer silent"),
                                        context=end.host.context)
                    self.loop.call_soon(other.lose, TimeoutError("peer silent"),
                                        context=other.host.context)

    def heal(self) -> None:
        self.blocked.clear()
        held, self.held = self.held, {}
        for items in held.values():
            for end, data in items:
                if not end.lost and end.other is not None and not end.other.lost:
                    self.send(end, data)

    def reset_random(self) -> None:
        """A connection reset (a middlebox, a NIC): both sides see it at once."""
        ends = [end for host in self.hosts.values() for end in host.ends
                if not end.lost and end.other is not None]
        if not ends:
            return
        end = self.rng.choice(ends)
        assert end.other is not None
        self.resets += 1
        for side in (end, end.other):
            self.loop.call_soon(side.lose, ConnectionResetError("reset"),
                                context=side.host.context)

    def kill(self, host: Host, power_loss: bool) -> None:
        """The host's process dies. Its peers see their connections close after the
        bytes already sent (a kill), or only after the dead-peer timeout (power loss)."""
        host.alive = False
        for (address, port) in [key for key, (_, owner) in self.listeners.items()
                                if owner is host]:
            del self.listeners[(address, port)]
        for end in list(host.ends):
            end.lost = True
            other = end.other
            if other is None or other.lost:
                continue
            if power_loss:
                self.loop.call_later(constants.dead_peer_timeout_ms / 1000, other.lose,
                                     TimeoutError("peer silent"), context=other.host.context)
            elif (host.address, other.host.address) not in self.blocked:
                self.send(end, None)  # the kernel closes its sockets: FIN after the bytes
        host.ends.clear()

    # --- for the views --------------------------------------------------------------

    async def connect(self, source: Host, address: str, port: int, factory: ProtocolFactory,
                      timeout_s: float) -> asyncio.BaseTransport:
        target = self.hosts.get(address)
        await asyncio.sleep(self.latency(source, target) if target else 0.0)
        if target is not None and ((source.address, address) in self.blocked
                                   or (address, source.address) in self.blocked):
            await asyncio.sleep(timeout_s)
            raise TimeoutError(f"connect to {address}:{port} timed out")
        entry = self.listeners.get((address, port))
        if target is None or not target.alive or entry is None or not source.alive:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        server_factory, _ = entry
        local = (source.address, next(source.ports))
        client = _End(self, source, peername=(address, port), sockname=local)
        server = _End(self, target, peername=local, sockname=(address, port))
        client.other, server.other = server, client
        self.connections += 1
        client.protocol = factory()
        server.protocol = target.context.run(server_factory)
        server.protocol.connection_made(server)
        client.protocol.connection_made(client)
        return client

    async def serve(self, host: Host, factory: ProtocolFactory, where: Any) -> Listener:
        address, port = where
        assert address == host.address, "a host serves on its own address"
        self.listeners[(address, port)] = (factory, host)
        return _SimListener(self, (address, port))


class _HostNetwork(Network):
    def __init__(self, network: SimNetwork, host: Host) -> None:
        self.network = network
        self.host = host

    async def connect(self, host: str, port: int, factory: ProtocolFactory,
                      timeout_s: float) -> asyncio.BaseTransport:
        return await self.network.connect(self.host, host, port, factory, timeout_s)

    async def serve(self, factory: ProtocolFactory, where: Any) -> Listener:
        return await self.network.serve(self.host, factory, where)


# --- the cluster bus -------------------------------------------------------------------


class SimBus(MemoryBus):
    """The ordered log, delivered to each member after its own delay (in order)."""

    def __init__(self, loop: VirtualLoop, rng: random.Random, clock: Clock) -> None:
        super().__init__(clock)
        self.loop = loop
        self.rng = rng
        self.incarnations: dict[str, int] = {}
        self.delay_s = (0.0005, 0.02)

    def append(self, kind: EventKind, **fields: Any) -> None:
        if kind is EventKind.JOIN:  # each join is a new incarnation (see leave_later)
            node_id = fields["node"].node_id
            self.incarnations[node_id] = self.incarnations.get(node_id, 0) + 1
        super().append(kind, **fields)

    def append_leave(self, node_id: str) -> None:
        self.append(EventKind.LEAVE, node_id=node_id, reason="dead")

    def append_join(self, node: NodeInfo) -> None:
        self.append(EventKind.JOIN, node=node)

    def leave_later(self, node_id: str, delay_s: float) -> None:
        """Log a member's death once noticed, unless it came back meanwhile."""
        incarnation = self.incarnations.get(node_id)

        def notice() -> None:
            if node_id in self.members and self.incarnations.get(node_id) == incarnation:
                self.append(EventKind.LEAVE, node_id=node_id, reason="dead")

        self.loop.call_later(delay_s, notice)


class SimDriver(MemoryDriver):
    """A member of the SimBus with a ZooKeeper-like session: while suspended it hears
    nothing, and serves on its lease (sheep/lease.py) for lease_s, half the sim's
    session timeout (sheep/testing/sim.py: session_timeout_s), then is fenced; on
    resume it hears what it missed, and after a lapsed lease serves again only once
    it has applied that."""

    name = "sim"
    can_fence = True
    lease_s = 2.0

    def __init__(self, bus: SimBus) -> None:
        super().__init__(bus)
        self.sim_bus = bus
        self.suspended = False
        self.suspended_at = 0.0
        self._next_delivery = 0.0
        self._held: list[Event] = []
        self._in_flight: collections.deque[Event] = collections.deque()
        self._catch_up_to = 0
        self.dead = False

    def _lease_ran_out(self) -> bool:
        return self.suspended and self.sim_bus.loop.time() >= self.suspended_at + self.lease_s

    @property
    def fenced(self) -> bool:
        # After a lapsed lease, fenced until the sheep has applied what it missed: its
        # state may be behind the ops that clients were answered meanwhile.
        return self._lease_ran_out() or self.applied_seq() < self._catch_up_to

    def deliver(self, event: Event) -> None:
        if self.dead or event.seq <= self._from_seq:
            return
        if self.suspended:
            self._held.append(event)
            return
        loop = self.sim_bus.loop
        at = max(loop.time() + self.sim_bus.rng.uniform(*self.sim_bus.delay_s),
                 self._next_delivery)
        self._next_delivery = at
        self._in_flight.append(event)  # delivered oldest first (see SimNetwork.send)
        loop.call_at(at, self._put)

    def _put(self) -> None:
        event = self._in_flight.popleft()
        if not self.dead:
            self.events.put_nowait(event)

    def suspend(self) -> None:
        self.suspended = True
        self.suspended_at = self.sim_bus.loop.time()

    def resume(self) -> None:
        if self._lease_ran_out():
            self._catch_up_to = len(self.sim_bus.log)
        self.suspended = False
        held, self._held = self._held, []
        for event in held:
            self.deliver(event)

    async def broadcast(self, op_id: str, body: dict[str, Any]) -> None:
        while self.suspended and not self.dead:
            await asyncio.sleep(0.05)
        if self.dead:
            raise ConnectionError("the session is gone")
        await super().broadcast(op_id, body)

    def die(self) -> None:
        """The process died: it hears nothing more; the bus notices later."""
        self.dead = True
        self._detach()

    async def close(self) -> None:
        self.die()

    def info(self) -> dict[str, Any]:
        return {"driver": self.name, "members": len(self.bus.members)}
