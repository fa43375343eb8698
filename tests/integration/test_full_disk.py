"""A full disk: one sheep's store on a small loop-mounted ext4. Writes that need
space there fail with a clear no-space error, nothing stored is damaged, reads go
on, dog node list shows the node full, and writes work again once space is freed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from sheep.constants import MiB
from sheep.errors import NoSpace
from sheep.testing.cluster import LocalCluster

small_fs_bytes = 96 * MiB  # the reserve (32 MiB), ext4 and 32 MiB of filler leave room for several writes


@contextlib.contextmanager
def small_filesystem(mount_point: str, image: str) -> Iterator[None]:
    """A fresh ext4 of small_fs_bytes mounted at mount_point (needs root and loop
    devices; the test is skipped, naming why, where the machine has neither)."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        pytest.skip("a loop-mounted filesystem needs root and mkfs.ext4 (e2fsprogs)")
    with open(image, "wb") as file:
        file.truncate(small_fs_bytes)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", image], check=True,
                   capture_output=True)
    os.makedirs(mount_point, exist_ok=True)
    mounted = subprocess.run(["mount", "-o", "loop", image, mount_point], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount a filesystem here: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", mount_point], capture_output=True)


def write_until_full(client, name: str, limit: int) -> tuple[int, NoSpace]:
    handle = client.vdi_open(name, writable=True)["handle"]
    try:
        for offset in range(0, limit, 4 * MiB):
            try:
                client.vdi_write(handle, offset, bytes([offset // MiB % 250 + 1]) * 4 * MiB)
            except NoSpace as error:
                return offset, error
    finally:
        client.vdi_close(handle)
    raise AssertionError(f"{limit} bytes written without running out of space")


def test_a_full_disk_fails_writes_cleanly_and_recovers_when_space_is_freed(make_cluster,
                                                                          tmp_path):
    cluster: LocalCluster = make_cluster(3, start=False)
    small = cluster.sheep[2]
    with small_filesystem(small.directory, str(tmp_path / "small.img")):
        cluster.start()
        cluster.format(3)
        with cluster.client(0) as client:
            client.vdi_create("filler", 64 * MiB)
            client.vdi_create("disk", 256 * MiB)
            handle = client.vdi_open("filler", writable=True)["handle"]
            # More than the copies a repair may bring back to the full sheep once space
            # is freed (a write refused there was applied on the others): the delete
            # below must leave room for the write after it either way.
            for offset in range(0, 32 * MiB, 4 * MiB):
                client.vdi_write(handle, offset, b"f" * 4 * MiB)
            client.vdi_close(handle)
            written, error = write_until_full(client, "disk", 256 * MiB)
            assert "no space left" in error.message and small.directory in error.message
            assert written >= 4 * MiB
            client.flush()
        listing = json.loads(subprocess.run(
            [sys.executable, "-m", "dog", "node", "list", "--json", "-p", str(cluster.sheep[0].port)],
            capture_output=True, text=True, timeout=60).stdout)
        by_port = {node["port"]: node for node in listing}
        assert by_port[small.port]["space"] == "full"
        assert by_port[cluster.sheep[0].port]["space"] == "ok"
        table = subprocess.run([sys.executable, "-m", "dog", "node", "list", "-p",
                                str(cluster.sheep[0].port)], capture_output=True, text=True,
                               timeout=60).stdout
        assert "ok, full" in table
        # Nothing stored was damaged: everything written reads back, through every sheep.
        for index in range(3):
            with cluster.client(index) as client:
                handle = client.vdi_open("disk")["handle"]
                for offset in range(0, written, 4 * MiB):
                    assert client.vdi_read(handle, offset, 4 * MiB) == \
                        bytes([offset // MiB % 250 + 1]) * 4 * MiB
                client.vdi_close(handle)
                handle = client.vdi_open("filler")["handle"]
                assert client.vdi_read(handle, 0, 4 * MiB) == b"f" * 4 * MiB
                client.vdi_close(handle)
        scrub = subprocess.run([sys.executable, "-m", "dog", "cluster", "scrub", "--json", "-p",
                                str(cluster.sheep[0].port)], capture_output=True, text=True,
                               timeout=120)
        assert json.loads(scrub.stdout)["damaged_copies"] == 0
        # Deleting a VDI frees space: writing goes on where it stopped.
        with cluster.client(0) as client:
            client.vdi_delete("filler")
            handle = client.vdi_open("disk", writable=True)["handle"]
            client.vdi_write(handle, written, b"after" * 1000)
            assert client.vdi_read(handle, written, 5000) == b"after" * 1000
            client.vdi_close(handle)
