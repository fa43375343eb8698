"""dog cluster: format, info, check, scrub, shutdown, recover."""

from __future__ import annotations

import functools
import itertools
import os
import time
from typing import Any

import click

from dog.common import (
    DURATION,
    RATE,
    SIZE,
    Target,
    connection_options,
    credential_options,
    json_option,
    run,
)
from dog.output import Progress, StatusLine, format_time, print_json, print_table
from sheep import auth, constants
from sheep.errors import EXIT_FAILURE, NoObject, Timeout, Unavailable
from sheep.health import capacity_limits, capacity_text, cluster_health, health_text
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
@click.option("--encrypt", is_flag=True,
              help="Encrypt every frame (AES-GCM), not only sign it (the default).")
@click.option("--keyring", "output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the first admin key. Default: the keyring dog reads"
                   " (--keyring before the command, DOG_KEYRING), else"
                   " ~/.config/sheepdog/keyring.")
@functools.partial(connection_options, credentials=False)
@functools.partial(credential_options, keyring=False)
def format(copies: int, object_size: int, force: bool, encrypt: bool,  # noqa: A001
           output: str | None) -> None:
    """Format the cluster: fix copies and object size, erase all objects, and make the
    first admin key."""
    target = click.get_current_context().ensure_object(Target)
    target.prefer_node = True  # before the first format there is no admin key
    result = run(lambda client: client.format(copies, object_size, force, encrypt))
    path = output or target.keyring or os.environ.get("DOG_KEYRING") or auth.config_keyring_path()
    admin = result["admin"]
    entry = auth.Entry(auth.decode_key(admin["key"]), auth.Caps.parse(admin["caps"]))
    kept = _keep_replaced(path, admin["name"], entry)
    auth.merge_into_keyring(path, admin["name"], entry)
    click.echo(f"formatted: {result['copies']} copies, "
               f"{format_size(result['object_size'])} objects"
               f"{', frames encrypted' if encrypt else ''}")
    click.echo(f"admin key ({admin['name']}) written to {path}")
    if kept is not None:
        click.echo(f"the {admin['name']} key {path} held before (another cluster's, or this"
                   f" one's before the format) is kept in {kept}")


def _keep_replaced(path: str, name: str, entry: auth.Entry) -> str | None:
    """A keyring shared by two clusters would lose the first one's admin key to the
    second's format: a different key for the name is kept in a file of its own."""
    try:
        old = auth.load_keyring(path).get(name) if os.path.exists(path) else None
    except auth.KeyringError:
        return None  # merge_into_keyring says what is wrong with it
    if old is None or old.key == entry.key:
        return None
    for attempt in itertools.count():
        kept = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}{f'.{attempt}' if attempt else ''}.old"
        try:
            auth.write_keyring(kept, {name: old}, exclusive=True)
        except FileExistsError:
            continue
        return kept
    return None


def _status_text(info: dict[str, Any]) -> str:
    if info["status"] == "wait_for_format":
        return "waiting for the cluster to be formatted"
    if info["status"] == "shutdown":
        members = {node["node_id"] for node in info["members"]}
        missing = [node_id for node_id in info.get("waiting_for", []) if node_id not in members]
        return (f"waiting for {len(missing)} node(s) of the last epoch to come back: "
                f"{', '.join(missing)} ('dog cluster recover force' goes on without them)")
    return "running"


