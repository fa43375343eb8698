"""The ``sheep`` command as a user runs it: daemonizing, refusals, SIGTERM, restarts.

These run the installed console script in subprocesses, without -f, so the
daemon forks away from the test. Every daemon is found by DIR/sheep.pid and
stopped by that PID; a teardown SIGKILLs whatever a failed test left running.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from sheep.client import Client, SyncClient
from sheep.errors import (
    AlreadyFormatted,
    Exists,
    NetworkError,
    NoObject,
    NoTag,
    NoVdi,
    SheepError,
    ShuttingDown,
)
from sheep.oid import ObjectType, make_oid
from sheep.testing.cluster import free_port
from sheep.testing.inprocess import InProcessCluster

command_timeout_s = 30.0
exit_within_s = 5.0
_log_record = struct.Struct("<II")  # the local driver's log: u32 length, u32 crc32, JSON


def sheep_program() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "sheep")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "sheep"]


def run_sheep(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*sheep_program(), *args], capture_output=True, text=True,
                          timeout=command_timeout_s, env=env, stdin=subprocess.DEVNULL)


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie (a daemon is not our child)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("State:"):
                    return "Z" not in line.split()[1]
    except FileNotFoundError:
        return False
    return False


def wait_gone(pid: int, timeout_s: float = exit_within_s) -> float:
    started = time.monotonic()
    while running(pid):
        assert time.monotonic() - started < timeout_s, f"pid {pid} still running"
        time.sleep(0.02)
    return time.monotonic() - started


def read_pid(directory: str) -> int:
    with open(os.path.join(directory, "sheep.pid")) as file:
        return int(file.read())


class Daemons:
    """The daemons a test started, by PID, each checked to run on its own directory."""

    def __init__(self) -> None:
        self.pids: dict[int, str] = {}

    def start(self, directory: str, *args: str, env: dict[str, str] | None = None) -> int:
        result = run_sheep(directory, *args, env=env)
        assert result.returncode == 0, result.stderr
        pid = read_pid(directory)
        assert running(pid)
        self.pids[pid] = directory
        return pid

    def signal(self, pid: int, signum: int) -> None:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            assert self.pids[pid].encode() in file.read(), "pid reused by another process"
        os.kill(pid, signum)

    def kill_all(self) -> None:
        for pid in self.pids:
            try:
                if running(pid):
                    self.signal(pid, signal.SIGKILL)
            except (OSError, AssertionError):
                continue


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    started = Daemons()
    yield started
    started.kill_all()


def driver_log(directory: str) -> list[dict]:
    """The records of a local driver's shared log."""
    with open(os.path.join(directory, "log"), "rb") as file:
        data = file.read()
    records, position = [], 0
    while position + _log_record.size <= len(data):
        length, _ = _log_record.unpack_from(data, position)
        start = position + _log_record.size
        records.append(json.loads(data[start:start + length]))
        position = start + length
    return records


def members(port: int) -> set[str]:
    with SyncClient("127.0.0.1", port) as client:
        return {node["node_id"] for node in client.cluster_info()["members"]}


def wait_members(port: int, count: int, timeout_s: float = 10.0) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while len(seen := members(port)) != count:
        assert time.monotonic() < deadline, f"sheep on {port} sees {seen}"
        time.sleep(0.02)
    return seen


def node_id(port: int) -> str:
    with SyncClient("127.0.0.1", port) as client:
        return str(client.node_info()["node_id"])


