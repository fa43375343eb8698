"""nbdkit plugin: every VDI of a sheep cluster as an NBD export.

    nbdkit python /path/to/nbd_plugin/plugin.py sheep=127.0.0.1:7000[,HOST:PORT...]

Export ``NAME`` is VDI NAME, read-write; ``NAME@TAG`` is a snapshot, read-only.
``nbdinfo --list`` shows them all.

Attaching never locks. The VDI's cluster-wide write lock is taken at a client's
first write, trim or flush, and each NBD client is its own contender for it
(lock=client, the default): the client's process over a unix socket (nbdkit
tells its pid, so a multi-conn client's connections are one contender), each
connection over TCP (nbdkit 1.32 tells the plugin nothing else about a TCP
client, so writable TCP exports do not advertise multi-conn); a client nbdkit
cannot name (no pid, a vsock peer) is a contender per connection. lock=nbdkit makes
every client of this nbdkit one contender, with multi-conn: for one nbdkit per
VM. A writer whose lock moved to another (a live migration's destination, or
``dog vdi lock unlock``) gets EPERM for every later change, and nbdkit's log
says the lock moved.

Thin by design: each callback is one request to a gateway sheep over one
pipelined connection shared by all of nbdkit's threads (the parallel thread
model), with reads received straight into nbdkit's buffer. When the gateway
dies, the plugin connects to another member, opens its exports again and
retries what was in flight: the NBD client sees latency, not an error.

Flush semantics make multi-conn safe where it is advertised: a FLUSH makes every
write acknowledged before it durable on every replica, whichever connection of
the client sent it.

The plugin authenticates as one principal (keyring=FILE name=NAME, else as dog
does): a principal limited to some VDIs lists and opens only those, and a
read-only one serves every export read-only. A refusal (a wrong key, a VDI not in
the caps) will not heal by waiting, so it is never retried: the client gets EACCES
at once and nbdkit's log names the principal and the VDI.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import socket
import sys
import threading
import time
from typing import Any, NoReturn

import nbdkit  # provided by nbdkit's python plugin

API_VERSION = 2

_config: dict[str, str] = {}
_state: dict[str, Any] = {}

retry_total_s = 60.0  # the default retry budget: retry=SECONDS overrides it
retry_pause_s = 0.2  # between two attempts of an open, or two passes over the sheep
lock_scopes = ("client", "nbdkit")  # lock=: who contends for a VDI's write lock


class Peer:
    """The NBD client of the calling nbdkit thread, as nbdkit itself knows it.

    nbdkit 1.32's python plugin has no binding for nbdkit_peer_name and
    nbdkit_peer_pid, but nbdkit exports both C functions to its plugins: they are
    called through ctypes on the connection's own thread (in open)."""

    def __init__(self) -> None:
        program = ctypes.CDLL(None)
        self._name = program.nbdkit_peer_name
        self._name.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
        self._name.restype = ctypes.c_int
        self._pid = program.nbdkit_peer_pid
        self._pid.argtypes = []
        self._pid.restype = ctypes.c_int64

    def describe(self) -> tuple[str, str]:
        """(address, contender key): a unix socket's client is its process, a TCP
        client its connection (address and port)."""
        buffer = ctypes.create_string_buffer(128)
        length = ctypes.c_uint32(len(buffer))
        if self._name(buffer, ctypes.byref(length)) != 0:
            return "unknown client", ""
        raw = buffer.raw[:length.value]
        family = int.from_bytes(raw[:2], sys.byteorder)
        if family == socket.AF_UNIX:
            pid = self._pid()
            path = raw[2:].split(b"\0", 1)[0].decode(errors="replace") or "a unix socket"
            if pid > 0:
                return f"pid {pid} on {path}", f"pid {pid}"
            return f"unix socket {path}", ""
        port = int.from_bytes(raw[2:4], "big")
        if family == socket.AF_INET:
            address = f"{socket.inet_ntop(socket.AF_INET, raw[4:8])}:{port}"
        elif family == socket.AF_INET6:
            address = f"[{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{port}"
        else:
            return f"address family {family}", ""
        return address, address


_connections = itertools.count(1)


def _client() -> tuple[str, str]:
    """(who the NBD client is, its contender key for the write lock: "" is the whole
    nbdkit, with lock=nbdkit). A client nbdkit cannot name (no peer pid in a
    container, a vsock peer, an nbdkit without the functions) is a contender of its
    own for each connection: sharing one key would let two unrelated clients write
    under one lock, unfenced."""
    try:
        peer = _state.get("peer") or _state.setdefault("peer", Peer())
        described, key = peer.describe()
    except (OSError, AttributeError, ValueError):  # no such functions, or a bad address
        described, key = "unknown client", ""
    if _config.get("lock") == "nbdkit":
        return described, ""
    if not key:
        key = f"connection {next(_connections)}"
    return described, key


