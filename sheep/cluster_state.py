"""The cluster's deterministic state machine, sans-IO.

Every sheep feeds it the same events in the same order, from the cluster
driver's totally ordered log: joins, leaves and cluster operations. It holds
the membership, the epoch (bumped by every membership change), the epoch log
(epoch -> node list, so placement under any past epoch can be recomputed), the
nodes the operator declared lost, and the formatted parameters (copies, object
size).

``apply`` never raises for a bad operation: it returns an error result that the
sheep which broadcast the operation hands back to its client. It must not look
at clocks or randomness: times come inside the events.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sheep import auth, constants
from sheep.errors import Result
from sheep.node import NodeInfo
from sheep.vdi_registry import VdiRegistry, copies_problem

log = logging.getLogger(__name__)


class EventKind(enum.Enum):
    JOIN = "join"
    LEAVE = "leave"
    OP = "op"


@dataclass(frozen=True)
class Event:
    """One entry of the driver's ordered log."""

    seq: int
    kind: EventKind
    time: float
    node: NodeInfo | None = None  # JOIN
    node_id: str = ""  # LEAVE: who left; OP: who broadcast it
    reason: str = ""  # LEAVE: "leave" (graceful) or "dead"
    op_id: str = ""  # OP
    body: dict[str, Any] = field(default_factory=dict)  # OP

    def to_json(self) -> dict[str, Any]:
        value: dict[str, Any] = {"seq": self.seq, "kind": self.kind.value, "time": self.time}
        if self.node is not None:
            value["node"] = self.node.to_json()
        for name in ("node_id", "reason", "op_id"):
            if getattr(self, name):
                value[name] = getattr(self, name)
        if self.body:
            value["body"] = self.body
        return value

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Event:
        node = value.get("node")
        return cls(
            seq=int(value["seq"]), kind=EventKind(value["kind"]), time=float(value["time"]),
            node=None if node is None else NodeInfo.from_json(node),
            node_id=str(value.get("node_id", "")), reason=str(value.get("reason", "")),
            op_id=str(value.get("op_id", "")), body=dict(value.get("body", {})))


class Status(enum.Enum):
    WAIT_FOR_FORMAT = "wait_for_format"
    OK = "ok"
    SHUTDOWN = "shutdown"


@dataclass
class EpochEntry:
    epoch: int
    time: float
    nodes: list[NodeInfo]

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "time": self.time, "nodes": [n.to_json() for n in self.nodes]}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> EpochEntry:
        return cls(epoch=int(value["epoch"]), time=float(value["time"]),
                   nodes=[NodeInfo.from_json(n) for n in value["nodes"]])


@dataclass
class ApplyResult:
    """What applying one event did: its answer, and effects for the daemon to carry out."""

    result: Result = Result.SUCCESS
    message: str = ""
    value: dict[str, Any] = field(default_factory=dict)
    epoch_changed: bool = False
    wipe_store: bool = False
    shutdown: bool = False
    cut: str = ""  # a principal whose connections must close (removed, or a new key)
    mode_changed: bool = False  # frames are now encrypted, or no longer: reconnect


def _error(result: Result, message: str) -> ApplyResult:
    return ApplyResult(result=result, message=message)


