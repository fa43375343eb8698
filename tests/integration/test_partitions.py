"""Real multi-host behaviour on ZooKeeper: three "hosts" in network namespaces made by
the test (a bridge, a veth and an address each), one sheep per host, ZooKeeper on
the bridge's address. A host is cut off by taking its link down: a silent cut, as
a pulled cable. Skipped, saying why, where namespaces cannot be created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sheep import auth
from sheep.client import SyncClient
from sheep.errors import SheepError, Unavailable
from sheep.testing import netns
from sheep.testing.cluster import stop_process
from sheep.testing.nbd import PLUGIN, fio_command, fio_jobs, needs_tools
from sheep.testing.qemu import Qemu, read_ok, wrote
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
    """One read or write, retried for a few seconds when refused as unavailable, as the
    NBD plugin retries: a rejoined sheep's ZooKeeper connection can still flap (and
    fence it) for a moment after the cluster looks settled."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return _vdi_io(host, offset, data, count)
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _vdi_io(host: netns.Host, offset: int, data: bytes | None, count: int) -> bytes:
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


def start_sheep(network: netns.Network, zookeeper: ZooKeeperServer, tmp_path, copies: int,
                prefix: str) -> None:
    driver = f"zookeeper:{zookeeper.hosts}/{prefix}?timeout={SESSION_TIMEOUT_S}"
    for host in network.hosts:
        store = str(tmp_path / f"store{host.index}")
        os.makedirs(store)
        host.run(netns.sheep_command(store, host.address, PORT, driver, host.index,
                                     os.environ["DOG_KEYRING"]),
                 os.path.join(store, "stderr.log"))
    for host in network.hosts:
        wait_for(lambda host=host: client(host).ping()["joined"], 30, "sheep joined")
    with client(network.hosts[0]) as sheep:
        sheep.format(copies, 4 * MiB)
        sheep.vdi_create("disk", 64 * MiB)


@pytest.fixture(autouse=True)
def keyring(tmp_path, monkeypatch) -> str:
    """The cluster's node keyring: every sheep's --keyring, and (DOG_KEYRING) what dog,
    the plugin and the clients here and inside the hosts authenticate with."""
    path = str(tmp_path / "keyring")
    auth.node_keyring(path)
    monkeypatch.setenv("DOG_KEYRING", path)
    return path


@pytest.fixture
def zookeeper(network, tmp_path):
    server = ZooKeeperServer(str(tmp_path / "zookeeper"), address=network.gateway)
    yield server
    server.stop()


def test_a_host_cut_off_is_fenced_the_others_go_on_and_it_comes_back_current(
        network, zookeeper, tmp_path):
    start_sheep(network, zookeeper, tmp_path, copies=2, prefix="partition")
    a, b, cut = network.hosts
    before = os.urandom(16 * MiB)
    vdi_io(a, 0, before)

    network.cut(cut)
    started = time.monotonic()
    # Inside the cut-off host: its sheep refuses I/O, a write is never acknowledged.
    to_fenced = wait_for(lambda: "fenced" in dog_inside(
        cut, "vdi", "read", "disk", "0", "1").stderr, 3 * SESSION_TIMEOUT_S, "fenced")
    refused = dog_inside(cut, "vdi", "write", "disk", "0", "8")
    assert refused.returncode != 0 and "fenced" in refused.stderr, refused
    # Its own account: when its lease ran out (wall clock, this machine's).
    own = json.loads(dog_inside(cut, "cluster", "info", "--json").stdout)["driver"]
    assert own["state"] == "fenced" and own["fenced_at"] is not None, own
    # The others declare it dead once its session expires, and keep serving.
    wait_for(lambda: members(a) == 2, 4 * SESSION_TIMEOUT_S, "the others' new epoch")
    to_dead = time.monotonic() - started
    with client(a) as sheep:
        declared_dead = sheep.cluster_info()["epochs"][-1]["time"]  # the leave's log time
    # Both sides' timestamps: the fence came first, by most of the session timeout.
    assert own["fenced_at"] < declared_dead, (own["fenced_at"], declared_dead)
    fence_margin = declared_dead - own["fenced_at"]
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
          f"{to_healthy:.2f} s; fenced {fence_margin:.2f} s before the others logged its death"
          " (their clocks)")
    assert to_fenced < to_dead  # fenced before the others can move on


