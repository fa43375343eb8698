"""The object store of one sheep.

Data objects are sparse files, one per object, under DIR/obj/XX/ (XX fans the
files out over 256 directories). Each file is created at the full object size
with ftruncate, so unwritten ranges read as zeros and take no space; a 4 KiB
write is a 4 KiB pwrite, never a rewrite of the object.

Metadata lives in LMDB (DIR/meta), opened durable (every commit is synced):
per object its version (bumped on every change, so a stale copy can be told
from a fresh one; a removal leaves a tombstone) and a crc32c per 4 KiB block
(sheep/store/sums.py), verified on every read; the node's identity; the
persisted cluster state with its epoch log.

Commits are few. A change updates the object's metadata in memory; ``sync``
(a FLUSH, a FUA write, or the background writeback when much is pending)
fdatasyncs the changed files and then commits their metadata in one
transaction. The directories whose entries changed (a file made or unlinked)
are fsynced too, each once per sync: a file's fdatasync does not cover the
entry that names it. Before the first change to an object after its last sync, an
*intent* for it is committed (group-committed with others): after a crash,
whatever the files hold of the unsynced writes, the checksums of exactly those
objects are recomputed from their data, so no unsynced write ever reads as
corruption, and everything else must match its checksums (a mismatch there is
damage). Versions fall back to the last sync, or rise to what an intent promised;
the replicas sort that out (sheep/recovery.py: a restarted sheep's copies are
unverified). Such a copy is *in doubt* until verified: it carries a version
whose writes may not all have landed, so another copy at that version that is
not in doubt outranks it (sheep/replicas.py); the doubt is kept in LMDB so that
another crash before the verification does not forget it. An intent also records
the epoch it was made in, and the doubt keeps it: the writes the crash may have
taken were made from then on, so the nodes placed since then may hold them (the
verifier waits for those: sheep/recovery.py).

This is the one boundary where OSError and lmdb.Error become result-code
exceptions (NoSpace, IOErrorResult, SystemFailure).
"""

from __future__ import annotations

import array
import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import itertools
import json
import logging
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lmdb

from sheep import changes, constants
from sheep.errors import (
    InvalidParameters,
    IOErrorResult,
    NoObject,
    NoSpace,
    SheepError,
    SystemFailure,
)
from sheep.store import sums
from sheep.store.fileio import FileIO

log = logging.getLogger(__name__)

# The store's on-disk format. 1: object files under obj/XX/, one LMDB environment
# (meta/) with the objects, sums, intents, doubt, config and epochs databases: the
# layout of every store made before versions were kept, which are read as 1.
# 2: a partial database too, which keeps partial copies partial across restarts (a
# sheep of version 1 would take them for whole copies: see write_partial).
format_version = 2


def _upgrade_to_partial(store: Store) -> None:
    # Nothing to convert: a version-1 store recorded no partial copies, and the
    # database was opened (made) with the others.
    pass


# Upgrades, by the version they start from: each brings an open store (its
# databases open, before anything else reads them) to the next version, and must
# be safe to run again after a crash in its middle.
upgrades: dict[int, Callable[[Store], None]] = {1: _upgrade_to_partial}

_meta_value = struct.Struct("<QQ")  # version, flags (the format before digests)
# version, flags, digest of the checksum table: a STAT (every copy is compared at
# start-up and in recovery) then never reads the 4 KiB table, which would map the
# whole checksum database into the process. Values of the old form are still read.
_meta_value_digest = struct.Struct("<QQQ")
_flag_removed = 1  # a tombstone: the object was removed at this version
_flag_digest = 2  # the value carries the digest of the committed checksum table


def _pack_meta(version: int, removed: bool, digest: int | None) -> bytes:
    flags = (_flag_removed if removed else 0) | (0 if digest is None else _flag_digest)
    return _meta_value_digest.pack(version, flags, digest or 0)


def _unpack_meta(value: bytes) -> tuple[int, bool, int | None]:
    """(version, removed, digest or None when the value does not carry one)."""
    if len(value) == _meta_value.size:
        version, flags = _meta_value.unpack(value)
        return version, bool(flags & _flag_removed), None
    version, flags, digest = _meta_value_digest.unpack(value)
    return version, bool(flags & _flag_removed), digest if flags & _flag_digest else None
_fd_cache_max = 1024
write_threads = 2  # recovery copies written at once, off the loop
_adopting_suffix = ".adopting"  # a copy being written (adopt_extents); never an oid
pending_objects_max = 1024  # changed objects before the writeback syncs on its own
commit_objects_max = 256  # objects' metadata per LMDB transaction of a sync
sync_threads = 16  # fdatasyncs of one sync in flight at once


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    oid: int
    version: int


@dataclass(slots=True)
class _Meta:
    """An object's metadata as changed since its last commit."""

    version: int = 0
    removed: bool = False
    gone: bool = False  # dropped: its keys go at the next commit
    sums: array.array[int] | None = None  # None: as committed (or none stored)
    drop_sums: bool = False  # the committed checksums go (removed or gone)
    gen: int = 0  # bumped on every change: a sync commits what it saw, no more


@dataclass
class SyncJob:
    """What one sync makes durable: duplicated fds of the changed files, and the
    metadata as it was when the sync began."""

    fds: list[int] = field(default_factory=list)
    metas: dict[int, tuple[int, bytes | None, bool, bool, bool, int]] = field(
        default_factory=dict)
    synced: set[int] = field(default_factory=set)  # objects whose data is in fds
    directories: list[str] = field(default_factory=list)  # their entries changed
    intents_cleared: dict[int, bytes] = field(default_factory=dict)
    doubts_cleared: set[int] = field(default_factory=set)
    # Partial copies (Store.write_partial), each with the epoch it was made in.
    doubts_added: dict[int, int] = field(default_factory=dict)
    # Partial copies whose ranges changed, as they were when the sync began (None:
    # no longer partial, its record goes).
    partials: dict[int, list[list[int]] | None] = field(default_factory=dict)
    wipes: int = 0  # the store's wipes when it began: after another, it has nothing to do


_zero_run_block = 64 << 10  # zero runs this size or more stay holes when filling