def test_daemon_lifecycle_and_refusals(tmp_path, daemons, monkeypatch):
    driver = f"local:{tmp_path / 'cluster'}"
    monkeypatch.setenv("DOG_KEYRING", str(tmp_path / "cluster" / "keyring"))  # the first made it
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    port_a, port_b = free_port(), free_port()
    pid_a = daemons.start(a, "-p", str(port_a), "-c", driver)
    pid_b = daemons.start(b, "-p", str(port_b), "-c", driver, "-z", "7")
    # The command returned 0 only once the sheep had joined: no waiting needed here.
    with SyncClient("127.0.0.1", port_b) as client:
        assert client.ping()["joined"]
        info = client.node_info()
    assert info["pid"] == pid_b and info["zone"] == 7
    assert pid_a != pid_b and os.getpid() not in (pid_a, pid_b)
    with open(os.path.join(b, "sheep.log")) as log:
        assert "joined" in log.read()
    assert len(members(port_a)) == 2
    id_b = node_id(port_b)

    busy_dir = run_sheep(b, "-p", str(free_port()), "-c", driver)
    assert busy_dir.returncode != 0
    assert "in use" in busy_dir.stderr and str(pid_b) in busy_dir.stderr
    busy_port = run_sheep(str(tmp_path / "c"), "-p", str(port_a), "-c", driver)
    assert busy_port.returncode != 0 and "already in use" in busy_port.stderr
    assert running(pid_a) and running(pid_b) and len(members(port_a)) == 2

    daemons.signal(pid_b, signal.SIGTERM)
    print(f"\ndaemon gone {wait_gone(pid_b) * 1000:.0f} ms after SIGTERM")
    assert not os.path.exists(os.path.join(b, "sheep.pid"))
    assert wait_members(port_a, 1) == {node_id(port_a)}
    leaves = [r for r in driver_log(str(tmp_path / "cluster")) if r["kind"] == "leave"]
    assert [(r["node_id"], r["reason"]) for r in leaves] == [(id_b, "leave")]

    pid_b = daemons.start(b, "-p", str(port_b), "-c", driver, "-z", "7")
    assert node_id(port_b) == id_b
    assert wait_members(port_a, 2) == {node_id(port_a), id_b}
    for pid in (pid_a, pid_b):
        daemons.signal(pid, signal.SIGTERM)
    for pid in (pid_a, pid_b):
        wait_gone(pid)


def test_unusable_store_directories_are_refused(tmp_path):
    regular_file = tmp_path / "file"
    regular_file.write_text("not a directory")
    under_file = run_sheep(str(regular_file / "store"), "-p", str(free_port()),
                           "-c", f"local:{tmp_path / 'cluster'}")
    assert under_file.returncode != 0
    assert "cannot create store directory" in under_file.stderr
    assert "Not a directory" in under_file.stderr
    assert under_file.stderr.count("\n") == 1  # one clear line, no traceback

    is_file = run_sheep(str(regular_file), "-p", str(free_port()))
    assert is_file.returncode != 0 and "is a file" in is_file.stderr
    assert "Traceback" not in is_file.stderr

    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
        refused = run_sheep(str(read_only), "-p", str(free_port()))
        assert refused.returncode != 0 and "cannot write" in refused.stderr


@pytest.mark.parametrize("args, code, message", [
    (["-c", "local:{file}/cluster"], 1, "cannot use cluster directory"),  # told by the daemon
    (["-c", "corosync:x"], 64, "unknown cluster driver"),
    (["-c", "zookeeper:x"], 64, "invalid ZooKeeper address 'x': use HOST:PORT"),
    (["-c", "zookeeper:h:2181/p?timeout=0"], 64, "use ?timeout=SECONDS"),
    (["-w", "12Q"], 64, "invalid size '12Q'"),
    (["-b", "192.0.2.1"], 1, "not an address of this host"),
    (["-z", "-1"], 64, "-z"),
], ids=["cluster-dir-under-file", "driver", "zookeeper-address", "zookeeper-timeout", "weight",
      "address", "zone"])
def test_bad_start_arguments_get_one_clear_line(tmp_path, args, code, message):
    regular_file = tmp_path / "file"
    regular_file.write_text("")
    store = tmp_path / "store"
    result = run_sheep(str(store), "-p", str(free_port()),
                       *[arg.format(file=regular_file) for arg in args])
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    deadline = time.monotonic() + exit_within_s  # a daemon that failed to join cleans up
    while (store / "sheep.pid").exists():
        assert time.monotonic() < deadline, "the failed daemon left its pid file"
        time.sleep(0.02)


