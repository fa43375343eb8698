"""Recovery benchmark (issue: recovery measured): restoring 3 copies after a node loss.

A fresh cluster of 4 local sheep (copies=3) gets a VDI with ``size`` bytes of
non-zero data written (one random 4 MiB block, each copy headed by its offset).
Then one sheep is killed with SIGKILL, and the clock runs from the kill until
every survivor reports, in its NODE_INFO recovery status, a finished pass at
the new epoch (all at the same epoch, later than before the kill, not running,
nothing failed). The time is split into detection (the kill until every
survivor is at the new epoch: the local driver's lock probe and log poll) and
the recovery proper. Outside the timed part, the object files in the stores
are checked: every object that existed before the kill has 3 copies on the 3
survivors, and the copies are identical. Bytes recovered are the bytes the
survivors' object files gained (allocated blocks, after minus before).

Two cases, each on its own fresh cluster: no client load, and a client doing
random 4 KiB reads and writes (half each, queue depth 1) on the VDI the whole
time; for the latter the client's ops/s before the kill and during recovery
are reported too.

A third case, *join*: 3 sheep with the VDI, then a fourth joins with no client
running. The clock runs from the newcomer serving until every sheep's pass at
the new epoch is over; *recover* is the part until the newcomer's own pass is
(its share fetched and synced), the rest is the others dropping their surplus
copies. Recovered bytes are the newcomer's object files; afterwards every
object has exactly 3 identical copies.

Baseline in the same run, on the same filesystem: ``cp`` of a file of the
bytes recovered. Both sides start from the same point: ``sync`` first, so
nothing is dirty, and the source in the page cache (just written). Neither
syncs its copies (the store does not fsync recovered objects; a client's flush
does), so plain ``cp`` is the ceiling compared against; ``cp`` followed by an
fsync of the copy is reported for reference. Repetitions are interleaved (rep
1 of each case and the baseline, then rep 2, ...) and the median is reported.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from sheep.client import Client, SyncClient  # noqa: E402
from sheep.errors import SheepError  # noqa: E402
from sheep.size import format_size  # noqa: E402
from sheep.testing.cluster import LocalCluster  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
block_bytes = 4096
chunk_bytes = 4 * MiB
writes_in_flight_max = 8
nodes = 4
copies = 3
victim = nodes - 1  # the sheep killed; clients talk to sheep 0
poll_interval_s = 0.1  # NODE_INFO scans the store, so not much more often than this
timeline_step_s = 0.25  # the client's ops are counted per step from the kill
load_warmup_s = 1.0  # the client connects and opens the VDI
load_before_kill_s = 5.0  # the client's ops/s with all nodes up, measured this long
recovery_timeout_base_s = 120.0
recovery_timeout_rate_bytes_per_s = 4 * MiB  # slower than this counts as hung
free_margin_bytes = GiB
cp_reps_per_rep = 3
size_default_bytes = 2 * GiB
size_quick_bytes = 256 * MiB
vdi_name = "recovery"


async def _fill(port: int, size: int) -> None:
    """Write size bytes from offset 0, one 4 MiB chunk each, several in flight."""
    client = await Client.connect("127.0.0.1", port)
    await client.vdi_create(vdi_name, size)
    handle = (await client.vdi_open(vdi_name, writable=True))["handle"]
    base = os.urandom(chunk_bytes)
    pending: set[asyncio.Task[None]] = set()
    for offset in range(0, size, chunk_bytes):
        if len(pending) >= writes_in_flight_max:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        chunk = offset.to_bytes(8, "little") + base[8:min(chunk_bytes, size - offset)]
        pending.add(asyncio.ensure_future(client.vdi_write(handle, offset, chunk)))
    for task in pending:
        await task
    await client.vdi_close(handle)
    client.close()


def _store_objects(directory: str) -> dict[int, int]:
    """The object files under a store directory: oid -> bytes allocated."""
    objects: dict[int, int] = {}
    top = os.path.join(directory, "obj")
    for sub in os.scandir(top):
        if not sub.is_dir():
            continue
        for entry in os.scandir(sub.path):
            try:
                oid = int(entry.name, 16)
            except ValueError:
                continue  # a temporary file
            objects[oid] = entry.stat().st_blocks * 512
    return objects


def _digest(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha1").hexdigest()


@dataclass
class ClientLoad:
    """Random 4 KiB reads and writes at queue depth 1 on one thread, each op timed."""

    port: int
    size: int
    stop: threading.Event = field(default_factory=threading.Event)
    ops: list[tuple[float, float, bool]] = field(default_factory=list)  # end, latency, write
    errors: list[tuple[float, str]] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="client-load", daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the client load did not stop"

    def _run(self) -> None:
        rng = random.Random(7)
        data = os.urandom(block_bytes)
        blocks = self.size // block_bytes
        client = SyncClient("127.0.0.1", self.port)
        handle = client.vdi_open(vdi_name, writable=True)["handle"]
        try:
            while not self.stop.is_set():
                offset = rng.randrange(blocks) * block_bytes
                write = rng.random() < 0.5
                start = time.perf_counter()
                try:
                    if write:
                        client.vdi_write(handle, offset, data)
                    else:
                        client.vdi_read(handle, offset, block_bytes)
                except SheepError as error:
                    self.errors.append((time.perf_counter(), f"{type(error).__name__}: {error}"))
                    time.sleep(0.05)
                    continue
                end = time.perf_counter()
                self.ops.append((end, end - start, write))
        finally:
            client.close()

    def timeline(self, start: float, end: float, step_s: float) -> list[int]:
        """Ops completed in each step from start to end: where the client stalled."""
        counts = [0] * max(1, int((end - start) / step_s + 0.999))
        for op in self.ops:
            if start <= op[0] < end:
                counts[int((op[0] - start) / step_s)] += 1
        return counts

    def window(self, start: float, end: float) -> dict[str, Any]:
        chosen = [op for op in self.ops if start <= op[0] <= end]
        seconds = max(end - start, 1e-9)
        result: dict[str, Any] = {
            "seconds": round(seconds, 3), "ops": len(chosen),
            "ops_per_s": round(len(chosen) / seconds, 1),
            "writes": sum(1 for op in chosen if op[2]),
            "errors": sum(1 for error in self.errors if start <= error[0] <= end)}
        for kind, ops in (("", chosen), ("read_", [op for op in chosen if not op[2]]),
                          ("write_", [op for op in chosen if op[2]])):
            result.update(_latency_ms(kind, sorted(op[1] for op in ops)))
        return result


def _latency_ms(prefix: str, latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    return {f"{prefix}latency_ms_p50": round(latencies[len(latencies) // 2] * 1000, 2),
            f"{prefix}latency_ms_p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
            f"{prefix}latency_ms_max": round(latencies[-1] * 1000, 2)}


def _recovery_done(infos: list[dict[str, Any]], epoch_before: int) -> bool:
    epochs = {info["epoch"] for info in infos}
    if len(epochs) != 1 or epochs.pop() <= epoch_before:
        return False
    return all(info["recovery"] is not None and info["recovery"]["epoch"] == info["epoch"]
               and not info["recovery"]["running"] and info["recovery"]["failed"] == 0
               for info in infos)


def _wait_recovered(clients: list[SyncClient], epoch_before: int, killed_at: float,
                    timeout_s: float) -> tuple[float, float, list[dict[str, Any]]]:
    """Poll the survivors until recovery is done: (detected at, done at, their infos)."""
    detected_at = 0.0
    infos: list[dict[str, Any]] = []
    while time.perf_counter() - killed_at < timeout_s:
        now = time.perf_counter()
        infos = [client.node_info() for client in clients]
        if not detected_at and all(info["epoch"] > epoch_before for info in infos):
            detected_at = now
        if _recovery_done(infos, epoch_before):
            return detected_at or now, now, infos
        time.sleep(poll_interval_s)
    statuses = [{"epoch": info["epoch"], "recovery": info["recovery"]} for info in infos]
    raise RuntimeError(f"recovery not done {timeout_s:.0f} s after the kill: {statuses}")


def _cpu_s(cluster: LocalCluster, indexes: list[int]) -> float:
    """User plus system CPU seconds the sheep have used so far (from /proc)."""
    total = 0
    for index in indexes:
        process = cluster.sheep[index].process
        assert process is not None
        with open(f"/proc/{process.pid}/stat") as file:
            fields = file.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
    return total / os.sysconf("SC_CLK_TCK")


def _verify(cluster: LocalCluster, indexes: list[int], oids: set[int],
            expected: int | None = None) -> dict[str, int]:
    """Count objects with other than `expected` copies on these sheep (default: one on
    each), and objects whose copies differ."""
    wanted = len(indexes) if expected is None else expected
    missing = differing = 0
    for oid in sorted(oids):
        paths = [os.path.join(cluster.sheep[index].directory, "obj", f"{oid:016x}"[-2:],
                              f"{oid:016x}") for index in indexes]
        present = [path for path in paths if os.path.exists(path)]
        if len(present) != wanted:
            missing += 1
            print(f"  object {oid:016x}: {len(present)} copies on sheep {indexes}, not {wanted}")
            continue
        if len({_digest(path) for path in present}) != 1:
            differing += 1
            print(f"  object {oid:016x}: its copies differ")
    return {"objects_missing_a_copy": missing, "objects_with_differing_copies": differing}


def _print_log_tails(cluster: LocalCluster, lines: int = 15) -> None:
    for node in cluster.sheep:
        for name in ("sheep.log", "stderr.log"):
            path = os.path.join(node.directory, name)
            if os.path.exists(path):
                with open(path, errors="replace") as file:
                    tail = file.readlines()[-lines:]
                print(f"--- sheep {node.index} {name} (last {len(tail)} lines)")
                print("".join(tail), end="")


def recover_once(work: str, size: int, load: bool) -> dict[str, Any]:
    """One fresh cluster: fill, kill a sheep, time the recovery, verify; the cluster goes."""
    return _on_filled_cluster(work, nodes, size, lambda cluster, fill_s: _kill_and_recover(
        cluster, size, load, fill_s))


def join_once(work: str, size: int) -> dict[str, Any]:
    """One fresh cluster of nodes - 1 sheep: fill, then a new sheep joins with no
    client running. Timed from the newcomer serving (its start-up is not recovery)
    until every sheep's pass at the new epoch is over: *fetch* until the newcomer's
    own pass (its share fetched and synced), *total* until the others dropped the
    surplus copies too. Then every object must have its copies, identical, on the
    sheep the new placement gives it."""

    def joined(cluster: LocalCluster, _: float) -> dict[str, Any]:
        os.sync()
        return _timed_join(cluster, size)

    return _on_filled_cluster(work, nodes - 1, size, joined)


def _on_filled_cluster(work: str, count: int, size: int,
                       then: Callable[[LocalCluster, float], dict[str, Any]]) -> dict[str, Any]:
    """A fresh cluster of count sheep with the VDI written (size bytes), given to then
    with the seconds the fill took; the sheep's log tails if then fails."""
    base = tempfile.mkdtemp(prefix="cluster-", dir=work)
    try:
        with LocalCluster(base, count) as cluster:
            cluster.start()
            cluster.format(copies)
            start = time.perf_counter()
            asyncio.run(_fill(cluster.sheep[0].port, size))
            fill_s = time.perf_counter() - start
            try:
                return then(cluster, fill_s)
            except BaseException:
                _print_log_tails(cluster)
                raise
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _timed_join(cluster: LocalCluster, size: int) -> dict[str, Any]:
    clients = [cluster.client(node.index) for node in cluster.sheep]
    try:
        epoch_before = clients[0].node_info()["epoch"]
        oids = set().union(*(_store_objects(node.directory) for node in cluster.sheep))
        newcomer = cluster.add()
        cluster.start(newcomer.index)  # returns once it serves
        started = time.perf_counter()
        cpu_before_s = _cpu_s(cluster, [node.index for node in cluster.sheep])
        clients.append(cluster.client(newcomer.index))
        timeout_s = recovery_timeout_base_s + size / recovery_timeout_rate_bytes_per_s
        fetched_at = 0.0
        while True:
            now = time.perf_counter()
            infos = [client.node_info() for client in clients]
            if not fetched_at and _recovery_done(infos[-1:], epoch_before):
                fetched_at = now
            if _recovery_done(infos, epoch_before):
                break
            if now - started > timeout_s:
                raise RuntimeError(f"the join's recovery not done in {timeout_s:.0f} s: "
                                   f"{[info['recovery'] for info in infos]}")
            time.sleep(poll_interval_s)
        cpu_s = _cpu_s(cluster, [node.index for node in cluster.sheep]) - cpu_before_s
        epoch = infos[0]["epoch"]
    finally:
        for client in clients:
            client.close()
    gained = _store_objects(newcomer.directory)
    fetch_s, total_s = fetched_at - started, now - started
    recovered = sum(gained.values())
    return {
        "client_load": False, "written_bytes": size, "objects": len(oids),
        "copies_recovered": len(gained), "recovered_bytes": recovered,
        "epoch_before": epoch_before, "epoch_after": epoch, "detect_s": 0.0,
        "recover_s": round(fetch_s, 3), "total_s": round(total_s, 3),
        "mib_per_s": round(recovered / MiB / total_s, 1),
        "mib_per_s_after_detect": round(recovered / MiB / max(fetch_s, 1e-9), 1),
        "survivors_cores_busy": round(cpu_s / total_s, 2),
        **_verify(cluster, [node.index for node in cluster.sheep], oids, copies)}


