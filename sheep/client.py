"""The client library: asyncio connections to a sheep, and a blocking wrapper.

``Connection`` pipelines requests over one TCP connection: each request gets a
fresh request id and a future; a reader callback matches replies by id, so
replies may come back in any order. Sheep use it to talk to their peers, dog
and the NBD plugin use it to talk to a gateway sheep.

Failed replies raise the exception class of their result code (sheep/errors.py)
with the sheep's own message. A dead or unreachable sheep raises NetworkError.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from sheep import auth, constants, proto
from sheep.errors import InvalidParameters, NetworkError, SheepError, Timeout, error_for
from sheep.proto import Header, Op
from sheep.world import Network

# Who a connection authenticates as: credentials, a function giving them (called once
# the sheep answered), or None: auth.resolve_credentials().
CredentialsSource = auth.Credentials | auth.Auto | Callable[[], auth.Credentials] | None


def _resolve(credentials: CredentialsSource) -> auth.Credentials:
    if credentials is None:
        return auth.resolve_credentials()
    if isinstance(credentials, auth.Credentials):
        return credentials
    if isinstance(credentials, auth.Auto):  # no hint here: found as dog finds keys
        return auth.resolve_credentials(credentials.keyring, credentials.name,
                                        credentials.prefer_node)
    return credentials()


class _ReplyProtocol(asyncio.BufferedProtocol):
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.decoder = proto.FrameDecoder()
        connection._decoder = self.decoder  # sealed once the handshake is done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self.decoder.buffer_updated(nbytes)
        except proto.ProtocolError:
            frames = []
        for header, payload in frames:  # opened by the decoder once it is sealed
            self.connection._deliver(header, payload)
        error = self.decoder.error
        if error is not None:
            self.connection._fail(NetworkError(f"bad reply from {self.connection.endpoint}: "
                                               f"{error.reason}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection._fail(NetworkError(f"connection to {self.connection.endpoint} lost"))


class Connection:
    """One pipelined connection to a sheep."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[tuple[Header, bytes]]] = {}
        self._ids = itertools.count(1)
        self._error: SheepError | None = None
        self._deadlines: dict[int, float] = {}
        self._opcodes: dict[int, int] = {}  # each pending request's, for its reply's check
        self._sweeper: asyncio.TimerHandle | None = None
        self.credentials: auth.Credentials | None = None  # who it authenticates as
        self.sealer: auth.Sealer | None = None  # once the handshake is done
        self._decoder: proto.FrameDecoder | None = None  # its protocol's
        self.principal = ""  # who the sheep took us for
        self.caps = ""

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def closed(self) -> bool:
        return self._transport is None or self._error is not None

    @classmethod
    async def open(cls, host: str, port: int, credentials: CredentialsSource = None,
                   timeout_ms: int = constants.peer_connect_timeout_ms,
                   network: Network | None = None) -> Connection:
        """Connect and authenticate. credentials: who to be, or a function giving it once
        the sheep answered (so an unreachable sheep is what is reported), or None for
        auth.resolve_credentials()."""
        connection = cls(host, port)
        try:
            transport = await (network or _tcp).connect(
                host, port, lambda: _ReplyProtocol(connection), timeout_ms / 1000)
        except OSError as error:  # TimeoutError included
            if isinstance(error, TimeoutError):
                reason = "timed out"
            elif isinstance(error, socket.gaierror):
                reason = f"cannot resolve {host!r}: {error.strerror}"
            elif error.errno:
                reason = os.strerror(error.errno)
            else:
                reason = str(error)
            raise NetworkError(f"cannot connect to sheep at {host}:{port}: {reason}") from error
        connection._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a simulated network has none
            detect_dead_peer(sock)
        try:
            if isinstance(credentials, auth.Auto):  # the key may come from the sheep's hint
                handshake = auth.ClientHandshake(auth.Credentials(credentials.name_to_try(), b""))
            else:
                handshake = auth.ClientHandshake(_resolve(credentials))
            _, data = await connection.call(Header(opcode=Op.AUTH_HELLO),
                                            proto.encode_json(handshake.hello()), timeout_ms)
            answer = proto.decode_json(data)
            if isinstance(credentials, auth.Auto):
                handshake.credentials = credentials.resolve(
                    handshake.credentials.name,
                    answer.get("keyring") if isinstance(answer, dict) else None)
            connection.credentials = handshake.credentials
            proof = handshake.answer(answer)
            _, data = await connection.call(Header(opcode=Op.AUTH_PROVE),
                                            proto.encode_json(proof), timeout_ms)
        except SheepError:
            connection.close()
            raise
        connection._welcome(handshake.sealer(), proto.decode_json(data))
        return connection

    def _welcome(self, sealer: auth.Sealer, welcome: Any) -> None:
        assert self._decoder is not None
        try:
            self._decoder.seal(sealer)
        except proto.ProtocolError as error:
            self.close()
            raise NetworkError(f"bad reply from {self.endpoint}: {error.reason}") from None
        self.sealer = sealer
        if isinstance(welcome, dict):
            self.principal = str(welcome.get("principal", ""))
            self.caps = str(welcome.get("caps", ""))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._fail(NetworkError(f"connection to {self.endpoint} closed"))

    def _deliver(self, header: Header, payload: bytes) -> None:
        """Hand a reply to its caller; a frame that cannot be the reply to the request
        it names fails the connection (nothing more on it can be trusted)."""
        opcode = self._opcodes.pop(header.request_id, None)
        if opcode is not None:
            problem = proto.reply_problem(header, opcode)
            if problem is not None:
                self._fail(NetworkError(f"bad reply from {self.endpoint}: {problem}"))
                if self._transport is not None:
                    self._transport.close()
                return
        self._deadlines.pop(header.request_id, None)
        future = self._pending.pop(header.request_id, None)
        if future is not None and not future.done():
            future.set_result((header, payload))

    def _fail(self, error: SheepError) -> None:
        if self._error is None:
            self._error = error
        self._opcodes.clear()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def send(self, header: Header, payload: bytes | bytearray | memoryview = b"",
             timeout_ms: int = constants.peer_timeout_ms) -> asyncio.Future[tuple[Header, bytes]]:
        """Send one request now; the future gets its reply, failed results included (see
        ``call``). No task: a gateway sends to every replica before awaiting any."""
        if self._error is not None:
            raise self._error
        assert self._transport is not None
        request_id = next(self._ids) & 0xFFFFFFFF
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[Header, bytes]] = loop.create_future()
        self._pending[request_id] = future
        self._opcodes[request_id] = header.opcode
        # One timer per connection checks the deadlines (asyncio.wait_for per request
        # costs a timer and callbacks on the hot path).
        self._deadlines[request_id] = loop.time() + timeout_ms / 1000
        if self._sweeper is None:
            self._sweeper = loop.call_later(_sweep_interval_s, self._sweep)
        if self.sealer is not None:
            self._transport.writelines(self.sealer.seal(header.opcode, header.pack_request(
                request_id, len(payload) + auth.TAG_BYTES), payload))
            return future
        packed = header.pack_request(request_id, len(payload))
        if payload:
            self._transport.writelines([packed, payload])
        else:
            self._transport.write(packed)
        return future

    async def call(self, header: Header, payload: bytes | bytearray | memoryview = b"",
                   timeout_ms: int = constants.peer_timeout_ms) -> tuple[Header, bytes]:
        """Send one request and wait for its reply; raise on a failed result."""
        reply, data = await self.send(header, payload, timeout_ms)
        return raise_failed(reply, data)

    def _sweep(self) -> None:
        """Fail the requests past their deadline; run again while any are pending."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for request_id in [rid for rid, deadline in self._deadlines.items() if deadline <= now]:
            del self._deadlines[request_id]
            self._opcodes.pop(request_id, None)
            future = self._pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_exception(Timeout(f"no reply from {self.endpoint} in time"))
        if self._deadlines and self._error is None:
            self._sweeper = loop.call_later(_sweep_interval_s, self._sweep)


_sweep_interval_s = 0.5
_tcp = Network()


def raise_failed(reply: Header, data: bytes) -> tuple[Header, bytes]:
    """The reply, or the exception of its failed result with the sheep's message."""
    if reply.result:
        raise error_for(reply.result, proto.error_message(data) or None)
    return reply, data


