"""Sparse export over NBD: a 100 GiB VDI with 100 MiB written, copied out.

Block status reports unwritten objects as holes, so nbdcopy (and qemu-img
convert) read only what was written. Baseline in the same run: nbdkit's file
plugin serving a local sparse raw file with the same data at the same offset,
copied with the same nbdcopy. Repetitions interleaved; medians reported.
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

from sheep.testing.cluster import LocalCluster, free_port  # noqa: E402
from sheep.testing.nbd import NbdServer  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


def _copy_s(uri: str, out: str) -> float:
    start = time.perf_counter()
    subprocess.run(["nbdcopy", uri, out], check=True)
    elapsed = time.perf_counter() - start
    os.unlink(out)
    return elapsed


def run(quick: bool = False, reps: int | None = None) -> dict[str, Any]:
    reps = reps or 3
    size = (10 if quick else 100) * GiB
    written = (10 if quick else 100) * MiB
    offset = size // 2
    work = tempfile.mkdtemp(prefix="sheep-bench-sparse-")
    data = os.urandom(written)
    raw = os.path.join(work, "baseline.raw")
    with open(raw, "wb") as file:
        file.truncate(size)
        file.seek(offset)
        file.write(data)
    baseline_port = free_port()
    baseline = subprocess.Popen(["nbdkit", "-f", "-p", str(baseline_port), "-i", "127.0.0.1",
                                 "file", raw], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    ours: list[float] = []
    theirs: list[float] = []
    try:
        with LocalCluster(os.path.join(work, "cluster"), 3) as cluster:
            cluster.start()
            cluster.format(2)
            with cluster.client(0) as client:
                client.vdi_create("sparse", size)
                handle = client.vdi_open("sparse", writable=True)["handle"]
                for start in range(0, written, 4 * MiB):
                    client.vdi_write(handle, offset + start, data[start:start + 4 * MiB])
                client.vdi_close(handle)
            server = NbdServer([s.port for s in cluster.sheep], os.path.join(work, "nbdkit.log"))
            try:
                out = os.path.join(work, "out.raw")
                for _ in range(reps):
                    ours.append(_copy_s(server.uri("sparse"), out))
                    theirs.append(_copy_s(f"nbd://127.0.0.1:{baseline_port}/", out))
            finally:
                server.stop()
    finally:
        baseline.terminate()
        baseline.wait(timeout=15)
        shutil.rmtree(work, ignore_errors=True)
    result = {"size_bytes": size, "written_bytes": written,
              "ours_s": round(statistics.median(ours), 3),
              "nbdkit_file_s": round(statistics.median(theirs), 3), "reps": reps,
              "cluster": "3 local sheep, copies=2, 4 MiB objects"}
    result["ratio_vs_file"] = round(result["ours_s"] / result["nbdkit_file_s"], 2)
    print(f"nbdcopy of a {size // GiB} GiB export with {written // MiB} MiB written, median s")
    print(f"  ours {result['ours_s']}  nbdkit file plugin {result['nbdkit_file_s']}"
          f"  ratio {result['ratio_vs_file']}")
    return result
