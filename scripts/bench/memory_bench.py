"""A sheep's memory with 100 GiB stored: one sheep (copies=1) holding 25,600 objects
of 4 MiB, the object count of 100 GiB. Its resident memory is measured after the
writes, after a flush, after a restart (a fresh process that lists and verifies
every object), and after a scrub (every block of every object checked against its
checksum table), with the peak over its life.

Each object has its full 4 MiB length and a full checksum table, but only its last
4 KiB holds written data (a sparse file): this machine has less free disk than
100 GiB. A sheep's memory follows the number of objects and their metadata, never
their data bytes (object data is not cached in the process; reads go to the page
cache), so the figure is the one of 100 GiB written in full. ``--full GIB`` writes
that many GiB densely instead, to check that claim on a smaller scale.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from sheep.client import Client  # noqa: E402
from sheep.oid import ObjectType, make_oid  # noqa: E402
from sheep.testing.cluster import LocalCluster  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
OBJECT_SIZE = 4 * MiB
TARGET_RSS_MIB = 200


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


async def _fill(port: int, count: int, dense: bool, concurrency: int = 64) -> None:
    client = await Client.connect("127.0.0.1", port)
    tail = os.urandom(4096)
    whole = os.urandom(OBJECT_SIZE) if dense else b""
    indexes = iter(range(count))

    async def worker() -> None:
        for index in indexes:
            oid = make_oid(ObjectType.RAW, 1, index)
            if dense:
                await client.create_and_write(oid, whole)
            else:
                await client.create_and_write(oid, tail, OBJECT_SIZE - len(tail))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await client.flush()
    finally:
        client.close()


def run(quick: bool = False, reps: int | None = None, stored: int | None = None,
        full: int | None = None) -> dict[str, Any]:
    dense = full is not None
    stored_bytes = (full or 0) * GiB if dense else (stored or (10 if quick else 100) * GiB)
    count = stored_bytes // OBJECT_SIZE
    root = tempfile.mkdtemp(prefix="sheep-bench-memory-")
    stages: dict[str, dict[str, int]] = {}
    try:
        cluster = LocalCluster(root, 1)
        cluster.start()
        cluster.format(1, OBJECT_SIZE)
        with cluster.client(0) as client:
            client.set_scrub(max_rate=0)
        node = cluster.sheep[0]
        assert node.process is not None
        stages["started"] = memory_kib(node.process.pid)
        started = time.monotonic()
        asyncio.run(_fill(node.port, count, dense))
        print(f"{count} objects ({stored_bytes / GiB:.0f} GiB{'' if dense else ', sparse'}) "
              f"written in {time.monotonic() - started:.0f} s", flush=True)
        stages["written and flushed"] = memory_kib(node.process.pid)
        cluster.stop(0)
        cluster.start(0)
        assert node.process is not None
        cluster.wait_recovered(timeout_s=600)
        stages["restarted, every copy verified"] = memory_kib(node.process.pid)
        started = time.monotonic()
        scrub = subprocess.run([sys.executable, "-m", "dog", "cluster", "scrub", "-p",
                                str(node.port), "--json"], capture_output=True, text=True)
        if scrub.returncode != 0:
            raise RuntimeError(f"scrub failed: {scrub.stderr[-1000:]}")
        print(f"scrub of every object: {time.monotonic() - started:.0f} s", flush=True)
        stages["after a full scrub"] = memory_kib(node.process.pid)
        cluster.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peak_kib = max(stage["VmHWM"] for stage in stages.values())
    print("\n| stage | RSS | anonymous | file-backed (LMDB map) |\n|---|---|---|---|")
    for name, stage in stages.items():
        print(f"| {name} | {stage['VmRSS'] / 1024:.0f} MiB | {stage['RssAnon'] / 1024:.0f} MiB "
              f"| {stage['RssFile'] / 1024:.0f} MiB |")
    print(f"\npeak RSS (either process): {peak_kib / 1024:.0f} MiB "
          f"(target: under {TARGET_RSS_MIB} MiB)")
    return {"objects": count, "stored_bytes": stored_bytes, "dense": dense, "stages_kib": stages,
            "peak_rss_kib": peak_kib, "target_rss_mib": TARGET_RSS_MIB}
