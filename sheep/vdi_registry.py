"""VDI metadata in the cluster state machine, sans-IO.

Every sheep holds the whole registry, applied from the ordered log and
persisted with the rest of the cluster state, so VDI metadata survives the
loss of all but one node and a full cluster restart.

A VDI is a name, an id, a size, a current writable Root (sheep/radix.py) and
a list of snapshots, each a frozen Root with a tag, an id and a time. Ids of
VDIs and snapshots come from one counter; generations from another. Snapshot,
clone and rollback give a VDI a fresh generation whose tree starts from a
frozen root node: O(1), no data moves. The generations that are some VDI's
current one are the writable generations; stores refuse writes to any other.

A tree reaches objects of its own generation and of the frozen ones it started
from, so each root carries its lineage: those earlier generations, newest
first. A deleted snapshot's generation lives on in the lineage of the trees
that still share its objects, and keeps their copies (copies_by_generation).

The handlers validate everything and answer errors as results; they never
raise for bad input. The gateway resolves the I/O facts an op needs (which
root node is in effect) before broadcasting it, so applying stays pure.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sheep import constants, radix
from sheep.errors import Result
from sheep.mclock import Qos, burst_default_s
from sheep.oid import GENERATION_MAX
from sheep.radix import Root
from sheep.size import format_size

name_max_chars = 256
attr_key_max_chars = 256
attr_value_max_bytes = 64 * 1024
attrs_per_vdi_max = 1024
_name_pattern = re.compile(r"^[A-Za-z0-9._-]+$")
snapshot_id_max_digits = 20  # ids count up from 1 in a u64 at most


qos_iops_max = 10**9
qos_bps_max = 1 << 50
qos_burst_min_s = 0.01
qos_burst_max_s = 3600.0
qos_burst_default_s = burst_default_s

def name_problem(name: Any, what: str = "VDI name") -> str | None:
    if not isinstance(name, str) or not name:
        return f"{what} must not be empty"
    if len(name) > name_max_chars:
        return f"{what} is longer than {name_max_chars} characters"
    if not _name_pattern.match(name) or ".." in name:
        return (f"{what} {name!r} may hold only letters, digits, '-', '_' and '.' (not"
                " '..')")
    return None


def copies_problem(copies: Any, zones: int, racks: int | None = None
                   ) -> tuple[Result, str] | None:
    """Why objects cannot keep this many copies in a cluster of these hosts (zones) and
    racks. Copies go to distinct racks when there are enough, else to distinct hosts
    over every rack: the hosts are the level that can run out."""
    if (not isinstance(copies, int) or isinstance(copies, bool)
            or not 1 <= copies <= constants.copies_max):
        return Result.INVALID_PARMS, f"copies must be 1 to {constants.copies_max}, not {copies!r}"
    if copies > zones:
        in_racks = (f" in {racks} rack{'s' if racks != 1 else ''}"
                    if racks is not None and racks != zones else "")
        return Result.TOO_FEW_ZONES, (
            f"cannot keep {copies} copies on {zones} host{'s' if zones != 1 else ''}{in_racks}:"
            " the copies of an"
            " object go to distinct hosts (sheep -z RACK/HOST or -z HOST): start sheep on"
            " more hosts, or give fewer copies (--copies N)")
    return None


def vdi_size_max(object_size: int) -> int:
    return radix.capacity(radix.DEPTH_MAX) * object_size


def too_large(size: int, limit: int) -> str:
    """Why a VDI of this size cannot be, in sizes a reader takes in (and the bytes:
    a size one byte over reads as the limit once rounded)."""
    return (f"size {format_size(size)} ({size} bytes) exceeds the largest VDI,"
            f" {format_size(limit)} ({limit} bytes)")


@dataclass
class Snapshot:
    id: int
    tag: str
    time: float
    size: int
    root: Root
    lineage: list[int] = field(default_factory=list)  # see Vdi.lineage

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "tag": self.tag, "time": self.time, "size": self.size,
                "root": self.root.to_json(), "lineage": list(self.lineage)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Snapshot:
        return cls(int(value["id"]), str(value["tag"]), float(value["time"]),
                   int(value["size"]), Root.from_json(value["root"]),
                   [int(g) for g in value.get("lineage", [])])


@dataclass
class Vdi:
    id: int
    name: str
    size: int
    ctime: float
    copies: int
    root: Root
    snapshots: list[Snapshot] = field(default_factory=list)
    parent: dict[str, Any] | None = None  # clones: {"vdi": name, "vdi_id", "snapshot": id}
    attrs: dict[str, str] = field(default_factory=dict)
    # Its writer: {"node_id", "session" (the contender: a connection, or one client
    # of it), "owner" (who, for dog vdi lock list), "time" (since when)}.
    lock: dict[str, str] | None = None
    # Its lock went with a node that left: writes of that holder may have reached some
    # replicas and not others. The next open, writable or not, settles every object of
    # the VDI's writable generation (newest copy everywhere) first; see VdiService.
    unsettled: bool = False
    # How many times a leave released its lock: names each unsettling, so a settle
    # made without the lock (a reader's) clears only the unsettling it began after.
    releases: int = 0
    # The frozen generations the writable tree started from, newest first: it may
    # still reach their objects, whether or not their snapshots still exist.
    lineage: list[int] = field(default_factory=list)
    # Its I/O limits (dog vdi qos): {"iops", "bps", "burst"}; None: unlimited.
    qos: dict[str, Any] | None = None
    # In the trash (dog vdi trash): {"time": when, "expires": when it may be purged,
    # or None}. Hidden and untouchable, its name taken, its objects kept.
    trash: dict[str, Any] | None = None
    # Whether copies is the VDI's own (create --copies, alter-copy) rather than the
    # cluster's default, which dog cluster alter-copy changes. None: a state from
    # before the flag (it follows the cluster while its copies equal the cluster's).
    own_copies: bool | None = None
    # How many times its lock was taken: a reader that sees it unchanged (and no lock)
    # knows nobody wrote meanwhile (a diff of the VDI itself, VDI_DIFF).
    locks: int = 0
    # The contender that took its lock last, kept after the lock is released: a client
    # failing over may take a free lock back only if nobody took it since (VdiService).
    last_holder: str = ""

    def generations(self) -> set[int]:
        """Every generation this VDI's trees (current and snapshots) may reach."""
        reached = {self.root.generation, *self.lineage}
        for snap in self.snapshots:
            reached.add(snap.root.generation)
            reached.update(snap.lineage)
        return reached

    def snapshot(self, ref: Any) -> Snapshot | None:
        """A snapshot by tag, or by id (an int, or digits)."""
        for snap in self.snapshots:
            if snap.tag == ref and ref != "":
                return snap
        text = str(ref)
        # Only ASCII digits name an id ('²' is a digit to str.isdigit, not to int), and
        # never more of them than an id has (int() refuses over 4300 of them).
        if text.isascii() and text.isdigit() and len(text) <= snapshot_id_max_digits:
            for snap in self.snapshots:
                if snap.id == int(text):
                    return snap
        return None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "size": self.size, "ctime": self.ctime,
                "copies": self.copies, "root": self.root.to_json(),
                "snapshots": [s.to_json() for s in self.snapshots], "parent": self.parent,
                "attrs": dict(self.attrs), "lock": self.lock, "unsettled": self.unsettled,
                "lineage": list(self.lineage), "releases": self.releases, "qos": self.qos,
                "trash": self.trash, "own_copies": self.own_copies, "locks": self.locks,
                "last_holder": self.last_holder}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Vdi:
        return cls(int(value["id"]), str(value["name"]), int(value["size"]),
                   float(value["ctime"]), int(value["copies"]), Root.from_json(value["root"]),
                   [Snapshot.from_json(s) for s in value["snapshots"]], value["parent"],
                   dict(value["attrs"]), value["lock"], bool(value.get("unsettled", False)),
                   releases=int(value.get("releases", 0)),
                   lineage=[int(g) for g in value.get("lineage", [])],
                   qos=value.get("qos"), trash=value.get("trash"),
                   own_copies=value.get("own_copies"), locks=int(value.get("locks", 0)),
                   last_holder=str(value.get("last_holder", "")))


