"""The VDI management ops: create, delete, snapshot, clone, rollback, resize,
rename, list, info, attributes, object lookup and unlock.

Each becomes a cluster op (VdiRegistry applies it everywhere in the same order);
what this module adds is the work around it that needs the objects: resolving
roots, growing trees, freeing garbage (sheep/vdi_gc.py).

Management ops that change what a writer writes into (snapshot, resize) run on
the sheep that holds the lock: any other sheep forwards them there. That sheep
pauses new writes to the VDI, waits for those in flight, resolves the root
node, broadcasts the op and resumes: the snapshot then holds exactly the
writes acknowledged before it. The state machine refuses such an op from a
sheep that is not the holder, so a lock taken meanwhile cannot slip past it.

Deleting a VDI or snapshot, and rolling back, frees every object that no live
root reaches any more (VdiEngine.garbage), before the op is answered. So does a
shrink, with what it cut off the tree past the new end; it changes the tree,
so it runs as the VDI's writer: on the holder's sheep, or, nobody holding the
lock, under a lock of its own (VdiService.as_writer).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sheep import changes, constants, proto, radix, vdi_diff, vdi_du
from sheep.client import Connection
from sheep.cluster_state import ApplyResult
from sheep.errors import InvalidParameters, NoObject, NoTag, NoVdi, SheepError, VdiLocked
from sheep.gateway import Gateway
from sheep.group import Group
from sheep.net import Reply
from sheep.proto import Header, Kind, Op
from sheep.size import format_size
from sheep.vdi import Objects, Root, VdiEngine
from sheep.vdi_gc import Collector
from sheep.vdi_registry import Snapshot, Vdi, too_large, vdi_size_max

Broadcast = Callable[[dict[str, Any]], Awaitable[ApplyResult]]
Handler = Callable[[dict[str, Any], Header], Awaitable[Any]]
# Runs work with the VDI's new writes held and those in flight done (VdiService.paused).
Paused = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]
# Runs work(contender) as the writer of a VDI nobody holds the lock of (VdiService.as_writer).
AsWriter = Callable[[str, str, Callable[[str], Awaitable[Any]]], Awaitable[Any]]

FLAG_FORWARDED = 1  # arg1 of a management op: already forwarded once, do not forward again


def vdi_named(group: Group, name: Any, trashed: bool = False) -> Vdi:
    """The VDI of that name; one in the trash only when ``trashed``."""
    vdi = group.state.vdis.vdis.get(name) if isinstance(name, str) else None
    if vdi is None:
        raise NoVdi(f"no VDI named {name!r}")
    if vdi.trash is not None and not trashed:
        raise NoVdi(f"VDI {name!r} is in the trash (dog vdi trash restore, or purge)")
    return vdi


def snapshot_named(vdi: Vdi, ref: Any) -> Snapshot:
    snap = vdi.snapshot(ref)
    if snap is None:
        raise NoTag(f"VDI {vdi.name!r} has no snapshot {ref!r}")
    return snap


def _is_text(value: Any) -> bool:
    """False for a string that cannot be encoded as UTF-8; True for anything else."""
    if not isinstance(value, str):
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


class VdiAdmin:
    def __init__(self, group: Group, gateway: Gateway, node_id: str, broadcast: Broadcast,
                 peer_connection: Callable[[str], Awaitable[Connection]], objects: Objects,
                 engine: Callable[[], VdiEngine], gc: Collector, paused: Paused,
                 handoff: Handler, attachments: Handler,
                 save_changes: Callable[[int], Awaitable[None]],
                 note_changes: Callable[[int, int, int], None], as_writer: AsWriter) -> None:
        self.group = group
        self.gateway = gateway
        self.node_id = node_id
        self.broadcast = broadcast
        self.peer_connection = peer_connection
        self.objects = objects
        self.engine = engine  # the engine of the current object size (VdiService.engine)
        self.gc = gc
        self.paused = paused
        self.save_changes = save_changes  # VdiService.changes.save
        self.note_changes = note_changes  # VdiService.changes.note
        self.as_writer = as_writer
        self.handlers: dict[Op, Handler] = {
            Op.VDI_CREATE: self.create,
            Op.VDI_DELETE: self.delete,
            Op.VDI_SNAPSHOT: self.snapshot,
            Op.VDI_CLONE: self.clone,
            Op.VDI_ROLLBACK: self.rollback,
            Op.VDI_RESIZE: self.resize,
            Op.VDI_LIST: self.list,
            Op.VDI_SETATTR: self.setattr,
            Op.VDI_GETATTR: self.getattr,
            Op.VDI_OBJECT: self.locate,
            Op.VDI_UNLOCK: self.unlock,
            Op.VDI_QOS: self.qos,
            Op.VDI_HANDOFF: handoff,  # the lock holder's activity is VdiService's
            Op.VDI_ATTACHMENTS: attachments,  # and so are the opens
            Op.VDI_DIFF: self.diff,
            Op.VDI_DU: self.du,
            Op.VDI_TRASH: self.trash,
            Op.VDI_ALTER_COPY: self.alter_copy,
            Op.VDI_RENAME: self.rename,
            Op.VDI_INFO: self.info,
        }
        proto.check_handlers(self.handlers, {Kind.VDI_ADMIN}, "VdiAdmin.handlers")

    async def serve(self, header: Header, payload: bytes) -> Reply:
        body = proto.decode_json(payload)
        if not isinstance(body, dict):
            raise InvalidParameters("VDI operations take a JSON object")
        value = await self.handlers[Op(header.opcode)](body, header)
        return proto.encode_json(value), {}

    async def create(self, body: dict[str, Any], header: Header) -> Any:
        result = await self.broadcast({"type": "vdi_create", "name": body.get("name"),
                                       "size": body.get("size"), "copies": body.get("copies")})
        return result.value

    async def _on_holder(self, vdi: Vdi, header: Header, body: dict[str, Any],
                         work: Callable[[str | None], Awaitable[Any]]) -> Any:
        """Run work where the VDI's writer is: here with writes paused, or forwarded."""
        lock = vdi.lock
        if lock is not None and lock.get("node_id") != self.node_id:
            if header.arg1 & FLAG_FORWARDED:
                raise VdiLocked(f"VDI {vdi.name!r} moved to another writer; try again")
            return await self._forward(lock["node_id"], header, body)
        if lock is None:
            return await work(None)
        return await self.paused(vdi.name, lambda: work(lock.get("session")))

    async def _forward(self, node_id: str, header: Header, body: dict[str, Any]) -> Any:
        connection = await self.peer_connection(node_id)
        forwarded = Header(opcode=header.opcode, arg1=header.arg1 | FLAG_FORWARDED)
        _, data = await connection.call(forwarded, proto.encode_json(body),
                                        timeout_ms=constants.op_timeout_ms)
        return proto.decode_json(data)

    async def snapshot(self, body: dict[str, Any], header: Header) -> Any:
        vdi = vdi_named(self.group, body.get("name"))

        async def work(session: str | None) -> Any:
            current = vdi_named(self.group, vdi.name)
            # Writes are paused: every change of the generation is noted, and its
            # masks must be in its pages before it is frozen (a diff reads them).
            await self.save_changes(current.root.generation)
            base = await self.engine().root_node(current.root)
            result = await self.broadcast({
                "type": "vdi_snapshot", "name": current.name, "tag": body.get("tag", ""),
                "generation": current.root.generation, "base": base, "session": session})
            return result.value

        if vdi.lock is not None and vdi.lock.get("node_id") == self.node_id:
            # Most of the masks saved while writes go on: only what comes meanwhile is
            # saved with them paused.
            await self.save_changes(vdi.root.generation)
        return await self._on_holder(vdi, header, body, work)

    async def resize(self, body: dict[str, Any], header: Header) -> Any:
        """Grow a VDI; or, with allow_shrink, shrink it (the same size again finishes a
        shrink that was cut off halfway)."""
        vdi = vdi_named(self.group, body.get("name"))
        size = body.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise InvalidParameters(f"size must be a positive number of bytes, not {size!r}")
        allow_shrink = bool(body.get("allow_shrink"))
        object_size = self.group.state.object_size

        async def work(session: str | None) -> Any:
            current = vdi_named(self.group, vdi.name)
            if size < current.size or (allow_shrink and size == current.size):
                if not allow_shrink:
                    raise InvalidParameters(
                        f"VDI {current.name!r} can only grow unless --allow-shrink is given:"
                        f" shrinking it from {format_size(current.size)} to"
                        f" {format_size(size)} discards its data past that")
                if session is None:
                    return await self.as_writer(
                        current.name, "dog vdi resize --allow-shrink",
                        lambda contender: self._shrink(current.name, size, contender))
                return await self._shrink(current.name, size, session)
            limit = vdi_size_max(object_size)
            if size > limit:
                raise InvalidParameters(too_large(size, limit))
            if await self._past_the_end(current):
                raise InvalidParameters(
                    f"VDI {current.name!r} still holds data past its end (a shrink was cut"
                    f" off halfway): run 'dog vdi resize --allow-shrink {current.name}"
                    f" {current.size}' to finish it, then grow it")
            depth = max(current.root.depth, radix.depth_for(-(-size // object_size)))
            root = await self.engine().grow(current.root, depth)
            try:
                result = await self.broadcast({"type": "vdi_resize", "name": current.name,
                                               "size": size, "root": root.to_json(),
                                               "session": session})
            except SheepError:
                for level in range(current.root.depth + 1, depth + 1):  # the grown levels
                    node = radix.node_oid(current.root.generation, level, 0)
                    try:
                        await self.objects.remove(node)
                    except NoObject:
                        pass
                    self.engine().forget({node})
                raise
            return result.value

        return await self._on_holder(vdi, header, body, work)

    async def _shrink(self, name: str, size: int, session: str) -> Any:
        """As the VDI's writer (session), writes paused: the new size is logged first
        (from then on nothing past it is read or written), then the tree is cut past
        it (VdiEngine.truncate) and what no live tree reaches any more is freed. Cut
        off halfway, what is left past the end is never read; the same resize run
        again finishes the cut, and a grow refuses until then (_past_the_end)."""
        current = vdi_named(self.group, name)
        result = await self.broadcast({"type": "vdi_resize", "name": name, "size": size,
                                       "root": current.root.to_json(), "session": session,
                                       "shrink": True})
        root = vdi_named(self.group, name).root
        object_size = self.group.state.object_size
        engine = self.engine()
        keep = -(-size // object_size)
        # Noted before the cut, as a write is: a diff across this generation (after a
        # later grow) must see the cut objects and the discarded tail as zeros.
        if keep < radix.capacity(root.depth):
            for index, _, _ in await engine.changed(root, None, None, keep,
                                                    radix.capacity(root.depth)):
                self.note_changes(root.generation, index * object_size, object_size)
        if size % object_size:
            self.note_changes(root.generation, size, object_size - size % object_size)
        cut = await engine.truncate(root, size)
        freed = await self.gc.collect([], cut)
        return {**result.value, "freed_objects": freed}

    async def _past_the_end(self, vdi: Vdi) -> bool:
        """Whether the VDI's tree still holds data past its end (a shrink cut off
        before it finished cutting): a grow would bring it back into view."""
        engine = self.engine()
        root, object_size = vdi.root, self.group.state.object_size
        keep = -(-vdi.size // object_size)
        capacity = radix.capacity(root.depth)
        if keep < capacity and await engine.changed(root, None, None, keep, capacity):
            return True
        index, inner = divmod(vdi.size, object_size)
        start = -(-inner // changes.BLOCK) * changes.BLOCK  # whole blocks past the end
        if not inner or start >= object_size:
            return False
        return bool(await engine.data_ranges(root, index, start, object_size - start))

    async def rename(self, body: dict[str, Any], header: Header) -> Any:
        """Give a VDI, with its snapshots, another name (its clones name it anew);
        refused while it is being written (sheep/vdi_registry.py, _rename)."""
        vdi = vdi_named(self.group, body.get("name"))
        result = await self.broadcast({"type": "vdi_rename", "name": vdi.name,
                                       "new_name": body.get("new_name")})
        return result.value

    async def info(self, body: dict[str, Any], header: Header) -> Any:
        """One VDI, in the trash or not: its size, copies (its own, or the cluster's
        default), lock, QoS, trash state, parent, snapshots, and the space of each
        image (sheep/vdi_du.py)."""
        vdi = vdi_named(self.group, body.get("name"), trashed=True)
        state = self.group.state
        follows = vdi.own_copies is False or (vdi.own_copies is None
                                              and vdi.copies == state.copies)
        usage = (await vdi_du.usage(self.engine(), self.group, [vdi.name]))[0]
        images = {(image["snapshot"], image["id"]): image for image in usage.pop("images")}
        figures = ("used", "used_stored", "exclusive", "exclusive_stored")
        parent = None
        if vdi.parent is not None:
            source = next((v for v in state.vdis.vdis.values()
                           if v.id == vdi.parent.get("vdi_id")), None)
            alive = source is not None and source.snapshot(vdi.parent.get("snapshot")) is not None
            parent = {**vdi.parent, "deleted": not alive}
        lock = None
        if vdi.lock is not None:
            lock = {"owner": vdi.lock.get("owner", ""), "node_id": vdi.lock.get("node_id"),
                    "since": float(vdi.lock.get("time") or 0)}
        return {
            "name": vdi.name, "id": vdi.id, "size": vdi.size, "ctime": vdi.ctime,
            "copies": vdi.copies, "copies_from": "cluster" if follows else "vdi",
            "cluster_copies": state.copies, "object_size": state.object_size,
            "parent": parent, "lock": lock, "unsettled": vdi.unsettled, "qos": vdi.qos,
            "trash": vdi.trash, "attrs": len(vdi.attrs),
            # The VDI's current state, and with its snapshots: what deleting it frees.
            "usage": {"provisioned": vdi.size,
                      **{key: images[False, vdi.id][key] for key in figures}},
            "total": {key: usage[key] for key in figures},
            "snapshots": [{"id": snap.id, "tag": snap.tag, "ctime": snap.time,
                           "size": snap.size,
                           **{key: images[True, snap.id][key] for key in figures}}
                          for snap in vdi.snapshots],
        }

    async def clone(self, body: dict[str, Any], header: Header) -> Any:
        source = vdi_named(self.group, body.get("source"))
        snap = snapshot_named(source, body.get("snapshot"))
        base = await self.engine().root_node(snap.root)
        result = await self.broadcast({"type": "vdi_clone", "source": source.name,
                                       "snapshot": snap.id, "name": body.get("name"),
                                       "base": base})
        return result.value

    async def rollback(self, body: dict[str, Any], header: Header) -> Any:
        vdi = vdi_named(self.group, body.get("name"))
        snap = snapshot_named(vdi, body.get("snapshot"))
        base = await self.engine().root_node(snap.root)
        ended = {vdi.root.generation, *vdi.lineage}  # the head's, which may end now
        result = await self.broadcast({"type": "vdi_rollback", "name": vdi.name,
                                       "snapshot": snap.id, "base": base,
                                       "force": bool(body.get("force"))})
        dead = [Root.from_json(r) for r in result.value["dead"]]
        freed = await self.gc.collect(dead)
        await self.gc.forget_generations(ended | {root.generation for root in dead})
        return {**result.value["vdi"], "freed_objects": freed}

    async def delete(self, body: dict[str, Any], header: Header) -> Any:
        purge = bool(body.get("purge"))
        vdi = vdi_named(self.group, body.get("name"), trashed=purge)
        op: dict[str, Any] = {"type": "vdi_delete", "name": vdi.name,
                              "force": bool(body.get("force")), "purge": purge}
        if purge and "expires" in body:
            op["expires"] = body["expires"]
        ended: set[int] = set()  # generations that may end with it
        if body.get("snapshot") is not None and not purge:
            snap = snapshot_named(vdi, body["snapshot"])
            op["snapshot"] = snap.id
            ended = {snap.root.generation, *snap.lineage}
        result = await self.broadcast(op)
        dead = [Root.from_json(r) for r in result.value["dead"]]
        freed = await self.gc.collect(dead)
        # Its lineage too: a generation every live tree has left has no use for masks.
        await self.gc.forget_generations(ended | {root.generation for root in dead}
                                         | Vdi.from_json(result.value["vdi"]).generations())
        return {"name": vdi.name, "snapshot": body.get("snapshot"), "freed_objects": freed}

    async def list(self, body: dict[str, Any], header: Header) -> Any:
        names = body.get("names")
        if names is not None and (not isinstance(names, list)
                                  or not all(isinstance(name, str) for name in names)):
            raise InvalidParameters("names must be a list of VDI names")
        usage = body.get("usage", True)
        trash = bool(body.get("trash"))  # the VDIs in the trash, and only them
        result = []
        for vdi in list(self.group.state.vdis.vdis.values()):
            if names and vdi.name not in names or (vdi.trash is not None) != trash:
                continue
            entries: list[tuple[Snapshot | None, Root, int, float]] = [
                (None, vdi.root, vdi.size, vdi.ctime)]
            entries += [(snap, snap.root, snap.size, snap.time) for snap in vdi.snapshots]
            for snap, root, size, ctime in entries:
                item: dict[str, Any] = {
                    "name": vdi.name, "id": snap.id if snap else vdi.id, "size": size,
                    "ctime": ctime, "snapshot": snap is not None,
                    "tag": snap.tag if snap else "", "copies": vdi.copies,
                    "parent": vdi.parent, "generation": root.generation,
                    "lock": None if snap else vdi.lock, "vdi_id": vdi.id,
                    "unsettled": False if snap else vdi.unsettled, "attrs": len(vdi.attrs),
                    "qos": None if snap else vdi.qos,
                    # Changed since its latest snapshot (or its creation): its own root
                    # node was made (None in states from before the flag).
                    "written": False if snap else vdi.root.made, "trash": vdi.trash}
                if usage:
                    used, shared = await self._usage(root)
                    item["used"] = used
                    item["shared"] = shared
                result.append(item)
        return result

    async def _usage(self, root: Root) -> tuple[int, int]:
        """Bytes in data objects this root's generation wrote, and in those it shares."""
        node = await self.engine().root_node(root)
        if node == 0:
            return 0, 0
        objects = await self.engine().walk(node)
        object_size = self.group.state.object_size
        used = shared = 0
        for oid in objects:
            if radix.is_data(oid):
                if radix.generation_of(oid) == root.generation:
                    used += object_size
                else:
                    shared += object_size
        return used, shared

    async def setattr(self, body: dict[str, Any], header: Header) -> Any:
        vdi = vdi_named(self.group, body.get("name"))
        # JSON carries lone surrogates (undecodable bytes from argv or stdin) that
        # are not text: refused here, they never reach the state machine.
        for part in ("key", "value"):
            if not _is_text(body.get(part)):
                raise InvalidParameters(f"attribute {part} must be valid UTF-8 text")
        await self.broadcast({"type": "vdi_setattr", "name": vdi.name, "key": body.get("key"),
                              "value": body.get("value"),
                              "exclusive": bool(body.get("exclusive"))})
        return {}

    async def getattr(self, body: dict[str, Any], header: Header) -> Any:
        vdi = vdi_named(self.group, body.get("name"))
        key = body.get("key")
        if key is None:
            return dict(vdi.attrs)
        if not isinstance(key, str):
            raise InvalidParameters(f"an attribute key is text, not {type(key).__name__}")
        if key not in vdi.attrs:
            raise NoObject(f"VDI {vdi.name!r} has no attribute {key!r}")
        return {"key": key, "value": vdi.attrs[key]}

    async def locate(self, body: dict[str, Any], header: Header) -> Any:
        vdi = vdi_named(self.group, body.get("name"))
        root, size = vdi.root, vdi.size
        if body.get("snapshot") is not None:
            snap = snapshot_named(vdi, body["snapshot"])
            root, size = snap.root, snap.size
        object_size = self.group.state.object_size
        index = body.get("index", 0)
        count = -(-size // object_size)
        if not isinstance(index, int) or not 0 <= index < count:
            raise InvalidParameters(f"index must be 0 to {count - 1}, not {index!r}")
        oid = await self.engine().lookup(root, index)
        value: dict[str, Any] = {"name": vdi.name, "index": index, "oid": oid,
                                 "offset": index * object_size, "object_size": object_size}
        if oid:
            data, _ = await self.gateway.request(Op.STAT_OBJ, oid)
            value.update(proto.decode_json(data))
        return value

    async def diff(self, body: dict[str, Any], header: Header) -> Any:
        """What changed in a window of a snapshot (or of an idle VDI) since an earlier
        snapshot, or everything it holds (sheep/vdi_diff.py)."""
        vdi = vdi_named(self.group, body.get("name"))
        to = body.get("snapshot")
        if to is None:
            if vdi.lock is not None:
                raise VdiLocked(f"VDI {vdi.name!r} is being written"
                                f" ({vdi.lock.get('owner') or 'locked'}): diff a snapshot of it")
            root, lineage, size = vdi.root, vdi.lineage, vdi.size
            state: list[Any] = [vdi.id, vdi.root.generation, vdi.locks]
        else:
            snap = snapshot_named(vdi, to)
            root, lineage, size = snap.root, snap.lineage, snap.size
            state = [vdi.id, snap.id]
        since = body.get("from")
        since_root = snapshot_named(vdi, since).root if since is not None else None
        offset, length = body.get("offset"), body.get("length")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in (offset, length)):
            raise InvalidParameters("a diff takes a window: offset and length in bytes")
        assert isinstance(offset, int) and isinstance(length, int)
        cluster = self.group.state
        ranges = await vdi_diff.diff(self.engine(), self.objects, cluster.vdis,
                                     cluster.object_size, root, lineage, size, since_root,
                                     offset, length)
        return {"size": size, "object_size": cluster.object_size, "ranges": ranges,
                "state": state}

    async def alter_copy(self, body: dict[str, Any], header: Header) -> Any:
        """The VDI's objects keep this many copies from now on; every sheep's recovery
        adds or drops copies (Sheep._apply triggers it)."""
        vdi = vdi_named(self.group, body.get("name"))
        result = await self.broadcast({"type": "vdi_alter_copy", "name": vdi.name,
                                       "copies": body.get("copies")})
        return result.value

    async def trash(self, body: dict[str, Any], header: Header) -> Any:
        """Move a VDI into the trash ({"action": "mv", "expires_in": seconds or
        null}) or back out of it ({"action": "restore"})."""
        action = body.get("action")
        if action == "mv":
            vdi = vdi_named(self.group, body.get("name"))
            result = await self.broadcast({"type": "vdi_trash", "name": vdi.name,
                                           "expires_in": body.get("expires_in")})
        elif action == "restore":
            vdi = vdi_named(self.group, body.get("name"), trashed=True)
            result = await self.broadcast({"type": "vdi_untrash", "name": vdi.name})
        else:
            raise InvalidParameters(f"trash action is 'mv' or 'restore', not {action!r}")
        return result.value

    async def du(self, body: dict[str, Any], header: Header) -> Any:
        """Provisioned, used and exclusive bytes of a VDI's images (or of all VDIs)."""
        name = body.get("name")
        if name is not None:
            vdi_named(self.group, name)
        return await vdi_du.usage(self.engine(), self.group, None if name is None else [name])

    async def qos(self, body: dict[str, Any], header: Header) -> Any:
        """Set or clear a VDI's I/O limits (through the log: every sheep that serves
        the VDI enforces them), or with no limit named, show them."""
        vdi = vdi_named(self.group, body.get("name"))
        change = {key: body[key] for key in ("iops", "bps", "burst", "clear")
                  if body.get(key) is not None}
        if not change:
            return {"name": vdi.name, "qos": vdi.qos}
        result = await self.broadcast({"type": "vdi_qos", "name": vdi.name, **change})
        return {"name": vdi.name, "qos": result.value.get("qos")}

    async def unlock(self, body: dict[str, Any], header: Header) -> Any:
        vdi = vdi_named(self.group, body.get("name"))
        result = await self.broadcast({"type": "vdi_unlock", "name": vdi.name})
        return result.value