# --- an NBD client on one host, its gateway on another ------------------------------------

NBD_PORT = 10809
FAILOVER_BOUND_S = 15.0


def start_nbdkit(host: netns.Host, gateways: list[netns.Host],
                 log_path: str) -> subprocess.Popen[bytes]:
    """nbdkit with our plugin inside host, on its loopback; the first gateway is used first."""
    sheep = ",".join(f"{gateway.address}:{PORT}" for gateway in gateways)
    process = host.run(["nbdkit", "-f", "-p", str(NBD_PORT), "-i", "127.0.0.1", "-t", "8",
              "python", PLUGIN, f"sheep={sheep}"], log_path)
    probe = ("import socket, time\n"
             "deadline = time.monotonic() + 15\n"
             f"while socket.socket().connect_ex(('127.0.0.1', {NBD_PORT})):\n"
             "    assert time.monotonic() < deadline, 'nbdkit is not listening'\n"
             "    time.sleep(0.05)\n")
    result = host.call([sys.executable, "-c", probe])
    if result.returncode != 0:
        with open(log_path, errors="replace") as log:
            raise AssertionError(f"{result.stderr}\n{log.read()}")
    return process


def fio_inside(host: netns.Host, *extra: str, aux_path: str) -> list[str]:
    """The tests' fio run (sheep.testing.nbd.fio_command) inside host, on its nbdkit."""
    return ["ip", "netns", "exec", host.namespace,
            *fio_command(f"nbd://127.0.0.1:{NBD_PORT}/disk", *extra, aux_path=aux_path)]


def lock_holder(host: netns.Host) -> str | None:
    with client(host) as sheep:
        lock = sheep.vdi_list(["disk"], usage=False)[0]["lock"]
    return lock and lock["node_id"]


def node_id(host: netns.Host) -> str:
    with client(host) as sheep:
        return str(sheep.node_info()["node_id"])


