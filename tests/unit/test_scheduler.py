"""The I/O scheduler (sheep/scheduler.py) on a fake clock: shares by weight,
reservations, limits, token-bucket bursts, clients first, and starvation freedom
for background work. A small discrete-event server drives the pure core: every
request it dispatches completes a fixed service time later."""

from __future__ import annotations

import asyncio
import heapq
from collections import Counter

import pytest

from sheep import mclock as scheduler
from sheep.scheduler import ClassSpec, Core, Qos, RecoveryTuner, Scheduler, TokenBucket

KiB = 1 << 10
MiB = 1 << 20
unit = scheduler.cost(0)  # the cost of one request without bytes


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run(core: Core, clock: FakeClock, backlog: dict[str, int], seconds: float,
        service_s: float | dict[str, float] = 0.01, nbytes: dict[str, int] | None = None,
        ) -> Counter[str]:
    """Keep `backlog[name]` requests of each class waiting or running; serve each for
    service_s; the requests each class got dispatched over `seconds`."""
    nbytes = nbytes or {}
    served: Counter[str] = Counter()
    running: list[tuple[float, int, str, object]] = []
    outstanding = Counter[str]()
    sequence = 0

    def refill() -> None:
        for name, depth in backlog.items():
            while outstanding[name] < depth:
                request = core.submit(name, nbytes.get(name, 0))
                outstanding[name] += 1
                if request.started:
                    start(name, request)

    def start(name: str, request: object) -> None:
        nonlocal sequence
        served[name] += 1
        service = service_s[name] if isinstance(service_s, dict) else service_s
        sequence += 1
        heapq.heappush(running, (clock.t + service, sequence, name, request))

    end = clock.t + seconds
    refill()
    while clock.t < end:
        while True:
            picked = core.pop()
            if not isinstance(picked, tuple):
                break
            start(*picked)
        next_times = [running[0][0]] if running else []
        if isinstance(picked, float):
            next_times.append(picked)
        if not next_times:
            break
        clock.t = max(clock.t, min(next_times))
        while running and running[0][0] <= clock.t:
            _, _, name, request = heapq.heappop(running)
            core.done(name, request)  # type: ignore[arg-type]
            outstanding[name] -= 1
        refill()
    return served


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def one_at_a_time(clock: FakeClock, specs: dict[str, ClassSpec]) -> Core:
    """A server that takes one small request at a time: every choice is the scheduler's."""
    return Core(clock, depth=unit, specs={**scheduler.DEFAULT_SPECS, **specs}, idle_depth=unit)


def test_backlogged_classes_share_by_weight(clock: FakeClock) -> None:
    core = one_at_a_time(clock, {"a": ClassSpec(weight=3.0, background=True),
                                 "b": ClassSpec(weight=1.0, background=True)})
    served = run(core, clock, {"a": 4, "b": 4}, seconds=20.0)
    assert served["a"] + served["b"] >= 1990
    assert 2.9 <= served["a"] / served["b"] <= 3.1


def test_client_vdis_share_equally_when_they_saturate_the_sheep(clock: FakeClock) -> None:
    core = one_at_a_time(clock, {})
    served = run(core, clock, {"client:a": 8, "client:b": 2}, seconds=10.0)
    assert abs(served["client:a"] - served["client:b"]) <= 2


def test_a_reservation_is_met_against_a_heavier_class(clock: FakeClock) -> None:
    # 100 requests a second of service; r asks for 20 of them whatever the weights say.
    core = one_at_a_time(clock, {"r": ClassSpec(reservation=20 * unit, weight=0.01, background=True),
                                 "w": ClassSpec(weight=100.0, background=True)})
    served = run(core, clock, {"r": 4, "w": 4}, seconds=20.0)
    assert 20 * 20 * 0.95 <= served["r"] <= 20 * 20 * 1.1
    assert served["w"] >= 20 * 75


def test_a_limit_caps_a_class_even_on_an_idle_sheep(clock: FakeClock) -> None:
    core = Core(clock, specs={**scheduler.DEFAULT_SPECS,
                              "capped": ClassSpec(weight=1.0, limit=50 * unit, background=True)})
    served = run(core, clock, {"capped": 16}, seconds=10.0, service_s=0.001)
    assert 450 <= served["capped"] <= 510


