"""The lock holder's change masks: collected per write, saved in change pages.

The format and the rules are in sheep/changes.py. Here: the writable generations'
masks kept in memory by the sheep where the VDI's writer is, and saved (ORed into
the pages already there, each page durable: FUA) when something is about to depend on them:
a snapshot freezing the generation, a handoff, a close; and in the background once
a generation has many unsaved masks, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sheep import changes
from sheep.errors import NoObject
from sheep.vdi import Objects

log = logging.getLogger(__name__)

pending_max = 4096  # unsaved object masks of one generation before a background save
page_concurrency = 16  # change pages read or written at once by a save
directory_read_bytes = 64 << 10  # a directory is read this far first (16,384 pages)


class ChangeLog:
    def __init__(self, objects: Objects, object_size: Callable[[], int]) -> None:
        self.objects = objects
        self.object_size = object_size
        self._pending: dict[int, dict[int, int]] = {}  # generation -> {index: mask}
        self._locks: dict[int, asyncio.Lock] = {}
        self._background: set[int] = set()  # generations being saved in the background
        self._tasks: set[asyncio.Task[None]] = set()
        self.saving = 0  # saves under way (the simulator waits for them before it checks)

    def note(self, generation: int, offset: int, count: int) -> None:
        """Bytes [offset, offset + count) of the VDI change in ``generation``: noted
        before the change is made, so no change is ever acknowledged unnoted."""
        masks = self._pending.setdefault(generation, {})
        for index, value in changes.masks_of_range(offset, count, self.object_size()).items():
            masks[index] = masks.get(index, 0) | value
        if len(masks) >= pending_max and generation not in self._background:
            self._background.add(generation)
            task = asyncio.get_running_loop().create_task(self._save_quietly(generation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def pending(self, generation: int) -> int:
        return len(self._pending.get(generation, {}))

    async def _save_quietly(self, generation: int) -> None:
        try:
            await self.save(generation)
        except Exception as error:  # kept in memory: the next save tries again
            log.warning("could not save the change masks of generation %d: %s",
                        generation, error)
        finally:
            self._background.discard(generation)

    async def save(self, generation: int) -> None:
        """Make the generation's noted masks durable in its change pages. On failure
        they stay noted (the caller refuses what needed them, or marks the
        generation untracked)."""
        lock = self._locks.setdefault(generation, asyncio.Lock())
        self.saving += 1
        try:
            await self._save(generation, lock)
        finally:
            self.saving -= 1

    async def _save(self, generation: int, lock: asyncio.Lock) -> None:
        async with lock:
            masks = self._pending.pop(generation, None)
            if not masks:
                return
            try:
                await self._write(generation, masks)
            except BaseException:
                kept = self._pending.setdefault(generation, {})
                for index, value in masks.items():
                    kept[index] = kept.get(index, 0) | value
                raise

    def forget(self, generation: int) -> None:
        """The generation's masks are no longer wanted (it was marked untracked, or it
        died). Its lock goes only when nobody holds or waits for it: two saves of one
        generation must never run at once (each ORs into the page it read, and the
        later write would drop the other's masks)."""
        self._pending.pop(generation, None)
        lock = self._locks.get(generation)
        if lock is not None and not lock.locked():
            del self._locks[generation]

    def generations(self) -> list[int]:
        """The generations with masks noted and not saved yet."""
        return [g for g, masks in self._pending.items() if masks]

    async def _write(self, generation: int, masks: dict[int, int]) -> None:
        object_size = self.object_size()
        size = changes.page_bytes(object_size)
        pages: dict[int, dict[int, int]] = {}
        for index, value in masks.items():
            pages.setdefault(index // changes.PAGE_OBJECTS, {})[
                index % changes.PAGE_OBJECTS] = value
        saved: dict[int, dict[int, int] | None] = {}
        limit = asyncio.Semaphore(page_concurrency)

        async def read(page: int) -> None:
            oid = changes.page_oid(generation, page * changes.PAGE_OBJECTS)
            async with limit:
                try:
                    saved[page] = changes.decode_page(await self.objects.read(oid, 0, size),
                                                      object_size)
                except NoObject:
                    saved[page] = None

        async def write(page: int, slots: dict[int, int]) -> None:
            oid = changes.page_oid(generation, page * changes.PAGE_OBJECTS)
            before = saved[page]
            async with limit:
                if before is None:
                    await self.objects.create(oid, changes.encode_page(slots, object_size))
                    return
                for slot, value in slots.items():
                    before[slot] = before.get(slot, 0) | value
                # FUA, as creates are: durable when the save is done, with no flush of
                # everything else the cluster has dirty (a close would pay for it).
                await self.objects.write(oid, 0, changes.encode_page(before, object_size),
                                         fua=True)

        await asyncio.gather(*(read(page) for page in pages))
        new = {page for page, slots in saved.items() if slots is None}
        if new:  # listed before they are made: a page never exists unlisted
            await self._list_pages(generation, new, object_size)
        await asyncio.gather(*(write(page, slots) for page, slots in pages.items()))

    async def _list_pages(self, generation: int, pages: set[int], object_size: int) -> None:
        try:
            listed = await read_directory(self.objects, object_size, generation)
        except NoObject:
            listed = set()
        oid = changes.directory_oid(generation)
        if pages <= listed:
            return
        data = changes.encode_directory(listed | pages)
        if len(data) > object_size:
            # A generation that wrote more than the directory holds (256 TiB with 4 MiB
            # objects): the pages not listed are freed by the sweep instead.
            log.warning("generation %d: its change page directory is full", generation)
            return
        if listed:
            await self.objects.write(oid, 0, data, fua=True)
        else:
            await self.objects.create(oid, data)


async def read_directory(objects: Objects, object_size: int, generation: int) -> set[int]:
    """The pages a generation's directory lists: its first 64 KiB, and the rest only
    if those are full."""
    oid = changes.directory_oid(generation)
    first = bytes(await objects.read(oid, 0, min(directory_read_bytes, object_size)))
    if object_size > len(first) and first[-4:] != bytes(4):
        first = bytes(await objects.read(oid, 0, object_size))
    return changes.decode_directory(first)


async def remove_pages(objects: Objects, object_size: int, generation: int) -> int:
    """Free a dead generation's change pages, and its directory last; how many."""
    oid = changes.directory_oid(generation)
    try:
        listed = await read_directory(objects, object_size, generation)
    except NoObject:
        return 0
    for page in sorted(listed):
        try:
            await objects.remove(changes.page_oid(generation, page * changes.PAGE_OBJECTS))
        except NoObject:
            pass
    await objects.remove(oid)
    return len(listed)


async def read_masks(objects: Objects, object_size: int, generation: int,
                     index: int, cache: dict[tuple[int, int], dict[int, int]]) -> int:
    """Object ``index``'s saved mask in ``generation`` (0: no change saved). Pages
    read are kept in ``cache``, by (generation, page)."""
    page = index // changes.PAGE_OBJECTS
    slots = cache.get((generation, page))
    if slots is None:
        try:
            data = await objects.read(changes.page_oid(generation, index), 0,
                                      changes.page_bytes(object_size))
            slots = changes.decode_page(data, object_size)
        except NoObject:
            slots = {}
        cache[(generation, page)] = slots
    return slots.get(index % changes.PAGE_OBJECTS, 0)
