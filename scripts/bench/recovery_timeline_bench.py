"""Recovery timeline (issue #14): a client's IOPS, second by second, through a node loss.

The recovery benchmark's timeline mode (``scripts/bench/run --only
recovery-timeline``). It runs the workload of the acceptance check
w2-recovery-qos, step for step, once per configuration, each on a fresh
cluster of 4 local sheep (copies=3, ``dog cluster format --copies 3``):
``dog nbd serve`` exports the VDIs through nbdkit; a thin VDI gets 64 KiB at
the head of each of 64 objects; a 1 GiB VDI is prefilled with 768 MiB by fio
(rw=write bs=1M); then fio does 4 KiB random reads and writes (half each,
iodepth 4) over NBD, logging its IOPS per second, while sheep 3 is killed with
SIGKILL about 12 s in. From 1 s after the kill, ``dog node recovery --json``
is polled every 0.2 s until no node is running recovery or has copies left
to verify: that is the end of recovery.

The figure is the acceptance's: the mean IOPS (reads plus writes) from the
second after the kill to the end of recovery, over the median IOPS of the
seconds before the kill (from second 2 to the one before the kill's). The
clock is the acceptance's too: seconds since fio was started, by which fio's
per-second log is bucketed as well.

The configurations: "fifo" (every sheep started with ``--io-scheduler fifo``:
no scheduling, recovery untuned, the behaviour before the scheduler);
"mclock" (the default); "mclock + max-rate" (the default with ``dog node
recovery --max-rate 50M``, a hard cap per node). Repetitions are interleaved
(rep 1 of each configuration, then rep 2, ...); the medians are reported and
the chart draws, per configuration, the rep whose ratio is the median.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import io_bench  # noqa: E402
import recovery_bench  # noqa: E402

from sheep.client import SyncClient  # noqa: E402
from sheep.testing.cluster import LocalCluster, free_port, stop_process  # noqa: E402

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
KiB = 1 << 10
MiB = 1 << 20
nodes = 4
copies = 3
victim = nodes - 1  # dog and nbdkit talk to sheep 0
kill_after_s = 12.0
detect_pause_s = 1.0  # after the kill, before the first poll: the new epoch is noticed
poll_interval_s = 0.2
polls_max = 600
runtime_full_s = 60  # fio's run: room for a slow recovery and the seconds after it
runtime_quick_s = 45  # as the acceptance check's
reps_full = 3
vdi_name = "io"
vdi_size = "1G"
prefill_size = "768M"
thin_vdi_name = "thin"
thin_vdi_size = "256M"
thin_objects = 64
thin_write_bytes = 64 * KiB
object_bytes = 4 * MiB
before_first_s = 2  # the seconds counted before the kill start here (fio's ramp)
wait_port_s = 20.0
fio_grace_s = 120.0  # fio past its runtime before it counts as hung


@dataclass(frozen=True)
class Configuration:
    name: str
    sheep_args: tuple[str, ...]
    max_rate: str | None


CONFIGURATIONS = (
    Configuration("fifo", ("--io-scheduler", "fifo"), None),
    Configuration("mclock", (), None),
    Configuration("mclock + max-rate", (), "50M"),
)


def _environment() -> dict[str, str]:
    """The environment of dog, sheep and nbdkit: this tree's code first."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    return environment


def dog_command(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "dog", "-a", "127.0.0.1", "-p", str(port), *args]


def _dog(port: int, *args: str, data: bytes | None = None) -> str:
    result = subprocess.run(dog_command(port, *args), input=data, capture_output=True,
                            env=_environment(), cwd=ROOT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"dog {' '.join(args)}: exit {result.returncode}: "
                           f"{result.stderr.decode(errors='replace')[-2000:]}")
    return result.stdout.decode(errors="replace")


def recovery_busy(text: str) -> int:
    """Nodes still recovering in `dog node recovery --json` output: running, or with
    copies left to verify (as the acceptance check counts them)."""
    return sum(1 for node in json.loads(text) if node.get("running") or node.get("unverified"))