def _nonzero_runs(view: memoryview, low: int, high: int) -> list[tuple[int, int]]:
    """The [start, end) runs of view[low:high] to write: all of it but whole aligned
    blocks of zeros."""
    runs: list[tuple[int, int]] = []
    start = None
    at = low
    zero = bytes(_zero_run_block)
    while at < high:
        end = min(high, (at // _zero_run_block + 1) * _zero_run_block)
        if end - at == _zero_run_block and view[at:end] == zero:
            if start is not None:
                runs.append((start, at))
                start = None
        elif start is None:
            start = at
        at = end
    if start is not None:
        runs.append((start, high))
    return runs


def _whole_blocks(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Sorted [start, end) byte ranges rounded out to whole checksum blocks (a read
    verifies whole blocks), cut at size, the ones that then touch merged."""
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        start = start // sums.BLOCK * sums.BLOCK
        end = min(size, -(-end // sums.BLOCK) * sums.BLOCK)
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _oid_key(oid: int) -> bytes:
    return oid.to_bytes(8, "big")


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn OS and LMDB failures into result-code errors, naming the action."""
    try:
        yield
    except OSError as error:
        if error.errno == errno.ENOSPC or error.errno == errno.EDQUOT:
            raise NoSpace(f"{what}: no space left on the store") from error
        if error.errno == errno.EIO:
            raise IOErrorResult(f"{what}: I/O error") from error
        raise SystemFailure(f"{what}: {error.strerror or error}") from error
    except lmdb.MapFullError as error:
        raise NoSpace(f"{what}: metadata map is full") from error
    except lmdb.Error as error:
        if "No space left" in str(error) or "Disk quota" in str(error):
            raise NoSpace(f"{what}: no space left on the store for metadata") from error
        raise SystemFailure(f"{what}: metadata error: {error}") from error


class Store:
    def __init__(self, path: str, io: FileIO | None = None, checksums: bool = True,
                 token: Callable[[int], str] = secrets.token_hex) -> None:
        self.path = os.path.abspath(path)
        self._secret_token = token  # the node secret's source (seeded in a simulation)
        self.object_dir = os.path.join(self.path, "obj")
        self.io = io or FileIO()
        self.checksums = checksums
        self._env: lmdb.Environment | None = None
        self._anchor: int | None = None  # the object directory, open while the store is
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._dirty: set[int] = set()  # data written since the last sync
        self._fresh: set[int] = set()  # created since their last sync: not durable at all
        self._directories: set[str] = set()  # entries made or unlinked since the last sync
        self._meta: dict[int, _Meta] = {}  # metadata changed since its last commit
        self._gen = 0
        # Committed intents (see the module doc), each with a token: an intent is
        # deleted only if it still holds the token it had when its deletion was
        # decided, so a deletion that reaches LMDB after a new intent for the same
        # object changes nothing.
        self._intents: dict[int, bytes] = {}
        self._intent_clear: dict[int, bytes] = {}  # intents to delete at the next commit
        # Copies in doubt (see the module doc), each with the epoch from which a crash
        # may have taken its writes.
        self._doubtful: dict[int, int] = {}
        self._doubt_add: set[int] = set()  # in doubt, to be recorded at the next sync
        # Partial copies: only the ranges written since they were made are here
        # (write_partial), by object: sorted, merged [start, end) byte ranges.
        self._partial: dict[int, list[list[int]]] = {}
        self._partial_changed: set[int] = set()  # their records, at the next sync
        self._partial_recorded: set[int] = set()  # objects with a record in LMDB
        # Partial copies a crash caught with changes not synced: their recorded ranges
        # may miss writes that landed (or name some that did not), so once filled
        # they stay in doubt, for the verifier to compare (see fill_extents).
        self._partial_unsure: set[int] = set()
        self._doubt_clear: set[int] = set()  # doubts to delete at the next commit
        self._intent_wanted: dict[int, bytes] = {}
        self._tokens = itertools.count(1)
        self._intent_task: asyncio.Task[None] | None = None
        self._syncing = False
        self._wipes = 0  # a sync or intent commit begun before a wipe must not outlive it
        # Every metadata commit that can race another (intents, syncs) runs on this one
        # thread, so they reach LMDB in the order they were decided.
        self.meta_executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="store-meta")
        # fdatasyncs of one sync run side by side: the file system commits them
        # together (one journal commit for many files) instead of one after another.
        # Its threads start on first use and end with the process (a store may be
        # closed and opened again, so close() does not shut it down).
        self.sync_executor = concurrent.futures.ThreadPoolExecutor(
            sync_threads, thread_name_prefix="store-sync")
        # Recovery's new copies are written here, off the event loop (adopt_extents).
        self.write_executor = concurrent.futures.ThreadPoolExecutor(
            write_threads, thread_name_prefix="store-write")
        self.object_size = constants.object_size_default_bytes
        # The epoch of the cluster state last saved or loaded: the one this sheep serves
        # in, recorded with every intent.
        self.epoch = 0
        self.counters = {"checksum_errors": 0, "missing_files": 0, "recomputed_after_crash": 0}

    # --- lifecycle -------------------------------------------------------

    def open(self) -> None:
        with _translated(f"open store {self.path}"):
            os.makedirs(self.object_dir, exist_ok=True)
            fresh = not os.path.exists(os.path.join(self.path, "meta"))
            if not os.access(self.object_dir, os.R_OK | os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, f"{self.object_dir} is not writable")
            # Opened before any write of this store's: a syncfs through it reports every
            # writeback error of its filesystem since (FileIO.sync_many).
            self._anchor = os.open(self.object_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                self._env = lmdb.open(
                    os.path.join(self.path, "meta"), map_size=constants.lmdb_map_size_bytes,
                    max_dbs=constants.lmdb_max_dbs, sync=True, metasync=True, subdir=True)
            except lmdb.Error as error:
                os.close(self._anchor)
                self._anchor = None
                raise SystemFailure(
                    f"the metadata of the store {self.path} is unreadable ({error}); refusing to"
                    " start rather than serve what it cannot vouch for. Move the directory"
                    " aside and start on an empty one: the cluster copies the objects back"
                    " from the other nodes") from error
            self._objects = self._env.open_db(b"objects")
            self._sums = self._env.open_db(b"sums")
            self._intents_db = self._env.open_db(b"intents")
            self._doubt_db = self._env.open_db(b"doubt")
            self._partial_db = self._env.open_db(b"partial")
            self._config = self._env.open_db(b"config")
            self._epochs = self._env.open_db(b"epochs")
            self._check_format(fresh)
            size = self.config_get("object_size")
            if size:
                self.object_size = int(size)
            kept = self.config_get("checksums")
            if kept is None:
                self.config_put("checksums", self.checksums)
            elif kept != self.checksums:
                raise SystemFailure(
                    f"the store {self.path} was made {'with' if kept else 'without'} checksums;"
                    f" it cannot be used {'without' if kept else 'with'} them")
            crashed = self._recover_intents()
            self._remove_unadopted()
            with self.env.begin(db=self._doubt_db) as txn:
                # A doubt of the older form (no epoch) may date from any epoch.
                self._doubtful = {int.from_bytes(key, "big"): int.from_bytes(value or b"", "big")
                                  for key, value in txn.cursor()}
            self._restore_partial(crashed)

    def _check_format(self, fresh: bool) -> None:
        """The store's format version (config "format_version"): stamped on a new
        store; one made before versions were kept is of version 1 (its layout); an
        older one is upgraded step by step, each step's version written once it is
        done (a crash in a step runs it again at the next start: steps must be
        idempotent); a newer one, or one no step leads from, is refused."""
        version = self.config_get("format_version")
        if version is None:
            version = format_version if fresh else 1
            self.config_put("format_version", version)
        if not isinstance(version, int) or version < 1:
            raise SystemFailure(f"the store {self.path} has a bad format version {version!r}")
        if version > format_version:
            raise SystemFailure(
                f"the store {self.path} is of format version {version}, newer than this"
                f" sheep's ({format_version}): run the sheep release that made it, or a"
                " newer one")
        while version < format_version:
            step = upgrades.get(version)
            if step is None:
                raise SystemFailure(
                    f"the store {self.path} is of format version {version} and this sheep"
                    f" cannot upgrade it to {format_version}: upgrade it with a release"
                    " that can, or move it aside and start on an empty directory (the"
                    " cluster copies its objects back)")
            log.warning("store %s: upgrading its format from version %d to %d", self.path,
                        version, version + 1)
            step(self)
            version += 1
            self.config_put("format_version", version)

    def _remove_unadopted(self) -> None:
        """Copies a crash caught while adopt_extents wrote them: never named as
        objects, so nothing else would remove them."""
        for sub in os.scandir(self.object_dir):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if entry.name.endswith(_adopting_suffix):
                    log.info("removing %s, a copy a crash left half made", entry.path)
                    self.io.unlink(entry.path)

    def _recover_intents(self) -> set[int]:
        """After a crash: the objects changed since their last sync get checksums from
        whatever their files now hold (any of the unsynced writes may have landed), and
        at least the version their intent promised (ensure_intent). Returns them."""
        with self.env.begin(db=self._intents_db) as txn:
            values = {int.from_bytes(key, "big"): bytes(value) for key, value in txn.cursor()}
        promised = {oid: int.from_bytes(value[8:16], "big") for oid, value in values.items()}
        # The epoch the intent was made in (an intent of the older form has none: any).
        made_in = {oid: int.from_bytes(value[16:24], "big") for oid, value in values.items()}
        oids = list(promised)
        if not oids:
            return set()
        with self.env.begin(write=True) as txn:
            for oid in oids:
                path = self.object_path(oid)
                if not os.path.exists(path):
                    # Removed or dropped, with the metadata not yet committed: forget it
                    # (a lost tombstone only lets a removed object come back; a made-up
                    # one could outrank real copies elsewhere).
                    txn.delete(_oid_key(oid), db=self._objects)
                    txn.delete(_oid_key(oid), db=self._sums)
                else:
                    value = txn.get(_oid_key(oid), db=self._objects)
                    digest = None
                    if os.path.exists(path) and self.checksums:
                        fd = self.io.open(path, create=False)
                        try:
                            data = self._pread_full(fd, 0, self.object_size)
                        finally:
                            self.io.close(fd)
                        fresh = sums.fresh(self.object_size)
                        sums.compute(data, 0, fresh)
                        txn.put(_oid_key(oid), fresh.tobytes(), db=self._sums)
                        digest = sums.digest(fresh)
                    version = max(_unpack_meta(value)[0] if value is not None else 0,
                                  promised[oid])
                    if value is not None or version:  # made anew after a removal: no tombstone
                        txn.put(_oid_key(oid), _pack_meta(version, False, digest),
                                db=self._objects)
                    if version > (_unpack_meta(value)[0] if value is not None else 0):
                        # Its version is one a change promised: in doubt until verified,
                        # from the earlier of this intent's epoch and an older doubt's.
                        since = made_in[oid]
                        older = txn.get(_oid_key(oid), db=self._doubt_db)
                        if older is not None:
                            since = min(since, int.from_bytes(older, "big"))
                        txn.put(_oid_key(oid), since.to_bytes(8, "big"), db=self._doubt_db)
                txn.delete(_oid_key(oid), db=self._intents_db)
        self.counters["recomputed_after_crash"] = len(oids)
        log.warning("the store was not closed cleanly: checksums of %d objects changed since"
                    " their last sync recomputed from their data", len(oids))
        return set(oids)

    def _restore_partial(self, crashed: set[int]) -> None:
        """Partial copies stay partial across a restart: never read, listed or kept by
        the verifier as whole copies (which they are not), filled by recovery as before.
        A record whose file is gone (the crash came before the file was made, or after
        it was removed) goes."""
        with self.env.begin(db=self._partial_db, write=True) as txn:
            for key, value in list(txn.cursor()):
                oid = int.from_bytes(key, "big")
                if not self.exists(oid):
                    txn.delete(key)
                    continue
                self._partial[oid] = [list(pair) for pair in json.loads(bytes(value))]
                self._partial_recorded.add(oid)
                # Restored: this sheep was away, and may have missed writes to the ranges
                # it wrote (a crash also leaves the ranges themselves unsure).
                self._partial_unsure.add(oid)
                if oid not in self._doubtful:  # a partial copy is in doubt from the start
                    self._doubtful[oid] = 0
                    self._doubt_add.add(oid)
        if self._partial:
            log.info("%d partial copies are still to be filled by recovery", len(self._partial))

    def close(self) -> None:
        try:
            if self._env is not None:
                self.sync()
                if self._intent_clear:  # a clean stop leaves no intent behind
                    self.meta_executor.submit(self._write_intents, {},
                                              self._intent_clear).result()
                    self._intent_clear.clear()
        finally:  # a failed sync still closes: its intents stay, the next open recovers
            for fd in self._fds.values():
                self.io.close(fd)
            self._fds.clear()
            if self._env is not None:
                self._env.close()
                self._env = None
            if self._anchor is not None:
                os.close(self._anchor)
                self._anchor = None

    @property
    def env(self) -> lmdb.Environment:
        assert self._env is not None, "store is not open"
        return self._env

    # --- identity and cluster state --------------------------------------

    def config_get(self, key: str) -> Any:
        with _translated("read store config"), self.env.begin(db=self._config) as txn:
            value = txn.get(key.encode())
        return None if value is None else json.loads(value)

    def config_put(self, key: str, value: Any) -> None:
        with _translated("write store config"), self.env.begin(db=self._config, write=True) as txn:
            txn.put(key.encode(), json.dumps(value).encode())

    def set_object_size(self, object_size: int) -> None:
        """The cluster's object size, kept so a restart reads checksums right."""
        self.object_size = object_size
        if self.config_get("object_size") != object_size:
            self.config_put("object_size", object_size)

    def node_secret(self) -> str:
        """The random part of the node id, made at the store's first start."""
        secret = self.config_get("node_secret")
        if secret is None:
            secret = self._secret_token(4)
            self.config_put("node_secret", secret)
        return str(secret)

    def save_cluster_state(self, state: dict[str, Any], epochs: list[dict[str, Any]]) -> None:
        """Persist the state and any new epoch-log entries in one transaction."""
        with _translated("persist cluster state"), self.env.begin(write=True) as txn:
            txn.put(b"cluster_state", json.dumps(state).encode(), db=self._config)
            for entry in epochs:
                txn.put(int(entry["epoch"]).to_bytes(8, "big"), json.dumps(entry).encode(),
                        db=self._epochs)
        self.epoch = int(state["epoch"])

    def load_cluster_state(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        with _translated("load cluster state"), self.env.begin() as txn:
            raw = txn.get(b"cluster_state", db=self._config)
            epochs = [json.loads(value) for _, value in txn.cursor(db=self._epochs)]
        state = None if raw is None else json.loads(raw)
        if state is not None:
            self.epoch = int(state["epoch"])
        return state, epochs

    # --- metadata ----------------------------------------------------------

    def object_path(self, oid: int) -> str:
        name = f"{oid:016x}"
        return os.path.join(self.object_dir, name[-2:], name)

    def _committed_value(self, oid: int) -> tuple[int, bool, int | None] | None:
        with self.env.begin(db=self._objects) as txn:
            value = txn.get(_oid_key(oid))
        return None if value is None else _unpack_meta(value)

    def _committed(self, oid: int) -> tuple[int, bool] | None:
        found = self._committed_value(oid)
        return None if found is None else (found[0], found[1])

    def _lookup(self, oid: int) -> tuple[int, bool] | None:
        """(version, removed) as of now, or None if the store knows nothing of oid."""
        meta = self._meta.get(oid)
        if meta is not None:
            return None if meta.gone else (meta.version, meta.removed)
        return self._committed(oid)

    def _changing(self, oid: int) -> _Meta:
        """The object's in-memory metadata, for a change."""
        meta = self._meta.get(oid)
        if meta is None:
            committed = self._committed(oid)
            meta = _Meta(*(committed or (0, False)))
            self._meta[oid] = meta
        self._gen += 1
        meta.gen = self._gen
        meta.gone = False
        return meta

    def _checksums(self, oid: int, meta: _Meta | None = None) -> array.array[int]:
        meta = meta if meta is not None else self._meta.get(oid)
        if meta is not None and meta.sums is not None:
            return meta.sums
        if meta is not None and meta.drop_sums:
            return sums.fresh(self.object_size)
        with self.env.begin(db=self._sums) as txn:
            raw = txn.get(_oid_key(oid))
        return sums.load(None if raw is None else bytes(raw), self.object_size)

    def _sums_for_change(self, meta: _Meta, oid: int) -> array.array[int]:
        if meta.sums is None:
            meta.sums = array.array("I", self._checksums(oid, meta))
        return meta.sums

    def version(self, oid: int) -> int:
        found = self._lookup(oid)
        return found[0] if found else 0

    def _bump_version(self, oid: int, version: int | None = None, exact: bool = False) -> int:
        """Advance the object's version: to one past the old one when no version is
        given; to max(old, version) when one is (a write that carries its gateway's
        version: applying it twice changes nothing); to exactly version if exact (a
        copy made from a copy at that version)."""
        meta = self._changing(oid)
        if version is None:
            meta.version += 1
        elif exact:
            meta.version = version
        else:
            meta.version = max(meta.version, version)
        meta.removed = False
        return meta.version

    # --- intents -------------------------------------------------------------

    def needs_intent(self, oid: int) -> bool:
        return oid not in self._intents

    async def ensure_intent(self, oid: int, version: int = 0) -> None:
        """Commit an intent for oid before its first change since its last sync;
        concurrent callers share one commit. ``version`` is what that change gives the
        copy (its gateway's version, when it has one): after a crash the copy is at
        least that new. The data of a change a SIGKILL interrupted survives in the
        page cache, its version in memory does not; without it, a copy with the
        change and one without would come back at one version, and the one that
        missed the change could win (a whole-cluster SIGKILL test showed it)."""
        while self.needs_intent(oid):
            self._intent_wanted.setdefault(oid, self._token(version))
            if self._intent_task is None or self._intent_task.done():
                self._intent_task = asyncio.get_running_loop().create_task(self._commit_intents())
            await asyncio.shield(self._intent_task)

    async def ensure_intents(self, oids: list[int]) -> None:
        """ensure_intent for many objects in one commit, before they are made: recovery
        commits the intents of the copies it is about to fetch a window at a time
        (version 0: a copy not synced before a crash is forgotten, and fetched again),
        rather than one commit, with its fsync, per copy."""
        wanted = [oid for oid in oids if self.needs_intent(oid)]
        if not wanted:
            return
        for oid in wanted:
            self._intent_wanted.setdefault(oid, self._token())
        while any(self.needs_intent(oid) for oid in wanted):
            if self._intent_task is None or self._intent_task.done():
                self._intent_task = asyncio.get_running_loop().create_task(self._commit_intents())
            await asyncio.shield(self._intent_task)
            for oid in wanted:
                if self.needs_intent(oid):
                    self._intent_wanted.setdefault(oid, self._token())

    def release_intents(self, oids: list[int]) -> None:
        """Intents of ensure_intents that no change used (the copy was not made after
        all): deleted at the next commit. An object changed since its last sync keeps
        its intent until that change is durable."""
        for oid in oids:
            if oid in self._meta or oid in self._dirty:
                continue
            token = self._intents.pop(oid, None)
            if token is not None:
                self._intent_clear[oid] = token

    async def _commit_intents(self) -> None:
        wanted, self._intent_wanted = self._intent_wanted, {}
        cleared, self._intent_clear = self._intent_clear, {}
        wipes = self._wipes
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.meta_executor, self._write_intents, wanted, cleared)
        except BaseException:
            self._intent_clear.update(cleared)
            raise
        if wipes == self._wipes:  # else the wipe dropped them
            self._intents.update(wanted)

    def _token(self, version: int = 0) -> bytes:
        """An intent's value: a token unique to it, the version it promises, and the
        epoch it is made in."""
        return (next(self._tokens).to_bytes(8, "big") + version.to_bytes(8, "big")
                + self.epoch.to_bytes(8, "big"))

    def _write_intents(self, wanted: dict[int, bytes], cleared: dict[int, bytes]) -> None:
        with _translated("record intents"), self.env.begin(db=self._intents_db, write=True) as txn:
            for oid, token in wanted.items():
                txn.put(_oid_key(oid), token)
            self._delete_intents(txn, cleared)

    def _delete_intents(self, txn: lmdb.Transaction, cleared: dict[int, bytes]) -> None:
        for oid, token in cleared.items():
            key = _oid_key(oid)
            if txn.get(key, db=self._intents_db) == token:  # not a newer intent put meanwhile
                txn.delete(key, db=self._intents_db)

    def _intend(self, oid: int) -> None:
        """For callers that did not await ensure_intent: commit it now, blocking."""
        if self.needs_intent(oid):
            cleared, self._intent_clear = self._intent_clear, {}
            wanted = {oid: self._token()}
            try:
                self.meta_executor.submit(self._write_intents, wanted, cleared).result()
            except BaseException:
                self._intent_clear.update(cleared)
                raise
            self._intents.update(wanted)

    # --- objects ---------------------------------------------------------

    def _fd(self, oid: int, create: bool = False) -> int:
        fd = self._fds.get(oid)
        if fd is not None:
            self._fds.move_to_end(oid)
            return fd
        path = self.object_path(oid)
        try:
            fd = self.io.open(path, create)
        except FileNotFoundError:
            if not create:
                raise NoObject(f"object {oid:016x} is not on this node") from None
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._directories.add(self.object_dir)
            fd = self.io.open(path, create)
        self._cache_fd(oid, fd)
        return fd

    def _cache_fd(self, oid: int, fd: int) -> None:
        self._fds[oid] = fd
        if len(self._fds) > _fd_cache_max:
            old_oid, old_fd = self._fds.popitem(last=False)
            if old_oid in self._dirty:
                try:
                    self.io.datasync(old_fd)
                except OSError:
                    self._fds[old_oid] = old_fd  # still dirty: kept for the next sync
                    raise
                self._dirty.discard(old_oid)
            self.io.close(old_fd)

    def _drop_fd(self, oid: int) -> None:
        fd = self._fds.pop(oid, None)
        if fd is not None:
            self.io.close(fd)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.object_size:
            raise InvalidParameters(
                f"range {offset}+{length} is outside the object size {self.object_size}")

    def _pread_full(self, fd: int, offset: int, count: int) -> bytes:
        data = self.io.pread(fd, count, offset)
        if len(data) < count:  # a file cut short reads as zeros past its end
            data += bytes(count - len(data))
        return data

    def _refresh_sums(self, oid: int, meta: _Meta, fd: int, offset: int, count: int,
                      data: bytes | bytearray | memoryview | None = None) -> None:
        """Checksums of the blocks [offset, offset+count) touches: from data when it
        covers whole blocks, else from what the file now holds there."""
        if not self.checksums or not count:
            return
        table = self._sums_for_change(meta, oid)
        first, end = sums.covering(offset, count)
        if data is not None and offset % sums.BLOCK == 0 and len(data) % sums.BLOCK == 0:
            sums.compute(data, first, table)
        else:
            sums.compute(self._pread_full(fd, first * sums.BLOCK, (end - first) * sums.BLOCK),
                         first, table)

    def _changed(self, oid: int, fd: int, meta: _Meta, offset: int, count: int,
                 data: bytes | bytearray | memoryview | None, call: Any) -> None:
        """Run a change of the file; keep the checksums true to the file even when the
        change fails halfway (ENOSPC, EIO), so nothing reads as corrupt after it."""
        try:
            call()
        except OSError:
            try:
                self._refresh_sums(oid, meta, fd, offset, count)
            except OSError:
                log.exception("cannot re-read object %016x after a failed change", oid)
            raise
        self._refresh_sums(oid, meta, fd, offset, count, data)

    def in_doubt(self, oid: int) -> bool:
        return oid in self._doubtful

    def doubt(self, oid: int) -> int | None:
        """The epoch of the copy's doubt, or None if it is not in doubt."""
        return self._doubtful.get(oid)

    def doubts(self) -> dict[int, int]:
        """The copies in doubt, each with the epoch from which a crash may have taken
        its writes."""
        return dict(self._doubtful)

    def clear_doubt(self, oid: int) -> None:
        """The copy was verified, replaced or removed: no longer in doubt (durably so
        at the next sync; until then a crash only brings the doubt back)."""
        if oid in self._doubtful:
            del self._doubtful[oid]
            self._doubt_add.discard(oid)
            self._doubt_clear.add(oid)
        self._unpartial(oid)  # a whole copy now, or none

    def _unpartial(self, oid: int) -> None:
        if self._partial.pop(oid, None) is not None or oid in self._partial_recorded:
            self._partial_changed.add(oid)  # its record goes at the next sync
        self._partial_unsure.discard(oid)

    def partial_copies_unsure(self) -> None:
        """This sheep was away (declared dead while alive): its partial copies may have
        missed writes to their own ranges, so each stays in doubt once filled."""
        self._partial_unsure |= self._partial.keys()

    # --- partial copies ---------------------------------------------------------
    #
    # A write to an object this sheep should hold but lacks (a new holder, before
    # recovery copied it here) does not wait for a whole copy: the sheep makes a
    # partial copy holding just what was written (write_partial), takes every later
    # change as any copy does (recording the ranges), and recovery fills in the rest
    # from a whole copy later (fill), never over a range written here meanwhile. To
    # everyone else a partial copy is absent (the peer side answers NoObject to reads,
    # stats and listings): it is never read, never a source, never counted as held.
    # It is in doubt from the start, durably so from its first sync (an intent covers
    # it before that), so after a crash it never outranks a whole copy. It is recorded
    # as partial (the partial database) before its data is written, and its ranges at
    # every sync, so a restart does not take it for a whole copy: kept as the verifier
    # keeps a copy nothing outranks, it once became a source of zeros (simulator, seed
    # 474).

    def is_partial(self, oid: int) -> bool:
        return oid in self._partial

    def partial_oids(self) -> set[int]:
        return set(self._partial)

    def knows(self, oid: int) -> bool:
        """Whether the store has anything of oid: a copy, a file, or a tombstone."""
        return self._lookup(oid) is not None or self.exists(oid)

    def write_partial(self, oid: int, offset: int, data: bytes | memoryview,
                      version: int) -> int:
        """A partial copy of an object the store knows nothing of, holding only data at
        offset (the rest reads as zeros, and is nobody's business until filled)."""
        if self.knows(oid):
            raise NoObject(f"object {oid:016x}: a partial copy only replaces nothing")
        ranges = [[offset, offset + len(data)]]
        # Recorded first: a crash must never leave the file without the record. One
        # commit, on the metadata thread (in order with the syncs' commits), waited
        # for here: a partial copy is rare (a write to a new holder before recovery).
        self.meta_executor.submit(self._record_partial, oid, ranges).result()
        self._partial_recorded.add(oid)
        try:
            new = self.create_and_write(oid, offset, data, version)
        except BaseException:
            # No copy made: the record goes at the next sync (left, it would make a
            # whole copy made here later partial again at the next start).
            self._partial_changed.add(oid)
            raise
        self._doubtful[oid] = self.epoch
        self._doubt_add.add(oid)
        self._partial[oid] = ranges
        return new

    def _record_partial(self, oid: int, ranges: list[list[int]]) -> None:
        with _translated(f"record the partial copy of {oid:016x}"), self.env.begin(
                db=self._partial_db, write=True) as txn:
            txn.put(_oid_key(oid), json.dumps(ranges).encode())

    def _written(self, oid: int, offset: int, count: int) -> None:
        ranges = self._partial.get(oid)
        if ranges is None or not count:
            return
        start, end = offset, offset + count
        merged: list[list[int]] = []
        for low, high in ranges:
            if high < start or low > end:
                merged.append([low, high])
            else:
                start, end = min(start, low), max(end, high)
        merged.append([start, end])
        merged.sort()
        self._partial[oid] = merged
        self._partial_changed.add(oid)

    def fill(self, oid: int, data: bytes | bytearray | memoryview, version: int) -> int:
        """fill_extents from the whole object's bytes."""
        if oid not in self._partial:
            raise NoObject(f"object {oid:016x} has no partial copy here")
        if len(data) != self.object_size:
            raise InvalidParameters(f"filling {oid:016x} takes the whole object"
                                    f" ({self.object_size} bytes), not {len(data)}")
        return self.fill_extents(oid, [(0, memoryview(data))], version)

    def fill_extents(self, oid: int, extents: list[tuple[int, memoryview]],
                     version: int) -> int:
        """Complete a partial copy from a whole copy's extents (read_extents, at
        version): every range not written here since the partial copy was made. What
        the extents leave out, and zero ranges in them, stay holes (the file has zeros
        there already). The version becomes the newer of the two."""
        ranges = self._partial.get(oid)
        if ranges is None:
            raise NoObject(f"object {oid:016x} has no partial copy here")
        self._check_extents(extents)
        gaps, at = [], 0
        for low, high in ranges:
            if low > at:
                gaps.append((at, low))
            at = max(at, high)
        if at < self.object_size:
            gaps.append((at, self.object_size))
        new = self.version(oid)
        for offset, data in extents:
            view = memoryview(data)
            for low, high in gaps:
                start, end = max(low, offset) - offset, min(high, offset + len(view)) - offset
                for run_start, run_end in _nonzero_runs(view, start, end):
                    new = self.write(oid, offset + run_start, view[run_start:run_end],
                                     version=version)
        if not gaps or new < version:
            new = self._bump_version(oid, version)
        if oid in self._partial_unsure:
            # A crash caught its changes unsynced: what it holds of them is unknown, so
            # it stays in doubt (a copy at its version that is not outranks it) and the
            # caller has it verified (Peer.suspect).
            self._unpartial(oid)
        else:
            self.clear_doubt(oid)
        return new

    def exists(self, oid: int) -> bool:
        """Whether the object's file is there (asked of the path, not the fd cache: a
        file lost from the store must not count)."""
        return os.path.exists(self.object_path(oid))

    def create_and_write(self, oid: int, offset: int, data: bytes | memoryview,
                         version: int | None = None) -> int:
        """Create the object (or overwrite an existing one) and write data into it.
        version, when given, becomes the new copy's version. A new object whose
        creation fails (EIO, ENOSPC) is not left behind half made: it would be a
        copy at version 0 of nothing in particular, that recovery and reads could
        take for a real one (found by the simulator)."""
        self._check_range(offset, len(data))
        return self._whole_copy(oid, lambda: self._create_and_write(oid, offset, data, version))

    def _whole_copy(self, oid: int, make: Callable[[], int]) -> int:
        """make() a whole new copy of oid (its version). If it fails, a new object is
        not left behind half made (_undo_create), and an old copy it emptied is left
        in doubt (_torn)."""
        fresh = not self.exists(oid)
        before = self.version(oid)  # a tombstone's, if any
        doubt = self._doubtful.get(oid)
        try:
            return make()
        except SheepError:
            if fresh:
                self._undo_create(oid, before)
            else:
                self._torn(oid, doubt)
            raise

    def _undo_create(self, oid: int, tombstone_version: int) -> None:
        try:
            self.drop(oid)
            if tombstone_version:
                self.tombstone(oid, tombstone_version)
        except SheepError as error:  # the disk fails on: the intent sorts it out at restart
            log.error("cannot undo the failed creation of %016x: %s", oid, error)

    def _torn(self, oid: int, doubt: int | None) -> None:
        """A whole new copy failed over an old one (ENOSPC, EIO): the file was emptied
        first, so it holds neither copy, yet keeps the old one's version. In doubt
        (durably so at the next sync), from the old doubt's epoch if it had one: at
        that version any copy not in doubt outranks it, so it never wins over the
        copies it should have matched (simulator seed 67: a verifier's replacement
        that met ENOSPC left zeros at the version of a flushed write; kept at the next
        verification, they were copied over the good replicas)."""
        self._doubtful[oid] = self.epoch if doubt is None else min(doubt, self.epoch)
        self._doubt_add.add(oid)
        self._doubt_clear.discard(oid)

    def _create_and_write(self, oid: int, offset: int, data: bytes | memoryview,
                          version: int | None) -> int:
        with _translated(f"create object {oid:016x}"):
            fd, meta = self._new_copy(oid)

            def create() -> None:
                self.io.truncate(fd, 0)  # an old object's bytes must not show through
                self.io.truncate(fd, self.object_size)
                if data:
                    self.io.pwrite(fd, data, offset)

            self._changed(oid, fd, meta, offset, len(data), data, create)
            return self._bump_version(oid, version, exact=version is not None)

    def _new_copy(self, oid: int, adopted: int | None = None) -> tuple[int, _Meta]:
        """Begin a whole new copy of oid (its file opened, made if need be; the caller
        empties it), or take the file adopt_extents wrote (its fd, adopted): the
        checksums of a zero object, to be set for what is written."""
        self._intend(oid)
        self.clear_doubt(oid)  # a whole new copy
        self._drop_fd(oid)  # a cached fd may be of a file lost from the store
        if adopted is None:
            fd = self._fd(oid, create=True)
        else:
            fd = adopted
            self._cache_fd(oid, fd)
        self._directories.add(os.path.dirname(self.object_path(oid)))
        meta = self._changing(oid)
        meta.sums = sums.fresh(self.object_size) if self.checksums else None
        meta.drop_sums = False
        self._dirty.add(oid)
        self._fresh.add(oid)
        return fd, meta

    # --- copies by extents ----------------------------------------------------------
    #
    # A whole copy of an object travels as its extents: the ranges of whole checksum
    # blocks that hold data, with their bytes; every other block is zeros. The source
    # lists them from its file's allocation (FileIO.extents) and leaves out blocks of
    # zeros; the new copy is made at the object's size and only the extents are
    # written, so holes stay holes on every copy, however often it is copied.

    def read_extents(self, oid: int,
                     room: int = 0) -> tuple[list[tuple[int, memoryview]], bytearray]:
        """The copy's data as (offset, bytes) extents of whole blocks, in order: views
        of one buffer, in which they lie one after another from byte ``room`` on (the
        bytes before are the caller's: a sparse reply puts its table there and sends
        the buffer as it is, rather than copying 4 MiB into a payload).

        Verified as strictly as read() of the whole object: the extents' data against
        its checksums, and every block left out (a hole, or zeros) against a zero
        block's checksum, so a block the file lost (it reads as zeros) is damage here
        as it is there. Damage is an I/O error."""
        with _translated(f"read object {oid:016x}"):
            fd = self._fd_to_read(oid)
            ranges = _whole_blocks(self.io.extents(fd, self.object_size), self.object_size)
            buffer = bytearray(room + sum(end - start for start, end in ranges))
            view = memoryview(buffer)
            at = room
            for start, end in ranges:  # a file cut short reads as zeros past its end
                self.io.pread_into(fd, view[at:at + end - start], start)
                at += end - start
        table = self._checksums(oid) if self.checksums else None
        found: list[tuple[int, memoryview]] = []
        bad: list[int] = []
        block = 0  # the blocks before it are checked
        at = packed = room  # where the next range was read, where its data goes
        for start, end in ranges:
            first = start // sums.BLOCK
            piece = view[at:at + end - start]
            crcs = sums.crcs(piece)
            if table is not None:
                bad += sums.not_zeros(table, block, first) + sums.mismatches(crcs, first, table)
            for low, high in sums.nonzero_runs(piece, crcs):
                if packed != at + low:  # blocks of zeros left out: the rest moves up
                    view[packed:packed + high - low] = view[at + low:at + high]
                found.append((start + low, view[packed:packed + high - low]))
                packed += high - low
            block = first + len(crcs)
            at += end - start
        if table is not None:
            bad += sums.not_zeros(table, block, len(table))
        if bad:
            raise self._damage(oid, bad)
        return found, buffer

    def data_map(self, oid: int) -> int:
        """The copy's allocation as a mask of 4 KiB blocks (sheep/changes.py): the
        blocks its file allocates may hold data; every other block is a hole and reads
        as zeros. No data is read (lseek SEEK_DATA/SEEK_HOLE)."""
        with _translated(f"map object {oid:016x}"):
            fd = self._fd_to_read(oid)
            ranges = _whole_blocks(self.io.extents(fd, self.object_size), self.object_size)
        value = 0
        for start, end in ranges:
            value |= changes.mask(start, end - start)
        return value

    def _check_extents(self, extents: list[tuple[int, memoryview]]) -> None:
        """Extents as read_extents gives them: whole blocks, in order, apart, inside
        the object (the checksums are computed block by block from them)."""
        end = 0
        for offset, data in extents:
            if (offset % sums.BLOCK or len(data) % sums.BLOCK or offset < end
                    or offset + len(data) > self.object_size):
                raise InvalidParameters(
                    f"extent {offset}+{len(data)} is not whole blocks in order inside the"
                    f" object size {self.object_size}")
            end = offset + len(data)

    def create_from_extents(self, oid: int, extents: list[tuple[int, memoryview]],
                            version: int | None = None) -> int:
        """A whole new copy of the object (over any copy here) from another copy's
        extents (read_extents): the file is made at the object's size and only the
        extents' blocks that are not zeros are written, so it takes the space its
        data does. The checksums are those of the whole object (a zero block's where
        nothing is written). Otherwise as create_and_write of the whole object:
        version, when given, becomes the copy's; a new object whose creation fails is
        not left behind."""
        self._check_extents(extents)
        return self._whole_copy(oid, lambda: self._create_from_extents(oid, extents, version))

    def _create_from_extents(self, oid: int, extents: list[tuple[int, memoryview]],
                             version: int | None) -> int:
        with _translated(f"create object {oid:016x}"):
            fd, meta = self._new_copy(oid)
            try:
                found = self._write_whole(fd, extents)
            except OSError:
                # An old copy replaced halfway: its checksums must be true to the file.
                try:
                    self._refresh_sums(oid, meta, fd, 0, self.object_size)
                except OSError:
                    log.exception("cannot re-read object %016x after a failed change", oid)
                raise
            self._set_sums(meta, extents, found)
            return self._bump_version(oid, version, exact=version is not None)

    @staticmethod
    def _set_sums(meta: _Meta, extents: list[tuple[int, memoryview]],
                  found: list[list[int]]) -> None:
        """A new copy's checksums where its extents (with their crcs, found) lie."""
        if meta.sums is not None:
            for (offset, _), crcs in zip(extents, found, strict=True):
                first = offset // sums.BLOCK
                meta.sums[first:first + len(crcs)] = array.array("I", crcs)

    async def adopt_extents(self, oid: int, extents: list[tuple[int, memoryview]],
                            version: int) -> bool:
        """create_from_extents for a copy of an object this store knows nothing of
        (recovery's), with the file written off the event loop: into a new file beside
        the object's (its name is not an oid's, so nothing lists or reads it), in
        write_executor, then renamed into place on the loop, with no await between the
        check that the store still knows nothing of oid and the rename. False (and
        nothing kept) if the store came to know the object meanwhile: a client's write
        made a copy or a partial copy there, which the caller fills instead. Writing a
        4 MiB copy into fresh page cache took 2 to 13 ms here, time in which the loop
        served nothing else."""
        self._check_extents(extents)
        if self.knows(oid):
            return False
        path = self.object_path(oid)
        directory = os.path.dirname(path)
        temporary = path + _adopting_suffix
        wipes = self._wipes
        loop = asyncio.get_running_loop()
        with _translated(f"create object {oid:016x}"):
            os.makedirs(directory, exist_ok=True)
            fd, found = await loop.run_in_executor(
                self.write_executor, self._write_adopted, temporary, extents)
            if self.knows(oid) or wipes != self._wipes or self._env is None:
                self.io.close(fd)
                self.io.unlink(temporary)
                return False
            try:
                self._intend(oid)
                self.io.rename(temporary, path)
            except BaseException:
                self.io.close(fd)
                with contextlib.suppress(OSError):
                    self.io.unlink(temporary)
                raise
        _, meta = self._new_copy(oid, adopted=fd)
        self._set_sums(meta, extents, found)
        self._bump_version(oid, version, exact=True)
        return True

    def _write_whole(self, fd: int, extents: list[tuple[int, memoryview]]) -> list[list[int]]:
        """Make the file a whole copy from extents: emptied (an old copy's bytes, or a
        file a crash left, must not show through), at the object's size, only the
        extents' non-zero blocks written. The extents' crcs."""
        self.io.truncate(fd, 0)
        self.io.truncate(fd, self.object_size)
        found = [sums.crcs(data) for _, data in extents]
        for (offset, data), crcs in zip(extents, found, strict=True):
            view = memoryview(data)
            for low, high in sums.nonzero_runs(view, crcs):
                self.io.pwrite(fd, view[low:high], offset + low)
        return found

    def _write_adopted(self, path: str, extents: list[tuple[int, memoryview]],
                       ) -> tuple[int, list[list[int]]]:
        """adopt_extents' file (in write_executor): made afresh at the object's size,
        only the extents' non-zero blocks written; its fd and the extents' crcs. A
        failure leaves no file behind."""
        fd = self.io.open(path, True)
        try:
            found = self._write_whole(fd, extents)
        except BaseException:
            self.io.close(fd)
            with contextlib.suppress(OSError):
                self.io.unlink(path)
            raise
        return fd, found

    def write(self, oid: int, offset: int, data: bytes | memoryview, fua: bool = False,
              version: int | None = None) -> int:
        self._check_range(offset, len(data))
        with _translated(f"write object {oid:016x}"):
            self._live(oid)
            fd = self._fd(oid)
            self._verify_partial(oid, fd, offset, len(data))
            self._intend(oid)
            meta = self._changing(oid)
            self._dirty.add(oid)
            self._changed(oid, fd, meta, offset, len(data), data,
                          lambda: self.io.pwrite(fd, data, offset))
            new = self._bump_version(oid, version)
            self._written(oid, offset, len(data))
        if fua:
            job = self.begin_sync_object(oid)
            self.finish_sync(job)
            self.sync_done(job)
        return new

    def _live(self, oid: int) -> None:
        """Refuse a change to an object that is not here (or only as a tombstone)."""
        found = self._lookup(oid)
        if found is not None and found[1]:
            raise NoObject(f"object {oid:016x} was removed from this node")

    def read(self, oid: int, offset: int, count: int) -> bytes:
        """The bytes, verified against the checksums; damage is an I/O error."""
        self._check_range(offset, count)
        with _translated(f"read object {oid:016x}"):
            fd = self._fd_to_read(oid)
            if not self.checksums or not count:
                return self._pread_full(fd, offset, count)
            first, end = sums.covering(offset, count)
            start = first * sums.BLOCK
            data = self._pread_full(fd, start, (end - first) * sums.BLOCK)
        bad = sums.bad_blocks(data, first, self._checksums(oid))
        if bad:
            raise self._damage(oid, bad)
        return data[offset - start:offset - start + count]

    def _fd_to_read(self, oid: int) -> int:
        """The copy's fd; a copy whose metadata is here but whose file is not is
        damage (an I/O error), not an absent object."""
        try:
            return self._fd(oid)
        except NoObject:
            found = self._lookup(oid)
            if found is not None and not found[1]:
                self.counters["missing_files"] += 1
                raise IOErrorResult(
                    f"object {oid:016x}: its file is missing from the store") from None
            raise

    def _damage(self, oid: int, bad: list[int]) -> SheepError:
        self.counters["checksum_errors"] += 1
        return IOErrorResult(
            f"object {oid:016x}: checksum mismatch in block{'s' if len(bad) > 1 else ''} "
            f"{', '.join(map(str, bad[:8]))}{' ...' if len(bad) > 8 else ''}")

    def _verify_partial(self, oid: int, fd: int, offset: int, count: int) -> None:
        """A change covering part of a block merges it with what the block holds, and
        the block's checksum is then computed anew: what it holds is verified first,
        or damage there would be blessed. Damage fails the change as it fails a read."""
        if not self.checksums or not count:
            return
        first, end = sums.covering(offset, count)
        edges = {first} if offset % sums.BLOCK else set()
        if (offset + count) % sums.BLOCK:
            edges.add(end - 1)
        table = self._checksums(oid)
        bad = [block for block in sorted(edges) if sums.bad_blocks(
            self._pread_full(fd, block * sums.BLOCK, sums.BLOCK), block, table)]
        if bad:
            raise self._damage(oid, bad)

    def verify(self, oid: int) -> list[int]:
        """The blocks of the object whose data does not match its checksums (a scrub)."""
        with _translated(f"verify object {oid:016x}"):
            fd = self._fd(oid)
            data = self._pread_full(fd, 0, self.object_size)
        return sums.bad_blocks(data, 0, self._checksums(oid)) if self.checksums else []

    def discard(self, oid: int, offset: int, count: int, version: int | None = None) -> int:
        self._check_range(offset, count)
        with _translated(f"discard in object {oid:016x}"):
            self._live(oid)
            fd = self._fd(oid)
            self._verify_partial(oid, fd, offset, count)
            self._intend(oid)
            meta = self._changing(oid)
            self._dirty.add(oid)
            self._changed(oid, fd, meta, offset, count, None,
                          lambda: self.io.punch(fd, offset, count))
            self._written(oid, offset, count)
            return self._bump_version(oid, version)

    def remove(self, oid: int, version: int | None = None) -> None:
        """Remove the object's file; its version stays, bumped, as a tombstone, so a
        copy of the object elsewhere that missed the removal is known to be older."""
        with _translated(f"remove object {oid:016x}"):
            self._intend(oid)
            self._drop_fd(oid)
            try:
                self.io.unlink(self.object_path(oid))
            except FileNotFoundError:
                raise NoObject(f"object {oid:016x} is not on this node") from None
            self._directories.add(os.path.dirname(self.object_path(oid)))
            self._dirty.discard(oid)
            # Past every version the copy had: a tombstone must beat copies that missed it.
            self.tombstone(oid, max(version or 0, self.version(oid) + 1))

    def drop(self, oid: int) -> None:
        """Forget a copy this node no longer has to hold (its current holders have it):
        the file and its version go, leaving no tombstone, as if it had never been here."""
        with _translated(f"drop object {oid:016x}"):
            self._intend(oid)
            self._drop_fd(oid)
            self._dirty.discard(oid)
            try:
                self.io.unlink(self.object_path(oid))
            except FileNotFoundError:
                pass
            else:
                self._directories.add(os.path.dirname(self.object_path(oid)))
            self.clear_doubt(oid)
            meta = self._changing(oid)
            meta.gone = True
            meta.sums = None
            meta.drop_sums = True

    def tombstone(self, oid: int, version: int) -> None:
        """Record that the object was removed at this version (it is not here)."""
        self.clear_doubt(oid)
        meta = self._changing(oid)
        meta.version = max(meta.version, version)
        meta.removed = True
        meta.sums = None
        meta.drop_sums = True

    def stat(self, oid: int) -> dict[str, Any]:
        """Version and size of the copy; "deleted" for a tombstone, "missing" when the
        metadata says the copy is here but its file is gone; "digest" of its checksums."""
        with _translated(f"stat object {oid:016x}"):
            found = self._lookup(oid)
            try:
                st = os.stat(self.object_path(oid))
            except FileNotFoundError:
                if found is not None and found[1]:
                    return {"oid": oid, "version": found[0], "deleted": True}
                if found is not None:
                    return {"oid": oid, "version": found[0], "missing": True}
                raise NoObject(f"object {oid:016x} is not on this node") from None
        value: dict[str, Any] = {"oid": oid, "version": found[0] if found else 0,
                                 "size": st.st_size, "allocated": st.st_blocks * 512,
                                 "synced": oid not in self._meta and oid not in self._dirty,
                                 # Synced at least once since it was made: a power loss can
                                 # take back its latest writes, never the copy itself.
                                 "durable": oid not in self._fresh}
        if oid in self._doubtful:
            value["doubtful"] = True
        if self.checksums:
            value["digest"] = self._digest(oid)
        return value

    def _digest(self, oid: int) -> int:
        """The digest of the copy's checksum table: from memory for a changed copy, else
        as committed with its metadata (the table itself is read only for old values)."""
        meta = self._meta.get(oid)
        if meta is None or (meta.sums is None and not meta.drop_sums):
            found = self._committed_value(oid)
            if found is not None and found[2] is not None:
                return found[2]
        return sums.digest(self._checksums(oid))

    def list_oids(self) -> list[int]:
        oids = []
        with _translated("list objects"):
            for sub in os.scandir(self.object_dir):
                if not sub.is_dir():
                    continue
                for entry in os.scandir(sub.path):
                    try:
                        oids.append(int(entry.name, 16))
                    except ValueError:
                        continue
        return sorted(oids)

    def copies(self) -> list[int]:
        """The objects whose whole copies are here: list_oids without the partial ones
        (not copies yet, to anyone but recovery)."""
        return [oid for oid in self.list_oids() if oid not in self._partial]

    def usage(self) -> dict[str, int]:
        """Objects, bytes allocated by them, and the filesystem's free and total bytes."""
        objects = used = 0
        with _translated("measure store usage"):
            for sub in os.scandir(self.object_dir):
                if not sub.is_dir():
                    continue
                for entry in os.scandir(sub.path):
                    objects += 1
                    used += entry.stat().st_blocks * 512
            fs = os.statvfs(self.path)
        free = fs.f_bavail * fs.f_frsize
        return {"objects": objects, "used": used, "free": free, "capacity": used + free,
                "fs_size": fs.f_blocks * fs.f_frsize}

    def wipe(self) -> None:
        """Drop every object (the cluster was formatted anew). A sync may be under way
        (Peer._sync, between its steps): it is void from here on, and its commit, if it
        has begun, goes before the wipe's on the metadata thread."""
        self._wipes += 1
        with _translated("wipe objects"):
            for oid in list(self._fds):
                self._drop_fd(oid)
            self._dirty.clear()
            self._fresh.clear()
            self._directories.clear()
            self._meta.clear()
            shutil.rmtree(self.object_dir, ignore_errors=True)
            os.makedirs(self.object_dir, exist_ok=True)
            self.io.sync_directory(self.path)  # the old files stay gone
            self.meta_executor.submit(self._drop_objects).result()
            self._intents.clear()
            self._intent_clear.clear()
            self._doubtful.clear()
            self._doubt_clear.clear()
            self._doubt_add.clear()
            self._partial.clear()
            self._partial_changed.clear()
            self._partial_unsure.clear()
            self._partial_recorded.clear()

    def _drop_objects(self) -> None:
        with self.env.begin(write=True) as txn:
            for db in (self._objects, self._sums, self._intents_db, self._doubt_db,
                       self._partial_db):
                txn.drop(db, delete=False)

    # --- durability -------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Objects changed since their last sync."""
        return len(self._meta)

    def sync(self) -> None:
        """Make every change so far durable: fsync changed objects, commit metadata.
        (The owner must not run another sync meanwhile: see Peer.sync.)"""
        job = self.begin_sync()
        self.finish_sync(job)
        self.sync_done(job)

    def _begin(self) -> SyncJob:
        # One sync at a time: a second one could commit older metadata after a newer
        # one, or answer a flush while the first still has its files to fdatasync.
        assert not self._syncing, "a sync is already under way (see Peer._sync)"
        self._syncing = True
        return SyncJob(wipes=self._wipes)

    def begin_sync_object(self, oid: int) -> SyncJob:
        """Like begin_sync, for one object only (FUA)."""
        job = self._begin()
        try:
            with _translated(f"sync object {oid:016x}"):
                if oid in self._dirty:
                    job.fds.append(self.io.dup(self._fd(oid)))
                    job.synced.add(oid)
                    self._dirty.discard(oid)
                # Its entry (and its fan-out directory's) if new: the one fsync covers
                # every entry of the directory.
                for directory in (self.object_dir, os.path.dirname(self.object_path(oid))):
                    if directory in self._directories:
                        self._directories.discard(directory)
                        job.directories.append(directory)
        except BaseException:
            self.sync_failed(job)
            raise
        meta = self._meta.get(oid)
        if meta is not None:
            job.metas[oid] = self._frozen(meta)
        # The intents whose changes earlier syncs made durable go with this commit too:
        # left for a full sync, a stream of FUA copies (a repair's) kept them all, and a
        # crash then had the next start recompute every one of those objects' checksums.
        job.intents_cleared, self._intent_clear = self._intent_clear, {}
        if oid in self._partial_changed:
            self._partial_changed.discard(oid)
            job.partials[oid] = self._partial_ranges(oid)
        return job

    def _partial_ranges(self, oid: int) -> list[list[int]] | None:
        ranges = self._partial.get(oid)
        return None if ranges is None else [list(pair) for pair in ranges]

    def begin_sync(self) -> SyncJob:
        """Take the changed objects as duplicated fds and their metadata as it is now,
        for finish_sync in a worker thread. Duplicates keep the files open even if the
        fd cache closes them meanwhile."""
        job = self._begin()
        try:
            with _translated("sync store"):
                for oid in self._dirty:
                    if oid in self._fds:
                        job.fds.append(self.io.dup(self._fds[oid]))
        except BaseException:
            for fd in job.fds:
                self.io.close(fd)
            job.fds = []
            self.sync_failed(job)
            raise
        job.synced = set(self._dirty)
        self._dirty.clear()
        job.directories = sorted(self._directories)
        self._directories.clear()
        job.metas = {oid: self._frozen(meta) for oid, meta in self._meta.items()}
        job.intents_cleared, self._intent_clear = self._intent_clear, {}
        job.doubts_cleared, self._doubt_clear = self._doubt_clear, set()
        job.doubts_added = {oid: self._doubtful[oid] for oid in self._doubt_add
                            if oid in self._doubtful}
        self._doubt_add = set()
        job.partials = {oid: self._partial_ranges(oid) for oid in self._partial_changed}
        self._partial_changed = set()
        return job

    @staticmethod
    def _frozen(meta: _Meta) -> tuple[int, bytes | None, bool, bool, bool, int]:
        return (meta.version, None if meta.sums is None else meta.sums.tobytes(),
                meta.removed, meta.gone, meta.drop_sums, meta.gen)

    def finish_sync(self, job: SyncJob) -> None:
        """sync_files then commit (the commit on the metadata thread); on failure the
        job's objects are dirty again and its intents stay."""
        try:
            self.sync_files(job)
            self.meta_executor.submit(self.commit, job).result()
        except BaseException:
            self.sync_failed(job)
            raise

    def sync_files(self, job: SyncJob) -> None:
        """fdatasync the job's files and fsync its directories (safe in any worker
        thread); closes its fds."""
        try:
            with _translated("sync store"):
                self.io.sync_many(job.fds, job.directories, self.sync_executor,
                                  self._anchor)
        finally:
            for fd in job.fds:
                self.io.close(fd)
            job.fds = []

    def commit_needed(self, job: SyncJob) -> bool:
        """Whether commit has anything to write for the job."""
        return self._env is not None and job.wipes == self._wipes and bool(
            job.metas or job.intents_cleared or job.doubts_cleared or job.doubts_added
            or job.partials)

    def commit(self, job: SyncJob) -> None:
        """Commit the job's metadata, after its files are synced (run on meta_executor),
        commit_objects_max objects per transaction: each object's metadata stands on its
        own (an object not committed yet keeps its intent), and a transaction holds
        every page it changes in memory until it ends (8 KiB per checksum table)."""
        if not self.commit_needed(job):
            return
        items = list(job.metas.items())
        for start in range(0, max(len(items), 1), commit_objects_max):
            last = start + commit_objects_max >= len(items)
            # The doubts with the intents: until both commit, an intent left behind
            # makes the copy doubtful at the next start anyway.
            self._commit_some(items[start:start + commit_objects_max],
                              job.intents_cleared if last else {},
                              job.doubts_cleared if last else set(),
                              job.doubts_added if last else {},
                              job.partials if last else {})

    def _commit_some(self, items: list[tuple[int, tuple[int, bytes | None, bool, bool, bool, int]]],
                     intents_cleared: dict[int, bytes], doubts_cleared: set[int],
                     doubts_added: dict[int, int] | None = None,
                     partials: dict[int, list[list[int]] | None] | None = None) -> None:
        with _translated("sync store"), self.env.begin(write=True) as txn:
            for oid, (version, table, removed, gone, drop_sums, _) in items:
                key = _oid_key(oid)
                if gone:
                    txn.delete(key, db=self._objects)
                else:
                    if table is not None:
                        digest: int | None = sums.crc(table)  # = sums.digest of the table
                    elif drop_sums or not self.checksums:
                        digest = None
                    else:  # the table did not change: nor does its digest
                        old = txn.get(key, db=self._objects)
                        digest = None if old is None else _unpack_meta(old)[2]
                    txn.put(key, _pack_meta(version, removed, digest), db=self._objects)
                if table is not None:
                    txn.put(key, table, db=self._sums)
                elif drop_sums:
                    txn.delete(key, db=self._sums)
            self._delete_intents(txn, intents_cleared)
            for oid, epoch in (doubts_added or {}).items():
                if oid not in doubts_cleared:
                    txn.put(_oid_key(oid), epoch.to_bytes(8, "big"), db=self._doubt_db)
            for oid in doubts_cleared:
                txn.delete(_oid_key(oid), db=self._doubt_db)
            for oid, ranges in (partials or {}).items():
                if ranges is None:
                    txn.delete(_oid_key(oid), db=self._partial_db)
                else:
                    txn.put(_oid_key(oid), json.dumps(ranges).encode(), db=self._partial_db)

    def sync_failed(self, job: SyncJob) -> None:
        """A sync that failed leaves its objects dirty and their intents in place: the
        next flush tries again instead of acknowledging what never reached the disk."""
        self._syncing = False
        if job.wipes != self._wipes:
            return
        self._dirty |= job.synced
        self._directories.update(job.directories)
        for oid, token in job.intents_cleared.items():
            self._intent_clear.setdefault(oid, token)
        self._doubt_clear |= {oid for oid in job.doubts_cleared if oid not in self._doubtful}
        self._doubt_add |= {oid for oid in job.doubts_added if oid in self._doubtful}
        self._partial_changed |= job.partials.keys()

    def sync_done(self, job: SyncJob) -> None:
        """After finish_sync (back in the owner's thread): what did not change since
        the sync began is durable; its in-memory metadata and its intent can go."""
        self._syncing = False
        if job.wipes != self._wipes:
            return
        for oid, ranges in job.partials.items():
            if ranges is None and oid not in self._partial_changed:
                self._partial_recorded.discard(oid)
        # Its data synced by this job, or earlier when the fd cache evicted it (so it
        # is no longer dirty, yet still fresh until its metadata is committed).
        for oid in job.synced | job.metas.keys():
            if oid not in self._dirty:
                self._fresh.discard(oid)
        for oid, frozen in job.metas.items():
            meta = self._meta.get(oid)
            if meta is not None and meta.gen == frozen[5] and oid not in self._dirty:
                del self._meta[oid]
                token = self._intents.pop(oid, None)
                if token is not None:
                    self._intent_clear[oid] = token
