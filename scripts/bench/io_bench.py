"""The I/O benchmark: fio (nbd engine) and nbdcopy against our cluster and its
baselines, all in one run.

Targets, each an NBD export of the same size, prefilled with data (so reads hit
data, not holes) before any measurement:

- ours-c3, ours-c1: 3 local sheep, copies=3 / copies=1, through nbdkit and our
  plugin (nbd_plugin/plugin.py);
- ours-c3-fifo (only with --targets): ours-c3 with `sheep --io-scheduler fifo`,
  the scheduler off: ours-c3/ours-c3-fifo is what scheduling costs;
- ours-c3-encrypt (only with --targets): ours-c3 formatted with --encrypt (every
  frame encrypted; ours-c3 only signs them);
- ours-c3-before (only with --targets, and SHEEP_BENCH_BEFORE_TREE=PATH): ours-c3
  as built by another checkout (a change's baseline), the way ours-c3-noauth is;
  ours-c3-encrypt-before the same, formatted with --encrypt;
- ours-c3-noauth (only with --targets, and SHEEP_BENCH_NOAUTH_TREE=PATH): ours-c3
  as built by another checkout, the one before authentication existed, set up by
  that tree's own code in a child process: ours-c3/ours-c3-noauth is what
  authentication and signing cost;
- file: nbdkit's file plugin on a local raw file;
- qcow2: qemu-nbd on a qcow2 overlay (over a raw base), cache=none, aio=native;
- pyref: the "Python plugin + one Python hop" ceiling (scripts/bench/reference/):
  a minimal nbdkit Python plugin that forwards each request to an asyncio server
  that preads/pwrites a file;
- ceph (only with --ceph): fio's rbd engine on an existing pool, when Ceph is
  installed and configured on this box.

Repetitions are interleaved (rep 1 of every workload on every target, then rep
2, ...), the median is reported with ratios against the baselines, together with
the CPU time our processes (sheep and nbdkit) and the baselines' processes spend
per I/O and every process's peak RSS.
"""

from __future__ import annotations

import abc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

from sheep.testing.cluster import LocalCluster, free_port, stop_process  # noqa: E402
from sheep.testing.nbd import NbdServer  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Workload:
    name: str
    fio: list[str] | None  # None: nbdcopy
    unit: str  # "IOPS" or "MiB/s"


WORKLOADS = [
    Workload("seq write 1M QD8", ["--rw=write", "--bs=1m", "--iodepth=8"], "MiB/s"),
    Workload("seq read 1M QD8", ["--rw=read", "--bs=1m", "--iodepth=8"], "MiB/s"),
    Workload("rand write 4K QD16", ["--rw=randwrite", "--bs=4k", "--iodepth=16"], "IOPS"),
    Workload("rand read 4K QD16", ["--rw=randread", "--bs=4k", "--iodepth=16"], "IOPS"),
    Workload("rand read 4K QD16 x4 conn", ["--rw=randread", "--bs=4k", "--iodepth=16",
                                           "--numjobs=4", "--group_reporting"], "IOPS"),
    Workload("rand write 4K QD16 fsync=32", ["--rw=randwrite", "--bs=4k", "--iodepth=16",
                                             "--fsync=32"], "IOPS"),
    Workload("nbdcopy out", None, "MiB/s"),
    # The latency a database in a VM feels: one request at a time (issue #20). Reported
    # as IOPS and, below the tables, as the mean latency.
    Workload("rand write 4K QD1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"], "IOPS"),
    Workload("rand read 4K QD1", ["--rw=randread", "--bs=4k", "--iodepth=1"], "IOPS"),
]


# --- targets ------------------------------------------------------------------------------

