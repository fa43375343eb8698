"""The ZooKeeper driver's own behaviour: fencing when a sheep loses ZooKeeper, the
others going on without it, and its return as a fresh member that catches up. One
sheep's link to ZooKeeper goes through a TCP proxy the test cuts and restores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sheep.errors import SheepError, Unavailable
from sheep.testing.cluster import LocalCluster
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
    from kazoo.client import KazooClient

    prefix = f"/trim{os.getpid()}"
    cluster = LocalCluster(str(tmp_path / "cluster"), 3, driver=(
        f"zookeeper:{zookeeper_server.hosts}{prefix}?timeout={ZOOKEEPER_SESSION_TIMEOUT_S}"
        "&trim=20"))
    zk = KazooClient(hosts=zookeeper_server.hosts)
    zk.start(timeout=10)
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
