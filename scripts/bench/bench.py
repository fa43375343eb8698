"""Benchmark entry point: runs the chosen benchmarks, prints tables, saves JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import backup_bench  # noqa: E402
import blockstatus_bench  # noqa: E402
import checksum_bench  # noqa: E402
import io_bench  # noqa: E402
import memory_bench  # noqa: E402
import placement_bench  # noqa: E402
import recovery_bench  # noqa: E402
import recovery_timeline_bench  # noqa: E402
import sparse_bench  # noqa: E402
import vdi_bench  # noqa: E402

from sheep.size import parse_size  # noqa: E402

BENCHMARKS = {"io": io_bench.run, "vdi": vdi_bench.run, "sparse": sparse_bench.run,
              "recovery": recovery_bench.run, "recovery-timeline": recovery_timeline_bench.run,
              "checksums": checksum_bench.run,
              "memory": memory_bench.run, "backup": backup_bench.run,
              "blockstatus": blockstatus_bench.run, "placement": placement_bench.run}


def machine() -> dict[str, object]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer reps")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), default=None)
    parser.add_argument("--reps", type=int, default=None, help="repetitions (median taken)")
    parser.add_argument("--out", default="docs/bench", help="where the JSON results go")
    parser.add_argument("--recovery-size", type=parse_size, default=None,
                        help="data written before the node loss (default 2G, 256M with --quick)")
    parser.add_argument("--targets", nargs="*", choices=sorted(io_bench.TARGETS), default=None,
                        help="io: the targets to measure (default all)")
    parser.add_argument("--workloads", nargs="*", default=None,
                        help="io: only the workloads whose names contain one of these")
    parser.add_argument("--ceph", action="store_true",
                        help="io: also measure Ceph RBD (size=3): a private throwaway cluster "
                             "on this box (needs ceph-mon ceph-mgr ceph-osd ceph-common)")
    parser.add_argument("--stored", type=parse_size, default=None,
                        help="memory: bytes of 4 MiB objects one sheep holds (default 100G)")
    parser.add_argument("--full", type=int, default=None, metavar="GIB",
                        help="memory: write GIB densely instead of sparse objects")
    args = parser.parse_args()
    options: dict[str, dict[str, object]] = {
        "recovery": {"size": args.recovery_size},
        "io": {"targets": args.targets, "workloads": args.workloads, "ceph": args.ceph,
               "chart_path": os.path.join(args.out, "io.png")},
        "recovery-timeline": {"chart_path": os.path.join(args.out, "recovery-timeline.png")},
        "memory": {"stored": args.stored, "full": args.full}}
    os.makedirs(args.out, exist_ok=True)
    for name in args.only or sorted(BENCHMARKS):
        print(f"== {name}", flush=True)
        result = BENCHMARKS[name](quick=args.quick, reps=args.reps, **options.get(name, {}))
        result["machine"] = machine()
        result["command"] = " ".join(["scripts/bench/run", *sys.argv[1:]])
        path = os.path.join(args.out, f"{name}.json")
        with open(path, "w") as file:
            json.dump(result, file, indent=2, sort_keys=True)
        print(f"results: {path}")


if __name__ == "__main__":
    main()
