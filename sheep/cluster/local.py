"""The local cluster driver: one box, many sheep, one shared directory.

    DIR/log        append-only log of records: u32 length, u32 crc32, JSON
    DIR/log.lock   flock'ed by whoever appends
    DIR/members/   one file per member, flock'ed by that member while it lives

The log is the total order: a record's sequence number is its position. Every
sheep tails the log (polling), so all apply the same events in the same order.

Deaths are noticed through the kernel: a member holds an exclusive flock on its
own file for its whole life, and the kernel drops the lock when the process
dies, even by SIGKILL. The others probe those locks every
member_check_interval_ms; whoever first acquires a dead member's lock logs a
leave for it under the log lock (after catching up, so the leave is logged
once) and removes its file.

A writer killed halfway through an append leaves a partial record at the end;
the next appender, holding the log lock, knows no one is writing and cuts it.

All file work runs on one worker thread, so reads of the log never race.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import fcntl
import json
import logging
import os
import struct
import time
import zlib
from typing import Any

from sheep import constants
from sheep.cluster.driver import ClusterDriver
from sheep.cluster_state import Event, EventKind
from sheep.errors import SystemFailure, Timeout
from sheep.node import NodeInfo

log = logging.getLogger(__name__)

_record_header = struct.Struct("<II")
_record_max_bytes = 16 * 1024 * 1024
_member_lock_timeout_s = 10.0


def _member_file_name(node_id: str) -> str:
    return node_id.replace("/", "@")


class LocalDriver(ClusterDriver):
    name = "local"

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = os.path.abspath(directory)
        self.log_path = os.path.join(self.directory, "log")
        self.lock_path = os.path.join(self.directory, "log.lock")
        self.members_dir = os.path.join(self.directory, "members")
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="local-driver")
        self._offset = 0  # where the next unread record starts
        self._seq = 0  # sequence number of the last record read
        self._membership: dict[str, NodeInfo] = {}
        self._pending: collections.deque[Event] = collections.deque()
        self._from_seq = 0
        self._node: NodeInfo | None = None
        self._member_fd: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # --- the interface -----------------------------------------------------

    async def join(self, node: NodeInfo, from_seq: int) -> None:
        self._node = node
        self._from_seq = from_seq
        try:
            os.makedirs(self.members_dir, mode=0o700, exist_ok=True)
            # The log holds the cluster's principals and their keys: the owner's only.
            if os.stat(self.directory).st_mode & 0o077:
                os.chmod(self.directory, 0o700)
        except OSError as error:
            raise SystemFailure(
                f"cannot use cluster directory {self.directory}: {error.strerror}") from error
        await self._run(self._lock_own_member_file)
        try:
            await self._run(self._append_join)
        except SystemFailure:
            await self._run(self._release_own_member_file)
            raise
        self._drain()
        self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def broadcast(self, op_id: str, body: dict[str, Any]) -> None:
        assert self._node is not None, "broadcast before join"
        record = {"kind": EventKind.OP.value, "node_id": self._node.node_id, "op_id": op_id,
                  "body": body}
        await self._run(self._append, [record])
        self._drain()

    async def leave(self) -> None:
        if self._node is None or self._closed:
            return
        record = {"kind": EventKind.LEAVE.value, "node_id": self._node.node_id,
                  "reason": "leave"}
        await self._run(self._append, [record])
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._run(self._release_own_member_file)
        self._executor.shutdown(wait=True)

    def info(self) -> dict[str, Any]:
        return {"driver": self.name, "directory": self.directory}

    # --- asyncio side --------------------------------------------------------

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _drain(self) -> None:
        while self._pending:
            self.events.put_nowait(self._pending.popleft())

    async def _poll_forever(self) -> None:
        next_probe = 0.0
        while True:
            await asyncio.sleep(constants.driver_poll_interval_ms / 1000)
            now = time.monotonic()
            probe = now >= next_probe
            if probe:
                next_probe = now + constants.member_check_interval_ms / 1000
            try:
                await self._run(self._poll_once, probe)
            except Exception:
                log.exception("local driver poll failed")
            self._drain()

    # --- worker-thread side ------------------------------------------------

    def _lock_own_member_file(self) -> None:
        assert self._node is not None
        path = os.path.join(self.members_dir, _member_file_name(self._node.node_id))
        deadline = time.monotonic() + _member_lock_timeout_s
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise Timeout(f"member file {path} stays locked by another process") from None
                time.sleep(0.05)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._member_fd = fd
                return
            os.close(fd)  # a prober removed the file under us: take the new one

    def _release_own_member_file(self) -> None:
        if self._member_fd is None:
            return
        assert self._node is not None
        if not self._node_is_member_at_end():
            path = os.path.join(self.members_dir, _member_file_name(self._node.node_id))
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.close(self._member_fd)
        self._member_fd = None

    def _node_is_member_at_end(self) -> bool:
        assert self._node is not None
        self._read_new()
        return self._node.node_id in self._membership

    def _append_join(self) -> None:
        assert self._node is not None
        node = self._node
        with self._log_locked():
            self._catch_up_locked()
            if self._seq < self._from_seq:
                raise SystemFailure(
                    f"the cluster log {self.log_path} holds {self._seq} events, but this "
                    f"sheep's store has applied {self._from_seq}: the store belongs to another "
                    "cluster log (start it with the -c local:PATH it was created with, or use "
                    "a new store directory)")
            self.history_seq = self._seq
            records: list[dict[str, Any]] = []
            if node.node_id in self._membership:
                # We hold this node id's member lock, so that member is a dead incarnation.
                records.append({"kind": EventKind.LEAVE.value, "node_id": node.node_id,
                                "reason": "dead"})
            records += self._reap_locked(exclude=node.node_id)
            records.append({"kind": EventKind.JOIN.value, "node": node.to_json()})
            self._write_records_locked(records)

    def _append(self, records: list[dict[str, Any]]) -> None:
        with self._log_locked():
            self._catch_up_locked()
            self._write_records_locked(records)
            self._read_new()  # our own records: delivered now, not at the next poll

    def _poll_once(self, probe: bool) -> None:
        self._read_new()
        if not probe or self._node is None:
            return
        dead = [node_id for node_id in self._membership
                if node_id != self._node.node_id and self._probe_dead(node_id)]
        if not dead:
            return
        with self._log_locked():
            self._catch_up_locked()
            self._write_records_locked(self._reap_locked(exclude=self._node.node_id))

    def _probe_dead(self, node_id: str, remove: bool = False) -> bool:
        """True if no live process holds node_id's member lock; remove then drops its file.

        The file goes while we hold its lock: a restarting incarnation cannot lock it
        meanwhile, and one that locks it after we let go sees it unlinked and makes a
        new one. Unlinking after letting go could remove the file it had just locked.
        """
        path = os.path.join(self.members_dir, _member_file_name(node_id))
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            if remove:
                os.unlink(path)
        except BlockingIOError:
            return False
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)  # closing drops a lock we may have taken
        return True

    def _reap_locked(self, exclude: str) -> list[dict[str, Any]]:
        """Leave records for dead members; their files go. Caller holds the log lock."""
        records = []
        for node_id in list(self._membership):
            if node_id == exclude or not self._probe_dead(node_id, remove=True):
                continue
            log.warning("member %s is dead", node_id)
            records.append({"kind": EventKind.LEAVE.value, "node_id": node_id, "reason": "dead"})
        return records

    class _LockedLog:
        def __init__(self, path: str) -> None:
            self.path = path
            self.fd = -1

        def __enter__(self) -> None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)

        def __exit__(self, *exc: object) -> None:
            os.close(self.fd)

    def _log_locked(self) -> LocalDriver._LockedLog:
        return self._LockedLog(self.lock_path)

    def _catch_up_locked(self) -> None:
        """Read every whole record; cut a partial one a dead writer left behind."""
        self._read_new()
        try:
            size = os.path.getsize(self.log_path)
        except FileNotFoundError:
            return
        if size > self._offset:
            log.warning("cutting %d bytes of a torn record from %s", size - self._offset,
                        self.log_path)
            os.truncate(self.log_path, self._offset)

    def _write_records_locked(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        now = time.time()
        chunks = []
        for record in records:
            body = json.dumps({**record, "time": now}, separators=(",", ":")).encode()
            assert len(body) <= _record_max_bytes
            chunks.append(_record_header.pack(len(body), zlib.crc32(body)) + body)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = b"".join(chunks)
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.EIO, f"short append to {self.log_path}")
        finally:
            os.close(fd)

    def _read_new(self) -> None:
        try:
            fd = os.open(self.log_path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            if size <= self._offset:
                return
            data = os.pread(fd, size - self._offset, self._offset)
        finally:
            os.close(fd)
        position = 0
        while position + _record_header.size <= len(data):
            length, crc = _record_header.unpack_from(data, position)
            start = position + _record_header.size
            if length > _record_max_bytes or start + length > len(data):
                break
            body = data[start:start + length]
            if zlib.crc32(body) != crc:
                break  # being written, or torn: an appender will cut it
            position = start + length
            self._seq += 1
            self._consume(self._seq, json.loads(body))
        self._offset += position

    def _consume(self, seq: int, record: dict[str, Any]) -> None:
        event = Event.from_json({**record, "seq": seq})
        if event.kind is EventKind.JOIN:
            assert event.node is not None
            self._membership[event.node.node_id] = event.node
        elif event.kind is EventKind.LEAVE:
            self._membership.pop(event.node_id, None)
        if seq > self._from_seq:
            self._pending.append(event)
