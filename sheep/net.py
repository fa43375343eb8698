"""The sheep's server side of the protocol: the only socket code in the daemon.

Each connection decodes frames with the sans-IO decoder and runs every request
as its own task, so a slow request does not hold up the ones behind it and
replies go out in completion order. Past requests_in_flight_max outstanding
requests, the connection stops reading until some finish.

A frame that cannot be framed (bad magic, hostile length) gets an error reply
if its header was readable, then the connection closes; a well-framed bad
request (unknown opcode, bad range) gets an error reply and the connection
lives on. Other connections never notice either.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from sheep import constants, proto
from sheep.errors import Result, SheepError
from sheep.proto import Header

log = logging.getLogger(__name__)

Reply = tuple[bytes | bytearray | memoryview, dict[str, int]]
Dispatch = Callable[[Header, bytes], Awaitable[Reply]]


class _RequestProtocol(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.decoder = proto.FrameDecoder()
        self.in_flight = 0
        self.paused = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except proto.ProtocolError:
            frames = []
        for header, payload in frames:
            problem = proto.request_problem(header)
            if problem is None and header.is_reply:
                problem = (Result.BAD_REQUEST, "got a reply where a request belongs")
            if problem is not None:
                self._send_error(header, *problem)
                continue
            self._start(header, payload)
        error = self.decoder.error
        if error is not None:
            log.warning("closing connection %s: %s", self._peer(), error.reason)
            if error.header is not None:
                self._send_error(error.header, Result.BAD_REQUEST, error.reason)
            assert self.transport is not None
            self.transport.close()

    def _peer(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("peername")

    def _start(self, header: Header, payload: bytes) -> None:
        self.in_flight += 1
        if self.in_flight >= constants.requests_in_flight_max and not self.paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self.paused = True
        task = asyncio.get_running_loop().create_task(self._serve(header, payload))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _serve(self, header: Header, payload: bytes) -> None:
        try:
            data, fields = await self.server.dispatch(header, payload)
        except SheepError as error:
            self._send_error(header, error.result, error.message)
        except AssertionError:
            log.critical("invariant broken serving %s", header, exc_info=True)
            os._exit(70)
        except Exception as error:
            log.exception("failed serving %s", header)
            self._send_error(header, Result.SYSTEM, f"internal error: {error!r}")
        else:
            self._send(header.reply(Result.SUCCESS, len(data), **fields), data)
        finally:
            self.in_flight -= 1
            if self.paused and self.in_flight < constants.requests_in_flight_max // 2:
                assert self.transport is not None
                self.paused = False
                self.transport.resume_reading()

    def _send_error(self, header: Header, result: int, message: str) -> None:
        data = message.encode()[:4096]
        self._send(header.reply(result, len(data)), data)

    def _send(self, header: Header, data: bytes | bytearray | memoryview) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if data:
            self.transport.writelines([header.pack(), data])
        else:
            self.transport.write(header.pack())


class Server:
    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.connections: set[_RequestProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _RequestProtocol(self), sock=sock)

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish, close every connection."""
        if self._server is not None:
            self._server.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=drain_timeout_s)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        if self._server is not None:
            await self._server.wait_closed()


def bind(address: str, port: int) -> socket.socket:
    """The listening socket, bound before the daemon forks so errors reach the user."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(constants.listen_backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