def _import_client() -> Any:
    # nbdkit runs this file without __file__; its code object still knows the path.
    script = globals().get("__file__") or _import_client.__code__.co_filename
    root = _config.get("root") or os.path.dirname(os.path.dirname(os.path.abspath(script)))
    # nbdkit embeds the system's Python: the project's virtualenv (VIRTUAL_ENV, else
    # ROOT/.venv), when it has one for this Python, comes first, so the plugin runs
    # the same libraries as the sheep (cryptography's AES-GCM there costs a few
    # microseconds less per frame than an older system package's).
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for venv in (os.environ.get("VIRTUAL_ENV"), os.path.join(root, ".venv")):
        site = os.path.join(venv or "", "lib", version, "site-packages")
        if venv and os.path.isdir(site):
            if site not in sys.path:
                sys.path.insert(0, site)
            break
    if root not in sys.path:
        sys.path.insert(0, root)
    from sheep import auth, client, errors, proto

    return auth, client, errors, proto


def config(key: str, value: str) -> None:
    known = ("sheep", "root", "owner", "retry", "keyring", "name", "lock")
    if key not in known:
        raise RuntimeError(f"unknown parameter {key!r} (known: {', '.join(known)})")
    if key == "lock" and value not in lock_scopes:
        raise RuntimeError(f"lock={value!r}: who contends for a VDI's write lock is each"
                           f" NBD client (lock=client) or this whole nbdkit (lock=nbdkit)")
    if key == "retry":
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 86400:
            raise RuntimeError(f"retry={value!r}: the retry budget is a number of seconds,"
                               " more than 0 and at most 86400")
    _config[key] = value


def _fail_to_start(message: str) -> NoReturn:
    """One line on stderr and exit: a configuration that cannot work (no keyring, a
    malformed one, no such name in it) must stop nbdkit before it serves, and an
    exception here would be printed by nbdkit with a traceback around its one line.
    Nothing is bound or forked yet (nbdkit does that after config_complete)."""
    sys.stderr.write(f"nbdkit: error: sheepdog plugin: {message}\n")
    sys.stderr.flush()
    os._exit(1)


def config_complete() -> None:
    spec = _config.get("sheep", "127.0.0.1:7000")
    addresses = []
    for item in spec.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise RuntimeError(f"sheep={item!r}: use HOST:PORT[,HOST:PORT...]")
        addresses.append((host, int(port)))
    auth, _, errors, _ = _import_client()
    from sheep.allocator import keep_large_blocks_in_the_heap

    keep_large_blocks_in_the_heap()  # nbdkit's process: a read's buffers, not new mappings
    try:  # keyring=FILE name=NAME, else DOG_KEYRING, DOG_NAME and the defaults
        credentials = auth.resolve_credentials(_config.get("keyring"), _config.get("name"))
    except errors.SheepError as error:
        _fail_to_start(error.message)
    _state["gateways"] = Gateways(addresses, credentials,
                                  float(_config.get("retry", retry_total_s)))


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


