"""A deterministic simulated cluster: N sheep in one process on virtual time,
clients running VDI I/O against a model, and a nemesis that kills, cuts,
suspends and breaks things, all chosen by one seed.

The sheep are the real ones (sheep/daemon.py and everything under it) with
their world replaced (sheep/testing/simworld.py): a virtual-time loop, an
in-memory network, a cluster bus with ZooKeeper-like sessions, and a FaultyIO
disk under each store (unsynced writes are lost at a power loss; EIO and
ENOSPC on command). So a run is a pure function of its seed: the same seed
gives the same trace, and its hash is printed.

During a run every read is checked against the model at once (no read is ever
stale). At the end the nemesis stops, the network heals, every sheep comes back,
the cluster settles, and the checks run:

- every VDI and snapshot reads back as the model says, through every gateway;
- each snapshot holds exactly a prefix of its VDI's acknowledged writes (the
  model's snapshot is the VDI's image when the snapshot was acknowledged);
- every object has exactly its N copies, on its placement, verified, all at
  one version and one digest;
- nothing that no live VDI or snapshot reaches is left on any store.

The model of a VDI is its bytes plus a mask of bytes that may hold anything: a
write that failed, or one not flushed when every sheep lost power, may or may
not have landed. The first read that sees such bytes pins them, and later reads
must agree. A flush makes durable every write acknowledged before it was sent.

``plant`` switches on a known bug (by patching the code for the run) so that
the checks can be shown to fail: see PLANTS.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sheep import auth, constants, radix
from sheep.client import Client
from sheep.daemon import Sheep, SheepConfig
from sheep.errors import (
    Exists,
    NetworkError,
    NoTag,
    NoVdi,
    ReadOnly,
    SheepError,
    ShuttingDown,
    Timeout,
    Unavailable,
    VdiLocked,
)
from sheep.proto import Op
from sheep.store import Store
from sheep.testing.faulty import FaultyIO
from sheep.testing.simworld import (
    Deadlock,
    InlineExecutor,
    SimBus,
    SimClock,
    SimDriver,
    SimFaults,
    SimNetwork,
    VirtualLoop,
    current_host,
)
from sheep.world import World

log = logging.getLogger(__name__)

MiB = 1 << 20
sheep_port = 7000
vdi_size_bytes = 4 * MiB
write_bytes_max = 64 * 1024
client_budget_s = 60.0  # how long a client retries one operation through failovers
settle_limit_s = 400.0
run_limit_s = 3000.0  # virtual seconds a whole run may take
session_timeout_s = 4.0  # a suspended session expires after this (the lease is half)
nemesis_interval_s = (0.5, 4.0)
start_attempts_max = 5
sweep_attempts_max = 5
think_time_max_s = 0.6  # between a client's operations: the run spans the nemesis' work
clients_default = 2
weight_bytes = 64 << 30

_failover = (NetworkError, Timeout, Unavailable, ShuttingDown, ConnectionError)


class SimFailure(Exception):
    """An invariant of the simulation does not hold: the seed fails."""


# --- the model ------------------------------------------------------------------------


class Image:
    """The model of a VDI's (or snapshot's) bytes. ``unknown`` marks bytes that may hold
    anything until a read pins them; ``unflushed`` lists (write number, offset, length)
    of writes a power loss of every sheep may take back."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.unknown = bytearray(size)
        self.unflushed: list[tuple[int, int, int]] = []

    def copy(self) -> Image:
        other = Image(0)
        other.data = bytearray(self.data)
        other.unknown = bytearray(self.unknown)
        other.unflushed = list(self.unflushed)
        return other

    def write(self, number: int, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data
        self.unknown[offset:offset + len(data)] = bytes(len(data))
        self.unflushed.append((number, offset, len(data)))

    def forget(self, offset: int, length: int) -> None:
        self.unknown[offset:offset + length] = b"\1" * length

    def flushed(self, before: int) -> None:
        self.unflushed = [entry for entry in self.unflushed if entry[0] >= before]

    def power_lost(self) -> None:
        for _, offset, length in self.unflushed:
            self.forget(offset, length)
        self.unflushed.clear()

    def check(self, offset: int, got: bytes, what: str) -> None:
        """Raise SimFailure if a known byte differs; then pin the unknown ones."""
        want = self.data[offset:offset + len(got)]
        mask = self.unknown[offset:offset + len(got)]
        if len(got) != len(want):
            raise SimFailure(f"{what}: read {len(got)} bytes at {offset}, expected {len(want)}")
        if not any(mask):
            if got != want:
                raise SimFailure(f"{what}: stale or wrong data at {_first_difference(got, want, offset)}")
            return
        for run in re.finditer(b"\0+", bytes(mask)):
            start, end = run.span()
            if got[start:end] != want[start:end]:
                raise SimFailure(f"{what}: stale or wrong data at "
                                 f"{_first_difference(got[start:end], want[start:end], offset + start)}")
        self.data[offset:offset + len(got)] = got
        self.unknown[offset:offset + len(got)] = bytes(len(got))


def _first_difference(got: bytes, want: bytes | bytearray, base: int) -> str:
    for index, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"byte {base + index} (read {a:#04x}, expected {b:#04x})"
    return f"offset {base}"


@dataclass
class VdiModel:
    name: str
    image: Image
    snapshots: dict[str, Image] = field(default_factory=dict)
    deleted: bool = False


# --- one simulated sheep ------------------------------------------------------------------


class SimSheep:
    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.index = index
        self.address = f"10.0.0.{index + 1}"
        self.host = sim.network.add_host(f"sheep{index}", self.address)
        self.directory = os.path.join(sim.directory, f"store{index}")
        self.io = FaultyIO(random.Random(sim.rng.getrandbits(32)))
        self.sheep: Sheep | None = None
        self.driver: SimDriver | None = None
        self.up = False
        self.starting = False
        self.secret = f"{sim.rng.getrandbits(32):08x}"

    def world(self) -> World:
        return World(clock=self.sim.clock, network=self.sim.network.view(self.host),
                     faults=self.sim.faults, token=self.sim.token, crash=self._crash)

    def _crash(self, reason: str) -> None:
        self.sim.fail(f"sheep{self.index} crashed: {reason}")

    async def start(self) -> None:
        """Start a fresh process on the store this host has (made at the first start)."""
        assert not self.up
        self.host.reborn()
        self.starting = True
        store = Store(self.directory, io=self.io, token=lambda _: self.secret)
        inline = InlineExecutor()
        store.meta_executor = store.sync_executor = inline  # type: ignore[assignment]
        store.write_executor = inline  # type: ignore[assignment]
        self.driver = SimDriver(self.sim.bus)
        config = SheepConfig(directory=self.directory, address=self.address, port=sheep_port,
                             zone=self.index, weight=weight_bytes,
                             node_key=self.sim.credentials.key)
        self.sheep = Sheep(config, store, self.driver, self.world())
        sheep = self.sheep
        task = asyncio.get_running_loop().create_task(
            sheep.start((self.address, sheep_port)), context=self.host.context)
        self.up = True
        try:
            await task
        except SheepError as error:  # say, an EIO opening the store: the process exits
            self.sim.trace(f"sheep{self.index} failed to start: {error}")
            self.kill(power_loss=False)
            raise
        finally:
            self.starting = False

    def kill(self, power_loss: bool) -> None:
        """SIGKILL (the page cache survives) or a power loss (unsynced writes are lost)."""
        assert self.up and self.sheep is not None and self.driver is not None
        self.sim.trace(f"{'power loss' if power_loss else 'kill'} sheep{self.index}")
        self.up = False
        self.driver.die()
        self.sim.network.kill(self.host, power_loss)
        self.sim.loop.kill_tasks(self.host.name)
        store = self.sheep.store
        if power_loss:
            self.io.power_loss()
        else:
            self.io.process_killed()
        if store._env is not None:  # the process is gone: no clean close, no final sync
            store._env.close()
            store._env = None
        for fd in store._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        store._fds.clear()
        self.sim.bus.leave_later(self.sheep.node.node_id if self.sheep.node else "",
                                 self.sim.rng.uniform(0.5, 2.0))
        self.sheep = None


# --- clients --------------------------------------------------------------------------------


class SimClient:
    """A VM's disk: one VDI at a time, one request at a time, failing over from one
    gateway to another as the NBD plugin does."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.index = index
        self.name = f"client{index}"
        self.host = sim.network.add_host(self.name, f"10.0.1.{index + 1}")
        self.client: Client | None = None
        self.gateway: SimSheep | None = None
        self.handle: int | None = None
        self.vdi: VdiModel | None = None
        self.owned: list[VdiModel] = []
        self.snapshots_made = 0

    async def connect(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None
        self.handle = None
        candidates = [s for s in self.sim.sheep if s.up and not s.starting] or self.sim.sheep
        self.gateway = self.sim.rng.choice(candidates)
        self.client = await Client.connect(self.gateway.address, sheep_port,
                                           network=self.sim.network.view(self.host),
                                           credentials=self.sim.credentials)

    async def _call(self, what: str, work: Callable[[Client], Any],
                    reopen: bool = True) -> Any:
        """Run work through the current gateway, failing over on errors that mean
        'try elsewhere', until the budget runs out (then the last error is raised)."""
        deadline = self.sim.loop.time() + client_budget_s
        attempt = 0
        while True:
            try:
                if self.client is None or self.client.connection.closed:
                    await self.connect()
                if reopen and self.vdi is not None and self.handle is None:
                    await self._open()
                assert self.client is not None
                return await work(self.client)
            except (*_failover, VdiLocked) as error:
                attempt += 1
                if self.sim.loop.time() > deadline:
                    raise
                self.sim.trace(f"{self.name} {what}: {type(error).__name__}, retrying")
                if self.client is not None and not isinstance(error, VdiLocked):
                    self.client.close()
                await asyncio.sleep(min(0.05 * attempt, 1.0))

    async def _open(self) -> None:
        assert self.client is not None and self.vdi is not None
        opened = await self.client.vdi_open(self.vdi.name, writable=True, owner=self.name)
        self.handle = int(opened["handle"])

    async def use(self, vdi: VdiModel) -> None:
        if self.client is not None and self.handle is not None:
            handle = self.handle
            with contextlib.suppress(SheepError, ConnectionError):
                await self.client.vdi_close(handle)
        self.vdi = vdi
        self.handle = None

        async def opening(client: Client) -> None:
            if self.handle is None:
                await self._open()

        await self._call(f"open {vdi.name}", opening)

    # --- operations ---------------------------------------------------------------------

    async def write(self) -> bool:
        """One write of random bytes; whether it was acknowledged."""
        assert self.vdi is not None
        rng = self.sim.rng
        length = rng.choice([512, 4096, rng.randint(1, write_bytes_max)])
        offset = rng.randrange(0, vdi_size_bytes - length)
        if rng.random() < 0.5:
            offset -= offset % 512
        data = rng.randbytes(length)
        fua = rng.random() < 0.1
        vdi = self.vdi

        async def work(client: Client) -> None:
            assert self.handle is not None
            await client.vdi_write(self.handle, offset, data, fua=fua)

        try:
            await self._call(f"write {offset}+{length}", work)
        except SheepError as error:
            self.sim.trace(f"{self.name} write {vdi.name} {offset}+{length} failed: "
                           f"{type(error).__name__}")
            vdi.image.forget(offset, length)
            return False
        # Numbered when acknowledged: a flush covers the writes acknowledged before it
        # began (its number), not one still in flight then from another client, which
        # may reach a store after that store's sync (seed 350 with 4 nodes).
        number = self.sim.next_write()
        vdi.image.write(number, offset, data)
        if fua:
            vdi.image.unflushed = [e for e in vdi.image.unflushed if e[0] != number]
        self.sim.trace(f"{self.name} write {vdi.name} {offset}+{length}{' fua' if fua else ''} ok")
        return True

    async def migrate(self) -> None:
        """The VM moves to a gateway chosen anew, as a live migration does: the
        destination opens the VDI beside the source (attaching takes no lock); the
        source flushes, naming its handle, and goes quiet; the destination's first
        write takes the lock by a handoff. The source is fenced from then on: a write
        through its handle must fail, and one acknowledged is a failure of the run."""
        if self.client is None or self.handle is None or self.vdi is None:
            return
        source, handle, vdi = self.client, self.handle, self.vdi
        number = self.sim.next_write()
        try:
            await source.flush(handle)
        except (SheepError, ConnectionError) as error:
            self.sim.trace(f"{self.name} migrate: the source's flush failed: "
                           f"{type(error).__name__}")
            return
        self.sim.flushed(number)
        self.client, self.handle = None, None  # the destination connects anew
        try:
            if not await self.write():
                self.sim.trace(f"{self.name} migrate: the destination did not write")
                return
            probe = bytes(512)
            try:
                await source.vdi_write(handle, 0, probe)
            except VdiLocked:
                self.sim.trace(f"{self.name} migrate: the source is fenced")
                return
            except (SheepError, ConnectionError) as error:
                self.sim.trace(f"{self.name} migrate: the source's write failed: "
                               f"{type(error).__name__}")
                return
            self.sim.fail(f"{self.name}: a write through the source's handle was acknowledged"
                          f" after the destination took {vdi.name}'s lock")
        finally:
            source.close()

    async def read(self) -> None:
        assert self.vdi is not None
        rng = self.sim.rng
        length = rng.randint(1, 256 * 1024)
        offset = rng.randrange(0, vdi_size_bytes - length)
        vdi = self.vdi

        async def work(client: Client) -> bytes:
            assert self.handle is not None
            return bytes(await client.vdi_read(self.handle, offset, length))

        try:
            got = await self._call(f"read {offset}+{length}", work)
        except SheepError as error:
            self.sim.trace(f"{self.name} read failed: {type(error).__name__}")
            return
        vdi.image.check(offset, got, f"{self.name} read of {vdi.name} {offset}+{length} "
                                     f"via sheep{self.gateway.index if self.gateway else '?'}")
        self.sim.trace(f"{self.name} read {vdi.name} {offset}+{length} "
                       f"{hashlib.sha256(got).hexdigest()[:12]}")

    async def flush(self) -> None:
        number = self.sim.next_write()

        async def work(client: Client) -> None:
            # With migrations the VMs flush as the NBD plugin does, naming their handle
            # (only the members changed since reached: Gateway.flush_changed); else
            # every member syncs, as the seeds' schedules were made with.
            await client.flush(self.handle or 0 if self.sim.migrations else 0)

        try:
            await self._call("flush", work)
        except SheepError as error:
            self.sim.trace(f"{self.name} flush failed: {type(error).__name__}")
            return
        self.sim.flushed(number)
        self.sim.trace(f"{self.name} flush ok")

    async def snapshot(self) -> None:
        assert self.vdi is not None
        vdi = self.vdi
        self.snapshots_made += 1
        tag = f"s{self.snapshots_made}"
        tries = [0]

        async def work(client: Client) -> None:
            tries[0] += 1
            try:
                await client.vdi_snapshot(vdi.name, tag)
            except Exists:
                if tries[0] == 1:
                    raise

        try:
            await self._call(f"snapshot {vdi.name}@{tag}", work)
        except SheepError as error:
            self.sim.trace(f"{self.name} snapshot {vdi.name}@{tag} failed: {error}")
            if await self._snapshot_exists(vdi.name, tag):
                vdi.snapshots[tag] = vdi.image.copy()
            return
        # Copied now, not before: a power loss everywhere while the snapshot was being
        # taken made unflushed writes uncertain in the VDI and so in the snapshot too.
        vdi.snapshots[tag] = vdi.image.copy()
        self.sim.trace(f"{self.name} snapshot {vdi.name}@{tag} ok")

    async def _snapshot_exists(self, name: str, tag: str) -> bool:
        async def work(client: Client) -> Any:
            return await client.vdi_list([name], usage=False)

        listing = await self._call("list", work, reopen=False)
        return any(snap.get("tag") == tag for entry in listing
                   for snap in entry.get("snapshots", []))

    async def read_snapshot(self) -> None:
        assert self.vdi is not None
        if not self.vdi.snapshots:
            return
        vdi = self.vdi
        tag = self.sim.rng.choice(sorted(vdi.snapshots))
        length = self.sim.rng.randint(1, 512 * 1024)
        offset = self.sim.rng.randrange(0, vdi_size_bytes - length)

        async def work(client: Client) -> bytes:
            opened = await client.vdi_open(vdi.name, snapshot=tag)
            try:
                return bytes(await client.vdi_read(int(opened["handle"]), offset, length))
            finally:
                with contextlib.suppress(SheepError):
                    await client.vdi_close(int(opened["handle"]))

        try:
            got = await self._call(f"read {vdi.name}@{tag}", work)
        except (SheepError, NoTag) as error:
            self.sim.trace(f"{self.name} read {vdi.name}@{tag} failed: {type(error).__name__}")
            return
        vdi.snapshots[tag].check(offset, got, f"{self.name} read of {vdi.name}@{tag} "
                                              f"{offset}+{length}")
        self.sim.trace(f"{self.name} read {vdi.name}@{tag} {offset}+{length} ok")

    async def check_diff(self) -> None:
        """What VDI_DIFF says changed between two snapshots (or since nothing), applied
        to the older one's bytes, must give the newer one's, as both read now: a change
        the masks missed (a writer that died before saving them, a handoff) fails the
        run. A diff across a rollback is refused, which is right."""
        assert self.vdi is not None
        vdi = self.vdi
        tags = sorted(vdi.snapshots, key=lambda tag: int(tag[1:]))
        if not tags:
            return
        rng = self.sim.rng
        newer = rng.choice(tags)
        older = rng.choice([None, *tags[:tags.index(newer)]])

        async def image(client: Client, tag: str) -> bytes:
            opened = await client.vdi_open(vdi.name, snapshot=tag)
            try:
                return bytes(await client.vdi_read(int(opened["handle"]), 0, vdi_size_bytes))
            finally:
                with contextlib.suppress(SheepError):
                    await client.vdi_close(int(opened["handle"]))

        async def work(client: Client) -> tuple[bytes, bytes, list[list[Any]]]:
            base = await image(client, older) if older else bytes(vdi_size_bytes)
            answer = await client.vdi_diff(vdi.name, newer, older, 0, vdi_size_bytes)
            return base, await image(client, newer), answer["ranges"]

        what = f"diff {vdi.name}@{older}..{newer}"
        try:
            base, target, ranges = await self._call(what, work)
        except (SheepError, NoTag) as error:
            self.sim.trace(f"{self.name} {what} failed: {type(error).__name__}")
            return
        rebuilt = bytearray(base)
        for offset, length, kind in ranges:
            rebuilt[offset:offset + length] = (target[offset:offset + length]
                                               if kind == "data" else bytes(length))
        if rebuilt != target:
            raise SimFailure(f"{self.name} {what}: the diff misses changes"
                             f" ({_first_difference(bytes(rebuilt), target, 0)})")
        self.sim.trace(f"{self.name} {what} ok: {len(ranges)} ranges")

    async def alter_copy(self) -> None:
        """Give the VDI one copy more or fewer (never below 2: a lone copy would not
        survive the nemesis), for recovery to add or drop under faults."""
        assert self.vdi is not None
        vdi = self.vdi
        copies = self.sim.rng.choice([2, 3])

        async def work(client: Client) -> None:
            await client.vdi_alter_copy(vdi.name, copies)

        try:
            await self._call(f"alter-copy {vdi.name} {copies}", work, reopen=False)
        except SheepError as error:
            self.sim.trace(f"{self.name} alter-copy {vdi.name} {copies} failed:"
                           f" {type(error).__name__}")
            return
        self.sim.trace(f"{self.name} alter-copy {vdi.name} {copies} ok")

    async def delete_snapshot(self) -> None:
        assert self.vdi is not None
        if not self.vdi.snapshots:
            return
        vdi = self.vdi
        tag = self.sim.rng.choice(sorted(vdi.snapshots))
        tries = [0]

        async def work(client: Client) -> None:
            tries[0] += 1
            try:
                await client.vdi_delete(vdi.name, snapshot=tag)
            except NoTag:
                if tries[0] == 1:
                    raise

        try:
            await self._call(f"delete {vdi.name}@{tag}", work)
        except SheepError as error:
            self.sim.trace(f"{self.name} delete {vdi.name}@{tag} failed: {error}")
            if await self._snapshot_exists(vdi.name, tag):
                return
        del vdi.snapshots[tag]
        self.sim.trace(f"{self.name} delete {vdi.name}@{tag} ok")

    async def clone(self) -> None:
        assert self.vdi is not None
        if not self.vdi.snapshots:
            return
        source = self.vdi
        tag = self.sim.rng.choice(sorted(source.snapshots))
        name = f"{self.name}-c{len(self.owned)}"
        tries = [0]

        async def work(client: Client) -> None:
            tries[0] += 1
            try:
                await client.vdi_clone(source.name, tag, name)
            except Exists:
                if tries[0] == 1:
                    raise

        try:
            await self._call(f"clone {source.name}@{tag} {name}", work)
        except SheepError as error:
            self.sim.trace(f"{self.name} clone {name} failed: {error}")
            return
        clone = VdiModel(name, source.snapshots[tag].copy())
        self.owned.append(clone)
        self.sim.vdis.append(clone)
        self.sim.trace(f"{self.name} clone {source.name}@{tag} -> {name} ok")
        if self.sim.rng.random() < 0.5:
            await self.use(clone)

    async def delete_vdi(self) -> None:
        """Delete a clone this client made and no longer uses (its objects must go)."""
        candidates = [vdi for vdi in self.owned if vdi is not self.vdi and not vdi.deleted
                      and vdi.name != f"{self.name}-vdi"]
        if not candidates:
            return
        vdi = self.sim.rng.choice(candidates)
        tries = [0]

        async def work(client: Client) -> None:
            tries[0] += 1
            try:
                await client.vdi_delete(vdi.name)
            except NoVdi:
                if tries[0] == 1:
                    raise

        try:
            await self._call(f"delete {vdi.name}", work, reopen=False)
        except SheepError as error:
            self.sim.trace(f"{self.name} delete {vdi.name} failed: {error}")

            async def listing(client: Client) -> Any:
                return await client.vdi_list([vdi.name], usage=False)

            try:
                if any(entry.get("name") == vdi.name
                       for entry in await self._call("list", listing, reopen=False)):
                    return
            except NoVdi:
                pass
        vdi.deleted = True
        self.sim.trace(f"{self.name} delete {vdi.name} ok")

    async def rollback(self) -> None:
        assert self.vdi is not None
        if not self.vdi.snapshots:
            return
        vdi = self.vdi
        tag = self.sim.rng.choice(sorted(vdi.snapshots))

        async def close(client: Client) -> None:
            if self.handle is not None:
                await client.vdi_close(self.handle)
                self.handle = None

        async def work(client: Client) -> None:
            if self.handle is not None:  # a failover reopened it
                await client.vdi_close(self.handle)
                self.handle = None
            await client.vdi_rollback(vdi.name, tag)

        try:
            await self._call("close", close, reopen=False)
            await self._call(f"rollback {vdi.name}@{tag}", work, reopen=False)
        except SheepError as error:
            # Applied or not: nobody can say. Stop checking what this VDI holds.
            self.sim.trace(f"{self.name} rollback {vdi.name}@{tag} failed: {error}")
            vdi.image.forget(0, vdi_size_bytes)
        else:
            vdi.image = vdi.snapshots[tag].copy()
            self.sim.trace(f"{self.name} rollback {vdi.name}@{tag} ok")
        await self.use(vdi)

    async def run(self, steps: int) -> None:
        vdi = VdiModel(f"{self.name}-vdi", Image(vdi_size_bytes))

        async def create(client: Client) -> None:
            try:
                await client.vdi_create(vdi.name, vdi_size_bytes,
                                        copies=self.sim.vdi_copies(self.index))
            except Exists:
                pass

        await self._call(f"create {vdi.name}", create, reopen=False)
        self.owned.append(vdi)
        self.sim.vdis.append(vdi)
        await self.use(vdi)
        operations: list[tuple[float, Callable[[], Any]]] = [
            (55, self.write), (18, self.read), (6, self.flush), (5, self.snapshot),
            (6, self.read_snapshot), (3, self.delete_snapshot), (2, self.clone),
            (2, self.rollback), (1, self.delete_vdi)]
        if self.sim.migrations:
            operations.append((4, self.migrate))
        if self.sim.lifecycle:
            operations += [(4, self.check_diff), (2, self.alter_copy)]
        weights = [weight for weight, _ in operations]
        for _ in range(steps):
            _, operation = self.sim.rng.choices(operations, weights)[0]
            await operation()
            await asyncio.sleep(self.sim.rng.uniform(0, think_time_max_s))
            if self.sim.failure is not None:
                return

    async def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


# --- the simulation ---------------------------------------------------------------------------


@dataclass
class Result:
    seed: int
    failure: str | None
    trace_hash: str
    simulated_s: float
    wall_s: float
    faults: dict[str, int]


class Simulation:
    def __init__(self, seed: int, nodes: int = 4, steps: int = 60, plant: str | None = None,
                 clients: int = clients_default, base: str | None = None,
                 migrations: bool = False, lifecycle: bool = False) -> None:
        self.seed = seed
        self.migrations = migrations  # clients also live-migrate (SimClient.migrate)
        # Clients also check snapshot diffs and change their VDI's copies
        # (SimClient.check_diff, SimClient.alter_copy).
        self.lifecycle = lifecycle
        self.rng = random.Random(seed)
        self.nodes = nodes
        self.steps = steps
        self.plant = plant
        self.base = base
        self.loop = VirtualLoop()
        self.clock = SimClock()
        self.network = SimNetwork(self.loop, random.Random(self.rng.getrandbits(32)))
        self.bus = SimBus(self.loop, random.Random(self.rng.getrandbits(32)), self.clock)
        # The cluster's node key, from the seed; the simulated clients use it too.
        self.credentials = auth.Credentials(auth.NODE, self.rng.randbytes(auth.KEY_BYTES))
        self.faults = SimFaults(random.Random(self.rng.getrandbits(32)),
                                enabled=self.rng.random() < 0.5)
        self._tokens = random.Random(self.rng.getrandbits(32))
        self.copies = min(self.rng.choice([2, 2, 3]), nodes)
        self.sheep: list[SimSheep] = []  # the members: started at least once
        self.spares: list[SimSheep] = []  # new nodes that may join during the run
        self.spare_count = 1 if self.rng.random() < 0.5 else 0
        self.clients: list[SimClient] = []
        self.client_count = clients
        self.vdis: list[VdiModel] = []
        self.failure: str | None = None
        self._trace = hashlib.sha256()
        self.trace_lines = 0
        self.verbose = False
        self._writes = 0
        self.directory = ""
        self.fault_counts: dict[str, int] = {}
        self._nemesis_on = True
        self.stage = "start"

    # --- helpers -----------------------------------------------------------------

    def token(self, nbytes: int) -> str:
        return self._tokens.getrandbits(8 * nbytes).to_bytes(nbytes, "big").hex()

    def trace(self, line: str) -> None:
        stamped = f"{self.loop.time():.6f} {line}"
        self._trace.update(stamped.encode() + b"\n")
        self.trace_lines += 1
        if self.verbose:
            print(stamped)

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            self.trace(f"FAILURE {reason}")

    def next_write(self) -> int:
        self._writes += 1
        return self._writes

    def flushed(self, before: int) -> None:
        for vdi in self.vdis:
            vdi.image.flushed(before)
            for image in vdi.snapshots.values():
                image.flushed(before)

    def vdi_copies(self, index: int) -> int | None:
        """Some VDIs ask for more copies than the cluster's default, when there is room."""
        if index % 2 == 1 and self.copies < self.nodes:
            return self.copies + 1
        return None

    def count(self, fault: str) -> None:
        self.fault_counts[fault] = self.fault_counts.get(fault, 0) + 1

    def up(self) -> list[SimSheep]:
        return [s for s in self.sheep if s.up]

    # --- the run -------------------------------------------------------------------

    def run(self) -> Result:
        started = time.monotonic()
        self.directory = tempfile.mkdtemp(prefix=f"sim{self.seed}-", dir=self.base)
        if self.verbose and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("  %(host)s %(name)s: %(message)s"))
            handler.addFilter(_HostFilter())
            logging.getLogger().addHandler(handler)
        logging.getLogger("sheep").setLevel(logging.INFO if self.verbose else logging.CRITICAL)
        try:
            with planted(self.plant):
                self.loop.run_until_complete(self._watched())
        except Deadlock as error:
            self.fail(f"deadlock: {error}")
        except SimFailure as error:
            self.fail(str(error))
        except Exception as error:  # the harness or a sheep broke: the seed fails, loudly
            self.fail(f"unexpected {type(error).__name__}: {error}\n"
                      + "".join(traceback.format_exception(error)[-6:]))
        finally:
            self._close()
            shutil.rmtree(self.directory, ignore_errors=True)
        self.trace(f"end {self.failure or 'ok'}")
        return Result(self.seed, self.failure, self._trace.hexdigest()[:16], self.loop.time(),
                      time.monotonic() - started,
                      {**self.fault_counts,
                       **{f"buggify {site}": n for site, n in sorted(self.faults.fired.items())}})

    def _close(self) -> None:
        loop = self.loop
        for sim_sheep in self.sheep:
            if sim_sheep.up:
                with contextlib.suppress(Exception):
                    sim_sheep.kill(power_loss=False)
        for task in asyncio.all_tasks(loop):
            task.cancel()
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.sleep(0.1))
        loop.close()

    async def _watched(self) -> None:
        try:
            await asyncio.wait_for(self._main(), run_limit_s)
        except TimeoutError:
            raise SimFailure(f"the run did not end in {run_limit_s:.0f} simulated seconds "
                             f"(stage: {self.stage})") from None

    async def _main(self) -> None:
        self.trace(f"seed {self.seed} nodes {self.nodes} copies {self.copies} "
                   f"buggify {self.faults.enabled} plant {self.plant}")
        for index in range(self.nodes):
            self.sheep.append(SimSheep(self, index))
        self.spares = [SimSheep(self, self.nodes + k) for k in range(self.spare_count)]
        for sim_sheep in self.sheep:
            await sim_sheep.start()
        self.stage = "waiting for the members"
        while any(len(s.sheep.group.state.members) < self.nodes for s in self.sheep if s.sheep):
            await asyncio.sleep(0.01)
        admin = SimClient(self, 99)
        await admin.connect()
        assert admin.client is not None
        await admin.client.format(self.copies, constants.object_size_min_bytes)
        await admin.stop()
        self.trace("formatted")
        self.stage = "clients"
        self.clients = [SimClient(self, index) for index in range(self.client_count)]
        nemesis = self.loop.create_task(self._nemesis())
        try:
            await asyncio.gather(*(client.run(self.steps) for client in self.clients))
        finally:
            self._nemesis_on = False
            await nemesis
        if self.failure is not None:
            return
        await self._heal()
        if self.failure is not None:
            return
        await self._check()

    # --- the nemesis ------------------------------------------------------------------

    async def _nemesis(self) -> None:
        rng = self.rng
        whole_cluster_power_loss = rng.random() < 0.3
        actions: list[tuple[float, Callable[[], Any]]] = [
            (3, self._kill), (2, self._power_loss), (3, self._partition), (2, self._suspend),
            (2, self._disk_fault), (2, self._slow_link), (2, self._reset),
            (2, self._stale_writer), (1, self._join_spare)]
        weights = [weight for weight, _ in actions]
        while self._nemesis_on and self.failure is None:
            await asyncio.sleep(rng.uniform(*nemesis_interval_s))
            if not self._nemesis_on:
                break
            if whole_cluster_power_loss and rng.random() < 0.08:
                whole_cluster_power_loss = False
                await self._power_loss_everywhere()
                continue
            _, action = rng.choices(actions, weights)[0]
            await action()
        self.network.heal()

    def _down(self) -> int:
        return sum(1 for s in self.sheep if not s.up)

    async def _restart_later(self, sim_sheep: SimSheep, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if not sim_sheep.up:
            await self._start(sim_sheep)

    async def _start(self, sim_sheep: SimSheep) -> None:
        """Start a sheep, as an operator (or systemd) would: again if it fails."""
        for _ in range(start_attempts_max):
            try:
                await sim_sheep.start()
                return
            except SheepError:
                await asyncio.sleep(1.0)
        raise SimFailure(f"sheep{sim_sheep.index} failed to start {start_attempts_max} times")

    def _spawn(self, coroutine: Any) -> None:
        """A nemesis' follow-up (a restart, a heal) on its own: its failure fails the run."""
        def done(task: asyncio.Task[Any]) -> None:
            if not task.cancelled() and task.exception() is not None:
                error = task.exception()
                self.fail(f"{type(error).__name__}: {error}")

        self.loop.create_task(coroutine).add_done_callback(done)

    async def _kill(self, power_loss: bool = False) -> None:
        candidates = [s for s in self.up() if not s.starting]
        # A sheep cut off by a partition counts as down too: its session may expire and
        # the others go on without it (at copies 2, a kill then left no holder).
        cut_off = 1 if self.network.blocked else 0
        if self._down() + cut_off >= self.copies - 1 or not candidates:
            return
        victim = self.rng.choice(candidates)
        victim.kill(power_loss)
        self.count("power loss" if power_loss else "kill")
        self._spawn(self._restart_later(victim, self.rng.uniform(0.5, 8.0)))

    async def _join_spare(self) -> None:
        """A brand-new node joins: the placement moves, recovery fills it."""
        if not self.spares or self._down():
            return
        spare = self.spares.pop(0)
        self.sheep.append(spare)
        self.trace(f"sheep{spare.index} joins")
        self.count("join")
        self._spawn(self._start(spare))

    async def _power_loss(self) -> None:
        await self._kill(power_loss=True)

    async def _power_loss_everywhere(self) -> None:
        self.trace("power loss everywhere")
        self.count("power loss everywhere")
        victims = [s for s in self.up() if not s.starting]
        if len(victims) != len(self.sheep):
            return
        for victim in victims:
            victim.kill(power_loss=True)
        for vdi in self.vdis:
            vdi.image.power_lost()
            for image in vdi.snapshots.values():
                image.power_lost()
        await asyncio.sleep(self.rng.uniform(1.0, 3.0))
        for victim in victims:
            self._spawn(self._start(victim))

    async def _partition(self) -> None:
        if self._down() or self.network.blocked:
            return
        victim = self.rng.choice(self.sheep)
        others = {s.address for s in self.sheep if s is not victim}
        if self.rng.random() < 0.5:
            others |= {c.host.address for c in self.clients}
        one_way = self.rng.random() < 0.3
        self.trace(f"partition sheep{victim.index} one_way={one_way}")
        self.count("partition")
        self.network.partition({victim.address}, others, one_way)
        heal_s = self.rng.uniform(0.5, 12.0)
        if victim.driver is not None and self.rng.random() < 0.7:
            # The same cut keeps it from the coordination service.
            self._suspend_session(victim, heal_s)
        self._spawn(self._heal_later(victim, heal_s))

    async def _heal_later(self, victim: SimSheep, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self.trace("heal")
        self.network.heal()
        await self._end_suspension(victim, delay_s)

    def _suspend_session(self, victim: SimSheep, duration_s: float) -> None:
        """The victim's session is suspended for duration_s: it hears nothing and serves
        on its lease. If that outlasts the session timeout, the session expires, and
        the others log its death and move on while it is still cut off: at the
        timeout, or later (ZooKeeper may itself be electing, which holds expiries
        back), or only as it comes back (then _end_suspension logs it)."""
        driver = victim.driver
        assert driver is not None
        driver.suspend()
        suspension = driver.suspended_at
        if duration_s <= session_timeout_s:
            return
        if self.rng.random() < 0.4:
            return  # noticed only as the victim comes back
        delay_s = session_timeout_s + self.rng.uniform(0, duration_s - session_timeout_s)

        def expire() -> None:
            if (driver.suspended and driver.suspended_at == suspension and not driver.dead
                    and driver.node is not None and driver.node.node_id in self.bus.members):
                self.trace(f"session of sheep{victim.index} expired")
                self.count("session expired")
                self.bus.append_leave(driver.node.node_id)

        self.loop.call_later(delay_s, expire)

    async def _end_suspension(self, victim: SimSheep, suspended_s: float) -> None:
        driver = victim.driver
        if driver is None or not driver.suspended or driver.dead or driver.node is None:
            return
        expired = driver.node.node_id not in self.bus.members
        if not expired and suspended_s > session_timeout_s:
            self.trace(f"session of sheep{victim.index} expired")
            self.count("session expired")
            self.bus.append_leave(driver.node.node_id)
            expired = True
        driver.resume()
        if expired:  # it hears its own death, and joins again as a new incarnation
            await asyncio.sleep(0.1)
            if not driver.dead:
                self.bus.append_join(driver.node)

    async def _suspend(self) -> None:
        candidates = [s for s in self.up() if s.driver is not None and not s.starting
                      and not s.driver.suspended]
        if not candidates or self._down():
            return
        victim = self.rng.choice(candidates)
        assert victim.driver is not None
        duration = self.rng.uniform(0.2, 8.0)
        self.trace(f"suspend sheep{victim.index} for {duration:.3f}")
        self.count("session suspended")
        self._suspend_session(victim, duration)
        await asyncio.sleep(duration)
        await self._end_suspension(victim, duration)

    async def _disk_fault(self) -> None:
        candidates = self.up()
        if not candidates:
            return
        victim = self.rng.choice(candidates)
        call, code = self.rng.choice([("pwrite", errno.EIO), ("pwrite", errno.ENOSPC),
                                      ("datasync", errno.EIO), ("pread", errno.EIO)])
        self.trace(f"disk fault sheep{victim.index} {call} {errno.errorcode[code]}")
        self.count(f"disk {call} {errno.errorcode[code]}")
        victim.io.fail(call, code, partial=self.rng.choice([0, 512]) if call == "pwrite" else 0)

    async def _slow_link(self) -> None:
        a, b = self.rng.sample(self.sheep, 2)
        extra = self.rng.uniform(0.01, 0.5)
        self.trace(f"slow link sheep{a.index}->sheep{b.index} {extra:.3f}")
        self.count("slow link")
        self.network.slow[(a.address, b.address)] = extra
        await asyncio.sleep(self.rng.uniform(0.5, 5.0))
        self.network.slow.pop((a.address, b.address), None)

    async def _stale_writer(self) -> None:
        """A member writes into an object that a snapshot froze, as a gateway that lost
        its VDI's lock while cut off and wrote on would (the epoch checks, the lock and
        the write gate stop such a writer before it gets here; the stores' fence is the
        last line). Every store must refuse it; one that takes it changes a snapshot."""
        candidates = [s for s in self.up() if not s.starting and s.sheep is not None
                      and s.sheep.vdis is not None and s.sheep.joined.is_set()]
        if not candidates:
            return
        writer = self.rng.choice(candidates)
        sheep = writer.sheep
        assert sheep is not None and sheep.vdis is not None and sheep.gateway is not None
        snapshots = sorted(((vdi.name, snap.id, snap.root) for vdi in
                            sheep.group.state.vdis.vdis.values() for snap in vdi.snapshots),
                           key=lambda entry: (entry[0], entry[1]))
        if not snapshots:
            return
        name, snapshot_id, root = self.rng.choice(snapshots)
        gateway = sheep.gateway
        engine = sheep.vdis.engine
        data = self.rng.randbytes(512)
        offset = self.rng.randrange(0, constants.object_size_min_bytes - len(data))

        async def write() -> str:
            node = await engine.root_node(root)
            found = await engine.walk(node) if node else set()
            oids = sorted(oid for oid in found if radix.is_data(oid)
                          and radix.generation_of(oid) == root.generation)
            if not oids:
                return "nothing to write"
            oid = self.rng.choice(oids)
            try:
                await gateway.request(Op.WRITE_OBJ, oid, offset, data)
            except ReadOnly:
                return f"{oid:016x} refused"
            except SheepError as error:
                return f"{oid:016x} failed: {type(error).__name__}"
            return f"{oid:016x} ACCEPTED"

        self.count("stale writer")
        try:
            outcome = await self.loop.create_task(write(), context=writer.host.context)
        except (SheepError, asyncio.CancelledError) as error:
            outcome = f"failed: {type(error).__name__}"
        self.trace(f"stale write by sheep{writer.index} into {name} snapshot {snapshot_id}: "
                   f"{outcome}")

    async def _reset(self) -> None:
        self.count("connection reset")
        self.network.reset_random()

    # --- the end: heal, settle, check ---------------------------------------------------

    async def _heal(self) -> None:
        self.stage = "healing"
        self.trace("healing")
        self.network.heal()
        self.network.slow.clear()
        for sim_sheep in self.sheep:
            if sim_sheep.driver is not None and sim_sheep.driver.suspended:
                await self._end_suspension(sim_sheep, 10.0)
        for sim_sheep in self.sheep:
            while sim_sheep.starting:
                await asyncio.sleep(0.1)
            if not sim_sheep.up:
                await self._start(sim_sheep)
        for client in self.clients:
            await client.stop()
        deadline = self.loop.time() + settle_limit_s
        while not self._settled():
            if self.loop.time() > deadline:
                raise SimFailure(f"the cluster did not settle in {settle_limit_s:.0f} s: "
                                 f"{self._unsettled_reason()}")
            await asyncio.sleep(1.0)
        self.trace("settled")
        # The periodic sweep (Sheep._sweep), run now: what failed writes left behind.
        first = min((s for s in self.sheep if s.sheep and s.sheep.node),
                    key=lambda s: s.sheep.node.node_id)  # type: ignore[union-attr]
        assert first.sheep is not None and first.sheep.vdis is not None
        for _ in range(sweep_attempts_max):
            try:
                swept = await first.sheep.vdis.gc.sweep()
                break
            except SheepError as error:  # a disk fault left pending: the next run sweeps
                self.trace(f"sweep failed: {error}")
                await asyncio.sleep(1.0)
        else:
            raise SimFailure(f"the sweep failed {sweep_attempts_max} times")
        self.trace(f"swept {swept}")
        while not self._settled():
            if self.loop.time() > deadline:
                raise SimFailure(f"the cluster did not settle after the sweep: "
                                 f"{self._unsettled_reason()}")
            await asyncio.sleep(1.0)

    def _settled(self) -> bool:
        return self._unsettled_reason() == ""

    def _unsettled_reason(self) -> str:
        members = set(self.bus.members)
        for sim_sheep in self.sheep:
            sheep = sim_sheep.sheep
            if sheep is None or sim_sheep.starting or not sheep.joined.is_set():
                return f"sheep{sim_sheep.index} is not up"
            if sheep.node is None or sheep.node.node_id not in members:
                return f"sheep{sim_sheep.index} is not a member"
            if sheep.group.state.seq != len(self.bus.log):
                assert sim_sheep.driver is not None
                return (f"sheep{sim_sheep.index} has applied the log to {sheep.group.state.seq}"
                        f" of {len(self.bus.log)} (driver suspended {sim_sheep.driver.suspended}"
                        f" dead {sim_sheep.driver.dead} fenced {sim_sheep.driver.fenced})")
            assert sheep.peer is not None
            if sheep.peer.health.unverified_count:
                return (f"sheep{sim_sheep.index} has {sheep.peer.health.unverified_count}"
                        f" unverified copies")
            if sheep.vdis is not None and sheep.vdis.busy and self.stage == "healing":
                return f"sheep{sim_sheep.index}: {sheep.vdis.busy}"
            recovery = sheep.recoverer.status() if sheep.recoverer else {"running": True}
            if recovery.get("running") or recovery.get("surplus"):
                return f"sheep{sim_sheep.index} is recovering ({recovery})"
        return ""

    async def _check(self) -> None:
        self.stage = "checking"
        await self._check_copies()
        await self._check_images()
        await self._check_leaks()

    async def _check_images(self) -> None:
        """Every VDI and snapshot, read whole through every gateway."""
        for sim_sheep in self.sheep:
            reader = SimClient(self, 100 + sim_sheep.index)
            reader.client = await Client.connect(sim_sheep.address, sheep_port,
                                                 network=self.network.view(reader.host),
                                                 credentials=self.credentials)
            client = reader.client
            try:
                for vdi in self.vdis:
                    if vdi.deleted:
                        continue
                    targets: list[tuple[str | None, Image]] = [(None, vdi.image)]
                    targets += sorted(vdi.snapshots.items())
                    for tag, image in targets:
                        opened = await client.vdi_open(vdi.name, snapshot=tag)
                        handle = int(opened["handle"])
                        for offset in range(0, vdi_size_bytes, MiB):
                            got = bytes(await client.vdi_read(handle, offset, MiB))
                            image.check(offset, got, f"final read of {vdi.name}"
                                        f"{'@' + tag if tag else ''} via sheep{sim_sheep.index}")
                        await client.vdi_close(handle)
            finally:
                client.close()
        self.trace("images checked")

    async def _check_copies(self) -> None:
        """Exactly N verified copies of every object, on its placement, all alike."""
        sheep = [s.sheep for s in self.sheep]
        assert all(s is not None for s in sheep)
        holders: dict[int, list[int]] = {}
        for index, one in enumerate(sheep):
            assert one is not None
            for oid in one.store.list_oids():
                holders.setdefault(oid, []).append(index)
        first = sheep[0]
        assert first is not None
        group = first.group
        by_id = {s.node.node_id: i for i, s in enumerate(sheep) if s is not None and s.node}
        for oid in sorted(holders):
            stats = {}
            for index in holders[oid]:
                one = sheep[index]
                assert one is not None and one.peer is not None
                stat = one.store.stat(oid)
                if one.peer.health.is_unverified(oid) or one.peer.health.is_damaged(oid):
                    raise SimFailure(f"object {oid:016x}: copy on sheep{index} is not verified")
                stats[index] = stat
            live = {i: s for i, s in stats.items() if not s.get("deleted")}
            if not live:
                continue  # tombstones only
            placement = {by_id[node.node_id] for node in group.placement(oid, group.epoch)}
            present = set(live)
            if present != placement:
                raise SimFailure(f"object {oid:016x}: copies on {sorted(present)}, placement "
                                 f"{sorted(placement)} (copies {group.copies_for(oid)})")
            versions = {(s.get("version"), s.get("digest")) for s in live.values()}
            if len(versions) != 1:
                raise SimFailure(f"object {oid:016x}: copies differ: "
                                 f"{ {i: (s.get('version'), s.get('digest')) for i, s in live.items()} }")
        self.trace(f"copies checked: {len(holders)} objects")

    async def _check_leaks(self) -> None:
        """Nothing that no live root reaches stays on any store, but for objects of
        writable generations (a write may be between its copy-up and its entry; they
        are swept once the generation is frozen or deleted)."""
        first = self.sheep[0].sheep
        assert first is not None and first.vdis is not None
        engine = first.vdis.engine
        writable = first.group.state.vdis.writable_generations()
        reachable: set[int] = set()
        for vdi in list(first.group.state.vdis.vdis.values()):
            for root in [vdi.root, *(s.root for s in vdi.snapshots)]:
                node = await engine.root_node(root)
                if node:
                    await engine.walk(node, found=reachable)
        for sim_sheep in self.sheep:
            sheep = sim_sheep.sheep
            assert sheep is not None
            for oid in sheep.store.list_oids():
                if not (radix.is_tree(oid) or radix.is_data(oid)):
                    continue
                if radix.generation_of(oid) in writable:
                    continue
                if sheep.store.stat(oid).get("deleted"):
                    continue
                if oid not in reachable:
                    raise SimFailure(f"object {oid:016x} on sheep{sim_sheep.index} is reached by "
                                     "no live VDI or snapshot")
        self.trace(f"leaks checked: {len(reachable)} reachable")

    # --- what SimBus needs from us ----------------------------------------------------------


class _HostFilter(logging.Filter):
    """Names the simulated host whose code logged (the sheep's own logs do not)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.host = current_host.get() or "sim"
        return True


# --- planted bugs ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _patched(target: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, original)


@contextlib.contextmanager
def _plant_stale_read() -> Iterator[None]:
    """The newest-copy rule (sheep/replicas.py) ignores versions: every copy is taken
    as new as every other, so digests and states alone decide."""
    from dataclasses import replace

    from sheep import replicas

    rank, superseded, stale = replicas.rank, replicas.superseded, replicas.stale

    def versionless_rank(status: Any) -> Any:
        return (0, *rank(status)[1:])

    def versionless_superseded(mine: Any, best: Any) -> bool:
        if best is None:
            return False
        return superseded(replace(mine, version=best.version), best)

    def versionless_stale(answer: Any, newest_status: Any, compare_digests: bool) -> bool:
        if isinstance(answer, replicas.CopyStatus):
            answer = replace(answer, version=newest_status.version)
        return stale(answer, newest_status, compare_digests)

    with _patched(replicas, "rank", versionless_rank), \
            _patched(replicas, "superseded", versionless_superseded), \
            _patched(replicas, "stale", versionless_stale):
        yield


def _plant_early_ack() -> contextlib.AbstractContextManager[None]:
    from sheep.peer import Peer
    from sheep.proto import Op

    serve = Peer.serve

    async def early(self: Peer, header: Any, payload: bytes) -> Any:
        if header.opcode in (Op.WRITE_PEER, Op.CREATE_AND_WRITE_PEER):
            data = bytes(payload)

            async def later() -> None:
                await asyncio.sleep(0.002)
                with contextlib.suppress(Exception):
                    await serve(self, header, data)

            asyncio.get_running_loop().create_task(later())
            return b"", {"arg0": header.arg0 or self.store.version(header.oid) + 1}
        return await serve(self, header, payload)

    return _patched(Peer, "serve", early)


def _plant_no_fence() -> contextlib.AbstractContextManager[None]:
    from sheep.group import Group

    return _patched(Group, "writable_object", lambda self, oid: True)


def _plant_long_lease() -> contextlib.AbstractContextManager[None]:
    """A suspended sheep serves on past its session's expiry (a lease longer than the
    session timeout), while the others have moved on without it."""
    from sheep.testing.simworld import SimDriver

    return _patched(SimDriver, "lease_s", session_timeout_s * 3)


def _plant_lost_flush() -> contextlib.AbstractContextManager[None]:
    from sheep.peer import Peer

    async def flush(self: Peer, header: Any, payload: bytes) -> Any:
        return b"", {}

    return _patched(Peer, "flush", flush)


PLANTS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "stale-read": _plant_stale_read,
    "early-ack": _plant_early_ack,
    "no-fence": _plant_no_fence,
    "long-lease": _plant_long_lease,
    "lost-flush": _plant_lost_flush,
}


@contextlib.contextmanager
def planted(plant: str | None) -> Iterator[None]:
    if plant is None:
        yield
        return
    with PLANTS[plant]():
        yield
