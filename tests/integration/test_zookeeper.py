"""The ZooKeeper driver's own behaviour: fencing when a sheep loses ZooKeeper, the
others going on without it, and its return as a fresh member that catches up. One
sheep's link to ZooKeeper goes through a TCP proxy the test cuts and restores."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from kazoo.exceptions import NoAuthError

from sheep.cluster.driver import make_driver
from sheep.cluster.zookeeper import ZooKeeperDriver, digest_password, digest_user
from sheep.cluster_state import Event, EventKind
from sheep.errors import PermissionDenied, SheepError, SystemFailure, Unavailable
from sheep.node import NodeInfo
from sheep.testing.cluster import LocalCluster
from sheep.testing.inprocess import InProcessCluster
from sheep.testing.proxy import TcpProxy
from tests.conftest import ZOOKEEPER_SESSION_TIMEOUT_S

MiB = 1 << 20


def write(cluster: LocalCluster, index: int, name: str, offset: int, data: bytes) -> None:
    with cluster.client(index) as client:
        handle = client.vdi_open(name, writable=True)["handle"]
        client.vdi_write(handle, offset, data)
        client.vdi_close(handle)


def read(cluster: LocalCluster, index: int, name: str, offset: int, count: int) -> bytes:
    with cluster.client(index) as client:
        handle = client.vdi_open(name)["handle"]
        data = client.vdi_read(handle, offset, count)
        client.vdi_close(handle)
    return data


def wait_for(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def dog(cluster: LocalCluster, index: int, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dog", *args, "-p",
                             str(cluster.sheep[index].port)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def dog_info(cluster: LocalCluster, index: int) -> dict:
    return json.loads(dog(cluster, index, "cluster", "info", "--json"))


def fenced(cluster: LocalCluster, index: int) -> bool:
    try:
        read(cluster, index, "disk", 0, 1)
    except Unavailable as error:
        return "fenced" in error.message
    except SheepError:
        return False
    return False


def test_a_sheep_cut_off_from_zookeeper_is_fenced_and_comes_back_current(
        tmp_path, zookeeper_server):
    prefix = f"/fencing{os.getpid()}"
    spec = f"zookeeper:{{}}{prefix}?timeout={ZOOKEEPER_SESSION_TIMEOUT_S}"
    proxy = TcpProxy(zookeeper_server.port)
    cluster = LocalCluster(str(tmp_path / "cluster"), 3,
                           driver=spec.format(zookeeper_server.hosts))
    cluster.sheep[2].driver = spec.format(f"127.0.0.1:{proxy.port}")
    try:
        cluster.start()
        cluster.format(2)
        with cluster.client(0) as client:
            client.vdi_create("disk", 32 * MiB)
        before = os.urandom(8 * MiB)
        write(cluster, 0, "disk", 0, before)
        # Every sheep's session: the server it uses, the negotiated timeout, its state.
        shown = dog_info(cluster, 0)
        servers = {session["node"]: session["server"] for session in shown["sessions"]}
        assert servers == {f"127.0.0.1:{sheep.port}": (
            f"127.0.0.1:{proxy.port}" if sheep.index == 2 else zookeeper_server.hosts)
            for sheep in cluster.sheep}, shown["sessions"]
        assert all(session["state"] == "connected" and session["negotiated_timeout"]
                   == ZOOKEEPER_SESSION_TIMEOUT_S and session["lease_remaining"] > 0
                   for session in shown["sessions"]), shown["sessions"]

        proxy.cut()
        cut = time.monotonic()
        to_fenced = wait_for(lambda: fenced(cluster, 2), 10, "sheep 2 fenced")
        with pytest.raises(Unavailable, match="fenced"):  # the cut-off side acknowledges nothing
            write(cluster, 2, "disk", 0, b"minority")
        info = dog_info(cluster, 2)
        assert info["driver"]["fenced"] is True and info["driver"]["driver"] == "zookeeper"
        assert info["driver"]["state"] == "fenced" and info["driver"]["lease_remaining"] == 0
        human = dog(cluster, 2, "cluster", "info")
        assert "FENCED: this sheep serves no I/O" in human and "ZooKeeper server" in human
        # The others log its death once its session expires, and go on without it.
        cluster.wait_epoch(0, 2, timeout_s=ZOOKEEPER_SESSION_TIMEOUT_S * 3 + 5)
        to_dead = time.monotonic() - cut
        during = os.urandom(4 * MiB)
        write(cluster, 0, "disk", 8 * MiB, during)
        assert read(cluster, 1, "disk", 0, 8 * MiB) == before

        proxy.restore()
        restored = time.monotonic()
        cluster.wait_epoch(0, 3, timeout_s=30)
        wait_for(lambda: not fenced(cluster, 2), 30, "sheep 2 serving again")
        cluster.wait_recovered(60)
        to_healthy = time.monotonic() - restored
        assert read(cluster, 2, "disk", 0, 8 * MiB) == before
        assert read(cluster, 2, "disk", 8 * MiB, 4 * MiB) == during
        write(cluster, 2, "disk", 12 * MiB, b"back")
        assert read(cluster, 0, "disk", 12 * MiB, 4) == b"back"
        print(f"\ncut to fenced {to_fenced:.2f} s, cut to declared dead {to_dead:.2f} s "
              f"(session timeout {ZOOKEEPER_SESSION_TIMEOUT_S} s), link back to healthy "
              f"{to_healthy:.2f} s")
        assert to_fenced < ZOOKEEPER_SESSION_TIMEOUT_S
    finally:
        cluster.close()
        proxy.close()


def test_the_log_is_trimmed_and_sheep_catch_up_from_a_snapshot(tmp_path, zookeeper_server):
    """Entries every member has applied go (in batches of trim=20); a sheep that was
    down meanwhile, and a brand-new one, start from the snapshot and catch up."""
    from kazoo.exceptions import NoAuthError

    prefix = f"/trim{os.getpid()}"
    cluster = LocalCluster(str(tmp_path / "cluster"), 3, driver=(
        f"zookeeper:{zookeeper_server.hosts}{prefix}?timeout={ZOOKEEPER_SESSION_TIMEOUT_S}"
        "&trim=20"))
    # Real sheep, started with --keyring: their znodes are the node key's only.
    zk = zookeeper_client(zookeeper_server.hosts, cluster.credentials.key)
    stranger = zookeeper_client(zookeeper_server.hosts)
    try:
        cluster.start()
        cluster.format(2)
        assert cluster.stop(2) == 0
        cluster.wait_epoch(0, 2)
        with cluster.client(0) as client:
            for index in range(60):
                client.vdi_create(f"v{index}", MiB)
            write_data = os.urandom(MiB)
            handle = client.vdi_open("v7", writable=True)["handle"]
            client.vdi_write(handle, 0, write_data)
            client.vdi_close(handle)
        log_path = f"{prefix}/log"
        wait_for(lambda: zk.exists(f"{prefix}/snapshot") is not None
                 and len(zk.get_children(log_path)) < 40, 30, "the log trimmed")
        left = [int(name[2:]) for name in zk.get_children(log_path)]
        assert not left or min(left) > 20  # the oldest entries are gone (or all of them)
        for path in (prefix, f"{prefix}/log", f"{prefix}/snapshot", f"{prefix}/members"):
            with pytest.raises(NoAuthError):  # an anonymous ZooKeeper client sees nothing
                stranger.get_children(path)
            with pytest.raises(NoAuthError):
                stranger.set(path, b"mine")
        cluster.start(2)  # down while its position was trimmed away
        newcomer = cluster.add()
        cluster.start(newcomer.index)  # never saw the log at all
        for index in (2, newcomer.index):
            cluster.wait_epoch(index, 4, timeout_s=20)
            with cluster.client(index) as client:
                names = {vdi["name"] for vdi in client.vdi_list(usage=False)}
                assert names == {f"v{i}" for i in range(60)}, index
            assert read(cluster, index, "v7", 0, MiB) == write_data
        trimmed = 0
        for index in (0, 1):
            with cluster.client(index) as client:
                trimmed += client.cluster_info()["driver"]["log_trimmed"]
        assert trimmed >= 20
    finally:
        zk.stop()
        zk.close()
        stranger.stop()
        stranger.close()
        cluster.close()


def test_the_session_timeout_shown_is_the_one_zookeeper_negotiated(tmp_path, zookeeper_server):
    """The lease is measured against the timeout the server granted, not the one asked
    for: this server grants at most 60 s (maxSessionTimeout), the sheep asks for 100."""
    cluster = LocalCluster(str(tmp_path / "cluster"), 1, driver=(
        f"zookeeper:{zookeeper_server.hosts}/negotiated{os.getpid()}?timeout=100"))
    try:
        cluster.start()
        driver = dog_info(cluster, 0)["driver"]
        assert driver["session_timeout"] == 100 and driver["negotiated_timeout"] == 60.0
        assert driver["state"] == "connected" and 0 < driver["lease_remaining"] <= 30.0
        assert driver["server"] == zookeeper_server.hosts
    finally:
        cluster.close()


# --- ACLs from the cluster key (issue #15) -----------------------------------------
# The sheep command cannot be given the key yet, so these build drivers in process:
# ZooKeeperDriver objects directly, or Sheep objects on them (InProcessCluster).

def digest_acl(key: bytes) -> list:
    from kazoo.security import make_digest_acl

    return [make_digest_acl(digest_user, digest_password(key), all=True)]


def zookeeper_client(hosts: str, key: bytes | None = None):
    """A plain kazoo client: anonymous, or authenticated as a cluster's sheep."""
    from kazoo.client import KazooClient

    auth = [("digest", f"{digest_user}:{digest_password(key)}")] if key is not None else None
    client = KazooClient(hosts=hosts, auth_data=auth)
    client.start(timeout=10)
    return client


