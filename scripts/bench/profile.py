"""Profile the data path: a 3-sheep cluster (copies=3) behind nbdkit and our plugin,
prefilled, one fio workload for a while, py-spy sampling every sheep and nbdkit
meanwhile. Prints, per process kind, the functions with the most samples on top
of the stack (self) and anywhere in it (inclusive), as shares of all samples.

    scripts/bench/profile [--workload randread|randwrite|seqread|seqwrite|fsync
                                     |randwrite1|randread1]
                          [--seconds 10] [--copies 3] [--encrypt] [--keep DIR]

py-spy needs ptrace rights (root, or kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))

import io_bench  # noqa: E402

WORKLOADS = {
    "randread": ["--rw=randread", "--bs=4k", "--iodepth=16"],
    "randwrite": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
    "seqread": ["--rw=read", "--bs=1m", "--iodepth=8"],
    "seqwrite": ["--rw=write", "--bs=1m", "--iodepth=8"],
    "fsync": ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--fsync=32"],
    "randwrite1": ["--rw=randwrite", "--bs=4k", "--iodepth=1"],
    "randread1": ["--rw=randread", "--bs=4k", "--iodepth=1"],
}


def frame_name(frame: str) -> str:
    # py-spy raw frames: "function (path/file.py:line)"
    function, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{function} ({os.path.basename(path)})"


def summarize(path: str, top: int) -> str:
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as file:
        for line in file:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = [frame_name(f) for f in stack.split(";") if f]
            total += count
            if frames:
                self_counts[frames[-1]] += count
            for name in set(frames):
                inclusive[name] += count
    lines = [f"  {total} samples"]
    lines.append("  self:")
    lines += [f"    {count / total:6.1%}  {name}" for name, count in self_counts.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"    {count / total:6.1%}  {name}" for name, count in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="randread")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="MiB")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--keep", default=None, help="keep the raw py-spy files here")
    parser.add_argument("--encrypt", action="store_true",
                        help="format with --encrypt (every frame encrypted; copies 3)")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is missing: pip install '.[bench]'")
    root = tempfile.mkdtemp(prefix="sheep-profile-")
    target_class = (io_bench.OursEncrypted if args.encrypt else
                    io_bench.Ours if args.copies == 3 else io_bench.OursOneCopy)
    target = target_class("ours", root, args.size << 20)
    out = args.keep or root
    os.makedirs(out, exist_ok=True)
    try:
        target.start()
        io_bench.prefill(target)
        spies = []
        for index, (role, pid) in enumerate(target.pids()):
            raw = os.path.join(out, f"{role}{index}.txt")
            spies.append((role, index, raw, subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--duration", str(args.seconds),
                 "--rate", "250", "--format", "raw", "--output", raw, "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        figure, ios, seconds, latency_us = io_bench.fio(target, WORKLOADS[args.workload],
                                                        target.size, args.seconds)
        print(f"{args.workload}: {figure:.0f} ({ios} I/Os in {seconds:.1f} s, mean latency"
              f" {latency_us:.0f} us) while profiled")
        for role, index, raw, spy in spies:
            _, errors = spy.communicate(timeout=60)
            if not os.path.exists(raw):
                print(f"{role}{index}: py-spy wrote nothing: {errors.decode()[-500:]}")
                continue
            print(f"{role}{index}:")
            print(summarize(raw, args.top))
    finally:
        target.stop()
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
