"""dog vdi du (Ceph's rbd du), dog vdi trash (rbd trash), alter-copy (Sheepdog's),
rename and info (rbd's)."""

from __future__ import annotations

import time
from typing import Any

import click

from dog.common import DURATION, connection_options, json_option, run
from dog.output import format_time, print_json, print_table, table
from dog.vdi import qos_text, vdi
from sheep.errors import NoVdi, SheepError
from sheep.size import format_size


@vdi.command()
@click.argument("name", required=False)
@json_option
@connection_options
def du(name: str | None, as_json: bool) -> None:
    """Space used by NAME (or every VDI) and each of its snapshots.

    PROVISIONED is the size; USED the allocated bytes its tree reaches (4 KiB
    blocks, per copy); EXCLUSIVE what no other image reaches: what deleting it
    frees. A VDI's <TOTAL> line is what deleting it with its snapshots frees.
    STORED counts every copy (EXCLUSIVE times the copies kept).
    """
    items: list[dict[str, Any]] = run(lambda client: client.vdi_du(name))
    if as_json:
        print_json(items)
        return
    rows = []
    for item in sorted(items, key=lambda i: i["name"]):
        images = sorted(item["images"], key=lambda i: (not i["snapshot"], i["id"]))
        for image in images:
            label = f"{item['name']}@{image['tag'] or image['id']}" if image["snapshot"] \
                else item["name"]
            rows.append([label, format_size(image["provisioned"]), format_size(image["used"]),
                         format_size(image["exclusive"]), format_size(image["exclusive_stored"])])
        if len(images) > 1:
            rows.append([f"{item['name']} <TOTAL>", format_size(item["provisioned"]),
                         format_size(item["used"]), format_size(item["exclusive"]),
                         format_size(item["exclusive_stored"])])
    print_table(["Name", "Provisioned", "Used", "Exclusive", "Stored"], rows,
                right=["Provisioned", "Used", "Exclusive", "Stored"])


# --- the trash (Ceph's rbd trash) ------------------------------------------------

@vdi.group()
def trash() -> None:
    """Move VDIs to the trash and back: hidden, not freed, until purged."""


@trash.command(name="mv")
@click.argument("name")
@click.option("--expires-in", type=DURATION, default=None,
              help="Purge it automatically after this long (e.g. 7d; default: never).")
@connection_options
def trash_mv(name: str, expires_in: float | None) -> None:
    """Move VDI NAME, with its snapshots, into the trash. Its name stays taken."""
    run(lambda client: client.vdi_trash(name, expires_in))
    when = f", purged after {format_duration(expires_in)}" if expires_in is not None else ""
    click.echo(f"moved VDI {name!r} to the trash{when}")


@trash.command(name="list")
@json_option
@connection_options
def trash_list(as_json: bool) -> None:
    """List the VDIs in the trash."""
    items = [i for i in run(lambda client: client.vdi_trash_list()) if not i["snapshot"]]
    if as_json:
        print_json([{"name": i["name"], "id": i["id"], "size": i["size"],
                     "deleted": i["trash"]["time"], "expires": i["trash"].get("expires")}
                    for i in items])
        return
    rows = [[i["name"], i["id"], format_size(i["size"]), format_time(i["trash"]["time"]),
             format_time(i["trash"]["expires"]) if i["trash"].get("expires") else "never"]
            for i in sorted(items, key=lambda i: i["name"])]
    print_table(["Name", "Id", "Size", "Deleted", "Expires"], rows, right=["Id", "Size"])


@trash.command(name="restore")
@click.argument("name")
@connection_options
def trash_restore(name: str) -> None:
    """Bring VDI NAME back from the trash, as it was."""
    run(lambda client: client.vdi_trash_restore(name))
    click.echo(f"restored VDI {name!r} from the trash")


@trash.command(name="purge")
@click.argument("name", required=False)
@click.option("--expired", is_flag=True,
              help="Purge only what has expired (the default without NAME); with NAME,"
                   " purge it only if it has expired, else fail (exit 1) saying when it"
                   " expires.")
@click.option("--all", "everything", is_flag=True, help="Purge every VDI in the trash.")
@connection_options
def trash_purge(name: str | None, expired: bool, everything: bool) -> None:
    """Delete NAME (or the expired VDIs, or --all) from the trash for good."""
    if name and everything:
        raise click.UsageError("give NAME or --all, not both")

    async def call(client: Any) -> list[str]:
        if name and not expired:
            await client.vdi_purge(name)
            return [name]
        now = time.time()
        purged = []
        items = [i for i in await client.vdi_trash_list() if not i["snapshot"]]
        if name:
            items = [_expired_entry(items, name, now)]
        for item in items:
            expires = item["trash"].get("expires")
            if not (everything or (expires is not None and expires <= now)):
                continue
            await client.vdi_purge(item["name"], None if everything else expires)
            purged.append(item["name"])
        return purged

    purged = run(call)
    click.echo(f"purged {len(purged)} VDI(s) from the trash" +
               (f": {', '.join(purged)}" if purged else ""))


