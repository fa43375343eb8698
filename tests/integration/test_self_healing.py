"""Self-healing with real sheep processes: SIGKILLed nodes, whole zones lost, a
whole-cluster restart, joins and deaths in the middle of recovery.

Every scenario ends with the same strict check (``assert_fully_replicated``):
each object has N copies on the nodes the cluster's own placement names (STAT
through a live sheep), every one of them a live sheep's file, verified, all of
one version (newest-wins recovery compares versions, so equal content must carry
equal versions), and the files are byte for byte equal, to each other and to the
data written. Copies on other nodes are not counted either way: recovery may drop
surplus copies once the placement's holders have theirs.

Recovery is waited for with a deadline (``LocalCluster.wait_recovered``: every
live sheep has run the current epoch's recovery to its end), and the bounds are
asserted, not just waited on.
"""

from __future__ import annotations

import json
import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sheep import radix
from sheep.errors import Result
from sheep.oid import ObjectType, make_oid
from sheep.proto import Header, Op
from sheep.testing.cluster import LocalCluster, raw_call
from sheep.testing.nbd import fio_command, fio_jobs, needs_tools

KiB = 1 << 10
MiB = 1 << 20
object_size = 4 * MiB
small_object_size = 1 * MiB  # more objects for the same bytes: recovery takes longer

# Measured on 2 cores: 200 MiB (51 objects of 4 MiB, about 40 of them on the victim)
# is back to 3 copies 1 to 3 s after the SIGKILL; the bounds leave a wide margin.
recovery_200_mib_bound_s = 30.0
recovery_bound_s = 30.0
read_after_zone_loss_bound_s = 30.0


# --- helpers ----------------------------------------------------------------------------------


