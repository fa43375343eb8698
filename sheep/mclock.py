"""One I/O scheduler per sheep, for every piece of I/O it serves or starts.

Classes (DESIGN.md section 15): client I/O, one queue per VDI ("client:NAME";
"client" alone is a replica's half of a client's write, which its gateway
already admitted), and the background classes: recovery, verify, scrub, gc and
drain. Each class has a reservation, a weight and a limit, as in mClock (Gulati
et al., OSDI 2010; Ceph's osd_mclock): the reservation is a rate it always gets
(the floor that makes background work finish), the weight its share of what is
left, the limit a rate it never exceeds. Rates are in cost per second, and a
request's cost is its bytes plus ``op_cost_bytes`` (a 4 KiB read costs about as
much as any small op; a 4 MiB recovery copy a thousand times more).

Clients come first, which is the asymmetry mClock alone does not give: a client
request waits only for its own VDI's limits and, when the clients alone fill the
depth (``depth_bytes`` of cost in flight), for its turn among the other VDIs by
their tags. Background work never holds a client back: it is dispatched in
the weight phase only while the cost of everything in flight, clients' included,
leaves room within the depth, and in the reservation phase whenever its
reservation is due. So it gets what clients leave, and at least its floor.

Per-VDI QoS (dog vdi qos) is a limit on a client queue given as token buckets:
IOPS and bytes per second, each with a burst of that many seconds' worth.

This module is pure and runs on any clock (tests drive it with a fake one);
sheep/scheduler.py is its asyncio front, which every sheep runs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

op_cost_bytes = 64 << 10  # a request's cost beyond its bytes
depth_bytes = 8 << 20  # cost in flight beyond which background waits (clients' too)
# With no client about (none in flight or waiting, none seen for client_quiet_s),
# background work may have this much in flight: recovery with nobody to keep
# waiting moves several objects at once. Within depth_bytes, one 4 MiB copy at a
# time left a joining sheep's recovery serial (0.04x cp).
idle_depth_bytes = 32 << 20
client_quiet_s = 0.5
burst_default_s = 0.25  # a quarter second's worth: a 10 s window runs at most 2.5% over

CLIENT = "client"  # a replica's half of a client request (admitted at its gateway)
BACKGROUND = ("recovery", "verify", "scrub", "gc", "drain")


def cost(nbytes: int) -> int:
    return op_cost_bytes + max(0, nbytes)


@dataclass(frozen=True, slots=True)
class ClassSpec:
    """A class's reservation and limit in cost per second (0: none), its weight."""

    reservation: float = 0.0
    weight: float = 1.0
    limit: float = 0.0
    background: bool = False


MiB = 1 << 20
# Clients share what they use by weight; background classes get a floor each.
DEFAULT_SPECS: dict[str, ClassSpec] = {
    CLIENT: ClassSpec(weight=100.0),
    "recovery": ClassSpec(reservation=8 * MiB, weight=2.0, background=True),
    "verify": ClassSpec(reservation=2 * MiB, weight=1.0, background=True),
    "scrub": ClassSpec(reservation=1 * MiB, weight=0.5, background=True),
    "gc": ClassSpec(reservation=1 * MiB, weight=1.0, background=True),
    "drain": ClassSpec(reservation=2 * MiB, weight=1.0, background=True),
}


@dataclass(frozen=True, slots=True)
class Qos:
    """A VDI's limits: operations and bytes per second (0: none), and how many
    seconds' worth either may run ahead after an idle spell (the burst)."""

    iops: int = 0
    bps: int = 0
    burst: float = burst_default_s

    @classmethod
    def from_json(cls, value: Any) -> Qos | None:
        if not isinstance(value, dict):
            return None
        return cls(int(value.get("iops", 0)), int(value.get("bps", 0)),
                   float(value.get("burst", burst_default_s)))

    def to_json(self) -> dict[str, Any]:
        return {"iops": self.iops, "bps": self.bps, "burst": self.burst}