def _busy(port: int) -> int:
    try:
        return recovery_busy(_dog(port, "node", "recovery", "--json"))
    except (RuntimeError, ValueError):
        return 1  # no answer counts as busy, as in the acceptance check


def _wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    io_bench._wait_port(port, process, wait_port_s)


def per_second(paths: list[str]) -> tuple[list[int], list[int]]:
    """Reads and writes completed in each second, from fio's IOPS logs (lines of
    time ms, IOPS, direction 0 read / 1 write, ...; one line per direction per
    second with log_avg_msec=1000)."""
    reads: dict[int, int] = {}
    writes: dict[int, int] = {}
    for path in paths:
        with open(path) as file:
            for line in file:
                fields = [field.strip() for field in line.split(",")]
                if len(fields) < 3:
                    continue
                second = int(fields[0]) // 1000
                target = writes if fields[2] == "1" else reads
                target[second] = target.get(second, 0) + int(fields[1])
    seconds = max([*reads, *writes], default=-1) + 1
    return [reads.get(s, 0) for s in range(seconds)], [writes.get(s, 0) for s in range(seconds)]


def acceptance_ratio(iops: list[int], killed_s: float, recovered_s: float) -> dict[str, float]:
    """The acceptance's figure: mean IOPS from the second after the kill to the end of
    recovery over the median IOPS before the kill (seconds since fio's start; a second
    past fio's log counts as 0, as there)."""
    kill, end = int(killed_s), int(recovered_s)
    at = [iops[s] if s < len(iops) else 0 for s in range(max(end, kill + 2) + 1)]
    before = at[before_first_s:max(before_first_s, kill - 1)]
    during = at[kill + 1:max(end, kill + 2)]
    before_iops = statistics.median(before) if before else 0.0
    during_iops = statistics.mean(during) if during else 0.0
    return {"before_kill_iops": round(before_iops, 1), "during_recovery_iops": round(during_iops, 1),
            "ratio": round(during_iops / before_iops, 3) if before_iops else 0.0}


def _fill_thin(port: int) -> None:
    """The acceptance's thin VDI: 64 KiB, marked, at the head of each of 64 objects."""
    _dog(port, "vdi", "create", thin_vdi_name, thin_vdi_size)
    with SyncClient("127.0.0.1", port) as client:
        handle = client.vdi_open(thin_vdi_name, writable=True)["handle"]
        for index in range(thin_objects):
            data = b"THIN-MARK-" + os.urandom(thin_write_bytes - 10)
            client.vdi_write(handle, index * object_bytes, data)
        client.vdi_close(handle)


def _fio(uri: str, *args: str) -> list[str]:
    return ["fio", "--ioengine=nbd", f"--uri={uri}", *args]


