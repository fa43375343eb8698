"""The local cluster driver: total order, replay, leaves, deaths, torn records, restarts.

Several LocalDriver instances share one directory inside one event loop (each
has its own worker thread, and flock treats their open files as strangers, as
it would separate processes). Deaths need a real process to SIGKILL, so those
tests start a small member script with the venv's python.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import sheep
from sheep import constants
from sheep.cluster import local
from sheep.cluster.local import LocalDriver
from sheep.cluster_state import Event, EventKind
from sheep.node import NodeInfo

repo_root = Path(sheep.__file__).resolve().parent.parent
wait_s = 3.0

member_script = """
import asyncio, json, sys
from sheep.cluster.local import LocalDriver
from sheep.node import NodeInfo

async def main():
    driver = LocalDriver(sys.argv[1])
    await driver.join(NodeInfo.from_json(json.loads(sys.argv[2])), 0)
    print("joined", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def make_node(number: int) -> NodeInfo:
    return NodeInfo(node_id=f"127.0.0.1:{7000 + number}/{number:08x}", address="127.0.0.1",
                    port=7000 + number, zone=number, weight=16 << 28)


def log_records(directory: Path) -> list[dict[str, Any]]:
    """Parse the whole log independently of the driver; every record must be whole."""
    data = (directory / "log").read_bytes()
    records = []
    position = 0
    while position < len(data):
        length, crc = struct.unpack_from("<II", data, position)
        body = data[position + 8:position + 8 + length]
        assert len(body) == length and zlib.crc32(body) == crc, "a torn record was left"
        records.append(json.loads(body))
        position += 8 + length
    return records


def leaves(records: list[dict[str, Any]], node_id: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "leave" and r["node_id"] == node_id]


class Member:
    """A driver and every event it has delivered so far."""

    def __init__(self, directory: Path, node: NodeInfo) -> None:
        self.driver = LocalDriver(str(directory))
        self.node = node
        self.events: list[Event] = []

    async def join(self, from_seq: int = 0) -> Member:
        await self.driver.join(self.node, from_seq)
        return self

    async def until(self, done: Callable[[list[Event]], bool], timeout_s: float = wait_s,
                    ) -> list[Event]:
        deadline = time.monotonic() + timeout_s
        while not done(self.events):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.node.node_id} timed out; saw {self.events}")
            try:
                event = await asyncio.wait_for(self.driver.events.get(), remaining)
            except TimeoutError:
                continue
            self.events.append(event)
        return self.events

    async def through(self, seq: int, timeout_s: float = wait_s) -> list[Event]:
        return await self.until(lambda events: bool(events) and events[-1].seq >= seq, timeout_s)

    async def quiet(self, seconds: float) -> list[Event]:
        """Whatever arrives within the next few seconds."""
        before = len(self.events)
        try:
            await self.until(lambda events: False, seconds)
        except AssertionError:
            pass
        return self.events[before:]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Callable[[int], Member]]:
    members: list[Member] = []

    def make(number: int) -> Member:
        member = Member(tmp_path, make_node(number))
        members.append(member)
        return member

    yield make
    for member in members:
        await member.driver.close()


def assert_consecutive(events: list[Event], first: int = 1) -> None:
    assert [event.seq for event in events] == list(range(first, first + len(events)))


def joins(events: list[Event]) -> list[str]:
    return [event.node.node_id for event in events
            if event.kind is EventKind.JOIN and event.node is not None]


# --- order and replay ---------------------------------------------------------------


async def test_members_see_identical_events(cluster: Callable[[int], Member]) -> None:
    members = [await cluster(number).join() for number in range(3)]
    for number, member in enumerate(members):
        await member.driver.broadcast(f"op-{number}", {"type": "test", "from": number})
    for member in members:
        await member.through(6)
    first = members[0].events
    assert_consecutive(first)
    assert [member.events for member in members[1:]] == [first, first]
    assert joins(first) == [make_node(number).node_id for number in range(3)]
    ops = first[3:]
    assert [(e.kind, e.op_id, e.node_id, e.body) for e in ops] == [
        (EventKind.OP, f"op-{number}", make_node(number).node_id, {"type": "test", "from": number})
        for number in range(3)]
    assert [event.node for event in first[:3]] == [make_node(number) for number in range(3)]
    assert all(event.time > 0 for event in first)