def znodes(client, path: str) -> list[str]:
    """path and every znode under it, parents first (but those trimmed meanwhile)."""
    from kazoo.exceptions import NoNodeError

    try:
        names = client.get_children(path)
    except NoNodeError:
        return []
    found = [path]
    for name in sorted(names):
        found += znodes(client, f"{path}/{name}")
    return found


def assert_guarded(client, path: str, key: bytes) -> None:
    """Every znode from path down carries the key's ACL alone."""
    from kazoo.exceptions import NoNodeError

    for znode in znodes(client, path):
        try:
            acls = client.get_acls(znode)[0]
        except NoNodeError:
            continue  # trimmed meanwhile
        assert acls == digest_acl(key), znode


def assert_shut_out(client, prefix: str, snapshot: bool = True) -> None:
    """client can neither read nor change anything of the cluster under prefix (the
    snapshot included, if there is one: ZooKeeper says NoNode before NoAuth)."""
    from kazoo.exceptions import NoAuthError
    from kazoo.security import OPEN_ACL_UNSAFE

    members, log_path = f"{prefix}/members", f"{prefix}/log"
    for path in (prefix, members, log_path):
        with pytest.raises(NoAuthError):
            client.get_children(path)
        with pytest.raises(NoAuthError):
            client.create(f"{path}/intruder", b"x")
    for path in (prefix, members, log_path, *([f"{prefix}/snapshot"] if snapshot else [])):
        with pytest.raises(NoAuthError):
            client.get(path)
        with pytest.raises(NoAuthError):
            client.set(path, b"{}")
        with pytest.raises(NoAuthError):
            client.set_acls(path, OPEN_ACL_UNSAFE)
    with pytest.raises(NoAuthError):
        client.create(f"{log_path}/r-", b"{}", sequence=True)


