"""The session lease (sheep/lease.py) against a model of ZooKeeper's session
expiry: a sheep connected to a follower whose link to the leader dies at a random
moment. The follower touches the session when a request arrives and reports its
touches in its answers to the leader's pings (every tickTime/2 on the leader's
clock); the leader expires the session T after the last touch it knows of, on its
own clock. Whatever the timings, drifts and tickTime ZooKeeper allows, the sheep's
lease must run out before that expiry, measured in real time."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from sheep.lease import SessionLease, clock_drift, margin_s


@dataclass
class Run:
    timeout: float  # T, negotiated
    tick: float  # the ensemble's tickTime: T is between 2 and 20 ticks
    client_rate: float  # the sheep's clock: local = real * rate
    leader_rate: float  # the leader's clock
    phase: float  # of the leader's pings, in leader time
    ping_delays: list[float]  # delivery delay of each ping, up to the jitter
    sync_gaps: list[float]  # the sheep's syncs, real seconds apart
    arrive: list[float]  # each sync's delay to the follower
    back: list[float]  # each reply's delay back to the sheep
    dies_after: int  # the follower loses the leader just after this sync reaches it
    dies_later: float  # ... this much later


def fraction(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=low, max_value=high, allow_nan=False)


@st.composite
def runs(draw: st.DrawFn) -> Run:
    timeout = draw(fraction(0.5, 60.0))
    tick = timeout / draw(fraction(2.0, 20.0))
    count = draw(st.integers(1, 40))
    jitter = margin_s / (1 + clock_drift)
    return Run(
        timeout=timeout, tick=tick,
        client_rate=draw(fraction(1 - clock_drift, 1 + clock_drift)),
        leader_rate=draw(fraction(1 - clock_drift, 1 + clock_drift)),
        phase=draw(fraction(0.0, tick / 2)),
        ping_delays=draw(st.lists(fraction(0.0, jitter), min_size=1, max_size=50)),
        # Gaps around the lease's thresholds are the interesting ones.
        sync_gaps=draw(st.lists(st.one_of(
            st.sampled_from([0.001, 0.1, 0.125, 0.25, 0.3, 0.5, 0.6, 0.9, 1.0]).map(
                lambda share: share * timeout),
            fraction(0.0, timeout)), min_size=count, max_size=count)),
        arrive=draw(st.lists(fraction(0.0, timeout / 4), min_size=count, max_size=count)),
        back=draw(st.lists(fraction(0.0, timeout / 4), min_size=count, max_size=count)),
        dies_after=draw(st.integers(0, count - 1)),
        dies_later=draw(st.one_of(st.just(1e-6), fraction(0.0, timeout))),
    )


def simulate(run: Run) -> tuple[float | None, float]:
    """(the real time the sheep's lease runs out, the real time the leader could
    expire the session at the earliest)."""
    local = run.client_rate
    arrivals, sent = [], 0.0
    for gap, arrive in zip(run.sync_gaps, run.arrive, strict=True):
        sent += gap
        arrivals.append(sent + arrive)
    link_dies = arrivals[run.dies_after] + run.dies_later
    lease = SessionLease(run.timeout)
    lease.connected(0.0, 0.0)  # the handshake touched the session at the leader, at >= 0
    known = 0.0

    # The pings' arrivals at the follower, before the link dies: each answer carries
    # the touches the follower had until then.
    interval = run.tick / 2 / run.leader_rate
    pings = []
    index, at = 0, run.phase / run.leader_rate
    while at < link_dies + run.timeout:
        pings.append(at + run.ping_delays[index % len(run.ping_delays)])
        index, at = index + 1, at + interval
    answered_pings = [ping for ping in pings if ping < link_dies]

    sent, replies = 0.0, []
    last_reply = 0.0
    for gap, arrive, back in zip(run.sync_gaps, run.arrive, run.back, strict=True):
        sent += gap
        reached = sent + arrive  # the follower touches the session now
        if any(reached <= ping for ping in answered_pings):
            known = max(known, reached)
        if reached < link_dies:  # forwarded to the leader, answered
            last_reply = max(last_reply, reached + back)  # one connection: in order
            replies.append((sent, last_reply))
    for sent_at, reply_at in sorted(replies, key=lambda pair: pair[1]):
        lease.answered(sent_at * local, reply_at * local)
    assert lease.until is not None
    return lease.until / local, known + run.timeout / run.leader_rate


@settings(max_examples=1000, deadline=None)
@given(runs())
@example(Run(  # the follower's report of the first sync never reaches the leader
    timeout=8.0, tick=4.0, client_rate=1.0, leader_rate=1.0, phase=0.0, ping_delays=[0.0],
    sync_gaps=[6.05, 1.2], arrive=[0.0, 0.0], back=[0.05, 0.0], dies_after=1, dies_later=1e-6))
@example(Run(  # the same with the leader's clock slow and a late ping: tight
    timeout=60.0, tick=30.0, client_rate=1.0, leader_rate=1 - clock_drift, phase=0.0,
    ping_delays=[0.0, 0.0, 0.0, 0.0, 0.099], sync_gaps=[45.46, 15.03], arrive=[0.0, 0.0],
    back=[0.0, 0.0], dies_after=1, dies_later=1e-6))
@example(Run(  # one late sync after a long silence, with the leader's clock fast
    timeout=60.0, tick=30.0, client_rate=1.0, leader_rate=1 + clock_drift, phase=0.0,
    ping_delays=[0.0], sync_gaps=[36.0], arrive=[0.0], back=[0.0], dies_after=0,
    dies_later=1e-6))
def test_the_lease_runs_out_before_the_leader_can_expire_the_session(run: Run) -> None:
    fence, expiry = simulate(run)
    assert fence is not None and fence < expiry, (fence, expiry)


@settings(max_examples=300, deadline=None)
@given(runs())
def test_a_lease_never_reaches_past_half_the_timeout_after_the_last_exchange(run: Run) -> None:
    lease = SessionLease(run.timeout)
    lease.connected(5.0, 5.0)
    assert lease.until == pytest.approx(5.0 + run.timeout / 2)
    lease.answered(6.0, 6.01)
    assert lease.until is not None and lease.until <= 6.0 + run.timeout / 2 + 1e-9


def test_regular_renewals_keep_the_lease_at_half_the_timeout() -> None:
    """Renewals every T/10 that come back at once keep the lease about T/2 ahead,
    so a suspension (an election, a lost connection) is served through for T/2."""
    timeout = 6.0
    lease = SessionLease(timeout)
    lease.connected(0.0, 0.0)
    assert lease.lapses == 1  # it never held: the owner catches up first
    now = 0.0
    for _ in range(100):
        now += lease.renew_interval
        lease.answered(now, now + 0.002)
        assert lease.holds(now + 0.002) and lease.lapses == 1
    assert lease.until == pytest.approx(now + timeout / 2)
    # Silence (suspended): the lease holds for T/2 after the last exchange, no more.
    assert lease.holds(now + timeout / 2 - 0.01)
    assert not lease.holds(now + timeout / 2)
    assert lease.remaining(now + 1.0) == pytest.approx(timeout / 2 - 1.0)


def test_a_lease_renewed_after_it_ran_out_counts_a_lapse() -> None:
    lease = SessionLease(2.0)
    lease.connected(0.0, 0.0)
    assert lease.lapses == 1
    lease.answered(0.2, 0.21)
    assert lease.lapses == 1  # renewed while it held
    assert not lease.holds(1.5)
    lease.connected(1.5, 1.6)  # reconnected after it ran out
    assert lease.holds(1.6) and lease.lapses == 2


def test_a_slow_sync_proves_nothing_new_about_the_leader() -> None:
    """A reply that came back less than T/4 before the next sync was sent may not yet
    be known to the leader: the proven touch stays at the connect."""
    lease = SessionLease(8.0)
    lease.connected(0.0, 0.0)
    lease.answered(1.0, 1.1)
    lease.answered(2.0, 2.1)  # 1.1 > 2.0 - report_delay (2.1): not yet a proof
    assert lease.proven == 0.0
    lease.answered(3.5, 3.6)  # 1.1 <= 3.5 - 2.1: the sync sent at 1.0 is proven
    assert lease.proven == 1.0
    assert lease.until == pytest.approx(min(3.5 + 4.0, 1.0 + lease.after_touch))


@given(st.floats(min_value=0.5, max_value=600))
def test_the_bound_never_exceeds_the_timeout(timeout: float) -> None:
    lease = SessionLease(timeout)
    assume(lease.after_touch > 0)
    assert lease.after_touch < timeout / (1 + clock_drift)


def test_the_cap_bounds_the_lease_whatever_the_timeout() -> None:
    """A long session timeout gives no longer lease than the cap (the driver's: a
    cluster op's barrier stops waiting for a silent member after epoch_wait_ms)."""
    lease = SessionLease(60.0, cap=4.0)
    lease.connected(10.0, 10.0)
    assert lease.until == pytest.approx(14.0)
    lease.answered(11.0, 11.01)
    assert lease.until == pytest.approx(15.0)
    assert SessionLease(6.0, cap=4.0).timeout * 0.5 < 4.0  # the default T: T/2 binds


def test_a_new_lease_keeps_the_lapses_it_is_given() -> None:
    lease = SessionLease(6.0, lapses=3)
    lease.connected(0.0, 0.0)
    assert lease.lapses == 4  # the driver compares counts: a lapse is never forgotten
