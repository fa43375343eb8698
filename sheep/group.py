"""Membership as this sheep sees it: the applied cluster state and its rings.

Wraps the pure ClusterState with what the daemon needs around it: waiting for
an epoch to arrive, and the ring of any epoch (placement is a pure function of
an epoch's node list, so every sheep and client computes the same answer).
"""

from __future__ import annotations

import asyncio
import bisect
import functools

from sheep.cluster_state import ClusterState
from sheep.errors import NewNodeVersion, OldNodeVersion
from sheep.legacy_ring import VnodeRing
from sheep.node import NodeInfo
from sheep.oid import VDI_TYPES, oid_generation, oid_type
from sheep.ring import Ring
from sheep.world import Clock

_vdi_types = VDI_TYPES


class Group:
    def __init__(self, state: ClusterState, clock: Clock | None = None) -> None:
        self.state = state
        self.clock = clock or Clock()
        self._epoch_changed = asyncio.Event()
        self._vdi_view_seq = -1
        self._copies_by_generation: dict[int, int] = {}
        self._writable: set[int] = set()

    def _vdi_view(self) -> None:
        """Per-generation facts from the VDI registry, recomputed once per applied event."""
        if self._vdi_view_seq == self.state.seq:
            return
        self._copies_by_generation = self.state.vdis.copies_by_generation()
        self._writable = self.state.vdis.writable_generations()
        self._vdi_view_seq = self.state.seq

    def copies_for(self, oid: int) -> int:
        """How many copies an object keeps: the most any VDI that may reach its
        generation keeps, else the cluster's."""
        if oid_type(oid) in _vdi_types:
            self._vdi_view()
            copies = self._copies_by_generation.get(oid_generation(oid))
            if copies:
                return copies
        return self.state.copies

    def is_frozen(self, generation: int) -> bool:
        """A generation that no VDI writes any more (a snapshot, or gone)."""
        self._vdi_view()
        return generation not in self._writable

    def writable_object(self, oid: int) -> bool:
        """Stores accept changes to VDI objects of writable generations only."""
        return oid_type(oid) not in _vdi_types or not self.is_frozen(oid_generation(oid))

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
            await self.clock.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return self.state.epoch > epoch
        return True

    async def wait_epoch_reached(self, epoch: int, timeout_s: float) -> None:
        """Wait until the epoch is ``epoch`` or later; NewNodeVersion on timeout."""
        while self.state.epoch < epoch:
            if not await self.wait_epoch_after(self.state.epoch, timeout_s):
                raise NewNodeVersion(
                    f"request epoch {epoch} is newer than {self.state.epoch}; still waiting")

    async def check_epoch(self, epoch: int, timeout_s: float) -> None:
        """A peer request must carry our epoch: older is refused, newer is waited for."""
        while epoch != self.state.epoch:
            if epoch < self.state.epoch:
                raise OldNodeVersion(f"request epoch {epoch} is older than {self.state.epoch}")
            if not await self.wait_epoch_after(self.state.epoch, timeout_s):
                raise NewNodeVersion(
                    f"request epoch {epoch} is newer than {self.state.epoch}; still waiting")

    def ring(self, epoch: int | None = None) -> Ring | VnodeRing:
        return self._ring(self.state.epoch if epoch is None else epoch)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one Group per sheep, epochs are few
    def _ring(self, epoch: int) -> Ring | VnodeRing:
        if epoch == self.state.epoch:
            nodes = self.state.nodes
        else:
            past = self.state.epoch_nodes(epoch)
            nodes = past if past is not None else []
        if any(node.vnodes is not None for node in nodes):
            # Recorded before weights: placed as it was then, so the data is found
            # where that placement put it (until every member has joined anew).
            return VnodeRing(nodes)
        return Ring(nodes)

    def placement(self, oid: int, epoch: int | None = None,
                  copies: int | None = None) -> list[NodeInfo]:
        return self.ring(epoch).placement(oid, copies or self.copies_for(oid))

    def holders_away(self, oid: int, since: int, me: str) -> list[NodeInfo]:
        """The nodes other than me that the placement of oid named in any epoch from
        ``since`` on and that cannot be asked now: not members, and not declared lost.
        One of them may hold a copy newer than any a member has (sheep/replicas.py:
        verdict). Only epochs that name such a node cost a placement; epochs this sheep
        does not know (older than the snapshot it installed) name nobody."""
        state = self.state
        gone: dict[str, NodeInfo] = {}
        for entry in state.epochs[bisect.bisect_left(state.epochs, since,
                                                     key=lambda e: e.epoch):]:
            away = [node for node in entry.nodes if node.node_id != me
                    and node.node_id not in state.members and node.node_id not in state.lost]
            if not away:
                continue
            placed = {node.node_id for node in self.placement(oid, entry.epoch)}
            gone.update({node.node_id: node for node in away if node.node_id in placed})
        return [gone[node_id] for node_id in sorted(gone)]

    def past_epochs(self, limit: int) -> list[int]:
        """Up to ``limit`` earlier epochs, newest first."""
        return [entry.epoch for entry in reversed(self.state.epochs[:-1])][:limit]