@dataclass
class Timings:
    epoch_before: int
    killed_at: float
    detected_at: float
    done_at: float
    load_start: float
    load_average: float
    survivors_cpu_s: float
    infos: list[dict[str, Any]]


def _timed_kill(cluster: LocalCluster, survivors: list[int], size: int,
                client_load: ClientLoad | None) -> Timings:
    """Kill the victim and poll the survivors until their recovery is done."""
    clients = [cluster.client(index) for index in survivors]
    try:
        epoch_before = clients[0].node_info()["epoch"]
        load_start = time.perf_counter()
        if client_load is not None:
            client_load.start()
            time.sleep(load_warmup_s)
            load_start = time.perf_counter()
            time.sleep(load_before_kill_s)
        timeout_s = recovery_timeout_base_s + size / recovery_timeout_rate_bytes_per_s
        load_average = os.getloadavg()[0]
        cpu_before_s = _cpu_s(cluster, survivors)
        killed_at = time.perf_counter()
        cluster.kill(victim)
        detected_at, done_at, infos = _wait_recovered(clients, epoch_before, killed_at, timeout_s)
        cpu_s = _cpu_s(cluster, survivors) - cpu_before_s
    finally:
        if client_load is not None and client_load.thread is not None:
            client_load.finish()
        for client in clients:
            client.close()
    return Timings(epoch_before, killed_at, detected_at, done_at, load_start, load_average, cpu_s, infos)