def test_seed_one_liner_with_the_default_driver(tmp_path, daemons, monkeypatch):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    # The first sheep makes the cluster's node keyring; the client finds it where dog
    # does on one box, without being told.
    monkeypatch.delenv("DOG_KEYRING", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}"}
    ports = [free_port() for _ in range(3)]
    store = tmp_path / "store"
    one_liner = ("for i in 0 1 2; do sheep " + str(store) + "/$i -p ${PORTS[$i]} -z $i"
                 " || exit 1; done")
    script = f"PORTS=({' '.join(map(str, ports))}); {one_liner}"
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "sheep")):
        pytest.skip("the sheep console script is not installed")
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                            timeout=command_timeout_s, stdin=subprocess.DEVNULL)
    for i in range(3):  # register before asserting, so the teardown finds every daemon
        if os.path.exists(store / str(i) / "sheep.pid"):
            daemons.pids[read_pid(str(store / str(i)))] = str(store / str(i))
    assert result.returncode == 0, result.stderr
    assert len(daemons.pids) == 3
    for port in ports:
        assert len(members(port)) == 3
    with SyncClient("127.0.0.1", ports[0]) as client:
        info = client.cluster_info()
        assert info["driver"]["directory"].startswith(str(runtime))
        client.format(3, 4 << 20)
        client.create_and_write(make_oid(ObjectType.RAW, 1, 1), b"seed", 0)
    with SyncClient("127.0.0.1", ports[2]) as client:
        assert client.read(make_oid(ObjectType.RAW, 1, 1), 0, 4) == b"seed"
    for pid in daemons.pids:
        daemons.signal(pid, signal.SIGTERM)
    for pid in daemons.pids:
        wait_gone(pid)


@pytest.mark.parametrize("delay_s", [0.0, 0.03, 0.06, 0.1])
def test_sigterm_during_startup_exits_and_leaves(tmp_path, delay_s):
    """SIGTERM right after the pid file appears, while the sheep is still joining."""
    store, cluster = tmp_path / "store", tmp_path / "cluster"
    with open(tmp_path / "stderr.log", "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "sheep", str(store), "-f", "-p", str(free_port()),
             "-c", f"local:{cluster}"], stdout=stderr, stderr=stderr, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + command_timeout_s
        while not (store / "sheep.pid").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(delay_s)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=exit_within_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code in (0, -signal.SIGTERM), (tmp_path / "stderr.log").read_text()
    records = driver_log(str(cluster)) if (cluster / "log").exists() else []
    joined = [r["node"]["node_id"] for r in records if r["kind"] == "join"]
    left = [r["node_id"] for r in records if r["kind"] == "leave" and r["reason"] == "leave"]
    assert joined == left, records


def test_sigterm_finishes_in_flight_writes_and_exits_0(make_cluster):
    """SIGTERM while 16 writes are in flight through the sheep: it exits 0, and every
    write it acknowledged is on the cluster afterwards; the others fail cleanly."""
    cluster = make_cluster(3)
    cluster.format(copies=2)
    acknowledged: list[int] = []
    failures: list[SheepError] = []
    busy = threading.Event()

    async def writers() -> None:
        client = await Client.connect("127.0.0.1", cluster.sheep[1].port,
                                      credentials=cluster.credentials)
        oids = iter(range(100_000))

        async def one_writer() -> None:
            for index in oids:
                oid = make_oid(ObjectType.RAW, 2, index)
                try:
                    await client.create_and_write(oid, oid.to_bytes(8, "little") * 8192)
                except SheepError as error:  # the sheep is going away: unacknowledged
                    failures.append(error)
                    return
                acknowledged.append(oid)
                if len(acknowledged) >= 100:
                    busy.set()

        try:
            await asyncio.gather(*(one_writer() for _ in range(16)))
        finally:
            client.close()

    thread = threading.Thread(target=asyncio.run, args=(writers(),))
    thread.start()
    assert busy.wait(20)
    assert cluster.stop(1) == 0
    thread.join(timeout=30)
    assert len(failures) == 16, failures
    assert all(isinstance(f, ShuttingDown | NetworkError) for f in failures), failures
    cluster.wait_epoch(0, members=2)

    async def check() -> None:
        client = await Client.connect("127.0.0.1", cluster.sheep[2].port,
                                      credentials=cluster.credentials)
        try:
            for oid in acknowledged:
                assert await client.read(oid, 0, 8) == oid.to_bytes(8, "little"), f"{oid:016x}"
        finally:
            client.close()

    asyncio.run(check())
    print(f"\n{len(acknowledged)} writes acknowledged, then "
          + ", ".join(sorted({type(f).__name__ for f in failures})))