@dataclass
class Target(abc.ABC):
    name: str
    base: str
    size: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @abc.abstractmethod
    def start(self) -> None:
        """Bring the target up, its export empty."""

    @abc.abstractmethod
    def uri(self) -> str:
        """The NBD URI of its export ("" for a target measured without NBD)."""

    def engine(self) -> tuple[list[str], dict[str, str] | None]:
        """fio's engine options for this target, and the environment fio needs."""
        return ["--ioengine=nbd", f"--uri={self.uri()}"], None

    def pids(self) -> list[tuple[str, int]]:
        """(role, pid) of every process serving this target."""
        return [(os.path.basename(str(p.args[0])), p.pid) for p in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process)

    def _raw_file(self) -> str:
        path = os.path.join(self.base, "disk.raw")
        with open(path, "wb") as file:
            file.truncate(self.size)
        return path

    def _spawn(self, command: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(os.path.join(self.base, log), "ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=out,
                                       stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{process.args} not listening within {timeout_s} s")


class Ours(Target):
    copies = 3
    sheep_args: list[str] = []

    def start(self) -> None:
        self.cluster = LocalCluster(self.base, 3)
        for node in self.cluster.sheep:
            node.extra_args = [*node.extra_args, *self.sheep_args]
        self.cluster.start()
        self.cluster.format(self.copies)
        with self.cluster.client(0) as client:
            client.set_scrub(max_rate=0)
            client.vdi_create("bench", self.size)
        self.nbd = NbdServer([node.port for node in self.cluster.sheep],
                             os.path.join(self.base, "nbdkit.log"), threads=16)

    def uri(self) -> str:
        return self.nbd.uri("bench")

    def pids(self) -> list[tuple[str, int]]:
        pids = [("sheep", node.process.pid) for node in self.cluster.sheep
                if node.process is not None]
        return pids + [("nbdkit", self.nbd.process.pid)]

    def stop(self) -> None:
        self.nbd.stop()
        self.cluster.close()


class OursOneCopy(Ours):
    copies = 1


class OursFifo(Ours):
    """ours-c3 with the I/O scheduler off (every request at once, as before issue
    #14): beside ours-c3 in one run, what the scheduler costs the data path."""

    sheep_args = ["--io-scheduler", "fifo"]


class OursEncrypted(Ours):
    """ours-c3 formatted with --encrypt: every frame's payload encrypted."""

    def start(self) -> None:
        super().start()
        with self.cluster.client(0) as client:  # connections made before close after it
            client.format(self.copies, 4 * MiB, force=True, encrypt=True)
        with self.cluster.client(0) as client:
            assert client.cluster_info()["encrypt"]
            client.set_scrub(max_rate=0)
            client.vdi_create("bench", self.size)


# Run by the checkout of SHEEP_BENCH_NOAUTH_TREE, with that tree's code: its own
# LocalCluster and NbdServer, the same shape as Ours. It prints the URI and the pids,
# and stops everything when its stdin closes.
_OLD_TREE_TARGET = """
import json, os, sys
from sheep.testing.cluster import LocalCluster
from sheep.testing.nbd import NbdServer
base, size = sys.argv[1], int(sys.argv[2])
cluster = LocalCluster(base, 3)
try:  # a setup that fails stops what it started
    cluster.start()
    cluster.format(3)
    if sys.argv[3:] == ["encrypt"]:
        with cluster.client(0) as client:  # its connections close after the format
            client.format(3, 4 << 20, force=True, encrypt=True)
    with cluster.client(0) as client:
        client.set_scrub(max_rate=0)
        client.vdi_create("bench", size)
    nbd = NbdServer([n.port for n in cluster.sheep], os.path.join(base, "nbdkit.log"),
                    threads=16)
    try:
        print(json.dumps({"uri": nbd.uri("bench"),
                          "sheep": [n.process.pid for n in cluster.sheep],
                          "nbdkit": nbd.process.pid}), flush=True)
        sys.stdin.read()
    finally:
        nbd.stop()
finally:
    cluster.close()
"""


class OursWithoutAuth(Target):
    """ours-c3 from the checkout before authentication (SHEEP_BENCH_NOAUTH_TREE)."""

    variable = "SHEEP_BENCH_NOAUTH_TREE"
    hint = "a checkout from before authentication (git worktree add PATH f4b4006~1)"
    extra: list[str] = []  # more arguments for _OLD_TREE_TARGET

    def start(self) -> None:
        tree = os.environ.get(self.variable)
        if not tree or not os.path.isdir(os.path.join(tree, "sheep")):
            raise RuntimeError(f"{self.name} needs {self.variable}=PATH, {self.hint}")
        env = {**os.environ, "PYTHONPATH": tree}
        env.pop("DOG_KEYRING", None)
        self.helper = subprocess.Popen(
            [sys.executable, "-c", _OLD_TREE_TARGET, self.base, str(self.size), *self.extra],
            cwd=tree,
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.helper.stdout is not None
        line = self.helper.stdout.readline()
        if not line:
            raise RuntimeError(f"the {tree} target did not start (exit {self.helper.wait()})")
        self.info = json.loads(line)

    def uri(self) -> str:
        return str(self.info["uri"])

    def pids(self) -> list[tuple[str, int]]:
        return [("sheep", pid) for pid in self.info["sheep"]] + [("nbdkit", self.info["nbdkit"])]

    def stop(self) -> None:
        assert self.helper.stdin is not None
        self.helper.stdin.close()
        self.helper.wait(timeout=120)


class OursBefore(OursWithoutAuth):
    """ours-c3 from another checkout (SHEEP_BENCH_BEFORE_TREE): a change's A/B in one
    run, ours-c3/ours-c3-before."""

    variable = "SHEEP_BENCH_BEFORE_TREE"
    hint = "the checkout to compare with (git worktree add PATH main)"


class OursEncryptedBefore(OursBefore):
    """ours-c3-encrypt from another checkout (SHEEP_BENCH_BEFORE_TREE)."""

    extra = ["encrypt"]


class Local(Target):
    """A target served by a process of ours on a loopback port."""

    port = 0

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"


class File(Local):
    def start(self) -> None:
        path = self._raw_file()
        self.port = free_port()
        process = self._spawn(["nbdkit", "-f", "-p", str(self.port), "-i", "127.0.0.1",
                               "-t", "16", "file", f"file={path}"], "nbdkit.log")
        _wait_port(self.port, process)


class Qcow2(Local):
    def start(self) -> None:
        base = os.path.join(self.base, "base.raw")
        overlay = os.path.join(self.base, "overlay.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", base, str(self.size)],
                       check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
                        overlay], check=True)
        self.port = free_port()
        process = self._spawn(["qemu-nbd", "-f", "qcow2", "--cache=none", "--aio=native",
                               "--shared=8", "-t", "-b", "127.0.0.1", "-p", str(self.port),
                               overlay], "qemu-nbd.log")
        _wait_port(self.port, process)


class Reference(Local):
    def start(self) -> None:
        path = self._raw_file()
        server_port, self.port = free_port(), free_port()
        server = self._spawn([sys.executable, os.path.join(HERE, "reference", "server.py"),
                              path, str(server_port)], "server.log")
        _wait_port(server_port, server)
        process = self._spawn(["nbdkit", "-f", "-p", str(self.port), "-i", "127.0.0.1",
                               "-t", "16", "python", os.path.join(HERE, "reference", "plugin.py"),
                               f"port={server_port}", f"size={self.size}"], "nbdkit.log")
        _wait_port(self.port, process)

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"


class Ceph(Target):
    """A private throwaway Ceph (1 mon, 1 mgr, 3 bluestore OSDs on files, pool size=3)
    on this box, measured with fio's rbd engine; nbdcopy has no rbd path: not run."""

    def start(self) -> None:
        import ceph_cluster

        self.cluster = ceph_cluster.CephCluster(os.path.join(self.base, "ceph"))
        self.cluster.start()
        self.cluster.create_image("bench", self.size)

    def uri(self) -> str:
        return ""

    def engine(self) -> tuple[list[str], dict[str, str] | None]:
        return (["--ioengine=rbd", "--clientname=admin", f"--pool={self.cluster.pool()}",
                 "--rbdname=bench"], self.cluster.fio_env())

    def pids(self) -> list[tuple[str, int]]:
        return [("ceph", pid) for pid in self.cluster.pids()]

    def stop(self) -> None:
        self.cluster.stop()


TARGETS: dict[str, type[Target]] = {"ours-c3": Ours, "ours-c1": OursOneCopy,
                                     "ours-c3-fifo": OursFifo,
                                     "ours-c3-encrypt": OursEncrypted,
                                     "ours-c3-noauth": OursWithoutAuth,
                                     "ours-c3-before": OursBefore,
                                     "ours-c3-encrypt-before": OursEncryptedBefore, "file": File,
                                     "qcow2": Qcow2, "pyref": Reference, "ceph": Ceph}
DEFAULT_TARGETS = ["ours-c3", "ours-c1", "file", "qcow2", "pyref"]


def ceph_unavailable() -> str | None:
    import ceph_cluster

    why = ceph_cluster.unavailable()
    if why is None and "rbd" not in subprocess.run(["fio", "--enghelp"], capture_output=True,
                                                     text=True).stdout:
        why = "this fio has no rbd engine"
    return why


# --- measuring ------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def peak_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def fio(target: Target, options: list[str], size: int,
        runtime_s: float) -> tuple[float, int, float, float]:
    """(figure, I/Os, seconds, mean latency in microseconds) of one fio run."""
    engine, env = target.engine()
    result = subprocess.run(
        ["fio", "--output-format=json", "--name=bench", *engine, f"--size={size}",
         f"--runtime={runtime_s}", "--time_based", "--randrepeat=0", "--norandommap",
         *options], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"fio failed: {result.stderr[-2000:]}")
    job = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]
    side = job["write"] if job["write"]["io_bytes"] else job["read"]
    seconds = side["runtime"] / 1000
    bs = 1 * MiB if "--bs=1m" in options else 4096
    figure = side["bw_bytes"] / MiB if bs == MiB else side["iops"]
    return figure, side["total_ios"], seconds, side["lat_ns"]["mean"] / 1000