class Applier:
    """What a sheep does with a driver's events: take them in order and say how far
    it has applied them (a driver stays fenced until its own join is applied)."""

    def __init__(self, driver) -> None:
        self.driver = driver
        self.events: list = []
        self.seq = 0
        driver.applied_seq = lambda: self.seq
        self._task = asyncio.get_running_loop().create_task(self._take())

    async def _take(self) -> None:
        while True:
            event = await self.driver.events.get()
            self.events.append(event)
            self.seq = event.seq

    async def until(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition(self):
            assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
            await asyncio.sleep(0.05)

    def ops(self) -> list[str]:
        return [event.op_id for event in self.events
                if isinstance(event, Event) and event.kind is EventKind.OP]

    def stop(self) -> None:
        self._task.cancel()


def listening() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


def fake_node(listener: socket.socket) -> NodeInfo:
    """A node whose port answers (a joining driver waits for members that do not)."""
    port = listener.getsockname()[1]
    return NodeInfo(node_id=f"127.0.0.1:{port}", address="127.0.0.1", port=port, zone=0,
                    weight=1 << 28)


def test_an_anonymous_client_can_neither_read_nor_change_a_keyed_cluster(
        tmp_path, zookeeper_server):
    """A sheep given the cluster key formats and fills the cluster (a log trimmed
    to a snapshot); every znode, the prefix's parent included, carries the key's
    ACL, and a client without the key, or with another one, is refused everything."""
    key = os.urandom(32)
    parent = f"/keyed{os.getpid()}"
    prefix = f"{parent}/cluster"
    spec = f"zookeeper:{zookeeper_server.hosts}{prefix}?timeout={ZOOKEEPER_SESSION_TIMEOUT_S}&trim=5"
    cluster = InProcessCluster(str(tmp_path), 1, driver=lambda _: make_driver(spec, secret=key))
    owner = zookeeper_client(zookeeper_server.hosts, key)
    anonymous = zookeeper_client(zookeeper_server.hosts)
    stranger = zookeeper_client(zookeeper_server.hosts, os.urandom(32))
    try:
        cluster.start()
        with cluster.client(0) as client:
            client.format(1, 4 * MiB)
            for index in range(10):
                client.vdi_create(f"v{index}", MiB)
            assert client.cluster_info()["driver"]["acl"] == "digest"
        wait_for(lambda: owner.exists(f"{prefix}/snapshot") is not None, 20, "a snapshot")
        with cluster.client(0) as client:  # a record the trim leaves (fewer than 5)
            client.vdi_create("after", MiB)
        everything = znodes(owner, parent)
        assert {f"{prefix}/members", f"{prefix}/log", f"{prefix}/snapshot"} <= set(everything)
        assert any(path.startswith(f"{prefix}/members/") for path in everything)
        assert any(path.startswith(f"{prefix}/log/r-") for path in everything)
        assert_guarded(owner, parent, key)
        for client in (anonymous, stranger):
            assert_shut_out(client, prefix)
            member = next(path for path in everything if path.startswith(f"{prefix}/members/"))
            record = next(path for path in everything if path.startswith(f"{prefix}/log/r-"))
            for path in (parent, member, record):
                with pytest.raises(NoAuthError):
                    client.get(path)
            with pytest.raises(NoAuthError):
                client.delete(record)
            with pytest.raises(NoAuthError):
                client.create(f"{parent}/intruder")
        with cluster.client(0) as client:  # the cluster itself goes on
            client.vdi_create("later", MiB)
    finally:
        cluster.close()
        for client in (owner, anonymous, stranger):
            client.stop()
            client.close()


def test_sheep_with_the_cluster_key_share_the_log_across_reconnects_and_expiry(
        zookeeper_server):
    """Two drivers with the same key see each other's ops; the key is presented
    again on a new connection (same session) and for a new session after expiry,
    whose member znode and records are guarded as well."""
    from kazoo.client import KazooClient

    key = os.urandom(32)
    prefix = f"/shared{os.getpid()}"
    spec = f"zookeeper:{zookeeper_server.hosts}{prefix}?timeout={ZOOKEEPER_SESSION_TIMEOUT_S}"

    async def scenario() -> None:
        listeners = [listening(), listening()]
        first, second = (make_driver(spec, secret=key), make_driver(spec, secret=key))
        assert isinstance(first, ZooKeeperDriver) and isinstance(second, ZooKeeperDriver)
        seen_first, seen_second = Applier(first), Applier(second)
        try:
            await first.join(fake_node(listeners[0]), 0)
            await second.join(fake_node(listeners[1]), 0)
            await first.broadcast("one", {"n": 1})
            await seen_second.until(lambda a: "one" in a.ops(), 10, "op one at the second")

            # A new connection, same session: kazoo sends the key again.
            session = second._client.client_id
            dropped = second._socket()
            second._drop_connection(dropped)
            await seen_second.until(lambda _: second._state == "connected"
                                    and second._socket() not in (None, dropped), 10,
                                    "reconnected")
            assert second._client.client_id == session
            await second.broadcast("two", {"n": 2})
            await seen_first.until(lambda a: "two" in a.ops(), 10, "op two at the first")

            # The session expires (closed under it by another client using its id): a
            # new session, authenticated again, joins as a new incarnation.
            incarnation = second.info()["session"]
            thief = KazooClient(hosts=zookeeper_server.hosts, client_id=session)
            await asyncio.to_thread(thief.start, 10)
            await asyncio.to_thread(thief.stop)
            thief.close()
            await seen_second.until(lambda _: second.info()["session"] not in (None, incarnation)
                                    and not second.fenced, 20, "the second joined again")
            await second.broadcast("three", {"n": 3})
            await seen_first.until(lambda a: "three" in a.ops(), 10, "op three at the first")
            await seen_second.until(lambda a: "three" in a.ops(), 10, "op three at the second")
            assert seen_first.ops() == seen_second.ops() == ["one", "two", "three"]
            leaves = [event for event in seen_first.events
                      if isinstance(event, Event) and event.kind is EventKind.LEAVE]
            assert [event.node_id for event in leaves] == [fake_node(listeners[1]).node_id]
        finally:
            for applier in (seen_first, seen_second):
                applier.stop()
            for driver in (first, second):
                await driver.close()
            for listener in listeners:
                listener.close()

    asyncio.run(scenario())
    owner = zookeeper_client(zookeeper_server.hosts, key)
    anonymous = zookeeper_client(zookeeper_server.hosts)
    try:
        assert_guarded(owner, prefix, key)
        assert_shut_out(anonymous, prefix, snapshot=False)
    finally:
        for client in (owner, anonymous):
            client.stop()
            client.close()


def test_a_sheep_with_another_clusters_key_fails_to_start(zookeeper_server):
    """Another cluster's key, or none at all, on a keyed prefix: join fails at once
    with PERMISSION_DENIED naming NoAuth and the prefix, and leaves nothing behind."""
    key = os.urandom(32)
    prefix = f"/other{os.getpid()}"
    spec = f"zookeeper:{zookeeper_server.hosts}{prefix}?timeout={ZOOKEEPER_SESSION_TIMEOUT_S}"

    async def scenario() -> None:
        listeners = [listening(), listening()]
        member = make_driver(spec, secret=key)
        applier = Applier(member)
        try:
            await member.join(fake_node(listeners[0]), 0)
            for secret, why in ((os.urandom(32), "another key"), (None, "given none")):
                intruder = make_driver(spec, secret=secret)
                started = time.monotonic()
                with pytest.raises(PermissionDenied) as refused:
                    await asyncio.wait_for(intruder.join(fake_node(listeners[1]), 0), 30)
                took = time.monotonic() - started
                assert "NoAuth" in refused.value.message and prefix in refused.value.message
                assert why in refused.value.message
                assert took < 5, took
                await intruder.close()
            await member.broadcast("still", {})
            await applier.until(lambda a: "still" in a.ops(), 10, "the member's op")
        finally:
            applier.stop()
            await member.close()
            for listener in listeners:
                listener.close()

    asyncio.run(scenario())
    owner = zookeeper_client(zookeeper_server.hosts, key)
    try:
        joins = [json.loads(owner.get(f"{prefix}/log/{name}")[0])["kind"]
                 for name in owner.get_children(f"{prefix}/log")]
        assert joins.count(EventKind.JOIN.value) == 1  # no intruder got to join
    finally:
        owner.stop()
        owner.close()


def test_an_open_prefix_left_by_a_keyless_version_is_guarded_at_start(zookeeper_server):
    """A prefix made without a key (open ACLs, a member still in it, a snapshot) is
    guarded, every znode under it too, by the first sheep started with the key; that
    sheep reads the log that was there, and the keyless one is shut out. A znode the
    keyless one adds while the prefix is being guarded (a snapshot) is guarded too."""
    key = os.urandom(32)
    prefix = f"/open{os.getpid()}"
    spec = f"zookeeper:{zookeeper_server.hosts}{prefix}?timeout={ZOOKEEPER_SESSION_TIMEOUT_S}"
    anonymous = zookeeper_client(zookeeper_server.hosts)

    async def scenario() -> None:
        listeners = [listening(), listening()]
        keyless = make_driver(spec)
        keyed = make_driver(spec, secret=key)
        seen_keyless, seen_keyed = Applier(keyless), Applier(keyed)
        try:
            await keyless.join(fake_node(listeners[0]), 0)
            assert keyless.info()["acl"] == "open"
            for index in range(5):
                await keyless.broadcast(f"old{index}", {})
            await seen_keyless.until(lambda a: len(a.ops()) == 5, 10, "the old ops")
            assert anonymous.get(f"{prefix}/log")[0] == b""  # open, as it was made
            guard_below = keyed._guard_below

            def meanwhile(path: str, guarded: set[str]) -> None:
                guard_below(path, guarded)
                if anonymous.exists(f"{prefix}/snapshot") is None:
                    anonymous.create(f"{prefix}/snapshot", b"{}")  # the prefix still open

            keyed._guard_below = meanwhile
            await keyed.join(fake_node(listeners[1]), 0)
            await keyed.broadcast("new", {})
            await seen_keyed.until(lambda a: "new" in a.ops(), 10, "the new op")
            assert seen_keyed.ops() == [f"old{index}" for index in range(5)] + ["new"]
            with pytest.raises(SystemFailure, match="NoAuth"):
                await keyless.broadcast("shut out", {})
        finally:
            for applier in (seen_keyless, seen_keyed):
                applier.stop()
            for driver in (keyless, keyed):
                await driver.close()
            for listener in listeners:
                listener.close()

    owner = zookeeper_client(zookeeper_server.hosts, key)
    try:
        asyncio.run(scenario())
        everything = znodes(owner, prefix)
        assert f"{prefix}/snapshot" in everything and len(everything) > 8
        assert_guarded(owner, prefix, key)
        assert_shut_out(anonymous, prefix)
    finally:
        for client in (owner, anonymous):
            client.stop()
            client.close()


@pytest.mark.parametrize("foreground", [True, False])
def test_a_sheep_that_cannot_reach_zookeeper_says_so_and_stops_on_sigterm(tmp_path, foreground):
    """Nothing listens where ZooKeeper should be: within 5 s the terminal hears of it
    (the foreground's log on stderr; a daemon's waiting parent prints what the daemon
    sends it), the sheep goes on retrying, and SIGTERM stops it within 5 s. (It
    speaks at 1 s and stops in about 2; the test allows for a loaded machine.)"""
    from sheep import auth
    from sheep.testing.cluster import free_port

    keyring = str(tmp_path / "keyring")
    auth.node_keyring(keyring)
    store = str(tmp_path / "store")
    command = [sys.executable, "-m", "sheep", store, "-p", str(free_port()),
               "-c", f"zookeeper:127.0.0.1:{free_port()}/nowhere", "--keyring", keyring,
               *(["-f"] if foreground else [])]
    output = open(tmp_path / "terminal", "w+")  # noqa: SIM115 - read while it runs
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "cannot reach ZooKeeper" in (tmp_path / "terminal").read_text(), 8.0,
                 "a word on the terminal")
        time.sleep(0.5)
        if foreground:
            pid = process.pid
        else:
            assert process.poll() is None, "the parent waits for the daemon's verdict"
            with open(os.path.join(store, "sheep.pid")) as file:
                pid = int(file.read())
        os.kill(pid, 15)
        if foreground:
            assert process.wait(8) == 0
        else:
            process.wait(8)  # the parent ends with its daemon's verdict
            wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 8.0, "the daemon's exit")
            assert "stopped before it joined the cluster" in (tmp_path / "terminal").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        output.close()
