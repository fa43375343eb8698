"""The cost of checksums: the same fio workloads through the NBD export against two
3-sheep clusters (copies=3), one keeping a crc32c per 4 KiB block and verifying every
read, the other started with --no-checksums. Both run side by side on the same disk;
repetitions are interleaved (rep 1 with, rep 1 without, rep 2 ...) and medians
reported, with the ratio with/without. The background scrub is off on both.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from sheep.testing.cluster import LocalCluster  # noqa: E402
from sheep.testing.nbd import NbdServer  # noqa: E402

MiB = 1 << 20

# (name, fio options, the figure that counts)
WORKLOADS: list[tuple[str, list[str], str]] = [
    ("seq write 1M QD8", ["--rw=write", "--bs=1m", "--iodepth=8"], "bw"),
    ("seq read 1M QD8", ["--rw=read", "--bs=1m", "--iodepth=8"], "bw"),
    ("rand write 4K QD16", ["--rw=randwrite", "--bs=4k", "--iodepth=16"], "iops"),
    ("rand read 4K QD16", ["--rw=randread", "--bs=4k", "--iodepth=16"], "iops"),
]


def _fio(uri: str, options: list[str], size: int, runtime_s: int) -> dict[str, float]:
    result = subprocess.run(
        ["fio", "--output-format=json", "--name=bench", "--ioengine=nbd", f"--uri={uri}",
         f"--size={size}", f"--runtime={runtime_s}", "--randrepeat=0", *options],
        capture_output=True, text=True, check=True)
    job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] else job["read"]
    return {"bw": side["bw_bytes"], "iops": side["iops"]}


def _cluster(base: str, checksums: bool) -> LocalCluster:
    cluster = LocalCluster(base, 3)
    if not checksums:
        for node in cluster.sheep:
            node.extra_args = ["--no-checksums"]
    cluster.start()
    cluster.format(3)
    with cluster.client(0) as client:
        client.set_scrub(max_rate=0)
    return cluster


def run(quick: bool = False, reps: int | None = None) -> dict[str, Any]:
    reps = reps or (1 if quick else 3)
    size = (64 if quick else 256) * MiB
    runtime_s = 5 if quick else 12
    work = tempfile.mkdtemp(prefix="sheep-bench-checksums-")
    samples: dict[str, dict[str, list[float]]] = {
        name: {"on": [], "off": []} for name, _, _ in WORKLOADS}
    clusters: dict[str, LocalCluster] = {}
    servers: list[NbdServer] = []
    try:
        for mode in ("on", "off"):
            clusters[mode] = _cluster(os.path.join(work, mode), checksums=mode == "on")
        uris = {}
        for mode, cluster in clusters.items():
            with cluster.client(0) as client:
                client.vdi_create("bench", size)
            server = NbdServer([node.port for node in cluster.sheep],
                               os.path.join(work, f"nbdkit-{mode}.log"))
            servers.append(server)
            uris[mode] = server.uri("bench")
        for rep in range(reps):
            for name, options, figure in WORKLOADS:
                for mode in ("on", "off"):
                    value = _fio(uris[mode], options, size, runtime_s)[figure]
                    samples[name][mode].append(value)
                    print(f"rep {rep + 1} {name:<20} checksums {mode:<3} {value:,.0f} "
                          f"{'B/s' if figure == 'bw' else 'IOPS'}", flush=True)
    finally:
        for server in servers:
            server.stop()
        for cluster in clusters.values():
            cluster.close()
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, _, figure in WORKLOADS:
        on = statistics.median(samples[name]["on"])
        off = statistics.median(samples[name]["off"])
        rows.append({"workload": name, "figure": figure, "checksums_on": on,
                     "checksums_off": off, "ratio_on_off": round(on / off, 3)})
    print_table(rows)
    return {"benchmark": "checksums", "reps": reps, "size_bytes": size, "runtime_s": runtime_s,
            "copies": 3, "rows": rows, "samples": samples}


def print_table(rows: list[dict[str, Any]]) -> None:
    print("checksums on vs off, medians (through nbdkit + our plugin, fio nbd engine)")
    print(f"{'workload':<20} {'on':>14} {'off':>14} {'on/off':>7}")
    for row in rows:
        unit = "MiB/s" if row["figure"] == "bw" else "IOPS"
        scale = MiB if row["figure"] == "bw" else 1
        print(f"{row['workload']:<20} {row['checksums_on'] / scale:>10,.1f} {unit:<3} "
              f"{row['checksums_off'] / scale:>10,.1f} {unit:<3} {row['ratio_on_off']:>7}")
