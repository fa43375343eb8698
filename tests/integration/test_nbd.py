"""The NBD export with real nbdkit and real clients: qemu-img, qemu-io, nbdinfo, nbdcopy, fio.

One 3-sheep cluster (two copies) and one nbdkit (sheep=all three) are shared by
the module; every test works on its own VDIs. The tests that need their own
nbdkit (locks) or their own cluster (a SIGKILL) start them.

Where a test must send requests no well-behaved client sends (a read past the
end, a write to a read-only export) or must know exactly when each write was
acknowledged (the live snapshot), it speaks NBD itself with ``NbdClient``: a
minimal fixed-newstyle client with simple replies, one request at a time.
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sheep import radix
from sheep.testing.cluster import LocalCluster
from sheep.testing.nbd import NbdServer, needs_tools

KiB = 1 << 10
MiB = 1 << 20
object_size = 4 * MiB
tools = ("nbdkit", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "fio")

pytestmark = needs_tools(*tools, packages="nbdkit, nbdkit-plugin-python, libnbd-bin, qemu-utils, fio")


# --- a minimal NBD client -----------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERR_UNKNOWN = (1 << 31) | 6
INFO_EXPORT = 0
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_FLAG_FUA = 1
FLAG_READ_ONLY = 1 << 1
FLAG_CAN_MULTI_CONN = 1 << 8


class NbdError(Exception):
    """The server answered a request with an error (an errno value)."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{what}: NBD error {code} ({os.strerror(code)})")
        self.code = code