async def test_concurrent_broadcasts_land_once_in_one_order(
        cluster: Callable[[int], Member], tmp_path: Path) -> None:
    members = [await cluster(number).join() for number in range(3)]
    per_member = 20

    async def send_all(number: int) -> None:
        driver = members[number].driver
        await asyncio.gather(*(driver.broadcast(f"{number}:{index}", {"type": "test"})
                               for index in range(per_member)))

    await asyncio.gather(*(send_all(number) for number in range(3)))
    total = 3 + 3 * per_member
    for member in members:
        await member.through(total)
    first = members[0].events
    assert len(first) == total
    assert_consecutive(first)
    assert members[1].events == first and members[2].events == first
    op_ids = [event.op_id for event in first if event.kind is EventKind.OP]
    assert sorted(op_ids) == sorted(f"{n}:{i}" for n in range(3) for i in range(per_member))
    for number in range(3):  # each sender's ops keep the order it sent them in
        mine = [op for op in op_ids if op.startswith(f"{number}:")]
        assert mine == [f"{number}:{index}" for index in range(per_member)]
    assert len(log_records(tmp_path)) == total


async def test_late_joiners_replay_from_their_seq(
        cluster: Callable[[int], Member], tmp_path: Path) -> None:
    first = await cluster(0).join()
    for index in range(5):
        await first.driver.broadcast(f"op{index}", {"type": "test", "index": index})
    await first.through(6)

    replaying = await cluster(1).join(from_seq=0)
    events = await replaying.through(7)
    assert_consecutive(events)
    assert events[:6] == first.events
    assert events[6].kind is EventKind.JOIN and events[6].node == make_node(1)

    resuming = await cluster(2).join(from_seq=4)
    events = await resuming.through(8)
    assert_consecutive(events, first=5)
    assert [event.op_id for event in events[:2]] == ["op3", "op4"]
    assert joins(events) == [make_node(1).node_id, make_node(2).node_id]

    await first.through(8)
    assert resuming.events == first.events[4:]
    assert len(log_records(tmp_path)) == 8


async def test_graceful_leave_is_logged(cluster: Callable[[int], Member], tmp_path: Path) -> None:
    staying = await cluster(0).join()
    going = await cluster(1).join()
    await staying.through(2)
    await going.driver.leave()
    events = await staying.through(3)
    assert (events[2].kind, events[2].node_id, events[2].reason) == (
        EventKind.LEAVE, make_node(1).node_id, "leave")
    assert not (tmp_path / "members" / local._member_file_name(make_node(1).node_id)).exists()
    # No prober mistakes the departed member for a dead one later.
    assert await staying.quiet(2 * constants.member_check_interval_ms / 1000) == []
    assert len(leaves(log_records(tmp_path), make_node(1).node_id)) == 1
    await going.driver.leave()  # a second leave, after close, does nothing
    assert len(log_records(tmp_path)) == 3


# --- deaths ----------------------------------------------------------------------------


async def start_member_process(directory: Path, node: NodeInfo) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", member_script, str(directory), json.dumps(node.to_json()),
        cwd=repo_root, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 10)
    assert line == b"joined\n"
    return process


async def test_sigkilled_member_is_seen_dead_once(
        cluster: Callable[[int], Member], tmp_path: Path) -> None:
    observers = [await cluster(number).join() for number in range(3)]
    victim = make_node(9)
    process = await start_member_process(tmp_path, victim)
    try:
        for observer in observers:
            await observer.until(lambda events: victim.node_id in joins(events))
        killed_at = time.monotonic()
        process.send_signal(signal.SIGKILL)
        await process.wait()
        for observer in observers:
            await observer.until(lambda events: events[-1].kind is EventKind.LEAVE,
                                 constants.member_death_detect_ms_max / 1000)
        assert time.monotonic() - killed_at < constants.member_death_detect_ms_max / 1000
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    leave = observers[0].events[-1]
    assert (leave.node_id, leave.reason) == (victim.node_id, "dead")
    # Every observer probed it; one leave is logged, and all agree on it.
    await asyncio.sleep(2 * constants.member_check_interval_ms / 1000)
    records = log_records(tmp_path)
    assert len(leaves(records, victim.node_id)) == 1
    for observer in observers:
        await observer.through(len(records))
    assert observers[1].events == observers[0].events == observers[2].events
    assert len(observers[0].events) == len(records)
    assert not (tmp_path / "members" / local._member_file_name(victim.node_id)).exists()


async def test_closed_member_is_seen_dead(cluster: Callable[[int], Member], tmp_path: Path) -> None:
    observer = await cluster(0).join()
    closing = await cluster(1).join()
    await observer.through(2)
    await closing.driver.close()  # no leave logged: the others notice the lock is gone
    events = await observer.through(3, constants.member_death_detect_ms_max / 1000)
    assert (events[2].kind, events[2].node_id, events[2].reason) == (
        EventKind.LEAVE, make_node(1).node_id, "dead")


# --- torn records ------------------------------------------------------------------------


