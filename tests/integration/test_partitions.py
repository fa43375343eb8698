"""Real multi-host behaviour on ZooKeeper: three "hosts" in network namespaces made by
the test (a bridge, a veth and an address each), one sheep per host, ZooKeeper on
the bridge's address. A host is cut off by taking its link down: a silent cut, as
a pulled cable. Skipped, saying why, where namespaces cannot be created."""

from __future__ import annotations

import os
import sys
import time

import pytest

from sheep.client import SyncClient
from sheep.errors import SheepError
from sheep.testing import netns
from sheep.testing.zookeeper import ZooKeeperServer, missing

MiB = 1 << 20
PORT = 7000
SESSION_TIMEOUT_S = 3.0


@pytest.fixture
def network():
    why = netns.unavailable() or missing()
    if why is not None:
        pytest.skip(why)
    net = netns.Network(3)
    yield net
    net.close()


def client(host: netns.Host) -> SyncClient:
    return SyncClient(host.address, PORT)


def wait_for(condition, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except SheepError:
            pass
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s} s"
        time.sleep(0.1)


def members(host: netns.Host) -> int:
    with client(host) as sheep:
        return len(sheep.cluster_info()["members"])


def settled(hosts: list[netns.Host]) -> bool:
    infos = []
    for host in hosts:
        with client(host) as sheep:
            infos.append(sheep.node_info())
    return len({info["epoch"] for info in infos}) == 1 and all(
        info["recovery"] and not info["recovery"]["running"] and not info["recovery"]["unverified"]
        and info["recovery"]["epoch"] == info["epoch"] for info in infos)


def vdi_io(host: netns.Host, offset: int, data: bytes | None = None, count: int = 0) -> bytes:
    with client(host) as sheep:
        handle = sheep.vdi_open("disk", writable=data is not None)["handle"]
        try:
            if data is not None:
                sheep.vdi_write(handle, offset, data)
                return b""
            return bytes(sheep.vdi_read(handle, offset, count))
        finally:
            sheep.vdi_close(handle)


def dog_inside(host: netns.Host, *args: str):
    return host.call([sys.executable, "-m", "dog", *args, "-a", host.address, "-p", str(PORT)])


def test_a_host_cut_off_is_fenced_the_others_go_on_and_it_comes_back_current(network, tmp_path):
    zookeeper = ZooKeeperServer(str(tmp_path / "zookeeper"), address=network.gateway)
    try:
        driver = f"zookeeper:{zookeeper.hosts}/partition?timeout={SESSION_TIMEOUT_S}"
        for host in network.hosts:
            store = str(tmp_path / f"store{host.index}")
            os.makedirs(store)
            host.run(netns.sheep_command(store, host.address, PORT, driver, host.index),
                     os.path.join(store, "stderr.log"))
        for host in network.hosts:
            wait_for(lambda host=host: client(host).ping()["joined"], 30, "sheep joined")
        a, b, cut = network.hosts
        with client(a) as sheep:
            sheep.format(2, 4 * MiB)
            sheep.vdi_create("disk", 64 * MiB)
        before = os.urandom(16 * MiB)
        vdi_io(a, 0, before)

        network.cut(cut)
        started = time.monotonic()
        # Inside the cut-off host: its sheep refuses I/O, a write is never acknowledged.
        to_fenced = wait_for(lambda: "fenced" in dog_inside(
            cut, "vdi", "read", "disk", "0", "1").stderr, 3 * SESSION_TIMEOUT_S, "fenced")
        refused = dog_inside(cut, "vdi", "write", "disk", "0", "8")
        assert refused.returncode != 0 and "fenced" in refused.stderr, refused
        # The others declare it dead once its session expires, and keep serving.
        wait_for(lambda: members(a) == 2, 4 * SESSION_TIMEOUT_S, "the others' new epoch")
        to_dead = time.monotonic() - started
        during = os.urandom(8 * MiB)
        vdi_io(a, 16 * MiB, during)
        assert vdi_io(b, 0, count=16 * MiB) == before

        network.restore(cut)
        restored = time.monotonic()
        wait_for(lambda: members(a) == 3 and members(cut) == 3, 30, "the rejoin")
        wait_for(lambda: settled(network.hosts), 60, "recovery")
        to_healthy = time.monotonic() - restored
        assert vdi_io(cut, 0, count=16 * MiB) == before
        assert vdi_io(cut, 16 * MiB, count=8 * MiB) == during
        vdi_io(cut, 24 * MiB, b"back")
        assert vdi_io(a, 24 * MiB, count=4) == b"back"
        print(f"\nnamespaces, silent cut, session timeout {SESSION_TIMEOUT_S} s: cut to fenced "
              f"{to_fenced:.2f} s, cut to declared dead {to_dead:.2f} s, link back to healthy "
              f"{to_healthy:.2f} s")
        assert to_fenced < to_dead  # fenced before the others can move on
    finally:
        zookeeper.stop()