def test_the_limit_set_at_run_time_applies(clock: FakeClock) -> None:
    core = Core(clock)
    core.set_limit("recovery", 10 * (4 * MiB + unit))  # ten 4 MiB copies a second
    served = run(core, clock, {"recovery": 4}, seconds=10.0, service_s=0.001,
                 nbytes={"recovery": 4 * MiB})
    assert 95 <= served["recovery"] <= 112
    core.set_limit("recovery", 0)
    served = run(core, clock, {"recovery": 4}, seconds=1.0, service_s=0.001,
                 nbytes={"recovery": 4 * MiB})
    assert served["recovery"] >= 500


def test_token_bucket_bursts_then_paces() -> None:
    bucket = TokenBucket(100.0, 2.0, now=0.0)
    assert bucket.ready_at(1, 0.0) == 0.0
    for _ in range(200):  # the saved burst: two seconds' worth at once
        assert bucket.ready_at(1, 0.0) == 0.0
        bucket.take(1, 0.0)
    assert bucket.ready_at(1, 0.0) == pytest.approx(0.01)
    assert bucket.ready_at(1, 0.5) == 0.5  # 50 tokens back after half a second
    bucket.take(50, 0.5)
    assert bucket.ready_at(1, 0.5) == pytest.approx(0.51)
    # A request bigger than the bucket waits for a full bucket, then leaves a debt.
    big = TokenBucket(10.0, 1.0, now=0.0)
    big.take(10, 0.0)
    assert big.ready_at(25, 0.0) == pytest.approx(1.0)
    big.take(25, 1.0)
    assert big.ready_at(1, 1.0) == pytest.approx(2.6)


def test_vdi_qos_iops_with_a_burst(clock: FakeClock) -> None:
    core = Core(clock)
    core.set_qos({"capped": Qos(iops=100, burst=1.0)})
    served = run(core, clock, {"client:capped": 16}, seconds=10.0, service_s=0.001)
    # One second's burst, then 100 a second.
    assert 100 + 1000 * 0.97 <= served["client:capped"] <= 100 + 1000 * 1.02


def test_vdi_qos_bytes_per_second(clock: FakeClock) -> None:
    core = Core(clock)
    core.set_qos({"capped": Qos(bps=1 * MiB, burst=1.0)})
    served = run(core, clock, {"client:capped": 8}, seconds=10.0, service_s=0.001,
                 nbytes={"client:capped": 64 * KiB})
    assert 16 + 160 * 0.95 <= served["client:capped"] <= 16 + 160 * 1.05


def test_a_capped_vdi_does_not_slow_an_uncapped_one(clock: FakeClock) -> None:
    core = one_at_a_time(clock, {})
    core.set_qos({"capped": Qos(iops=10, burst=0.1)})
    solo = run(one_at_a_time(FakeClock(), {}), FakeClock(), {"client:free": 4}, seconds=5.0)
    served = run(core, clock, {"client:capped": 16, "client:free": 4}, seconds=5.0)
    assert served["client:capped"] <= 10 * 5 + 2
    # The capped one's waiting never idles the sheep: the free one gets all the rest.
    assert served["client:free"] + served["client:capped"] >= 0.98 * solo["client:free"]
    assert served["client:free"] >= 0.8 * solo["client:free"]


def test_clearing_qos_lifts_the_cap(clock: FakeClock) -> None:
    core = Core(clock)
    core.set_qos({"v": Qos(iops=10, burst=1.0)})
    assert run(core, clock, {"client:v": 8}, seconds=5.0, service_s=0.001)["client:v"] <= 61
    core.set_qos({})
    assert run(core, clock, {"client:v": 8}, seconds=1.0, service_s=0.001)["client:v"] >= 7000


def test_clients_never_wait_for_background_work_in_flight(clock: FakeClock) -> None:
    core = Core(clock, depth=8 * MiB)
    for _ in range(4):  # background fills the depth
        core.submit("recovery", 4 * MiB)
    assert core.background >= 8 * MiB or core.waiting_bg
    request = core.submit("client:vm", 4 * KiB)
    assert request.started
    assert core.submit(scheduler.CLIENT, 4 * KiB).started  # a replica's half of a write


