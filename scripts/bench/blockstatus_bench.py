"""Block status with snapshots and clones: nbdinfo --map on a large, nearly empty VDI.

Issue #18's target: on a 64 GiB VDI with one snapshot and a clone, `nbdinfo
--map` takes at most 2x as long as on the same VDI before the snapshot, and a
chain 100 deep changes nothing. Measured in one run, over one nbdkit:

- plain: a VDI with 3 bytes written and no snapshot (the "before");
- snapshotted: the same, after one snapshot; and its clone;
- deep: a VDI snapshotted 100 times (a write between each), and a clone of
  its latest snapshot.

Repetitions interleaved; medians reported, with each one's ratio to plain.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from sheep.testing.cluster import LocalCluster  # noqa: E402
from sheep.testing.nbd import NbdServer  # noqa: E402

GiB = 1 << 30


def _map_s(uri: str) -> float:
    start = time.perf_counter()
    subprocess.run(["nbdinfo", "--map", uri], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run(quick: bool = False, reps: int | None = None) -> dict[str, Any]:
    reps = reps or (3 if quick else 5)
    size = (64 if quick else 256) * GiB
    depth = 100
    work = tempfile.mkdtemp(prefix="sheep-bench-blockstatus-")
    times: dict[str, list[float]] = {}
    try:
        with LocalCluster(os.path.join(work, "cluster"), 3) as cluster:
            cluster.start()
            cluster.format(2)
            with cluster.client(0) as client:
                for name in ("plain", "snapped", "deep"):
                    client.vdi_create(name, size)
                    handle = client.vdi_open(name, writable=True)["handle"]
                    client.vdi_write(handle, 0, b"hi\n")
                    client.vdi_close(handle)
                client.vdi_snapshot("snapped", "s1")
                client.vdi_clone("snapped", "s1", "snapped-clone")
                for level in range(depth):
                    handle = client.vdi_open("deep", writable=True)["handle"]
                    client.vdi_write(handle, (level + 1) * 4096, b"d")
                    client.vdi_close(handle)
                    client.vdi_snapshot("deep", f"d{level}")
                client.vdi_clone("deep", f"d{depth - 1}", "deep-clone")
            server = NbdServer([s.port for s in cluster.sheep], os.path.join(work, "nbdkit.log"))
            try:
                names = ["plain", "snapped", "snapped-clone", "deep", "deep-clone"]
                for name in names:  # warm: the first open of each pays for it
                    _map_s(server.uri(name))
                for _ in range(reps):
                    for name in names:
                        times.setdefault(name, []).append(_map_s(server.uri(name)))
            finally:
                server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: round(statistics.median(values), 3) for name, values in times.items()}
    plain = medians["plain"]
    result: dict[str, Any] = {
        "size_bytes": size, "depth": depth, "reps": reps, "median_s": medians,
        "ratio_vs_plain": {name: round(value / plain, 2) for name, value in medians.items()},
        "cluster": "3 local sheep, copies=2, 4 MiB objects; one nbdkit with our plugin"}
    print(f"nbdinfo --map of a {size // GiB} GiB VDI with a few bytes written, median s")
    for name, value in medians.items():
        print(f"  {name:14} {value:7.3f}  x{result['ratio_vs_plain'][name]}")
    return result
