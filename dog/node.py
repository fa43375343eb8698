"""dog node: list, info, weight, kill, recovery, stat, drain."""

from __future__ import annotations

from typing import Any

import click

from dog.common import RATE, SIZE, connection_options, json_option, run
from dog.output import StatusLine, print_json, print_table
from sheep.errors import InvalidParameters
from sheep.health import cluster_health, health_text, objects_done_text
from sheep.size import format_size


@click.group()
def node() -> None:
    """Inspect and stop the nodes (sheep) of the cluster."""


def _use(info: dict[str, Any]) -> str:
    capacity = info.get("capacity") or 0
    return f"{100 * info['used'] / capacity:.0f}%" if capacity else "-"


def _domain(info: dict[str, Any]) -> str:
    """RACK/HOST, or HOST when the host is its own rack."""
    rack = info.get("rack")
    return f"{rack}/{info['zone']}" if rack is not None else str(info["zone"])


def _share(info: dict[str, Any], total: int) -> str:
    """The node's share of the cluster's weight (total): what placement gives it of the
    copies."""
    return f"{100 * int(info.get('weight', 0)) / total:.1f}%" if total else "-"


@node.command(name="list")
@json_option
@connection_options
def list_(as_json: bool) -> None:
    """List the nodes: index, id, address, rack/host, weight and its share of the
    cluster's, objects, space, and whether the node is (nearly) full."""
    nodes = run(lambda client: client.node_list())
    if as_json:
        print_json([{"index": index, **info} for index, info in enumerate(nodes)])
        return
    rows = []
    total = sum(int(node.get("weight", 0)) for node in nodes)
    for index, info in enumerate(nodes):
        weight = format_size(int(info.get("weight", 0)))
        if info.get("status") == "unreachable":
            rows.append([index, info["node_id"], f"{info['address']}:{info['port']}",
                         _domain(info), weight, _share(info, total), "-", "-", "-", "-",
                         "unreachable"])
            continue
        status = info["status"]
        if info.get("space", "ok") != "ok":
            status = f"{status}, {info['space']}"
        rows.append([index, info["node_id"], f"{info['address']}:{info['port']}",
                     _domain(info), weight, _share(info, total), info["objects"],
                     format_size(info["used"]), format_size(info["capacity"]), _use(info),
                     status])
    print_table(["Id", "Node id", "Address", "Rack/Host", "Weight", "Share", "Objects", "Used",
                 "Capacity", "Use%", "Status"], rows,
                right=["Id", "Weight", "Share", "Objects", "Used", "Capacity", "Use%"])


@node.command()
@json_option
@connection_options
def info(as_json: bool) -> None:
    """Space used and available on every node, and in total; damaged copies found
    (checksum mismatches and lost files), copies repaired, copies scrubbed."""
    nodes = run(lambda client: client.node_list())
    if as_json:
        print_json([{"index": index, **info} for index, info in enumerate(nodes)])
        return
    rows = []
    used = capacity = 0
    for index, info in enumerate(nodes):
        if info.get("status") == "unreachable":
            rows.append([index, "-", "-", "-", "-", "unreachable", "-", "-", "-"])
            continue
        used += info["used"]
        capacity += info["capacity"]
        integrity = info.get("integrity") or {}
        scrub = integrity.get("scrub") or {}
        rows.append([index, format_size(info["capacity"]), format_size(info["used"]),
                     format_size(info["free"]), _use(info), info["objects"],
                     integrity.get("checksum_errors", 0) + integrity.get("missing_files", 0),
                     integrity.get("repaired", 0), scrub.get("scrubbed", 0)])
    total = {"used": used, "capacity": capacity}
    rows.append(["Total", format_size(capacity), format_size(used),
                 format_size(capacity - used), _use(total), sum(
                     n.get("objects", 0) for n in nodes), "", "", ""])
    print_table(["Id", "Size", "Used", "Avail", "Use%", "Objects", "Damaged", "Repaired",
                 "Scrubbed"], rows,
                right=["Size", "Used", "Avail", "Use%", "Objects", "Damaged", "Repaired",
                       "Scrubbed"])


