"""dog vdi's output and exit codes, against one real 3-sheep cluster.

The cluster is shared by the whole module (starting one costs more than most
tests here), so every test works on VDIs whose names start with its own
prefix, and checks of cluster-wide numbers (objects per node) compare before
and after inside one test. dog runs as a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dog.main import dog as dog_command
from sheep import auth
from sheep.client import SyncClient
from sheep.errors import (
    EXIT_EXISTS,
    EXIT_FAILURE,
    EXIT_MISSING,
    EXIT_SYSTEM,
    EXIT_USAGE,
    InvalidParameters,
    NoVdi,
    PermissionDenied,
    VdiLocked,
)
from sheep.oid import ObjectType, oid_generation, oid_type
from sheep.testing.cluster import LocalCluster

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
object_size = 4 * MiB
cluster_copies = 2
dogs_in_parallel = 4
list_fields = {"name", "id", "size", "used", "shared", "ctime", "snapshot", "tag", "copies"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(str(tmp_path_factory.mktemp("dog-vdi")), nodes=3) as local:
        local.start()
        local.format(copies=cluster_copies, object_size=object_size)
        yield local


@pytest.fixture(scope="module")
def port(cluster: LocalCluster) -> int:
    return cluster.sheep[0].port


@pytest.fixture(scope="module")
def api(cluster: LocalCluster) -> Iterator[SyncClient]:
    with cluster.client(0) as client:
        yield client


def dog(port: int | None, *args: str, stdin: bytes | None = None,
        check: int | None = 0) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "dog", *(["-p", str(port)] if port else []), *args]
    result = subprocess.run(command, input=stdin, capture_output=True, timeout=60)
    if check is not None:
        assert result.returncode == check, (args, result.returncode, result.stdout,
                                            result.stderr)
    return result


def out(port: int, *args: str, stdin: bytes | None = None) -> str:
    return dog(port, *args, stdin=stdin).stdout.decode()


def dog_table(port: int | None, commands: list[list[str]],
              stdin: bytes | None = None) -> list[subprocess.CompletedProcess[bytes]]:
    """Run many dog commands, a few at a time: tables of cases cost less that way."""
    with ThreadPoolExecutor(max_workers=dogs_in_parallel) as pool:
        return list(pool.map(lambda args: dog(port, *args, stdin=stdin, check=None), commands))


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("dog: ")
    return lines[0]


def fails(port: int, code: int, *args: str, stdin: bytes | None = None) -> str:
    """Run dog expecting exit ``code``; return its one-line error."""
    return one_line_error(dog(port, *args, stdin=stdin, check=code))


# What dog did is checked through the client library: independent of dog's
# output, and without an interpreter's start-up per check.


def listing(api: SyncClient, name: str | None = None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = api.vdi_list([name] if name else None)
    return items


def current(api: SyncClient, name: str) -> dict[str, Any]:
    return next(i for i in listing(api, name) if not i["snapshot"])


def node_objects(api: SyncClient) -> int:
    return sum(node["objects"] for node in api.node_list())


def read(api: SyncClient, name: str, offset: int, length: int) -> bytes:
    """Bytes of NAME or NAME@TAG."""
    base, _, tag = name.partition("@")
    handle = api.vdi_open(base, snapshot=tag or None)["handle"]
    try:
        data: bytes = api.vdi_read(handle, offset, length)
    finally:
        api.vdi_close(handle)
    return data


def write(api: SyncClient, name: str, offset: int, data: bytes) -> None:
    handle = api.vdi_open(name, writable=True, owner="test")["handle"]
    try:
        for start in range(0, len(data), object_size):
            api.vdi_write(handle, offset + start, data[start:start + object_size])
    finally:
        api.vdi_close(handle)


# --- create ---------------------------------------------------------------------------


@pytest.mark.parametrize("size, expected, shown", [
    ("256G", 256 * GiB, "256 GiB"), ("1P", 1 << 50, "1 PiB"), ("16P", 16 << 50, "16 PiB"),
    ("1536M", 1536 * MiB, "1.5 GiB"), ("4096", 4096, "4 KiB"),
])
def test_create_sizes(port, api, size, expected, shown):
    name = f"create-{size}"
    text = out(port, "vdi", "create", name, size)
    assert re.fullmatch(rf"created VDI '{name}' \({re.escape(shown)}, id \d+\)\n", text), text
    item = current(api, name)
    assert item["size"] == expected and item["used"] == 0 and item["shared"] == 0
    assert item["copies"] == cluster_copies


def test_create_longest_name_and_copies(port, api):
    name = "n" * 256
    dog(port, "vdi", "create", name, "1G")
    assert current(api, name)["size"] == GiB
    dog(port, "vdi", "create", "create-copies", "1G", "--copies", "3")
    assert current(api, "create-copies")["copies"] == 3


refused_creates = [
    ("bad name", "1G", EXIT_USAGE, "may hold only letters"),
    ("bad/name", "1G", EXIT_USAGE, "may hold only letters"),
    ("bad@name", "1G", EXIT_USAGE, "may hold only letters"),
    ("", "1G", EXIT_USAGE, "must not be empty"),
    ("x" * 257, "1G", EXIT_USAGE, "longer than 256 characters"),
    ("create-zero", "0", EXIT_USAGE, "size must be a positive number of bytes, not 0"),
    ("create-q", "12Q", EXIT_USAGE, "invalid size '12Q'"),
    ("create-neg", "-1G", EXIT_USAGE, "invalid size '-1G'"),
    ("create-17p", "17P", EXIT_USAGE, "size 17 PiB (19140298416324608 bytes) exceeds the"
                                      " largest VDI, 16 PiB (18014398509481984 bytes)"),
    ("create-16p1", str((16 << 50) + 1), EXIT_USAGE, "exceeds the largest VDI"),
]


def test_create_refused(port, api):
    results = dog_table(port, [["vdi", "create", "--", name, size]
                               for name, size, _, _ in refused_creates])
    for (name, size, code, words), result in zip(refused_creates, results, strict=True):
        assert result.returncode == code, (name[:20], size, result)
        assert words in one_line_error(result), (name[:20], size, result.stderr)
    names = {i["name"] for i in listing(api)}
    assert not names & {name for name, _, _, _ in refused_creates}


def test_a_negative_size_without_dashes_is_named_as_one(port, api):
    """Without '--', '-5G' reads as an option: the error says what it is."""
    line = fails(port, EXIT_USAGE, "vdi", "create", "create-neg5", "-5G")
    assert "'-5G': sizes and numbers cannot be negative" in line, line
    assert "create-neg5" not in {i["name"] for i in listing(api)}


def test_create_duplicate(port, api):
    dog(port, "vdi", "create", "create-dup", "1G")
    assert "already exists" in fails(port, EXIT_EXISTS, "vdi", "create", "create-dup", "2G")
    assert current(api, "create-dup")["size"] == GiB


def test_create_copies_more_than_zones(port):
    line = fails(port, EXIT_USAGE, "vdi", "create", "create-c4", "1G", "--copies", "4")
    assert line == "dog: copies must be 1 to 3, not 4"


# --- unknown VDIs and tags ------------------------------------------------------------


def test_unknown_vdi(port, api, tmp_path):
    source = tmp_path / "image"
    source.write_bytes(b"x" * 4096)
    target = str(tmp_path / "out")
    commands = [
        ["list", "nope"], ["snapshot", "nope"], ["snapshot", "-s", "t", "nope"],
        ["clone", "nope@t", "clone-nope"], ["clone", "-s", "t", "nope", "clone-nope"],
        ["rollback", "-s", "t", "nope"], ["delete", "nope"], ["delete", "-s", "t", "nope"],
        ["delete", "--force", "nope"], ["resize", "nope", "1G"], ["read", "nope"],
        ["read", "nope@t"], ["write", "nope"], ["write", "nope", "1M", "4"],
        ["import", "nope", str(source)], ["export", "nope", target],
        ["export", "nope@t", target], ["object", "nope"], ["object", "nope", "-i", "3"],
        ["setattr", "nope", "k", "v"], ["setattr", "nope", "k", "-d"], ["getattr", "nope", "k"],
        ["getattr", "nope"], ["lock", "unlock", "nope"],
    ]
    results = dog_table(port, [["vdi", *command] for command in commands], stdin=b"data")
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == EXIT_MISSING, (command, result)
        assert one_line_error(result) == "dog: no VDI named 'nope'", (command, result.stderr)
    assert not os.path.exists(target) or os.path.getsize(target) == 0
    assert not any(i["name"] == "clone-nope" for i in listing(api))


@pytest.fixture(scope="module")
def tagged(port) -> str:
    """A VDI with one snapshot, 'one'."""
    dog(port, "vdi", "create", "tagged", "64M")
    dog(port, "vdi", "snapshot", "-s", "one", "tagged")
    return "tagged"


def test_unknown_snapshot(port, api, tagged, tmp_path):
    commands = [
        ["clone", "tagged@nosuch", "clone-x"], ["clone", "-s", "nosuch", "tagged", "clone-x"],
        ["rollback", "-s", "nosuch", "tagged"], ["rollback", "tagged@nosuch"],
        ["delete", "-s", "nosuch", "tagged"], ["delete", "tagged@nosuch"],
        ["read", "tagged@nosuch"], ["read", "-s", "nosuch", "tagged"],
        ["export", "tagged@nosuch", str(tmp_path / "out")], ["object", "tagged", "-s", "nosuch"],
        ["clone", "tagged@999999", "clone-x"], ["read", "tagged@999999"],
    ]
    results = dog_table(port, [["vdi", *command] for command in commands])
    for command, result in zip(commands, results, strict=True):
        assert result.returncode == EXIT_MISSING, (command, result)
        line = one_line_error(result)
        assert re.fullmatch(r"dog: VDI 'tagged' has no snapshot '(nosuch|999999)'", line), line
    assert [i["tag"] for i in listing(api, "tagged") if i["snapshot"]] == ["one"]
    assert not any(i["name"] == "clone-x" for i in listing(api))


def test_snapshot_name_and_option_must_agree(port, tagged):
    line = fails(port, EXIT_USAGE, "vdi", "read", "tagged@one", "-s", "two")
    assert "different snapshots" in line


# --- list, snapshot, clone --------------------------------------------------------------


def parse_table(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """dog vdi list's table: the headers, and each row's mark and other cells."""
    lines = text.splitlines()
    name_at = lines[0].index("Name")
    headers = lines[0][name_at:].replace("Creation time", "Creation_time").split()
    rows = [(line[:name_at].strip(), line[name_at:].split()) for line in lines[1:]]
    return headers, rows


def test_list_marks_snapshots_and_clones(port, api):
    dog(port, "vdi", "create", "family", "40M")
    write(api, "family", 0, random.Random(1).randbytes(6 * MiB))
    tagged = out(port, "vdi", "snapshot", "-s", "first", "family")
    assert re.fullmatch(r"snapshot 'first' of 'family' taken, id \d+\n", tagged), tagged
    untagged = out(port, "vdi", "snapshot", "family")
    assert re.fullmatch(r"snapshot \(untagged\) of 'family' taken, id \d+\n", untagged)
    cloned = out(port, "vdi", "clone", "family@first", "family-clone")
    assert re.fullmatch(r"cloned family@first as 'family-clone' \(id \d+\)\n", cloned), cloned

    headers, rows = parse_table(out(port, "vdi", "list"))
    assert headers == ["Name", "Id", "Size", "Used", "Shared", "Creation_time", "Copies", "Tag",
                       "Lock", "QoS"]
    mine = [(mark, cells) for mark, cells in rows if cells[0].startswith("family")]
    assert [(mark, cells[0]) for mark, cells in mine] == [
        ("s", "family"), ("s", "family"), ("", "family"), ("c", "family-clone")]
    assert mine[0][1][-1] == "first"  # the tag column
    assert mine[2][1][2:6] == ["40", "MiB", "0", "B"]  # size, used: all of it is the snapshot's
    assert mine[0][1][4:6] == ["8", "MiB"]  # the first snapshot wrote 2 objects
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", mine[0][1][8])

    items = json.loads(dog(port, "vdi", "list", "--json", "family").stdout)
    assert {item["name"] for item in items} == {"family"}  # the NAME filter
    assert items == listing(api, "family")
    for item in items:
        assert list_fields <= set(item)
    snapshots = [i for i in items if i["snapshot"]]
    assert sorted(i["tag"] for i in snapshots) == ["", "first"]
    head = current(api, "family")
    assert head["tag"] == "" and head["used"] == 0 and head["shared"] == 8 * MiB
    first = next(i for i in snapshots if i["tag"] == "first")
    assert first["used"] == 8 * MiB and first["size"] == 40 * MiB and first["ctime"] > 0
    assert head["id"] not in {i["id"] for i in snapshots}
    clone = current(api, "family-clone")
    assert clone["parent"]["snapshot"] == first["id"] and clone["size"] == 40 * MiB

    assert "no VDI named 'famil'" in fails(port, EXIT_MISSING, "vdi", "list", "famil")
    no_usage = out(port, "vdi", "list", "--no-usage", "family")
    assert all(cells[4] == cells[5] == "-" for _, cells in parse_table(no_usage)[1])


def test_snapshot_tags(port, api):
    dog(port, "vdi", "create", "snaps", "8M")
    dog(port, "vdi", "snapshot", "-s", "t", "snaps")
    assert "already has a snapshot 't'" in fails(port, EXIT_EXISTS, "vdi", "snapshot",
                                                 "-s", "t", "snaps")
    assert "all digits" in fails(port, EXIT_USAGE, "vdi", "snapshot", "-s", "123", "snaps")
    assert "may hold only" in fails(port, EXIT_USAGE, "vdi", "snapshot", "-s", "a b", "snaps")
    dog(port, "vdi", "snapshot", "snaps")
    dog(port, "vdi", "snapshot", "snaps")
    assert [i["tag"] for i in listing(api, "snaps") if i["snapshot"]] == ["t", "", ""]


def test_clone(port, api):
    rng = random.Random(2)
    dog(port, "vdi", "create", "origin", "16M")
    before = rng.randbytes(5 * MiB)
    write(api, "origin", 2 * MiB, before)
    taken = re.search(r"id (\d+)", out(port, "vdi", "snapshot", "-s", "gold", "origin"))
    assert taken
    snap_id = taken[1]
    write(api, "origin", 2 * MiB, rng.randbytes(5 * MiB))

    dog(port, "vdi", "clone", "-s", "gold", "origin", "copy-by-option")
    dog(port, "vdi", "clone", "origin@gold", "copy-by-name")
    dog(port, "vdi", "clone", "-s", snap_id, "origin", "copy-by-id")
    for name in ("copy-by-option", "copy-by-name", "copy-by-id"):
        assert read(api, name, 2 * MiB, 5 * MiB) == before
        assert current(api, name)["used"] == 0  # O(1): nothing copied yet

    write(api, "copy-by-name", 3 * MiB, b"clone's own")
    assert read(api, "copy-by-name", 3 * MiB, 11) == b"clone's own"
    assert read(api, "origin@gold", 2 * MiB, 5 * MiB) == before
    assert read(api, "copy-by-option", 2 * MiB, 5 * MiB) == before

    line = fails(port, EXIT_USAGE, "vdi", "clone", "origin", "copy-none")
    assert "clone needs the snapshot" in line
    assert "already exists" in fails(port, EXIT_EXISTS, "vdi", "clone", "origin@gold",
                                     "copy-by-id")
    assert "may hold only" in fails(port, EXIT_USAGE, "vdi", "clone", "origin@gold", "a/b")
    assert not any(i["name"] == "copy-none" for i in listing(api))


# --- rollback, delete, resize ------------------------------------------------------------


def test_rollback(port, api):
    rng = random.Random(3)
    dog(port, "vdi", "create", "back", "32M")
    kept = rng.randbytes(9 * MiB)
    write(api, "back", MiB, kept)
    dog(port, "vdi", "snapshot", "-s", "good", "back")
    write(api, "back", 0, rng.randbytes(12 * MiB))
    write(api, "back", 20 * MiB, b"later")
    assert read(api, "back", MiB, 9 * MiB) != kept

    text = out(port, "vdi", "rollback", "-s", "good", "back")
    match = re.fullmatch(r"rolled 'back' back to 'good'; freed (\d+) objects\n", text)
    assert match, text
    assert int(match[1]) == 5  # 4 data objects written since, and the generation's root
    assert read(api, "back", 0, 10 * MiB) == bytes(MiB) + kept
    assert read(api, "back", 20 * MiB, 5) == bytes(5)
    assert current(api, "back")["used"] == 0
    # Still a snapshot to roll back to, and NAME@TAG works too.
    write(api, "back", 0, b"again")
    dog(port, "vdi", "rollback", "back@good")
    assert read(api, "back", 0, 5) == bytes(5)
    assert "rollback needs the snapshot" in fails(port, EXIT_USAGE, "vdi", "rollback", "back")


def test_delete_with_snapshots_and_clones(port, api):
    rng = random.Random(4)
    dog(port, "vdi", "create", "tree-base", "32M")
    first = rng.randbytes(12 * MiB)
    write(api, "tree-base", 0, first)  # objects 0, 1, 2
    dog(port, "vdi", "snapshot", "-s", "s1", "tree-base")
    write(api, "tree-base", 0, rng.randbytes(MiB))  # copy-up of object 0
    dog(port, "vdi", "snapshot", "-s", "s2", "tree-base")
    write(api, "tree-base", 0, rng.randbytes(MiB))  # and again, past s2
    dog(port, "vdi", "clone", "tree-base@s1", "tree-clone")
    clone_own = rng.randbytes(MiB)
    write(api, "tree-clone", 9 * MiB, clone_own)  # copy-up of object 2 into the clone
    clone_expected = first[:9 * MiB] + clone_own + first[10 * MiB:]
    objects = node_objects(api)
    used = sum(i["used"] for i in listing(api) if i["name"].startswith("tree-"))

    # One snapshot: what only it holds goes (its copy of object 0 and its root).
    text = out(port, "vdi", "delete", "-s", "s2", "tree-base")
    assert text == "deleted snapshot 's2' of 'tree-base'; freed 2 objects\n"
    assert [i["tag"] for i in listing(api, "tree-base") if i["snapshot"]] == ["s1"]
    assert node_objects(api) == objects - 2 * cluster_copies
    after = sum(i["used"] for i in listing(api) if i["name"].startswith("tree-"))
    assert after == used - object_size

    # The VDI with its snapshot s1: the clone keeps what it shares with s1.
    text = out(port, "vdi", "delete", "tree-base")
    match = re.fullmatch(r"deleted VDI 'tree-base'; freed (\d+) objects\n", text)
    assert match, text
    # Gone: the head's object 0 and root, s1's object 2 (the clone has its own) and root;
    # and the change pages (a page and its directory) of the two generations no tree
    # reaches any more, the head's and s2's (s1's stay: the clone descends from it).
    assert int(match[1]) == 4
    assert node_objects(api) == objects - 6 * cluster_copies - 4 * cluster_copies
    assert read(api, "tree-clone", 0, 12 * MiB) == clone_expected
    remaining = listing(api)
    assert not any(i["name"] == "tree-base" for i in remaining)
    clone = current(api, "tree-clone")
    assert clone["used"] == object_size and clone["shared"] == 2 * object_size
    tree = out(port, "vdi", "tree")
    assert "tree-clone (32 MiB) (clone of deleted tree-base@s1)" in tree

    dog(port, "vdi", "delete", "tree-clone")  # and the pages of s1's and its generation
    assert node_objects(api) == objects - 10 * cluster_copies - 8 * cluster_copies
    assert "no VDI named 'tree-clone'" in fails(port, EXIT_MISSING, "vdi", "read", "tree-clone")


def test_delete_snapshot_by_name_at_tag(port, api):
    dog(port, "vdi", "create", "at-delete", "8M")
    dog(port, "vdi", "snapshot", "-s", "x", "at-delete")
    assert out(port, "vdi", "delete", "at-delete@x").startswith(
        "deleted snapshot 'x' of 'at-delete'")
    assert len(listing(api, "at-delete")) == 1


def test_resize(port, api):
    dog(port, "vdi", "create", "grow", "8M")
    data = random.Random(5).randbytes(2 * MiB)
    write(api, "grow", 6 * MiB, data)
    assert out(port, "vdi", "resize", "grow", "1G") == "resized 'grow' to 1 GiB\n"
    assert current(api, "grow")["size"] == GiB
    # Past 4 GiB the tree gets a level more: the old data moves under it.
    assert out(port, "vdi", "resize", "grow", "5G") == "resized 'grow' to 5 GiB\n"
    assert read(api, "grow", 6 * MiB, 2 * MiB) == data
    write(api, "grow", 5 * GiB - 3, b"end")
    assert read(api, "grow", 5 * GiB - 4, 4) == b"\0end"
    assert read(api, "grow", 6 * MiB, 2 * MiB) == data

    line = fails(port, EXIT_USAGE, "vdi", "resize", "grow", "4G")
    assert "can only grow" in line
    assert "exceeds the largest VDI" in fails(port, EXIT_USAGE, "vdi", "resize", "grow", "17P")
    assert "invalid size" in fails(port, EXIT_USAGE, "vdi", "resize", "grow", "lots")
    assert current(api, "grow")["size"] == 5 * GiB


# --- byte I/O -----------------------------------------------------------------------------


def test_read_and_write(port, api):
    rng = random.Random(6)
    dog(port, "vdi", "create", "bytes", "16M")
    data = rng.randbytes(3 * MiB)
    # Sizes as arguments; 3M..6M crosses the boundary between objects 0 and 1.
    dog(port, "vdi", "write", "bytes", "3M", "3M", stdin=data)
    assert dog(port, "vdi", "read", "bytes", "3M", "3M").stdout == data
    assert dog(port, "vdi", "read", "bytes", "2M", "2M").stdout == bytes(MiB) + data[:MiB]
    whole = dog(port, "vdi", "read", "bytes").stdout
    assert len(whole) == 16 * MiB and whole[3 * MiB:6 * MiB] == data
    assert dog(port, "vdi", "read", "bytes", "15M").stdout == bytes(MiB)

    # Without LENGTH, write takes all of stdin; with it, only LENGTH bytes.
    small = rng.randbytes(10 * KiB)
    dog(port, "vdi", "write", "bytes", str(4 * MiB - 5 * KiB), stdin=small)
    dog(port, "vdi", "write", "bytes", "8M", "4K", stdin=small)
    assert read(api, "bytes", 4 * MiB - 5 * KiB, 10 * KiB) == small
    assert read(api, "bytes", 8 * MiB, 10 * KiB) == small[:4 * KiB] + bytes(6 * KiB)
    # The last byte.
    dog(port, "vdi", "write", "bytes", str(16 * MiB - 1), stdin=b"Z")
    assert dog(port, "vdi", "read", "bytes", str(16 * MiB - 1)).stdout == b"Z"

    assert "past the end" in fails(port, EXIT_USAGE, "vdi", "read", "bytes", "17M")
    assert "past the end" in fails(port, EXIT_USAGE, "vdi", "read", "bytes", "15M", "2M")
    assert "past the end" in fails(port, EXIT_USAGE, "vdi", "write", "bytes", "15M", "2M",
                                   stdin=bytes(2 * MiB))
    assert "past the end" in fails(port, EXIT_USAGE, "vdi", "write", "bytes", "17M",
                                   stdin=b"x")
    assert "stdin ended after 3 of 4096 bytes" in fails(port, EXIT_USAGE, "vdi", "write",
                                                        "bytes", "0", "4K", stdin=b"abc")
    assert "invalid size" in fails(port, EXIT_USAGE, "vdi", "read", "bytes", "1Q")
    assert read(api, "bytes", 15 * MiB, MiB) == bytes(MiB - 1) + b"Z"


def sparse_image(path: str, size: int, rng: random.Random) -> None:
    """Holes, whole objects of data, data inside otherwise empty objects, a tail."""
    with open(path, "wb") as image:
        image.truncate(size)
        for offset, length in [(MiB, 100 * KiB), (9 * MiB + 5000, 5 * MiB),
                               (17 * MiB, 8 * KiB), (size - 10, 10)]:
            image.seek(offset)
            image.write(rng.randbytes(length))


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_import_and_export_sparse(port, api, tmp_path):
    source = str(tmp_path / "disk.raw")
    size = 24 * MiB
    sparse_image(source, size, random.Random(7))
    expected = Path(source).read_bytes()
    assert allocated(source) < 7 * MiB  # the filesystem does keep holes

    result = dog(port, "vdi", "import", "--create", "imported", source)
    assert "imported 24 MiB into 'imported'" in result.stderr.decode()
    item = current(api, "imported")
    assert item["size"] == size
    # Objects 2 and 3 hold data; 0, 4 and 5 part of it; object 1 is a hole.
    assert item["used"] == 5 * object_size

    exported = str(tmp_path / "copy.raw")
    result = dog(port, "vdi", "export", "imported", exported)
    assert "exported 24 MiB from 'imported'" in result.stderr.decode()
    assert Path(exported).read_bytes() == expected
    # The holes stay holes, also those inside objects that hold data.
    assert allocated(exported) <= allocated(source) + 64 * KiB
    assert dog(port, "vdi", "export", "imported", "-").stdout == expected

    # Into an existing, larger VDI; and refused into a smaller one.
    dog(port, "vdi", "create", "import-big", "32M")
    dog(port, "vdi", "import", "import-big", source)
    assert read(api, "import-big", 0, size) == expected
    assert read(api, "import-big", size, 8 * MiB) == bytes(8 * MiB)
    dog(port, "vdi", "create", "import-small", "16M")
    line = fails(port, EXIT_USAGE, "vdi", "import", "import-small", source)
    assert "is larger than VDI 'import-small'" in line
    assert current(api, "import-small")["used"] == 0
    line = fails(port, EXIT_EXISTS, "vdi", "import", "--create", "imported", source)
    assert "already exists" in line
    assert fails(port, EXIT_USAGE, "vdi", "import", "imported", str(tmp_path / "missing"))
    nowhere = str(tmp_path / "no" / "such.raw")
    line = fails(port, EXIT_SYSTEM, "vdi", "export", "imported", nowhere)
    assert line == f"dog: {nowhere}: No such file or directory"


class Scribbler(threading.Thread):
    """Holds a VDI writable and overwrites it with fresh random data until stopped."""

    def __init__(self, port: int, name: str, size: int) -> None:
        super().__init__(daemon=True)
        self.port, self.name, self.size = port, name, size
        self.stop_event = threading.Event()
        self.opened = threading.Event()
        self.writes = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        rng = random.Random(8)
        try:
            with SyncClient("127.0.0.1", self.port) as client:
                handle = client.vdi_open(self.name, writable=True, owner="scribbler")["handle"]
                self.opened.set()
                while not self.stop_event.is_set():
                    offset = rng.randrange(0, self.size - 256 * KiB, 4 * KiB)
                    client.vdi_write(handle, offset, rng.randbytes(256 * KiB))
                    self.writes += 1
        except BaseException as error:  # reported by finish()
            self.errors.append(error)
            self.opened.set()

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)
        assert not self.is_alive() and not self.errors, self.errors


def test_export_snapshot_while_the_vdi_changes(port, api, tmp_path):
    dog(port, "vdi", "create", "moving", "12M")
    frozen = random.Random(9).randbytes(12 * MiB)
    write(api, "moving", 0, frozen)
    dog(port, "vdi", "snapshot", "-s", "then", "moving")
    scribbler = Scribbler(port, "moving", 12 * MiB)
    scribbler.start()
    try:
        assert scribbler.opened.wait(10)
        exported = tmp_path / "then.raw"
        dog(port, "vdi", "export", "moving@then", str(exported))
        assert dog(port, "vdi", "read", "-s", "then", "moving").stdout == frozen
    finally:
        scribbler.finish()
    assert scribbler.writes > 0
    assert exported.read_bytes() == frozen
    assert read(api, "moving", 0, 12 * MiB) != frozen


# --- tree, object, attributes --------------------------------------------------------------


def test_tree(port, api):
    dog(port, "vdi", "create", "lineage", "1G")
    dog(port, "vdi", "snapshot", "-s", "root-snap", "lineage")
    dog(port, "vdi", "snapshot", "lineage")
    dog(port, "vdi", "clone", "lineage@root-snap", "lineage-kid")
    dog(port, "vdi", "snapshot", "-s", "kid-snap", "lineage-kid")
    dog(port, "vdi", "clone", "lineage-kid@kid-snap", "lineage-grandkid")
    family = [i for i in listing(api) if i["name"].startswith("lineage")]
    items = {(i["name"], i["tag"]): i for i in family if i["snapshot"]}
    vdi_ids = {i["name"]: i["id"] for i in family if not i["snapshot"]}

    lines = out(port, "vdi", "tree").splitlines()
    assert "lineage-kid" not in [line.split(" ")[0] for line in lines], "clones are not roots"
    start = lines.index("lineage (1 GiB)")
    snap_id = items[("lineage", "root-snap")]["id"]
    snap_at = next(i for i, line in enumerate(lines) if f"[root-snap] id {snap_id}," in line)
    kid_at = next(i for i, line in enumerate(lines) if "clone lineage-kid (1 GiB)" in line)
    grandkid_at = next(i for i, line in enumerate(lines)
                       if "clone lineage-grandkid (1 GiB)" in line)
    untagged_at = next(i for i, line in enumerate(lines) if "[untagged] id" in line
                       and i > start)
    assert start < snap_at < kid_at < grandkid_at < untagged_at
    indent = [len(lines[i]) - len(lines[i].lstrip("│├└─ ")) for i in (snap_at, kid_at,
                                                                      grandkid_at)]
    assert indent[0] < indent[1] < indent[2], lines[start:untagged_at + 2]
    assert lines[snap_at].startswith("├── [root-snap]")
    assert "[kid-snap]" in "\n".join(lines[kid_at:grandkid_at])
    assert lines[untagged_at + 1] == "└── (current)"

    dot = out(port, "vdi", "tree", "--dot")
    assert dot.startswith("digraph vdis {\n") and dot.endswith("}\n")
    assert dot.count("{") == dot.count("}") == 1
    declared = set(re.findall(r'^  "(\w+)" \[label=', dot, re.MULTILINE))
    edges = re.findall(r'^  "(\w+)" -> "(\w+)"(.*);$', dot, re.MULTILINE)
    assert edges and all(a in declared and b in declared for a, b, _ in edges)
    clone_edges = {(a, b) for a, b, style in edges if 'label="clone"' in style}
    assert (f"s{snap_id}", f"v{vdi_ids['lineage-kid']}") in clone_edges
    kid_snap = items[("lineage-kid", "kid-snap")]["id"]
    assert (f"s{kid_snap}", f"v{vdi_ids['lineage-grandkid']}") in clone_edges
    assert f'"s{snap_id}" [label="lineage@root-snap", style=rounded];' in dot
    # Snapshots chain to the head in order.
    untagged = items[("lineage", "")]["id"]
    assert (f"s{snap_id}", f"s{untagged}") in {(a, b) for a, b, _ in edges}
    assert (f"s{untagged}", f"v{vdi_ids['lineage']}") in {(a, b) for a, b, _ in edges}

    as_json = json.loads(dog(port, "vdi", "tree", "--json").stdout)
    assert {i["name"] for i in as_json} >= {"lineage", "lineage-kid", "lineage-grandkid"}


def test_object(port, api, cluster):
    dog(port, "vdi", "create", "placed", "64M", "--copies", "3")
    dog(port, "vdi", "create", "placed2", "64M")
    write(api, "placed", 5 * object_size + 7, b"here")
    write(api, "placed2", 0, b"here")

    text = out(port, "vdi", "object", "placed", "-i", "4")
    assert text == (f"index 4 of 'placed' (bytes {4 * object_size}-{5 * object_size - 1})"
                    " was never written: no object, reads as zeros\n")
    assert "index 0 of 'placed'" in out(port, "vdi", "object", "placed")
    ports = {str(sheep.port) for sheep in cluster.sheep}
    for name, index, copies in (("placed", 5, 3), ("placed2", 0, cluster_copies)):
        text = out(port, "vdi", "object", name, "-i", str(index))
        lines = text.splitlines()
        match = re.fullmatch(rf"index {index} of '{name}' \(bytes \d+-\d+\) is object "
                             r"([0-9a-f]{16}), \d copies at epoch \d+", lines[0])
        assert match, lines[0]
        assert lines[1].split()[:3] == ["Node", "id", "Address"]
        rows = [line.split() for line in lines[2:]]
        assert len(rows) == copies
        assert len({row[2] for row in rows}) == copies, "distinct zones"
        assert all(row[1].split(":")[1] in ports and row[-1] == "ok" for row in rows)
        value = json.loads(dog(port, "vdi", "object", name, "-i", str(index), "--json").stdout)
        assert value["index"] == index and value["oid"] == int(match[1], 16)
        assert len({replica["zone"] for replica in value["replicas"]}) == copies
        holders = cluster.object_files(value["oid"])
        assert len(holders) == copies
        assert {str(cluster.sheep[i].port) for i in holders} == {
            r["endpoint"].split(":")[1] for r in value["replicas"]}

    assert "index must be 0 to 15" in fails(port, EXIT_USAGE, "vdi", "object", "placed",
                                            "-i", "16")
    assert fails(port, EXIT_USAGE, "vdi", "object", "placed", "-i", "-1")


def test_object_reports_the_vdis_copies(port, api):
    dog(port, "vdi", "create", "placed3", "8M", "--copies", "3")
    write(api, "placed3", 0, b"three")
    value = json.loads(dog(port, "vdi", "object", "placed3", "--json").stdout)
    assert len(value["replicas"]) == 3
    assert value["copies"] == 3


def test_attributes(port):
    dog(port, "vdi", "create", "labelled", "8M")
    dog(port, "vdi", "setattr", "labelled", "owner", stdin=b"alice\nand bob")
    assert dog(port, "vdi", "getattr", "labelled", "owner").stdout == b"alice\nand bob\n"
    dog(port, "vdi", "setattr", "labelled", "role", "db")
    line = fails(port, EXIT_EXISTS, "vdi", "setattr", "-x", "labelled", "role", "web")
    assert "already has attribute 'role'" in line
    assert out(port, "vdi", "getattr", "labelled", "role") == "db\n"
    dog(port, "vdi", "setattr", "labelled", "role", "web")  # without -x: replaced
    assert json.loads(dog(port, "vdi", "getattr", "labelled", "--json").stdout) == {
        "owner": "alice\nand bob", "role": "web"}
    assert json.loads(dog(port, "vdi", "getattr", "labelled", "role", "--json").stdout) == {
        "key": "role", "value": "web"}

    dog(port, "vdi", "setattr", "-d", "labelled", "role")
    line = fails(port, EXIT_MISSING, "vdi", "getattr", "labelled", "role")
    assert line == "dog: VDI 'labelled' has no attribute 'role'"
    assert "no attribute 'role'" in fails(port, EXIT_MISSING, "vdi", "setattr", "-d",
                                          "labelled", "role")
    assert "takes no VALUE" in fails(port, EXIT_USAGE, "vdi", "setattr", "-d", "labelled",
                                     "owner", "x")
    assert json.loads(dog(port, "vdi", "getattr", "labelled", "--json").stdout) == {
        "owner": "alice\nand bob"}


def test_attributes_that_are_not_text_are_refused(port):
    """Undecodable bytes are refused, and the cluster goes on applying operations."""
    dog(port, "vdi", "create", "labelled-bytes", "8M")
    line = fails(port, EXIT_USAGE, "vdi", "setattr", "labelled-bytes", "k", stdin=b"\xff\xfe")
    assert line == "dog: attribute values are UTF-8 text; stdin is not (byte 0)"
    # An undecodable argument reaches the gateway as a lone surrogate.
    line = fails(port, EXIT_USAGE, "vdi", "setattr", "labelled-bytes", "k", "\udcff")
    assert line == "dog: attribute value must be valid UTF-8 text"
    line = fails(port, EXIT_USAGE, "vdi", "setattr", "labelled-bytes", "\udcff", "v")
    assert line == "dog: attribute key must be valid UTF-8 text"
    dog(port, "vdi", "setattr", "labelled-bytes", "k", "välue ✓")
    assert out(port, "vdi", "getattr", "labelled-bytes", "k") == "välue ✓\n"
    dog(port, "vdi", "create", "labelled-after", "8M")


# --- locks --------------------------------------------------------------------------------


def test_lock_list_and_unlock(port, api, cluster):
    dog(port, "vdi", "create", "held", "8M")
    holder = SyncClient("127.0.0.1", cluster.sheep[1].port, cluster.credentials)
    try:
        handle = holder.vdi_open("held", writable=True, owner="test-holder")["handle"]
        holder.vdi_write(handle, 0, b"mine")

        reader = SyncClient("127.0.0.1", cluster.sheep[2].port, cluster.credentials)
        reader.vdi_open("held", owner="test-reader")
        lines = out(port, "vdi", "lock", "list").splitlines()
        assert lines[0].split() == ["Name", "Id", "Mode", "Who", "Since"]
        rows = [line for line in lines[1:] if line.split()[0] == "held"]
        assert rows[0].split()[2] == "lock" and "test-holder (via sheep 127.0.0.1:" in rows[0]
        assert rows[1].split()[2] == "ro" and "test-reader (via sheep 127.0.0.1:" in rows[1]
        assert len(rows) == 2  # the holder's own attachment is its lock's row
        locks = json.loads(dog(port, "vdi", "lock", "list", "--json").stdout)
        held = next(lock for lock in locks if lock["name"] == "held" and lock["mode"] == "lock")
        assert held["node_id"].startswith(f"127.0.0.1:{cluster.sheep[1].port}/")
        assert held["owner"].startswith("test-holder")
        assert "locked" in next(line for line in out(port, "vdi", "list", "held").splitlines()
                                if "held" in line)

        # A raw object change behind the lock's back (dog refuses VDI objects itself;
        # another admin client) is refused by the sheep, naming the holder.
        data_oid = holder.vdi_object("held", 0)["oid"]
        for change in (lambda: api.write(data_oid, b"raw"), lambda: api.remove(data_oid)):
            with pytest.raises(VdiLocked, match="belongs to VDI 'held', whose lock test-holder"):
                change()

        # Others are refused, naming the holder; reading is fine.
        line = fails(port, EXIT_FAILURE, "vdi", "write", "held", stdin=b"theirs")
        assert "VDI 'held' is in use by test-holder" in line
        assert "--force" not in line  # no --force for writes
        line = fails(port, EXIT_FAILURE, "vdi", "delete", "held")
        assert "in use by test-holder" in line and line.endswith("; --force deletes it anyway")
        assert read(api, "held", 0, 4) == b"mine"

        assert out(port, "vdi", "lock", "unlock", "held") == "unlocked 'held'\n"
        locks = json.loads(dog(port, "vdi", "lock", "list", "--json").stdout)
        assert sorted(lock["mode"] for lock in locks if lock["name"] == "held") == ["ro", "rw"]
        reader.close()
        with pytest.raises(VdiLocked, match="was taken from this client"):
            holder.vdi_write(handle, 0, b"late")
        write(api, "held", 0, b"next")
        assert read(api, "held", 0, 4) == b"next"
    finally:
        holder.close()


# --- help --------------------------------------------------------------------------------


def test_help():
    """In-process (click's runner): help needs no sheep, and 19 interpreters cost seconds."""
    runner = CliRunner()
    for command in [
        [], ["create"], ["list"], ["snapshot"], ["clone"], ["rollback"], ["delete"], ["resize"],
        ["read"], ["write"], ["import"], ["export"], ["tree"], ["object"], ["setattr"],
        ["getattr"], ["lock"], ["lock", "list"], ["lock", "unlock"], ["rename"], ["info"],
    ]:
        result = runner.invoke(dog_command, ["vdi", *command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        usage = f"Usage: dog vdi {' '.join(command)}".rstrip() + " "
        assert result.output.startswith(usage), result.output
        assert "--help" in result.output and "Options:" in result.output
    assert dog(None, "vdi", "create", "--help").stdout.startswith(b"Usage: ")


def test_import_into_a_vdi_with_data_leaves_exactly_the_image(port, api, tmp_path):
    """Zero ranges and holes of the image must overwrite old data, not skip it."""
    dog(port, "vdi", "create", "reimport", "12M")
    write(api, "reimport", 0, b"OLD DATA" * 1000)
    write(api, "reimport", 9 << 20, b"OLD TAIL" * 100)
    image = tmp_path / "image.raw"
    with open(image, "wb") as file:
        file.truncate(10 << 20)  # a hole where the old tail was
        file.seek(4 << 20)
        file.write(os.urandom(5000))
    dog(port, "vdi", "import", "reimport", str(image))
    expected = image.read_bytes()
    assert read(api, "reimport", 0, 10 << 20) == expected


def test_import_from_stdin_and_overflow(port, api):
    dog(port, "vdi", "create", "piped", "1M")
    data = os.urandom(300_000)
    dog(port, "vdi", "import", "piped", "-", stdin=data)
    assert read(api, "piped", 0, len(data)) == data
    line = fails(port, EXIT_USAGE, "vdi", "import", "piped", "-", stdin=bytes(1 << 20) + b"x")
    assert "larger than VDI 'piped'" in line
    assert "--create needs a regular file" in fails(
        port, EXIT_USAGE, "vdi", "import", "newpiped", "-", "--create", stdin=b"x")


def test_write_past_the_end_without_length_is_an_error(port, api):
    dog(port, "vdi", "create", "tiny", "1K")
    line = fails(port, EXIT_USAGE, "vdi", "write", "tiny", "1000", stdin=b"0123456789" * 5)
    assert "more than fits" in line and "1024 bytes" in line
    assert read(api, "tiny", 1000, 24) == (b"0123456789" * 5)[:24]


def test_snapshots_are_refused_as_write_targets(port, api):
    dog(port, "vdi", "create", "frozen", "1M")
    dog(port, "vdi", "snapshot", "-s", "s1", "frozen")
    for args in (["write", "frozen@s1", "0"], ["import", "frozen@s1", "-"],
                 ["resize", "frozen@s1", "2M"], ["snapshot", "frozen@s1"]):
        line = fails(port, EXIT_FAILURE, "vdi", *args, stdin=b"x")
        assert "snapshots are read-only" in line, args


def test_dog_object_refuses_vdi_objects(port, api):
    dog(port, "vdi", "create", "guarded", "8M")
    write(api, "guarded", 0, b"precious")
    oid = json.loads(dog(port, "vdi", "object", "guarded", "--json").stdout)["oid"]
    for args in (["put", f"{oid:016x}", "-"], ["rm", f"{oid:016x}"]):
        line = fails(port, EXIT_USAGE, "object", *args, stdin=b"x")
        assert "belongs to a VDI" in line
    assert read(api, "guarded", 0, 8) == b"precious"
    assert "on none of its" in fails(port, EXIT_MISSING, "object", "stat", "0x77777")


# --- rename, info, shrink -------------------------------------------------------------


def test_rename_takes_data_snapshots_and_clones_along(port, api, cluster):
    data = random.Random(11).randbytes(MiB)
    dog(port, "vdi", "create", "rn-a", "8M")
    write(api, "rn-a", 3 * MiB, data)
    dog(port, "vdi", "snapshot", "-s", "s1", "rn-a")
    dog(port, "vdi", "clone", "rn-a@s1", "rn-clone")
    reader = api.vdi_open("rn-a")["handle"]
    assert out(port, "vdi", "rename", "rn-a", "rn-b") == "renamed VDI 'rn-a' to 'rn-b'\n"
    assert listing(api, "rn-a") == []
    assert read(api, "rn-b", 3 * MiB, MiB) == data
    assert read(api, "rn-b@s1", 3 * MiB, MiB) == data
    assert current(api, "rn-clone")["parent"]["vdi"] == "rn-b"
    with pytest.raises(NoVdi, match="was renamed to 'rn-b': open it by its new name"):
        api.vdi_read(reader, 0, 1)  # an open handle goes by the old name
    api.vdi_close(reader)

    dog(port, "vdi", "create", "rn-binned", "1M")
    dog(port, "vdi", "trash", "mv", "rn-binned")
    refusals = [(["rn-b", "rn-clone"], EXIT_EXISTS, "VDI 'rn-clone' already exists"),
                (["rn-b", "rn-binned"], EXIT_EXISTS, "'rn-binned' is in the trash"),
                (["rn-b", "rn b"], EXIT_USAGE, "new VDI name 'rn b' may hold only"),
                (["rn-nope", "rn-c"], EXIT_MISSING, "no VDI named 'rn-nope'"),
                (["rn-b@s1", "rn-c"], EXIT_USAGE, "its snapshots go with it")]
    results = dog_table(port, [["vdi", "rename", *args] for args, _, _ in refusals])
    for (args, code, words), result in zip(refusals, results, strict=True):
        assert result.returncode == code, (args, result.stderr)
        assert words in one_line_error(result), (args, result.stderr)

    holder = SyncClient("127.0.0.1", cluster.sheep[1].port, cluster.credentials)
    try:
        handle = holder.vdi_open("rn-b", writable=True, owner="rn-writer")["handle"]
        holder.vdi_write(handle, 0, b"busy")
        line = fails(port, EXIT_FAILURE, "vdi", "rename", "rn-b", "rn-c")
        assert "VDI 'rn-b' is in use by rn-writer (via sheep 127.0.0.1:" in line
    finally:
        holder.close()
    assert {i["name"] for i in listing(api) if i["name"].startswith("rn-")} == {
        "rn-b", "rn-clone"}


def test_rename_stays_within_a_principals_caps(port, api, cluster):
    section = api.auth_add("client.renamer", "rw vdi=caps-*")
    credentials = auth.Credentials("client.renamer", auth.decode_key(section["key"]))
    api.vdi_create("caps-mine", MiB)
    api.vdi_create("theirs", MiB)
    with SyncClient("127.0.0.1", port, credentials) as limited:
        with pytest.raises(PermissionDenied, match="may not touch VDI 'escaped'"):
            limited.vdi_rename("caps-mine", "escaped")  # out of its own reach
        with pytest.raises(PermissionDenied, match="may not touch VDI 'theirs'"):
            limited.vdi_rename("theirs", "caps-theirs")  # another's into its reach
        limited.vdi_rename("caps-mine", "caps-renamed")
    assert listing(api, "caps-renamed") and listing(api, "theirs")
    assert not listing(api, "escaped") and not listing(api, "caps-theirs")


def test_info_human_and_json(port, api, cluster):
    dog(port, "vdi", "create", "info-a", "64M", "--copies", "1")
    write(api, "info-a", 0, random.Random(12).randbytes(2 * object_size))
    dog(port, "vdi", "snapshot", "-s", "first", "info-a")
    write(api, "info-a", 0, b"changed")
    dog(port, "vdi", "clone", "info-a@first", "info-clone")
    api.vdi_qos("info-a", iops=300)
    holder = SyncClient("127.0.0.1", cluster.sheep[1].port, cluster.credentials)
    try:
        handle = holder.vdi_open("info-a", writable=True, owner="info-holder")["handle"]
        holder.vdi_write(handle, MiB, b"held")
        value = json.loads(dog(port, "vdi", "info", "info-a", "--json").stdout)
        text = out(port, "vdi", "info", "info-a")
    finally:
        holder.close()
    assert value["name"] == "info-a" and value["size"] == 64 * MiB
    assert (value["copies"], value["copies_from"], value["cluster_copies"]) == (1, "vdi", 2)
    assert value["lock"]["owner"].startswith("info-holder (via sheep 127.0.0.1:")
    assert value["lock"]["since"] > 0 and value["qos"]["iops"] == 300
    assert value["trash"] is None and value["parent"] is None
    # Its own copy of object 0; object 1 it shares with the snapshot.
    assert value["usage"] == {"provisioned": 64 * MiB, "used": 2 * object_size,
                              "used_stored": 2 * object_size,
                              "exclusive": object_size, "exclusive_stored": object_size}
    assert value["total"]["exclusive"] == object_size, "the clone keeps what first holds"
    [snap] = value["snapshots"]
    assert (snap["tag"], snap["size"], snap["used"]) == ("first", 64 * MiB, 2 * object_size)
    assert snap["exclusive"] == 0, "the clone shares all of it"
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines())
    fields = {key: item.strip() for key, item in fields.items()}
    assert fields["Name"] == f"info-a (id {value['id']})" and fields["Size"] == "64 MiB"
    assert fields["Copies"] == "1 (its own; the cluster's default is 2)"
    assert fields["Lock"].startswith("held by info-holder (via sheep 127.0.0.1:")
    assert fields["QoS"] == "300 IOPS, burst 0.25s"
    assert fields["Space"] == "used 8 MiB, exclusive 4 MiB, stored 4 MiB"
    assert fields["With snapshots"] == "used 12 MiB, exclusive 4 MiB, stored 4 MiB"
    assert fields["Snapshots"] == "1" and "Trash" not in fields and "Parent" not in fields
    assert text.split("\n\n")[1].splitlines()[0].split() == [
        "Id", "Tag", "Size", "Created", "Used", "Exclusive"]

    dog(port, "vdi", "trash", "mv", "info-clone", "--expires-in", "7d")
    clone = out(port, "vdi", "info", "info-clone")
    assert "Parent:" in clone and "clone of info-a@first" in clone
    assert "Copies:" in clone and "Lock:" in clone and "none" in clone
    assert re.search(r"Trash: +in it since .*, purged from ", clone)
    value = json.loads(dog(port, "vdi", "info", "info-clone", "--json").stdout)
    assert value["parent"]["vdi"] == "info-a" and not value["parent"]["deleted"]
    assert value["trash"]["expires"] - value["trash"]["time"] == 7 * 86400
    assert value["usage"]["exclusive"] == 0 and value["snapshots"] == []
    assert "no VDI named 'info-nope'" in fails(port, EXIT_MISSING, "vdi", "info", "info-nope")


def stored(cluster: LocalCluster, generation: int) -> tuple[int, int]:
    """Data object files of a generation on every sheep (each copy), and their
    allocated bytes."""
    files = allocated_bytes = 0
    for node in cluster.sheep:
        top = os.path.join(node.directory, "obj")
        for fanout in os.listdir(top):
            for name in os.listdir(os.path.join(top, fanout)):
                oid = int(name, 16) if len(name) == 16 else 0
                if oid_type(oid) == ObjectType.DATA and oid_generation(oid) == generation:
                    files += 1
                    allocated_bytes += allocated(os.path.join(top, fanout, name))
    return files, allocated_bytes


def test_shrink(port, api, cluster):
    """Refused without --allow-shrink; with it, what lies past the end is freed on the
    stores, reads past it fail, the snapshot before keeps all of its data, and a grow
    reads zeros where the data was. Without a lock (the sheep takes one for it), and
    with a writer on another sheep (forwarded there, between its writes)."""
    data = random.Random(13).randbytes(10 * object_size)
    dog(port, "vdi", "create", "shrink", "40M")
    write(api, "shrink", 0, data)
    dog(port, "vdi", "snapshot", "-s", "before", "shrink")
    newer = random.Random(14).randbytes(4 * object_size)
    write(api, "shrink", 6 * object_size, newer)  # objects 6-9 its own, 0-5 shared
    now = current(api, "shrink")["generation"]
    assert stored(cluster, now)[0] == 4 * cluster_copies

    line = fails(port, EXIT_USAGE, "vdi", "resize", "shrink", "9M")
    assert "can only grow unless --allow-shrink is given" in line
    size = 2 * object_size + MiB + 12345  # inside object 2, which the snapshot shares
    assert out(port, "vdi", "resize", "shrink", str(size), "--allow-shrink") == (
        "resized 'shrink' to 9 MiB; freed 4 objects\n")
    assert current(api, "shrink")["size"] == size and current(api, "shrink")["lock"] is None
    files, allocated_bytes = stored(cluster, now)  # object 2 copied up, without its tail
    head = -(-(size - 2 * object_size) // 4096) * 4096
    assert files == cluster_copies and allocated_bytes <= cluster_copies * (head + 64 * KiB)
    with pytest.raises(InvalidParameters, match="past the end"):
        read(api, "shrink", size, 1)
    assert read(api, "shrink", 0, size) == data[:size]
    assert read(api, "shrink@before", 0, 40 * MiB) == data

    holder = SyncClient("127.0.0.1", cluster.sheep[1].port, cluster.credentials)
    try:
        handle = holder.vdi_open("shrink", writable=True, owner="shrink-writer")["handle"]
        holder.vdi_write(handle, 0, b"live")
        assert out(port, "vdi", "resize", "shrink", "1M", "--allow-shrink") == (
            "resized 'shrink' to 1 MiB; freed 1 objects\n")  # its copy of 2; 1 is the snapshot's
        with pytest.raises(InvalidParameters, match="past the end"):
            holder.vdi_write(handle, MiB, b"x")
        holder.vdi_write(handle, MiB - 4, b"last")
    finally:
        holder.close()
    dog(port, "vdi", "resize", "shrink", "40M")
    expected = b"live" + data[4:MiB - 4] + b"last" + bytes(39 * MiB)
    assert read(api, "shrink", 0, 40 * MiB) == expected
    assert read(api, "shrink@before", 0, 40 * MiB) == data
