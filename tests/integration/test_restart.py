"""After dog cluster shutdown, the cluster serves again once the last epoch's nodes are
back (Sheepdog's rule), says what it waits for, and can be told to go on without."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from sheep.errors import Unavailable
from sheep.testing.cluster import LocalCluster


def dog(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dog", *args, "-p", str(port)],
                          capture_output=True, text=True, timeout=60)


def shut_down(cluster: LocalCluster) -> None:
    with cluster.client(0) as client:
        client.shutdown()
    for sheep in cluster.sheep:
        assert sheep.process is not None and sheep.process.wait(timeout=20) == 0


def write_kept_and_shut_down(cluster: LocalCluster) -> None:
    with cluster.client(0) as client:
        client.vdi_create("disk", 8 << 20)
        handle = client.vdi_open("disk", writable=True)["handle"]
        client.vdi_write(handle, 0, b"kept")
        client.vdi_close(handle)
    shut_down(cluster)


def test_a_partial_restart_waits_for_the_last_epochs_nodes(make_cluster):
    cluster: LocalCluster = make_cluster(3)
    cluster.format(3)
    write_kept_and_shut_down(cluster)
    cluster.start(0)
    cluster.start(2)
    port = cluster.sheep[0].port
    with cluster.client(0) as client, pytest.raises(Unavailable) as waiting:
        client.vdi_open("disk")
    assert "waiting for 1 node(s)" in str(waiting.value)
    info = dog(port, "cluster", "info")
    assert "waiting for 1 node(s) of the last epoch" in info.stdout
    failed = dog(port, "vdi", "read", "disk", "0", "4")
    assert failed.returncode == 1 and "recover force" in failed.stderr
    cluster.start(1)  # the last one: the cluster serves again
    with cluster.client(2) as client:
        assert client.vdi_read(client.vdi_open("disk")["handle"], 0, 4) == b"kept"
    assert json.loads(dog(port, "cluster", "info", "--json").stdout)["status"] == "ok"


def test_recover_force_goes_on_without_a_node_that_is_gone(make_cluster):
    cluster: LocalCluster = make_cluster(3)
    cluster.format(2)
    write_kept_and_shut_down(cluster)
    cluster.start(0)
    cluster.start(1)
    port = cluster.sheep[0].port
    forced = dog(port, "cluster", "recover", "force")
    assert forced.returncode == 0 and "gave up waiting for 1 node(s)" in forced.stdout
    assert "declared 1 node(s) lost" in forced.stdout  # nothing waits for its copies
    assert "Declared lost: " in dog(port, "cluster", "info").stdout
    assert dog(port, "cluster", "recover", "force").returncode == 64  # not waiting any more
    with cluster.client(1) as client:
        assert client.vdi_read(client.vdi_open("disk")["handle"], 0, 4) == b"kept"


def test_new_stores_on_a_cluster_log_that_saw_a_shutdown_start_and_serve(make_cluster):
    """The README's quickstart run twice: shut down, stores removed, the cluster log
    kept. New sheep with the old node ids replay the log, the old shutdown with it: it
    stopped the cluster they were not in, so they stay up and can be formatted anew."""
    cluster: LocalCluster = make_cluster(3)
    cluster.format(3)
    write_kept_and_shut_down(cluster)
    for sheep in cluster.sheep:
        shutil.rmtree(sheep.directory)
    cluster.start()
    time.sleep(1.0)
    assert all(sheep.process is not None and sheep.process.poll() is None
               for sheep in cluster.sheep), "a new sheep stopped on an old shutdown"
    port = cluster.sheep[0].port
    formatted = dog(port, "cluster", "format", "--copies", "3", "--force")
    assert formatted.returncode == 0, formatted.stderr
    with cluster.client(1) as client:
        client.vdi_create("fresh", 8 << 20)
        handle = client.vdi_open("fresh", writable=True)["handle"]
        client.vdi_write(handle, 0, b"new")
        assert client.vdi_read(handle, 0, 3) == b"new"
