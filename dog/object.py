"""dog object: store, fetch and locate raw objects (debugging the object layer).

These work below VDIs, on object ids, like Ceph's ``rados put/get/stat``: for
checking that the cluster places and replicates what it is given.
"""

from __future__ import annotations

import sys
from typing import BinaryIO

import click

from dog.common import OID, connection_options, json_option, run
from dog.output import print_json, print_table
from sheep.client import Client
from sheep.errors import InvalidParameters, NoObject
from sheep.health import health_text, object_health
from sheep.oid import ObjectType, oid_type


def _raw_only(oid: int, action: str) -> None:
    """VDI objects are the VDI layer's: changing them here would corrupt a disk."""
    if oid_type(oid) != ObjectType.RAW:
        raise InvalidParameters(
            f"object {oid:016x} belongs to a VDI ({ObjectType(oid_type(oid)).name.lower()}"
            f" object): {action} it with 'dog vdi' commands, not 'dog object'")


@click.group(name="object")
def object_() -> None:
    """Put, get, locate and remove raw objects by id."""


@object_.command()
@click.argument("oid", type=OID)
@click.argument("source", type=click.File("rb"), default="-")
@click.option("--offset", type=click.IntRange(0), default=0, help="Byte offset in the object.")
@connection_options
def put(oid: int, source: BinaryIO, offset: int) -> None:
    """Write SOURCE (a file, or - for stdin) into object OID, creating it."""
    _raw_only(oid, "write")
    data = source.read()

    async def call(client: Client) -> None:
        info = await client.cluster_info()
        if info["status"] == "ok" and offset + len(data) > info["object_size"]:
            raise InvalidParameters(
                f"{len(data)} bytes at offset {offset} do not fit in an object of "
                f"{info['object_size']} bytes")
        await client.create_and_write(oid, data, offset)

    run(call)


@object_.command()
@click.argument("oid", type=OID)
@click.option("--offset", type=click.IntRange(0), default=0, help="Byte offset in the object.")
@click.option("--length", type=click.IntRange(0), default=None,
              help="Bytes to read (default: to the end of the object).")
@connection_options
def get(oid: int, offset: int, length: int | None) -> None:
    """Write object OID's bytes to stdout."""

    async def call(client: Client) -> bytes:
        count = length
        if count is None:
            count = (await client.cluster_info())["object_size"] - offset
        return await client.read(oid, offset, count)

    sys.stdout.buffer.write(run(call))


@object_.command()
@click.argument("oid", type=OID)
@json_option
@connection_options
def stat(oid: int, as_json: bool) -> None:
    """Which nodes hold object OID under the current epoch, and their versions."""
    from dog.node import health

    value = run(lambda client: client.stat(oid))
    cluster, _ = health()
    value["health"] = object_health(value, cluster)
    if as_json:
        print_json(value)
    if not any("error" not in replica for replica in value["replicas"]):
        raise NoObject(f"object {oid:016x} is on none of its {len(value['replicas'])} nodes")
    if as_json:
        return
    own = value["health"]
    click.echo(f"object {oid:016x}: {own['state']}: {own['held']} of {own['copies']} copies"
               f" at epoch {value['epoch']}")
    click.echo(f"Cluster health: {health_text(cluster)}")
    rows = [[r["node_id"], r["endpoint"], r["zone"], r.get("version", "-"),
             r.get("error", "ok")] for r in value["replicas"]]
    print_table(["Node id", "Address", "Zone", "Version", "Status"], rows,
                right=["Zone", "Version"])


@object_.command()
@click.argument("oid", type=OID)
@connection_options
def rm(oid: int) -> None:
    """Remove object OID from every node that holds it."""
    _raw_only(oid, "remove")
    run(lambda client: client.remove(oid))
