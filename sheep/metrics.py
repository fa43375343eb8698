"""What a sheep counts, for Prometheus (`sheep --metrics-port PORT`) and for
`dog node stat`.

The VDI I/O this sheep serves as a gateway is counted per VDI and operation
(read, write, discard, flush): operations, bytes and a latency histogram. The
rest is read from the sheep's state when scraped: whether it is up, what its
recovery has left and has moved, its store's space, and the damaged copies it
has found. Each sheep has a registry of its own (several sheep share a process
in the simulator). The counters are always kept (they cost a dictionary lookup
and three additions per operation); only the HTTP endpoint is optional.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Latency buckets (seconds): 50 us to 10 s; a healthy 4 KiB operation is 0.1 to 1 ms.
latency_buckets = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


@dataclass(slots=True)
class OpTotals:
    """One (VDI, operation)'s totals, also kept plainly for NODE_INFO."""

    ops: int = 0
    bytes: int = 0
    seconds: float = 0.0
    children: tuple[Any, ...] = field(default=(), repr=False)  # the Prometheus children


class Metrics:
    """The registry of one sheep. state() gives, when scraped, a dict with 'recovery'
    (Recoverer.status(), plus 'bytes_total'), 'usage' (Store.usage()) and
    'damaged_found' (copies found damaged since start)."""

    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["vdi", "op"]
        self._ops = Counter("sheepdog_vdi_ops", "VDI operations served by this sheep as a"
                            " gateway", labels, registry=self.registry)
        self._bytes = Counter("sheepdog_vdi_bytes", "Bytes of VDI operations served by this"
                              " sheep as a gateway", labels, registry=self.registry)
        self._latency = Histogram("sheepdog_vdi_latency_seconds", "Time to serve a VDI"
                                  " operation, from its arrival to its answer", labels,
                                  buckets=latency_buckets, registry=self.registry)
        self.registry.register(_StateCollector(state))
        self.totals: dict[tuple[str, str], OpTotals] = {}

    def observe(self, vdi: str, op: str, nbytes: int, seconds: float) -> None:
        totals = self.totals.get((vdi, op))
        if totals is None:
            children = (self._ops.labels(vdi, op), self._bytes.labels(vdi, op),
                        self._latency.labels(vdi, op))
            totals = self.totals[(vdi, op)] = OpTotals(children=children)
        totals.ops += 1
        totals.bytes += nbytes
        totals.seconds += seconds
        ops, nbytes_child, latency = totals.children
        ops.inc()
        if nbytes:
            nbytes_child.inc(nbytes)
        latency.observe(seconds)

    def by_op(self) -> dict[str, dict[str, float]]:
        """Totals per operation over every VDI, for NODE_INFO (dog node stat)."""
        result: dict[str, dict[str, float]] = {}
        for (_, op), totals in self.totals.items():
            entry = result.setdefault(op, {"ops": 0, "bytes": 0, "seconds": 0.0})
            entry["ops"] += totals.ops
            entry["bytes"] += totals.bytes
            entry["seconds"] += totals.seconds
        return result


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], dict[str, Any]]) -> None:
        self.state = state

    def describe(self) -> list[Metric]:
        return []  # read only when scraped: the sheep may not be built yet

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        yield GaugeMetricFamily("sheepdog_up", "1 while this sheep serves (joined, not"
                                " fenced, not stopping)", value=1 if state["up"] else 0)
        recovery = state.get("recovery") or {}
        # Of the running pass only (a pass that ended has nothing left to fetch: what it
        # wanted and found nothing to copy for counts as done, not as remaining).
        remaining = max(0, int(recovery.get("to_recover", 0)) - int(recovery.get("recovered", 0))
                        - int(recovery.get("skipped", 0)) - int(recovery.get("failed", 0))
                        ) if recovery.get("running") else 0
        yield GaugeMetricFamily("sheepdog_recovery_objects_remaining", "Objects the running"
                                " recovery pass has still to fetch, plus copies to verify",
                                value=remaining + int(recovery.get("unverified", 0)))
        yield CounterMetricFamily("sheepdog_recovery_bytes", "Bytes recovery fetched since"
                                  " this sheep started", value=int(recovery.get("bytes_total", 0)))
        usage = state.get("usage") or {}
        space = GaugeMetricFamily("sheepdog_store_bytes", "The store's space: used by objects,"
                                  " and the capacity (its weight)", labels=["kind"])
        space.add_metric(["used"], float(usage.get("used", 0)))
        space.add_metric(["capacity"], float(usage.get("capacity", 0)))
        yield space
        queues = GaugeMetricFamily("sheepdog_scheduler_queue_depth", "Requests waiting in the"
                                   " I/O scheduler, by class (client: every VDI's)",
                                   labels=["class"])
        for name, waiting in sorted((state.get("queues") or {}).items()):
            queues.add_metric([name], float(waiting))
        yield queues
        yield CounterMetricFamily("sheepdog_flushes", "Clients' flushes this sheep served (each"
                                  " a sync of its store) since it started",
                                  value=int(state.get("flushes", 0)))
        yield CounterMetricFamily("sheepdog_damaged_copies", "Copies found damaged (by a read"
                                  " or a scrub) since this sheep started",
                                  value=int(state.get("damaged_found", 0)))
