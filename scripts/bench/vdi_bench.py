"""VDI benchmarks (issue: VDIs), each against its baseline in the same run.

1. Snapshot and clone latency of a VDI with 0, 1 GiB and 10 GiB written: the
   median must not grow with the data written (they are O(1)). Baseline in the
   same run: a qcow2 internal snapshot (qemu-img snapshot -c) of an image with
   the same data written, which also costs metadata only.
2. Random 4 KiB reads (queue depth 1) of a VDI at snapshot depth 1, 10 and 100,
   each snapshot followed by a few writes. Depth 100 must stay within 10% of
   depth 1. Baseline in the same run: a qcow2 backing chain of the same depth
   read by qemu-io (queue depth 1, the same offsets).

Repetitions are interleaved (rep 1 of every case, then rep 2, ...), and the
median is reported.
"""

from __future__ import annotations

import asyncio
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

from sheep.client import Client  # noqa: E402
from sheep.testing.cluster import LocalCluster  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


async def _fill(client: Client, name: str, size: int) -> None:
    """Write size bytes of non-zero data from offset 0, 16 MiB... in flight."""
    handle = (await client.vdi_open(name, writable=True))["handle"]
    chunk = os.urandom(4 * MiB)
    pending: set[asyncio.Task[None]] = set()
    for offset in range(0, size, len(chunk)):
        if len(pending) >= 8:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        pending.add(asyncio.ensure_future(client.vdi_write(handle, offset, chunk)))
    for task in pending:
        await task
    await client.vdi_close(handle)


def _qemu_io(image: str, commands: list[str]) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", image], input="\n".join(commands) + "\n",
                   text=True, check=True, stdout=subprocess.DEVNULL)


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


def snapshot_latency(cluster: LocalCluster, written: list[int], reps: int,
                     per_rep: int, work: str) -> dict[str, Any]:
    port = cluster.sheep[0].port
    snap_times: dict[int, list[float]] = {w: [] for w in written}
    clone_times: dict[int, list[float]] = {w: [] for w in written}
    qcow_times: dict[int, list[float]] = {w: [] for w in written}

    async def prepare() -> None:
        client = await Client.connect("127.0.0.1", port)
        for amount in written:
            await client.vdi_create(f"filled{amount}", max(amount, GiB) + GiB)
            await _fill(client, f"filled{amount}", amount)
        client.close()

    asyncio.run(prepare())
    images = {}
    for amount in written:
        image = os.path.join(work, f"filled{amount}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image,
                        str(max(amount, GiB) + GiB)], check=True)
        if amount:
            _qemu_io(image, [f"write -P 0x5a {offset} {64 * MiB}"
                             for offset in range(0, amount, 64 * MiB)])
        images[amount] = image

    async def measure(rep: int) -> None:
        client = await Client.connect("127.0.0.1", port)
        for amount in written:
            for index in range(per_rep):
                start = time.perf_counter()
                await client.vdi_snapshot(f"filled{amount}", f"r{rep}s{index}")
                snap_times[amount].append(time.perf_counter() - start)
                start = time.perf_counter()
                await client.vdi_clone(f"filled{amount}", f"r{rep}s{index}",
                                       f"clone{amount}r{rep}s{index}")
                clone_times[amount].append(time.perf_counter() - start)
        client.close()

    for rep in range(reps):
        asyncio.run(measure(rep))
        for amount in written:
            for index in range(per_rep):
                start = time.perf_counter()
                subprocess.run(["qemu-img", "snapshot", "-c", f"r{rep}s{index}",
                                images[amount]], check=True)
                qcow_times[amount].append(time.perf_counter() - start)
    rows = []
    for amount in written:
        rows.append({"written_bytes": amount,
                     "snapshot_ms": _median_ms(snap_times[amount]),
                     "clone_ms": _median_ms(clone_times[amount]),
                     "qcow2_internal_snapshot_ms": _median_ms(qcow_times[amount])})
    return {"rows": rows, "samples_per_case": reps * per_rep}


