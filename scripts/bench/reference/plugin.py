"""The "Python plugin + one Python hop" reference's nbdkit plugin: each nbdkit
thread keeps its own connection to server.py and forwards every request, reads
received straight into nbdkit's buffer.

    nbdkit python plugin.py port=PORT size=BYTES
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any

import nbdkit

API_VERSION = 2
HEADER = struct.Struct(">cQQ")
_config = {"port": 0, "size": 0}
_local = threading.local()


def config(key: str, value: str) -> None:
    _config[key] = int(value)


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def _connection() -> socket.socket:
    sock = getattr(_local, "sock", None)
    if sock is None:
        sock = _local.sock = socket.create_connection(("127.0.0.1", _config["port"]))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        count = sock.recv_into(view)
        if count == 0:
            raise ConnectionError("server closed")
        view = view[count:]


def open(readonly: bool) -> int:  # noqa: A001 - nbdkit's name
    return 1


def get_size(h: Any) -> int:
    return _config["size"]


def can_multi_conn(h: Any) -> bool:
    return True


def can_flush(h: Any) -> bool:
    return True


def pread(h: Any, buf: Any, offset: int, flags: int) -> None:
    sock = _connection()
    view = memoryview(buf)
    sock.sendall(HEADER.pack(b"r", offset, len(view)))
    _recv_into(sock, view)


def pwrite(h: Any, buf: Any, offset: int, flags: int) -> None:
    sock = _connection()
    sock.sendall(HEADER.pack(b"w", offset, len(buf)))
    sock.sendall(buf)
    _recv_into(sock, memoryview(bytearray(1)))


def flush(h: Any, flags: int) -> None:
    sock = _connection()
    sock.sendall(HEADER.pack(b"f", 0, 0))
    _recv_into(sock, memoryview(bytearray(1)))
