"""Metrics (issue #14, part 6): `sheep --metrics-port` serves Prometheus text, parsed
here with prometheus-client's own parser, whose counters move with the VDI I/O the
sheep serves; `dog node stat` shows per-node rates and latencies from the same
counters; bad values are usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sheep.errors import EXIT_FAILURE, EXIT_USAGE
from sheep.testing.cluster import LocalCluster, free_port

MiB = 1 << 20


@pytest.fixture
def cluster(tmp_path):
    nodes = LocalCluster(str(tmp_path / "cluster"), 2)
    ports = nodes.serve_metrics()
    try:
        nodes.start()
        nodes.format(2)
        with nodes.client(0) as client:
            client.vdi_create("alice", 64 * MiB)
            client.vdi_create("bob", 64 * MiB)
        nodes.metrics_ports = ports  # type: ignore[attr-defined]
        yield nodes
    finally:
        nodes.close()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_counters_move_with_the_io_each_sheep_serves(cluster):
    port0, port1 = cluster.metrics_ports
    before = scrape(port0)
    assert value(before, "sheepdog_up") == 1.0
    assert value(before, "sheepdog_store_bytes", kind="capacity") > 0
    for name in ("sheepdog_recovery_objects_remaining", "sheepdog_recovery_bytes_total",
                 "sheepdog_damaged_copies_total", "sheepdog_flushes_total"):
        assert (name, ()) in before, name
    with cluster.client(0) as client:
        handle = client.vdi_open("alice", writable=True)["handle"]
        for index in range(10):
            client.vdi_write(handle, index * 65536, b"a" * 4096)
        for _ in range(3):
            client.vdi_read(handle, 0, 8192)
        client.flush(handle)
        client.vdi_close(handle)
    after = scrape(port0)
    assert value(after, "sheepdog_vdi_ops_total", vdi="alice", op="write") \
        - value(before, "sheepdog_vdi_ops_total", vdi="alice", op="write") == 10
    assert value(after, "sheepdog_vdi_bytes_total", vdi="alice", op="write") == 10 * 4096
    assert value(after, "sheepdog_vdi_ops_total", vdi="alice", op="read") == 3
    assert value(after, "sheepdog_vdi_bytes_total", vdi="alice", op="read") == 3 * 8192
    assert value(after, "sheepdog_vdi_ops_total", vdi="alice", op="flush") == 1
    # The flush reached this sheep: it holds copies of what was written (2 sheep).
    assert value(after, "sheepdog_flushes_total") - value(before, "sheepdog_flushes_total") == 1
    assert value(after, "sheepdog_vdi_latency_seconds_count", vdi="alice", op="write") == 10
    assert value(after, "sheepdog_vdi_latency_seconds_sum", vdi="alice", op="write") > 0
    assert value(after, "sheepdog_vdi_latency_seconds_bucket", vdi="alice", op="write",
                 le="+Inf") == 10
    assert value(after, "sheepdog_vdi_ops_total", vdi="bob", op="write") == 0
    assert value(after, "sheepdog_store_bytes", kind="used") \
        > value(before, "sheepdog_store_bytes", kind="used")
    # The other sheep was no gateway for any of it (a replica only): its VDI counters
    # stay at zero.
    other = scrape(port1)
    assert value(other, "sheepdog_vdi_ops_total", vdi="alice", op="write") == 0
    assert value(other, "sheepdog_up") == 1.0


def dog(cluster: LocalCluster, *args: str, check: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "dog", *args, "-p", str(cluster.sheep[0].port)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == check, (result.stdout, result.stderr)
    return result


def test_dog_node_stat_shows_the_rates_of_each_node(cluster):
    stop = threading.Event()

    def write() -> None:
        with cluster.client(1) as client:
            handle = client.vdi_open("bob", writable=True)["handle"]
            while not stop.is_set():
                client.vdi_write(handle, 0, b"b" * 4096)
                time.sleep(0.005)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.3)
        rows = json.loads(dog(cluster, "node", "stat", "--json", "-i", "1").stdout)
        human = dog(cluster, "node", "stat", "-i", "0.5").stdout
    finally:
        stop.set()
        writer.join()
    by_address = {row["address"]: row for row in rows}
    busy = by_address[f"127.0.0.1:{cluster.sheep[1].port}"]
    idle = by_address[f"127.0.0.1:{cluster.sheep[0].port}"]
    assert busy["write"]["ops_per_s"] > 20, busy
    assert busy["write"]["bytes_per_s"] == pytest.approx(busy["write"]["ops_per_s"] * 4096)
    assert busy["write"]["latency_ms"] > 0 and busy["read"]["latency_ms"] is None
    assert idle["write"]["ops_per_s"] == 0 and idle["status"] == "ok"
    assert human.splitlines()[0].split()[:4] == ["Id", "Address", "Read/s", "Read"]
    assert f"127.0.0.1:{cluster.sheep[1].port}" in human


def test_bad_values_are_usage_errors(cluster, tmp_path):
    for bad in ("-1", "0", "12Q"):
        result = dog(cluster, "node", "stat", "-i", bad, check=EXIT_USAGE)
        assert "--interval" in result.stderr, result.stderr
    for bad in ("0", "70000", "12Q"):
        result = subprocess.run([sys.executable, "-m", "sheep", str(tmp_path / "x"),
                                 "--metrics-port", bad], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == EXIT_USAGE and "--metrics-port" in result.stderr, result
    # A port in use (this cluster's own metrics port) is refused at start, saying so.
    taken = cluster.metrics_ports[0]
    result = subprocess.run([sys.executable, "-m", "sheep", str(tmp_path / "y"), "-p",
                             str(free_port()), "-c", f"local:{tmp_path / 'other'}",
                             "--metrics-port", str(taken)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_FAILURE
    assert f"port {taken} on 127.0.0.1 is already in use" in result.stderr, result.stderr
