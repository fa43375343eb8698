"""What changed between two states of a VDI, at 4 KiB (dog vdi export-diff).

The tree gives the objects whose entry changed (VdiEngine.changed: it skips every
subtree no newer generation touched); the change pages of the generations between
(sheep/changes.py) give the blocks changed inside each; each object's allocation
(a STAT, no data read) splits those blocks into data to send and zeros. Nothing
here reads the data itself: dog reads the "data" ranges from the snapshot.

The answer is a list of [offset, length, "data" | "zero"] ranges, in order and
apart, for one window of object indexes: a VDI is diffed window by window, so no
answer grows with the VDI's size.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sheep import changes
from sheep.errors import InvalidParameters
from sheep.radix import Root
from sheep.vdi import Objects, VdiEngine
from sheep.vdi_changes import read_masks
from sheep.vdi_registry import VdiRegistry

window_objects_max = 1024  # object indexes one diff request may cover
concurrency = 32  # objects' allocation maps asked at once


def generations_between(to_root: Root, to_lineage: list[int], since: Root) -> list[int]:
    """The generations a tree went through after ``since`` (newest first); refused
    when ``since`` is not an earlier state of it (another VDI's, or rolled back)."""
    chain = [to_root.generation, *to_lineage]
    if since.generation not in chain:
        raise InvalidParameters("the from-snapshot is not an earlier state of the"
                                " snapshot diffed (a rollback or another VDI's?)")
    return chain[:chain.index(since.generation)]


async def diff(engine: VdiEngine, objects: Objects, registry: VdiRegistry, object_size: int,
               to_root: Root, to_lineage: list[int], to_size: int, since: Root | None,
               offset: int, length: int) -> list[list[Any]]:
    """The ranges of [offset, offset + length) (whole objects) that differ from
    ``since`` (None: from an empty VDI, so every allocated range, and no zeros)."""
    if offset % object_size or length % object_size and offset + length < to_size:
        raise InvalidParameters("a diff window starts and ends on object boundaries")
    first = offset // object_size
    end = min(-(-(offset + length) // object_size), -(-to_size // object_size))
    if end - first > window_objects_max:
        raise InvalidParameters(f"a diff window covers at most {window_objects_max} objects")
    if since is None:
        generations = None
        whole = True
    else:
        between = generations_between(to_root, to_lineage, since)
        generations = set(between)
        whole = not all(registry.tracked(g) for g in between)
    pages: dict[tuple[int, int], dict[int, int]] = {}
    every = changes.whole(object_size)
    found: list[list[Any]] = []

    def add(start: int, count: int, kind: str) -> None:
        count = min(count, to_size - start)
        if count <= 0:
            return
        if found and found[-1][2] == kind and found[-1][0] + found[-1][1] == start:
            found[-1][1] += count
        else:
            found.append([start, count, kind])

    entries = await engine.changed(to_root, generations, since, first, end)
    limit = asyncio.Semaphore(concurrency)

    async def spans(index: int, now: int, before: int) -> list[tuple[int, int, str]]:
        if whole or generations is None:
            blocks = every
        else:
            blocks = 0
            for generation in generations:
                blocks |= await read_masks(objects, object_size, generation, index, pages)
            # An entry changed with no block noted: trust nothing, take it whole.
            blocks = blocks or every
        async with limit:  # a STAT of the object's copies each
            allocated = await engine.data_map(now) if now else 0
            zeros = blocks & ~allocated
            if zeros and since is not None and before:  # zeros matter where there was data
                zeros &= await engine.data_map(before)
            elif since is None or not before:
                zeros = 0
        data = blocks & allocated
        return sorted([(b, n, "data") for b, n in changes.runs(data)]
                      + [(b, n, "zero") for b, n in changes.runs(zeros)])

    # The pages first, one read each (cached): the objects' maps then all at once.
    for index, _, _ in entries:
        if not whole and generations is not None:
            for generation in generations:
                await read_masks(objects, object_size, generation, index, pages)
    answers = await asyncio.gather(*(spans(*entry) for entry in entries))
    for (index, _, _), found_spans in zip(entries, answers, strict=True):
        base = index * object_size
        for block, count, kind in found_spans:
            add(base + block * changes.BLOCK, count * changes.BLOCK, kind)
    return found