class TokenBucket:
    """``rate`` tokens a second, up to ``rate * burst_s`` saved (at least one
    request's worth). A request larger than the bucket waits for a full bucket and
    leaves it in debt, so a big request is paced, never refused."""

    def __init__(self, rate: float, burst_s: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(rate * burst_s, 1.0)
        self.tokens = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def ready_at(self, amount: float, now: float) -> float:
        """When amount may be taken (now, or later)."""
        self._refill(now)
        need = min(amount, self.capacity)
        if self.tokens >= need:
            return now
        return now + (need - self.tokens) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.tokens -= amount


@dataclass(slots=True)
class _Request:
    cost: int
    nbytes: int
    reservation: float  # mClock's tags
    proportion: float
    arrived: float
    started: bool = False
    dispatched_at: float = 0.0
    future: Any = None  # the waiter's, in the asyncio front


@dataclass(slots=True)
class _Queue:
    name: str
    spec: ClassSpec
    buckets: list[tuple[TokenBucket, str]] = field(default_factory=list)  # (bucket, unit)
    waiting: deque[_Request] = field(default_factory=deque)
    r_last: float = 0.0
    p_last: float = 0.0
    inflight: int = 0  # cost
    dispatched: int = 0  # requests, ever
    waited: int = 0  # of them, how many queued first
    wait_seconds: float = 0.0

    def amount(self, unit: str, request: _Request) -> float:
        return 1.0 if unit == "ops" else float(request.nbytes if unit == "bytes" else request.cost)

    def ready_at(self, request: _Request, now: float) -> float:
        return max((bucket.ready_at(self.amount(unit, request), now)
                    for bucket, unit in self.buckets), default=now)


class Core:
    """The pure scheduler: queues, tags, buckets and the dispatch decision."""

    def __init__(self, now: Callable[[], float], depth: int = depth_bytes,
                 specs: dict[str, ClassSpec] | None = None,
                 idle_depth: int = idle_depth_bytes) -> None:
        self.now = now
        self.depth = depth
        self.idle_depth = max(depth, idle_depth)
        self.client_seen = -math.inf  # when a client request was last dispatched or done
        self.specs = dict(DEFAULT_SPECS if specs is None else specs)
        self.queues: dict[str, _Queue] = {}
        self.qos: dict[str, Qos] = {}  # by VDI name
        self.foreground = 0  # cost in flight, clients'
        self.background = 0  # cost in flight, background classes'
        self.limits: dict[str, float] = {}  # class limits set at run time (0: none)
        # Everything at once, in arrival order, as before there was a scheduler (no
        # QoS, floors or tuning): sheep --io-scheduler fifo, for comparisons.
        self.fifo = False
        self.waiting_fg = 0  # requests queued, clients'
        self.client_ops = 0  # client requests done, ever, and the seconds they took
        self.client_seconds = 0.0  # (dispatch to done: what background work may slow)
        self.waiting_bg = 0  # requests queued, background classes'

    # --- configuration -------------------------------------------------------

    def _spec(self, name: str) -> ClassSpec:
        base = name.partition(":")[0]
        return self.specs.get(name) or self.specs.get(base) or self.specs[CLIENT]

    def queue(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _Queue(name, self._spec(name))
            self._rebuild_buckets(queue)
        return queue

    def _rebuild_buckets(self, queue: _Queue) -> None:
        now = self.now()
        queue.buckets = []
        limit = self.limits.get(queue.name, queue.spec.limit)
        if limit > 0:
            queue.buckets.append((TokenBucket(limit, 0.1, now), "cost"))
        vdi = queue.name.partition(":")[2] if queue.name.startswith(CLIENT + ":") else ""
        qos = self.qos.get(vdi) if vdi else None
        if qos is not None:
            if qos.iops > 0:
                queue.buckets.append((TokenBucket(qos.iops, qos.burst, now), "ops"))
            if qos.bps > 0:
                queue.buckets.append((TokenBucket(qos.bps, qos.burst, now), "bytes"))

    def set_limit(self, name: str, rate: float) -> None:
        """A class's limit at run time (recovery: the tuner's rate), 0 for none."""
        if self.limits.get(name, -1.0) == rate:
            return
        self.limits[name] = rate
        queue = self.queues.get(name)
        if queue is not None:
            old = {unit: bucket for bucket, unit in queue.buckets}
            self._rebuild_buckets(queue)
            for bucket, unit in queue.buckets:  # keep the saved tokens' debt, not a fresh burst
                if unit in old and old[unit].rate == bucket.rate:
                    bucket.tokens, bucket.stamp = old[unit].tokens, old[unit].stamp

    def set_qos(self, qos: dict[str, Qos]) -> None:
        """Every VDI's limits, as the cluster state has them now."""
        changed = {name for name in set(self.qos) | set(qos) if self.qos.get(name) != qos.get(name)}
        self.qos = dict(qos)
        for name in changed:
            queue = self.queues.get(f"{CLIENT}:{name}")
            if queue is not None:
                self._rebuild_buckets(queue)

    # --- requests -------------------------------------------------------------

    def _tagged(self, queue: _Queue, nbytes: int, now: float) -> _Request:
        spec = queue.spec
        request_cost = cost(nbytes)
        reservation = (max(queue.r_last + request_cost / spec.reservation, now)
                       if spec.reservation > 0 else math.inf)
        proportion = max(queue.p_last + request_cost / spec.weight, now)
        if spec.reservation > 0:
            queue.r_last = reservation
        queue.p_last = proportion
        return _Request(request_cost, nbytes, reservation, proportion, now)

    def _room(self, queue: _Queue, request: _Request, reserved: bool) -> bool:
        if not queue.spec.background:
            return self.foreground == 0 or self.foreground + request.cost <= self.depth
        depth = self._background_depth()
        if reserved:  # the floor: one request of the class at a time at least
            return queue.inflight == 0 or self.background + request.cost <= depth
        total = self.foreground + self.background
        return total == 0 or total + request.cost <= depth

    def _background_depth(self) -> int:
        """Background work's room: the depth while clients are about (in flight,
        waiting, or seen within client_quiet_s), else the idle depth."""
        if (self.foreground or self.waiting_fg
                or self.now() - self.client_seen < client_quiet_s):
            return self.depth
        return self.idle_depth

    def submit(self, name: str, nbytes: int) -> _Request:
        """A new request: dispatched at once (``started``) if nothing waits before it
        and its limits and the room allow, else queued with its tags (pop() takes it
        in turn)."""
        queue = self.queue(name)
        now = self.now()
        request = self._tagged(queue, nbytes, now)
        if self.fifo:
            request.started = True
            request.dispatched_at = now
            self._charge(queue, request)
            return request
        if (queue.waiting or (queue.spec.background and self.waiting_fg)
                or queue.ready_at(request, now) > now
                or not self._room(queue, request, request.reservation <= now)):
            queue.waiting.append(request)
            self._count(queue, 1)
            return request
        self._dispatch(queue, request, now, request.reservation <= now)
        return request

    def account(self, name: str, nbytes: int) -> _Request:
        """Work served for another sheep's request, which that sheep admitted (a
        replica's half of a client write, the source side of a recovery copy): it
        never waits here, or two sheep copying from each other could each hold
        room the other's copy waits for. It counts in flight all the same, so
        this sheep's own background work makes way for it."""
        queue = self.queue(name)
        now = self.now()
        request = _Request(cost(nbytes), nbytes, math.inf, 0.0, now, started=True,
                           dispatched_at=now)
        self._charge(queue, request)
        return request

    def _charge(self, queue: _Queue, request: _Request) -> None:
        queue.inflight += request.cost
        queue.dispatched += 1
        if queue.spec.background:
            self.background += request.cost
        else:
            self.foreground += request.cost
            self.client_seen = request.dispatched_at

    def _dispatch(self, queue: _Queue, request: _Request, now: float, reserved: bool) -> None:
        for bucket, unit in queue.buckets:
            bucket.take(queue.amount(unit, request), now)
        if reserved and queue.spec.weight > 0:
            # Served out of its reservation: not counted against its share (mClock).
            adjust = request.cost / queue.spec.weight
            queue.p_last -= adjust
            for other in queue.waiting:
                other.proportion -= adjust
        request.started = True
        request.dispatched_at = now
        if request.arrived < now:
            queue.waited += 1
            queue.wait_seconds += now - request.arrived
        self._charge(queue, request)

    def done(self, name: str, request: _Request) -> None:
        queue = self.queues[name]
        queue.inflight -= request.cost
        if queue.spec.background:
            self.background -= request.cost
        else:
            self.foreground -= request.cost
            self.client_ops += 1
            self.client_seen = self.now()
            self.client_seconds += self.client_seen - request.dispatched_at

    def cancel(self, name: str, request: _Request) -> None:
        """A waiting request whose waiter gave up."""
        queue = self.queues.get(name)
        if queue is not None and request in queue.waiting:
            queue.waiting.remove(request)
            self._count(queue, -1)

    def _count(self, queue: _Queue, change: int) -> None:
        if queue.spec.background:
            self.waiting_bg += change
        else:
            self.waiting_fg += change

    def pop(self) -> tuple[str, _Request] | float | None:
        """The next request to dispatch (dispatched now), else when to look again (a
        tag or a bucket comes due), else None (nothing waits, or it waits for room)."""
        now = self.now()
        heads: list[tuple[_Queue, _Request]] = []
        later = math.inf
        for queue in self.queues.values():
            if not queue.waiting:
                continue
            request = queue.waiting[0]
            ready = queue.ready_at(request, now)
            if ready > now:
                later = min(later, ready)
                continue
            heads.append((queue, request))
        # Reservation phase: a due reservation goes first, the earliest tag first.
        due = [(request.reservation, index) for index, (queue, request) in enumerate(heads)
               if request.reservation <= now and self._room(queue, request, True)]
        if due:
            queue, request = heads[min(due)[1]]
            return self._take(queue, request, now, reserved=True)
        for _, request in heads:
            if request.reservation < math.inf and request.reservation > now:
                later = min(later, request.reservation)
        # Weight phase: the smallest proportional tag among those with room; clients'
        # before background work's while any client waits.
        clients_wait = any(not queue.spec.background for queue, _ in heads)
        fits = [(request.proportion, index) for index, (queue, request) in enumerate(heads)
                if (not clients_wait or not queue.spec.background)
                and self._room(queue, request, False)]
        if fits:
            queue, request = heads[min(fits)[1]]
            return self._take(queue, request, now, reserved=False)
        return later if later < math.inf else None

    def _take(self, queue: _Queue, request: _Request, now: float,
              reserved: bool) -> tuple[str, _Request]:
        queue.waiting.popleft()
        self._count(queue, -1)
        self._dispatch(queue, request, now, reserved)
        return queue.name, request

    # --- what it is doing -----------------------------------------------------

    def depths(self) -> dict[str, int]:
        """Requests waiting, by class (client queues summed as "client")."""
        result = {name: 0 for name in (CLIENT, *BACKGROUND)}
        for queue in list(self.queues.values()):  # a metrics scrape's thread reads it too
            key = queue.name.partition(":")[0]
            result[key] = result.get(key, 0) + len(queue.waiting)
        return result

    def status(self) -> dict[str, Any]:
        classes: dict[str, dict[str, Any]] = {}
        for queue in list(self.queues.values()):
            key = queue.name.partition(":")[0]
            entry = classes.setdefault(key, {"waiting": 0, "inflight_bytes": 0,
                                             "dispatched": 0, "waited": 0, "wait_seconds": 0.0})
            entry["waiting"] += len(queue.waiting)
            entry["inflight_bytes"] += queue.inflight
            entry["dispatched"] += queue.dispatched
            entry["waited"] += queue.waited
            entry["wait_seconds"] += queue.wait_seconds
        return {"mode": "fifo" if self.fifo else "mclock",
                "depth_bytes": self.depth, "foreground_bytes": self.foreground,
                "background_bytes": self.background, "classes": classes}


@dataclass(slots=True)
class RecoveryTuner:
    """Recovery's rate, tuned to the clients (after Vitastor's recovery_tune_*): at
    each tick (``interval_s``), from the client requests this sheep served since
    the last one. No client: no limit but the operator's cap. Clients' mean
    service time within ``slack`` of what it was while no recovery ran (the
    baseline): faster, by ``increase`` a tick. Above: halve the rate, down to the
    floor (recovery's reservation, so it always finishes). ``cap`` (the cluster's
    --max-rate, 0 for none) always bounds it. ``reason`` says what holds it back."""

    floor: float = DEFAULT_SPECS["recovery"].reservation
    start: float = 16.0 * MiB
    increase: float = 1.25
    slack: float = 2.0  # times the baseline
    slack_min_s: float = 0.002  # and at least this much above it
    # Clients served at less than this share of their rate without recovery: they
    # are held back (on a shared box the sheep that serves them may be starved of
    # CPU while this one's requests still look fast).
    throughput_floor: float = 0.7
    interval_s: float = 0.5
    rate: float = 0.0  # bytes/s now; 0: no limit
    baseline: float = 0.0  # clients' mean service time without recovery
    baseline_ops: float = 0.0  # and their requests per second
    reason: str = "idle"
    last_ops: int = 0
    last_seconds: float = 0.0
    last_tick: float = 0.0

    def began(self, now: float, client_ops: int, client_seconds: float) -> None:
        """A recovery pass starts: the next tick counts only the client requests done
        from now on. Those done before (a VM's last writes before a node joined) said
        nothing of what recovery does to clients, yet held the pass's first half
        second to the start rate."""
        self.last_ops, self.last_seconds, self.last_tick = client_ops, client_seconds, now

    def tick(self, now: float, client_ops: int, client_seconds: float, recovering: bool,
             cap: float) -> float:
        """The rate from now on (0: none) and, in ``reason``, why."""
        ops = client_ops - self.last_ops
        spent = client_seconds - self.last_seconds
        elapsed = now - self.last_tick if self.last_tick else self.interval_s
        self.last_ops, self.last_seconds, self.last_tick = client_ops, client_seconds, now
        mean = spent / ops if ops else 0.0
        per_s = ops / elapsed if elapsed > 0 else 0.0
        if not recovering:
            if ops:
                self.baseline = mean if not self.baseline else 0.8 * self.baseline + 0.2 * mean
                self.baseline_ops = (per_s if not self.baseline_ops
                                     else 0.8 * self.baseline_ops + 0.2 * per_s)
            self.rate = 0.0
            self.reason = "idle"
            return self._capped(cap)
        if not ops:
            self.rate = 0.0
            self.reason = "none: no client I/O"
            return self._capped(cap)
        target = max(self.baseline * self.slack, self.baseline + self.slack_min_s)
        if not self.rate:
            self.rate = self.start
        slowed = self.baseline_ops and per_s < self.throughput_floor * self.baseline_ops
        if (self.baseline and mean > target) or slowed:
            self.rate = max(self.floor, self.rate / 2)
            self.reason = (f"client latency {mean * 1000:.1f} ms > {target * 1000:.1f} ms"
                           if not slowed else
                           f"client I/O at {per_s:.0f}/s < {self.throughput_floor:g} x"
                           f" {self.baseline_ops:.0f}/s") + (
                " (at the floor)" if self.rate <= self.floor else "")
        else:
            self.rate = self.rate * self.increase
            self.reason = f"client latency {mean * 1000:.1f} ms: speeding up"
        return self._capped(cap)

    def _capped(self, cap: float) -> float:
        if cap and (not self.rate or self.rate >= cap):
            self.rate = cap
            self.reason = "max-rate"
        return self.rate

    def due(self, now: float) -> bool:
        return now - self.last_tick >= self.interval_s