class NbdOptionError(Exception):
    """The server refused an option in the handshake (e.g. NBD_OPT_GO for an unknown export)."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(f"option refused ({reply:#x}): {message}")
        self.reply = reply


class NbdClient:
    def __init__(self, port: int, export: str, timeout_s: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.handles = iter(range(1, 1 << 62))
        self.size = self.flags = -1
        try:
            magic, opt_magic, _ = struct.unpack(">QQH", self._recv(18))
            assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT), "not a fixed-newstyle server"
            self.sock.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
            name = export.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
            while True:
                magic, _, reply, length = struct.unpack(">QIII", self._recv(20))
                assert magic == OPT_REPLY_MAGIC
                payload = self._recv(length)
                if reply & (1 << 31):
                    raise NbdOptionError(reply, payload.decode(errors="replace"))
                if reply == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                    self.size, self.flags = struct.unpack(">QH", payload[2:12])
                if reply == REP_ACK:
                    break
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def read_only(self) -> bool:
        return bool(self.flags & FLAG_READ_ONLY)

    def _recv(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("the NBD server closed the connection")
            data += chunk
        return bytes(data)

    def request(self, command: int, offset: int = 0, length: int = 0, data: bytes = b"",
                flags: int = 0, reply_bytes: int = 0) -> bytes:
        handle = next(self.handles)
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, handle, offset,
                                      length) + data)
        magic, error, got = struct.unpack(">IIQ", self._recv(16))
        assert (magic, got) == (SIMPLE_REPLY_MAGIC, handle), (hex(magic), got, handle)
        if error:
            raise NbdError(error, f"command {command} at {offset}+{length}")
        return self._recv(reply_bytes) if reply_bytes else b""

    def read(self, offset: int, length: int) -> bytes:
        return self.request(CMD_READ, offset, length, reply_bytes=length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self.request(CMD_WRITE, offset, len(data), data, CMD_FLAG_FUA if fua else 0)

    def flush(self) -> None:
        self.request(CMD_FLUSH)

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(str(tmp_path_factory.mktemp("nbd-cluster")), nodes=3) as local:
        local.start()
        local.format(copies=2, object_size=object_size)
        yield local


@pytest.fixture(scope="module")
def nbd(cluster: LocalCluster, tmp_path_factory) -> Iterator[NbdServer]:
    """nbdkit with sheep=all three (gateway: sheep 0); stopped by PID at teardown."""
    server = NbdServer([node.port for node in cluster.sheep],
                       str(tmp_path_factory.mktemp("nbd") / "nbdkit.log"))
    yield server
    server.stop()


def run(*command: str, check: bool = True, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if check:
        assert result.returncode == 0, (command, result.returncode, result.stdout, result.stderr)
    return result


def qemu_io(uri: str, *commands: str, read_only: bool = False,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """One qemu-io session (one NBD connection) running the commands in order.

    qemu-io exits 1 when any command failed, a pattern check (read -P) included.
    """
    args = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        args += ["-c", command]
    result = run(*args, uri, check=False)
    if check:
        assert result.returncode == 0 and "failed" not in result.stdout + result.stderr, (
            commands, result.returncode, result.stdout[-3000:], result.stderr[-3000:])
    return result


def used(cluster: LocalCluster, name: str) -> int:
    with cluster.client(1) as client:
        return int(next(item["used"] for item in client.vdi_list([name])
                        if not item["snapshot"]))


def closed(cluster: LocalCluster, name: str, timeout_s: float = 10.0, index: int = 0) -> None:
    """Wait until the VDI's writer has let go of it: nbdkit closes an export after
    its NBD client is gone, and the close saves the change masks (new objects, a
    change page and its directory, the first time) before it releases the lock."""
    deadline = time.monotonic() + timeout_s
    with cluster.client(index) as client:
        while client.vdi_list([name], usage=False)[0]["lock"] is not None:
            assert time.monotonic() < deadline, f"{name} is still locked"
            time.sleep(0.05)


def stored_objects(cluster: LocalCluster) -> int:
    with cluster.client(0) as client:
        return sum(node["objects"] for node in client.node_list())


def nbdinfo_json(uri: str) -> dict[str, Any]:
    exports = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"]
    assert len(exports) == 1
    export: dict[str, Any] = exports[0]
    return export


def exports_of(server: NbdServer) -> dict[str, dict[str, Any]]:
    """nbdinfo --list: every export by name."""
    listing = run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{server.port}").stdout
    return {item["export-name"]: item for item in json.loads(listing)["exports"]}


def nbdinfo_map(uri: str) -> list[tuple[int, int, str]]:
    """(offset, length, description) of nbdinfo --map, adjacent equal extents merged."""
    merged: list[tuple[int, int, str]] = []
    for line in run("nbdinfo", "--map", uri).stdout.splitlines():
        offset, length, _, description = line.split(maxsplit=3)
        if merged and merged[-1][2] == description and sum(merged[-1][:2]) == int(offset):
            merged[-1] = (merged[-1][0], merged[-1][1] + int(length), description)
        else:
            merged.append((int(offset), int(length), description))
    return merged


def block_runs(size: int, regions: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) runs of 4 KiB blocks: data where a region touches."""
    data = sorted({block for offset, length in regions
                   for block in range(offset // 4096, -(-(offset + length) // 4096))})
    runs: list[tuple[int, int, bool]] = []
    at = 0
    for block in data:
        start = block * 4096
        if start > at:
            runs.append((at, start - at, False))
        if runs and runs[-1][2] and sum(runs[-1][:2]) == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + 4096, True)
        else:
            runs.append((start, 4096, True))
        at = start + 4096
    if at < size:
        runs.append((at, size - at, False))
    return runs


def objects_touched(regions: list[tuple[int, int]]) -> set[int]:
    return {index for offset, length in regions
            for index in range(offset // object_size, (offset + length - 1) // object_size + 1)}


def wait_for_count(items: list[Any], count: int, writer: threading.Thread, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(items) < count:
        assert writer.is_alive(), "the writer stopped early"
        assert time.monotonic() < deadline, f"{count} writes within {timeout_s} s"
        time.sleep(0.002)


# --- qemu-img and nbdcopy: sparse round trips ---------------------------------------------


def test_qemu_img_convert_round_trip_keeps_holes(cluster, nbd, tmp_path):
    size = 40 * MiB
    rng = random.Random(5)
    regions = [(MiB + 123, 300 * KiB + 7),            # inside object 0
               (2 * object_size - 5000, 100_000),      # across the boundary of objects 1 and 2
               (7 * object_size + 7, 4097)]            # inside object 7
    image = tmp_path / "holes.img"
    with open(image, "wb") as file:
        file.truncate(size)
        for offset, length in regions:
            file.seek(offset)
            file.write(rng.randbytes(length))
    data_objects = objects_touched(regions)
    assert data_objects == {0, 1, 2, 7}
    with cluster.client(0) as client:
        client.vdi_create("sparse", size)

    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), nbd.uri("sparse"))
    assert used(cluster, "sparse") == len(data_objects) * object_size

    # Block status, at 4 KiB: the written blocks are data, the rest (inside the written
    # objects too) holes that read as zeros.
    expected = block_runs(size, regions)
    mapped = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw",
                            nbd.uri("sparse")).stdout)
    merged: list[tuple[int, int, bool, bool]] = []
    for extent in mapped:
        item = (extent["start"], extent["length"], extent["data"], extent["zero"])
        if merged and merged[-1][2:] == item[2:]:
            merged[-1] = (merged[-1][0], merged[-1][1] + item[1], *item[2:])
        else:
            merged.append(item)
    assert merged == [(start, length, is_data, not is_data) for start, length, is_data in expected]
    assert nbdinfo_map(nbd.uri("sparse")) == [
        (start, length, "data" if is_data else "hole,zero") for start, length, is_data in expected]

    # Back out, through qemu-img and through nbdcopy: identical bytes, still sparse.
    for name, command in [("qemu-img.img", ["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                            nbd.uri("sparse")]),
                          ("nbdcopy.img", ["nbdcopy", nbd.uri("sparse")])]:
        out = tmp_path / name
        run(*command, str(out))
        run("cmp", str(image), str(out))
        allocated = out.stat().st_blocks * 512
        assert allocated <= sum(length for _, length in regions) + 64 * KiB, (name, allocated)


# --- qemu-io: patterns, discard, write-zeroes ----------------------------------------------


def test_qemu_io_patterns_across_object_boundaries(cluster, nbd):
    size = 24 * MiB
    with cluster.client(0) as client:
        client.vdi_create("patterns", size)
    writes = [
        (object_size - 1000, 3000, 0x11),                  # across boundary 1
        (2 * object_size - 77_777, object_size + 13, 0x22),  # across boundaries 2 and 3
        (123, 4567, 0x33),
        (4 * object_size - 1, 2, 0x44),                    # one byte each side of boundary 4
        (object_size + 5, 1_000_001, 0x55),                # over part of the 0x22 write
        (size - 511, 511, 0x66),                           # the last bytes of the VDI
        (3 * object_size - 4096 + 1, 8190, 0x77),          # odd length around boundary 3
    ]
    model = bytearray(size)
    for offset, length, pattern in writes:
        model[offset:offset + length] = bytes([pattern]) * length
    # Every other write with FUA; a flush at the end.
    qemu_io(nbd.uri("patterns"),
            *(f"write {'-f ' if n % 2 else ''}-P {pattern:#x} {offset} {length}"
              for n, (offset, length, pattern) in enumerate(writes)), "flush")

    # Every maximal run of one byte value, checked with read -P, in a new session.
    checks, start = [], 0
    for position in range(1, size + 1):
        if position == size or model[position] != model[start]:
            checks.append(f"read -P {model[start]:#x} {start} {position - start}")
            start = position
    assert len(checks) > len(writes)
    qemu_io(nbd.uri("patterns"), *checks)
    qemu_io(nbd.uri("patterns"), *checks, read_only=True)
    with cluster.client(2) as client:  # and the same bytes through the client library
        handle = client.vdi_open("patterns")["handle"]
        assert b"".join(client.vdi_read(handle, offset, object_size)
                        for offset in range(0, size, object_size)) == bytes(model)


def test_discard_and_write_zeroes_read_zeros_and_free_space(cluster, nbd):
    size = 24 * MiB
    with cluster.client(0) as client:
        client.vdi_create("zeros", size)
    qemu_io(nbd.uri("zeros"), f"write -P 0x5a 0 {size}")
    assert used(cluster, "zeros") == 6 * object_size
    closed(cluster, "zeros")
    objects_before = stored_objects(cluster)

    qemu_io(nbd.uri("zeros"),
            f"discard {object_size} {2 * object_size}",          # objects 1 and 2, whole
            "discard 100 1000",                                  # part of object 0
            f"write -z -u {4 * object_size} {object_size}",      # object 4, whole
            f"write -z -u {5 * object_size + 5} 70000")          # part of object 5
    qemu_io(nbd.uri("zeros"),
            f"read -P 0 {object_size} {2 * object_size}", "read -P 0 100 1000",
            f"read -P 0 {4 * object_size} {object_size}", f"read -P 0 {5 * object_size + 5} 70000",
            "read -P 0x5a 0 100", f"read -P 0x5a 1100 {object_size - 1100}",
            f"read -P 0x5a {3 * object_size} {object_size}",
            f"read -P 0x5a {5 * object_size} 5",
            f"read -P 0x5a {5 * object_size + 70005} {object_size - 70005}")
    # Whole objects are freed (both copies); inside the others, the whole 4 KiB blocks
    # a range covers are holes, and a block it covers in part stays data, zeroed.
    assert used(cluster, "zeros") == 3 * object_size
    closed(cluster, "zeros")
    assert stored_objects(cluster) == objects_before - 3 * 2
    assert nbdinfo_map(nbd.uri("zeros")) == [
        (0, object_size, "data"), (object_size, 2 * object_size, "hole,zero"),
        (3 * object_size, object_size, "data"), (4 * object_size, object_size, "hole,zero"),
        (5 * object_size, 4096, "data"), (5 * object_size + 4096, 16 * 4096, "hole,zero"),
        (5 * object_size + 17 * 4096, object_size - 17 * 4096, "data")]


# --- fio over multi-conn ----------------------------------------------------------------------


def fio(uri: str, *extra: str, aux_path: str) -> list[dict[str, Any]]:
    """Two jobs, each its own NBD connection, on the two halves of a 64 MiB VDI; fio's
    own files (verify state) in aux_path, not the current directory."""
    job = ["--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=64k", "--iodepth=16",
           "--size=32M", "--verify=crc32c", "--randrepeat=1", "--verify_state_save=0",
           f"--aux-path={aux_path}", *extra]
    result = run("fio", "--output-format=json", "--name=low", *job, "--offset=0",
                 "--name=high", *job, "--offset=32M", check=False)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "verify" not in result.stderr, result.stderr
    jobs: list[dict[str, Any]] = json.loads(result.stdout[result.stdout.index("{"):])["jobs"]
    assert [job["jobname"] for job in jobs] == ["low", "high"]
    assert all(job["error"] == 0 for job in jobs), [job["error"] for job in jobs]
    return jobs


def test_fio_randwrite_two_jobs_over_multi_conn_verifies(cluster, nbd, make_nbd, tmp_path):
    """Over a unix socket nbdkit names each client's process: a multi-conn writer's
    connections are one contender for the lock, and multi-conn is offered. Over TCP
    nbdkit 1.32 cannot tell whose a connection is: a writable export offers it only
    with lock=nbdkit (every client of that nbdkit one contender)."""
    with cluster.client(0) as client:
        client.vdi_create("fio", 64 * MiB)
    ports = [node.port for node in cluster.sheep]
    local = make_nbd(ports, unix=str(tmp_path / "nbd.sock"))
    assert nbdinfo_json(local.uri("fio"))["can_multi_conn"] is True
    assert nbdinfo_json(nbd.uri("fio"))["can_multi_conn"] is False
    assert nbdinfo_json(nbd.uri("fio"))["is_read_only"] is False
    shared = make_nbd(ports, params=("lock=nbdkit",))
    assert nbdinfo_json(shared.uri("fio"))["can_multi_conn"] is True
    # randwrite, then fio's own verify phase reading every block back (do_verify=1).
    jobs = fio(local.uri("fio"), "--do_verify=1", aux_path=str(tmp_path))
    assert [job["write"]["io_bytes"] for job in jobs] == [32 * MiB, 32 * MiB]
    assert [job["read"]["io_bytes"] for job in jobs] == [32 * MiB, 32 * MiB]
    # A separate verify pass on new connections: what was written stayed written.
    jobs = fio(shared.uri("fio"), "--verify_only=1", aux_path=str(tmp_path))
    assert [job["read"]["io_bytes"] for job in jobs] == [32 * MiB, 32 * MiB]
    assert used(cluster, "fio") == 64 * MiB


# --- snapshots ------------------------------------------------------------------------------------


def test_snapshot_export_is_read_only_and_keeps_its_data(cluster, nbd):
    with cluster.client(0) as client:
        client.vdi_create("snapped", 16 * MiB)
    qemu_io(nbd.uri("snapped"), f"write -P 0xaa 0 {8 * MiB}")
    with cluster.client(1) as client:
        client.vdi_snapshot("snapped", "before")

    exports = exports_of(nbd)
    assert exports["snapped"]["is_read_only"] is False
    assert exports["snapped@before"]["is_read_only"] is True
    info = nbdinfo_json(nbd.uri("snapped@before"))
    assert info["is_read_only"] is True and info["can_trim"] is False
    assert info["export-size"] == 16 * MiB

    refused = qemu_io(nbd.uri("snapped@before"), "write -P 0x01 0 512", check=False)
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr or "read-only" in refused.stderr.lower(), (
        refused.stderr)

    # A reader attached to the snapshot before the VDI changes sees the old data after.
    with NbdClient(nbd.port, "snapped@before") as reader:
        assert reader.read_only
        assert reader.read(4 * MiB - 10, 20) == b"\xaa" * 20
        qemu_io(nbd.uri("snapped"), f"write -P 0xbb {4 * MiB - 4096} 8192",
                f"write -P 0xcc {12 * MiB} 4096", f"discard 0 {object_size}")
        assert reader.read(4 * MiB - 10, 20) == b"\xaa" * 20
        assert reader.read(0, 4096) == b"\xaa" * 4096
        assert reader.read(12 * MiB, 4096) == bytes(4096)
    # A snapshot without a tag is exported as NAME@ID.
    with cluster.client(2) as client:
        untagged = client.vdi_snapshot("snapped")["snapshot"]["id"]
    assert f"snapped@{untagged}" in exports_of(nbd)
    qemu_io(nbd.uri(f"snapped@{untagged}"), f"read -P 0 0 {object_size}",
            f"read -P 0xbb {4 * MiB} 4096", read_only=True)
    qemu_io(nbd.uri("snapped@before"), f"read -P 0xaa 0 {8 * MiB}",
            f"read -P 0 {8 * MiB} {8 * MiB}", read_only=True)
    qemu_io(nbd.uri("snapped"), f"read -P 0 0 {object_size}",
            f"read -P 0xbb {4 * MiB} 4096", f"read -P 0xaa {4 * MiB + 4096} {4 * MiB - 4096}",
            f"read -P 0xcc {12 * MiB} 4096")


def test_a_second_attach_reads_but_cannot_write_until_the_first_detaches(cluster, nbd,
                                                                          make_nbd):
    with cluster.client(0) as client:
        client.vdi_create("locked", 8 * MiB)
    ports = [node.port for node in cluster.sheep]
    other = make_nbd(ports[::-1])  # another nbdkit, on another gateway sheep
    readonly = make_nbd(ports[1:], readonly=True)

    # Cache mode unsafe: qemu-io's flushes are dropped, so the holder keeps unflushed
    # writes and never hands the lock over (an idle, flushed one would).
    holder = subprocess.Popen(["qemu-io", "-t", "unsafe", "-f", "raw", nbd.uri("locked")],
                              stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write("write -P 0x42 0 4096\n")  # attached once this is answered
        holder.stdin.flush()
        assert "wrote 4096/4096" in holder.stdout.readline()

        # Attaching beside the writer works (QEMU's migration destination does it),
        # and so does reading; the first write is refused, naming the holder.
        qemu_io(other.uri("locked"), "read -P 0x42 0 4096")
        refused = qemu_io(other.uri("locked"), "write -P 0x43 0 512", check=False)
        output = refused.stdout + refused.stderr
        assert "Operation not permitted" in output and "wrote" not in output, output
        assert f"'locked' is in use by nbdkit pid {nbd.process.pid}" in other.log()
        # Read-only attachments are always allowed, and other VDIs are not locked.
        qemu_io(readonly.uri("locked"), "read -P 0x42 0 4096", read_only=True)
        with cluster.client(0) as client:
            client.vdi_create("unlocked", 4 * MiB)
        qemu_io(other.uri("unlocked"), "write 0 512")

        holder.stdin.write("quit\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    deadline = time.monotonic() + 10
    while True:
        result = qemu_io(other.uri("locked"), "read -P 0x42 0 4096", "write -P 0x43 0 512",
                         check=False)
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.1)
    assert "failed" not in result.stdout


def test_two_writers_through_one_nbdkit_never_both_write(cluster, nbd):
    """Each NBD client of one nbdkit is its own contender for the lock: a second
    writer beside an active one is refused, the holder and its client are named (the
    real nbdkit pid), and a forced unlock fences the holder with a clear error."""
    with cluster.client(0) as client:
        client.vdi_create("pair", 8 * MiB)
    holder = subprocess.Popen(["qemu-io", "-t", "unsafe", "-f", "raw", nbd.uri("pair")],
                              stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def holder_says(command: str) -> str:
        """The command's outcome line (qemu-io prints a line of figures after a write)."""
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(command + "\n")
        holder.stdin.flush()
        while True:
            line = holder.stdout.readline()
            if not line or "wrote " in line or "failed" in line:
                return line

    try:
        assert "wrote 4096/4096" in holder_says("write -P 0x11 0 4096")
        refused = qemu_io(nbd.uri("pair"), "write -P 0x22 0 512", check=False)
        output = refused.stdout + refused.stderr
        assert "Operation not permitted" in output and "wrote" not in output, output
        assert f"'pair' is in use by nbdkit pid {nbd.process.pid} on" in nbd.log()
        assert ", NBD client 127.0.0.1:" in nbd.log()
        qemu_io(nbd.uri("pair"), "read -P 0x11 0 4096", read_only=True)  # readers are fine

        with cluster.client(1) as client:
            lock = client.vdi_list(["pair"], usage=False)[0]["lock"]
            assert lock["owner"].startswith(f"nbdkit pid {nbd.process.pid} on ")
            client.vdi_unlock("pair")
        # Fenced: its write fails with EPERM, and nbdkit's log says why.
        assert "Operation not permitted" in holder_says("write -P 0x33 0 4096")
        assert "was taken from this client (a forced unlock)" in nbd.log()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    qemu_io(nbd.uri("pair"), "read -P 0x11 0 4096", "write -P 0x44 0 512",
            "read -P 0x44 0 512")


def test_live_snapshots_hold_a_prefix_of_the_acknowledged_writes(cluster, nbd):
    """A writer through NBD writes 4 KiB blocks in order, block i holding i, each
    acknowledged before the next is sent; snapshots are taken meanwhile through
    another sheep. Each snapshot must hold blocks 0..n-1 exactly and nothing else,
    with n past every block acknowledged before the snapshot was asked for, and n
    not past any block sent after it returned. The writer sees no error."""
    block, total = 4 * KiB, 2200  # blocks 0..2199: three objects
    snapshot_after = {"s1": 300, "s2": 1010, "s3": 1700}
    with cluster.client(0) as client:
        client.vdi_create("live", 16 * MiB)

    def content(i: int) -> bytes:  # never all zeros, block 0 included
        return struct.pack("<8sQ", b"sequence", i) * (block // 16)

    sent: list[float] = []
    acked: list[float] = []
    errors: list[BaseException] = []
    connection = NbdClient(nbd.port, "live")

    def writer() -> None:
        try:
            for i in range(total):
                sent.append(time.monotonic())
                connection.write(i * block, content(i))
                acked.append(time.monotonic())
        except BaseException as error:  # reported by the test
            errors.append(error)

    thread = threading.Thread(target=writer)
    thread.start()
    windows: dict[str, tuple[float, float]] = {}
    try:
        with cluster.client(1) as client:
            for tag, count in snapshot_after.items():
                wait_for_count(acked, count, thread, 60)
                called = time.monotonic()
                client.vdi_snapshot("live", tag)
                windows[tag] = (called, time.monotonic())
        thread.join(timeout=120)
    finally:
        connection.close()
        thread.join()
    assert not errors, errors
    assert len(acked) == total

    for tag, (called, returned) in windows.items():
        with NbdClient(nbd.port, f"live@{tag}") as reader:
            image = b"".join(reader.read(offset, MiB) for offset in range(0, 16 * MiB, MiB))
        present = []
        for i in range(len(image) // block):
            data = image[i * block:(i + 1) * block]
            assert data in (content(i), bytes(block)), (tag, i, data[:16])
            present.append(data == content(i) and i < total)
        count = present.index(False)
        assert not any(present[count:]), (tag, "not a prefix", count)
        must = max((i for i in range(total) if acked[i] < called), default=-1) + 1
        may = min((i for i in range(total) if sent[i] > returned), default=total)
        assert may < total, (tag, "taken after the last write: not a live snapshot")
        assert must <= count <= may, (tag, must, count, may)
    with cluster.client(2) as client:  # the VDI itself has every write
        handle = client.vdi_open("live")["handle"]
        image = b"".join(client.vdi_read(handle, offset, MiB) for offset in range(0, 16 * MiB, MiB))
    assert image[:total * block] == b"".join(content(i) for i in range(total))
    assert image[total * block:] == bytes(16 * MiB - total * block)


# --- a gateway sheep dies -------------------------------------------------------------------------


def test_sigkill_of_the_gateway_sheep_during_writes(make_cluster, make_nbd):
    """The sheep the plugin talks to (the first of sheep=...) is SIGKILLed while a
    client writes through NBD, copies=2: the client sees no error (the plugin fails
    over and retries what was in flight) and every byte verifies afterwards.

    The victim is chosen as the sheep that holds no copy of the VDI's tree root
    nor of the data objects written, so this tests the gateway failover alone; the
    test below kills a holder of the root, which needs the write path's recovery
    of a copy onto the new replica. The writes
    after the kill go, moreover, to objects not written before it (fresh objects),
    but the one in flight when the sheep dies.
    """
    cluster = make_cluster(3)
    cluster.format(copies=2, object_size=object_size)
    ports = [node.port for node in cluster.sheep]
    size = 128 * MiB
    with cluster.client(0) as client:
        client.vdi_create("failover", size)
        gen = client.vdi_list(["failover"], usage=False)[0]["generation"]

        def holders(oid: int) -> set[int]:
            return {int(replica["endpoint"].rpartition(":")[2])
                    for replica in client.stat(oid)["replicas"]}

        victim = next(port for port in ports if port not in holders(radix.node_oid(gen, 1, 0)))
        indices = [i for i in range(size // object_size)
                   if victim not in holders(radix.data_oid(gen, i))][:8]
    assert len(indices) >= 4, "the ring spreads objects over every sheep"
    server = make_nbd([victim] + [port for port in ports if port != victim])

    rng = random.Random(9)
    chunks = [(index * object_size + part * MiB, rng.randbytes(MiB))
              for index in indices for part in range(4)]
    acked: list[float] = []
    errors: list[BaseException] = []
    connection = NbdClient(server.port, "failover")

    def writer() -> None:
        try:
            for offset, data in chunks:
                connection.write(offset, data)
                acked.append(time.monotonic())
            connection.flush()
        except BaseException as error:  # reported by the test
            errors.append(error)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for_count(acked, len(chunks) // 2 - 1, thread, 60)
        killed_at = time.monotonic()
        cluster.kill(ports.index(victim))
        thread.join(timeout=120)
        assert not errors, errors
        assert len(acked) == len(chunks)
        assert len([t for t in acked if t > killed_at]) >= len(chunks) // 2
        for offset, data in chunks:  # on the same connection, through the new gateway
            assert connection.read(offset, MiB) == data, offset
        survivor = next(node.index for node in cluster.sheep if node.alive)
        with cluster.client(survivor) as client:  # the plugin holds the lock again
            lock = client.vdi_list(["failover"], usage=False)[0]["lock"]
        assert lock["owner"].startswith(
            f"nbdkit pid {server.process.pid} on {socket.gethostname()}, NBD client "), lock
        assert not lock["node_id"].startswith(f"127.0.0.1:{victim}/"), lock
    finally:
        connection.close()
        thread.join()

    expected = bytearray(size)
    for offset, data in chunks:
        expected[offset:offset + MiB] = data
    with NbdClient(server.port, "failover") as reader:  # a new connection
        image = b"".join(reader.read(offset, 8 * MiB) for offset in range(0, size, 8 * MiB))
    assert image == bytes(expected)
    survivor = next(node.index for node in cluster.sheep if node.alive)
    with cluster.client(survivor) as client:
        handle = client.vdi_open("failover")["handle"]
        for index in indices:
            offset = index * object_size
            assert client.vdi_read(handle, offset, object_size) == \
                expected[offset:offset + object_size]
    assert server.process.poll() is None


def test_sigkill_of_the_gateway_sheep_holding_the_tree_root(make_cluster, make_nbd):
    """As above, but the victim holds a copy of the VDI's tree root, as it does for
    about two VDIs in three: the next allocation rewrites the root, whose new replica
    never had a copy; the gateway copies it there first, and the write succeeds."""
    cluster = make_cluster(3)
    cluster.format(copies=2, object_size=object_size)
    ports = [node.port for node in cluster.sheep]
    with cluster.client(0) as client:
        client.vdi_create("rooted", 32 * MiB)
        gen = client.vdi_list(["rooted"], usage=False)[0]["generation"]
        root = client.stat(radix.node_oid(gen, 1, 0))["replicas"]
    victim = int(root[0]["endpoint"].rpartition(":")[2])
    server = make_nbd([victim] + [port for port in ports if port != victim])
    with NbdClient(server.port, "rooted") as connection:
        connection.write(0, b"before" * 1000)
        cluster.kill(ports.index(victim))
        connection.write(5 * object_size, b"after" * 1000)  # a fresh object
        assert connection.read(5 * object_size, 5000) == b"after" * 1000


# --- bad requests --------------------------------------------------------------------------------


def test_bad_requests_get_clean_nbd_errors_and_nbdkit_keeps_serving(cluster, nbd):
    size = 8 * MiB
    with cluster.client(0) as client:
        client.vdi_create("strict", size)
    qemu_io(nbd.uri("strict"), "write -P 0x61 0 8192")
    with cluster.client(0) as client:
        client.vdi_snapshot("strict", "frozen")

    # An unknown export, a snapshot tag that does not exist.
    for name in ("nobody", "strict@nosuchtag", "nobody@frozen"):
        result = run("nbdinfo", nbd.uri(name), check=False)
        assert result.returncode != 0
        assert "No such file or directory" in result.stderr, result.stderr
        with pytest.raises(NbdOptionError) as refused:
            NbdClient(nbd.port, name)
        assert refused.value.reply == REP_ERR_UNKNOWN
    assert "no VDI named 'nobody'" in nbd.log()

    # Reads and writes past the end: qemu refuses them itself; sent anyway, the
    # server answers each with an error and serves the next request.
    result = qemu_io(nbd.uri("strict"), f"read {size - 512} 1024", check=False)
    assert result.returncode != 0 and "read failed" in result.stdout, result
    with NbdClient(nbd.port, "strict") as connection:
        assert connection.size == size and not connection.read_only
        with pytest.raises(NbdError) as failed:
            connection.read(size - 512, 1024)
        assert failed.value.code == errno.EINVAL
        with pytest.raises(NbdError) as failed:
            connection.read(1 << 62, 512)
        assert failed.value.code == errno.EINVAL
        with pytest.raises(NbdError) as failed:
            connection.write(size - 1, b"xy")
        assert failed.value.code in (errno.ENOSPC, errno.EINVAL)
        assert connection.read(0, 8192) == b"\x61" * 8192
        connection.write(size - 2, b"ok")
        assert connection.read(size - 2, 2) == b"ok"

    # Writes, trims and zeroes to a snapshot.
    with NbdClient(nbd.port, "strict@frozen") as connection:
        assert connection.read_only
        for command in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            with pytest.raises(NbdError) as failed:
                data = b"z" * 512 if command == CMD_WRITE else b""
                connection.request(command, 0, 512, data)
            assert failed.value.code == errno.EPERM, command
        assert connection.read(0, 8192) == b"\x61" * 8192
    assert qemu_io(nbd.uri("strict@frozen"), "write 0 512", check=False).returncode != 0

    assert nbd.process.poll() is None
    qemu_io(nbd.uri("strict@frozen"), "read -P 0x61 0 8192", read_only=True)
    qemu_io(nbd.uri("strict"), "read -P 0x61 0 8192", f"read -P 0 8192 {size - 8194}")


def test_write_zeroes_without_trim_allocates_zeros(cluster, nbd):
    """NBD's NO_HOLE (qemu-io write -z without -u): zeros are written, space stays used."""
    with cluster.client(0) as client:
        client.vdi_create("nohole", 8 * MiB)
    qemu_io(nbd.uri("nohole"), f"write -P 0x33 0 {2 * object_size}")
    qemu_io(nbd.uri("nohole"), f"write -z {object_size} {object_size}")
    qemu_io(nbd.uri("nohole"), f"read -P 0 {object_size} {object_size}",
            f"read -P 0x33 0 {object_size}")
    assert used(cluster, "nohole") == 2 * object_size
    assert nbdinfo_map(nbd.uri("nohole"))[0] == (0, 2 * object_size, "data")


def test_a_writer_fenced_while_idle_stays_fenced_when_its_plugin_fails_over(make_cluster,
                                                                             make_nbd):
    """A writes and flushes through gateway sheep 0 and stays attached; B writes through
    another nbdkit on sheep 1 and takes the lock by handoff (A is fenced, though it
    has not written since). Sheep 0 is SIGKILLed: A's plugin fails over and opens its
    export again on another sheep. A's next write must be refused, and B's data stay:
    the reopened export continues A's contender (VDI_OPEN "resume"), which takes the
    lock only if A's own lock is gone, never by a handoff (found by an attack on #16:
    as a fresh contender it took the lock back from the idle B and overwrote it)."""
    cluster = make_cluster(3)
    cluster.format(copies=2, object_size=object_size)
    ports = [node.port for node in cluster.sheep]
    with cluster.client(1) as client:
        client.vdi_create("fenced", 16 * MiB)
    first = make_nbd(ports, unix=str(cluster.base) + "/a.sock", params=("retry=20",))
    second = make_nbd(ports[1:], unix=str(cluster.base) + "/b.sock")
    a = subprocess.Popen(["qemu-io", "-f", "raw", first.uri("fenced")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert a.stdin is not None and a.stdout is not None
        a.stdin.write("write -P 0x41 0 64k\nflush\n")
        a.stdin.flush()
        assert "wrote 65536/65536" in a.stdout.readline()
        time.sleep(1.0)  # idle and flushed: it hands over
        qemu_io(second.uri("fenced"), "write -P 0x42 0 64k", "flush")
        closed(cluster, "fenced", index=1)  # B is gone too: the lock is free, yet not A's
        cluster.kill(0)
        a.stdin.write("write -P 0x43 0 64k\nquit\n")
        a.stdin.flush()
        output = a.communicate(timeout=120)[0]
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert "Operation not permitted" in output and "wrote 65536/65536" not in output, output
    assert "another writer locked VDI 'fenced' while this client failed over" in first.log()
    qemu_io(second.uri("fenced"), "read -P 0x42 0 64k")  # B's write stands
