"""In-memory stand-ins for tests: replicated object I/O as a dict."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from sheep import changes, radix
from sheep.errors import InvalidParameters, NoObject
from sheep.oid import VDI_TYPES, oid_type


class MemoryObjects:
    """The VDI engine's Objects interface over a dict of bytearrays."""

    def __init__(self, object_size: int) -> None:
        self.object_size = object_size
        self.data: dict[int, bytearray] = {}
        self.frozen_writes = 0
        self.sparse_creates = 0

    def _check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.object_size:
            raise InvalidParameters(f"range {offset}+{count} outside the object")

    async def read(self, oid: int, offset: int, count: int) -> bytes:
        self._check(offset, count)
        if oid not in self.data:
            raise NoObject(f"object {oid:016x}")
        return bytes(self.data[oid][offset:offset + count])

    async def create(self, oid: int, data: bytes | memoryview, offset: int = 0) -> None:
        self._check(offset, len(data))
        buffer = bytearray(self.object_size)
        buffer[offset:offset + len(data)] = data
        self.data[oid] = buffer

    async def create_sparse(self, oid: int, extents: list[tuple[int, bytes]]) -> None:
        buffer = bytearray(self.object_size)
        for offset, data in extents:
            self._check(offset, len(data))
            buffer[offset:offset + len(data)] = data
        self.data[oid] = buffer
        self.sparse_creates += 1

    async def write(self, oid: int, offset: int, data: bytes | memoryview,
                    fua: bool = False) -> None:
        self._check(offset, len(data))
        if oid not in self.data:
            raise NoObject(f"object {oid:016x}")
        self.data[oid][offset:offset + len(data)] = data

    async def discard(self, oid: int, offset: int, count: int) -> None:
        await self.write(oid, offset, bytes(count))

    async def remove(self, oid: int) -> None:
        if self.data.pop(oid, None) is None:
            raise NoObject(f"object {oid:016x}")

    async def exists(self, oid: int) -> bool:
        return oid in self.data

    async def flush(self) -> None:
        return None

    async def data_map(self, oid: int) -> int:
        """Blocks holding anything but zeros (a dict has no holes to ask about)."""
        if oid not in self.data:
            raise NoObject(f"object {oid:016x}")
        data = self.data[oid]
        value = 0
        for block in range(len(data) // changes.BLOCK):
            if any(data[block * changes.BLOCK:(block + 1) * changes.BLOCK]):
                value |= 1 << block
        return value


class FencedObjects(MemoryObjects):
    """MemoryObjects that fail any change to an object of a frozen generation, as
    real stores do, and yield to the event loop a random number of times on every
    call, as a network round trip would, so concurrent engine calls interleave."""

    def __init__(self, object_size: int, writable: Callable[[int], bool], seed: int = 0) -> None:
        super().__init__(object_size)
        self.writable = writable
        self.random = random.Random(seed)

    async def _pause(self) -> None:
        for _ in range(self.random.randrange(3)):
            await asyncio.sleep(0)

    def _fence(self, oid: int) -> None:
        generation = radix.generation_of(oid)
        assert oid_type(oid) in VDI_TYPES, f"{oid:016x}"
        assert self.writable(generation), f"write to {oid:016x} of frozen generation {generation}"

    async def read(self, oid: int, offset: int, count: int) -> bytes:
        await self._pause()
        return await super().read(oid, offset, count)

    async def create(self, oid: int, data: bytes | memoryview, offset: int = 0) -> None:
        self._fence(oid)
        await self._pause()
        await super().create(oid, data, offset)

    async def create_sparse(self, oid: int, extents: list[tuple[int, bytes]]) -> None:
        self._fence(oid)
        await self._pause()
        await super().create_sparse(oid, extents)

    async def write(self, oid: int, offset: int, data: bytes | memoryview,
                    fua: bool = False) -> None:
        self._fence(oid)
        await self._pause()
        await super().write(oid, offset, data, fua)

    async def discard(self, oid: int, offset: int, count: int) -> None:
        self._fence(oid)
        await super().discard(oid, offset, count)

    async def exists(self, oid: int) -> bool:
        await self._pause()
        return await super().exists(oid)
