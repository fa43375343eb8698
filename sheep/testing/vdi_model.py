"""A model-based test of VDIs against a running cluster (in-process or real).

A hypothesis state machine does random writes (any offset and length, across
object boundaries), discards, snapshots, clones, rollbacks, resizes and
deletes through the client library, and keeps a model of what every VDI and
snapshot must read back. After every step each VDI and snapshot is read and
compared byte for byte; after deletes and rollbacks the objects left on the
stores must be exactly those reachable from live roots (no leak, nothing
dangling).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from sheep import radix
from sheep.client import Client, SyncClient
from sheep.errors import NoObject
from sheep.oid import ObjectType, oid_type
from sheep.vdi import Root, VdiEngine

PAGE = 4096
OBJECT_SIZE = 1 << 20
SMALL_SIZES = [OBJECT_SIZE // 2, OBJECT_SIZE, 2 * OBJECT_SIZE + 4096, 3 * OBJECT_SIZE - 512]
DEEP_SIZE = 1100 * OBJECT_SIZE  # more than 1024 objects: a two-level tree


class SparseDisk:
    """What a disk must read back: 4 KiB pages, absent pages are zeros."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pages: dict[int, bytearray] = {}

    def copy(self) -> SparseDisk:
        other = SparseDisk(self.size)
        other.pages = {index: bytearray(page) for index, page in self.pages.items()}
        return other

    def write(self, offset: int, data: bytes) -> None:
        position = 0
        while position < len(data):
            index, inner = divmod(offset + position, PAGE)
            step = min(PAGE - inner, len(data) - position)
            page = self.pages.setdefault(index, bytearray(PAGE))
            page[inner:inner + step] = data[position:position + step]
            position += step

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        position = 0
        while position < length:
            index, inner = divmod(offset + position, PAGE)
            step = min(PAGE - inner, length - position)
            page = self.pages.get(index)
            if page is not None:
                out[position:position + step] = page[inner:inner + step]
            position += step
        return bytes(out)

    def discard(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def check_ranges(self) -> list[tuple[int, int]]:
        """What to read to check this disk: all of a small one, else around every page."""
        if self.size <= 8 * OBJECT_SIZE:
            return [(0, self.size)]
        ranges = [(0, OBJECT_SIZE), (self.size - OBJECT_SIZE, OBJECT_SIZE)]
        for index in sorted(self.pages):
            start = max(0, index * PAGE - PAGE)
            ranges.append((start, min(3 * PAGE, self.size - start)))
        return ranges


class _ClientObjects:
    """Read-only Objects over an async client, to walk trees from the test."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def read(self, oid: int, offset: int, count: int) -> bytes:
        return bytes(await self.client.read(oid, offset, count))

    async def exists(self, oid: int) -> bool:
        try:
            await self.client.read(oid, 0, 0)
        except NoObject:
            return False
        return True


def reachable_objects(client: SyncClient, object_size: int) -> set[int]:
    """Every tree node and data object reachable from a live root, walked via the client."""
    vdis = client.cluster_info()["vdis"]["vdis"]
    writable = {vdi["root"]["generation"] for vdi in vdis}

    async def walk() -> set[int]:
        connection = await Client.connect(*client.endpoint, credentials=client.credentials)
        engine = VdiEngine(_ClientObjects(connection), object_size,  # type: ignore[arg-type]
                           lambda generation: generation not in writable)
        found: set[int] = set()
        try:
            for vdi in vdis:
                roots = [vdi["root"], *(snap["root"] for snap in vdi["snapshots"])]
                for root in roots:
                    node = await engine.root_node(Root.from_json(root))
                    if node:
                        await engine.walk(node, found=found)
        finally:
            connection.close()
        return found

    return asyncio.run(walk())


def stored_vdi_objects(clients: list[SyncClient]) -> set[int]:
    oids: set[int] = set()
    for client in clients:
        oids.update(oid for oid in client.list_objects()
                    if oid_type(oid) in (ObjectType.DATA, ObjectType.TREE))
    return oids


def make_machine(connect: Callable[[int], SyncClient], nodes: int,
                 live: Callable[[], list[int]] | None = None) -> type[RuleBasedStateMachine]:
    """A state machine class bound to a cluster (connect(index) gives a client)."""

    class VdiMachine(RuleBasedStateMachine):
        vdis = Bundle("vdis")
        snapshots = Bundle("snapshots")

        def __init__(self) -> None:
            super().__init__()
            indexes = live() if live else list(range(nodes))
            self.writer = connect(indexes[0])
            self.reader = connect(indexes[-1])
            self.clients = [connect(i) for i in indexes]
            for vdi in self.writer.vdi_list(usage=False):
                if not vdi["snapshot"]:
                    self.writer.vdi_delete(vdi["name"], force=True)
            self.disks: dict[str, SparseDisk] = {}
            self.frozen: dict[tuple[str, str], SparseDisk] = {}
            self.names = itertools.count()
            self.rng = random.Random(0)

        def teardown(self) -> None:
            for client in [self.writer, self.reader, *self.clients]:
                client.close()

        def _write(self, name: str, offset: int, data: bytes) -> None:
            handle = self.writer.vdi_open(name, writable=True)["handle"]
            try:
                self.writer.vdi_write(handle, offset, data)
            finally:
                self.writer.vdi_close(handle)

        @rule(target=vdis, deep=st.booleans(), size=st.sampled_from(SMALL_SIZES))
        def create(self, deep: bool, size: int) -> str:
            name = f"vdi{next(self.names)}"
            size = DEEP_SIZE if deep and self.rng.random() < 0.3 else size
            self.writer.vdi_create(name, size)
            self.disks[name] = SparseDisk(size)
            return name

        @rule(name=vdis, data=st.data())
        def write(self, name: str, data: st.DataObject) -> None:
            if name not in self.disks:
                return
            disk = self.disks[name]
            length = data.draw(st.integers(1, min(disk.size, 3 * OBJECT_SIZE)), label="length")
            near = data.draw(st.sampled_from(["any", "boundary", "end"]), label="where")
            if near == "boundary" and disk.size > OBJECT_SIZE:
                boundary = OBJECT_SIZE * data.draw(
                    st.integers(1, max(1, disk.size // OBJECT_SIZE - 1)), label="boundary")
                offset = max(0, min(boundary - length // 2, disk.size - length))
            elif near == "end":
                offset = disk.size - length
            else:
                offset = data.draw(st.integers(0, disk.size - length), label="offset")
            payload = self.rng.randbytes(length)
            self._write(name, offset, payload)
            disk.write(offset, payload)

        @rule(name=vdis, data=st.data())
        def discard(self, name: str, data: st.DataObject) -> None:
            if name not in self.disks:
                return
            disk = self.disks[name]
            whole = data.draw(st.booleans(), label="whole objects")
            if whole:
                first = data.draw(st.integers(0, max(0, disk.size // OBJECT_SIZE - 1)))
                offset = first * OBJECT_SIZE
                length = min(disk.size - offset, OBJECT_SIZE * data.draw(st.integers(1, 2)))
            else:
                length = data.draw(st.integers(1, min(disk.size, 2 * OBJECT_SIZE)))
                offset = data.draw(st.integers(0, disk.size - length))
            handle = self.writer.vdi_open(name, writable=True)["handle"]
            try:
                self.writer.vdi_discard(handle, offset, length)
            finally:
                self.writer.vdi_close(handle)
            disk.discard(offset, length)

        @rule(target=snapshots, name=vdis)
        def snapshot(self, name: str) -> tuple[str, str]:
            if name not in self.disks:
                return ("", "")
            tag = f"t{next(self.names)}"
            self.writer.vdi_snapshot(name, tag)
            self.frozen[(name, tag)] = self.disks[name].copy()
            return (name, tag)

        @rule(target=vdis, snap=snapshots)
        def clone(self, snap: tuple[str, str]) -> str:
            if snap not in self.frozen:
                return ""
            name = f"vdi{next(self.names)}"
            self.writer.vdi_clone(snap[0], snap[1], name)
            self.disks[name] = self.frozen[snap].copy()
            return name

        @rule(snap=snapshots)
        def rollback(self, snap: tuple[str, str]) -> None:
            if snap not in self.frozen or snap[0] not in self.disks:
                return
            self.writer.vdi_rollback(snap[0], snap[1])
            self.disks[snap[0]] = self.frozen[snap].copy()
            self._check_space()

        @rule(name=vdis, grow=st.integers(1, 5 * OBJECT_SIZE))
        def resize(self, name: str, grow: int) -> None:
            if name not in self.disks:
                return
            disk = self.disks[name]
            self.writer.vdi_resize(name, disk.size + grow)
            disk.size += grow

        @rule(snap=consumes(snapshots))
        def delete_snapshot(self, snap: tuple[str, str]) -> None:
            if snap not in self.frozen:
                return
            self.writer.vdi_delete(snap[0], snap[1])
            del self.frozen[snap]
            self._check_space()

        @precondition(lambda self: len(self.disks) > 1)
        @rule(name=consumes(vdis))
        def delete(self, name: str) -> None:
            if name not in self.disks:
                return
            self.writer.vdi_delete(name)
            del self.disks[name]
            for key in [key for key in self.frozen if key[0] == name]:
                del self.frozen[key]
            self._check_space()

        def _check_space(self) -> None:
            stored = stored_vdi_objects(self.clients)
            reachable = reachable_objects(self.reader, OBJECT_SIZE)
            assert reachable <= stored, f"dangling: {sorted(map(hex, reachable - stored))}"
            assert stored <= reachable, f"leaked: {sorted(map(hex, stored - reachable))}"

        @invariant()
        def everything_reads_back(self) -> None:
            listed = {(item["name"], item["tag"] if item["snapshot"] else None): item
                      for item in self.reader.vdi_list(usage=False)}
            expected: dict[tuple[str, str | None], SparseDisk] = {
                (name, None): disk for name, disk in self.disks.items()}
            expected.update(self.frozen.items())
            assert set(listed) == set(expected), (sorted(listed), sorted(expected))
            for (name, tag), disk in expected.items():
                assert listed[(name, tag)]["size"] == disk.size
                opened = self.reader.vdi_open(name, snapshot=tag)
                try:
                    for offset, length in disk.check_ranges():
                        got = self.reader.vdi_read(opened["handle"], offset, length)
                        assert got == disk.read(offset, length), (
                            f"{name}@{tag} differs in {offset}+{length}")
                finally:
                    self.reader.vdi_close(opened["handle"])

    return VdiMachine


def machine_settings(**overrides: Any) -> Any:
    from hypothesis import HealthCheck, settings

    return settings(deadline=None, suppress_health_check=list(HealthCheck), **overrides)


__all__ = ["make_machine", "machine_settings", "radix"]
