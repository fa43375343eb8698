"""dog cluster: format, info, shutdown."""

from __future__ import annotations

from typing import Any

import click

from dog.common import SIZE, connection_options, json_option, run
from dog.output import format_time, print_json, print_table
from sheep import constants
from sheep.size import format_size


@click.group()
def cluster() -> None:
    """Format, inspect and shut down the cluster."""


def _check_object_size(value: int) -> int:
    low, high = constants.object_size_min_bytes, constants.object_size_max_bytes
    if value & (value - 1) or not low <= value <= high:
        raise click.BadParameter(
            f"{value} bytes is not a power of two from {format_size(low)} to {format_size(high)}")
    return value


@cluster.command()
@click.option("-c", "--copies", type=click.IntRange(1, constants.copies_max),
              default=constants.copies_default, show_default=True,
              help="Copies of every object, each in a different zone.")
@click.option("--object-size", type=SIZE, default=constants.object_size_default_bytes,
              callback=lambda ctx, param, value: _check_object_size(value),
              help="Object size, a power of two from 1M to 64M (default 4M).")
@click.option("--force", is_flag=True, help="Format even a formatted cluster, erasing its data.")
@connection_options
def format(copies: int, object_size: int, force: bool) -> None:  # noqa: A001 - Sheepdog's name
    """Format the cluster: fix copies and object size, erase all objects."""
    result = run(lambda client: client.format(copies, object_size, force))
    click.echo(f"formatted: {result['copies']} copies, "
               f"{format_size(result['object_size'])} objects")


def _status_text(info: dict[str, Any]) -> str:
    if info["status"] == "wait_for_format":
        return "waiting for the cluster to be formatted"
    if info["status"] == "shutdown":
        members = {node["node_id"] for node in info["members"]}
        missing = [node_id for node_id in info.get("waiting_for", []) if node_id not in members]
        return (f"waiting for {len(missing)} node(s) of the last epoch to come back: "
                f"{', '.join(missing)} ('dog cluster recover force' goes on without them)")
    return "running"


@cluster.command()
@json_option
@connection_options
def info(as_json: bool) -> None:
    """Show the cluster's status, parameters and epoch history."""
    value = run(lambda client: client.cluster_info())
    if as_json:
        print_json(value)
        return
    click.echo(f"Cluster status: {_status_text(value)}")
    if value["status"] in ("ok", "shutdown"):
        click.echo(f"Cluster created at {format_time(value['format_time'])}")
        click.echo(f"Copies: {value['copies']}, object size: {format_size(value['object_size'])}")
    driver = value["driver"]
    where = driver.get("directory") or driver.get("hosts") or ""
    click.echo(f"Cluster driver: {driver['driver']} {where}".rstrip())
    click.echo(f"Epoch: {value['epoch']}, nodes: {len(value['members'])}, "
               f"zones: {value['zones']}")
    click.echo("")
    rows = []
    for entry in reversed(value["epochs"]):
        nodes = ", ".join(f"{node['address']}:{node['port']}" for node in entry["nodes"])
        rows.append([entry["epoch"], format_time(entry["time"]), nodes or "(none)"])
    print_table(["Epoch", "Time", "Nodes"], rows, right=["Epoch"])


@cluster.command()
@connection_options
def shutdown() -> None:
    """Stop every sheep of the cluster cleanly (their data stays)."""
    run(lambda client: client.shutdown())
    click.echo("cluster shutting down")


@cluster.group()
def recover() -> None:
    """After a shutdown: decide about nodes that do not come back."""


@recover.command()
@connection_options
def force() -> None:
    """Serve again without the nodes of the last epoch that are still missing."""
    value = run(lambda client: client.force_recover())
    given_up = value.get("given_up") or []
    click.echo(f"the cluster serves again; gave up waiting for {len(given_up)} node(s)"
               + (f": {', '.join(given_up)}" if given_up else ""))
