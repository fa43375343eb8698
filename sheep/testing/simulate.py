"""scripts/simulate: run the cluster simulation over seeds and report.

Each failing seed is printed with the command that replays it. The last line is
``N seeds, F failures, trace HASH``, where HASH covers every seed's trace, so two
runs of the same seeds print the same hash. Exit status 1 if any seed failed.
"""

from __future__ import annotations

import hashlib
import sys
import time

import click

from sheep.testing.sim import PLANTS, Simulation


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--seeds", "count", type=click.IntRange(1), default=20, show_default=True,
              help="How many seeds to run (from --first).")
@click.option("--first", type=click.IntRange(0), default=1, show_default=True,
              help="The first seed of a --seeds run.")
@click.option("--seed", type=click.IntRange(0), default=None,
              help="Run this one seed only (a replay), printing its trace with -v.")
@click.option("--nodes", type=click.IntRange(2, 9), default=None,
              help="Sheep in the cluster (default: 3 to 5, chosen by the seed).")
@click.option("--steps", type=click.IntRange(1), default=40, show_default=True,
              help="Operations each client runs.")
@click.option("--plant", type=click.Choice(sorted(PLANTS)), default=None,
              help="Switch on a known bug, to show that the checks catch it.")
@click.option("--stop-on-failure", is_flag=True,
              help="Stop at the first failing seed (always so with --plant: a planted bug"
                   " is caught by the first seed that fails).")
@click.option("--migrations", is_flag=True,
              help="Clients also live-migrate: a new gateway, a handoff of the lock, and"
                   " the old handle fenced; and they flush naming their handle, as the NBD"
                   " plugin does.")
@click.option("--lifecycle", is_flag=True,
              help="Clients also check snapshot diffs and change their VDIs' copies.")
@click.option("-v", "--verbose", is_flag=True, help="Print the trace and the sheep's logs.")
def main(count: int, first: int, seed: int | None, nodes: int | None, steps: int,
         plant: str | None, stop_on_failure: bool, migrations: bool, lifecycle: bool,
         verbose: bool) -> None:
    """Run the deterministic simulated cluster over seeds; print failures with the
    command that replays them."""
    seeds = [seed] if seed is not None else list(range(first, first + count))
    stop_on_failure = stop_on_failure or plant is not None
    combined = hashlib.sha256()
    failures = 0
    simulated_s = 0.0
    started = time.monotonic()
    for one in seeds:
        node_count = nodes if nodes is not None else 3 + one % 3
        simulation = Simulation(one, nodes=node_count, steps=steps, plant=plant,
                                migrations=migrations, lifecycle=lifecycle)
        simulation.verbose = verbose
        result = simulation.run()
        combined.update(f"{one} {result.trace_hash}\n".encode())
        simulated_s += result.simulated_s
        if result.failure is not None:
            failures += 1
            replay = f"scripts/simulate --seed {one} --nodes {node_count} --steps {steps}"
            if migrations:
                replay += " --migrations"
            if lifecycle:
                replay += " --lifecycle"
            if plant:
                replay += f" --plant {plant}"
            click.echo(f"seed {one} FAILED: {result.failure}")
            click.echo(f"  replay: {replay} -v")
            if stop_on_failure:
                seeds = seeds[:seeds.index(one) + 1]
                break
        elif seed is not None or verbose:
            click.echo(f"seed {one} ok: {result.simulated_s:.1f} s simulated in "
                       f"{result.wall_s:.2f} s, trace {result.trace_hash}, faults {result.faults}")
    wall_s = time.monotonic() - started
    click.echo(f"speed: {simulated_s / wall_s:.1f} simulated s per wall s, "
               f"{len(seeds) / wall_s * 60:.1f} seeds per minute")
    click.echo(f"{len(seeds)} seeds, {failures} failures, trace {combined.hexdigest()[:16]}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