@dataclass
class Outcome:
    result: Result = Result.SUCCESS
    message: str = ""
    value: dict[str, Any] = field(default_factory=dict)


def _fail(result: Result, message: str) -> Outcome:
    return Outcome(result, message)


class VdiRegistry:
    def __init__(self) -> None:
        self.vdis: dict[str, Vdi] = {}
        self.next_id = 1
        self.next_generation = 1
        # Change maps (sheep/changes.py): generations from tracked_from on have them,
        # except the untracked ones, whose writer may have gone before saving them (its
        # node left holding the lock, or the lock was taken away by force).
        self.tracked_from = 1
        self.untracked: set[int] = set()
        self.ops: dict[str, Callable[[dict[str, Any], float, int, int, int], Outcome]] = {
            "vdi_create": self._create,
            "vdi_delete": self._delete,
            "vdi_snapshot": self._snapshot,
            "vdi_clone": self._clone,
            "vdi_rollback": self._rollback,
            "vdi_resize": self._resize,
            "vdi_lock": self._lock,
            "vdi_unlock": self._unlock,
            "vdi_settled": self._settled,
            "vdi_root_made": self._root_made,
            "vdi_setattr": self._setattr,
            "vdi_qos": self._qos,
            "vdi_trash": self._trash,
            "vdi_untrash": self._untrash,
            "vdi_alter_copy": self._alter_copy,
            "vdi_rename": self._rename,
        }

    # --- queries ---------------------------------------------------------------

    def writable_generations(self) -> set[int]:
        return {vdi.root.generation for vdi in self.vdis.values()}

    def copies_by_generation(self) -> dict[int, int]:
        """Every generation some live tree may reach, with the most copies kept by the
        VDIs reaching it: a frozen generation shared by a VDI and its clones, or left
        behind by a deleted snapshot, keeps the copies of the VDIs that still read it."""
        copies: dict[int, int] = {}
        for vdi in self.vdis.values():
            for generation in vdi.generations():
                copies[generation] = max(copies.get(generation, 0), vdi.copies)
        return copies

    def tracked(self, generation: int) -> bool:
        """Whether the generation's change pages hold every change made in it."""
        return generation >= self.tracked_from and generation not in self.untracked

    def by_generation(self, generation: int) -> Vdi | None:
        for vdi in self.vdis.values():
            if vdi.root.generation == generation:
                return vdi
            if any(s.root.generation == generation for s in vdi.snapshots):
                return vdi
        return None

    def release_node(self, node_id: str) -> list[str]:
        """Drop every lock held through a node that left; the names released."""
        released = []
        for vdi in self.vdis.values():
            if vdi.lock is not None and vdi.lock.get("node_id") == node_id:
                vdi.lock = None
                vdi.unsettled = True
                self.untracked.add(vdi.root.generation)
                vdi.releases += 1
                released.append(vdi.name)
        return released

    # --- the one way in ----------------------------------------------------------

    def apply(self, kind: str, body: dict[str, Any], time: float, copies: int,
              object_size: int, zones: int) -> Outcome:
        handler = self.ops[kind]
        outcome = handler(body, time, copies, object_size, zones)
        self._check()
        return outcome

    def _new_id(self) -> int:
        value = self.next_id
        self.next_id += 1
        return value

    def _new_generation(self) -> int | None:
        if self.next_generation > GENERATION_MAX:
            return None
        value = self.next_generation
        self.next_generation += 1
        return value

    def _get(self, body: dict[str, Any], key: str = "name",
             trashed: bool = False) -> Vdi | Outcome:
        """The VDI the body names; one in the trash only when ``trashed``."""
        name = body.get(key)
        vdi = self.vdis.get(name) if isinstance(name, str) else None
        if vdi is None:
            return _fail(Result.NO_VDI, f"no VDI named {name!r}")
        if vdi.trash is not None and not trashed:
            return _fail(Result.NO_VDI, f"VDI {name!r} is in the trash (dog vdi trash"
                                        " restore, or purge)")
        return vdi

    def _unusable(self, name: Any, what: str = "VDI name") -> Outcome | None:
        """Why a new VDI may not take this name (bad, or taken live or in the trash)."""
        problem = name_problem(name, what)
        if problem:
            return _fail(Result.INVALID_PARMS, problem)
        return self._taken(name)

    def _taken(self, name: str) -> Outcome | None:
        vdi = self.vdis.get(name)
        if vdi is None:
            return None
        if vdi.trash is not None:
            return _fail(Result.EXISTS, f"VDI {name!r} is in the trash: restore or purge it"
                                        " before its name is used again")
        return _fail(Result.EXISTS, f"VDI {name!r} already exists")

    def _size_problem(self, size: Any, object_size: int) -> str | None:
        limit = vdi_size_max(object_size)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            return f"size must be a positive number of bytes, not {size!r}"
        if size > limit:
            return too_large(size, limit)
        return None

    @staticmethod
    def _depth(size: int, object_size: int) -> int:
        return radix.depth_for(-(-size // object_size))

    def _locked_by_other(self, vdi: Vdi, body: dict[str, Any],
                         forcible: str = "") -> Outcome | None:
        """forcible: what --force would do anyway, said when it may (body's force)."""
        if vdi.lock is None or body.get("force"):
            return None
        if body.get("session") and vdi.lock.get("session") == body.get("session"):
            return None
        hint = f"; --force {forcible} anyway" if forcible else ""
        return _fail(Result.VDI_LOCKED, f"VDI {vdi.name!r} is in use by"
                     f" {vdi.lock.get('owner') or vdi.lock['node_id']}{hint}")

    # --- handlers --------------------------------------------------------------

    def _create(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                zones: int) -> Outcome:
        name = body.get("name")
        problem = name_problem(name) or self._size_problem(body.get("size"), object_size)
        if problem:
            return _fail(Result.INVALID_PARMS, problem)
        assert isinstance(name, str)
        taken = self._taken(name)
        if taken:
            return taken
        vdi_copies = body.get("copies") or copies
        if not isinstance(vdi_copies, int) or not 1 <= vdi_copies <= max(copies, zones):
            return _fail(Result.INVALID_PARMS, f"copies must be 1 to {zones}, not {vdi_copies!r}")
        if vdi_copies > zones:
            refusal = copies_problem(vdi_copies, zones)
            assert refusal is not None
            return _fail(*refusal)
        generation = self._new_generation()
        if generation is None:
            return _fail(Result.NO_SPACE, "no generation numbers left")
        size = int(body["size"])
        vdi = Vdi(self._new_id(), name, size, time, vdi_copies,
                  Root(generation, self._depth(size, object_size), 0),
                  own_copies=body.get("copies") is not None)
        self.vdis[name] = vdi
        return Outcome(value=vdi.to_json())

    def _delete(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                zones: int) -> Outcome:
        purge = bool(body.get("purge"))
        vdi = self._get(body, trashed=purge)
        if isinstance(vdi, Outcome):
            return vdi
        if purge:  # dog vdi trash purge: the VDI must still be in the trash, as it was
            if vdi.trash is None:
                return _fail(Result.INVALID_PARMS, f"VDI {vdi.name!r} is not in the trash")
            if "expires" in body and body["expires"] != vdi.trash.get("expires"):
                return _fail(Result.INVALID_PARMS,
                             f"VDI {vdi.name!r} went back into the trash meanwhile")
        tag = None if purge else body.get("snapshot")
        if tag is not None:
            snap = vdi.snapshot(tag)
            if snap is None:
                return _fail(Result.NO_TAG, f"VDI {vdi.name!r} has no snapshot {tag!r}")
            vdi.snapshots.remove(snap)
            return Outcome(value={"dead": [snap.root.to_json()], "vdi": vdi.to_json()})
        locked = self._locked_by_other(vdi, body, "deletes it")
        if locked:
            return locked
        del self.vdis[vdi.name]
        self.untracked &= set(self.copies_by_generation())
        dead = [vdi.root.to_json(), *(s.root.to_json() for s in vdi.snapshots)]
        return Outcome(value={"dead": dead, "vdi": vdi.to_json()})

    def _base(self, body: dict[str, Any]) -> int | None:
        base = body.get("base")
        if not isinstance(base, int) or base < 0:
            return None
        if base and not radix.is_tree(base):
            return None
        return base

    def _snapshot(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                  zones: int) -> Outcome:
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        tag = body.get("tag", "")
        if tag:
            problem = name_problem(tag, "snapshot tag")
            if problem:
                return _fail(Result.INVALID_PARMS, problem)
            if vdi.snapshot(tag) is not None and not str(tag).isdigit():
                return _fail(Result.EXISTS, f"VDI {vdi.name!r} already has a snapshot {tag!r}")
            if str(tag).isdigit():
                return _fail(Result.INVALID_PARMS, "a snapshot tag must not be all digits")
        if body.get("generation") != vdi.root.generation:
            return _fail(Result.UNAVAILABLE, "the VDI changed while the snapshot was prepared")
        locked = self._locked_by_other(vdi, {"session": body.get("session")})
        if locked:  # only the writer's own sheep may freeze what it writes into
            return locked
        base = self._base(body)
        if base is None:
            return _fail(Result.INVALID_PARMS, "snapshot needs the resolved root node")
        generation = self._new_generation()
        if generation is None:
            return _fail(Result.NO_SPACE, "no generation numbers left")
        snap = Snapshot(self._new_id(), str(tag), time, vdi.size, vdi.root, list(vdi.lineage))
        vdi.snapshots.append(snap)
        vdi.root = Root(generation, vdi.root.depth, base)
        vdi.lineage = [snap.root.generation, *vdi.lineage]
        return Outcome(value={"snapshot": snap.to_json(), "vdi": vdi.to_json()})

    def _clone(self, body: dict[str, Any], time: float, copies: int, object_size: int,
               zones: int) -> Outcome:
        source = self._get(body, "source")
        if isinstance(source, Outcome):
            return source
        snap = source.snapshot(body.get("snapshot"))
        if snap is None:
            return _fail(Result.NO_TAG,
                         f"VDI {source.name!r} has no snapshot {body.get('snapshot')!r}")
        name = body.get("name")
        refused = self._unusable(name)
        if refused:
            return refused
        assert isinstance(name, str)
        base = self._base(body)
        if base is None:
            return _fail(Result.INVALID_PARMS, "clone needs the resolved root node")
        generation = self._new_generation()
        if generation is None:
            return _fail(Result.NO_SPACE, "no generation numbers left")
        vdi = Vdi(self._new_id(), name, snap.size, time, source.copies,
                  Root(generation, snap.root.depth, base),
                  parent={"vdi": source.name, "vdi_id": source.id, "snapshot": snap.id,
                          "tag": snap.tag},
                  lineage=[snap.root.generation, *snap.lineage], own_copies=source.own_copies)
        self.vdis[name] = vdi
        return Outcome(value=vdi.to_json())

    def _rollback(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                  zones: int) -> Outcome:
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        snap = vdi.snapshot(body.get("snapshot"))
        if snap is None:
            return _fail(Result.NO_TAG,
                         f"VDI {vdi.name!r} has no snapshot {body.get('snapshot')!r}")
        locked = self._locked_by_other(vdi, body, "rolls it back")
        if locked:
            return locked
        base = self._base(body)
        if base is None:
            return _fail(Result.INVALID_PARMS, "rollback needs the resolved root node")
        generation = self._new_generation()
        if generation is None:
            return _fail(Result.NO_SPACE, "no generation numbers left")
        dead = vdi.root
        vdi.root = Root(generation, snap.root.depth, base)
        vdi.lineage = [snap.root.generation, *snap.lineage]
        vdi.size = snap.size
        return Outcome(value={"dead": [dead.to_json()], "vdi": vdi.to_json()})

    def _resize(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                zones: int) -> Outcome:
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        size = body.get("size")
        problem = self._size_problem(size, object_size)
        if problem:
            return _fail(Result.INVALID_PARMS, problem)
        assert isinstance(size, int)
        if size < vdi.size and not body.get("shrink"):
            return _fail(Result.INVALID_PARMS,
                         f"VDI {vdi.name!r} can only grow ({size} < {vdi.size} bytes)")
        locked = self._locked_by_other(vdi, {"session": body.get("session")})
        if locked:
            return locked
        if size < vdi.size and (vdi.lock is None or not body.get("session")):
            # Its writer cuts the tree past the new end after this applies: nobody else
            # may change the tree meanwhile (VdiAdmin.resize).
            return _fail(Result.UNAVAILABLE, f"VDI {vdi.name!r} is shrunk by its writer:"
                                             " the holder of its lock")
        root = Root.from_json(body["root"]) if isinstance(body.get("root"), dict) else None
        # A shrink keeps the tree's depth (a later grow reuses it), so a tree may be
        # deeper than its size needs.
        depth = max(vdi.root.depth, self._depth(size, object_size))
        if root is None or root.generation != vdi.root.generation or root.depth != depth:
            return _fail(Result.UNAVAILABLE, "the VDI changed while the resize was prepared")
        vdi.size = size
        if root.depth != vdi.root.depth:  # grown: new levels above the old root
            vdi.root = root
        return Outcome(value=vdi.to_json())

    def _rename(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                zones: int) -> Outcome:
        """A VDI takes another name, with its snapshots (they are part of it); clones
        name their parent anew. Refused while its lock is held: a writer's sheep keys
        what it tracks of the writer (write gate, handoff state, I/O queue) by name."""
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        new_name = body.get("new_name")
        refused = self._unusable(new_name, "new VDI name")
        if refused:
            return refused
        assert isinstance(new_name, str)
        if vdi.lock is not None:
            holder = vdi.lock.get("owner") or vdi.lock.get("node_id")
            return _fail(Result.VDI_LOCKED,
                         f"VDI {vdi.name!r} is in use by {holder}: a VDI being written is not"
                         " renamed (stop its writer, or 'dog vdi lock unlock' it, first)")
        del self.vdis[vdi.name]
        vdi.name = new_name
        self.vdis[new_name] = vdi
        for other in self.vdis.values():
            if other.parent is not None and other.parent.get("vdi_id") == vdi.id:
                other.parent = {**other.parent, "vdi": new_name}
        return Outcome(value=vdi.to_json())

    def _lock(self, body: dict[str, Any], time: float, copies: int, object_size: int,
              zones: int) -> Outcome:
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        # A handoff (VdiService.handoff) names the session it takes the lock from: it
        # applies only while that session still holds it.
        moved_from = body.get("from_session")
        if not (moved_from and vdi.lock is not None and vdi.lock.get("session") == moved_from):
            locked = self._locked_by_other(vdi, {"session": body.get("session")})
            if locked:
                return locked
        vdi.lock = {"node_id": str(body.get("node_id")), "session": str(body.get("session")),
                    "owner": str(body.get("owner", "")), "time": str(time)}
        vdi.locks += 1
        vdi.last_holder = vdi.lock["session"]
        return Outcome(value=vdi.to_json())

    def _unlock(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                zones: int) -> Outcome:
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        session = body.get("session")
        if vdi.lock is not None and (session is None or vdi.lock.get("session") == session):
            if session is None or body.get("untracked"):
                # Forced (the holder's unsaved change masks are lost), or the holder
                # could not save them.
                self.untracked.add(vdi.root.generation)
            vdi.lock = None
        return Outcome(value=vdi.to_json())

    def _alter_copy(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                    zones: int) -> Outcome:
        """The VDI's objects keep this many copies from now on (recovery adds or drops
        them); its own number, no longer the cluster's default."""
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        wanted = body.get("copies")
        problem = copies_problem(wanted, zones)
        if problem:
            return _fail(*problem)
        assert isinstance(wanted, int)
        vdi.copies = wanted
        vdi.own_copies = True
        return Outcome(value=vdi.to_json())

    def follow_cluster_copies(self, before: int, after: int) -> list[str]:
        """The cluster's default copies changed: the VDIs without their own follow."""
        changed = []
        for vdi in self.vdis.values():
            follows = vdi.own_copies is False or (vdi.own_copies is None
                                                  and vdi.copies == before)
            if follows and vdi.copies != after:
                vdi.copies = after
                changed.append(vdi.name)
        return changed

    def _trash(self, body: dict[str, Any], time: float, copies: int, object_size: int,
               zones: int) -> Outcome:
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        if vdi.lock is not None:
            return _fail(Result.VDI_LOCKED, f"VDI {vdi.name!r} is being written by"
                                            f" {vdi.lock.get('owner') or 'a client'}")
        expires_in = body.get("expires_in")
        if expires_in is not None and (not isinstance(expires_in, (int, float))
                                       or isinstance(expires_in, bool) or expires_in < 0):
            return _fail(Result.INVALID_PARMS, "expires_in is a number of seconds")
        vdi.trash = {"time": time,
                     "expires": None if expires_in is None else time + float(expires_in)}
        return Outcome(value=vdi.to_json())

    def _untrash(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                 zones: int) -> Outcome:
        vdi = self._get(body, trashed=True)
        if isinstance(vdi, Outcome):
            return vdi
        if vdi.trash is None:
            return _fail(Result.INVALID_PARMS, f"VDI {vdi.name!r} is not in the trash")
        vdi.trash = None
        return Outcome(value=vdi.to_json())

    def _settled(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                 zones: int) -> Outcome:
        """Every copy of the VDI was made to agree (see Vdi.unsettled): by the lock
        holder, or, while nobody holds the lock, by a reader that began after the
        latest release (a writer that took the lock and died since unsettled it anew)."""
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        if vdi.lock is None:
            if body.get("releases") == vdi.releases:
                vdi.unsettled = False
        elif vdi.lock.get("session") == body.get("session"):
            vdi.unsettled = False
        return Outcome(value=vdi.to_json())

    def _root_made(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                   zones: int) -> Outcome:
        """The writable generation's own root node exists now (Root.made). Applies only
        while the VDI still writes that generation and tree: idempotent, and a late
        one after a snapshot or rollback changes nothing."""
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        root = vdi.root
        if body.get("generation") == root.generation and body.get("depth") == root.depth:
            vdi.root = dataclasses.replace(root, made=True)
        return Outcome(value=vdi.to_json())

    def _setattr(self, body: dict[str, Any], time: float, copies: int, object_size: int,
                 zones: int) -> Outcome:
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        key = body.get("key")
        if not isinstance(key, str) or not key or len(key) > attr_key_max_chars:
            return _fail(Result.INVALID_PARMS,
                         f"attribute key must be 1 to {attr_key_max_chars} characters")
        value = body.get("value")
        if value is None:
            if key not in vdi.attrs:
                return _fail(Result.NO_OBJ, f"VDI {vdi.name!r} has no attribute {key!r}")
            del vdi.attrs[key]
            return Outcome()
        if not isinstance(value, str) or len(value.encode("utf-8", "replace")) > attr_value_max_bytes:
            return _fail(Result.INVALID_PARMS,
                         f"attribute value must be text of at most {attr_value_max_bytes} bytes")
        if key not in vdi.attrs and len(vdi.attrs) >= attrs_per_vdi_max:
            return _fail(Result.NO_SPACE, f"VDI {vdi.name!r} has {attrs_per_vdi_max} attributes")
        if body.get("exclusive") and key in vdi.attrs:
            return _fail(Result.EXISTS, f"VDI {vdi.name!r} already has attribute {key!r}")
        vdi.attrs[key] = value
        return Outcome()

    def _qos(self, body: dict[str, Any], time: float, copies: int, object_size: int,
             zones: int) -> Outcome:
        """Set a VDI's I/O limits (iops, bps: per second, 0 for none; burst: seconds'
        worth saved while idle), or clear them all (clear)."""
        vdi = self._get(body)
        if isinstance(vdi, Outcome):
            return vdi
        if body.get("clear"):
            vdi.qos = None
            return Outcome(value=vdi.to_json())
        current = vdi.qos or {"iops": 0, "bps": 0, "burst": qos_burst_default_s}
        limits = dict(current)
        for key, top in (("iops", qos_iops_max), ("bps", qos_bps_max)):
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                return _fail(Result.INVALID_PARMS, f"{key} must be a whole number from 0"
                                                   f" (no limit) to {top}, not {value!r}")
            limits[key] = value
        burst = body.get("burst")
        if burst is not None:
            if (not isinstance(burst, (int, float)) or isinstance(burst, bool)
                    or not qos_burst_min_s <= burst <= qos_burst_max_s):
                return _fail(Result.INVALID_PARMS, f"burst must be {qos_burst_min_s} to"
                                                   f" {qos_burst_max_s} seconds, not {burst!r}")
            limits["burst"] = float(burst)
        vdi.qos = limits if limits["iops"] or limits["bps"] else None
        return Outcome(value=vdi.to_json())

    def qos(self) -> dict[str, Qos]:
        """Every limited VDI's limits, by name (what the scheduler enforces)."""
        return {name: Qos(int(vdi.qos.get("iops", 0)), int(vdi.qos.get("bps", 0)),
                          float(vdi.qos.get("burst", qos_burst_default_s)))
                for name, vdi in self.vdis.items() if vdi.qos}

    # --- persistence -------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"next_id": self.next_id, "next_generation": self.next_generation,
                "vdis": [vdi.to_json() for vdi in self.vdis.values()],
                "tracked_from": self.tracked_from, "untracked": sorted(self.untracked)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> VdiRegistry:
        registry = cls()
        registry.next_id = int(value["next_id"])
        registry.next_generation = int(value["next_generation"])
        # A state from before change maps: none of its generations has them.
        registry.tracked_from = int(value.get("tracked_from", registry.next_generation))
        registry.untracked = {int(g) for g in value.get("untracked", [])}
        for item in value["vdis"]:
            vdi = Vdi.from_json(item)
            registry.vdis[vdi.name] = vdi
        registry._check()
        return registry

    def _check(self) -> None:
        generations: set[int] = set()
        ids: set[int] = set()
        for name, vdi in self.vdis.items():
            assert name == vdi.name
            roots = [vdi.root, *(s.root for s in vdi.snapshots)]
            for root in roots:
                assert 0 < root.generation < self.next_generation
                assert root.generation not in generations, "a generation has one root"
                generations.add(root.generation)
            for item_id in [vdi.id, *(s.id for s in vdi.snapshots)]:
                assert 0 < item_id < self.next_id and item_id not in ids
                ids.add(item_id)
            # A tree starts from frozen generations older than its own.
            for root, lineage in [(vdi.root, vdi.lineage),
                                  *((s.root, s.lineage) for s in vdi.snapshots)]:
                assert lineage == sorted(lineage, reverse=True), "newest first"
                assert all(0 < g < root.generation for g in lineage)
            # Snapshots are frozen earlier states, in the order taken.
            assert all(s.root.generation < vdi.root.generation for s in vdi.snapshots)
            assert [s.id for s in vdi.snapshots] == sorted(s.id for s in vdi.snapshots)
            tags = [s.tag for s in vdi.snapshots if s.tag]
            assert len(tags) == len(set(tags)), "tags are unique within a VDI"