@needs_tools("nbdkit", "fio", packages="nbdkit, nbdkit-plugin-python, fio")
def test_the_nbd_gateways_host_cut_off_during_writes_the_client_fails_over(
        network, zookeeper, tmp_path):
    """fio runs on host a through nbdkit, whose gateway sheep is on host cut. That host
    is cut off while writes are in flight: the plugin notices the silent cut (TCP
    keepalive and user timeout), moves to b's sheep, reopens the VDI once cut's lock
    is released with its death, and retries what was in flight. fio sees latency,
    not an error, and every block it wrote verifies, through b and later through the
    returned host."""
    start_sheep(network, zookeeper, tmp_path, copies=2, prefix="failover")
    a, b, cut = network.hosts
    nbdkit = start_nbdkit(a, [cut, b], str(tmp_path / "nbdkit.log"))
    # 32 MiB at 2 MiB/s: the job is still writing when the link goes.
    fio = subprocess.Popen(fio_inside(a, "--verify_backlog=32", "--rate=,2m", aux_path=str(tmp_path)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        cut_id = node_id(cut)
        wait_for(lambda: lock_holder(b) == cut_id, 15, "the VDI open through cut")
        time.sleep(3)
        assert fio.poll() is None, "fio ended before the cut"
        network.cut(cut)
        started = time.monotonic()
        # Within the dead-peer timeout plus the session timeout, not the 30 s request timeout.
        wait_for(lambda: lock_holder(b) not in (None, cut_id), FAILOVER_BOUND_S,
                 "the VDI reopened through another gateway")
        to_failover = time.monotonic() - started
        assert fio.poll() is None, "fio ended before the failover completed"
        stdout, stderr = fio.communicate(timeout=180)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.communicate()
    job = fio_jobs(fio.returncode, stdout, stderr)[0]
    assert job["write"]["io_bytes"] == 32 * MiB
    assert job["read"]["io_bytes"] >= 32 * MiB  # every block read back and verified
    stall_s = job["write"]["clat_ns"]["max"] / 1e9
    assert stall_s < FAILOVER_BOUND_S

    # What fio wrote, read back by a fresh nbdkit on b alone.
    stop_process(nbdkit)
    nbdkit = start_nbdkit(a, [b], str(tmp_path / "nbdkit-verify.log"))
    verify = subprocess.run(fio_inside(a, "--verify_only=1", aux_path=str(tmp_path)), capture_output=True,
                            text=True, timeout=180)
    assert fio_jobs(verify.returncode, verify.stdout, verify.stderr)[0]["read"]["io_bytes"] \
        == 32 * MiB

    # The cut host comes back current: fio verifies through its sheep alone.
    network.restore(cut)
    wait_for(lambda: members(a) == 3 and members(cut) == 3, 30, "the rejoin")
    wait_for(lambda: settled(network.hosts), 60, "recovery")
    stop_process(nbdkit)
    start_nbdkit(a, [cut], str(tmp_path / "nbdkit-returned.log"))
    verify = subprocess.run(fio_inside(a, "--verify_only=1", aux_path=str(tmp_path)), capture_output=True,
                            text=True, timeout=180)
    assert fio_jobs(verify.returncode, verify.stdout, verify.stderr)[0]["read"]["io_bytes"] \
        == 32 * MiB
    print(f"\nnamespaces, NBD gateway cut off during writes: VDI reopened through another "
          f"gateway {to_failover:.2f} s after the cut; fio's longest write {stall_s:.2f} s")


@needs_tools("nbdkit", "qemu-system-x86_64", packages="nbdkit, nbdkit-plugin-python,"
            " qemu-system-x86")
def test_a_vm_migrates_between_hosts_and_its_old_host_is_cut_off_after_the_switchover(
        network, zookeeper, tmp_path):
    """QEMU on host a (its nbdkit's gateway: a's sheep) live-migrates to host b (b's
    nbdkit and sheep). Right after the switchover, a is cut off: the VDI's lock is
    still its source's, on a's sheep, which no longer answers. The destination's
    first write waits for the cluster to declare a dead (that releases the lock),
    then goes on; every write acknowledged to the source is there, read through the
    destination and through a third host's sheep."""
    start_sheep(network, zookeeper, tmp_path, copies=2, prefix="migration")
    a, b, c = network.hosts
    start_nbdkit(a, [a, c], str(tmp_path / "nbdkit-a.log"))
    start_nbdkit(b, [b, c], str(tmp_path / "nbdkit-b.log"))
    disk = f"nbd://127.0.0.1:{NBD_PORT}/disk"
    port = 4444
    source = Qemu(str(tmp_path), "source", disk, wrap=("ip", "netns", "exec", a.namespace))
    destination = Qemu(str(tmp_path), "destination", disk, incoming=f"{b.address}:{port}",
                       wrap=("ip", "netns", "exec", b.namespace))
    try:
        for index in range(8):
            assert wrote(source.qemu_io(f"write -P {index + 1} {index}M 1M"), MiB,
                         index * MiB), source.log()
        source.qmp.command("migrate", uri=f"tcp:{b.address}:{port}")
        assert source.migrated() == "completed"
        network.cut(a)
        started = time.monotonic()
        assert wrote(destination.qemu_io("write -P 0x77 10M 1M", timeout_s=90), MiB,
                     10 * MiB), destination.log()
        takeover_s = time.monotonic() - started
        for index in range(8):
            assert read_ok(destination.qemu_io(f"read -P {index + 1} {index}M 1M"), MiB,
                           index * MiB)
        assert wrote(destination.qemu_io("write -P 0x78 11M 1M"), MiB, 11 * MiB)
    finally:
        source.stop()
        destination.stop()
    for index in range(8):
        assert vdi_io(c, index * MiB, count=MiB) == bytes([index + 1]) * MiB
    assert vdi_io(c, 10 * MiB, count=MiB) == b"\x77" * MiB
    assert vdi_io(c, 11 * MiB, count=MiB) == b"\x78" * MiB
    print(f"\nnamespaces, live migration then the source host cut off: the destination's"
          f" first write waited {takeover_s:.2f} s (the source's death)")


# --- a 2 vs 1 partition ---------------------------------------------------------------------

BLOCK = 64 * 1024

# Runs inside the minority host: writes 64 KiB block i (each byte i % 251 + 1) through
# that host's sheep, one after the other, logging each acknowledgement with its time
# (CLOCK_MONOTONIC is the same in every namespace), and each refusal.
MINORITY_WRITER = """
import os, sys, time
from sheep.client import SyncClient
from sheep.errors import NetworkError, SheepError
host, port, log_path, stop_path, block = sys.argv[1:]
port, block, index, sheep, handle = int(port), int(block), 0, None, None
with open(log_path, "a", buffering=1) as log:
    while not os.path.exists(stop_path):
        try:
            if sheep is None:
                sheep = SyncClient(host, port)
                handle = sheep.vdi_open("disk", writable=True)["handle"]
            sheep.vdi_write(handle, index * block, bytes([index % 251 + 1]) * block)
            log.write(f"ack {index} {time.monotonic()}\\n")
            index += 1
            time.sleep(0.05)
        except SheepError as error:
            reason = str(error).replace("\\n", " ")
            log.write(f"refused {index} {time.monotonic()} {reason}\\n")
            if isinstance(error, NetworkError) or handle is None:
                sheep = None
            time.sleep(0.2)
"""


def test_a_2_vs_1_partition_with_2_copies_the_minority_acknowledges_nothing(
        network, zookeeper, tmp_path):
    """copies=2 over three hosts, a writer inside the third. The third host is cut off
    from the other two and from ZooKeeper while its writer is mid-stream: from then on
    every write there is refused, none is acknowledged. The majority takes the VDI
    over once the minority is dead and overwrites the start of what the minority
    wrote. After the link returns every host reads the same bytes: the majority's
    overwrite, every write the minority acknowledged before the cut, and no trace of
    what it attempted after."""
    start_sheep(network, zookeeper, tmp_path, copies=2, prefix="split")
    a, b, minority = network.hosts
    log_path, stop_path = str(tmp_path / "writer.log"), str(tmp_path / "writer.stop")
    open(log_path, "w").close()
    writer = minority.run([sys.executable, "-c", MINORITY_WRITER, minority.address, str(PORT),
                           log_path, stop_path, str(BLOCK)], str(tmp_path / "writer.stderr"))

    def entries() -> list[tuple[str, int, float]]:
        with open(log_path) as log:
            return [(kind, int(index), float(at)) for kind, index, at, *_ in
                    (line.split(" ", 3) for line in log if line.strip())]

    wait_for(lambda: sum(kind == "ack" for kind, _, _ in entries()) >= 20, 30, "20 writes")
    network.cut(minority)
    cut_at = time.monotonic()
    wait_for(lambda: members(a) == 2, 4 * SESSION_TIMEOUT_S, "the majority's new epoch")
    dead_at = time.monotonic()
    overwrite = b"\xee" * (8 * BLOCK)
    vdi_io(a, 0, overwrite)  # the VDI's lock went with the minority's death
    time.sleep(2)  # the minority writer keeps trying meanwhile
    with open(stop_path, "w"):
        pass
    writer.wait(timeout=60)

    log = entries()
    acked = {index for kind, index, at in log if kind == "ack"}
    late = [(index, at - cut_at) for kind, index, at in log if kind == "ack" and at > dead_at]
    assert late == [], f"the minority acknowledged writes after the majority moved on: {late}"
    refused = [entry for entry in log if entry[0] == "refused" and entry[2] > cut_at]
    assert len(refused) >= 5, log[-10:]
    with open(log_path) as file:
        assert "fenced" in file.read()
    attempted = max(index for _, index, _ in log)  # the last block it tried, never acked

    network.restore(minority)
    wait_for(lambda: members(a) == 3 and members(minority) == 3, 30, "the rejoin")
    wait_for(lambda: settled(network.hosts), 60, "recovery")
    images = {host.index: vdi_io(host, 0, count=(attempted + 1) * BLOCK)
              for host in network.hosts}
    assert images[a.index] == images[b.index] == images[minority.index]
    image = images[a.index]
    assert image[:len(overwrite)] == overwrite
    for index in sorted(acked - set(range(8))):
        block = image[index * BLOCK:(index + 1) * BLOCK]
        assert block == bytes([index % 251 + 1]) * BLOCK, f"acknowledged block {index} lost"
    print(f"\nnamespaces, 2 vs 1 partition: {len(acked)} writes acknowledged by the minority "
          f"before the cut, {len(refused)} refused after it, none acknowledged after "
          f"{max(at for kind, _, at in log if kind == 'ack') - cut_at:+.2f} s from the cut; "
          f"majority moved on {dead_at - cut_at:.2f} s after the cut")