def _some(names: list[str], shown: int = 5) -> str:
    """A few names for a message: each quoted and cut short, and how many more."""
    text = ", ".join(repr(name[:80]) for name in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


class ClusterState:
    def __init__(self) -> None:
        self.seq = 0
        self.epoch = 0
        self.members: dict[str, NodeInfo] = {}
        self.epochs: list[EpochEntry] = []
        self.status = Status.WAIT_FOR_FORMAT
        self.copies = 0
        self.object_size = 0
        self.format_time = 0.0
        self.format_epoch = 0
        self.waiting_for: list[str] = []  # after a shutdown: the last epoch's nodes
        # Members before the current run of consecutive leaves: if the run empties the
        # cluster (every sheep died), these are the nodes its restart must wait for.
        self.leave_run: list[str] = []
        # Nodes the operator gave up on ('dog cluster recover force'): gone for good, so
        # nothing waits for the copies they may hold (Recovery, Gateway._read_newest). A
        # node that joins again is no longer lost.
        self.lost: set[str] = set()
        self.recovery_max_rate = 0  # bytes/s each sheep may fetch when recovering; 0: no limit
        self.scrub_max_rate = constants.scrub_rate_default  # bytes/s of background scrub; 0: off
        self.scrub_interval = constants.scrub_interval_default_s  # from one pass to the next
        self.vdis = VdiRegistry()
        # Principals other than the node (sheep/auth.py): made by format and 'dog auth'.
        self.principals: dict[str, auth.Entry] = {}
        self.encrypt = False  # frames are encrypted, not only signed ('format --encrypt')
        # Weights set by 'dog node weight' (node id -> bytes): they outlive the node's
        # restarts; 'dog cluster reweight' clears them (back to each node's capacity).
        self.weights: dict[str, int] = {}
        self._ops: dict[str, Callable[[Event], ApplyResult]] = {
            "format": self._apply_format,
            "shutdown": self._apply_shutdown,
            "force_recover": self._apply_force_recover,
            "recovery": self._apply_recovery,
            "scrub": self._apply_scrub,
            "reweight": self._apply_reweight,
            "copies": self._apply_copies,
            "auth_add": self._apply_auth,
            "auth_rm": self._apply_auth,
            "auth_rotate": self._apply_auth,
        }
        for kind in self.vdis.ops:
            self._ops[kind] = self._apply_vdi_op

    # --- queries ---------------------------------------------------------

    @property
    def nodes(self) -> list[NodeInfo]:
        """Members in a canonical order (by node id)."""
        return [self.members[node_id] for node_id in sorted(self.members)]

    @property
    def zones(self) -> int:
        """Hosts (zones) that can hold copies: those of members with weight (as in the
        ring). Copies of an object are on distinct hosts."""
        return _zones(self.members.values())

    @property
    def racks(self) -> int:
        """Racks that can hold copies (a host without a rack is its own)."""
        return _racks(self.members.values())

    @property
    def copies_max(self) -> int:
        """The most copies any object keeps: the cluster's, or a VDI's own."""
        return max([self.copies, *(vdi.copies for vdi in self.vdis.vdis.values())])

    def missing(self) -> list[str]:
        """Nodes the epoch log names that are neither members nor declared lost."""
        named = {node.node_id for entry in self.epochs for node in entry.nodes}
        return sorted(named - set(self.members) - self.lost)

    def epoch_nodes(self, epoch: int) -> list[NodeInfo] | None:
        for entry in reversed(self.epochs):
            if entry.epoch == epoch:
                return entry.nodes
            if entry.epoch < epoch:
                break
        return None

    # --- the one way in ----------------------------------------------------

    def apply(self, event: Event) -> ApplyResult:
        assert event.seq > self.seq, f"event {event.seq} applied after {self.seq}"
        self.seq = event.seq
        if event.kind is not EventKind.LEAVE:
            self.leave_run = []
        if event.kind is EventKind.JOIN:
            result = self._apply_join(event)
        elif event.kind is EventKind.LEAVE:
            result = self._apply_leave(event)
        else:
            handler = self._ops.get(str(event.body.get("type")))
            if handler is None:
                result = _error(Result.UNKNOWN_OP, f"unknown cluster op {event.body.get('type')!r}")
            else:
                result = handler(event)
        self._check()
        return result

    def _new_epoch(self, event: Event) -> None:
        self.epoch += 1
        self.epochs.append(EpochEntry(self.epoch, event.time, self.nodes))

    def _apply_join(self, event: Event) -> ApplyResult:
        assert event.node is not None
        node = event.node
        if node.node_id in self.weights:  # set by 'dog node weight': it stays
            node = dataclasses.replace(node, weight=self.weights[node.node_id])
        if node.node_id in self.members and self.members[node.node_id] == node:
            return ApplyResult()  # a duplicate join changes nothing
        self.members[node.node_id] = node
        self.lost.discard(event.node.node_id)  # back: what it holds counts again
        self._new_epoch(event)
        if self.status is Status.SHUTDOWN and set(self.waiting_for) <= set(self.members):
            self.status = Status.OK  # every node of the last epoch is back
            self.waiting_for = []
        return ApplyResult(epoch_changed=True)

    def _apply_leave(self, event: Event) -> ApplyResult:
        if event.node_id not in self.members:
            return ApplyResult()
        if not self.leave_run:
            self.leave_run = sorted(self.members)
        del self.members[event.node_id]
        self._new_epoch(event)
        released = self.vdis.release_node(event.node_id)
        if not self.members and self.status is Status.OK:
            # Every sheep is gone, shut down or not: as after a shutdown, the cluster
            # waits for the nodes that were members last, since only they are sure to
            # hold every acknowledged write.
            self.status = Status.SHUTDOWN
            self.waiting_for = list(self.leave_run)
        return ApplyResult(epoch_changed=True, value={"released": released})

    def _apply_format(self, event: Event) -> ApplyResult:
        body = event.body
        copies = body.get("copies")
        object_size = body.get("object_size")
        problem = format_problem(copies, object_size, self.zones, self.racks)
        if problem is not None:
            return _error(*problem)
        if self.status is not Status.WAIT_FOR_FORMAT and not body.get("force"):
            return _error(Result.ALREADY_FORMATTED,
                          "the cluster is already formatted (use --force to erase it)")
        self.status = Status.OK
        self.copies = int(copies)  # type: ignore[arg-type]
        self.object_size = int(object_size)  # type: ignore[arg-type]
        self.format_time = event.time
        self.format_epoch = self.epoch
        self.waiting_for = []
        self.vdis = VdiRegistry()
        encrypt = self.encrypt
        self.encrypt = body.get("encrypt") is True
        self.principals = _principals(body.get("principals"))
        return ApplyResult(wipe_store=True, mode_changed=encrypt != self.encrypt,
                           value={"copies": self.copies,
                                                   "object_size": self.object_size})

    def _apply_auth(self, event: Event) -> ApplyResult:
        """auth_add {name, caps, key}, auth_rm {name}, auth_rotate {name, key}."""
        body = event.body
        kind, name = body.get("type"), body.get("name")
        if self.status is Status.WAIT_FOR_FORMAT:
            return _error(Result.NOT_FORMATTED, "the cluster is not formatted")
        if not isinstance(name, str) or auth.name_problem(name) is not None or name == auth.NODE:
            return _error(Result.INVALID_PARMS, f"bad principal name {str(name)[:80]!r}")
        if kind == "auth_add" and name in self.principals:
            return _error(Result.EXISTS, f"principal {name} exists ('dog auth rotate' gives it"
                          " a new key)")
        if kind != "auth_add" and name not in self.principals:
            return _error(Result.NO_OBJ, f"no principal {name}")
        if kind == "auth_rm":
            del self.principals[name]
            return ApplyResult(cut=name)
        try:
            key = auth.decode_key(body.get("key"))
            caps = (auth.Caps.parse(body.get("caps")) if kind == "auth_add"
                    else self.principals[name].caps)
        except ValueError as error:
            return _error(Result.INVALID_PARMS, str(error))
        self.principals[name] = auth.Entry(key, caps)
        return ApplyResult(cut=name if kind == "auth_rotate" else "")

    def _apply_shutdown(self, event: Event) -> ApplyResult:
        """Every sheep stops. When they come back, the cluster serves again only once
        all of them are back (Sheepdog's rule): a part of it could serve old copies
        as current, or miss objects that live on the others."""
        if self.status is Status.OK:
            self.status = Status.SHUTDOWN
            self.waiting_for = sorted(self.members)
        return ApplyResult(shutdown=True)

    def _apply_force_recover(self, event: Event) -> ApplyResult:
        """The operator gives up on nodes that are not members: they are lost, gone for
        good. After a shutdown, or once every sheep died, the cluster serves again when
        none of its last epoch's nodes is still missing; at any time, an object whose
        newest copy may be on a missing node stops waiting for it. ``nodes`` names the
        ones to give up; without it, every node the epoch log names that is missing."""
        named = event.body.get("nodes")
        known = {node.node_id for entry in self.epochs for node in entry.nodes}
        if named is None:
            lost = self.missing()
        elif (not isinstance(named, list) or len(named) > constants.node_ids_per_cluster_max
              or not all(isinstance(node_id, str) for node_id in named)):
            return _error(Result.INVALID_PARMS, f"nodes must be a list of at most"
                                                f" {constants.node_ids_per_cluster_max} node ids")
        else:
            unknown = [node_id for node_id in named if node_id not in known]
            members = [node_id for node_id in named if node_id in self.members]
            if unknown or members:
                return _error(Result.INVALID_PARMS, (
                    f"not a node of the epoch log: {_some(unknown)}" if unknown else
                    f"a member, not missing: {_some(members)}"))
            lost = sorted(set(named) - self.lost)
        if not lost and self.status is not Status.SHUTDOWN:
            return _error(Result.INVALID_PARMS, "no node is missing: there is nothing to give up")
        self.lost.update(lost)
        given_up: list[str] = []
        missing = [node_id for node_id in self.waiting_for if node_id not in self.members]
        if self.status is Status.SHUTDOWN and set(missing) <= self.lost:
            self.status = Status.OK
            given_up = missing
            self.waiting_for = []
        return ApplyResult(value={"given_up": given_up, "lost": lost})

    def _apply_recovery(self, event: Event) -> ApplyResult:
        """Recovery settings for every sheep: max_rate in bytes/s (0: no limit)."""
        rate = event.body.get("max_rate")
        if not isinstance(rate, int) or isinstance(rate, bool) or rate < 0:
            return _error(Result.INVALID_PARMS,
                          f"max_rate must be a number of bytes per second >= 0, not {rate!r}")
        self.recovery_max_rate = rate
        return ApplyResult(value={"max_rate": rate})

    def _apply_copies(self, event: Event) -> ApplyResult:
        """dog cluster alter-copy: the default copies, for the cluster's own objects and
        every VDI that has no number of its own (recovery adds or drops copies)."""
        if self.status is not Status.OK:
            return _error(Result.NOT_FORMATTED if self.status is Status.WAIT_FOR_FORMAT
                          else Result.UNAVAILABLE, "the cluster is not serving")
        copies = event.body.get("copies")
        problem = copies_problem(copies, self.zones, self.racks)
        if problem:
            return _error(*problem)
        assert isinstance(copies, int)
        before, self.copies = self.copies, copies
        changed = self.vdis.follow_cluster_copies(before, copies)
        return ApplyResult(value={"copies": copies, "before": before, "vdis": changed})

    def _apply_scrub(self, event: Event) -> ApplyResult:
        """Background scrub settings: max_rate in bytes/s (0: off), interval in seconds
        from the end of one pass to the next; either may be left out."""
        rate = event.body.get("max_rate", self.scrub_max_rate)
        interval = event.body.get("interval", self.scrub_interval)
        for name, value in (("max_rate", rate), ("interval", interval)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                return _error(Result.INVALID_PARMS,
                              f"{name} must be a whole number >= 0, not {value!r}")
        self.scrub_max_rate, self.scrub_interval = rate, interval
        return ApplyResult(value={"max_rate": rate, "interval": interval})

    def _apply_reweight(self, event: Event) -> ApplyResult:
        """Give a member another weight (bytes), or with "weight" None its capacity back.
        Zero drains it: placement gives it nothing, recovery moves its copies to the
        others, and it keeps serving as a gateway (and as a source for recovery) until
        it leaves. A weight set here outlives the node's restarts."""
        node_id, weight = event.body.get("node_id"), event.body.get("weight")
        node = self.members.get(str(node_id))
        if node is None:
            return _error(Result.INVALID_PARMS, f"node {node_id} is not a member")
        if "weight" not in event.body:  # e.g. an older dog's {"vnodes": 0}: never a reset
            return _error(Result.INVALID_PARMS,
                          "reweight takes a weight in bytes, or null for the node's own")
        if weight is not None and (not isinstance(weight, int) or isinstance(weight, bool)
                                   or not 0 <= weight <= constants.weight_max_bytes):
            return _error(Result.INVALID_PARMS,
                          f"weight must be a whole number of bytes from 0 to 1 EiB"
                          f" ({constants.weight_max_bytes}), not {weight!r}")
        new_weight = node.base_weight if weight is None else weight
        value = {"node_id": node.node_id, "weight": new_weight, "before": node.weight}
        changed = dataclasses.replace(node, weight=new_weight)
        if self.status is not Status.WAIT_FOR_FORMAT and changed.weight == 0:
            hosts = _zones([changed if n.node_id == node.node_id else n
                            for n in self.members.values()])
            if hosts < self.copies_max:
                return _error(Result.TOO_FEW_ZONES, (
                    f"without node {node.node_id} only {hosts} host(s) could hold copies,"
                    f" fewer than the {self.copies_max} copies objects keep"))
        if weight is None:
            self.weights.pop(node.node_id, None)
        else:
            self.weights[node.node_id] = weight
        if changed == node:
            return ApplyResult(value=value)
        self.members[node.node_id] = changed
        self._new_epoch(event)
        return ApplyResult(epoch_changed=True, value=value)

    def _apply_vdi_op(self, event: Event) -> ApplyResult:
        if self.status is Status.SHUTDOWN:
            return _error(Result.UNAVAILABLE, self.waiting_message())
        if self.status is not Status.OK:
            return _error(Result.NOT_FORMATTED,
                          "the cluster is not formatted (run 'dog cluster format')")
        outcome = self.vdis.apply(str(event.body["type"]), event.body, event.time, self.copies,
                                  self.object_size, self.zones)
        return ApplyResult(result=outcome.result, message=outcome.message, value=outcome.value)

    def waiting_message(self) -> str:
        missing = [node_id for node_id in self.waiting_for if node_id not in self.members]
        return (f"the cluster is waiting for {len(missing)} node(s) of its last epoch to come "
                f"back: {', '.join(missing)} ('dog cluster recover force' goes on without them)")

    # --- persistence -------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """Everything but the epoch log, which is persisted entry by entry."""
        return {
            "seq": self.seq, "epoch": self.epoch,
            "members": [node.to_json() for node in self.nodes],
            "status": self.status.value, "copies": self.copies,
            "object_size": self.object_size, "format_time": self.format_time,
            "format_epoch": self.format_epoch, "vdis": self.vdis.to_json(),
            "waiting_for": list(self.waiting_for), "leave_run": list(self.leave_run),
            "lost": sorted(self.lost),
            "recovery_max_rate": self.recovery_max_rate,
            "scrub_max_rate": self.scrub_max_rate, "scrub_interval": self.scrub_interval,
            "encrypt": self.encrypt,
            "weights": dict(sorted(self.weights.items())),
            "principals": [{"name": name, "key": auth.encode_key(entry.key),
                            "caps": entry.caps.text()}
                           for name, entry in sorted(self.principals.items())],
        }

    @classmethod
    def from_json(cls, value: dict[str, Any], epochs: list[dict[str, Any]]) -> ClusterState:
        state = cls()
        state.seq = int(value["seq"])
        state.epoch = int(value["epoch"])
        state.members = {n["node_id"]: NodeInfo.from_json(n) for n in value["members"]}
        state.status = Status(value["status"])
        state.copies = int(value["copies"])
        state.object_size = int(value["object_size"])
        state.format_time = float(value["format_time"])
        state.format_epoch = int(value["format_epoch"])
        if "vdis" in value:
            state.vdis = VdiRegistry.from_json(value["vdis"])
        state.waiting_for = [str(node_id) for node_id in value.get("waiting_for", [])]
        state.leave_run = [str(node_id) for node_id in value.get("leave_run", [])]
        state.lost = {str(node_id) for node_id in value.get("lost", [])}
        state.recovery_max_rate = int(value.get("recovery_max_rate", 0))
        state.scrub_max_rate = int(value.get("scrub_max_rate", constants.scrub_rate_default))
        state.scrub_interval = int(value.get("scrub_interval",
                                             constants.scrub_interval_default_s))
        state.encrypt = value.get("encrypt") is True
        state.weights = {str(node_id): int(weight)
                         for node_id, weight in (value.get("weights") or {}).items()}
        state.principals = _principals(value.get("principals"))
        state.epochs = sorted((EpochEntry.from_json(e) for e in epochs), key=lambda e: e.epoch)
        state._check()
        return state

    def _check(self) -> None:
        assert self.seq >= 0 and self.epoch >= 0
        assert all(node_id == node.node_id for node_id, node in self.members.items())
        if self.epochs:
            assert self.epochs[-1].epoch == self.epoch
            assert {n.node_id for n in self.epochs[-1].nodes} == set(self.members)
        assert not self.waiting_for or self.status is Status.SHUTDOWN
        assert not self.lost & set(self.members), "a member is never lost"
        if self.status in (Status.OK, Status.SHUTDOWN):
            assert 1 <= self.copies <= constants.copies_max
            assert constants.object_size_min_bytes <= self.object_size
            assert self.object_size <= constants.object_size_max_bytes


def _principals(value: Any) -> dict[str, auth.Entry]:
    """Principals from their JSON form; malformed entries are skipped (they came through
    the sheep's own checks, so none should be)."""
    principals: dict[str, auth.Entry] = {}
    for item in value if isinstance(value, list) else []:
        try:
            if auth.name_problem(item["name"]) is None and item["name"] != auth.NODE:
                principals[item["name"]] = auth.Entry(auth.decode_key(item["key"]),
                                                      auth.Caps.parse(item["caps"]))
        except (KeyError, TypeError, ValueError):
            log.error("skipping a malformed principal in the cluster state")
    return principals


def _zones(nodes: Iterable[NodeInfo]) -> int:
    return len({node.zone for node in nodes if node.weight > 0})


def _racks(nodes: Iterable[NodeInfo]) -> int:
    from sheep.ring import rack_key

    return len({rack_key(node) for node in nodes if node.weight > 0})


def format_problem(copies: Any, object_size: Any, zones: int,
                   racks: int | None = None) -> tuple[Result, str] | None:
    """Why a format with these parameters must be refused, or None."""
    if (not isinstance(copies, int) or isinstance(copies, bool)
            or not 1 <= copies <= constants.copies_max):
        return Result.INVALID_PARMS, f"copies must be 1 to {constants.copies_max}, not {copies!r}"
    if (not isinstance(object_size, int) or isinstance(object_size, bool)
            or object_size & (object_size - 1)
            or not constants.object_size_min_bytes <= object_size
            <= constants.object_size_max_bytes):
        return Result.INVALID_PARMS, (
            f"object size must be a power of two from {constants.object_size_min_bytes >> 20} MiB"
            f" to {constants.object_size_max_bytes >> 20} MiB, not {object_size!r}")
    return copies_problem(copies, zones, racks)