def _kill_and_recover(cluster: LocalCluster, size: int, load: bool,
                      fill_s: float) -> dict[str, Any]:
    survivors = [node.index for node in cluster.sheep if node.index != victim]
    before = {node.index: _store_objects(node.directory) for node in cluster.sheep}
    oids = set().union(*before.values())
    os.sync()  # the fill's writeback must not run into the timed part
    client_load = ClientLoad(cluster.sheep[0].port, size) if load else None
    timings = _timed_kill(cluster, survivors, size, client_load)
    after = {index: _store_objects(cluster.sheep[index].directory) for index in survivors}
    gained = [oid for index in survivors for oid in after[index] if oid not in before[index]]
    recovered_bytes = sum(after[index][oid] - before[index].get(oid, 0)
                          for index in survivors for oid in after[index])
    total_s = timings.done_at - timings.killed_at
    recover_s = timings.done_at - timings.detected_at
    result: dict[str, Any] = {
        "client_load": load, "written_bytes": size, "fill_s": round(fill_s, 2),
        "objects": len(oids), "objects_on_victim": len(before[victim]),
        "copies_recovered": len(gained), "recovered_bytes": recovered_bytes,
        "epoch_before": timings.epoch_before, "epoch_after": timings.infos[0]["epoch"],
        "detect_s": round(timings.detected_at - timings.killed_at, 3),
        "recover_s": round(recover_s, 3), "total_s": round(total_s, 3),
        "mib_per_s": round(recovered_bytes / MiB / total_s, 1),
        "mib_per_s_after_detect": round(recovered_bytes / MiB / max(recover_s, 1e-9), 1),
        "survivors_cpu_s": round(timings.survivors_cpu_s, 2),
        "survivors_cores_busy": round(timings.survivors_cpu_s / total_s, 2),
        "load_average_at_kill": timings.load_average,
        "survivor_status": [info["recovery"] for info in timings.infos],
        **_verify(cluster, survivors, oids)}
    if client_load is not None:
        result.update(_client_figures(client_load, timings))
    return result


