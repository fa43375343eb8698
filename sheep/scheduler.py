"""The asyncio front of the sheep's one I/O scheduler (the pure core and its
rules are in sheep/mclock.py): work waits in it for its turn, and waiters are
woken by completions and by a timer for the next tag or bucket that comes due."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable

from sheep.mclock import (
    BACKGROUND,
    CLIENT,
    DEFAULT_SPECS,
    ClassSpec,
    Core,
    Qos,
    RecoveryTuner,
    TokenBucket,
    cost,
    depth_bytes,
)
from sheep.mclock import _Request as Request

__all__ = ["BACKGROUND", "CLIENT", "DEFAULT_SPECS", "ClassSpec", "Core", "Qos", "RecoveryTuner",
           "Request", "Scheduler", "TokenBucket", "cost"]


class Scheduler(Core):
    """The asyncio front: ``request = await start(name, nbytes)`` ... ``done(name,
    request)``. Waiters are woken by completions and by a timer for the next tag
    or bucket that comes due."""

    def __init__(self, now: Callable[[], float], depth: int = depth_bytes,
                 specs: dict[str, ClassSpec] | None = None) -> None:
        super().__init__(now, depth, specs)
        self._timer: asyncio.TimerHandle | None = None
        self._source: TokenBucket | None = None
        self._timer_at = math.inf

    async def start(self, name: str, nbytes: int) -> Request:
        request = self.submit(name, nbytes)
        if request.started:
            return request
        request.future = asyncio.get_running_loop().create_future()
        self._wake()
        try:
            await request.future
        except asyncio.CancelledError:
            if request.started:
                self.done(name, request)  # dispatched as it was cancelled: give it back
            else:
                self.cancel(name, request)
                self._wake()
            raise
        return request

    async def pace_source(self, nbytes: int) -> None:
        """The source side of a recovery copy, paced at this sheep's own recovery rate
        (what its clients' latency allows, RecoveryTuner): a sheep busy serving clients
        does not also feed the others' recovery at full speed. A token bucket only, no
        room in the depth: waiting here always ends, so two sheep copying from each
        other cannot deadlock."""
        rate = self.limits.get("recovery", 0.0)
        if self.fifo or rate <= 0:
            return
        now = self.now()
        if self._source is None or self._source.rate != rate:
            self._source = TokenBucket(rate, 0.1, now)
        amount = cost(nbytes)
        ready = self._source.ready_at(amount, now)
        self._source.take(amount, max(now, ready))
        if ready > now:
            await asyncio.sleep(ready - now)

    @contextlib.asynccontextmanager
    async def running(self, name: str, nbytes: int) -> AsyncIterator[None]:
        """Background work as one request of its class: waits its turn, then runs."""
        request = await self.start(name, nbytes)
        try:
            yield
        finally:
            self.done(name, request)

    def done(self, name: str, request: Request) -> None:
        super().done(name, request)
        if self.waiting_fg or self.waiting_bg:
            self._wake()

    def _wake(self) -> None:
        while True:
            picked = self.pop()
            if isinstance(picked, tuple):
                _, request = picked
                if request.future is not None and not request.future.done():
                    request.future.set_result(None)
                continue
            if picked is not None:
                self._arm(picked)
            return

    def _arm(self, when: float) -> None:
        if self._timer is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = when
        self._timer = loop.call_later(max(0.0, when - self.now()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._wake()