def write_vdi(cluster: LocalCluster, name: str, image: bytes, via: int = 0) -> dict[int, bytes]:
    """Create VDI name holding image, one object per write; return the expected bytes
    of each data object's file."""
    with cluster.client(via) as client:
        size = client.cluster_info()["object_size"]
        client.vdi_create(name, len(image))
        handle = client.vdi_open(name, writable=True)["handle"]
        for offset in range(0, len(image), size):
            client.vdi_write(handle, offset, image[offset:offset + size])
        client.vdi_close(handle)
        generation = client.vdi_list([name], usage=False)[0]["generation"]
    return {radix.data_oid(generation, index): padded(image[index * size:(index + 1) * size], size)
            for index in range(-(-len(image) // size))}


def write_raw_objects(cluster: LocalCluster, count: int, seed: int) -> dict[int, bytes]:
    """Objects written directly (no VDI), of random lengths; their expected files."""
    rng = random.Random(seed)
    with cluster.client(0) as client:
        size = client.cluster_info()["object_size"]
        written = {}
        for oid in range(1, count + 1):
            data = rng.randbytes(rng.randrange(1, 64 * KiB))
            client.create_and_write(oid, data)
            written[oid] = padded(data, size)
    return written


def padded(data: bytes, size: int) -> bytes:
    return data + bytes(size - len(data))


def read_vdi(cluster: LocalCluster, index: int, name: str, size: int,
             snapshot: str | None = None) -> bytes:
    with cluster.client(index) as client:
        handle = client.vdi_open(name, snapshot=snapshot)["handle"]
        image = b"".join(client.vdi_read(handle, offset, min(4 * MiB, size - offset))
                         for offset in range(0, size, 4 * MiB))
        client.vdi_close(handle)
    return image


def file_bytes(cluster: LocalCluster, index: int, oid: int) -> bytes:
    with open(cluster.object_path(index, oid), "rb") as file:
        return file.read()


def assert_fully_replicated(cluster: LocalCluster, oids: set[int], copies: int,
                            expected: dict[int, bytes]) -> dict[int, list[int]]:
    """Each object has ``copies`` copies where the cluster's placement says, on live
    sheep, one version, all verified, the files equal to each other and to expected
    (where given). Returns the holders of each object.

    One version: a write applied twice on some replicas (a retry on a new epoch, a
    client re-sending through another gateway, a recovery copy that had it already)
    must not leave them ahead of the others, or a copy that missed a later write
    could rank as current."""
    assert oids, "no objects to check"
    holders: dict[int, list[int]] = {}
    problems: list[str] = []
    with cluster.client(cluster.first_alive()) as client:
        for oid in sorted(oids):
            replicas = client.stat(oid)["replicas"]
            where = [cluster.index_of(replica["endpoint"]) for replica in replicas]
            holders[oid] = where
            if len(set(where)) != copies:
                problems.append(f"{oid:016x}: placement {where}, not {copies} nodes")
            dead = [index for index in where if not cluster.sheep[index].alive]
            bad = [replica for replica in replicas if "error" in replica
                   or replica.get("unverified") or replica.get("deleted")]
            versions = {replica.get("version") for replica in replicas}
            missing = [index for index in where if index not in cluster.object_files(oid)]
            if dead or bad or missing:
                problems.append(f"{oid:016x}: dead holders {dead}, missing files on {missing}, "
                                f"bad replicas {bad}")
                continue
            copies_bytes = {index: file_bytes(cluster, index, oid) for index in where}
            if len(versions) != 1:  # newest-wins needs one version for one content
                problems.append(f"{oid:016x}: versions {[r['version'] for r in replicas]} "
                                f"on {where}")
            if len(set(copies_bytes.values())) != 1:
                problems.append(f"{oid:016x}: the copies on {where} differ")
            elif oid in expected and copies_bytes[where[0]] != expected[oid]:
                problems.append(f"{oid:016x}: the copies on {where} differ from the data written")
    assert not problems, f"{len(problems)} of {len(oids)} objects: " + "; ".join(problems[:10])
    return holders


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def recovery_of(cluster: LocalCluster, index: int) -> dict[str, Any]:
    with cluster.client(index) as client:
        info = client.node_info()
    return {"node_epoch": info["epoch"], **(info["recovery"] or {})}


def dog(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dog", *args, "-p", str(port)],
                          capture_output=True, text=True, timeout=60)


# --- a lost node: 200 MiB back to 3 copies, in bounded time ------------------------------------


def test_200_mib_are_back_to_3_copies_on_the_3_survivors_in_bounded_time(make_cluster):
    cluster: LocalCluster = make_cluster(4)
    cluster.format(3, object_size)
    image = random.Random(200).randbytes(200 * MiB)
    expected = write_vdi(cluster, "big", image)
    oids = cluster.all_oids()
    assert set(expected) <= oids and len(oids) > len(expected), "data and tree objects"
    cluster.wait_recovered()
    before = assert_fully_replicated(cluster, oids, 3, expected)
    victim, survivors = 3, [0, 1, 2]
    lacking = {index: {oid for oid in oids if index not in before[oid]} for index in survivors}
    assert sum(len(lack) for lack in lacking.values()) == \
        len([oid for oid in oids if victim in before[oid]]) > len(oids) // 2

    killed = time.monotonic()
    cluster.kill(victim)
    wait_until(lambda: all(set(survivors) <= set(cluster.object_files(oid)) for oid in oids),
               recovery_200_mib_bound_s, "every object's file on the 3 survivors")
    cluster.wait_recovered(timeout_s=recovery_200_mib_bound_s)
    elapsed = time.monotonic() - killed
    assert elapsed < recovery_200_mib_bound_s

    after = assert_fully_replicated(cluster, oids, 3, expected)
    assert all(sorted(where) == survivors for where in after.values())
    # The cluster's own account agrees with the store directories: each survivor
    # fetched exactly what it lacked, in the epoch after the kill, nothing failed.
    for index in survivors:
        status = recovery_of(cluster, index)
        assert status["epoch"] == status["node_epoch"], status
        assert status["to_recover"] == status["recovered"] == len(lacking[index]), \
            (index, status, len(lacking[index]))
    with cluster.client(1) as client:
        for index in range(len(image) // object_size):
            located = client.vdi_object("big", index)
            assert located["oid"] in expected
            assert sorted(cluster.index_of(r["endpoint"]) for r in located["replicas"]) \
                == survivors
    assert read_vdi(cluster, 2, "big", len(image)) == image


# --- I/O continuity through NBD: a SIGKILL, then a join ---------------------------------------


class QemuIo:
    """One interactive qemu-io process (one NBD connection), driven a command at a
    time: each command's output ends with its statistics line, or a failure line."""

    def __init__(self, uri: str) -> None:
        self.process = subprocess.Popen(["qemu-io", "-f", "raw", uri], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.replace("qemu-io> ", "").rstrip("\n"))
        self.lines.put("")  # end of output

    def run(self, command: str, timeout_s: float = 60.0) -> list[str]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        output: list[str] = []
        while True:
            line = self.lines.get(timeout=timeout_s)
            if not line and self.process.poll() is not None:
                raise AssertionError(f"qemu-io exited during {command!r}: {output}")
            output.append(line)
            if " ops; " in line or line.startswith(("read failed", "write failed")):
                return output

    def quit(self) -> int | None:
        """Its exit code (1 if any command failed), or None if it had already exited."""
        if self.process.poll() is not None:
            return None
        assert self.process.stdin is not None
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class PatternWriter:
    """Writes 256 KiB regions of a VDI through qemu-io, each one byte pattern, and
    reads back (read -P) the region just written and another one, until stopped;
    records every line that reports a failure."""

    region_bytes = 256 * KiB

    def __init__(self, uri: str, size: int, seed: int) -> None:
        self.qemu_io = QemuIo(uri)
        self.patterns = [0] * (size // self.region_bytes)
        self.rng = random.Random(seed)
        self.ops = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop)

    def _check(self, output: list[str]) -> bool:
        failed = [line for line in output if "failed" in line]
        self.errors += failed
        return not failed

    def _loop(self) -> None:
        try:
            while not self.stop.is_set():
                region = self.rng.randrange(len(self.patterns))
                pattern = self.ops % 255 + 1
                span = f"{region * self.region_bytes} {self.region_bytes}"
                if self._check(self.qemu_io.run(f"write -P {pattern:#x} {span}")):
                    self.patterns[region] = pattern
                self._check(self.qemu_io.run(f"read -P {pattern:#x} {span}"))
                other = self.rng.randrange(len(self.patterns))
                self._check(self.qemu_io.run(
                    f"read -P {self.patterns[other]:#x} {other * self.region_bytes} "
                    f"{self.region_bytes}"))
                self.ops += 1
        except BaseException as error:  # reported by the test
            self.errors.append(repr(error))

    def wait_ops(self, count: int, timeout_s: float = 60.0) -> None:
        wait_until(lambda: self.ops >= count or not self.thread.is_alive(), timeout_s,
                   f"{count} qemu-io rounds")
        assert self.thread.is_alive(), self.errors

    def image(self) -> bytes:
        return b"".join(bytes([pattern]) * self.region_bytes for pattern in self.patterns)


@needs_tools("nbdkit", "qemu-io", "fio", packages="nbdkit, nbdkit-plugin-python, qemu-utils, fio")
@pytest.mark.parametrize("victim", ["gateway", "replica"])
def test_nbd_clients_see_no_error_through_a_sigkill_and_a_join(make_cluster, make_nbd, victim,
                                                                tmp_path):
    """qemu-io (writes and pattern-checked reads) and fio (randwrite with crc32c
    verification, 8 requests in flight) run through one nbdkit while a sheep is
    SIGKILLed (the plugin's gateway, or a sheep holding replicas of what is written)
    and then a new sheep joins: neither client sees an error, and afterwards every
    object is back to 3 copies and every byte verifies."""
    cluster: LocalCluster = make_cluster(4)
    cluster.format(3, object_size)
    newcomer = cluster.add()
    with cluster.client(0) as client:
        client.vdi_create("patterns", 48 * MiB)
        client.vdi_create("fio", 32 * MiB)
    # The plugin's gateway is sheep 0; the newcomer is known to it from the start.
    server = make_nbd([node.port for node in cluster.sheep])
    victim_index = 0 if victim == "gateway" else 1

    writer = PatternWriter(server.uri("patterns"), 48 * MiB, seed=7)
    fio = subprocess.Popen(fio_command(server.uri("fio"), "--verify_backlog=32",
                                       "--rate=,4m", aux_path=str(tmp_path)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer.thread.start()
    try:
        writer.wait_ops(15)
        # fio is writing (its export is open: fio's nbd engine connects once to learn
        # the size and again to do I/O) before the kill: an open that meets a dying
        # gateway is the plugin's open path (issue #21), not the continuity of I/O
        # this test is about.
        with cluster.client(2) as client:
            deadline = time.monotonic() + 30
            while not client.vdi_list(["fio"])[0].get("used"):
                assert fio.poll() is None, f"fio ended before it opened: {fio.communicate()}"
                assert time.monotonic() < deadline, "fio did not open its export in 30 s"
                time.sleep(0.1)
        assert fio.poll() is None, f"fio ended before the kill: {fio.communicate()}"
        cluster.kill(victim_index)
        writer.wait_ops(writer.ops + 15)
        cluster.start(newcomer.index)
        assert fio.poll() is None, f"fio ended before the join: {fio.communicate()}"
        writer.wait_ops(writer.ops + 15)
        fio_out, fio_err = fio.communicate(timeout=120)
    finally:
        writer.stop.set()
        writer.thread.join(timeout=120)
        qemu_io_exit = writer.qemu_io.quit() if not writer.thread.is_alive() else None
        writer.qemu_io.kill()
        if fio.poll() is None:
            fio.kill()
            fio.communicate()
    assert writer.errors == [], writer.errors[:20]
    assert qemu_io_exit == 0
    jobs = fio_jobs(fio.returncode, fio_out, fio_err)
    assert jobs[0]["write"]["io_bytes"] == 32 * MiB
    assert jobs[0]["read"]["io_bytes"] >= 32 * MiB  # every block read back and verified

    cluster.wait_recovered(timeout_s=recovery_bound_s)
    with cluster.client(newcomer.index) as client:
        generation = client.vdi_list(["patterns"], usage=False)[0]["generation"]
    image = writer.image()
    expected = {radix.data_oid(generation, index): image[index * object_size:
                                                         (index + 1) * object_size]
                for index in range(len(image) // object_size)}
    expected = {oid: data for oid, data in expected.items() if any(data)}  # written ones
    assert read_vdi(cluster, newcomer.index, "patterns", 48 * MiB) == image
    # A fresh nbdkit on the newcomer alone: fio reads every block back and verifies it.
    fresh = make_nbd([newcomer.port])
    verify = subprocess.run(fio_command(fresh.uri("fio"), "--verify_only=1",
                                        aux_path=str(tmp_path)),
                            capture_output=True, text=True, timeout=120)
    jobs = fio_jobs(verify.returncode, verify.stdout, verify.stderr)
    assert jobs[0]["read"]["io_bytes"] == 32 * MiB
    holders = assert_fully_replicated(cluster, cluster.all_oids(), 3, expected)
    assert any(newcomer.index in where for where in holders.values())


# --- zones: a whole zone lost ---------------------------------------------------------------


def test_two_copies_in_two_zones_survive_the_loss_of_a_whole_zone(make_cluster):
    cluster: LocalCluster = make_cluster(4, zones=[0, 0, 1, 1])
    cluster.format(2, object_size)
    image = random.Random(2).randbytes(64 * MiB)
    expected = write_vdi(cluster, "zoned", image) | write_raw_objects(cluster, 40, seed=3)
    oids = cluster.all_oids()
    cluster.wait_recovered()
    before = assert_fully_replicated(cluster, oids, 2, expected)
    assert all({cluster.sheep[index].zone for index in where} == {0, 1}
               for where in before.values()), "one copy in each zone"

    killed = time.monotonic()
    zone = [cluster.sheep[index].process for index in (2, 3)]
    for process in zone:  # SIGKILL both, then reap both: the zone goes at once
        assert process is not None
        process.kill()
    for process in zone:
        assert process is not None and process.wait(timeout=30) == -9
    # Readable at once through either survivor (reads wait out the epoch change)...
    for index in (0, 1):
        assert read_vdi(cluster, index, "zoned", len(image)) == image
        with cluster.client(index) as client:
            for oid in range(1, 41):
                assert client.read(oid, 0, object_size) == expected[oid], (index, oid)
    assert time.monotonic() - killed < read_after_zone_loss_bound_s
    # ...and after recovery: with one zone left, each object has one copy where the
    # placement says (one copy per zone), and it is the data written.
    cluster.wait_recovered(timeout_s=recovery_bound_s)
    assert_fully_replicated(cluster, oids, 1, expected)
    for index in (0, 1):
        assert read_vdi(cluster, index, "zoned", len(image)) == image


# --- a whole-cluster restart in reverse order ------------------------------------------------


def test_a_shut_down_cluster_restarted_in_reverse_order_reads_everything_back(make_cluster):
    cluster: LocalCluster = make_cluster(4)
    cluster.format(3, object_size)
    rng = random.Random(4)
    first = rng.randbytes(48 * MiB)
    expected = write_vdi(cluster, "kept", first)
    with cluster.client(1) as client:
        client.vdi_snapshot("kept", "before")
        handle = client.vdi_open("kept", writable=True)["handle"]
        second = bytearray(first)
        for offset in (0, 5 * MiB + 123, 30 * MiB - 7):  # copy-on-write into 3 objects
            patch = rng.randbytes(300 * KiB)
            client.vdi_write(handle, offset, patch)
            second[offset:offset + len(patch)] = patch
        client.vdi_close(handle)
    expected |= write_raw_objects(cluster, 30, seed=5)
    oids = cluster.all_oids()
    cluster.wait_recovered()
    before = assert_fully_replicated(cluster, oids, 3, expected)
    files_before = {oid: cluster.object_files(oid) for oid in oids}

    shutdown = dog(cluster.sheep[2].port, "cluster", "shutdown")
    assert shutdown.returncode == 0, shutdown.stderr
    for node in cluster.sheep:
        assert node.process is not None and node.process.wait(timeout=30) == 0
    for index in reversed(range(4)):
        cluster.start(index)
    for index in range(4):  # every sheep has every member back, and serves
        deadline = time.monotonic() + 30
        while cluster.wait_epoch(index, 4, timeout_s=30)["status"] != "ok":
            assert time.monotonic() < deadline, f"sheep {index} is not serving"
            time.sleep(0.05)
    # A check at once, while the copies are still being verified, finds each to be the
    # newest copy's twin: nothing to repair, no error (it once made copies over them,
    # and was refused on the snapshot's objects as "belongs to a frozen generation").
    quick = dog(cluster.sheep[1].port, "cluster", "check", "--no-wait", "--json")
    assert quick.returncode == 0, quick.stdout + quick.stderr
    report = json.loads(quick.stdout)
    assert report["copies_made"] == 0 and report["error"] == 0, report
    # Meanwhile every command tells the same state: recovering (verifying), or healthy
    # once done; never degraded or unavailable.
    info = json.loads(dog(cluster.sheep[2].port, "cluster", "info", "--json").stdout)
    assert info["health"]["state"] in ("recovering", "healthy"), info["health"]
    for command in (("node", "recovery"), ("cluster", "info")):
        shown = dog(cluster.sheep[3].port, *command)
        assert shown.returncode == 0, shown.stderr
        assert "degraded" not in shown.stdout and "unavailable" not in shown.stdout, shown.stdout
        assert "recovering" in shown.stdout or "healthy" in shown.stdout, shown.stdout
    # Right after the restart, copies are still being verified: a check waits for
    # that (it reads as verifying, not as repairs or errors), then finds all fine.
    check = dog(cluster.sheep[0].port, "cluster", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert " 0 repaired" in check.stdout and "0 unchecked" in check.stdout, check.stdout
    assert "Cluster health: healthy" in check.stdout

    for index in range(4):  # through every sheep, at once
        assert read_vdi(cluster, index, "kept", len(first)) == bytes(second), index
        assert read_vdi(cluster, index, "kept", len(first), snapshot="before") == first, index
        with cluster.client(index) as client:
            for oid in range(1, 31):
                assert client.read(oid, 0, object_size) == expected[oid], (index, oid)
    cluster.wait_recovered(timeout_s=recovery_bound_s)  # every copy verified
    # The same nodes hold the same copies: nothing was lost, nothing needed moving.
    assert assert_fully_replicated(cluster, oids, 3, expected) == before
    assert {oid: cluster.object_files(oid) for oid in oids} == files_before
    info = json.loads(dog(cluster.sheep[0].port, "cluster", "info", "--json").stdout)
    assert info["status"] == "ok"
    with cluster.client(3) as client:  # and it takes writes again
        handle = client.vdi_open("kept", writable=True)["handle"]
        client.vdi_write(handle, 47 * MiB, b"after the restart")
        client.vdi_close(handle)
    assert read_vdi(cluster, 0, "kept", len(first))[47 * MiB:47 * MiB + 17] == \
        b"after the restart"


# --- a join, and a death, in the middle of recovery -------------------------------------------

# Many small objects: each costs recovery a whole object, so a pass lasts a while
# (about 2 s here), long enough for a node to join or die in its middle.
raw_objects = 300


def write_many_objects(cluster: LocalCluster, seed: int) -> tuple[bytes, dict[int, bytes]]:
    image = random.Random(seed).randbytes(32 * MiB)
    expected = write_vdi(cluster, "busy", image) | write_raw_objects(cluster, raw_objects, seed)
    return image, expected


def wait_recovery_under_way(cluster: LocalCluster, indexes: list[int], epoch_before: int,
                            remaining_min: int, timeout_s: float = 20.0) -> dict[int, int]:
    """Poll until one of the sheep is fetching, in an epoch after epoch_before, with at
    least remaining_min objects to go; return each sheep's objects to go then."""
    remaining: dict[int, int] = {}

    def under_way() -> bool:
        for index in indexes:
            status = recovery_of(cluster, index)
            fetching = status.get("running") and status["epoch"] > epoch_before \
                and status.get("phase", "fetching") == "fetching"
            remaining[index] = status["to_recover"] - status["recovered"] if fetching else 0
        return max(remaining.values()) >= remaining_min

    wait_until(under_way, timeout_s, f"recovery under way with {remaining_min} objects to go")
    return remaining


def assert_everything_reads_back(cluster: LocalCluster, index: int, image: bytes,
                                 expected: dict[int, bytes]) -> None:
    assert read_vdi(cluster, index, "busy", len(image)) == image
    with cluster.client(index) as client:
        for oid in range(1, raw_objects + 1):
            assert client.read(oid, 0, len(expected[oid])) == expected[oid], oid


def test_a_node_joining_during_recovery_still_converges_to_3_copies(make_cluster):
    cluster: LocalCluster = make_cluster(4)
    cluster.format(3, small_object_size)
    newcomer = cluster.add()
    image, expected = write_many_objects(cluster, seed=6)
    oids = cluster.all_oids()
    cluster.wait_recovered()
    survivors = [0, 1, 2]
    epoch_before = recovery_of(cluster, 0)["node_epoch"]

    # Recovery held to a crawl until the newcomer has joined: the join surely comes
    # while the kill's recovery is under way, however fast or busy the machine.
    assert dog(cluster.sheep[0].port, "node", "recovery", "--max-rate", "2M").returncode == 0
    cluster.kill(3)
    wait_recovery_under_way(cluster, survivors, epoch_before, remaining_min=20)
    cluster.start(newcomer.index)
    join_epoch = recovery_of(cluster, newcomer.index)["node_epoch"]
    assert dog(cluster.sheep[0].port, "node", "recovery", "--max-rate", "0").returncode == 0
    cluster.wait_recovered(timeout_s=recovery_bound_s)

    # The join came while the kill's recovery was under way: in the join's epoch, a
    # survivor still lacked objects (it holds every object once that pass is over).
    statuses = {index: recovery_of(cluster, index) for index in survivors}
    assert all(status["epoch"] == join_epoch for status in statuses.values()), statuses
    assert any(status["to_recover"] > 0 for status in statuses.values()), statuses
    holders = assert_fully_replicated(cluster, oids, 3, expected)
    assert all(3 not in where for where in holders.values())
    assert sum(newcomer.index in where for where in holders.values()) > len(oids) // 2
    assert_everything_reads_back(cluster, newcomer.index, image, expected)


def test_a_node_dying_during_recovery_still_converges_to_3_copies(make_cluster):
    cluster: LocalCluster = make_cluster(5)
    cluster.format(3, small_object_size)
    image, expected = write_many_objects(cluster, seed=8)
    oids = cluster.all_oids()
    cluster.wait_recovered()
    epoch_before = recovery_of(cluster, 0)["node_epoch"]

    cluster.kill(4)
    remaining = wait_recovery_under_way(cluster, [0, 1, 2, 3], epoch_before, remaining_min=20)
    second = max(remaining, key=lambda index: remaining[index])  # in the middle of fetching
    cluster.kill(second)
    survivors = [index for index in range(4) if index != second]
    cluster.wait_recovered(timeout_s=recovery_bound_s)

    holders = assert_fully_replicated(cluster, oids, 3, expected)
    assert all(sorted(where) == survivors for where in holders.values())
    assert_everything_reads_back(cluster, survivors[-1], image, expected)


def test_a_drained_copy_newer_than_its_fellow_holders_brings_them_up_and_goes(make_cluster):
    """Copies with the same contents may differ in version: a raw write (no version)
    takes each replica's own version + 1. When the newer copy becomes surplus (its
    node is drained), its fellow holder stays in the placement, behind it, and
    neither recovery (absent copies) nor verification (unverified ones) would bring
    that one up: the surplus holder repairs it, then drops its copy. It used to wait
    for ever, and the drain never ended."""
    cluster: LocalCluster = make_cluster(4)
    cluster.format(2)
    bumped: list[int] = []
    with cluster.client(0) as client:
        index = 0
        while len(bumped) < 4:
            oid = make_oid(ObjectType.RAW, 0, index)
            index += 1
            client.create_and_write(oid, b"contents")
            if 3 in cluster.object_files(oid):
                bumped.append(oid)
        epoch = client.node_info()["epoch"]
        ports = sorted(node["port"] for node in client.node_list())
    for oid in bumped:
        write = Header(opcode=Op.WRITE_PEER, epoch=epoch, oid=oid, count=8)
        reply, _ = raw_call(cluster.sheep[3].port, write, b"contents", credentials=cluster.credentials)
        assert reply.result == Result.SUCCESS
    with cluster.client(1) as client:
        assert len({r["version"] for r in client.stat(bumped[0])["replicas"]}) == 2
    drain = subprocess.run([sys.executable, "-m", "dog", "node", "drain",
                            str(ports.index(cluster.sheep[3].port)),
                            "-p", str(cluster.sheep[0].port)],
                           capture_output=True, text=True, timeout=60)
    assert drain.returncode == 0, drain.stderr
    assert cluster.sheep[3].process is not None
    assert cluster.sheep[3].process.wait(timeout=30) == 0, "the drained node emptied itself"
    # Its leave is an epoch of its own: a stat while the others still apply it may meet
    # a holder at the other epoch (an error entry), as CI once did.
    cluster.wait_recovered()
    with cluster.client(0) as client:
        for oid in bumped:
            assert 3 not in cluster.object_files(oid)
            stat = client.stat(oid)
            assert len(stat["replicas"]) == 2
            assert {r["version"] for r in stat["replicas"]} == {2}, stat
            assert client.read(oid, 0, 8) == b"contents"


def test_a_write_to_an_object_its_new_holder_lacks_makes_a_partial_copy_recovery_fills(
        make_cluster):
    """A new holder that lacks an object keeps a client's write as a partial copy
    instead of making the write wait for a whole copy (the slow path: the gateway
    copying the object there first); recovery fills in the rest, never over the
    write. With recovery held to a crawl the writes come first; afterwards every
    object has its 3 copies, one version, byte-identical, with the writes in."""
    cluster: LocalCluster = make_cluster(4)
    cluster.format(3)
    rng = random.Random(5)
    image = bytearray(rng.randbytes(12 * 4 * MiB))
    expected = write_vdi(cluster, "disk", bytes(image))
    result = dog(cluster.sheep[0].port, "node", "recovery", "--max-rate", "1M")
    assert result.returncode == 0, result.stderr
    cluster.kill(3)
    cluster.wait_epoch(0, 3)
    patch = rng.randbytes(4 * KiB)
    with cluster.client(0) as client:
        handle = client.vdi_open("disk", writable=True)["handle"]
        for index in range(12):
            offset = index * 4 * MiB + 64 * KiB
            client.vdi_write(handle, offset, patch)
            image[offset:offset + len(patch)] = patch
        client.vdi_close(handle)
        partial = sum((info.get("recovery") or {}).get("partial", 0)
                      for info in client.node_list())
    assert partial > 0, "some survivor keeps a write as a partial copy"
    logs = "".join(Path(node.directory, "sheep.log").read_text() for node in cluster.sheep[:3])
    assert "for a write" not in logs, "no write waited for a whole copy (the slow path)"
    dog(cluster.sheep[0].port, "node", "recovery", "--max-rate", "0")
    cluster.wait_recovered(60)
    expected = {oid: bytes(image[index * 4 * MiB:(index + 1) * 4 * MiB])
                for index, oid in enumerate(expected)}  # in write order: index order
    assert_fully_replicated(cluster, set(expected), 3, expected)
    assert read_vdi(cluster, 1, "disk", len(image)) == bytes(image)
    with cluster.client(0) as client:
        assert sum((info.get("recovery") or {}).get("partial", 0)
                   for info in client.node_list()) == 0


def test_a_partial_copy_restored_after_a_restart_does_not_keep_writes_it_missed(
        make_cluster):
    """A sheep with partial copies stops cleanly; the same ranges are written again
    while it is down. Back, its partial copies are filled, and then compared with the
    other copies (they were away): the newer writes win on every copy, and reads
    through it see them. (Filled and kept as they were, they held the old bytes at the
    newest version: found by a review of the durable partial copies.)"""
    cluster: LocalCluster = make_cluster(5)
    cluster.format(3)
    image = random.Random(5).randbytes(12 * 4 * MiB)
    oids = list(write_vdi(cluster, "disk", image))
    assert dog(cluster.sheep[0].port, "node", "recovery", "--max-rate", "1M").returncode == 0
    cluster.kill(4)
    cluster.wait_epoch(0, 4)

    def patch(via: int, byte: bytes) -> None:
        with cluster.client(via) as client:
            handle = client.vdi_open("disk", writable=True)["handle"]
            for index in range(12):
                client.vdi_write(handle, index * 4 * MiB + 64 * KiB, byte * (4 * KiB))
            client.vdi_close(handle)

    patch(0, b"\x11")  # new holders lack the objects yet: partial copies
    holders = []
    for index in range(4):
        with cluster.client(index) as client:
            if (client.node_info().get("recovery") or {}).get("partial"):
                holders.append(index)
    assert holders, "no partial copy was made"
    target = holders[0]
    assert cluster.stop(target) == 0
    survivor = next(index for index in range(4) if index != target)
    cluster.wait_epoch(survivor, 3)
    patch(survivor, b"\x22")
    cluster.start(target)
    cluster.wait_epoch(survivor, 4)
    assert dog(cluster.sheep[survivor].port, "node", "recovery", "--max-rate",
               "0").returncode == 0
    cluster.wait_recovered(timeout_s=recovery_bound_s)
    for oid in oids:
        marks = {index: file_bytes(cluster, index, oid)[64 * KiB:64 * KiB + 1]
                 for index in cluster.object_files(oid) if cluster.sheep[index].alive}
        assert set(marks.values()) == {b"\x22"}, (hex(oid), marks)
    with cluster.client(target) as client:
        handle = client.vdi_open("disk")["handle"]
        for index in range(12):
            assert client.vdi_read(handle, index * 4 * MiB + 64 * KiB, 1) == b"\x22", index
        client.vdi_close(handle)
