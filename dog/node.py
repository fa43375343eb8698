"""dog node: list, info, kill."""

from __future__ import annotations

from typing import Any

import click

from dog.common import connection_options, json_option, run
from dog.output import print_json, print_table
from sheep.errors import InvalidParameters
from sheep.size import format_size


@click.group()
def node() -> None:
    """Inspect and stop the nodes (sheep) of the cluster."""


def _use(info: dict[str, Any]) -> str:
    capacity = info.get("capacity") or 0
    return f"{100 * info['used'] / capacity:.0f}%" if capacity else "-"


@node.command(name="list")
@json_option
@connection_options
def list_(as_json: bool) -> None:
    """List the nodes: index, id, address, zone, vnodes, objects, space."""
    nodes = run(lambda client: client.node_list())
    if as_json:
        print_json([{"index": index, **info} for index, info in enumerate(nodes)])
        return
    rows = []
    for index, info in enumerate(nodes):
        if info.get("status") == "unreachable":
            rows.append([index, info["node_id"], f"{info['address']}:{info['port']}",
                         info["zone"], info["vnodes"], "-", "-", "-", "-", "unreachable"])
            continue
        rows.append([index, info["node_id"], f"{info['address']}:{info['port']}", info["zone"],
                     info["vnodes"], info["objects"], format_size(info["used"]),
                     format_size(info["capacity"]), _use(info), info["status"]])
    print_table(["Id", "Node id", "Address", "Zone", "Vnodes", "Objects", "Used", "Capacity",
                 "Use%", "Status"], rows,
                right=["Id", "Zone", "Vnodes", "Objects", "Used", "Capacity", "Use%"])


@node.command()
@json_option
@connection_options
def info(as_json: bool) -> None:
    """Space used and available on every node, and in total."""
    nodes = run(lambda client: client.node_list())
    if as_json:
        print_json([{"index": index, **info} for index, info in enumerate(nodes)])
        return
    rows = []
    used = capacity = 0
    for index, info in enumerate(nodes):
        if info.get("status") == "unreachable":
            rows.append([index, "-", "-", "-", "-", "unreachable"])
            continue
        used += info["used"]
        capacity += info["capacity"]
        rows.append([index, format_size(info["capacity"]), format_size(info["used"]),
                     format_size(info["free"]), _use(info), info["objects"]])
    total = {"used": used, "capacity": capacity}
    rows.append(["Total", format_size(capacity), format_size(used),
                 format_size(capacity - used), _use(total), sum(
                     n.get("objects", 0) for n in nodes)])
    print_table(["Id", "Size", "Used", "Avail", "Use%", "Objects"], rows,
                right=["Size", "Used", "Avail", "Use%", "Objects"])


@node.command()
@click.argument("index", type=click.IntRange(0))
@connection_options
def kill(index: int) -> None:
    """Stop the node with this index (as shown by 'dog node list')."""
    from sheep.client import Client

    async def call(client: Client) -> str:
        nodes = await client.node_list()
        if index >= len(nodes):
            raise InvalidParameters(f"no node with index {index} (the cluster has {len(nodes)})")
        target = nodes[index]
        victim = await Client.connect(target["address"], target["port"])
        try:
            await victim.kill_node()
        finally:
            victim.close()
        return str(target["node_id"])

    node_id = run(call)
    click.echo(f"node {index} ({node_id}) is stopping")


@node.command()
@json_option
@connection_options
def recovery(as_json: bool) -> None:
    """Recovery on every node: objects to fetch for the current epoch, done, failed,
    and copies still being verified after a restart."""
    nodes = run(lambda client: client.node_list())
    items = [{"index": index, "node_id": info["node_id"], **(info.get("recovery") or {})}
             for index, info in enumerate(nodes)]
    if as_json:
        print_json(items)
        return
    rows = [[item["index"], item["node_id"], item.get("epoch", "-"),
             item.get("to_recover", "-"), item.get("recovered", "-"), item.get("failed", "-"),
             item.get("unverified", "-"),
             "recovering" if item.get("running") else ("-" if "running" not in item else "idle")]
            for item in items]
    print_table(["Id", "Node id", "Epoch", "To recover", "Recovered", "Failed", "Unverified",
                 "State"], rows,
                right=["Id", "Epoch", "To recover", "Recovered", "Failed", "Unverified"])