def test_a_store_is_refused_by_a_cluster_log_that_never_knew_it(tmp_path, daemons,
                                                              monkeypatch):
    """A store that applied more of a log than a (new, other) log holds must not hang
    waiting for its join: it refuses to start, naming both."""
    monkeypatch.setenv("DOG_KEYRING", str(tmp_path / "first" / "keyring"))
    store = str(tmp_path / "store")
    port = free_port()
    pid = daemons.start(store, "-p", str(port), "-c", f"local:{tmp_path / 'first'}")
    with SyncClient("127.0.0.1", port) as client:
        client.format(1, 4 << 20)
        client.vdi_create("kept", 1 << 20)
    daemons.signal(pid, signal.SIGTERM)
    wait_gone(pid)
    result = run_sheep(store, "-p", str(port), "-c", f"local:{tmp_path / 'second'}")
    assert result.returncode != 0
    message = result.stderr.strip()
    assert "belongs to another cluster log" in message and "second" in message, message
    assert len(message.splitlines()) == 1
    restarted = daemons.start(store, "-p", str(port), "-c", f"local:{tmp_path / 'first'}")
    with SyncClient("127.0.0.1", port) as client:
        assert [v["name"] for v in client.vdi_list(usage=False)] == ["kept"]
    daemons.signal(restarted, signal.SIGTERM)


def test_refused_cluster_ops_never_reach_the_cluster_log(tmp_path, daemons, monkeypatch):
    """Every sheep applies the log forever: an op the state refuses is refused before
    it is logged, so no client can grow the log with ops that do nothing."""
    monkeypatch.setenv("DOG_KEYRING", str(tmp_path / "cluster" / "keyring"))
    port = free_port()
    daemons.start(str(tmp_path / "s"), "-p", str(port), "-c", f"local:{tmp_path / 'cluster'}")
    with SyncClient("127.0.0.1", port) as client:
        client.format(1, 4 << 20)
        client.vdi_create("a", 1 << 20)
        before = len(driver_log(str(tmp_path / "cluster")))
        refusals = [
            (lambda: client.vdi_create("a", 1 << 20), Exists),
            (lambda: client.vdi_delete("missing"), NoVdi),
            (lambda: client.format(1, 4 << 20), AlreadyFormatted),
            (lambda: client.vdi_snapshot("missing"), NoVdi),
            (lambda: client.auth_rm("client.nobody"), NoObject),
            (lambda: client.vdi_clone("a", "nosuchsnap", "b"), NoTag),
        ]
        for call, error in refusals:
            with pytest.raises(error):
                call()
        assert len(driver_log(str(tmp_path / "cluster"))) == before
        client.vdi_create("b", 1 << 20)  # an accepted op is logged, once
        assert len(driver_log(str(tmp_path / "cluster"))) == before + 1


def test_a_stop_whose_final_sync_breaks_still_stops(tmp_path):
    """A bug in the last sync (a value that no longer packs, say) must not leave
    SIGTERM hanging: the sheep logs it, leaves and stops, and its store is closed."""
    with InProcessCluster(str(tmp_path), nodes=1) as cluster:
        sheep = cluster.sheep[0]

        def broken_sync() -> None:
            raise struct.error("required argument is not an integer")

        sheep.store.sync = broken_sync  # type: ignore[method-assign]
        cluster.run(sheep.stop(), timeout_s=30)
        assert sheep.stopped.is_set()
        assert sheep.store._env is None  # closed whatever the sync did


def test_a_store_of_a_newer_format_is_refused_at_start(tmp_path):
    """The operator hears why on the terminal, and the sheep does not run."""
    from sheep.errors import EXIT_FAILURE
    from sheep.store import Store
    from sheep.store import store as store_module

    path = str(tmp_path / "store")
    made = Store(path)
    made.open()
    made.config_put("format_version", store_module.format_version + 1)
    made.close()
    result = subprocess.run([sys.executable, "-m", "sheep", path, "-p", str(free_port()),
                             "-c", f"local:{tmp_path / 'cluster'}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_FAILURE, result
    assert (f"is of format version {store_module.format_version + 1}, newer than this"
            " sheep's") in result.stderr, result.stderr