def find_node(nodes: list[dict[str, Any]], spec: str) -> tuple[int, dict[str, Any]]:
    """(index, node) for what names a node on the command line: its index in 'dog
    node list' (which shifts when a node leaves), its node id, or HOST:PORT (a host
    name is resolved). InvalidParameters naming what there is, when none matches."""
    import socket

    spec = spec.strip()
    for index, node in enumerate(nodes):
        if spec == node["node_id"]:
            return index, node
    if spec.isdigit():
        index = int(spec)
        if index < len(nodes):
            return index, nodes[index]
        raise InvalidParameters(f"no node with index {index} (the cluster has {len(nodes)})")
    host, _, port = spec.rpartition(":")
    host = host.strip("[]")
    if host and port.isdigit():
        addresses = {host}
        try:
            addresses |= {str(info[4][0]) for info in socket.getaddrinfo(host, int(port))}
        except (OSError, UnicodeError):
            pass
        for index, node in enumerate(nodes):
            if str(node["address"]) in addresses and int(node["port"]) == int(port):
                return index, node
    known = ", ".join(f"{node['address']}:{node['port']}" for node in nodes)
    raise InvalidParameters(f"no node {spec!r}: name one by its index, its node id or"
                            f" HOST:PORT ({known})")


_node_help = "NODE: its index in 'dog node list', its node id, or HOST:PORT."