def _load(cluster: LocalCluster, uri: str, work: str, runtime_s: int) -> dict[str, Any]:
    """fio's random 4 KiB load through the kill of the victim and the recovery after it."""
    port = cluster.sheep[0].port
    command = _fio(uri, "--name=load", "--rw=randrw", "--bs=4k", "--iodepth=4",
                   f"--size={prefill_size}", "--time_based", f"--runtime={runtime_s}",
                   "--write_iops_log=load", "--log_avg_msec=1000", "--randrepeat=0",
                   "--output-format=json")
    with open(os.path.join(work, "load.json"), "wb") as output:
        fio = subprocess.Popen(command, cwd=work, stdout=output, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    started = time.perf_counter()
    try:
        time.sleep(kill_after_s)
        load_average = os.getloadavg()[0]
        killed = time.perf_counter()
        cluster.kill(victim)
        time.sleep(detect_pause_s)
        polls = 0
        while polls < polls_max and _busy(port) != 0:
            polls += 1
            time.sleep(poll_interval_s)
        recovered = time.perf_counter()
        fio.wait(timeout=runtime_s + fio_grace_s)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    if fio.returncode != 0:
        raise RuntimeError(f"fio load exited {fio.returncode}: see {work}/load.json")
    reads, writes = per_second(sorted(glob.glob(os.path.join(work, "load_iops.*.log"))))
    iops = [r + w for r, w in zip(reads, writes, strict=True)]
    killed_s, recovered_s = killed - started, recovered - started
    return {"killed_s": round(killed_s, 2), "recovered_s": round(recovered_s, 2),
            "recovery_s": round(recovered - killed, 2), "recovery_timed_out": polls >= polls_max,
            "recovery_outlasted_fio": recovered_s > len(iops),
            "load_average_at_kill": round(load_average, 2),
            **acceptance_ratio(iops, killed_s, recovered_s),
            "iops": iops, "reads": reads, "writes": writes,
            "fio": _fio_summary(os.path.join(work, "load.json"))}


def _fio_summary(path: str) -> dict[str, Any]:
    with open(path) as file:
        text = file.read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    summary: dict[str, Any] = {"errors": job["error"]}
    for direction in ("read", "write"):
        side = job[direction]
        percentiles = side.get("clat_ns", {}).get("percentile", {})
        summary[direction] = {
            "iops": round(side["iops"], 1),
            "clat_ms_p50": round(percentiles.get("50.000000", 0) / 1e6, 2),
            "clat_ms_p99": round(percentiles.get("99.000000", 0) / 1e6, 2),
            "clat_ms_max": round(side.get("clat_ns", {}).get("max", 0) / 1e6, 2)}
    return summary


def timeline_once(work: str, configuration: Configuration, runtime_s: int) -> dict[str, Any]:
    """One fresh cluster in one configuration: prefill, load, kill, recover; then it goes."""
    base = tempfile.mkdtemp(prefix="cluster-", dir=work)
    nbd: subprocess.Popen[bytes] | None = None
    try:
        with LocalCluster(base, nodes) as cluster:
            for node in cluster.sheep:
                node.extra_args = list(configuration.sheep_args)
            cluster.start()
            port = cluster.sheep[0].port
            try:
                _dog(port, "cluster", "format", "--copies", str(copies))
                if configuration.max_rate is not None:
                    _dog(port, "node", "recovery", "--max-rate", configuration.max_rate)
                nbd_port = free_port()
                with open(os.path.join(base, "nbd.log"), "wb") as log:
                    nbd = subprocess.Popen(
                        dog_command(port, "nbd", "serve", "--listen", f":{nbd_port}", "-f",
                                    "--state-dir", os.path.join(base, "nbd-state")),
                        stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=_environment(),
                        cwd=ROOT)
                _wait_port(nbd_port, nbd)
                uri = f"nbd://127.0.0.1:{nbd_port}/{vdi_name}"
                _fill_thin(port)
                _dog(port, "vdi", "create", vdi_name, vdi_size)
                start = time.perf_counter()
                subprocess.run(_fio(uri, "--name=fill", "--rw=write", "--bs=1M", "--iodepth=8",
                                    f"--size={prefill_size}"),
                               cwd=base, check=True, capture_output=True)
                prefill_s = time.perf_counter() - start
                os.sync()
                row = _load(cluster, uri, base, runtime_s)
                row["prefill_s"] = round(prefill_s, 2)
                return row
            except BaseException:
                recovery_bench._print_log_tails(cluster)
                raise
            finally:
                if nbd is not None:
                    stop_process(nbd)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rep whose ratio is the median (the lower middle of an even count)."""
    ranked = sorted(rows, key=lambda row: row["ratio"])
    return ranked[(len(ranked) - 1) // 2]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"reps": len(rows)}
    for key in ("before_kill_iops", "during_recovery_iops", "ratio", "recovery_s"):
        summary[key] = round(statistics.median(row[key] for row in rows), 3)
    summary["charted_rep"] = rows.index(_median_row(rows))
    summary["recovery_outlasted_fio"] = sum(row["recovery_outlasted_fio"] for row in rows)
    return summary


def run(quick: bool = False, reps: int | None = None,
        chart_path: str = os.path.join(ROOT, "docs", "bench", "recovery-timeline.png")
        ) -> dict[str, Any]:
    reps = reps or (1 if quick else reps_full)
    runtime_s = runtime_quick_s if quick else runtime_full_s
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            raise SystemExit(f"recovery timeline: {tool} is not installed")
    source_state = recovery_bench._source_state()
    work = tempfile.mkdtemp(prefix="sheep-bench-timeline-")
    filesystem = recovery_bench._filesystem(work)
    samples: dict[str, list[dict[str, Any]]] = {c.name: [] for c in CONFIGURATIONS}
    try:
        for rep in range(reps):
            for configuration in CONFIGURATIONS:
                print(f"rep {rep + 1}/{reps}: {configuration.name}", flush=True)
                row = timeline_once(work, configuration, runtime_s)
                samples[configuration.name].append(row)
                print_row(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {
        "cluster": f"{nodes} local sheep, copies={copies}; dog nbd serve on sheep 0; "
                   f"sheep {victim} killed (SIGKILL) about {kill_after_s:.0f} s into the load",
        "workload": f"fio --ioengine=nbd --rw=randrw --bs=4k --iodepth=4 --size={prefill_size} "
                    f"--time_based --runtime={runtime_s} on a {vdi_size} VDI prefilled with "
                    f"{prefill_size} (rw=write bs=1M)",
        "runtime_s": runtime_s, "reps": reps, "filesystem": filesystem, "source": source_state,
        "configurations": {c.name: {"sheep_args": list(c.sheep_args), "max_rate": c.max_rate}
                           for c in CONFIGURATIONS},
        "summary": {name: summarize(rows) for name, rows in samples.items()},
        "samples": samples}
    print_result(result)
    chart(result, chart_path)
    return result


def print_row(row: dict[str, Any]) -> None:
    print(f"  {row['before_kill_iops']} IOPS before the kill, {row['during_recovery_iops']} "
          f"during recovery ({row['ratio']}x); recovery {row['recovery_s']} s"
          f"{' (outlasted fio)' if row['recovery_outlasted_fio'] else ''}; prefill "
          f"{row['prefill_s']} s; load average {row['load_average_at_kill']}; fio errors "
          f"{row['fio']['errors']}", flush=True)


def print_result(result: dict[str, Any]) -> None:
    print(f"client IOPS through a node loss, median of {result['reps']} "
          f"({result['runtime_s']} s of fio each)")
    print(f"{'configuration':>18} {'before':>8} {'during':>8} {'ratio':>6} {'recovery s':>11}")
    for name, row in result["summary"].items():
        print(f"{name:>18} {row['before_kill_iops']:>8} {row['during_recovery_iops']:>8} "
              f"{row['ratio']:>6} {row['recovery_s']:>11}")


def chart(result: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no chart (pip install '.[bench]')")
        return
    figure, axes = plt.subplots(figsize=(11, 5))
    kills = []
    for index, (name, rows) in enumerate(result["samples"].items()):
        summary = result["summary"][name]
        row = rows[summary["charted_rep"]]
        color = f"C{index}"
        axes.plot(range(len(row["iops"])), row["iops"], color=color, linewidth=1.4,
                  label=f"{name}: {row['ratio']}x during recovery, recovered in "
                        f"{row['recovery_s']:.1f} s")
        axes.axvline(row["recovered_s"], color=color, linestyle=":", linewidth=1.2)
        kills.append(row["killed_s"])
    axes.axvline(statistics.mean(kills), color="black", linestyle="--", linewidth=1,
                 label="SIGKILL of sheep 3 (dotted: each recovery's end)")
    axes.set_xlabel("seconds since fio started")
    axes.set_ylabel("IOPS (4 KiB reads + writes per second)")
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8, loc="lower right")
    reps = result["reps"]
    axes.set_title("fio randrw 4k iodepth 4 over NBD through a node loss (4 sheep, copies=3)"
                   + (f"; the median of {reps} reps each" if reps > 1 else ""), fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=90)
    print(f"chart: {os.path.normpath(path)}")