def nbdcopy(uri: str, size: int) -> tuple[float, int, float]:
    started = time.monotonic()
    subprocess.run(["nbdcopy", "--requests=16", uri, "null:"], check=True,
                   capture_output=True)
    seconds = time.monotonic() - started
    return size / MiB / seconds, size // (256 * 1024), seconds  # nbdcopy reads 256 KiB


def prefill(target: Target) -> None:
    """Write every byte once, so that reads read data, not holes."""
    engine, env = target.engine()
    subprocess.run(["fio", "--name=prefill", *engine, f"--size={target.size}", "--rw=write",
                    "--bs=1m", "--iodepth=8"], check=True, capture_output=True, env=env)


def run(quick: bool = False, reps: int | None = None, targets: list[str] | None = None,
        ceph: bool = False, workloads: list[str] | None = None,
        chart_path: str = os.path.join(HERE, "..", "..", "docs", "bench", "io.png"),
        ) -> dict[str, Any]:
    reps = reps or 3
    size = (256 if quick else 1024) * MiB
    runtime_s = 1 if quick else 8
    chosen = list(targets or DEFAULT_TARGETS)
    plan = [w for w in WORKLOADS if not workloads or any(k in w.name for k in workloads)]
    notes: list[str] = []
    if ceph and "ceph" not in chosen:
        why = ceph_unavailable()
        if why is None:
            chosen.append("ceph")
        else:
            notes.append(f"ceph: not measured: {why}")
            print(notes[-1], flush=True)
    root = tempfile.mkdtemp(prefix="sheep-bench-io-")
    live: dict[str, Target] = {}
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        w.name: {name: [] for name in chosen} for w in plan}
    try:
        for name in chosen:
            base = os.path.join(root, name)
            os.makedirs(base)
            target = TARGETS[name](name, base, size)
            target.start()
            live[name] = target
            started = time.monotonic()
            prefill(target)
            print(f"{name}: started and prefilled {size // MiB} MiB in "
                  f"{time.monotonic() - started:.1f} s", flush=True)
        for rep in range(reps):
            for workload in plan:
                for name in chosen:
                    target = live[name]
                    pids = target.pids()
                    cpu_before = sum(cpu_seconds(pid) for _, pid in pids)
                    if workload.fio is None and not target.uri():
                        continue  # no NBD export to copy from (ceph)
                    latency_us = 0.0
                    if workload.fio is None:
                        figure, ios, seconds = nbdcopy(target.uri(), size)
                    else:
                        figure, ios, seconds, latency_us = fio(target, workload.fio, size,
                                                               runtime_s)
                    cpu = sum(cpu_seconds(pid) for _, pid in pids) - cpu_before
                    results[workload.name][name].append(
                        {"figure": figure, "ios": ios, "seconds": seconds,
                         "cpu_s": cpu, "cpu_us_per_io": cpu / max(ios, 1) * 1e6,
                         "latency_us": latency_us})
                    print(f"rep {rep + 1}/{reps} {workload.name:30} {name:8} "
                          f"{figure:10.1f} {workload.unit:6} cpu {cpu / max(ios, 1) * 1e6:7.1f}"
                          f" us/io", flush=True)
        rss: dict[str, dict[str, int]] = {}
        for name, target in live.items():
            peaks: dict[str, int] = {}
            for role, pid in target.pids():
                peaks[role] = max(peaks.get(role, 0), peak_rss_kib(pid))
            rss[name] = peaks
    finally:
        for target in live.values():
            try:
                target.stop()
            except Exception as error:  # keep stopping the others
                print(f"stopping {target.name}: {error}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for workload in plan:
        summary[workload.name] = {}
        for name in chosen:
            samples = results[workload.name][name]
            if not samples:
                continue
            summary[workload.name][name] = {
                "median": statistics.median(s["figure"] for s in samples),
                "cpu_us_per_io": statistics.median(s["cpu_us_per_io"] for s in samples),
                "latency_us": statistics.median(s.get("latency_us", 0.0) for s in samples)}
    report = {"size_bytes": size, "runtime_s": runtime_s, "reps": reps, "targets": chosen,
              "units": {w.name: w.unit for w in plan}, "summary": summary,
              "samples": results, "peak_rss_kib": rss, "notes": notes}
    print_tables(report)
    chart(report, chart_path)
    return report


def _ratio(summary: dict[str, dict[str, float]], a: str, b: str) -> str:
    if a not in summary or b not in summary or not summary[b]["median"]:
        return "-"
    return f"{summary[a]['median'] / summary[b]['median']:.2f}"


def print_tables(report: dict[str, Any]) -> None:
    targets = report["targets"]
    ours = [t for t in ("ours-c3", "ours-c1") if t in targets]
    baselines = [t for t in ("ours-c3-noauth", "ours-c3-encrypt", "ours-c3-fifo", "file",
                             "qcow2", "pyref", "ceph") if t in targets]

    def cell(summary: dict[str, dict[str, float]], target: str, key: str) -> str:
        return f"{summary[target][key]:.0f}" if target in summary else "-"

    head = ["workload", "unit", *targets, *(f"{o}/{b}" for o in ours for b in baselines)]
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for workload, summary in report["summary"].items():
        row = [workload, report["units"][workload],
               *(cell(summary, t, "median") for t in targets),
               *(_ratio(summary, o, b) for o in ours for b in baselines)]
        print("| " + " | ".join(row) + " |")
    print("\nCPU per I/O (microseconds, all of the target's processes):\n")
    print("| workload | " + " | ".join(targets) + " |")
    print("|" + "---|" * (len(targets) + 1))
    for workload, summary in report["summary"].items():
        print(f"| {workload} | " + " | ".join(
            cell(summary, t, "cpu_us_per_io") for t in targets) + " |")
    print("\nMean latency (microseconds, median of the reps):\n")
    print("| workload | " + " | ".join(targets) + " |")
    print("|" + "---|" * (len(targets) + 1))
    for workload, summary in report["summary"].items():
        if any(summary.get(t, {}).get("latency_us") for t in targets):
            print(f"| {workload} | " + " | ".join(
                cell(summary, t, "latency_us") for t in targets) + " |")
    print("\nPeak RSS (MiB):", ", ".join(
        f"{t}: " + " ".join(f"{role} {kib / 1024:.0f}" for role, kib in peaks.items())
        for t, peaks in report["peak_rss_kib"].items()))


def chart(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no chart (pip install '.[bench]')")
        return
    targets = report["targets"]
    workloads = list(report["summary"])
    reference = "file" if "file" in targets else targets[0]
    width = 0.8 / len(targets)
    figure, axes = plt.subplots(figsize=(12, 5))
    for index, target in enumerate(targets):
        ratios = [report["summary"][w][target]["median"] / report["summary"][w][reference]["median"]
                  if target in report["summary"][w] else 0 for w in workloads]
        axes.bar([x + index * width for x in range(len(workloads))], ratios, width, label=target)
    axes.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(workloads))])
    axes.set_xticklabels(workloads, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel(f"throughput relative to {reference} (log)")
    axes.set_yscale("log")
    axes.axhline(1.0, color="grey", linewidth=0.5)
    axes.legend(fontsize=8)
    axes.set_title(f"fio / nbdcopy over NBD, medians of {report['reps']} interleaved reps")
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=90)
    print(f"chart: {os.path.normpath(path)}")
