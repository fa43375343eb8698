"""The object store of one sheep.

Data objects are sparse files, one per object, under DIR/obj/XX/ (XX fans the
files out over 256 directories). Each file is created at the full object size
with ftruncate, so unwritten ranges read as zeros and take no space; a 4 KiB
write is a 4 KiB pwrite, never a rewrite of the object.

Metadata lives in LMDB (DIR/meta): per object its version (bumped on every
change, so a stale copy can be told from a fresh one), the node's identity, and
the persisted cluster state with its epoch log. LMDB commits do not sync;
``flush`` fsyncs the dirty object files and syncs LMDB, which is when data is
durable (block-device semantics, see docs/design.md).

This is the one boundary where OSError and lmdb.Error become result-code
exceptions (NoSpace, IOErrorResult, SystemFailure).
"""

from __future__ import annotations

import collections
import errno
import json
import os
import secrets
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lmdb

from sheep import constants
from sheep.errors import InvalidParameters, IOErrorResult, NoObject, NoSpace, SystemFailure

_meta_value = struct.Struct("<QQ")  # version, flags
_fd_cache_max = 1024


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    oid: int
    version: int


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
        raise SystemFailure(f"{what}: metadata error: {error}") from error


class Store:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.object_dir = os.path.join(self.path, "obj")
        self._env: lmdb.Environment | None = None
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._dirty: set[int] = set()
        self.object_size = constants.object_size_default_bytes

    # --- lifecycle -------------------------------------------------------

    def open(self) -> None:
        with _translated(f"open store {self.path}"):
            os.makedirs(self.object_dir, exist_ok=True)
            self._env = lmdb.open(
                os.path.join(self.path, "meta"), map_size=constants.lmdb_map_size_bytes,
                max_dbs=constants.lmdb_max_dbs, sync=False, metasync=False, subdir=True)
            self._objects = self._env.open_db(b"objects")
            self._config = self._env.open_db(b"config")
            self._epochs = self._env.open_db(b"epochs")

    def close(self) -> None:
        self.sync()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._env is not None:
            self._env.close()
            self._env = None

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

    def node_secret(self) -> str:
        """The random part of the node id, made at the store's first start."""
        secret = self.config_get("node_secret")
        if secret is None:
            secret = secrets.token_hex(4)
            self.config_put("node_secret", secret)
            self.sync()
        return str(secret)

    def save_cluster_state(self, state: dict[str, Any], epochs: list[dict[str, Any]]) -> None:
        """Persist the state and any new epoch-log entries in one transaction."""
        with _translated("persist cluster state"), self.env.begin(write=True) as txn:
            txn.put(b"cluster_state", json.dumps(state).encode(), db=self._config)
            for entry in epochs:
                txn.put(int(entry["epoch"]).to_bytes(8, "big"), json.dumps(entry).encode(),
                        db=self._epochs)

    def load_cluster_state(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        with _translated("load cluster state"), self.env.begin() as txn:
            raw = txn.get(b"cluster_state", db=self._config)
            epochs = [json.loads(value) for _, value in txn.cursor(db=self._epochs)]
        return (None if raw is None else json.loads(raw)), epochs

    # --- objects ---------------------------------------------------------

    def object_path(self, oid: int) -> str:
        name = f"{oid:016x}"
        return os.path.join(self.object_dir, name[-2:], name)

    def _fd(self, oid: int, create: bool = False) -> int:
        fd = self._fds.get(oid)
        if fd is not None:
            self._fds.move_to_end(oid)
            return fd
        path = self.object_path(oid)
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            if not create:
                raise NoObject(f"object {oid:016x} is not on this node") from None
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, flags, 0o644)
        self._fds[oid] = fd
        if len(self._fds) > _fd_cache_max:
            old_oid, old_fd = self._fds.popitem(last=False)
            try:
                if old_oid in self._dirty:
                    os.fdatasync(old_fd)
            finally:
                self._dirty.discard(old_oid)
                os.close(old_fd)
        return fd

    def _drop_fd(self, oid: int) -> None:
        fd = self._fds.pop(oid, None)
        self._dirty.discard(oid)
        if fd is not None:
            os.close(fd)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.object_size:
            raise InvalidParameters(
                f"range {offset}+{length} is outside the object size {self.object_size}")

    def _bump_version(self, oid: int, version: int | None = None, exact: bool = False) -> int:
        """Advance the object's version: to one past the old one when no version is
        given; to max(old, version) when one is (a write that carries its gateway's
        version: applying it twice changes nothing); to exactly version if exact (a
        copy made from a copy at that version)."""
        key = _oid_key(oid)
        with self.env.begin(db=self._objects, write=True) as txn:
            if version is None or not exact:
                old = txn.get(key)
                old_version = _meta_value.unpack(old)[0] if old else 0
                version = old_version + 1 if version is None else max(old_version, version)
            txn.put(key, _meta_value.pack(version, 0))
        return version

    def exists(self, oid: int) -> bool:
        """Whether the object's file is there (asked of the path, not the fd cache: a
        file lost from the store must not count)."""
        return os.path.exists(self.object_path(oid))

    def create_and_write(self, oid: int, offset: int, data: bytes | memoryview,
                         version: int | None = None) -> int:
        """version, when given, becomes the new copy's version."""
        """Create the object (or overwrite an existing one) and write data into it."""
        self._check_range(offset, len(data))
        with _translated(f"create object {oid:016x}"):
            self._drop_fd(oid)  # a cached fd may be of a file lost from the store
            fd = self._fd(oid, create=True)
            os.ftruncate(fd, 0)  # an old object's bytes must not show through the new one
            os.ftruncate(fd, self.object_size)
            if data:
                os.pwrite(fd, data, offset)
            self._dirty.add(oid)
            return self._bump_version(oid, version, exact=True)

    def write(self, oid: int, offset: int, data: bytes | memoryview, fua: bool = False,
              version: int | None = None) -> int:
        self._check_range(offset, len(data))
        with _translated(f"write object {oid:016x}"):
            fd = self._fd(oid)
            os.pwrite(fd, data, offset)
            if fua:
                os.fdatasync(fd)
            else:
                self._dirty.add(oid)
            return self._bump_version(oid, version)

    def read(self, oid: int, offset: int, count: int) -> bytes:
        self._check_range(offset, count)
        with _translated(f"read object {oid:016x}"):
            fd = self._fd(oid)
            data = os.pread(fd, count, offset)
        if len(data) < count:  # a file cut short reads as zeros past its end
            data += bytes(count - len(data))
        return data

    def discard(self, oid: int, offset: int, count: int, version: int | None = None) -> int:
        self._check_range(offset, count)
        with _translated(f"discard in object {oid:016x}"):
            from sheep.store.punch import punch_hole

            fd = self._fd(oid)
            punch_hole(fd, offset, count)
            self._dirty.add(oid)
            return self._bump_version(oid, version)

    def remove(self, oid: int, version: int | None = None) -> None:
        """Remove the object's file; its version stays, bumped, as a tombstone, so a
        copy of the object elsewhere that missed the removal is known to be older."""
        with _translated(f"remove object {oid:016x}"):
            self._drop_fd(oid)
            try:
                os.unlink(self.object_path(oid))
            except FileNotFoundError:
                raise NoObject(f"object {oid:016x} is not on this node") from None
            # Past every version the copy had: a tombstone must beat copies that missed it.
            self._bump_version(oid, max(version or 0, self.version(oid) + 1))

    def drop(self, oid: int) -> None:
        """Forget a copy this node no longer has to hold (its current holders have it):
        the file and its version go, leaving no tombstone, as if it had never been here."""
        with _translated(f"drop object {oid:016x}"):
            self._drop_fd(oid)
            self._dirty.discard(oid)
            try:
                os.unlink(self.object_path(oid))
            except FileNotFoundError:
                pass
            with self.env.begin(db=self._objects, write=True) as txn:
                txn.delete(_oid_key(oid))

    def tombstone(self, oid: int, version: int) -> None:
        """Record that the object was removed at this version (it is not here)."""
        with _translated(f"record removal of {oid:016x}"):
            self._bump_version(oid, version)

    def version(self, oid: int) -> int:
        with self.env.begin(db=self._objects) as txn:
            value = txn.get(_oid_key(oid))
        return _meta_value.unpack(value)[0] if value else 0

    def stat(self, oid: int) -> dict[str, Any]:
        with _translated(f"stat object {oid:016x}"):
            try:
                st = os.stat(self.object_path(oid))
            except FileNotFoundError:
                version = self.version(oid)
                if version:  # removed here: the tombstone's version tells when
                    return {"oid": oid, "version": version, "deleted": True}
                raise NoObject(f"object {oid:016x} is not on this node") from None
        return {"oid": oid, "version": self.version(oid), "size": st.st_size,
                "allocated": st.st_blocks * 512}

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
        """Drop every object (the cluster was formatted anew)."""
        with _translated("wipe objects"):
            for oid in list(self._fds):
                self._drop_fd(oid)
            shutil.rmtree(self.object_dir, ignore_errors=True)
            os.makedirs(self.object_dir, exist_ok=True)
            with self.env.begin(write=True) as txn:
                txn.drop(self._objects, delete=False)

    def sync(self) -> None:
        """Make every write so far durable: fsync dirty objects, sync LMDB."""
        self.finish_sync(self.begin_sync())

    def begin_sync_object(self, oid: int) -> list[int]:
        """Like begin_sync, for one object only (FUA): its fd, duplicated."""
        with _translated(f"sync object {oid:016x}"):
            fd = os.dup(self._fd(oid))
        self._dirty.discard(oid)
        return [fd]

    def begin_sync(self) -> list[int]:
        """Take the dirty objects as duplicated fds, for finish_sync in a worker thread.

        Duplicates keep the files open even if the fd cache closes them meanwhile.
        """
        fds = [os.dup(self._fds[oid]) for oid in self._dirty if oid in self._fds]
        self._dirty.clear()
        return fds

    def finish_sync(self, fds: list[int]) -> None:
        try:
            with _translated("sync store"):
                for fd in fds:
                    os.fdatasync(fd)
                if self._env is not None:
                    self._env.sync(True)
        finally:
            for fd in fds:
                os.close(fd)
