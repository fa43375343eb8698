"""scripts/local-cluster: start, status and stop a cluster by PID, on the local
driver and on a private ZooKeeper (--zookeeper)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import _require_zookeeper

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "local-cluster")


def free_base_port(count: int) -> int:
    """A base port with ``count`` free ports after it."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    pytest.skip("no run of free ports on this machine")


def script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_status_stop(tmp_path):
    base, metrics = free_base_port(3), free_base_port(3)
    directory = str(tmp_path / "lc")
    started = script("start", "-n", "3", "--copies", "2", "--dir", directory,
                     "--port", str(base), "--metrics", str(metrics))
    pids = []
    try:
        assert started.returncode == 0, started.stderr
        assert "formatted: 2 copies" in started.stdout
        pids = [int(Path(directory, str(i), "sheep.pid").read_text()) for i in range(3)]
        assert all(alive(pid) for pid in pids)
        for i in range(3):  # each sheep serves its metrics
            url = f"http://127.0.0.1:{metrics + i}/metrics"
            assert url in started.stdout
            with urllib.request.urlopen(url, timeout=10) as answer:
                assert "sheepdog_up 1.0" in answer.read().decode()
        status = script("status", "--dir", directory, "--port", str(base))
        assert status.returncode == 0
        assert "3 sheep running" in status.stdout
        assert status.stdout.count(f"127.0.0.1:{base}") >= 1
        again = script("start", "-n", "3", "--dir", directory, "--port", str(base),
                       "--metrics", str(metrics))
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        stopped = script("stop", "--dir", directory)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not any(alive(pid) for pid in pids)
    status = script("status", "--dir", directory, "--port", str(base))
    assert status.returncode == 1 and "0 sheep running" in status.stdout


def test_zookeeper(tmp_path):
    """--zookeeper: a private ZooKeeper in DIR/zookeeper, the sheep on it, and both
    stopped by PID. Two sheep keep it quick (the ZooKeeper JVM starts in about 1 s)."""
    _require_zookeeper()
    base, metrics = free_base_port(2), free_base_port(2)
    directory = tmp_path / "lc"
    started = script("start", "-n", "2", "--copies", "2", "--dir", str(directory),
                     "--port", str(base), "--metrics", str(metrics), "--zookeeper")
    pids: list[int] = []
    zookeeper_pid = None
    try:
        assert started.returncode == 0, started.stderr
        pid_path = directory / "zookeeper" / "zookeeper.pid"
        zookeeper_pid = int(pid_path.read_text())
        pids = [int((directory / str(i) / "sheep.pid").read_text()) for i in range(2)]
        assert alive(zookeeper_pid) and all(alive(pid) for pid in pids)
        assert "formatted: 2 copies" in started.stdout
        info = subprocess.run(
            [sys.executable, "-m", "dog", "--keyring",
             str(directory / "cluster" / "keyring"), "-p", str(base), "cluster", "info"],
            capture_output=True, text=True, timeout=30)
        assert info.returncode == 0, info.stderr
        assert "Cluster driver: zookeeper 127.0.0.1:" in info.stdout
        status = script("status", "--dir", str(directory), "--port", str(base))
        assert status.returncode == 0 and "zookeeper running" in status.stdout
    finally:
        stopped = script("stop", "--dir", str(directory))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert zookeeper_pid is not None and not alive(zookeeper_pid)
    assert not any(alive(pid) for pid in pids)


def test_zookeeper_refuses_a_local_cluster(tmp_path):
    """A DIR whose stores were made on the local driver is not moved onto ZooKeeper."""
    (tmp_path / "lc" / "0").mkdir(parents=True)
    result = script("start", "--dir", str(tmp_path / "lc"), "--zookeeper")
    assert result.returncode == 1 and "holds a cluster on the local driver" in result.stderr
    assert not (tmp_path / "lc" / "zookeeper").exists()


def test_bad_usage():
    result = script("bogus")
    assert result.returncode == 64 and "usage" in result.stderr
    result = script("start", "-n", "x")
    assert result.returncode == 64 and "-n takes a number" in result.stderr
