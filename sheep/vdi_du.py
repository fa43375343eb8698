"""Space accounting (dog vdi du): what each VDI and snapshot uses, and holds alone.

Every live root in the cluster (every VDI's current tree and every snapshot) is
walked, and each object reached counts how many roots, and which VDIs, reach it.
For each image (a VDI's current state, or a snapshot):

- used: the allocated bytes (4 KiB blocks, sheep/changes.py) of the data objects
  its tree reaches, per copy: what reading all of it reads;
- exclusive: those of the data objects no other root reaches, per copy: what
  deleting it frees (the collector frees exactly the objects no live root reaches);
- exclusive_metadata: the same for its tree nodes;
- *_stored: with every copy counted (the copies its objects keep).

A VDI's own line gives what deleting it with all its snapshots frees: the objects
none of its roots shares with another VDI (a clone shares its parent's snapshot).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from sheep import changes, radix
from sheep.group import Group
from sheep.radix import Root
from sheep.vdi import VdiEngine

concurrency = 32  # allocation maps asked at once


async def usage(engine: VdiEngine, group: Group, names: list[str] | None) -> list[dict[str, Any]]:
    state = group.state
    images: list[tuple[str, dict[str, Any], Root]] = []
    for vdi in list(state.vdis.vdis.values()):
        images.append((vdi.name, {"tag": "", "id": vdi.id, "snapshot": False,
                                  "provisioned": vdi.size}, vdi.root))
        for snap in vdi.snapshots:
            images.append((vdi.name, {"tag": snap.tag, "id": snap.id, "snapshot": True,
                                      "provisioned": snap.size}, snap.root))
    reached: list[set[int]] = []
    roots: collections.Counter[int] = collections.Counter()
    owners: dict[int, set[str]] = collections.defaultdict(set)
    for name, _, root in images:
        node = await engine.root_node(root)
        found = await engine.walk(node) if node else set()
        reached.append(found)
        roots.update(found)
        for oid in found:
            owners[oid].add(name)
    asked = [i for i, (name, _, _) in enumerate(images) if name in names] if names else [
        i for i, (name, _, _) in enumerate(images) if state.vdis.vdis[name].trash is None]
    wanted = set().union(*(reached[i] for i in asked)) if asked else set()
    allocated = await _allocation(engine, wanted)

    def tally(oids: set[int] | list[int]) -> dict[str, int]:
        data = meta = data_stored = meta_stored = 0
        for oid in oids:
            size = allocated.get(oid, 0)
            copies = group.copies_for(oid)
            if radix.is_data(oid):
                data, data_stored = data + size, data_stored + size * copies
            else:
                meta, meta_stored = meta + size, meta_stored + size * copies
        return {"bytes": data, "metadata": meta, "stored": data_stored,
                "metadata_stored": meta_stored}

    by_vdi: dict[str, dict[str, Any]] = {}
    for i in asked:
        name, row, _ = images[i]
        used = tally(reached[i])
        alone = tally([oid for oid in reached[i] if roots[oid] == 1])
        row.update({"used": used["bytes"], "used_stored": used["stored"],
                    "exclusive": alone["bytes"], "exclusive_stored": alone["stored"],
                    "exclusive_metadata": alone["metadata"],
                    "exclusive_metadata_stored": alone["metadata_stored"]})
        entry = by_vdi.setdefault(name, {"name": name, "images": [], "oids": set()})
        entry["images"].append(row)
        entry["oids"] |= reached[i]
    result = []
    for name, entry in by_vdi.items():
        vdi = state.vdis.vdis[name]
        oids = entry.pop("oids")
        used = tally(oids)
        alone = tally([oid for oid in oids if owners[oid] == {name}])
        entry.update({"provisioned": vdi.size, "copies": vdi.copies,
                      "used": used["bytes"], "used_stored": used["stored"],
                      "exclusive": alone["bytes"], "exclusive_stored": alone["stored"],
                      "exclusive_metadata": alone["metadata"],
                      "exclusive_metadata_stored": alone["metadata_stored"]})
        result.append(entry)
    return result


async def _allocation(engine: VdiEngine, oids: set[int]) -> dict[int, int]:
    """Allocated bytes of each object (its allocation map, no data read)."""
    found: dict[int, int] = {}
    limit = asyncio.Semaphore(concurrency)

    async def one(oid: int) -> None:
        async with limit:
            found[oid] = changes.count(await engine.data_map(oid)) * changes.BLOCK

    await asyncio.gather(*(one(oid) for oid in oids))
    return found
