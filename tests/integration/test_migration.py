"""Live migration of a real QEMU whose disk is a VDI, between two nbdkits on two
gateway sheep (docs/operations.md, "Locks, attachments and live migration").

No guest OS: the source and destination write through HMP's qemu-io on the drive,
which goes through QEMU's block layer (and its migration's flush and inactivation)
as a guest's I/O would. QEMU runs under TCG (-accel tcg): KVM's -cpu host fails on
these machines.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from sheep.testing.cluster import LocalCluster, free_port
from sheep.testing.nbd import NbdServer, needs_tools
from sheep.testing.qemu import Qemu, read_ok, wrote

pytestmark = needs_tools("qemu-system-x86_64", "qemu-io", "nbdkit",
                         packages="qemu-system-x86 qemu-utils nbdkit nbdkit-plugin-python")

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(str(tmp_path_factory.mktemp("migration")), nodes=3) as local:
        local.start()
        local.format(copies=2)
        yield local


@pytest.fixture
def hosts(cluster: LocalCluster, tmp_path) -> Iterator[tuple[NbdServer, NbdServer]]:
    """Two nbdkits: A's gateway is sheep 0, B's sheep 1 (each fails over to the rest)."""
    ports = [node.port for node in cluster.sheep]
    a = NbdServer(ports, str(tmp_path / "nbdkit-a.log"))
    b = NbdServer(ports[1:] + ports[:1], str(tmp_path / "nbdkit-b.log"))
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def qemus(tmp_path) -> Iterator[list[Qemu]]:
    started: list[Qemu] = []
    yield started
    for qemu in started:
        qemu.stop()


def source_and_destination(cluster: LocalCluster, hosts: tuple[NbdServer, NbdServer],
                           qemus: list[Qemu], directory: str,
                           name: str) -> tuple[Qemu, Qemu, int]:
    """A new VDI, QEMU A running on it through nbdkit A, QEMU B waiting for the
    migration (on the port returned) through nbdkit B."""
    with cluster.client(0) as client:
        client.vdi_create(name, 64 * MiB)
    port = free_port()
    source = Qemu(directory, "source", hosts[0].uri(name))
    qemus.append(source)
    destination = Qemu(directory, "destination", hosts[1].uri(name), incoming=port)
    qemus.append(destination)
    return source, destination, port


def migrate(source: Qemu, port: int) -> str:
    source.qmp.command("migrate", uri=f"tcp:127.0.0.1:{port}")
    return source.migrated()


def vdi_bytes(cluster: LocalCluster, name: str, offset: int, count: int) -> bytes:
    with cluster.client(2) as client:
        handle = client.vdi_open(name)["handle"]
        return client.vdi_read(handle, offset, count)


def test_live_migration_between_two_gateways(cluster, hosts, qemus, tmp_path):
    """The destination opens the disk beside the running source (attach is not lock),
    the migration completes, the destination writes (the lock is handed over: the
    source flushed and went quiet at the switchover) and reads the source's data;
    readers attach beside the writer; every byte is right when read through dog's
    client afterwards, and the source, fenced, can no longer write."""
    a, b = hosts
    with cluster.client(0) as client:
        client.vdi_create("mig", 64 * MiB)
    port = free_port()
    source = Qemu(str(tmp_path), "source", a.uri("mig"))
    qemus.append(source)
    assert wrote(source.qemu_io("write -P 0xaa 0 1M"), MiB, 0)
    destination = Qemu(str(tmp_path), "destination", b.uri("mig"), incoming=port)
    qemus.append(destination)
    assert destination.process.poll() is None, destination.log()
    assert wrote(source.qemu_io("write -P 0xab 1M 1M"), MiB, MiB)  # still the writer

    assert migrate(source, port) == "completed"
    started = time.monotonic()
    assert wrote(destination.qemu_io("write -P 0xbb 2M 1M"), MiB, 2 * MiB)
    handoff_s = time.monotonic() - started
    assert read_ok(destination.qemu_io("read -P 0xaa 0 1M"), MiB, 0)
    assert read_ok(destination.qemu_io("read -P 0xab 1M 1M"), MiB, MiB)
    assert handoff_s < 3.0, handoff_s  # well within --lock-handoff-wait

    # While the destination writes without pause: readers through either nbdkit, and
    # nbdinfo, attach and read; an unrelated writer never lands.
    stop = threading.Event()

    busy_errors: list[str] = []

    def keep_writing() -> None:
        while not stop.is_set():
            output = destination.qemu_io("write -P 0xbc 3M 64k")
            if not wrote(output, 64 * 1024, 3 * MiB):
                busy_errors.append(output)

    busy = threading.Thread(target=keep_writing, daemon=True)
    busy.start()
    try:
        for server in (a, b):
            result = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xbb 2M 4k",
                                     server.uri("mig")], capture_output=True, text=True,
                                    timeout=60)
            assert result.returncode == 0 and "read 4096/4096" in result.stdout, result.stderr
        info = subprocess.run(["nbdinfo", "--json", a.uri("mig")], capture_output=True,
                              text=True, timeout=60)
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["exports"][0]["export-size"] == 64 * MiB
        intruder = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xcc 4M 4k",
                                   a.uri("mig")], capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        busy.join(timeout=30)
    assert busy_errors == [], busy_errors
    assert intruder.returncode != 0 and "Operation not permitted" in (
        intruder.stdout + intruder.stderr), intruder.stdout
    assert "did not hand the lock over" in a.log()
    # Once the writer is idle (QEMU's qemu-io flushes), a second writer may win: the
    # first then gets errors that say so, never a silent write.
    time.sleep(0.6)
    intruder = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0xcd 5M 4k",
                               a.uri("mig")], capture_output=True, text=True, timeout=60)
    assert intruder.returncode == 0 and "wrote 4096/4096" in intruder.stdout
    assert "Operation not permitted" in destination.qemu_io("write -P 0xbd 6M 4k")
    assert "the lock on VDI 'mig' moved to nbdkit pid" in b.log()
    destination.qmp.command("quit")
    source.qmp.command("quit")
    destination.process.wait(timeout=30)
    source.process.wait(timeout=30)

    assert vdi_bytes(cluster, "mig", 0, MiB) == b"\xaa" * MiB
    assert vdi_bytes(cluster, "mig", MiB, MiB) == b"\xab" * MiB
    assert vdi_bytes(cluster, "mig", 2 * MiB, MiB) == b"\xbb" * MiB
    assert vdi_bytes(cluster, "mig", 3 * MiB, 64 * 1024) == b"\xbc" * (64 * 1024)
    assert vdi_bytes(cluster, "mig", 4 * MiB, 4096) == bytes(4096)
    assert vdi_bytes(cluster, "mig", 5 * MiB, 4096) == b"\xcd" * 4096
    assert vdi_bytes(cluster, "mig", 6 * MiB, 4096) == bytes(4096)
    assert "lock on VDI 'mig' moved" not in a.log()  # the source never wrote after


def test_writes_up_to_the_switchover_all_survive(cluster, hosts, qemus, tmp_path):
    """The source writes without pause while the migration runs, and once more with
    its VM stopped at the switchover (pause-before-switchover: HMP's qemu-io is not
    stopped with the VM as a guest's I/O is, and QEMU asserts on a write to a drive
    it has inactivated); every write it acknowledged is read back by the
    destination, and by dog's client after."""
    source, destination, port = source_and_destination(cluster, hosts, qemus, str(tmp_path),
                                                       "busy")
    source.qmp.command("migrate-set-capabilities", capabilities=[
        {"capability": "pause-before-switchover", "state": True}])
    acked: list[tuple[int, int]] = []
    block = 64 * 1024

    def write(number: int) -> None:
        offset, pattern = number * block, 1 + number % 250
        if wrote(source.qemu_io(f"write -P {pattern} {offset} {block}"), block, offset):
            acked.append((offset, pattern))

    def keep_writing() -> None:
        for number in range(800):
            # Up to the switchover, which waits for migrate-continue below.
            if source.qmp.command("query-migrate").get("status") == "pre-switchover":
                return
            write(number)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    while len(acked) < 5:
        assert writer.is_alive()
        time.sleep(0.02)
    source.qmp.command("migrate", uri=f"tcp:127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while source.qmp.command("query-migrate").get("status") != "pre-switchover":
        assert time.monotonic() < deadline, "the migration never reached the switchover"
        time.sleep(0.02)
    writer.join(timeout=60)
    write(900)  # the VM is stopped, its drive still active: the very last write
    source.qmp.command("migrate-continue", state="pre-switchover")
    assert source.migrated() == "completed"
    assert len(acked) >= 6 and acked[-1][0] == 900 * block
    assert wrote(destination.qemu_io("write -P 0xee 60M 64k"), 64 * 1024, 60 * MiB)
    for offset, pattern in acked:
        assert read_ok(destination.qemu_io(f"read -P {pattern} {offset} 64k"), 65536,
                       offset), (offset, pattern)
    destination.qmp.command("quit")
    destination.process.wait(timeout=30)
    for offset, pattern in acked:
        assert vdi_bytes(cluster, "busy", offset, 65536) == bytes([pattern]) * 65536


def test_a_cancelled_migration_leaves_the_source_writing(cluster, hosts, qemus, tmp_path):
    """Cancelled before the switchover, the migration leaves the source running with
    its lock: it goes on writing, and the destination never took the lock."""
    source, destination, port = source_and_destination(cluster, hosts, qemus, str(tmp_path),
                                                       "stay")
    assert wrote(source.qemu_io("write -P 0x11 0 64k"), 65536, 0)
    # Slow enough that it cannot finish before the cancel.
    source.qmp.command("migrate-set-parameters", **{"max-bandwidth": 64 * 1024})
    source.qmp.command("migrate", uri=f"tcp:127.0.0.1:{port}")
    time.sleep(0.5)
    assert source.qmp.command("query-migrate")["status"] == "active"
    source.qmp.command("migrate_cancel")
    assert source.migrated() == "cancelled"
    assert wrote(source.qemu_io("write -P 0x22 64k 64k"), 65536, 65536)
    assert read_ok(source.qemu_io("read -P 0x11 0 64k"), 65536, 0)
    with cluster.client(1) as client:
        lock = client.vdi_list(["stay"], usage=False)[0]["lock"]
    assert lock is not None and lock["owner"].startswith(
        f"nbdkit pid {hosts[0].process.pid} ")
    source.qmp.command("quit")
    source.process.wait(timeout=30)
    assert vdi_bytes(cluster, "stay", 0, 65536) == b"\x11" * 65536
    assert vdi_bytes(cluster, "stay", 65536, 65536) == b"\x22" * 65536
