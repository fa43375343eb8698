"""Background work keyed by object: at most one task per key at a time (a repair,
a partial copy's fill), kept referenced until done so the loop cannot drop it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any


class PerKey:
    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[None]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._running

    def start(self, key: Hashable, work: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Run work() for key unless a task for key is running; whether it started."""
        if key in self._running:
            return False
        task = asyncio.get_running_loop().create_task(work())
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))
        return True

    async def cancel(self) -> None:
        """Cancel every task and wait for them to end."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
