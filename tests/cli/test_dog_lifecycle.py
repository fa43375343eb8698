"""The life of a VDI, against one real 3-sheep cluster (copies 2): backups with dog vdi
export-diff / import-diff in Ceph's rbd diff v1 format, checked against Ceph's own
rbd (merge-diff needs no cluster); thin data at 4 KiB (import, block status, clone
copy-up); du; the trash; alter-copy."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dog import rbd_diff
from sheep.client import SyncClient
from sheep.errors import EXIT_EXISTS, EXIT_FAILURE, EXIT_MISSING, EXIT_USAGE
from sheep.oid import VDI_TYPES, ObjectType, oid_generation, oid_type
from sheep.testing.cluster import LocalCluster

KiB = 1 << 10
MiB = 1 << 20
size = 32 * MiB


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(str(tmp_path_factory.mktemp("dog-backup")), nodes=3) as local:
        local.start()
        local.format(copies=2)
        yield local


@pytest.fixture(scope="module")
def api(cluster: LocalCluster) -> Iterator[SyncClient]:
    with cluster.client(0) as client:
        yield client


def dog(cluster: LocalCluster, *args: str, stdin: bytes | None = None,
        check: int | None = 0) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "dog", "-p", str(cluster.sheep[0].port), *args]
    result = subprocess.run(command, input=stdin, capture_output=True, timeout=120)
    if check is not None:
        assert result.returncode == check, (args, result.returncode, result.stderr)
    return result


def read_all(cluster: LocalCluster, name: str) -> bytes:
    """NAME or NAME@TAG, whole (through the library: a dog per read costs a second)."""
    base, _, tag = name.partition("@")
    with cluster.client(0) as client:
        opened = client.vdi_open(base, snapshot=tag or None)
        try:
            return b"".join(client.vdi_read(opened["handle"], offset, min(4 * MiB,
                                            opened["size"] - offset))
                            for offset in range(0, opened["size"], 4 * MiB))
        finally:
            client.vdi_close(opened["handle"])


def change(api: SyncClient, name: str, writes: list[tuple[int, bytes]],
           discards: list[tuple[int, int]] | None = None) -> int:
    """Writes and discards through one open; the bytes they change."""
    handle = api.vdi_open(name, writable=True)["handle"]
    for offset, data in writes:
        api.vdi_write(handle, offset, data)
    for offset, count in discards or []:
        api.vdi_discard(handle, offset, count)
    api.flush()
    api.vdi_close(handle)
    return sum(len(d) for _, d in writes) + sum(c for _, c in discards or [])


def history(api: SyncClient, cluster: LocalCluster, name: str, rng: random.Random) -> list[int]:
    """NAME with data, then s1; every kind of change, s2; more, s3. The bytes changed
    between each pair of snapshots."""
    dog(cluster, "vdi", "create", name, str(size))
    change(api, name, [(0, rng.randbytes(6 * MiB)), (20 * MiB, rng.randbytes(3 * MiB))])
    dog(cluster, "vdi", "snapshot", "-s", "s1", name)
    changed = [change(api, name, [
        (0, rng.randbytes(MiB)),  # aligned
        (24 * MiB + 123, rng.randbytes(4097)),  # unaligned
        (12 * MiB - 5000, rng.randbytes(10000)),  # across objects
        (21 * MiB, bytes(64 * KiB)),  # zeroes written
    ], discards=[(4 * MiB, 4 * MiB), (20 * MiB + 8192, 8192)])]  # a whole object, a part
    dog(cluster, "vdi", "snapshot", "-s", "s2", name)
    changed.append(change(api, name, [(28 * MiB, rng.randbytes(MiB)), (123, b"x")]))
    dog(cluster, "vdi", "snapshot", "-s", "s3", name)
    return changed


def restore_base(cluster: LocalCluster, tmp_path: Path, source: str, target: str) -> None:
    """TARGET holding SOURCE@s1 from a full raw export, with its own snapshot s1."""
    raw = tmp_path / f"{target}.raw"
    dog(cluster, "vdi", "export", f"{source}@s1", str(raw))
    dog(cluster, "vdi", "create", target, str(size))
    dog(cluster, "vdi", "import", target, str(raw))
    dog(cluster, "vdi", "snapshot", "-s", "s1", target)


def test_an_incremental_diff_rebuilds_the_snapshot(cluster, api, tmp_path):
    changed = history(api, cluster, "inc", random.Random(1))
    d12 = tmp_path / "d12"
    result = dog(cluster, "vdi", "export-diff", "--from-snap", "s1", "inc@s2", str(d12))
    assert b"exported the diff of inc@s2 since s1" in result.stderr
    assert not (tmp_path / "d12.partial").exists()
    assert d12.read_bytes().startswith(b"rbd diff v1\nf\x02\x00\x00\x00s1t\x02\x00\x00\x00s2s")
    assert d12.stat().st_size <= changed[0] * 1.1 + 64 * KiB, (d12.stat().st_size, changed)
    restore_base(cluster, tmp_path, "inc", "inc-copy")
    dog(cluster, "vdi", "import-diff", str(d12), "inc-copy")
    assert read_all(cluster, "inc-copy") == read_all(cluster, "inc@s2")
    assert read_all(cluster, "inc-copy@s2") == read_all(cluster, "inc@s2")  # the to-snapshot
    # Records: data only where data changed, zeros for the discards and zeroes.
    with open(d12, "rb") as source:
        reader = rbd_diff.Reader(source)
        assert reader.header() == rbd_diff.Header("s1", "s2", size)
        records = [(r.kind, r.offset, r.length) for r in reader.records()]
    assert ("z", 4 * MiB, 2 * MiB) in records  # the object discarded, where s1 had data
    assert sum(length for kind, _, length in records if kind == "w") <= MiB + 3 * 4096 + 16 * KiB


def test_a_diff_on_the_wrong_base_is_refused_and_changes_nothing(cluster, api, tmp_path):
    history(api, cluster, "wrong", random.Random(2))
    d12, d23 = tmp_path / "d12", tmp_path / "d23"
    dog(cluster, "vdi", "export-diff", "--from-snap", "s1", "wrong@s2", str(d12))
    dog(cluster, "vdi", "export-diff", "--from-snap", "s2", "wrong@s3", str(d23))
    # No snapshot s1 at all.
    dog(cluster, "vdi", "create", "bare", str(size))
    change(api, "bare", [(0, b"keep me")])
    result = dog(cluster, "vdi", "import-diff", str(d12), "bare", check=EXIT_MISSING)
    assert b"has no snapshot 's1', which the diff starts from" in result.stderr
    assert read_all(cluster, "bare")[:7] == b"keep me"
    assert b"s2" not in dog(cluster, "vdi", "list", "bare").stdout
    # s1, but written since: the result would not be s2.
    restore_base(cluster, tmp_path, "wrong", "written")
    change(api, "written", [(5, b"later")])
    before = read_all(cluster, "written")
    result = dog(cluster, "vdi", "import-diff", str(d12), "written", check=EXIT_USAGE)
    assert b"was written since snapshot 's1'" in result.stderr
    assert read_all(cluster, "written") == before
    # Out of order: the chain's next diff needs s2.
    restore_base(cluster, tmp_path, "wrong", "order")
    result = dog(cluster, "vdi", "import-diff", str(d23), "order", check=EXIT_MISSING)
    assert b"no snapshot 's2'" in result.stderr
    assert read_all(cluster, "order") == read_all(cluster, "wrong@s1")
    # Applied twice: its to-snapshot exists already.
    dog(cluster, "vdi", "import-diff", str(d12), "order")
    dog(cluster, "vdi", "rollback", "-s", "s1", "order")
    result = dog(cluster, "vdi", "import-diff", "--force", str(d12), "order", check=EXIT_EXISTS)
    assert b"already has snapshot 's2'" in result.stderr


def test_a_broken_diff_changes_nothing(cluster, api, tmp_path):
    history(api, cluster, "broken", random.Random(3))
    d12 = tmp_path / "d12"
    dog(cluster, "vdi", "export-diff", "--from-snap", "s1", "broken@s2", str(d12))
    restore_base(cluster, tmp_path, "broken", "target")
    base = read_all(cluster, "target")
    data = d12.read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(data[:len(data) // 2])
    # A file is read through before anything is written.
    result = dog(cluster, "vdi", "import-diff", str(cut), "target", check=EXIT_USAGE)
    assert b"is cut short" in result.stderr
    assert read_all(cluster, "target") == base
    # A stream is applied as it comes, then rolled back to s1 when it breaks.
    result = dog(cluster, "vdi", "import-diff", "-", "target", stdin=data[:len(data) // 2],
                 check=EXIT_USAGE)
    assert b"rolled back to snapshot 's1'" in result.stderr
    assert read_all(cluster, "target") == base
    assert b"s2" not in dog(cluster, "vdi", "list", "target").stdout
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"rbd image v2\n" + bytes(100))
    result = dog(cluster, "vdi", "import-diff", str(garbage), "target", check=EXIT_USAGE)
    assert b"is not an rbd diff v1 stream" in result.stderr


def test_a_chain_of_diffs_and_ceph_merge_diff(cluster, api, tmp_path):
    history(api, cluster, "chain", random.Random(4))
    full, d12, d23 = tmp_path / "full", tmp_path / "d12", tmp_path / "d23"
    dog(cluster, "vdi", "backup", "-s", "s1", "chain", str(full))  # Sheepdog's name
    dog(cluster, "vdi", "export-diff", "--from-snap", "s1", "chain@s2", str(d12))
    d23.write_bytes(dog(cluster, "vdi", "export-diff", "--from-snap", "s2", "chain@s3",
                        "-").stdout)
    # Restored in order from the full backup: equals s3, with every snapshot.
    dog(cluster, "vdi", "restore", "chain-r", str(full))  # creates it
    dog(cluster, "vdi", "restore", "chain-r", str(d12))
    dog(cluster, "vdi", "import-diff", "-", "chain-r", stdin=d23.read_bytes())
    assert read_all(cluster, "chain-r") == read_all(cluster, "chain@s3")
    for tag in ("s1", "s2", "s3"):
        assert read_all(cluster, f"chain-r@{tag}") == read_all(cluster, f"chain@{tag}")
    # Ceph's rbd reads ours and merges two of them; we apply what it wrote.
    rbd = shutil.which("rbd")
    assert rbd, "Ceph's rbd (Debian's ceph-common) is needed: scripts/test installs it"
    d13 = tmp_path / "d13"
    merged = subprocess.run([rbd, "merge-diff", str(d12), str(d23), str(d13), "--no-progress"],
                            capture_output=True, timeout=60)
    assert merged.returncode == 0, merged.stderr
    restore_base(cluster, tmp_path, "chain", "chain-m")
    dog(cluster, "vdi", "import-diff", str(d13), "chain-m")
    assert read_all(cluster, "chain-m") == read_all(cluster, "chain@s3")


def test_thin_import_block_status_and_copy_up(cluster, api, tmp_path):
    image = tmp_path / "thin.raw"
    rng = random.Random(5)
    with open(image, "wb") as f:
        f.truncate(32 * 4 * MiB)
        for k in range(32):
            f.seek(k * 4 * MiB + 4096 * (k % 7))
            f.write(rng.randbytes(64 * KiB))
    before = store_bytes(cluster)
    dog(cluster, "vdi", "import", "--create", "thin", str(image))
    grown = store_bytes(cluster) - before
    written = 32 * 64 * KiB * 2  # on each of 2 copies
    assert grown <= 2 * written, f"{grown} bytes allocated for {written} written"
    assert read_all(cluster, "thin") == image.read_bytes()
    # Block status reports the holes inside objects.
    handle = api.vdi_open("thin")["handle"]
    allocated = [(o, n) for o, n, a in api.vdi_extents(handle, 0, 8 * MiB) if a]
    api.vdi_close(handle)
    assert allocated == [(0, 64 * KiB), (4 * MiB + 4096, 64 * KiB)]
    # A clone's first write copies only the allocated blocks of the object.
    dog(cluster, "vdi", "snapshot", "-s", "base", "thin")
    dog(cluster, "vdi", "clone", "thin@base", "thin-clone")
    before = store_bytes(cluster)
    change(api, "thin-clone", [(4 * MiB + 2 * MiB, b"y" * 100)])
    grown = store_bytes(cluster) - before
    assert grown <= 2 * (64 * KiB + 4096) + 2 * 64 * KiB, grown  # the copy, its tree nodes
    expect = bytearray(image.read_bytes()[4 * MiB:8 * MiB])
    expect[2 * MiB:2 * MiB + 100] = b"y" * 100
    assert dog(cluster, "vdi", "read", "thin-clone", str(4 * MiB), str(4 * MiB)).stdout == expect


def write_diff(path: Path, header: rbd_diff.Header,
               records: list[tuple[int, bytes | int]]) -> None:
    """A hand-built rbd diff v1: (offset, data) data records, (offset, length) zeros."""
    with open(path, "wb") as out:
        writer = rbd_diff.Writer(out)
        writer.header(header)
        for offset, item in records:
            if isinstance(item, int):
                writer.zeros(offset, item)
            else:
                writer.data(offset, item)
        writer.end()


def allocated(api: SyncClient, name: str) -> list[tuple[int, int]]:
    handle = api.vdi_open(name)["handle"]
    try:
        return [(o, n) for o, n, a in api.vdi_extents(handle, 0, size) if a]
    finally:
        api.vdi_close(handle)


def test_zero_blocks_in_data_records_stay_holes(cluster, api, tmp_path):
    """Ceph's diffs may carry zeros as data: a 4 MiB data record with 4 KiB of data
    allocates 4 KiB, into a VDI that exists (import-diff) or one it makes (restore)."""
    block = random.Random(9).randbytes(4096)
    record = bytearray(4 * MiB)
    record[MiB + 4096:MiB + 8192] = block
    diff = tmp_path / "zeros-as-data.diff"
    write_diff(diff, rbd_diff.Header(None, None, size), [(8 * MiB, bytes(record))])
    expect = bytearray(size)
    expect[8 * MiB:12 * MiB] = record
    dog(cluster, "vdi", "create", "sparse-diff", str(size))
    before = store_bytes(cluster)
    dog(cluster, "vdi", "import-diff", str(diff), "sparse-diff")
    data = data_bytes(cluster, api, "sparse-diff")
    assert data <= 2 * (2 * 4096), f"{data} bytes of data objects for 4 KiB on 2 copies"
    assert store_bytes(cluster) - before <= data + 2 * 64 * KiB  # and its tree, change pages
    assert allocated(api, "sparse-diff") == [(9 * MiB + 4096, 4096)]
    assert read_all(cluster, "sparse-diff") == expect
    dog(cluster, "vdi", "restore", "sparse-restored", str(diff))  # creates it
    assert data_bytes(cluster, api, "sparse-restored") <= 2 * (2 * 4096)
    assert allocated(api, "sparse-restored") == [(9 * MiB + 4096, 4096)]
    assert read_all(cluster, "sparse-restored") == expect


def test_zero_blocks_in_data_records_clear_old_data(cluster, api, tmp_path):
    """In an incremental diff, a data record's zero blocks over data the target
    holds make it read zeros (as a zero record does): they cannot just be skipped."""
    rng = random.Random(10)
    old = rng.randbytes(8 * MiB)
    dog(cluster, "vdi", "create", "overwritten", str(size))
    change(api, "overwritten", [(0, old)])
    dog(cluster, "vdi", "snapshot", "-s", "s1", "overwritten")
    first = bytearray(4 * MiB)  # object 0: 4 KiB of data among zeros
    first[8192:12288] = rng.randbytes(4096)
    unaligned = bytes(2 * 4096) + rng.randbytes(100) + bytes(4096)  # off the 4 KiB grid
    fresh = bytes(4096) + rng.randbytes(4096) + bytes(MiB)  # where the target has no data
    records: list[tuple[int, bytes | int]] = [
        (0, bytes(first)), (5 * MiB + 512, unaligned), (6 * MiB, 8192), (16 * MiB, fresh)]
    diff = tmp_path / "incremental.diff"
    write_diff(diff, rbd_diff.Header("s1", "s2", size), records)
    expect = bytearray(old + bytes(size - len(old)))
    for offset, item in records:
        data = bytes(item) if isinstance(item, int) else item
        expect[offset:offset + len(data)] = data
    dog(cluster, "vdi", "import-diff", str(diff), "overwritten")
    assert read_all(cluster, "overwritten") == expect
    assert read_all(cluster, "overwritten@s2") == expect
    assert read_all(cluster, "overwritten@s1") == old + bytes(size - len(old))
    # Where the target read zeros already, the zero blocks were left alone.
    assert [(o, n) for o, n in allocated(api, "overwritten") if o >= 8 * MiB] == \
        [(16 * MiB + 4096, 4096)]


def data_bytes(cluster: LocalCluster, api: SyncClient, name: str) -> int:
    """The space NAME's data objects take on the stores, every copy counted."""
    oids = {oid for oid in vdi_oids(cluster, generations(api, name))
            if oid_type(oid) == ObjectType.DATA}
    return sum(os.stat(cluster.object_path(node.index, oid)).st_blocks * 512
               for oid in oids for node in cluster.sheep
               if os.path.exists(cluster.object_path(node.index, oid)))