def append_torn(directory: Path, kind: str) -> None:
    body = json.dumps({"kind": "op", "node_id": "ghost", "op_id": "torn", "body": {},
                       "time": 1.0}).encode()
    record = struct.pack("<II", len(body), zlib.crc32(body)) + body
    if kind == "header":
        torn = record[:5]
    elif kind == "body":
        torn = record[:len(record) // 2]
    else:  # all its bytes are there, but not the right ones
        torn = record[:-3] + b"???"
    with open(directory / "log.lock", "a") as lock:  # as its writer did, before it died
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(directory / "log", "ab") as log_file:
            log_file.write(torn)


@pytest.mark.parametrize("kind", ["header", "body", "garbled"])
async def test_torn_record_is_cut_by_the_next_appender(
        cluster: Callable[[int], Member], tmp_path: Path, kind: str) -> None:
    members = [await cluster(number).join() for number in range(2)]
    for member in members:
        await member.through(2)
    append_torn(tmp_path, kind)
    # Readers stop before the torn bytes and deliver nothing from them.
    assert await members[0].quiet(3 * constants.driver_poll_interval_ms / 1000) == []
    await members[1].driver.broadcast("after", {"type": "test"})
    for member in members:
        await member.through(3)
    assert members[0].events == members[1].events
    assert (members[0].events[2].seq, members[0].events[2].op_id) == (3, "after")
    assert len(log_records(tmp_path)) == 3  # the torn bytes are gone
    late = await cluster(2).join()
    events = await late.through(4)
    assert events[:3] == members[0].events
    assert "torn" not in [event.op_id for event in events]


# --- restarts --------------------------------------------------------------------------------


async def test_restart_with_old_incarnation_listed(
        cluster: Callable[[int], Member], tmp_path: Path) -> None:
    old = await cluster(5).join()
    await old.through(1)
    await old.driver.close()  # dies: its file stays and no leave is logged
    new = await cluster(5).join()
    events = await new.through(3)
    node_id = make_node(5).node_id
    assert [(e.seq, e.kind, e.node_id or e.node.node_id, e.reason) for e in events  # type: ignore[union-attr]
            ] == [(1, EventKind.JOIN, node_id, ""), (2, EventKind.LEAVE, node_id, "dead"),
                  (3, EventKind.JOIN, node_id, "")]
    assert (tmp_path / "members" / local._member_file_name(node_id)).exists()


async def test_restart_under_watch_is_not_reaped(
        cluster: Callable[[int], Member], tmp_path: Path) -> None:
    watcher = await cluster(0).join()
    old = await cluster(5).join()
    await watcher.through(2)
    node_id = make_node(5).node_id
    await old.driver.close()
    new = await cluster(5).join()  # the watcher may or may not have reaped the old one yet
    events = await watcher.until(lambda events: joins(events).count(node_id) == 2)
    tail = events[2:]
    assert [(e.kind, e.reason) for e in tail] == [(EventKind.LEAVE, "dead"), (EventKind.JOIN, "")]
    assert tail[0].node_id == node_id
    # The new incarnation holds its lock: nobody declares it dead.
    assert await watcher.quiet(3 * constants.member_check_interval_ms / 1000) == []
    assert (await new.through(4))[-1].kind is EventKind.JOIN


def test_reaper_never_removes_a_file_a_restarted_member_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member restarting just as a prober reaps its old incarnation keeps a live lock.

    Drives the worker-thread side directly, and starts the restart inside the
    reaper's unlink of the member file, the narrowest window there is.
    """
    prober = LocalDriver(str(tmp_path))
    old = LocalDriver(str(tmp_path))
    new = LocalDriver(str(tmp_path))
    node = make_node(5)
    prober._node, old._node, new._node = make_node(0), node, node
    os.makedirs(prober.members_dir)
    try:
        for driver in (prober, old):
            driver._lock_own_member_file()
            driver._append_join()
        assert old._member_fd is not None
        os.close(old._member_fd)  # SIGKILL: the kernel drops the lock, the file stays
        old._member_fd = None
        member_path = os.path.join(prober.members_dir, local._member_file_name(node.node_id))
        real_unlink = os.unlink
        restart = threading.Thread(target=new._lock_own_member_file)

        def unlink_during_restart(path: Any, *args: Any, **kwargs: Any) -> None:
            if os.fspath(path) == member_path and not restart.is_alive():
                restart.start()
                restart.join(0.3)
            real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", unlink_during_restart)
        prober._poll_once(probe=True)
        restart.join(5)
        monkeypatch.undo()
        assert new._member_fd is not None
        assert os.fstat(new._member_fd).st_ino == os.stat(member_path).st_ino
        new._append_join()
        prober._poll_once(probe=True)  # must not find the new incarnation dead
        prober._read_new()
        assert [(r["kind"], r.get("reason")) for r in log_records(tmp_path)] == [
            ("join", None), ("join", None), ("leave", "dead"), ("join", None)]
        assert node.node_id in prober._membership
    finally:
        for driver in (prober, old, new):
            if driver._member_fd is not None:
                os.close(driver._member_fd)
            driver._executor.shutdown()