def _expired_entry(items: list[dict[str, Any]], name: str, now: float) -> dict[str, Any]:
    """NAME's trash entry, if its time ran out; else why it cannot be purged as expired."""
    item = next((i for i in items if i["name"] == name), None)
    if item is None:
        raise NoVdi(f"VDI {name!r} is not in the trash")
    expires = item["trash"].get("expires")
    if expires is None:
        raise SheepError(f"VDI {name!r} has not expired: it never expires (it was moved to"
                         " the trash without --expires-in); purge it without --expired")
    if expires > now:
        raise SheepError(f"VDI {name!r} has not expired: it expires at"
                         f" {format_time(expires)}; purge it without --expired to purge it"
                         " now")
    return item


def format_duration(seconds: float) -> str:
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# --- copies (Sheepdog's alter-copy) -------------------------------------------------


@vdi.command(name="alter-copy")
@click.argument("name")
@click.option("-c", "--copies", type=click.IntRange(1, 8), required=True,
              help="Copies its objects keep from now on.")
@connection_options
def alter_copy(name: str, copies: int) -> None:
    """Change how many copies VDI NAME's objects keep; recovery adds or drops them
    in the background ('dog node recovery' shows it)."""
    value = run(lambda client: client.vdi_alter_copy(name, copies))
    click.echo(f"VDI {value['name']!r} keeps {value['copies']} copies; recovery is adjusting"
               " its objects ('dog node recovery')")


# --- rename and info (rbd's) ------------------------------------------------------


@vdi.command()
@click.argument("name")
@click.argument("new_name")
@connection_options
def rename(name: str, new_name: str) -> None:
    """Rename VDI NAME to NEW_NAME, with its snapshots (clones follow it).

    Refused while the VDI is being written (its lock is held): stop its writer first.
    Names in the trash stay taken.
    """
    if "@" in name:
        raise click.UsageError("rename takes a VDI: its snapshots go with it")
    run(lambda client: client.vdi_rename(name, new_name))
    click.echo(f"renamed VDI {name!r} to {new_name!r}")


@vdi.command()
@click.argument("name")
@json_option
@connection_options
def info(name: str, as_json: bool) -> None:
    """Show VDI NAME: size, copies, lock, QoS, trash, parent, snapshots and space.

    Space is counted as dog vdi du counts it: USED the allocated bytes its tree
    reaches, EXCLUSIVE what no other image reaches, STORED that with every copy;
    "with snapshots", what deleting the VDI frees.
    """
    value: dict[str, Any] = run(lambda client: client.vdi_info(name))
    if as_json:
        print_json(value)
        return
    click.echo(render_info(value))


def _space(figures: dict[str, int]) -> str:
    """As dog vdi du's columns: USED, EXCLUSIVE, STORED (EXCLUSIVE, every copy)."""
    return (f"used {format_size(figures['used'])}, exclusive"
            f" {format_size(figures['exclusive'])}, stored"
            f" {format_size(figures['exclusive_stored'])}")


def render_info(value: dict[str, Any]) -> str:
    """dog vdi info's text: one "Key: value" line each, then the snapshots' table."""
    lines: list[tuple[str, str]] = [("Name", f"{value['name']} (id {value['id']})"),
                                    ("Size", format_size(value["size"])),
                                    ("Created", format_time(value["ctime"]))]
    default = value["cluster_copies"]
    lines.append(("Copies", f"{value['copies']} (the cluster's default)"
                  if value["copies_from"] == "cluster"
                  else f"{value['copies']} (its own; the cluster's default is {default})"))
    parent = value.get("parent")
    if parent:
        gone = ", since deleted" if parent.get("deleted") else ""
        snapshot = parent.get("tag") or parent["snapshot"]
        lines.append(("Parent", f"clone of {parent['vdi']}@{snapshot}{gone}"))
    lock = value.get("lock")
    lines.append(("Lock", f"held by {lock['owner'] or lock['node_id']} since"
                          f" {format_time(lock['since'])}" if lock else "none"))
    if value.get("unsettled"):
        lines.append(("Unsettled", "its writer's sheep left mid-write; the next open settles it"))
    if value.get("qos"):
        lines.append(("QoS", qos_text(value["qos"])))
    trash = value.get("trash")
    if trash:
        until = (f"purged from {format_time(trash['expires'])}" if trash.get("expires")
                 else "until purged by hand")
        lines.append(("Trash", f"in it since {format_time(trash['time'])}, {until}"))
    if value.get("attrs"):
        lines.append(("Attributes", str(value["attrs"])))
    snaps = value["snapshots"]
    lines.append(("Space", _space(value["usage"])))
    if snaps:
        lines.append(("With snapshots", _space(value["total"])))
    lines.append(("Snapshots", str(len(snaps))))
    width = max(len(key) for key, _ in lines) + 1
    text = "\n".join(f"{key + ':':<{width}} {item}" for key, item in lines)
    if snaps:
        rows = [[snap["id"], snap["tag"] or "-", format_size(snap["size"]),
                 format_time(snap["ctime"]), format_size(snap["used"]),
                 format_size(snap["exclusive"])] for snap in snaps]
        text += "\n\n" + table(["Id", "Tag", "Size", "Created", "Used", "Exclusive"], rows,
                                right=["Id", "Size", "Used", "Exclusive"])
    return text