def _client_figures(client_load: ClientLoad, timings: Timings) -> dict[str, Any]:
    killed_at, detected_at, done_at = timings.killed_at, timings.detected_at, timings.done_at
    return {
        "client_before_kill": client_load.window(timings.load_start, killed_at),
        "client_during_recovery": client_load.window(killed_at, done_at),
        "client_until_detected": client_load.window(killed_at, detected_at),
        "client_after_detected": client_load.window(detected_at, done_at),
        "client_ops_per_step_from_kill": client_load.timeline(killed_at, done_at,
                                                              timeline_step_s),
        "client_errors_sample": [text for _, text in client_load.errors[:5]]}


def _write_file(path: str, size: int) -> None:
    base = os.urandom(chunk_bytes)
    with open(path, "wb") as file:
        for offset in range(0, size, chunk_bytes):
            file.write(offset.to_bytes(8, "little") + base[8:min(chunk_bytes, size - offset)])


def cp_once(source: str, target: str) -> tuple[float, float]:
    """(cp seconds, cp plus fsync of the copy seconds), from a synced, cached start."""
    os.sync()
    start = time.perf_counter()
    subprocess.run(["cp", source, target], check=True)
    copied = time.perf_counter()
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    synced = time.perf_counter()
    os.unlink(target)
    return copied - start, synced - start


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians over the reps of a case (the reps themselves stay in "samples")."""
    summary: dict[str, Any] = {"client_load": rows[0]["client_load"], "reps": len(rows)}
    for key in ("copies_recovered", "recovered_bytes", "detect_s", "recover_s", "total_s",
                "mib_per_s", "mib_per_s_after_detect", "survivors_cores_busy"):
        summary[key] = _median([row[key] for row in rows])
    for key in ("objects_missing_a_copy", "objects_with_differing_copies"):
        summary[key] = sum(row[key] for row in rows)
    if summary["client_load"]:
        for key, window in (("client_ops_per_s_before_kill", "client_before_kill"),
                            ("client_ops_per_s_during_recovery", "client_during_recovery")):
            summary[key] = _median([row[window]["ops_per_s"] for row in rows])
        for key in ("read_latency_ms_p50", "write_latency_ms_p50"):
            summary[f"client_{key}_during_recovery"] = _median(
                [row["client_during_recovery"].get(key, 0.0) for row in rows])
        summary["client_latency_ms_max_during_recovery"] = max(
            row["client_during_recovery"].get("latency_ms_max", 0.0) for row in rows)
        summary["client_errors"] = sum(row["client_during_recovery"]["errors"] for row in rows)
    return summary


def _check_space(work: str, size: int) -> None:
    # copies=3 of the data, the victim's share recovered, and the baseline's source and copy
    needed = size * copies + size * copies // nodes + 2 * size + free_margin_bytes
    free = shutil.disk_usage(work).free
    if free < needed:
        raise SystemExit(f"recovery benchmark: {format_size(free)} free under {work}, "
                         f"needs {format_size(needed)}; use --recovery-size or TMPDIR")


def _filesystem(path: str) -> str:
    """The type of the filesystem holding path, from the longest mount point above it."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/mounts") as file:
        for line in file:
            fields = line.split()
            mount = fields[1]
            inside = path == mount or path.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, fields[2]
    return kind


