"""Per-VDI QoS with real sheep: `dog vdi qos` sets limits in the cluster state,
every sheep that serves the VDI enforces them in its scheduler, `dog vdi list`
shows them, and bad values get clear errors with the usage exit code.

Enforcement is checked by counting, not by timing thresholds on the machine's
speed: N operations at a limit of R a second with a saved burst of B cannot
finish in less than (N - R*B) / R seconds, however fast the sheep is; without
the limit they finish many times faster."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sheep.client import Client
from sheep.errors import EXIT_MISSING
from sheep.testing.cluster import LocalCluster

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    nodes = LocalCluster(str(tmp_path_factory.mktemp("qos")), nodes=2)
    ports = nodes.serve_metrics()
    try:
        nodes.start()
        nodes.format(2)
        with nodes.client(0) as client:
            for name in ("capped", "free", "shown"):
                client.vdi_create(name, 64 * MiB)
        nodes.metrics_ports = ports  # type: ignore[attr-defined]
        yield nodes
    finally:
        nodes.close()


def dog(cluster: LocalCluster, *args: str, node: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dog", *args, "-p", str(cluster.sheep[node].port)],
                          capture_output=True, text=True, timeout=60)


def writes(cluster: LocalCluster, node: int, name: str, count: int, depth: int = 4) -> float:
    """count 4 KiB writes to the VDI through sheep `node`, depth in flight on one
    connection (as the NBD plugin sends them); the seconds they took."""

    async def main() -> float:
        client = await Client.connect("127.0.0.1", cluster.sheep[node].port,
                                      credentials=cluster.credentials)
        try:
            handle = (await client.vdi_open(name, writable=True))["handle"]
            slots = asyncio.Semaphore(depth)
            data = b"q" * 4096

            async def one(index: int) -> None:
                async with slots:
                    await client.vdi_write(handle, index % 1024 * 4096, data)

            started = time.monotonic()
            await asyncio.gather(*(one(index) for index in range(count)))
            elapsed = time.monotonic() - started
            await client.vdi_close(handle)
            return elapsed
        finally:
            client.close()

    return asyncio.run(main())


def test_dog_vdi_qos_sets_shows_and_clears_limits(cluster):
    result = dog(cluster, "vdi", "qos", "shown")
    assert result.returncode == 0 and "no limits" in result.stdout, result
    result = dog(cluster, "vdi", "qos", "shown", "--iops", "300", "--bps", "10M", "--burst", "2")
    assert result.returncode == 0, result.stderr
    assert "300 IOPS, 10 MiB/s, burst 2s" in result.stdout
    value = json.loads(dog(cluster, "vdi", "qos", "shown", "--json").stdout)
    assert value == {"name": "shown", "qos": {"iops": 300, "bps": 10 * MiB, "burst": 2.0}}
    # Changing one limit keeps the others.
    dog(cluster, "vdi", "qos", "shown", "--iops", "500")
    listing = json.loads(dog(cluster, "vdi", "list", "--json", node=1).stdout)
    shown = next(item for item in listing if item["name"] == "shown")
    assert shown["qos"] == {"iops": 500, "bps": 10 * MiB, "burst": 2.0}
    table = dog(cluster, "vdi", "list").stdout
    assert "QoS" in table and "500 IOPS, 10 MiB/s, burst 2s" in table
    result = dog(cluster, "vdi", "qos", "shown", "--clear")
    assert result.returncode == 0 and "no limits" in result.stdout
    listing = json.loads(dog(cluster, "vdi", "list", "shown", "--json").stdout)
    assert listing[0]["qos"] is None


@pytest.mark.parametrize("args, message", [
    (["--iops", "-5"], "negative"),
    (["--iops", "12Q"], "not a whole number"),
    (["--bps", "12Q"], "12Q"),
    (["--burst", "0"], "0.01"),
    (["--iops", "5", "--clear"], "--clear takes no limits"),
])
def test_bad_qos_values_are_refused_with_dogs_usage_exit_code(cluster, args, message):
    result = dog(cluster, "vdi", "qos", "shown", *args)
    assert result.returncode == 64, result  # EX_USAGE, as for every usage error of dog
    assert message in result.stderr
    assert json.loads(dog(cluster, "vdi", "qos", "shown", "--json").stdout)["qos"] is None


def test_qos_of_a_missing_vdi_is_an_error(cluster):
    result = dog(cluster, "vdi", "qos", "nosuch", "--iops", "5")
    assert result.returncode == EXIT_MISSING
    assert "nosuch" in result.stderr


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_limit_holds_on_every_sheep_and_clears(cluster):
    assert dog(cluster, "vdi", "qos", "capped", "--iops", "40", "--burst", "0.1").returncode == 0
    count = 120
    # Set through sheep 0, enforced on sheep 1, which serves the writes.
    elapsed = writes(cluster, 1, "capped", count)
    assert elapsed >= (count - 40 * 0.1 - 1) / 40, elapsed
    # Meanwhile the queue depth gauge shows the writes held back (scraped while they wait).
    depth_seen = []

    def watch() -> None:
        for _ in range(50):
            depth_seen.append(value_of(scrape(cluster.metrics_ports[1]), "client"))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    writes(cluster, 1, "capped", 80)
    watcher.join()
    assert max(depth_seen) >= 1
    for name in ("client", "recovery", "verify", "scrub", "gc", "drain"):
        assert ("sheepdog_scheduler_queue_depth", (("class", name),)) in scrape(
            cluster.metrics_ports[0]), name
    assert dog(cluster, "vdi", "qos", "capped", "--clear").returncode == 0
    # Without the limit the same writes go many times faster than the limit allowed.
    assert writes(cluster, 1, "capped", count) < (count - 4) / 40 / 3


def value_of(samples: dict, name: str) -> float:
    return samples.get(("sheepdog_scheduler_queue_depth", (("class", name),)), 0.0)


def test_a_capped_vdi_leaves_an_uncapped_one_its_speed(cluster):
    solo = writes(cluster, 0, "free", 200)
    assert dog(cluster, "vdi", "qos", "capped", "--iops", "20", "--burst", "0.1").returncode == 0
    capped = threading.Thread(target=writes, args=(cluster, 0, "capped", 60))
    capped.start()
    try:
        time.sleep(0.3)  # its writes are waiting in the scheduler now
        beside = writes(cluster, 0, "free", 200)
    finally:
        capped.join()
        dog(cluster, "vdi", "qos", "capped", "--clear")
    # The capped VDI's waiting writes hold nothing back: same work, about the same time
    # (a generous factor: the box is shared, and the capped writes still run at 20/s).
    assert beside < 3 * solo + 0.5, (solo, beside)