def _node_spec(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Checked before any connection: an index, or something with a port in it."""
    host, _, port = value.rpartition(":")
    if value.isdigit() or (host and port.partition("/")[0].isdigit()):
        return value
    raise click.BadParameter(f"{value!r} is not a node index, node id or HOST:PORT")


@node.command(epilog=_node_help + " SIZE: like 4T or 500G; 0 drains the node.")
@click.argument("target_node", metavar="NODE", callback=_node_spec)
@click.argument("size", metavar="SIZE", type=SIZE)
@connection_options
def weight(target_node: str, size: int) -> None:
    """Set a node's placement weight: it gets copies in proportion to it, and
    recovery moves the copies that must move ('dog node recovery' shows progress).
    The weight outlives the node's restarts; 'dog cluster reweight' sets every node
    back to its capacity (or its sheep -w)."""
    index, target = find_node(run(lambda client: client.node_list()), target_node)
    result = run(lambda client: client.reweight(target["node_id"], size))
    if result["weight"] == result["before"]:
        click.echo(f"node {index} ({target['node_id']}) already weighs"
                   f" {format_size(result['weight'])}")
        return
    click.echo(f"node {index} ({target['node_id']}): weight {format_size(result['before'])}"
               f" -> {format_size(result['weight'])}; recovery moves the copies"
               " ('dog node recovery' shows it)")


@node.command(epilog=_node_help)
@click.argument("target_node", metavar="NODE", callback=_node_spec)
@connection_options
def kill(target_node: str) -> None:
    """Stop a node (it leaves the cluster; its copies are recovered elsewhere)."""
    from sheep.client import Client

    async def call(client: Client) -> tuple[int, str]:
        index, target = find_node(await client.node_list(), target_node)
        victim = await Client.connect(target["address"], target["port"],
                                          credentials=client.connection.credentials)
        try:
            await victim.kill_node()
        finally:
            victim.close()
        return index, str(target["node_id"])

    index, node_id = run(call)
    click.echo(f"node {index} ({node_id}) is stopping")


def health() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The cluster's health (sheep/health.py, as every command shows it), and the
    members as NODE_LIST answered."""
    info = run(lambda client: client.cluster_info())
    nodes = run(lambda client: client.node_list())
    return cluster_health(info, nodes), nodes


def _summary_text(summary: dict[str, Any]) -> str:
    # While a pass runs, the health text says how far it is already.
    parts = [] if summary["running"] else [objects_done_text(summary)]
    if summary["rate"]:
        parts.append(f"{format_size(int(summary['rate']))}/s")
    if summary["surplus"]:
        parts.append(f"{summary['surplus']} surplus copies to remove")
    if summary["unverified"]:
        parts.append(f"{summary['unverified']} copies to verify")
    return f"{health_text(summary)} ({', '.join(parts)})" if parts else health_text(summary)


watch_interval_s = 0.5


def _watch() -> dict[str, Any]:
    """Show recovery live until every node is done; the last summary."""
    import time

    line = StatusLine()
    summary, _ = health()
    while summary["phase"]:  # recovering or verifying, whatever else is wrong
        done = ((summary["recovered"] + summary["skipped"]) / summary["to_recover"]
                if summary["to_recover"] else None)
        line.show(_summary_text(summary), done)
        time.sleep(watch_interval_s)
        summary, _ = health()
    line.close(_summary_text(summary))
    return summary


@node.command()
@click.option("--max-rate", type=RATE, default=None,
              help="Limit each node's recovery to this many bytes per second, like 100M;"
                   " 0 lifts the limit. Applies at once, to every node, and lasts.")
@click.option("--watch", is_flag=True, help="Show recovery's progress until it ends.")
@json_option
@connection_options
def recovery(max_rate: int | None, watch: bool, as_json: bool) -> None:
    """Recovery on every node: objects to fetch for the current epoch, those copied
    (Recovered), those that needed no copy after all (Skipped: removed meanwhile, or
    written here by a client first), failed, rate, surplus copies still to remove, and
    copies still being verified after a restart."""
    if max_rate is not None:
        run(lambda client: client.set_recovery(max_rate))
        click.echo(f"recovery rate limit: {format_size(max_rate) + '/s' if max_rate else 'none'}")
        if not watch and not as_json:
            return
    if watch:
        summary = _watch()
        if as_json:
            print_json(summary)
        return
    summary, nodes = health()
    items = [{"index": index, "node_id": info["node_id"], **(info.get("recovery") or {})}
             for index, info in enumerate(nodes)]
    if as_json:
        print_json(items)
        return
    rows = [[item["index"], item["node_id"], item.get("epoch", "-"),
             item.get("to_recover", "-"), item.get("recovered", "-"), item.get("skipped", "-"),
             item.get("failed", "-"),
             _rate(item), _limit(item), item.get("surplus", "-"), item.get("unverified", "-"),
             item.get("phase", "-") if "phase" in item else "unreachable",
             item.get("held_by", "-")]
            for item in items]
    # Skipped: wanted, but nothing to copy after all (removed meanwhile, or a client's
    # write made the copy here first).
    print_table(["Id", "Node id", "Epoch", "To recover", "Recovered", "Skipped", "Failed",
                 "Rate", "Allowed", "Surplus", "Unverified", "State", "Held back by"], rows,
                right=["Id", "Epoch", "To recover", "Recovered", "Skipped", "Failed", "Rate",
                       "Allowed", "Surplus", "Unverified"])
    limit = next((item["max_rate"] for item in items if "max_rate" in item), 0)
    click.echo(f"\n{_summary_text(summary)}; rate limit: "
               f"{format_size(limit) + '/s' if limit else 'none'}")
    waiting = sum(item.get("waiting", 0) for item in items)
    if waiting:
        away = sorted({node_id for item in items for node_id in item.get("waiting_for", [])})
        click.echo(f"{waiting} copies wait for node(s) away that may hold newer ones: "
                   f"{', '.join(away)} ('dog cluster recover force' if gone for good)")


stat_ops = ("read", "write", "discard", "flush")


def stat_rows(before: list[dict[str, Any]], after: list[dict[str, Any]],
              seconds: float) -> list[dict[str, Any]]:
    """Per node, from two NODE_LIST samples seconds apart: each operation's rate
    (ops/s), bytes/s and mean latency (ms) over the interval. A node restarted in
    between (its counters went back) or unreachable shows no figures."""
    earlier = {info["node_id"]: info.get("io") or {} for info in before}
    rows = []
    for index, info in enumerate(after):
        row: dict[str, Any] = {"index": index, "node_id": info["node_id"],
                               "address": f"{info['address']}:{info['port']}",
                               "status": info.get("status", "ok")}
        now, then = info.get("io"), earlier.get(info["node_id"])
        if now is not None and then is not None:
            for op in stat_ops:
                a, b = then.get(op, {}), now.get(op, {})
                ops = b.get("ops", 0) - a.get("ops", 0)
                if ops < 0:  # restarted: its counters began again
                    row = {**row, "status": "restarted"}
                    break
                spent = b.get("seconds", 0.0) - a.get("seconds", 0.0)
                row[op] = {"ops_per_s": ops / seconds,
                           "bytes_per_s": (b.get("bytes", 0) - a.get("bytes", 0)) / seconds,
                           "latency_ms": 1000 * spent / ops if ops else None}
        rows.append(row)
    return rows


def _stat_table(rows: list[dict[str, Any]]) -> None:
    table = []
    for row in rows:
        if "read" not in row:
            table.append([row["index"], row["address"], *["-"] * 7, row["status"]])
            continue
        read, write, flush = row["read"], row["write"], row["flush"]
        table.append([row["index"], row["address"], f"{read['ops_per_s']:.0f}",
                      f"{format_size(int(read['bytes_per_s']))}/s", _ms(read["latency_ms"]),
                      f"{write['ops_per_s']:.0f}", f"{format_size(int(write['bytes_per_s']))}/s",
                      _ms(write["latency_ms"]), f"{flush['ops_per_s']:.0f}", row["status"]])
    print_table(["Id", "Address", "Read/s", "Read B/s", "Read ms", "Write/s", "Write B/s",
                 "Write ms", "Flush/s", "Status"], table,
                right=["Id", "Read/s", "Read B/s", "Read ms", "Write/s", "Write B/s",
                       "Write ms", "Flush/s"])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@node.command()
@click.option("-w", "--watch", is_flag=True, help="Show the rates again every interval"
              " until interrupted.")
@click.option("-i", "--interval", type=click.FloatRange(0.1, 3600), default=1.0,
              show_default=True, help="Seconds between the two samples a rate is taken over.")
@json_option
@connection_options
def stat(watch: bool, interval: float, as_json: bool) -> None:
    """VDI I/O each node served as a gateway over the last interval: operations per
    second, bytes per second and mean latency, for reads, writes and flushes
    (discards in --json). The counters are also on each sheep's --metrics-port."""
    import time

    before = run(lambda client: client.node_list())
    while True:
        started = time.monotonic()
        time.sleep(interval)
        after = run(lambda client: client.node_list())
        rows = stat_rows(before, after, time.monotonic() - started)
        if as_json:
            print_json(rows)
        else:
            if watch:
                click.echo(f"\n{time.strftime('%H:%M:%S')}")
            _stat_table(rows)
        if not watch:
            return
        before = after


def _rate(item: dict[str, Any]) -> str:
    rate = item.get("rate")
    return f"{format_size(int(rate))}/s" if rate else "-"


def _limit(item: dict[str, Any]) -> str:
    """The rate recovery may run at now (the scheduler's, tuned to the clients)."""
    if "tuned_rate" not in item:
        return "-"
    rate = item["tuned_rate"]
    return f"{format_size(int(rate))}/s" if rate else "any"


@node.command(epilog=_node_help)
@click.argument("target_node", metavar="NODE", callback=_node_spec)
@click.option("--no-wait", is_flag=True,
              help="Only start the drain; the node stays until you stop it.")
@connection_options
def drain(target_node: str, no_wait: bool) -> None:
    """Move every copy off the node with this index, then stop it.

    The node gets weight 0, so placement gives it nothing; the others fetch its
    copies, and it drops each one only once all the new holders have it, so no
    object ever has fewer copies than before. Refused when the remaining hosts
    cannot hold the copies objects keep."""
    import time

    index, target = find_node(run(lambda client: client.node_list()), target_node)
    run(lambda client: client.reweight(target["node_id"], 0))
    click.echo(f"node {index} ({target['node_id']}) is draining")
    if no_wait:
        return
    from sheep.client import Client

    async def remaining(client: Client) -> dict[str, Any]:
        victim = await Client.connect(target["address"], target["port"],
                                          credentials=client.connection.credentials)
        try:
            return await victim.node_info()
        finally:
            victim.close()

    line = StatusLine()
    info = run(remaining)
    total = max(int(info["objects"]), 1)
    while int(info["objects"]) > 0:
        line.show(f"{info['objects']} copies left on node {index}",
                  1 - int(info["objects"]) / total)
        time.sleep(watch_interval_s)
        info = run(remaining)
    line.close(f"node {index} holds no copies any more")

    async def stop(client: Client) -> None:
        victim = await Client.connect(target["address"], target["port"],
                                          credentials=client.connection.credentials)
        try:
            await victim.kill_node()
        finally:
            victim.close()

    run(stop)
    click.echo(f"node {index} ({target['node_id']}) is stopping")