def detect_dead_peer(sock: socket.socket) -> None:
    """Make a silently vanished peer a failed connection within dead_peer_timeout_ms,
    instead of a wait for the request timeout (or forever, for an idle one)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    interval = constants.dead_peer_probe_interval_s
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT,
                    max(1, constants.dead_peer_timeout_ms // 1000 // interval - 1))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, constants.dead_peer_timeout_ms)


class Client:
    """What dog and the NBD plugin call: object and admin operations via one gateway."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, host: str = constants.address_default,
                      port: int = constants.port_default,
                      network: Network | None = None,
                      credentials: CredentialsSource = None) -> Client:
        return cls(await Connection.open(host, port, credentials, network=network))

    def close(self) -> None:
        self.connection.close()

    async def _json(self, op: Op, body: Any = None, **fields: int) -> Any:
        payload = b"" if body is None else proto.encode_json(body)
        _, data = await self.connection.call(Header(opcode=op, **fields), payload)
        return proto.decode_json(data) if data else None

    # --- objects -------------------------------------------------------------

    async def create_and_write(self, oid: int, data: bytes, offset: int = 0) -> None:
        await self.connection.call(
            Header(opcode=Op.CREATE_AND_WRITE_OBJ, oid=oid, offset=offset, count=len(data)), data)

    async def write(self, oid: int, data: bytes, offset: int = 0, fua: bool = False) -> None:
        flags = proto.FLAG_FUA if fua else 0
        await self.connection.call(
            Header(opcode=Op.WRITE_OBJ, oid=oid, offset=offset, count=len(data), flags=flags),
            data)

    async def read(self, oid: int, offset: int, count: int) -> bytes:
        _, data = await self.connection.call(
            Header(opcode=Op.READ_OBJ, oid=oid, offset=offset, count=count))
        return data

    async def remove(self, oid: int) -> None:
        await self.connection.call(Header(opcode=Op.REMOVE_OBJ, oid=oid))

    async def discard(self, oid: int, offset: int, count: int) -> None:
        await self.connection.call(
            Header(opcode=Op.DISCARD_OBJ, oid=oid, offset=offset, count=count))

    async def flush(self, handle: int = 0) -> None:
        """Make every acknowledged write durable; handle names the open VDI it is for
        (counted in its metrics), 0 for none."""
        await self.connection.call(Header(opcode=Op.FLUSH, arg0=handle))

    async def stat(self, oid: int) -> dict[str, Any]:
        """Where the object lives now: its replicas and each one's version."""
        result: dict[str, Any] = await self._json(Op.STAT_OBJ, oid=oid)
        return result

    # --- administration ----------------------------------------------------------

    async def ping(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._json(Op.PING)
        return result

    async def cluster_info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._json(Op.CLUSTER_INFO)
        return result

    async def format(self, copies: int, object_size: int, force: bool = False,
                     encrypt: bool = False) -> dict[str, Any]:
        """Format the cluster; the result's "admin" is the first admin principal (name,
        key, caps), for a keyring."""
        result: dict[str, Any] = await self._json(
            Op.FORMAT, {"copies": copies, "object_size": object_size, "force": force,
                        "encrypt": encrypt})
        return result

    async def auth_add(self, name: str, caps: str) -> dict[str, Any]:
        """A new principal: its name, key (base64) and caps."""
        result: dict[str, Any] = await self._json(Op.AUTH_ADD, {"name": name, "caps": caps})
        return result

    async def auth_rm(self, name: str) -> None:
        await self._json(Op.AUTH_RM, {"name": name})

    async def auth_rotate(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json(Op.AUTH_ROTATE, {"name": name})
        return result

    async def auth_get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json(Op.AUTH_GET, {"name": name})
        return result

    async def auth_list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._json(Op.AUTH_LIST)
        return result

    async def force_recover(self, nodes: list[str] | None = None) -> dict[str, Any]:
        """Give up on nodes that are not members (all of them, or those named): after a
        shutdown the cluster goes on without the nodes of its last epoch still missing,
        and objects whose newest copy may be on one of them stop waiting for it."""
        result: dict[str, Any] = await self._json(
            Op.FORCE_RECOVER, {} if nodes is None else {"nodes": nodes})
        return result

    async def shutdown(self) -> None:
        await self.connection.call(Header(opcode=Op.SHUTDOWN))

    async def set_recovery(self, max_rate: int) -> dict[str, Any]:
        """Limit every sheep's recovery to max_rate bytes/s (0: no limit)."""
        result: dict[str, Any] = await self._json(Op.SET_RECOVERY, {"max_rate": max_rate})
        return result

    async def reweight(self, node_id: str, weight: int | None) -> dict[str, Any]:
        """Set a member's weight in bytes (None: back to its capacity); 0 drains it (its
        copies move to the others). Returns node_id, weight and the weight before."""
        result: dict[str, Any] = await self._json(Op.REWEIGHT,
                                                  {"node_id": node_id, "weight": weight})
        return result

    async def check_objects(self, oids: list[int], scrub: bool = False) -> list[dict[str, Any]]:
        """Bring each object back to N good copies; one result per object. With scrub,
        every copy verifies all its blocks first, and copies whose contents differ
        from the newest are replaced too."""
        result: dict[str, Any] = await self._json(Op.CHECK_OBJS, {"oids": oids, "scrub": scrub})
        return list(result["objects"])

    async def set_scrub(self, max_rate: int | None = None,
                        interval: int | None = None) -> dict[str, Any]:
        """The background scrub: bytes/s per node (0: off) and seconds between passes."""
        body = {key: value for key, value in (("max_rate", max_rate), ("interval", interval))
                if value is not None}
        result: dict[str, Any] = await self._json(Op.SET_SCRUB, body)
        return result

    async def node_info(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._json(Op.NODE_INFO)
        return result

    async def node_list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._json(Op.NODE_LIST)
        return result

    async def kill_node(self) -> None:
        """Make the connected sheep leave and exit."""
        await self.connection.call(Header(opcode=Op.KILL_NODE))

    async def list_objects(self) -> list[int]:
        """The oids stored on the connected sheep itself."""
        result: list[int] = await self._json(Op.LIST_PEER)
        return result


    # --- VDIs: management ------------------------------------------------------------

    async def _vdi(self, op: Op, **body: Any) -> Any:
        return await self._json(op, body)

    async def vdi_create(self, name: str, size: int, copies: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._vdi(Op.VDI_CREATE, name=name, size=size, copies=copies)
        return result

    async def vdi_delete(self, name: str, snapshot: str | int | None = None,
                         force: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = await self._vdi(
            Op.VDI_DELETE, name=name, snapshot=snapshot, force=force)
        return result

    async def vdi_snapshot(self, name: str, tag: str = "") -> dict[str, Any]:
        result: dict[str, Any] = await self._vdi(Op.VDI_SNAPSHOT, name=name, tag=tag)
        return result

    async def vdi_clone(self, source: str, snapshot: str | int, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._vdi(
            Op.VDI_CLONE, source=source, snapshot=snapshot, name=name)
        return result

    async def vdi_rollback(self, name: str, snapshot: str | int,
                           force: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = await self._vdi(
            Op.VDI_ROLLBACK, name=name, snapshot=snapshot, force=force)
        return result

    async def vdi_resize(self, name: str, size: int, allow_shrink: bool = False) -> dict[str, Any]:
        """Grow NAME to SIZE; with allow_shrink, also shrink it (what lies past SIZE is
        freed; snapshots keep theirs). A shrink answers "freed_objects" too."""
        result: dict[str, Any] = await self._vdi(Op.VDI_RESIZE, name=name, size=size,
                                                 allow_shrink=allow_shrink or None)
        return result

    async def vdi_rename(self, name: str, new_name: str) -> dict[str, Any]:
        """Rename a VDI (not while it is being written); its snapshots go with it."""
        result: dict[str, Any] = await self._vdi(Op.VDI_RENAME, name=name, new_name=new_name)
        return result

    async def vdi_info(self, name: str) -> dict[str, Any]:
        """One VDI (in the trash too): size, copies, lock, QoS, trash, parent, snapshots
        and space (as dog vdi du counts it)."""
        result: dict[str, Any] = await self._vdi(Op.VDI_INFO, name=name)
        return result

    async def vdi_list(self, names: list[str] | None = None,
                       usage: bool = True) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._vdi(Op.VDI_LIST, names=names, usage=usage)
        return result

    async def vdi_setattr(self, name: str, key: str, value: str | None,
                          exclusive: bool = False) -> None:
        await self._vdi(Op.VDI_SETATTR, name=name, key=key, value=value, exclusive=exclusive)

    async def vdi_getattr(self, name: str, key: str | None = None) -> Any:
        return await self._vdi(Op.VDI_GETATTR, name=name, key=key)

    async def vdi_object(self, name: str, index: int,
                         snapshot: str | int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._vdi(
            Op.VDI_OBJECT, name=name, index=index, snapshot=snapshot)
        return result

    async def vdi_unlock(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._vdi(Op.VDI_UNLOCK, name=name)
        return result

    async def vdi_qos(self, name: str, iops: int | None = None, bps: int | None = None,
                      burst: float | None = None, clear: bool = False) -> dict[str, Any]:
        """Set (any of iops, bps, burst) or clear a VDI's I/O limits; with none, show them."""
        result: dict[str, Any] = await self._vdi(Op.VDI_QOS, name=name, iops=iops, bps=bps,
                                                 burst=burst, clear=clear or None)
        return result

    # --- VDIs: I/O on an open handle ------------------------------------------------------

    async def vdi_open(self, name: str, snapshot: str | int | None = None,
                       writable: bool = False, owner: str = "",
                       client: str | None = None) -> dict[str, Any]:
        """Open a VDI (or a snapshot, read-only). A writable handle takes the VDI's lock
        at its first change, for this connection, or for the client named: handles
        naming different clients contend for the lock like different connections."""
        result: dict[str, Any] = await self._json(
            Op.VDI_OPEN, {"name": name, "snapshot": snapshot, "writable": writable,
                          "owner": owner, "client": client})
        return result

    async def vdi_attachments(self) -> list[dict[str, Any]]:
        """The VDIs open on this sheep (the one connected to), read-only or not."""
        result: list[dict[str, Any]] = await self._json(Op.VDI_ATTACHMENTS, {})
        return result

    async def vdi_diff(self, name: str, snapshot: str | int | None, since: str | int | None,
                       offset: int, length: int) -> dict[str, Any]:
        """What changed in [offset, offset + length) of NAME@SNAPSHOT (None: the VDI
        itself, idle) since snapshot SINCE (None: everything it holds): {"size",
        "object_size", "ranges": [[offset, length, "data" | "zero"], ...]}."""
        result: dict[str, Any] = await self._vdi(Op.VDI_DIFF, name=name, snapshot=snapshot,
                                                 **{"from": since}, offset=offset, length=length)
        return result

    async def vdi_trash(self, name: str, expires_in: float | None = None) -> dict[str, Any]:
        """Move NAME into the trash: hidden, its name and objects kept; purgeable once
        expires_in seconds passed (None: only by hand)."""
        result: dict[str, Any] = await self._vdi(Op.VDI_TRASH, name=name, action="mv",
                                                 expires_in=expires_in)
        return result

    async def vdi_trash_restore(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._vdi(Op.VDI_TRASH, name=name, action="restore")
        return result

    async def vdi_trash_list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._vdi(Op.VDI_LIST, usage=False, trash=True)
        return result

    async def vdi_purge(self, name: str, expires: float | None = None) -> dict[str, Any]:
        """Delete NAME from the trash, with its snapshots (with expires: only if it
        is still in the trash with that expiry)."""
        body: dict[str, Any] = {"name": name, "purge": True}
        if expires is not None:
            body["expires"] = expires
        result: dict[str, Any] = await self._json(Op.VDI_DELETE, body)
        return result

    async def vdi_alter_copy(self, name: str, copies: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._vdi(Op.VDI_ALTER_COPY, name=name, copies=copies)
        return result

    async def alter_copy(self, copies: int) -> dict[str, Any]:
        """The cluster's default copies (and of every VDI without its own)."""
        result: dict[str, Any] = await self._json(Op.ALTER_COPY, {"copies": copies})
        return result

    async def vdi_du(self, name: str | None = None) -> list[dict[str, Any]]:
        """Space used by NAME's images (or every VDI's), and what each holds alone."""
        result: list[dict[str, Any]] = await self._vdi(Op.VDI_DU, name=name)
        return result

    async def vdi_close(self, handle: int) -> None:
        await self.connection.call(Header(opcode=Op.VDI_CLOSE, arg0=handle))

    async def vdi_read(self, handle: int, offset: int, count: int) -> bytes:
        _, data = await self.connection.call(
            Header(opcode=Op.VDI_READ, arg0=handle, offset=offset, count=count))
        return data

    async def vdi_write(self, handle: int, offset: int, data: bytes | memoryview,
                        fua: bool = False) -> None:
        flags = proto.FLAG_FUA if fua else 0
        await self.connection.call(
            Header(opcode=Op.VDI_WRITE, arg0=handle, offset=offset, count=len(data),
                   flags=flags), data)

    async def vdi_discard(self, handle: int, offset: int, count: int) -> None:
        await self.connection.call(
            Header(opcode=Op.VDI_DISCARD, arg0=handle, offset=offset, count=count))

    async def vdi_extents(self, handle: int, offset: int, count: int) -> list[list[Any]]:
        result: list[list[Any]] = await self._json(
            Op.VDI_EXTENTS, arg0=handle, offset=offset, count=count)
        return result


class SyncClient:
    """A blocking wrapper: the same calls, each run to completion on a private loop."""

    def __init__(self, host: str = constants.address_default,
                 port: int = constants.port_default,
                 credentials: CredentialsSource = None) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._client = self._loop.run_until_complete(
                Client.connect(host, port, credentials=credentials))
        except BaseException:
            self._loop.close()
            raise

    @property
    def endpoint(self) -> tuple[str, int]:
        return self._client.connection.host, self._client.connection.port

    @property
    def credentials(self) -> auth.Credentials | None:
        return self._client.connection.credentials

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._client.close()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._loop.run_until_complete(method(*args, **kwargs))

        return call


class _SendStalled(Exception):
    """A frame begun could not be finished by its deadline."""


class _Waiter:
    """One blocking call's reply. ``done`` is a lock taken at creation and released,
    under the connection's pending lock, when the reply is in or the connection failed
    (``finished``): the cheapest hand-over between threads (threading.Event adds a
    Condition and a list of waiters)."""

    __slots__ = ("done", "finished", "opcode", "into", "header", "data", "error")

    def __init__(self, opcode: int, into: memoryview | None) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.finished = False
        self.opcode = opcode  # its request's: the reply must carry it
        self.into = into
        self.header: Header | None = None
        self.data: bytes = b""
        self.error: SheepError | None = None

    def finish(self) -> None:
        """Under the connection's pending lock."""
        if not self.finished:
            self.finished = True
            self.done.release()


class BlockingConnection:
    """One TCP connection shared by many threads (the NBD plugin's).

    Requests are pipelined: any thread sends (under a lock, a frame's parts in one
    sendmsg), and one reader thread takes the replies, matching them by request id.
    The reader receives through a FrameDecoder, as the sheep do: replies queued
    behind each other come in one system call, and each is checked against its tag
    before its caller is told it is in (a read's data is then copied into the buffer
    its caller passed, nbdkit's own; a large one is received straight into it, and a
    wrong tag then fails the call: the buffer's bytes are not the reply's).
    A caller gets its buffer back only once nothing more can be written into it: a
    reply landing there or being copied when the caller's deadline passes is waited
    for.

    (Callers reading their own replies, leader and followers, so that a reply at
    queue depth 1 wakes one thread instead of two, measured level with this through
    nbdkit and fio, and was dropped: docs/design.md.)
    """

    def __init__(self, host: str, port: int, credentials: CredentialsSource = None,
                 timeout_ms: int = constants.peer_connect_timeout_ms) -> None:
        self.host = host
        self.port = port
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout_ms / 1000)
        except OSError as error:
            if isinstance(error, TimeoutError):
                reason = "timed out"
            elif isinstance(error, socket.gaierror):
                reason = f"cannot resolve {host!r}: {error.strerror}"
            else:
                reason = os.strerror(error.errno) if error.errno else str(error)
            raise NetworkError(f"cannot connect to sheep at {host}:{port}: {reason}") from error
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.principal = ""  # who the sheep took us for, and its caps' text
        self.caps = ""
        # Replies, framed and opened: small ones staged and taken several per recv.
        self._decoder = proto.FrameDecoder(constants.handshake_payload_max_bytes, self._place)
        self._filling: _Waiter | None = None  # whose buffer a large reply is landing in
        self._filling_id = 0  # and the request id of that reply
        try:
            self.sealer = self._authenticate(_resolve(credentials))
        except BaseException:
            self._sock.close()
            raise
        self._sock.settimeout(None)
        detect_dead_peer(self._sock)
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Waiter] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._error: SheepError | None = None
        self._reader = threading.Thread(target=self._read_replies, daemon=True,
                                        name=f"sheep-reply-{host}:{port}")
        self._reader.start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def closed(self) -> bool:
        return self._error is not None

    def _authenticate(self, credentials: auth.Credentials) -> auth.Sealer:
        """The handshake, in this thread, before the reader starts (the socket still has
        its connect timeout)."""
        handshake = auth.ClientHandshake(credentials)
        try:
            answer = self._exchange(Op.AUTH_HELLO, handshake.hello())
            welcome = self._exchange(Op.AUTH_PROVE, handshake.answer(answer))
            sealer = handshake.sealer()
            self._decoder.allow(constants.payload_max_bytes + auth.TAG_BYTES)
            self._decoder.seal(sealer)
        except (OSError, ConnectionError) as error:
            raise NetworkError(f"authenticating to {self.endpoint}: {error}") from error
        except proto.ProtocolError as error:
            raise NetworkError(f"bad handshake reply from {self.endpoint}: {error.reason}"
                               ) from None
        if isinstance(welcome, dict):
            self.principal = str(welcome.get("principal", ""))
            self.caps = str(welcome.get("caps", ""))
        return sealer

    def _exchange(self, op: Op, body: Any) -> Any:
        self._sock.sendall(proto.encode(Header(opcode=op), proto.encode_json(body)))
        frames: list[tuple[Header, bytes]] = []
        while not frames:
            frames = self._receive()
        if len(frames) > 1:  # the sheep waits for our next step
            raise proto.ProtocolError("more than one frame in answer")
        header, data = frames[0]
        problem = proto.reply_problem(header, op)
        if problem is not None:
            raise proto.ProtocolError(problem, header)
        if header.result:
            raise error_for(header.result, proto.error_message(data) or None)
        return proto.decode_json(data)

    def close(self) -> None:
        self._fail(NetworkError(f"connection to {self.endpoint} closed"))
        self._sock.close()

    def _fail(self, error: SheepError) -> None:
        """The connection is over: every call waiting gets the error, and the socket is
        shut down, which ends the reader. A reply landing in its caller's buffer is
        left to the reader: that caller may not have its buffer back while a receive
        can still write into it."""
        with self._pending_lock:
            if self._error is None:
                self._error = error
            pending, self._pending = self._pending, {}
            for waiter in pending.values():
                if waiter is not self._filling:
                    waiter.error = error
                    waiter.finish()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _lost(self, error: Exception) -> None:
        """Reading failed (the connection broke, a frame failed its tag, or a bug): the
        connection is over, for the call whose reply was landing in its buffer too (with
        the reason the connection was given up, if it was: that ended the receive)."""
        lost = self._error or NetworkError(f"connection to {self.endpoint} lost: {error}")
        with self._pending_lock:
            filling, self._filling = self._filling, None
            if filling is not None:
                filling.error = lost
                filling.finish()
        self._fail(lost)

    def _received(self) -> list[tuple[Header, bytes]]:
        """The frames that the next bytes received complete (often none, or several:
        replies queued behind each other come in one system call); those before a
        break in the stream too (the decoder's error says so)."""
        count = self._sock.recv_into(self._decoder.get_buffer())
        if count == 0:
            raise ConnectionError("closed by the sheep")
        return self._decoder.buffer_updated(count)

    def _receive(self) -> list[tuple[Header, bytes]]:
        """The handshake's: the frames received, or the break."""
        frames = self._received()
        if self._decoder.error is not None:
            raise self._decoder.error
        return frames

    def _take(self) -> None:
        """Receive what the socket has and hand the replies it completes to their
        callers; raise when the stream broke, after the replies before the break."""
        self._deliver(self._received())
        if self._decoder.error is not None:
            raise self._decoder.error

    def _place(self, header: Header, length: int) -> memoryview | None:
        """Where a large reply's data goes: straight into its caller's buffer (nbdkit's
        own), when it is the reply's length. The decoder then uses it: it is being
        filled until the frame is whole."""
        if header.result:
            return None
        with self._pending_lock:
            waiter = self._pending.get(header.request_id)
            if (waiter is None or waiter.into is None or len(waiter.into) != length
                    or proto.reply_problem(header, waiter.opcode) is not None):
                return None
            self._filling, self._filling_id = waiter, header.request_id
        return waiter.into

    def _deliver(self, frames: list[tuple[Header, bytes]]) -> None:
        for header, payload in frames:
            with self._pending_lock:
                waiter = self._pending.pop(header.request_id, None)
                if self._filling is not None and self._filling_id == header.request_id:
                    # Off the pending list only if the connection failed meanwhile.
                    waiter, self._filling = self._filling, None
            if waiter is None:  # timed out: its caller has gone
                continue
            problem = proto.reply_problem(header, waiter.opcode)
            if problem is not None:
                # Off the pending list: it fails here, the others with the connection.
                error = NetworkError(f"bad reply from {self.endpoint}: {problem}")
                with self._pending_lock:
                    waiter.error = error
                    waiter.finish()
                self._fail(error)
                raise proto.ProtocolError(problem, header)
            into = waiter.into
            try:
                if into is None or header.result:
                    waiter.data = bytes(payload)
                elif len(into) == len(payload):
                    if payload is not into:  # small: staged, or the frame's pieces
                        into[:] = payload
                else:  # never success with the caller's buffer left as it was
                    waiter.error = NetworkError(
                        f"a reply of {len(payload)} bytes from {self.endpoint} for a"
                        f" buffer of {len(into)}")
            except BaseException as error:
                # Off the pending list: nobody else would ever finish it.
                with self._pending_lock:
                    waiter.error = NetworkError(f"connection to {self.endpoint} lost: the"
                                                f" reply could not be handed over ({error!r})")
                    waiter.finish()
                raise
            waiter.header = header
            with self._pending_lock:
                waiter.finish()

    def _read_replies(self) -> None:
        try:
            while True:
                self._take()
        except Exception as error:  # noqa: BLE001 - whatever it is, nobody else reads
            self._lost(error)

    def _await(self, waiter: _Waiter, request_id: int, seconds: float,
               timeout_ms: int) -> None:
        """Until the reply is in, the connection failed or the deadline passed."""
        if waiter.done.acquire(timeout=seconds):
            return
        with self._pending_lock:
            if waiter.finished:
                return
            filling = self._filling is waiter
            if not filling and self._pending.get(request_id) is waiter:
                del self._pending[request_id]
                raise Timeout(f"no reply from {self.endpoint} within {timeout_ms} ms")
        if filling:
            # Its reply stalled mid-frame, landing in the caller's buffer: the
            # connection is given up, which ends the reader's receive, and with it the
            # landing (a sheep alive but stalled would otherwise hold the caller for good).
            self._fail(NetworkError(f"connection to {self.endpoint} abandoned: a reply"
                                    f" stalled mid-frame past {timeout_ms} ms"))
        # Its reply is being handed over (copied into the caller's buffer, or landing
        # there): the caller may not reuse the buffer until that ends, whole or with the
        # connection.
        waiter.done.acquire()

    def call(self, header: Header, payload: bytes | bytearray | memoryview = b"",
             into: memoryview | None = None,
             timeout_ms: int = constants.peer_timeout_ms) -> tuple[Header, bytes]:
        """Send one request, wait for its reply; raise on a failed result. ``into``: a
        buffer the reply's data must fill exactly (a read's); a reply of another
        length fails the call. Sending waits no longer than the deadline either: a
        sheep that stops reading (or reads a trickle) fails the connection."""
        if not 0 <= timeout_ms <= threading.TIMEOUT_MAX * 1000:
            raise InvalidParameters(f"timeout of {timeout_ms} ms: from 0 to"
                                    f" {int(threading.TIMEOUT_MAX * 1000)}")
        if not isinstance(payload, bytes | bytearray):
            payload = memoryview(payload).cast("B")  # lengths count bytes, not items
        if into is not None and isinstance(into, memoryview) and into.itemsize != 1:
            into = into.cast("B")
        deadline = time.monotonic() + timeout_ms / 1000
        waiter = _Waiter(header.opcode, into)
        with self._pending_lock:
            if self._error is not None:  # checked with the insertion: _fail swaps the list
                raise self._error
            request_id = next(self._ids) & 0xFFFFFFFF
            while request_id in self._pending:  # wrapped around to one still waiting
                request_id = next(self._ids) & 0xFFFFFFFF
            self._pending[request_id] = waiter
        self._send(header, payload, request_id, waiter, deadline, timeout_ms)
        self._await(waiter, request_id, max(0.0, deadline - time.monotonic()), timeout_ms)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.header is not None
        if waiter.header.result:
            raise error_for(waiter.header.result, proto.error_message(waiter.data) or None)
        return waiter.header, waiter.data

    def _send(self, header: Header, payload: bytes | bytearray | memoryview, request_id: int,
              waiter: _Waiter, deadline: float, timeout_ms: int) -> None:
        """The request's frame, whole, by the deadline. Not begun by then (others' frames
        ahead of it): the call times out and nothing is sent. Begun and not finished:
        the stream cannot go on, the connection fails."""
        if not self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            with self._pending_lock:
                if self._pending.get(request_id) is waiter:
                    del self._pending[request_id]
            raise Timeout(f"could not send to {self.endpoint} within {timeout_ms} ms"
                          " (the requests ahead of it are not being taken)")
        try:
            parts = self.sealer.seal(header.opcode, header.pack_request(
                request_id, len(payload) + auth.TAG_BYTES), payload)
            views = [memoryview(part).cast("B") for part in parts]
            while views:
                try:
                    sent = self._sock.sendmsg(views, [], socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                while views and sent >= len(views[0]):
                    sent -= len(views.pop(0))
                if views:  # the socket's buffer is full: wait for room, by the deadline
                    views[0] = views[0][sent:]
                    remaining = deadline - time.monotonic()
                    room = select.poll()
                    room.register(self._sock, select.POLLOUT)
                    if remaining <= 0 or not room.poll(max(1, int(remaining * 1000))):
                        raise _SendStalled()
        except _SendStalled:
            self._fail(NetworkError(f"connection to {self.endpoint} abandoned: a request"
                                    f" could not be sent within {timeout_ms} ms (the sheep"
                                    " is not reading)"))
        except OSError as error:
            self._fail(NetworkError(f"connection to {self.endpoint} lost: {error}"))
        except Exception:
            # Not sent, or not whole, and the frame count may have moved on: the stream
            # cannot go on.
            self._fail(NetworkError(f"connection to {self.endpoint} abandoned: a request"
                                    " could not be sent"))
            raise
        finally:
            self._send_lock.release()

    def json(self, op: Op, body: Any = None, **fields: int) -> Any:
        payload = b"" if body is None else proto.encode_json(body)
        _, data = self.call(Header(opcode=op, **fields), payload)
        return proto.decode_json(data) if data else None
