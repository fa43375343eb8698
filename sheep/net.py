"""The sheep's server side of the protocol: the only socket code in the daemon.

Each connection decodes frames with the sans-IO decoder and runs every request
as its own task, so a slow request does not hold up the ones behind it and
replies go out in completion order.

Every connection's memory is bounded, whatever its peer does. Decoded requests
wait in a backlog and start only while the connection holds fewer than
requests_in_flight_max requests and request_bytes_in_flight_max bytes (payloads,
data being read, and replies the kernel has not taken yet). So a client that
pipelines big reads and never reads the replies stops being served once about
that many bytes wait for it, instead of making the sheep buffer every reply.
While the backlog is not empty the connection does not read, so the backlog
holds at most one socket read's worth of frames.

A frame that cannot be framed (bad magic, hostile length) gets an error reply
if its header was readable, then the connection closes; a well-framed bad
request (unknown opcode, bad range) gets an error reply and the connection
lives on. Other connections never notice either.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sheep import auth, constants, proto
from sheep.client import detect_dead_peer
from sheep.errors import BadRequest, Result, SheepError, error_for
from sheep.proto import Header
from sheep.world import REAL, Listener, World

log = logging.getLogger(__name__)

Reply = tuple[bytes | bytearray | memoryview, dict[str, int]]


class Session:
    """What one connection holds on the server (open VDIs and their locks).

    Handlers register closers; they run once when the connection ends, so a
    client that dies releases what it held.
    """

    def __init__(self, peer: Any = None, session_id: str = "") -> None:
        self.id = session_id
        self.peer = peer
        self.principal: auth.Principal | None = None  # set once its handshake succeeds
        self.values: dict[str, Any] = {}
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()  # its requests still being served

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        self._closers.append(closer)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.tasks:
            # A request still running holds what the session holds (a write under
            # its VDI lock): release nothing until it is done, or a new lock holder
            # could write first and be overwritten by it.
            await asyncio.wait(list(self.tasks))
        closers, self._closers = self._closers, []
        for closer in closers:
            try:
                await closer()
            except Exception:
                log.exception("releasing session %s", self.id)


Dispatch = Callable[[Header, bytes, Session], Awaitable[Reply]]


# Payload and read bytes in flight per connection, counting replies still in the
# transport's buffer. A single request larger than this (up to the largest
# object) still runs, alone.
request_bytes_in_flight_max = constants.request_bytes_in_flight_max

_data_reply_ops = frozenset(op for op, info in proto.OPS.items()
                            if info.reply is proto.Payload.DATA)


def _request_bytes(header: Header) -> int:
    """What serving a request holds in memory: its payload and the data it reads."""
    return header.length + (header.count if header.opcode in _data_reply_ops else 0)


def _on_this_host(peer: Any) -> bool:
    """Whether a connection comes over loopback (a client on the sheep's own host)."""
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        return ipaddress.ip_address(str(peer[0])).is_loopback
    except ValueError:
        return False


class _RequestProtocol(asyncio.BufferedProtocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        # Until the handshake is done, only its small frames are taken.
        self.decoder = proto.FrameDecoder(constants.handshake_payload_max_bytes)
        self.handshake: auth.ServerHandshake | None = None
        self.sealer: auth.Sealer | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self.close_when_idle = False  # its mode is not the cluster's any more
        self.backlog: collections.deque[tuple[Header, bytes]] = collections.deque()
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.writing_paused = False
        self.reading_paused = False
        self.transport: asyncio.Transport | None = None
        self.session = Session(session_id=server.world.token(8))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.session.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a simulated network has none
            # A client on a host that vanished releases its VDI locks within seconds.
            detect_dead_peer(sock)
        self.server.connections.add(self)
        self._handshake_timer = asyncio.get_running_loop().call_later(
            constants.handshake_timeout_s, self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.sealer is None and self.transport is not None:
            log.warning("closing connection %s: no handshake within %s s", self._peer(),
                        constants.handshake_timeout_s)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.server.connections.discard(self)
        self.backlog.clear()
        self.server.close_session(self.session)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._start_ready()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self.decoder.buffer_updated(nbytes)
        except proto.ProtocolError:
            frames = []
        error = self.decoder.error
        if error is not None:
            # The stream is lost: requests not started yet go unanswered with the connection.
            principal = self.session.principal
            log.warning("closing connection %s%s: %s", self._peer(),
                        f" ({principal.name})" if principal is not None else "", error.reason)
            self.backlog.clear()
            if error.header is not None:  # answered in our version, which the peer can read
                header = error.header._replace(version=constants.proto_version)
                self._send_error(header, Result.BAD_REQUEST, error.reason)
            assert self.transport is not None
            self.transport.close()
            return
        if self.sealer is not None:  # the decoder opened them
            self.backlog.extend(frames)
            self._start_ready()
            return
        for index, (header, payload) in enumerate(frames):
            if self.transport is None or self.transport.is_closing():
                return
            self._handshake_step(header, payload)
            if self.sealer is not None and index + 1 < len(frames):
                # Sent before the welcome, so not sealed: the protocol waits for it.
                log.warning("closing connection %s: frames sent before the handshake's"
                            " answer", self._peer())
                self.transport.close()
                return

    def _handshake_step(self, header: Header, payload: bytes) -> None:
        """Serve one frame of the handshake; anything else before it is done is refused
        and the connection closed. Nothing but the handshake runs before it."""
        assert self.transport is not None
        try:
            if header.is_reply or header.opcode not in (proto.Op.AUTH_HELLO,
                                                        proto.Op.AUTH_PROVE):
                raise error_for(Result.AUTH_FAILED, "authenticate first: this connection"
                                " has not run the handshake (a client older than the sheep?)")
            body = proto.decode_json(payload)
            if header.opcode == proto.Op.AUTH_HELLO:
                if self.handshake is not None:
                    raise BadRequest("handshake: hello sent twice")
                self.handshake = auth.ServerHandshake(self.server.authority.lookup,
                                                      self.server.authority.mode())
                hello = self.handshake.hello(body)
                hint = self.server.authority.keyring_hint()
                if hint is not None and _on_this_host(self.session.peer):
                    hello["keyring"] = hint  # a path: only its readers get the key
                answer = proto.encode_json(hello)
                self._send(header.reply(Result.SUCCESS, len(answer)), answer)
                return
            if self.handshake is None:
                raise BadRequest("handshake: proof before hello")
            principal = self.handshake.prove(body)
            if self.handshake.mode != self.server.authority.mode():
                # A format changed the cluster's mode between hello and proof: this
                # connection would go on in the old one, which cut_mode has already
                # swept. Closed unanswered, as a lost connection: its peer connects again.
                log.warning("closing connection %s: the cluster's mode changed during its"
                            " handshake", self._peer())
                self.transport.close()
                return
        except SheepError as error:
            log.warning("closing connection %s: %s", self._peer(), error.message)
            self._send_error(header, error.result, error.message)
            self.backlog.clear()
            self.transport.close()
            return
        welcome = proto.encode_json({"principal": principal.name, "caps": principal.caps.text()})
        self._send(header.reply(Result.SUCCESS, len(welcome)), welcome)
        self.session.principal = principal
        self.sealer = self.handshake.sealer()
        self.handshake = None
        self.decoder.allow(constants.payload_max_bytes + auth.TAG_BYTES)
        try:
            self.decoder.seal(self.sealer)
        except proto.ProtocolError as error:
            log.warning("closing connection %s: %s", self._peer(), error.reason)
            self.transport.close()
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _peer(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("peername")

    def _start_ready(self) -> None:
        """Start backlogged requests while the limits allow; read more once all started."""
        while self.backlog and self._may_start(self.backlog[0][0]):
            header, payload = self.backlog.popleft()
            problem = proto.request_problem(header)
            if problem is None and header.is_reply:
                problem = (Result.BAD_REQUEST, "got a reply where a request belongs")
            if problem is not None:
                self._send_error(header, *problem)
                continue
            self._start(header, payload)
        self._set_reading(not self.backlog)

    def _may_start(self, header: Header) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        if self.in_flight >= constants.requests_in_flight_max:
            return False
        held = self.bytes_in_flight + self.transport.get_write_buffer_size()
        if held + _request_bytes(header) <= request_bytes_in_flight_max:
            return True
        return self.in_flight == 0 and not self.writing_paused

    def _set_reading(self, reading: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if reading and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        elif not reading and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def _start(self, header: Header, payload: bytes) -> None:
        cost = _request_bytes(header)
        self.in_flight += 1
        self.bytes_in_flight += cost
        task = asyncio.get_running_loop().create_task(self._serve(header, payload, cost))
        self.server.tasks.add(task)
        self.session.tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.server.tasks.discard(task)
        self.session.tasks.discard(task)

    async def _serve(self, header: Header, payload: bytes, cost: int) -> None:
        try:
            data, fields = await self.server.dispatch(header, payload, self.session)
        except SheepError as error:
            self._send_error(header, error.result, error.message)
        except AssertionError as error:
            log.critical("invariant broken serving %s", header, exc_info=True)
            self.server.world.crash(f"invariant broken serving {header}: {error!r}")
        except Exception as error:
            log.exception("failed serving %s", header)
            self._send_error(header, Result.SYSTEM, f"internal error: {error!r}")
        else:
            self._send(header.reply(Result.SUCCESS, len(data), **fields), data)
        finally:
            self.in_flight -= 1
            self.bytes_in_flight -= cost
            assert self.in_flight >= 0 and self.bytes_in_flight >= 0
            if self.close_when_idle and not self.in_flight and self.transport is not None:
                self.transport.close()  # after the reply: close() sends what is buffered
            self._start_ready()

    def _send_error(self, header: Header, result: int, message: str) -> None:
        data = message.encode()[:4096]
        self._send(header.reply(result, len(data)), data)

    def _send(self, header: Header, data: bytes | bytearray | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.sealer is not None:
            self.transport.writelines(self.sealer.seal(header.opcode, header.pack_request(
                header.request_id, len(data) + auth.TAG_BYTES), data))
        elif data:
            self.transport.writelines([header.pack(), data])
        else:
            self.transport.write(header.pack())


class Server:
    def __init__(self, dispatch: Dispatch, authority: auth.Authority,
                 world: World = REAL) -> None:
        self.dispatch = dispatch
        self.authority = authority
        self.world = world
        self.connections: set[_RequestProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: Listener | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def cut(self, principal: str) -> int:
        """Close every connection authenticated as this principal (removed, or its key
        rotated); return how many."""
        cut = 0
        for connection in list(self.connections):
            if (connection.session.principal is not None
                    and connection.session.principal.name == principal
                    and connection.transport is not None):
                connection.transport.close()
                cut += 1
        return cut

    def cut_mode(self, encrypt: bool) -> None:
        """Close the connections whose frames are not (or are) encrypted, once each has
        answered what it is serving (the format that changed the mode, say): their
        peers connect again in the cluster's mode."""
        for connection in list(self.connections):
            if connection.sealer is None or connection.sealer.encrypt == encrypt:
                continue
            connection.close_when_idle = True
            if not connection.in_flight and connection.transport is not None:
                connection.transport.close()

    def close_session(self, session: Session) -> None:
        """Release a session once the requests it started have finished."""
        task = asyncio.get_running_loop().create_task(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def start(self, where: Any) -> None:
        """Serve on ``where``: a bound socket (see bind), or what a simulated network takes."""
        self._server = await self.world.network.serve(lambda: _RequestProtocol(self), where)

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish, close every connection."""
        if self._server is not None:
            self._server.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=drain_timeout_s)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
            self.close_session(connection.session)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=drain_timeout_s)
        if self._server is not None:
            await self._server.wait_closed()

