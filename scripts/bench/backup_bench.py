"""Incremental backup: a 10 GiB VDI with 1% changed between two snapshots.

Timed in the same run, medians of the repetitions (interleaved):
- ours: `dog vdi export-diff --from-snap s1 v@s2` (rbd diff v1: only changed blocks);
- full: `dog vdi export v@s2 -` to /dev/null (the whole snapshot: what a backup costs
  without diffs);
- qcow2: the same pair as a qcow2 backing chain (s1's data in base.qcow2, the same
  writes in overlay.qcow2 on top), backed up incrementally by `qemu-img convert -B
  base.qcow2 overlay.qcow2 inc.qcow2`, which copies the overlay's clusters only.

Changes are 4 KiB writes at random offsets (1% of the VDI in all), the worst case
for a diff's granularity; the VDI is full of data before s1 (random 1 MiB blocks
repeated, so filling costs no CPU).
"""

from __future__ import annotations

import os
import random
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
MiB = 1 << 20
block = 4096


def _timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def run(quick: bool = False, reps: int | None = None) -> dict[str, Any]:
    reps = reps or (2 if quick else 3)
    size = (1 if quick else 10) * GiB
    changed_blocks = size // 100 // block
    rng = random.Random(17)
    fill = [rng.randbytes(MiB) for _ in range(8)]
    offsets = sorted(rng.sample(range(size // block), changed_blocks))
    work = tempfile.mkdtemp(prefix="sheep-bench-backup-")
    dog = [sys.executable, "-m", "dog"]
    times: dict[str, list[float]] = {"ours": [], "full": [], "qcow2": []}
    sizes: dict[str, int] = {}
    try:
        with LocalCluster(os.path.join(work, "cluster"), 3) as cluster:
            cluster.start()
            cluster.format(2)
            port = ["-p", str(cluster.sheep[0].port)]
            with cluster.client(0) as client:
                client.vdi_create("v", size)
                handle = client.vdi_open("v", writable=True)["handle"]
                for k, start in enumerate(range(0, size, MiB)):
                    client.vdi_write(handle, start, fill[k % len(fill)])
                client.flush()
                client.vdi_close(handle)
                client.vdi_snapshot("v", "s1")
                handle = client.vdi_open("v", writable=True)["handle"]
                commands = []
                for k, index in enumerate(offsets):
                    data = bytes([k % 251 + 1]) * block
                    client.vdi_write(handle, index * block, data)
                    commands.append(f"write -P {k % 251 + 1} {index * block} {block}\n")
                client.flush()
                client.vdi_close(handle)
                client.vdi_snapshot("v", "s2")
            # The qcow2 chain with the same two states: s1 straight from our NBD export
            # (no raw copy on disk), the same writes in an overlay.
            base = os.path.join(work, "base.qcow2")
            overlay = os.path.join(work, "overlay.qcow2")
            server = NbdServer([s.port for s in cluster.sheep], os.path.join(work, "nbdkit.log"),
                               readonly=True)
            try:
                subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                                server.uri("v@s1"), base], check=True)
            finally:
                server.stop()
            subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2",
                            overlay], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["qemu-io", "-f", "qcow2", overlay], input="".join(commands).encode(),
                           check=True, stdout=subprocess.DEVNULL)
            diff = os.path.join(work, "s1-s2.diff")
            inc = os.path.join(work, "inc.qcow2")
            for _ in range(reps):
                for path in (diff, inc):
                    if os.path.exists(path):
                        os.unlink(path)
                times["ours"].append(_timed([*dog, *port, "vdi", "export-diff", "--from-snap",
                                             "s1", "v@s2", diff]))
                # The full export streams to /dev/null: its cost is the reading and the
                # sending, and the disk here has no room for 10 GiB more.
                times["full"].append(_timed(["sh", "-c", " ".join(
                    [*dog, *port, "vdi", "export", "v@s2", "-", ">", "/dev/null"])]))
                times["qcow2"].append(_timed(["qemu-img", "convert", "-O", "qcow2", "-B", base,
                                              "-F", "qcow2", overlay, inc]))
            sizes = {"ours": os.path.getsize(diff), "full": size, "qcow2": os.path.getsize(inc)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: round(statistics.median(values), 3) for name, values in times.items()}
    result: dict[str, Any] = {
        "size_bytes": size, "changed_bytes": changed_blocks * block, "reps": reps,
        "seconds": medians, "output_bytes": sizes,
        "full_over_ours": round(medians["full"] / medians["ours"], 2),
        "qcow2_over_ours": round(medians["qcow2"] / medians["ours"], 2),
        "cluster": "3 local sheep, copies=2, 4 MiB objects"}
    print(f"incremental backup of a {size // GiB} GiB VDI with {changed_blocks} random 4 KiB"
          f" blocks changed ({changed_blocks * block // MiB} MiB), median s of {reps}")
    for name, label in (("ours", "export-diff"), ("full", "full export"),
                        ("qcow2", "qemu-img convert -B (qcow2 chain)")):
        print(f"  {label:36} {medians[name]:8.2f} s  {sizes[name] / MiB:9.1f} MiB written")
    print(f"  full export / export-diff {result['full_over_ours']}x,"
          f"  qemu-img / export-diff {result['qcow2_over_ours']}x")
    return result
