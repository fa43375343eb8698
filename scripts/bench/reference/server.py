"""The "Python plugin + one Python hop" reference's server: an asyncio server that
serves preads and pwrites of one file. Frames: a 17-byte header (op: 1 byte,
'r', 'w' or 'f'; offset and length: 8 bytes each, big-endian), the payload of a
write after it; the reply is the data of a read, or one byte for a write or a
flush. Requests on a connection are answered in order. It is what the cheapest
Python data path costs: the ceiling a Python storage system is measured against.

    python server.py FILE PORT
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys

HEADER = struct.Struct(">cQQ")


class Serve(asyncio.Protocol):
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= HEADER.size:
            op, offset, length = HEADER.unpack_from(self.buffer)
            end = HEADER.size + (length if op == b"w" else 0)
            if len(self.buffer) < end:
                return
            assert self.transport is not None
            if op == b"r":
                self.transport.write(os.pread(self.fd, length, offset))
            elif op == b"w":
                os.pwrite(self.fd, memoryview(self.buffer)[HEADER.size:end], offset)
                self.transport.write(b"k")
            else:
                os.fdatasync(self.fd)
                self.transport.write(b"k")
            del self.buffer[:end]


async def main(path: str, port: int) -> None:
    fd = os.open(path, os.O_RDWR)
    server = await asyncio.get_running_loop().create_server(lambda: Serve(fd), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
