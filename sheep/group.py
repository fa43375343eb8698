"""Membership as this sheep sees it: the applied cluster state and its rings.

Wraps the pure ClusterState with what the daemon needs around it: waiting for
an epoch to arrive, and the ring of any epoch (placement is a pure function of
an epoch's node list, so every sheep and client computes the same answer).
"""

from __future__ import annotations

import asyncio
import functools

from sheep.cluster_state import ClusterState
from sheep.errors import NewNodeVersion, OldNodeVersion
from sheep.node import NodeInfo
from sheep.ring import Ring


class Group:
    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self._epoch_changed = asyncio.Event()

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def notify_epoch(self) -> None:
        """Wake everyone waiting for a new epoch (called after each epoch change)."""
        self._epoch_changed.set()
        self._epoch_changed = asyncio.Event()

    async def wait_epoch_after(self, epoch: int, timeout_s: float) -> bool:
        """Wait until the epoch moves past ``epoch``; False on timeout."""
        if self.state.epoch > epoch:
            return True
        event = self._epoch_changed
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return self.state.epoch > epoch
        return True

    async def check_epoch(self, epoch: int, timeout_s: float) -> None:
        """A peer request must carry our epoch: older is refused, newer is waited for."""
        while epoch != self.state.epoch:
            if epoch < self.state.epoch:
                raise OldNodeVersion(f"request epoch {epoch} is older than {self.state.epoch}")
            if not await self.wait_epoch_after(self.state.epoch, timeout_s):
                raise NewNodeVersion(
                    f"request epoch {epoch} is newer than {self.state.epoch}; still waiting")

    def ring(self, epoch: int | None = None) -> Ring:
        return self._ring(self.state.epoch if epoch is None else epoch)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Group per sheep, epochs are few
    def _ring(self, epoch: int) -> Ring:
        if epoch == self.state.epoch:
            nodes = self.state.nodes
        else:
            past = self.state.epoch_nodes(epoch)
            nodes = past if past is not None else []
        return Ring(nodes)

    def placement(self, oid: int, epoch: int | None = None) -> list[NodeInfo]:
        return self.ring(epoch).placement(oid, self.state.copies)

    def past_epochs(self, limit: int) -> list[int]:
        """Up to ``limit`` earlier epochs, newest first."""
        return [entry.epoch for entry in reversed(self.state.epochs[:-1])][:limit]
