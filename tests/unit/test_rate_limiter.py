"""The recovery rate limiter, on a fake clock: it paces to the rate, reads the rate
afresh on every call, and lets everything through at once when there is no limit."""

from __future__ import annotations

import asyncio

import pytest

from sheep.recovery import RateLimiter
from sheep.world import Clock


class FakeClock(Clock):
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_paces_to_the_rate(clock: FakeClock) -> None:
    limiter = RateLimiter(lambda: 1000, clock)

    async def main() -> None:
        for _ in range(10):
            await limiter.take(500)

    asyncio.run(main())
    # The first grant goes at once; the next nine wait 0.5 s each.
    assert clock.now == pytest.approx(104.5)


def test_no_limit_never_waits_and_a_new_rate_applies_at_once(clock: FakeClock) -> None:
    rate = {"value": 0}
    limiter = RateLimiter(lambda: rate["value"], clock)

    async def main() -> None:
        for _ in range(100):
            await limiter.take(1 << 20)
        assert clock.now == 100.0
        rate["value"] = 1 << 20
        await limiter.take(1 << 20)
        await limiter.take(1 << 20)
        assert clock.now == pytest.approx(101.0)
        rate["value"] = 0
        await limiter.take(1 << 30)
        assert clock.now == pytest.approx(101.0)

    asyncio.run(main())