class Gateways:
    """The current gateway connection, the exports open on it, and failover."""

    def __init__(self, addresses: list[tuple[str, int]], credentials: Any,
                 retry_s: float = retry_total_s) -> None:
        self.auth, self.client, self.errors, self.proto = _import_client()
        self.credentials = credentials
        self.addresses = list(addresses)
        self.retry_s = retry_s
        self.lock = threading.Lock()
        self.connection: Any = None
        self.generation = 0  # bumped on every reconnect
        # Open exports, shared by the NBD connections of one contender (the client key:
        # "" for read-only exports, which never lock, and for lock=nbdkit).
        self.exports: dict[tuple[str, str | None, bool, str], dict[str, Any]] = {}
        self.owner = _config.get("owner")  # else: this nbdkit, named at each open
        # What another member (or this one, a moment later) may serve: a dead or
        # fenced gateway, one still joining or shutting down.
        self.retryable = (self.errors.NetworkError, self.errors.ShuttingDown,
                          self.errors.Unavailable, self.errors.Timeout)
        # What no other member will take either (they share the principals): failing
        # at once says why, where retrying would say "no sheep served" a minute later.
        self.refused = (self.errors.AuthFailed, self.errors.PermissionDenied)
        # The ops that take a VDI's lock (the sheep takes it at the first of them).
        self.changes = {self.proto.Op.VDI_WRITE, self.proto.Op.VDI_DISCARD,
                        self.proto.Op.FLUSH}

    def deadline(self) -> float:
        return time.monotonic() + self.retry_s

    def _gave_up(self, last: Exception | None) -> Exception:
        return self.errors.Unavailable(
            f"no sheep served within {self.retry_s:g} s (the plugin's retry budget, "
            f"retry=SECONDS); the last reason: {last or 'no sheep reachable'}")

    # --- connections ---------------------------------------------------------------

    def current(self, deadline: float | None = None) -> tuple[Any, int]:
        connection, generation = self.connection, self.generation
        if connection is not None and not connection.closed:  # the hot path: no lock
            return connection, generation
        with self.lock:
            if self.connection is None or self.connection.closed:
                self._connect(deadline or self.deadline())
            return self.connection, self.generation

    def _connect(self, deadline: float) -> None:
        """Connect to a member that serves, and open every export on it, trying each
        in turn until deadline. A member that refuses as unavailable (fenced, joining)
        is passed over like a dead one."""
        last: Exception | None = None
        if self.connection is not None:
            # The gateway that just failed is tried last: a host cut off silently
            # would cost a connect timeout first.
            failed = (self.connection.host, self.connection.port)
            if failed in self.addresses:
                self.addresses.remove(failed)
                self.addresses.append(failed)
        while True:
            for host, port in list(self.addresses):
                connection = None
                try:
                    connection = self.client.BlockingConnection(host, port, self.credentials)
                    nodes = connection.json(self.proto.Op.NODE_LIST)
                except self.errors.SheepError as error:
                    last = error
                    if connection is not None:
                        connection.close()
                    if isinstance(error, self.refused):
                        raise
                    continue
                self._learn(nodes)
                try:
                    # Published only once every export is open on it: threads take the
                    # connection without the lock, and must never send an old handle on it.
                    self._reopen(connection, deadline)
                except self.retryable as error:
                    last = error  # this one cannot serve now: the next one may
                    connection.close()
                    continue
                except self.errors.SheepError:
                    connection.close()
                    raise
                self.connection = connection
                self.generation += 1
                return
            if time.monotonic() >= deadline:
                raise self._gave_up(last)
            time.sleep(retry_pause_s)

    def read_only(self) -> bool:
        """Whether the principal may only read (caps 'ro vdi=...'), as the sheep told
        this connection: then every export is served read-only."""
        connection, _ = self.current()
        try:
            return bool(self.auth.Caps.parse(connection.caps).read_only)
        except ValueError:
            return False  # a sheep that did not say: the sheep still checks every op

    def _learn(self, nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            if node.get("status") == "ok":
                address = (node["address"], int(node["port"]))
                if address not in self.addresses:
                    self.addresses.append(address)

    def _open_on(self, connection: Any, name: str, tag: str | None, writable: bool,
                 client: str, who: str, resume: list[str] | None = None) -> Any:
        """Open never locks: the sheep takes the VDI's lock at the first change, for
        the contender the client key names within this connection. ``resume``: the
        contenders this export was on other sheep when it changed the VDI."""
        owner = self.owner or f"nbdkit pid {os.getpid()} on {socket.gethostname()}"
        return connection.json(self.proto.Op.VDI_OPEN, {
            "name": name, "snapshot": tag, "writable": writable,
            "owner": f"{owner}, NBD client {who}"[:256], "client": client or None,
            "resume": resume})

    def _reopen(self, connection: Any, deadline: float) -> None:
        """Open every export again on a new gateway. An export that changed the VDI
        names the contenders it did so as (``contenders``): the sheep then takes the lock
        for it only once that contender's lock is gone, never by a handoff, and fences
        it if the lock went to another writer meanwhile (it would otherwise take the
        lock back from a new holder as a fresh contender, and overwrite its data)."""
        for (name, tag, writable, client), export in self.exports.items():
            export["info"] = self._open_on(connection, name, tag, writable, client,
                                           export["who"], export.get("contenders"))

    # --- exports -----------------------------------------------------------------------

    def acquire(self, name: str, tag: str | None, writable: bool, client: str = "",
                who: str = "") -> dict[str, Any]:
        """Open an export (or share one its contender has open already): on the current
        gateway or, while it cannot serve, on another. The lock is not held between
        attempts, so other exports' I/O goes on meanwhile."""
        key = (name, tag, writable, client if writable else "")
        deadline = self.deadline()
        while True:
            with self.lock:
                export = self.exports.get(key)
                if export is not None:
                    export["users"] += 1
                    return export
                if self.connection is None or self.connection.closed:
                    self._connect(deadline)
                connection = self.connection
                try:
                    info = self._open_on(connection, name, tag, writable, key[3], who)
                except self.retryable as error:
                    last: Exception = error
                    if not isinstance(error, self.errors.Timeout) and not connection.closed:
                        # A gateway that cannot serve (dead, fenced, stopping): everyone
                        # moves on with this open (the failed gateway is tried last).
                        connection.close()
                else:
                    export = self.exports[key] = {"info": info, "users": 1, "key": key,
                                                  "who": who}
                    return export
            if time.monotonic() >= deadline:
                raise self._gave_up(last)
            time.sleep(retry_pause_s)

    def json(self, op: int, body: Any = None) -> Any:
        """A request that names no export, with failover and retries like call's."""
        deadline = self.deadline()
        while True:
            connection, generation = self.current(deadline)
            try:
                return connection.json(op, body)
            except self.retryable as error:
                if time.monotonic() > deadline:
                    raise self._gave_up(error) from error
                with self.lock:
                    if self.generation == generation and self.connection is not None:
                        self.connection.close()
                time.sleep(retry_pause_s)

    def release(self, export: dict[str, Any]) -> None:
        key = export["key"]
        with self.lock:
            export = self.exports.get(key)
            if export is None:
                return
            export["users"] -= 1
            if export["users"] > 0:
                return
            del self.exports[key]
            connection = self.connection
        if connection is not None and not connection.closed:
            try:
                connection.call(self.proto.Header(opcode=self.proto.Op.VDI_CLOSE,
                                                  arg0=export["info"]["handle"]))
            except self.errors.SheepError:
                pass

    def call(self, export: dict[str, Any], op: int, offset: int = 0, count: int = 0,
             payload: Any = b"", into: Any = None, flags: int = 0) -> Any:
        """One request on the export's handle; on a gateway that is dead or cannot
        serve, fail over and retry, for up to the retry budget."""
        deadline = None
        while True:
            connection, generation = self.current(deadline)
            info = export["info"]
            header = self.proto.Header(opcode=op, arg0=info["handle"], offset=offset,
                                       count=count, flags=flags)
            if op in self.changes and info.get("contender"):
                # Before it is sent: its answer may be lost, its lock taken all the same.
                seen = export.setdefault("contenders", [])
                if info["contender"] not in seen:
                    seen.append(info["contender"])
                    del seen[:-8]
            try:
                result = connection.call(header, payload, into=into)
            except self.retryable as error:
                if deadline is None:
                    deadline = self.deadline()
                elif time.monotonic() > deadline:
                    raise self._gave_up(error) from error
                with self.lock:
                    if self.generation == generation and self.connection is not None:
                        self.connection.close()
                time.sleep(0.05)
                continue
            return result


def _gateways() -> Gateways:
    gateways = _state.get("gateways")
    assert isinstance(gateways, Gateways), "config_complete has run"
    return gateways


def _raise(error: Exception, code: int = errno.EIO) -> None:
    nbdkit.set_error(code)
    raise RuntimeError(str(error)) from error


def _errno_for(gateways: Gateways, error: Exception) -> int:
    errors = gateways.errors
    table = [(errors.PermissionDenied, errno.EACCES), (errors.AuthFailed, errno.EACCES),
             (errors.NoSpace, errno.ENOSPC), (errors.ReadOnly, errno.EROFS),
             (errors.VdiLocked, errno.EPERM), (errors.InvalidParameters, errno.EINVAL),
             (errors.NoVdi, errno.ENOENT), (errors.NoTag, errno.ENOENT)]
    for cls, code in table:
        if isinstance(error, cls):
            return code
    return errno.EIO


def _guard(function: Any) -> Any:
    """Report our errors to nbdkit with an errno and one clear line."""

    def wrapper(*args: Any) -> Any:
        gateways = _gateways()
        try:
            return function(*args)
        except gateways.errors.SheepError as error:
            code = _errno_for(gateways, error)
            if isinstance(error, gateways.refused):  # the reason is all the log needs
                nbdkit.set_error(code)
                raise RuntimeError(f"{function.__name__} refused to principal"
                                   f" {gateways.credentials.name}: {error}") from None
            _raise(error, code)

    wrapper.__name__ = function.__name__
    return wrapper


@_guard
def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    gateways = _gateways()
    items = gateways.json(gateways.proto.Op.VDI_LIST, {"usage": False})
    exports = []
    for item in sorted(items, key=lambda i: (i["name"], i["snapshot"], i["id"])):
        if item["snapshot"]:
            tag = item["tag"] or str(item["id"])
            exports.append((f"{item['name']}@{tag}", f"snapshot of {item['name']}, read-only"))
        else:
            exports.append((item["name"], f"VDI {item['name']}, {item['size']} bytes"))
    return exports


class Handle:
    def __init__(self, name: str, tag: str | None, writable: bool,
                 export: dict[str, Any], shared: bool) -> None:
        self.name = name
        self.tag = tag
        self.writable = writable
        self.export = export
        self.shared = shared  # its client's other connections share its lock


@_guard
def open(readonly: bool) -> Handle:  # noqa: A001 - nbdkit's name
    name = nbdkit.export_name()
    if not name:
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError("no export name given: connect to nbd://HOST:PORT/VDI or VDI@TAG")
    base, _, tag = name.partition("@")
    gateways = _gateways()
    writable = not readonly and not tag and not gateways.read_only()
    who, client = _client()
    try:
        export = gateways.acquire(base, tag or None, writable, client, who)
    except gateways.errors.PermissionDenied as error:
        nbdkit.set_error(errno.EACCES)
        raise RuntimeError(f"export {name!r} refused to principal"
                           f" {gateways.credentials.name}: {error}") from None
    # A contender key names one connection over TCP: its client's other connections
    # would be other contenders, so multi-conn is not offered to a writer.
    shared = not client or client.startswith("pid ")
    return Handle(base, tag or None, writable, export, shared)


def close(h: Handle) -> None:
    _gateways().release(h.export)


def get_size(h: Handle) -> int:
    return int(h.export["info"]["size"])


def can_write(h: Handle) -> bool:
    return h.writable


def can_flush(h: Handle) -> bool:
    return True


def can_trim(h: Handle) -> bool:
    return h.writable


def can_zero(h: Handle) -> bool:
    return h.writable


def can_fast_zero(h: Handle) -> bool:
    return h.writable


def can_fua(h: Handle) -> int:
    return int(nbdkit.FUA_NATIVE)


def can_multi_conn(h: Handle) -> bool:
    return h.shared or not h.writable


def can_extents(h: Handle) -> bool:
    return True


def can_cache(h: Handle) -> int:
    return int(nbdkit.CACHE_NONE)


@_guard
def pread(h: Handle, buf: Any, offset: int, flags: int) -> None:
    gateways = _gateways()
    view = memoryview(buf)
    gateways.call(h.export, gateways.proto.Op.VDI_READ, offset, len(view), into=view)


@_guard
def pwrite(h: Handle, buf: Any, offset: int, flags: int) -> None:
    gateways = _gateways()
    fua = gateways.proto.FLAG_FUA if flags & nbdkit.FLAG_FUA else 0
    view = memoryview(buf)
    gateways.call(h.export, gateways.proto.Op.VDI_WRITE, offset, len(view), payload=view,
                  flags=fua)


@_guard
def flush(h: Handle, flags: int) -> None:
    gateways = _gateways()
    gateways.call(h.export, gateways.proto.Op.FLUSH)


@_guard
def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    gateways = _gateways()
    gateways.call(h.export, gateways.proto.Op.VDI_DISCARD, offset, count)
    if flags & nbdkit.FLAG_FUA:
        gateways.call(h.export, gateways.proto.Op.FLUSH)


zero_chunk_bytes = 4 << 20


@_guard
def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    """Zeroes: with MAY_TRIM a discard (fast: whole objects are unmapped, nothing is
    written); without it the client asked for allocated zeros, which are written."""
    if flags & nbdkit.FLAG_MAY_TRIM:
        trim(h, count, offset, flags)
        return
    if flags & nbdkit.FLAG_FAST_ZERO:
        nbdkit.set_error(errno.EOPNOTSUPP)  # writing zeros is not fast: let the client choose
        raise RuntimeError("allocated zeros are not fast; zero with trimming allowed instead")
    gateways = _gateways()
    zeros = bytes(min(count, zero_chunk_bytes))
    end = offset + count
    while offset < end:
        step = min(len(zeros), end - offset)
        gateways.call(h.export, gateways.proto.Op.VDI_WRITE, offset, step,
                      payload=memoryview(zeros)[:step])
        offset += step
    if flags & nbdkit.FLAG_FUA:
        gateways.call(h.export, gateways.proto.Op.FLUSH)


@_guard
def extents(h: Handle, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    gateways = _gateways()
    _, data = gateways.call(h.export, gateways.proto.Op.VDI_EXTENTS, offset, count)
    result = []
    hole = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    for start, length, allocated in gateways.proto.decode_json(data):
        result.append((int(start), int(length), 0 if allocated else hole))
    return result