def store_bytes(cluster: LocalCluster) -> int:
    total = 0
    for node in cluster.sheep:
        for root, _, files in os.walk(os.path.join(node.directory, "obj")):
            for name in files:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def settle(check, timeout_s: float = 60.0, what: str = ""):
    """Wait until check() is truthy; its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"not reached in {timeout_s} s: {what}"
            return value
        time.sleep(0.25)


def test_du_says_what_deleting_a_snapshot_frees(cluster, api):
    rng = random.Random(6)
    dog(cluster, "vdi", "create", "space", str(size))
    change(api, "space", [(0, rng.randbytes(6 * MiB)), (20 * MiB + 4096, rng.randbytes(8192))])
    dog(cluster, "vdi", "snapshot", "-s", "old", "space")
    change(api, "space", [(100, rng.randbytes(5000)), (5 * MiB, rng.randbytes(MiB))])
    dog(cluster, "vdi", "snapshot", "-s", "new", "space")
    items = json.loads(dog(cluster, "vdi", "du", "space", "--json").stdout)
    assert [item["name"] for item in items] == ["space"]
    images = {image["tag"]: image for image in items[0]["images"]}
    old, head = images["old"], images[""]
    assert old["provisioned"] == size
    assert old["used"] == 6 * MiB + 8192  # every allocated 4 KiB block it reaches
    # Alone: its copies of objects 0 and 1, which the writes after it replaced.
    assert old["exclusive"] == 4 * MiB + 2 * MiB
    assert old["exclusive_stored"] == 2 * old["exclusive"]
    assert head["exclusive"] == 0  # it has written nothing since "new"
    table = dog(cluster, "vdi", "du", "space").stdout.decode()
    assert "space@old" in table and "<TOTAL>" in table
    before = store_bytes(cluster)
    dog(cluster, "vdi", "delete", "-s", "old", "space")
    freed = old["exclusive_stored"] + old["exclusive_metadata_stored"]
    settle(lambda: before - store_bytes(cluster) == freed,
           what=f"deleting freed {before - store_bytes(cluster)}, du said {freed}")


def vdi_oids(cluster: LocalCluster, generations: set[int]) -> set[int]:
    return {oid for oid in cluster.all_oids()
            if oid_type(oid) in VDI_TYPES and oid_generation(oid) in generations}


def generations(api: SyncClient, name: str) -> set[int]:
    return {item["generation"] for item in api.vdi_list([name], usage=False)}


def test_the_trash(cluster, api):
    data = random.Random(7).randbytes(3 * MiB)
    dog(cluster, "vdi", "create", "binned", str(size))
    change(api, "binned", [(MiB, data)])
    dog(cluster, "vdi", "snapshot", "-s", "snap", "binned")
    gens = generations(api, "binned")
    dog(cluster, "vdi", "trash", "mv", "binned")
    assert "binned" not in dog(cluster, "vdi", "list").stdout.decode()
    listed = json.loads(dog(cluster, "vdi", "trash", "list", "--json").stdout)
    assert [(i["name"], i["size"], i["expires"]) for i in listed] == [("binned", size, None)]
    result = dog(cluster, "vdi", "read", "binned", "0", "1", check=EXIT_MISSING)
    assert b"is in the trash" in result.stderr
    result = dog(cluster, "vdi", "create", "binned", "1M", check=EXIT_EXISTS)
    assert b"is in the trash: restore or purge it" in result.stderr
    dog(cluster, "vdi", "trash", "restore", "binned")
    assert dog(cluster, "vdi", "read", "binned", str(MiB), str(len(data))).stdout == data
    assert dog(cluster, "vdi", "read", "binned@snap", str(MiB), str(len(data))).stdout == data
    # Purged: every object of its generations is gone from every store.
    assert vdi_oids(cluster, gens)
    dog(cluster, "vdi", "trash", "mv", "binned")
    dog(cluster, "vdi", "trash", "purge", "binned")
    assert not vdi_oids(cluster, gens)
    assert json.loads(dog(cluster, "vdi", "trash", "list", "--json").stdout) == []
    dog(cluster, "vdi", "create", "binned", "1M")  # the name is free again


def test_expired_vdis_are_purged_in_the_background(cluster, api):
    dog(cluster, "vdi", "create", "brief", "8M")
    change(api, "brief", [(0, b"x" * 4096)])
    gens = generations(api, "brief")
    dog(cluster, "vdi", "create", "kept", "8M")
    dog(cluster, "vdi", "trash", "mv", "--expires-in", "1s", "brief")
    dog(cluster, "vdi", "trash", "mv", "--expires-in", "1d", "kept")
    settle(lambda: [i["name"] for i in json.loads(
        dog(cluster, "vdi", "trash", "list", "--json").stdout)] == ["kept"], 30,
        "the expired VDI purged")
    settle(lambda: not vdi_oids(cluster, gens), 30, "its objects freed")
    dog(cluster, "vdi", "trash", "purge", check=0)  # nothing expired: kept stays
    assert b"kept" in dog(cluster, "vdi", "trash", "list").stdout
    # --expired with a NAME: purged only if its time ran out.
    result = dog(cluster, "vdi", "trash", "purge", "--expired", "kept", check=EXIT_FAILURE)
    assert b"VDI 'kept' has not expired: it expires at " in result.stderr
    assert b"kept" in dog(cluster, "vdi", "trash", "list").stdout
    dog(cluster, "vdi", "create", "forever", "8M")
    dog(cluster, "vdi", "trash", "mv", "forever")
    result = dog(cluster, "vdi", "trash", "purge", "--expired", "forever", check=EXIT_FAILURE)
    assert b"VDI 'forever' has not expired: it never expires" in result.stderr
    result = dog(cluster, "vdi", "trash", "purge", "--expired", "nowhere", check=EXIT_MISSING)
    assert b"VDI 'nowhere' is not in the trash" in result.stderr
    dog(cluster, "vdi", "create", "soon", "8M")
    dog(cluster, "vdi", "trash", "mv", "--expires-in", "1s", "soon")
    time.sleep(1.1)  # purged here, or by the background purge first: gone either way
    result = dog(cluster, "vdi", "trash", "purge", "--expired", "soon", check=None)
    assert (result.returncode, result.stdout) == (0, b"purged 1 VDI(s) from the trash: soon\n") \
        or (result.returncode, b"is not in the trash" in result.stderr) == (EXIT_MISSING, True)
    assert b"soon" not in dog(cluster, "vdi", "trash", "list").stdout
    dog(cluster, "vdi", "trash", "purge", "forever")  # without --expired: at once
    assert b"forever" not in dog(cluster, "vdi", "trash", "list").stdout
    dog(cluster, "vdi", "trash", "purge", "--all")
    assert b"kept" not in dog(cluster, "vdi", "trash", "list").stdout


def copies_of(cluster: LocalCluster, oids: set[int]) -> set[int]:
    return {len(cluster.object_files(oid)) for oid in oids}


def recovery_totals(cluster: LocalCluster) -> dict[str, int]:
    """Over every node, what recovery ever did: bytes copied, surplus copies removed.
    The per-pass figures (to_recover, recovered) start again at each epoch."""
    items = json.loads(dog(cluster, "node", "recovery", "--json").stdout)
    return {key: sum(item[key] for item in items) for key in ("bytes_total", "removed")}


def test_alter_copy_up_and_down(cluster, api):
    rng = random.Random(8)
    data = rng.randbytes(9 * MiB)
    dog(cluster, "vdi", "create", "copies", str(size))
    change(api, "copies", [(0, data)])
    oids = vdi_oids(cluster, generations(api, "copies"))  # its change pages too
    assert copies_of(cluster, oids) == {2}
    result = dog(cluster, "vdi", "alter-copy", "copies", "-c", "4", check=EXIT_FAILURE)
    assert b"cannot keep 4 copies on 3 hosts" in result.stderr
    before = recovery_totals(cluster)
    dog(cluster, "vdi", "alter-copy", "copies", "--copies", "3")
    settle(lambda: copies_of(cluster, oids) == {3}, what="3 copies of every object")
    # dog node recovery shows the work: a third copy of each object was copied.
    after = recovery_totals(cluster)
    assert after["bytes_total"] - before["bytes_total"] >= len(data), (before, after)
    assert dog(cluster, "vdi", "read", "copies", "0", str(len(data))).stdout == data
    dog(cluster, "vdi", "alter-copy", "copies", "-c", "2")
    settle(lambda: copies_of(cluster, oids) == {2}, what="2 copies of every object again")
    # ... and a surplus copy of each removed (the nodes' count of those lasts).
    settle(lambda: recovery_totals(cluster)["removed"] - after["removed"] >= len(oids),
           what="the surplus copies counted by dog node recovery")
    assert dog(cluster, "vdi", "read", "copies", "0", str(len(data))).stdout == data
    dog(cluster, "cluster", "check")
    # The cluster's default: VDIs without copies of their own follow it.
    dog(cluster, "vdi", "create", "follows", "8M")
    change(api, "follows", [(0, b"f" * 4096)])
    follows = vdi_oids(cluster, generations(api, "follows"))
    result = dog(cluster, "cluster", "alter-copy", "-c", "4", check=EXIT_FAILURE)
    assert b"cannot keep 4 copies on 3 hosts" in result.stderr
    assert json.loads(dog(cluster, "vdi", "info", "follows", "--json").stdout)[
        "cluster_copies"] == 2  # unchanged
    dog(cluster, "cluster", "alter-copy", "-c", "3")
    try:
        settle(lambda: copies_of(cluster, follows) == {3}, what="the default followed")
        assert copies_of(cluster, oids) == {2}  # its own number stays
    finally:
        dog(cluster, "cluster", "alter-copy", "-c", "2")


def test_diffs_with_big_zero_records_odd_names_and_force(cluster, api, tmp_path):
    """A zero record past 4 GiB (Ceph's merge-diff writes a resize's growth as one) is
    applied in steps; a to-snapshot name this cluster cannot take is refused before
    anything is written; an untagged snapshot cannot end a diff; with --force a broken
    diff is not rolled back (there is no state to return to) and the error says so."""
    GiB = 1 << 30
    dog(cluster, "vdi", "create", "big", str(8 * GiB))
    change(api, "big", [(5 * GiB + 100, b"tail"), (0, b"head")])
    dog(cluster, "vdi", "snapshot", "-s", "s1", "big")
    diff = tmp_path / "big.diff"
    with open(diff, "wb") as out:
        writer = rbd_diff.Writer(out)
        writer.header(rbd_diff.Header("s1", "s2", 8 * GiB))
        writer.zeros(0, 6 * GiB)  # one record: more than a request's 32-bit count
        writer.data(7 * GiB, b"new data")
        writer.end()
    dog(cluster, "vdi", "import-diff", str(diff), "big")
    assert dog(cluster, "vdi", "read", "big", str(5 * GiB + 100), "4").stdout == bytes(4)
    assert dog(cluster, "vdi", "read", "big@s2", str(7 * GiB), "8").stdout == b"new data"

    for bad in ("12", "a b"):
        odd = tmp_path / "odd.diff"
        with open(odd, "wb") as out:
            writer = rbd_diff.Writer(out)
            writer.header(rbd_diff.Header("s2", bad, 8 * GiB))
            writer.data(0, b"never")
            writer.end()
        result = dog(cluster, "vdi", "import-diff", str(odd), "big", check=EXIT_USAGE)
        assert b"cannot be taken here" in result.stderr
        assert dog(cluster, "vdi", "read", "big", "0", "5").stdout == bytes(5)  # not "never"
    dog(cluster, "vdi", "snapshot", "big")  # untagged
    untagged = max(i["id"] for i in api.vdi_list(["big"], usage=False) if i["snapshot"])
    result = dog(cluster, "vdi", "export-diff", "--from-snap", "s2", f"big@{untagged}",
                 str(tmp_path / "x"), check=EXIT_USAGE)
    assert b"has no tag" in result.stderr and not (tmp_path / "x").exists()

    # --force past a write since s2: a stream that breaks leaves what it applied.
    change(api, "big", [(4096, b"since")])
    with open(diff, "rb") as source:
        data = source.read()
    stream = data.replace(b"t\x02\x00\x00\x00s2", b"t\x02\x00\x00\x00s9").replace(
        b"f\x02\x00\x00\x00s1", b"f\x02\x00\x00\x00s2")
    result = dog(cluster, "vdi", "import-diff", "--force", "-", "big",
                 stdin=stream[:-3], check=EXIT_USAGE)
    assert b"holds part of the diff" in result.stderr
    assert dog(cluster, "vdi", "read", "big", "4096", "5").stdout == b"since"