def test_background_alone_fills_the_idle_depth_and_makes_way_once_a_client_comes(
        clock: FakeClock) -> None:
    # 4 MiB recovery copies: within the 8 MiB depth only one fits at a time (two cost
    # a little more than 8 MiB), which left recovery serial. With no client about,
    # the idle depth takes seven.
    core = Core(clock, depth=8 * MiB, idle_depth=32 * MiB)
    first = [core.submit("recovery", 4 * MiB) for _ in range(10)]
    assert sum(request.started for request in first) == 7
    # A client comes: background dispatched from now on stays within the depth.
    client = core.submit("client:vm", 4 * KiB)
    assert client.started
    for request in first[:7]:
        core.done("recovery", request)
    while isinstance(core.pop(), tuple):
        pass
    assert sum(request.started for request in first) == 8  # one at a time
    core.done("client:vm", client)
    # Still about: the client was seen less than client_quiet_s ago.
    clock.t += scheduler.client_quiet_s / 2
    core.done("recovery", first[7])
    while isinstance(core.pop(), tuple):
        pass
    assert sum(request.started for request in first) == 9
    # Quiet for client_quiet_s: the idle depth again.
    clock.t += scheduler.client_quiet_s
    while isinstance(core.pop(), tuple):
        pass
    assert sum(request.started for request in first) == 10


def test_background_gets_what_clients_leave_and_its_floor_when_they_leave_nothing(
        clock: FakeClock) -> None:
    # Depth of 16 small requests; 0.01 s each. Clients keeping 4 in flight leave room:
    # recovery fills it. Clients keeping the depth full leave none: recovery gets its
    # reservation (8 MiB/s here: two 4 MiB copies a second), never zero.
    depth = 16 * unit
    core = Core(clock, depth=depth)
    light = run(core, clock, {"client:vm": 4, "recovery": 16}, seconds=5.0,
                service_s={"client:vm": 0.01, "recovery": 0.01},
                nbytes={"recovery": 0})
    assert light["client:vm"] >= 0.95 * 4 * 100 * 5
    assert light["recovery"] >= 0.9 * 12 * 100 * 5  # the 12 slots clients left
    clock2 = FakeClock()
    core = Core(clock2, depth=depth)
    heavy = run(core, clock2, {"client:vm": 64, "recovery": 4}, seconds=10.0,
                service_s={"client:vm": 0.001, "recovery": 0.05},
                nbytes={"recovery": 4 * MiB})
    reservation = scheduler.DEFAULT_SPECS["recovery"].reservation
    floor = reservation / scheduler.cost(4 * MiB) * 10
    assert floor * 0.9 <= heavy["recovery"] <= floor * 1.3, (heavy, floor)
    assert heavy["client:vm"] > 10 * heavy["recovery"]


def test_every_background_class_progresses_under_saturating_clients(clock: FakeClock) -> None:
    core = Core(clock, depth=16 * unit)
    backlog = {"client:a": 64, "client:b": 64, **{name: 2 for name in scheduler.BACKGROUND}}
    served = run(core, clock, backlog, seconds=20.0, service_s=0.002,
                 nbytes={name: 1 * MiB for name in scheduler.BACKGROUND})
    for name in scheduler.BACKGROUND:
        floor = scheduler.DEFAULT_SPECS[name].reservation / scheduler.cost(1 * MiB) * 20
        assert served[name] >= 0.9 * floor, (name, served)


def test_depths_count_waiting_requests_by_class(clock: FakeClock) -> None:
    core = Core(clock, depth=unit)
    core.submit("client:a", 0)
    core.submit("client:a", 0)
    core.submit("client:b", 0)
    core.submit("recovery", 0)
    assert core.depths() == {"client": 2, "recovery": 1, "verify": 0, "scrub": 0,
                             "gc": 0, "drain": 0}


def test_the_asyncio_front_wakes_waiters_on_completion_and_on_time() -> None:
    async def main() -> tuple[list[str], float]:
        loop = asyncio.get_running_loop()
        sched = Scheduler(loop.time, depth=unit)
        sched.set_qos({"slow": Qos(iops=20, burst=0.05)})  # one at a time, 20 a second
        order: list[str] = []

        async def op(name: str, hold: float) -> None:
            request = await sched.start(name, 0)
            order.append(name)
            await asyncio.sleep(hold)
            sched.done(name, request)

        started = loop.time()
        await asyncio.gather(*(op("client:slow", 0) for _ in range(5)),
                             op("client:a", 0.01), op("client:a", 0.01))
        return order, loop.time() - started

    order, elapsed = asyncio.run(main())
    assert sorted(order) == ["client:a"] * 2 + ["client:slow"] * 5
    assert 0.18 <= elapsed <= 0.5  # four more slow ops at 20 a second after the first


def test_a_cancelled_waiter_leaves_no_trace() -> None:
    async def main() -> Scheduler:
        loop = asyncio.get_running_loop()
        sched = Scheduler(loop.time, depth=unit)
        first = await sched.start("client:a", 0)
        waiter = asyncio.ensure_future(sched.start("client:a", 0))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        sched.done("client:a", first)
        return sched

    sched = asyncio.run(main())
    assert sched.foreground == 0 and sched.waiting_fg == 0