def _sessions(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each member's coordination session, for drivers that have one (ZooKeeper): the
    server it is connected to, the negotiated timeout, and its state: connected,
    suspended (the connection lost, serving on its lease) or fenced."""
    sessions = []
    for node in nodes:
        driver = node.get("driver") or {}
        if "state" not in driver and node.get("status") != "unreachable":
            continue
        sessions.append({
            "node": f"{node.get('address')}:{node.get('port')}",
            "server": driver.get("server"),
            "negotiated_timeout": driver.get("negotiated_timeout"),
            "state": driver.get("state", "unreachable"),
            "lease_remaining": float(driver.get("lease_remaining") or 0.0)})
    return sessions if any(session["state"] != "unreachable" for session in sessions) else []


@cluster.command()
@json_option
@connection_options
def info(as_json: bool) -> None:
    """Show the cluster's status, health, parameters, what limits its usable space, and
    its epoch history."""
    value = run(lambda client: client.cluster_info())
    nodes: list[dict[str, Any]] = []
    if value["status"] == "ok" or value["driver"].get("driver") == "zookeeper":
        nodes = run(lambda client: client.node_list())
    value["health"] = cluster_health(value, nodes)
    limits = capacity_limits(nodes, int(value.get("copies") or 0))
    if limits is not None:
        value["space"] = limits
    sessions = _sessions(nodes)
    if sessions:
        value["sessions"] = sessions
    if as_json:
        print_json(value)
        return
    click.echo(f"Cluster status: {_status_text(value)}")
    click.echo(f"Cluster health: {health_text(value['health'])}")
    if value["status"] in ("ok", "shutdown"):
        click.echo(f"Cluster created at {format_time(value['format_time'])}")
        click.echo(f"Copies: {value['copies']}, object size: {format_size(value['object_size'])}")
    if limits is not None:
        for line in capacity_text(limits, format_size):
            click.echo(line)
    driver = value["driver"]
    where = driver.get("directory") or (
        f"{driver['hosts']}{driver.get('prefix', '')}" if driver.get("hosts") else "")
    state = ""
    if driver.get("state") == "fenced" or (driver.get("fenced") and "connection" in driver):
        state = f" ({driver['connection']}, FENCED: this sheep serves no I/O)"
    elif driver.get("state") == "suspended":
        state = (f" (suspended: serving on its session's lease for "
                 f"{float(driver.get('lease_remaining') or 0):.1f} s more)")
    elif "connection" in driver:
        state = f" ({driver['connection']}" + (f" to {driver['server']}"
                                               if driver.get("server") else "") + ")"
    click.echo(f"Cluster driver: {driver['driver']} {where}".rstrip() + state)
    click.echo(f"Epoch: {value['epoch']}, nodes: {len(value['members'])}, "
               f"hosts: {value['zones']}, racks: {value.get('racks', value['zones'])}")
    if value.get("lost"):
        click.echo(f"Declared lost: {', '.join(value['lost'])}")
    if sessions:
        click.echo("")
        print_table(["Node", "ZooKeeper server", "Session timeout", "State", "Lease left"], [
            [session["node"], session["server"] or "-",
             "-" if session["negotiated_timeout"] is None
             else f"{session['negotiated_timeout']:g} s", session["state"],
             f"{session['lease_remaining']:.1f} s"] for session in sessions])
    click.echo("")
    rows = []
    for entry in reversed(value["epochs"]):
        members = ", ".join(f"{node['address']}:{node['port']}" for node in entry["nodes"])
        rows.append([entry["epoch"], format_time(entry["time"]), members or "(none)"])
    print_table(["Epoch", "Time", "Nodes"], rows, right=["Epoch"])


shutdown_poll_s = 0.1


def _is_local(address: str) -> bool:
    """Whether address is one of this host's (a socket can be bound to it)."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


def _process_gone(pid: int) -> bool:
    """The process has exited (a zombie its parent has not reaped yet counts)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _port_closed(address: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((address, port), timeout=1.0):
            return False
    except OSError:
        return True


def _sheep_gone(node: dict[str, Any]) -> bool:
    """A sheep on this host is gone once its process is; one elsewhere once its port
    no longer accepts connections (it closes the port first, then syncs its store)."""
    address, port, pid = str(node["address"]), int(node["port"]), node.get("pid")
    if isinstance(pid, int) and _is_local(address):
        return _process_gone(pid)
    return _port_closed(address, port)


@cluster.command()
@click.option("--no-wait", is_flag=True,
              help="Return once the shutdown is logged, not when every sheep has exited.")
@click.option("--timeout", type=DURATION, default=120, show_default=True,
              help="How long to wait for every sheep to exit, like 2m.")
@connection_options
def shutdown(no_wait: bool, timeout: int) -> None:
    """Stop every sheep of the cluster cleanly (their data stays), and wait until
    each has exited: a sheep on this host until its process is gone, one on
    another host until its port is closed."""
    import time

    nodes = [node for node in run(lambda client: client.node_list())
             if node.get("status") != "unreachable"]
    run(lambda client: client.shutdown())
    if no_wait:
        click.echo(f"cluster shutting down ({len(nodes)} sheep)")
        return
    line = StatusLine()
    deadline = time.monotonic() + timeout
    left = nodes
    while left:
        left = [node for node in left if not _sheep_gone(node)]
        if not left:
            break
        if time.monotonic() >= deadline:
            line.clear()
            names = ", ".join(f"{node['address']}:{node['port']}" for node in left)
            raise Timeout(f"{len(left)} of {len(nodes)} sheep still running after {timeout} s:"
                          f" {names}")
        line.show(f"waiting for {len(left)} of {len(nodes)} sheep to exit",
                  1 - len(left) / len(nodes))
        time.sleep(shutdown_poll_s)
    line.clear()
    click.echo(f"cluster shut down: {len(nodes)} sheep stopped")


@cluster.group()
def recover() -> None:
    """Decide about nodes that do not come back."""


@recover.command()
@click.argument("nodes", nargs=-1)
@connection_options
def force(nodes: tuple[str, ...]) -> None:
    """Give up on the missing NODES (node ids; default: every node that is not a
    member): the cluster serves again after a shutdown without them, and objects
    whose newest copy may be on them stop waiting for them."""
    value = run(lambda client: client.force_recover(list(nodes) if nodes else None))
    lost = value.get("lost") or []
    given_up = value.get("given_up") or []
    click.echo(f"declared {len(lost)} node(s) lost" + (f": {', '.join(lost)}" if lost else ""))
    if given_up:
        click.echo(f"the cluster serves again; gave up waiting for {len(given_up)} node(s): "
                   f"{', '.join(given_up)}")


check_batch = 64


def _objects(vdi: str | None) -> list[int]:
    """Every object some node stores; with vdi, only those of that VDI's generations
    (the VDI's own and its snapshots'; data shared from a clone's source is the
    source's)."""
    from sheep.client import Client
    from sheep.oid import VDI_TYPES, oid_generation, oid_type

    async def gather(client: Client) -> list[int]:
        generations: set[int] | None = None
        if vdi is not None:
            entries = await client.vdi_list([vdi], usage=False)
            if not entries:
                raise NoObject(f"no VDI named {vdi!r}")
            generations = {entry["generation"] for entry in entries}
        oids: set[int] = set()
        for node in await client.node_list():
            if node.get("status") == "unreachable":
                raise Unavailable(f"node {node['node_id']} is unreachable; cannot list its objects")
            peer = await Client.connect(node["address"], node["port"],
                                        credentials=client.connection.credentials)
            try:
                oids.update(await peer.list_objects())
            finally:
                peer.close()
        if generations is not None:
            oids = {oid for oid in oids if oid_type(oid) in VDI_TYPES
                    and oid_generation(oid) in generations}
        return sorted(oids)

    return run(gather)


def _walk(oids: list[int], scrub: bool, label: str) -> list[dict[str, Any]]:
    from sheep.client import Client

    progress = Progress(len(oids), label)
    results: list[dict[str, Any]] = []

    async def walk(client: Client) -> None:
        for start in range(0, len(oids), check_batch):
            batch = oids[start:start + check_batch]
            results.extend(await client.check_objects(batch, scrub=scrub))
            progress.update(len(batch))

    try:
        run(walk)
    finally:
        progress.close()
    return results


def _report(results: list[dict[str, Any]], verb: str, as_json: bool,
            health: dict[str, Any] | None = None) -> None:
    """Print what a check or scrub found; exit 1 if an object is left short or lost."""
    counts = {state: 0 for state in ("ok", "repaired", "verifying", "degraded", "lost",
                                     "removed", "error")}
    for result in results:
        counts[result["state"]] = counts.get(result["state"], 0) + 1
    copies_made = sum(len(result.get("repaired", [])) for result in results)
    damaged = sum(len(result.get("damaged", [])) for result in results)
    bad = [result for result in results if result["state"] in ("degraded", "lost", "error")]
    if as_json:
        print_json({"objects": len(results), "copies_made": copies_made,
                    "damaged_copies": damaged, **counts, "problems": bad,
                    **({"health": health} if health is not None else {})})
    else:
        click.echo(f"{len(results)} objects {verb}: {counts['ok']} fine, {counts['repaired']}"
                   f" repaired ({copies_made} copies made"
                   + (f", {damaged} damaged copies found" if verb == "scrubbed" else "")
                   + f"), {counts['degraded']} degraded, {counts['lost']} lost,"
                   f" {counts['error']} unchecked"
                   + (f", {counts['verifying']} being verified (no verified copy yet:"
                      " check again once the cluster is healthy)"
                      if counts["verifying"] else ""))
        for result in bad:
            detail = result.get("error") or (
                f"{result['good']}/{result['copies']} good copies"
                + (f", unreachable: {', '.join(result['unreachable'])}"
                   if result.get("unreachable") else ""))
            click.echo(f"  {result['oid']:016x}: {result['state']}: {detail}")
    if bad:
        raise SystemExit(EXIT_FAILURE)


def _settled(no_wait: bool, as_json: bool) -> dict[str, Any]:
    """The cluster's health once recovery (or a restart's verification) is done:
    what a check finds meanwhile is recovery's work in progress, not a fault."""
    from dog.node import _watch, health

    summary, _ = health()
    if summary["phase"] and not no_wait:
        if not as_json:
            click.echo(f"Cluster health: {health_text(summary)}; waiting for it to finish"
                       " (--no-wait checks now)", err=True)
        summary = _watch()
    if not as_json:
        click.echo(f"Cluster health: {health_text(summary)}")
    return summary


@cluster.command()
@click.option("--no-wait", is_flag=True,
              help="Check at once, even while recovery is running (what it has not"
                   " fetched yet shows as repaired or degraded).")
@json_option
@connection_options
def check(no_wait: bool, as_json: bool) -> None:
    """Check every object of the cluster and repair those with fewer than N good copies.

    Every node's objects are listed; for each, the newest copy is copied to the
    holders that lack it or hold an older or unverified one. A recovery under way
    (after a node left, joined or restarted) is waited for first. Exit status 0
    when every object has its copies, 1 when some could not be repaired (the
    cluster is degraded: its health line says why)."""
    summary = _settled(no_wait, as_json)
    _report(_walk(_objects(None), False, "checking objects"), "checked", as_json, summary)


@cluster.command()
@click.option("--vdi", default=None, help="Only the objects of this VDI and its snapshots.")
@click.option("--background-rate", type=RATE, default=None,
              help="Set the background scrub instead: bytes per second on each node,"
                   " like 8M; 0 turns it off.")
@click.option("--every", type=DURATION, default=None,
              help="With --background-rate: time from one background pass to the next,"
                   " like 24h.")
@json_option
@connection_options
def scrub(vdi: str | None, background_rate: int | None, every: int | None,
          as_json: bool) -> None:
    """Verify every block of every copy, compare the replicas, repair what is wrong.

    Each holder reads its whole copy and checks it against its checksums; a damaged
    copy, a missing or older one, and one whose contents differ from the newest are
    replaced by the newest good copy. Prints what was found and fixed; exit status 1
    when some object is left without its copies. Every node also scrubs its own
    copies in the background (see --background-rate and 'dog node info')."""
    if background_rate is not None or every is not None:
        value = run(lambda client: client.set_scrub(background_rate, every))
        if as_json:
            print_json(value)
            return
        rate = value["max_rate"]
        click.echo(f"background scrub: {format_size(rate) + '/s per node' if rate else 'off'},"
                   f" a pass every {_duration(value['interval'])}")
        return
    _report(_walk(_objects(vdi), True, "scrubbing objects"), "scrubbed", as_json)


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@cluster.command()
@connection_options
def reweight() -> None:
    """Set every node's placement weight back to its capacity (the free space it
    started with, or its sheep -w), undoing 'dog node weight'; recovery moves the
    copies that must move ('dog node recovery' shows progress)."""
    nodes = run(lambda client: client.node_list())
    changed = 0
    for index, node in enumerate(nodes):
        node_id = str(node["node_id"])
        result = run(lambda client: client.reweight(node_id, None))  # noqa: B023 - run now
        if result["weight"] != result["before"]:
            changed += 1
            click.echo(f"node {index}: weight {format_size(result['before'])} ->"
                       f" {format_size(result['weight'])}")
    click.echo(f"{changed} of {len(nodes)} node(s) reweighted"
               + ("; recovery moves the copies ('dog node recovery' shows it)" if changed
                  else ""))


@cluster.command(name="alter-copy")
@click.option("-c", "--copies", type=click.IntRange(1, constants.copies_max), required=True,
              help="The cluster's default copies from now on.")
@connection_options
def alter_copy(copies: int) -> None:
    """Change the cluster's default copies: objects of VDIs created without --copies
    (and not given their own by 'dog vdi alter-copy') follow; recovery adds or drops
    copies in the background ('dog node recovery' shows it)."""
    value = run(lambda client: client.alter_copy(copies))
    followed = value.get("vdis") or []
    click.echo(f"the cluster keeps {value['copies']} copies (was {value['before']});"
               f" {len(followed)} VDI(s) follow; recovery is adjusting their objects")
