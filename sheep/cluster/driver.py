"""The cluster driver interface.

A driver gives every sheep the same totally ordered stream of events: joins,
leaves (graceful or detected deaths) and broadcast operations, each numbered
by a sequence number that increases by one per event. The state machine in
sheep/cluster_state.py consumes the stream and knows nothing of the driver.

A driver must:
- deliver every event with seq > from_seq, in order, to ``events``;
- include this sheep's own join, so the sheep knows when it is a member;
- notice a member's death (SIGKILL included) and log a leave for it;
- make ``broadcast`` append to the same log everyone reads.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sheep.cluster_state import Event
from sheep.errors import UsageError
from sheep.node import NodeInfo


@dataclass(frozen=True)
class Snapshot:
    """The cluster state at log position seq, for a sheep whose position is older
    than the oldest entry a driver still keeps (its log was trimmed)."""

    seq: int
    state: dict[str, Any]
    epochs: list[dict[str, Any]] = field(default_factory=list)


history_unknown = 1 << 62  # ClusterDriver.history_seq before join() knows it


class ClusterDriver(abc.ABC):
    name = "driver"
    can_fence = False  # whether fenced may ever be true

    def __init__(self) -> None:
        self.events: asyncio.Queue[Event | Snapshot] = asyncio.Queue()
        # Set by the sheep: its applied log position, and its state for snapshots.
        self.applied_seq: Callable[[], int] = lambda: 0
        self.snapshot_source: Callable[[], Snapshot] | None = None
        # Set by sheep's main: what a driver that cannot reach its service yet says
        # to the operator's terminal (a daemon's parent prints it), from any thread.
        self.notice: Callable[[str], None] = lambda text: None
        # The log's last position before this incarnation's join, set by join() before
        # it logs the join: events up to it are history, replayed to build the state,
        # not addressed to this sheep (an earlier incarnation's join, a shutdown that
        # stopped the cluster it was in). Until join() sets it, everything is history.
        self.history_seq = history_unknown

    @abc.abstractmethod
    async def join(self, node: NodeInfo, from_seq: int) -> None:
        """Become a member; deliver events after from_seq (own join included)."""

    @abc.abstractmethod
    async def broadcast(self, op_id: str, body: dict[str, Any]) -> None:
        """Append an operation to the ordered log."""

    @abc.abstractmethod
    async def leave(self) -> None:
        """Leave the cluster gracefully; the others see a leave event."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop, without logging a leave (the others will see a death)."""

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """A description for dog cluster info."""

    @property
    def fenced(self) -> bool:
        """True while this sheep may have been declared dead by the others (it lost
        its coordination service): it must not serve I/O then."""
        return False


def default_local_directory() -> str:
    import os
    import tempfile

    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = runtime if runtime and os.access(runtime, os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"sheepdog-{os.getuid()}", "cluster")


def make_driver(spec: str, secret: bytes | None = None) -> ClusterDriver:
    """Build a driver from '-c local[:PATH]' or '-c zookeeper:HOST:PORT[,...][/PREFIX]'.
    secret is the cluster's node key: the ZooKeeper driver guards its znodes with
    an ACL derived from it; the local driver (a directory's permissions) ignores it."""
    name, _, argument = spec.partition(":")
    if name == "local":
        from sheep.cluster.local import LocalDriver

        return LocalDriver(argument or default_local_directory())
    if name in ("zookeeper", "zk"):
        from sheep.cluster.zookeeper import make_zookeeper_driver

        return make_zookeeper_driver(argument, secret=secret)
    raise UsageError(f"unknown cluster driver {name!r} (known: local, zookeeper)")