def test_recovery_tuner_follows_client_latency_within_its_floor_and_cap() -> None:
    tuner = RecoveryTuner(floor=8 * MiB, start=32 * MiB, increase=1.5)
    ops, spent = 0, 0.0

    def tick(now: float, new_ops: int, latency_s: float, recovering: bool, cap: float = 0) -> float:
        nonlocal ops, spent
        ops += new_ops
        spent += new_ops * latency_s
        return tuner.tick(now, ops, spent, recovering, cap)

    # No recovery: the clients' latency is learnt as the baseline, no limit.
    assert tick(0.5, 100, 0.001, False) == 0 and tuner.reason == "idle"
    assert tuner.baseline == pytest.approx(0.001)
    # Recovering with no client I/O: no limit but the cap.
    assert tick(1.0, 0, 0, True) == 0 and "no client" in tuner.reason
    assert tick(1.5, 0, 0, True, cap=50 * MiB) == 50 * MiB and tuner.reason == "max-rate"
    # Clients slowed (5 ms > max(2 x 1 ms, 1 ms + 2 ms)): halve, down to the floor.
    tuner.rate = 0
    assert tick(2.0, 100, 0.005, True) == 16 * MiB
    assert "client latency 5.0 ms > 3.0 ms" in tuner.reason
    assert tick(2.5, 100, 0.005, True) == 8 * MiB
    assert tick(3.0, 100, 0.005, True) == 8 * MiB and "floor" in tuner.reason
    # Clients fast again: speed up, a step a tick, never past the cap.
    assert tick(3.5, 100, 0.0015, True) == 12 * MiB and "speeding up" in tuner.reason
    assert tick(4.0, 100, 0.0015, True) == 18 * MiB
    assert tick(4.5, 100, 0.0015, True, cap=20 * MiB) == 20 * MiB
    assert tuner.reason == "max-rate"
    assert tuner.due(5.0) and not tuner.due(4.7)


def test_fifo_mode_dispatches_everything_at_once(clock: FakeClock) -> None:
    core = Core(clock, depth=unit)
    core.fifo = True
    core.set_qos({"v": Qos(iops=1, burst=0.01)})
    assert all(core.submit("client:v", 0).started for _ in range(10))
    assert all(core.submit("recovery", 4 * MiB).started for _ in range(10))
    assert core.waiting_fg == core.waiting_bg == 0


def test_recovery_tuner_backs_off_when_client_throughput_drops() -> None:
    """On a shared box the sheep that serves the clients may be starved of CPU while
    this one's requests still look fast: fewer client requests a second than before
    the recovery count as held back."""
    tuner = RecoveryTuner(floor=8 * MiB, start=16 * MiB, increase=1.25)
    ops = 0

    def tick(now: float, per_tick: int, recovering: bool) -> float:
        nonlocal ops
        ops += per_tick
        return tuner.tick(now, ops, ops * 0.0001, recovering, 0)

    tick(0.5, 1000, False)
    tick(1.0, 1000, False)  # 2000 requests a second, as fast as ever
    assert tuner.baseline_ops == pytest.approx(2000)
    assert tick(1.5, 1000, True) == 20 * MiB  # the same rate: speeding up
    assert tick(2.0, 600, True) == 10 * MiB  # 1200/s < 0.7 x 2000/s: halve
    assert "client I/O at 1200/s" in tuner.reason
    assert tick(2.5, 900, True) == 12.5 * MiB  # 1800/s: fine again


def test_recovery_tuner_counts_only_the_client_requests_done_since_the_pass_began() -> None:
    """Client writes just before a pass (a VDI filled, then a node joins) say nothing
    of what recovery does to clients: they must not hold the pass to the start rate."""
    tuner = RecoveryTuner(floor=8 * MiB, start=16 * MiB, increase=1.25)
    assert tuner.tick(0.5, 1000, 1.0, False, 0) == 0
    tuner.began(0.9, 3000, 3.0)  # 2000 more requests done before the pass began
    assert tuner.tick(1.0, 3000, 3.0, True, 0) == 0  # none since: no limit
    assert "no client" in tuner.reason
    # Clients now, as fast and as many as before: the start rate, a step up.
    assert tuner.tick(1.5, 4000, 4.0, True, 0) == 20 * MiB