def read_vs_depth(cluster: LocalCluster, depths: list[int], reads: int, reps: int,
                  work: str) -> dict[str, Any]:
    """Every VDI (and qcow2 chain) holds the same data: a fully written 256 MiB base,
    then the same 400 scattered 4 KiB writes, spread over its ``depth`` snapshots."""
    port = cluster.sheep[0].port
    size = 256 * MiB
    rng = random.Random(1)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(reads)]
    later_writes = [rng.randrange(0, size // 4096) * 4096 for _ in range(400)]

    def spread(depth: int) -> list[list[int]]:
        return [later_writes[level::depth] for level in range(depth)]

    async def prepare() -> None:
        client = await Client.connect("127.0.0.1", port)
        for depth in depths:
            name = f"deep{depth}"
            await client.vdi_create(name, size)
            await _fill(client, name, size)
            handle = (await client.vdi_open(name, writable=True))["handle"]
            for level, writes in enumerate(spread(depth)):
                await client.vdi_snapshot(name, f"d{level}")
                for offset in writes:
                    await client.vdi_write(handle, offset, os.urandom(4096))
            await client.vdi_close(handle)
        client.close()

    asyncio.run(prepare())
    chains = {}
    for depth in depths:
        base = os.path.join(work, f"chain{depth}-0.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(size)], check=True)
        _qemu_io(base, [f"write -P 0x33 {offset} {64 * MiB}"
                        for offset in range(0, size, 64 * MiB)])
        top = base
        for level, writes in enumerate(spread(depth), start=1):
            layer = os.path.join(work, f"chain{depth}-{level}.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", top,
                            layer], check=True)
            _qemu_io(layer, [f"write -P 0x44 {offset} 4096" for offset in writes])
            top = layer
        chains[depth] = top

    ours: dict[int, list[float]] = {d: [] for d in depths}
    qcow: dict[int, list[float]] = {d: [] for d in depths}
    script = "\n".join(f"read {offset} 4096" for offset in offsets) + "\n"

    async def measure_ours(depth: int) -> float:
        client = await Client.connect("127.0.0.1", port)
        handle = (await client.vdi_open(f"deep{depth}"))["handle"]
        start = time.perf_counter()
        for offset in offsets:
            await client.vdi_read(handle, offset, 4096)
        elapsed = time.perf_counter() - start
        client.close()
        return reads / elapsed

    def measure_qcow(depth: int) -> float:
        def run(text: str) -> float:
            start = time.perf_counter()
            subprocess.run(["qemu-io", "-f", "qcow2", "-t", "none", chains[depth]],
                           input=text, text=True, check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - start
        startup = run("")
        return reads / max(run(script) - startup, 1e-6)

    for _ in range(reps):
        for depth in depths:
            ours[depth].append(asyncio.run(measure_ours(depth)))
            qcow[depth].append(measure_qcow(depth))
    rows = []
    for depth in depths:
        rows.append({"depth": depth, "iops": round(statistics.median(ours[depth])),
                     "qcow2_chain_iops": round(statistics.median(qcow[depth]))})
    first = rows[0]
    for row in rows:
        row["vs_depth_1"] = round(row["iops"] / first["iops"], 3)
        row["qcow2_vs_depth_1"] = round(row["qcow2_chain_iops"] / first["qcow2_chain_iops"], 3)
    return {"rows": rows, "reads_per_sample": reads, "reps": reps}


def run(quick: bool = False, reps: int | None = None) -> dict[str, Any]:
    reps = reps or 3
    work = tempfile.mkdtemp(prefix="sheep-bench-")
    written = [0, 256 * MiB, GiB] if quick else [0, GiB, 10 * GiB]
    depths = [1, 10, 100]
    try:
        with LocalCluster(work, 3) as cluster:
            cluster.start()
            cluster.format(3)
            latency = snapshot_latency(cluster, written, reps, per_rep=3 if quick else 5,
                                       work=work)
            print_latency(latency)
            reads = read_vs_depth(cluster, depths, reads=1000 if quick else 4000, reps=reps,
                                  work=work)
            print_reads(reads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"snapshot_latency": latency, "read_vs_snapshot_depth": reads,
            "cluster": "3 local sheep, copies=3, 4 MiB objects"}


def print_latency(result: dict[str, Any]) -> None:
    print("snapshot/clone latency, median ms (qcow2 internal snapshot as the baseline)")
    print(f"{'written':>10} {'snapshot':>10} {'clone':>10} {'qcow2 snap':>11}")
    for row in result["rows"]:
        print(f"{row['written_bytes'] / GiB:>8.2f}G {row['snapshot_ms']:>10} "
              f"{row['clone_ms']:>10} {row['qcow2_internal_snapshot_ms']:>11}")


def print_reads(result: dict[str, Any]) -> None:
    print("random 4 KiB reads, QD1, IOPS (qcow2 backing chain via qemu-io as the baseline)")
    print(f"{'depth':>6} {'ours':>8} {'vs d1':>6} {'qcow2':>8} {'vs d1':>6}")
    for row in result["rows"]:
        print(f"{row['depth']:>6} {row['iops']:>8} {row['vs_depth_1']:>6} "
              f"{row['qcow2_chain_iops']:>8} {row['qcow2_vs_depth_1']:>6}")