def _source_state() -> dict[str, Any]:
    """The commit measured and the files changed on top of it (the working tree runs)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout
    return {"commit": git("rev-parse", "HEAD").strip(),
            "modified": [line[3:] for line in git("status", "--porcelain", "sheep").splitlines()]}


def run(quick: bool = False, reps: int | None = None, size: int | None = None) -> dict[str, Any]:
    reps = reps or (1 if quick else 3)
    size = size or (size_quick_bytes if quick else size_default_bytes)
    assert size % block_bytes == 0 and size >= chunk_bytes
    source_state = _source_state()  # each cluster's sheep import the tree as it is then
    work = tempfile.mkdtemp(prefix="sheep-bench-recovery-")
    filesystem = _filesystem(work)
    cases: dict[str, list[dict[str, Any]]] = {"no_load": [], "client_load": [], "join": []}
    cp_s: list[float] = []
    cp_fsync_s: list[float] = []
    source = os.path.join(work, "baseline.src")
    try:
        _check_space(work, size)
        for rep in range(reps):
            print(f"rep {rep + 1}/{reps}: no client load", flush=True)
            cases["no_load"].append(recover_once(work, size, load=False))
            print_case(cases["no_load"][-1])
            if rep == 0:
                _write_file(source, cases["no_load"][0]["recovered_bytes"])
            for _ in range(cp_reps_per_rep):
                copied, synced = cp_once(source, os.path.join(work, "baseline.dst"))
                cp_s.append(copied)
                cp_fsync_s.append(synced)
            print(f"rep {rep + 1}/{reps}: with client load", flush=True)
            cases["client_load"].append(recover_once(work, size, load=True))
            print_case(cases["client_load"][-1])
            print(f"rep {rep + 1}/{reps}: a sheep joins, no client", flush=True)
            cases["join"].append(join_once(work, size))
            print_case(cases["join"][-1])
        baseline_bytes = os.path.getsize(source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    baseline = {"bytes": baseline_bytes, "samples": len(cp_s), "cp_s": _median(cp_s),
                "cp_fsync_s": _median(cp_fsync_s)}
    result: dict[str, Any] = {
        "written_bytes": size, "reps": reps, "filesystem": filesystem,
        "cluster": f"{nodes} local sheep, copies={copies}, 4 MiB objects; sheep {victim} "
                   "killed (SIGKILL); clients on sheep 0",
        "samples": cases, "cp": baseline, "source": source_state}
    summarize(result)
    print_result(result)
    return result


def summarize(result: dict[str, Any]) -> None:
    """Add the medians and ratios, from the samples and cp times, to a result."""
    baseline = result["cp"]
    baseline["cp_mib_per_s"] = round(baseline["bytes"] / MiB / baseline["cp_s"], 1)
    baseline["cp_fsync_mib_per_s"] = round(baseline["bytes"] / MiB / baseline["cp_fsync_s"], 1)
    for name in ("no_load", "client_load", "join"):
        if name not in result["samples"]:
            continue  # a result from before the join case
        result[name] = _summary(result["samples"][name])
        result[name]["vs_cp"] = round(result[name]["mib_per_s"] / baseline["cp_mib_per_s"], 3)


def print_case(row: dict[str, Any]) -> None:
    print(f"  {row['copies_recovered']} copies, {format_size(row['recovered_bytes'])} recovered "
          f"in {row['total_s']} s (detect {row['detect_s']} s): {row['mib_per_s']} MiB/s; "
          f"survivors busy {row['survivors_cores_busy']} cores; missing "
          f"{row['objects_missing_a_copy']}, differing {row['objects_with_differing_copies']}",
          flush=True)
    if row["client_load"]:
        before, during = row["client_before_kill"], row["client_during_recovery"]
        print(f"  client 4 KiB ops/s: {before['ops_per_s']} before the kill, "
              f"{during['ops_per_s']} from the kill to the end of recovery "
              f"({row['client_until_detected']['ops_per_s']} until the new epoch, "
              f"{row['client_after_detected']['ops_per_s']} after; max latency "
              f"{during.get('latency_ms_max')} ms, {during['errors']} errors)", flush=True)


def print_result(result: dict[str, Any]) -> None:
    cp = result["cp"]
    print(f"recovery of a {format_size(result['written_bytes'])} VDI after a node loss, "
          f"median of {result['reps']} (cp of {format_size(cp['bytes'])} as the ceiling)")
    print(f"{'case':>12} {'detect s':>9} {'total s':>8} {'MiB/s':>7} {'vs cp':>6} {'client ops/s':>13}")
    for name in ("no_load", "client_load", "join"):
        row = result[name]
        ops = row["client_ops_per_s_during_recovery"] if row["client_load"] else "-"
        print(f"{name:>12} {row['detect_s']:>9} {row['total_s']:>8} {row['mib_per_s']:>7} "
              f"{row['vs_cp']:>6} {ops:>13}")
    join = result["join"]
    print(f"{'join':>12}: the newcomer's share fetched in {join['recover_s']} s "
          f"({join['mib_per_s_after_detect']} MiB/s, "
          f"{join['mib_per_s_after_detect'] / cp['cp_mib_per_s']:.3f} x cp)")
    print(f"{'cp':>12} {'':>9} {cp['cp_s']:>8} {cp['cp_mib_per_s']:>7} {1.0:>6}")
    print(f"{'cp + fsync':>12} {'':>9} {cp['cp_fsync_s']:>8} {cp['cp_fsync_mib_per_s']:>7}")
