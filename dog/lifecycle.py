"""dog vdi du (Ceph's rbd du): space per VDI and per snapshot."""

from __future__ import annotations

from typing import Any

import click

from dog.common import connection_options, json_option, run
from dog.output import print_json, print_table
from dog.vdi import vdi
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
