"""Hostile bytes on a real sheep's port, while an honest client keeps working.

Every case sends its garbage on a fresh raw socket and checks what the sheep
owes it: an error reply with the right result code, or a closed connection,
never a hang. Meanwhile a background client writes and reads through the same
sheep; it must see no error, during the attack and after it. The sheep's
resident memory (VmRSS in /proc/PID/status) must stay bounded, also against
headers claiming huge payloads and against a client that pipelines big reads
and never reads the replies.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sheep import auth, constants, proto
from sheep.client import SyncClient
from sheep.errors import Result
from sheep.oid import ObjectType, make_oid
from sheep.proto import FLAG_REPLY, HEADER_SIZE, Header, Op
from sheep.testing.cluster import LocalCluster, raw_handshake

reply_timeout_s = 5.0
rss_growth_max_bytes = 100 << 20
object_size = 4 << 20


class Exchange:
    """A raw connection: send bytes, collect reply frames, notice the close. With
    credentials it runs the handshake first, and then seals what call() and frame()
    make (garbage sent with send() stays garbage)."""

    def __init__(self, port: int, credentials: auth.Credentials | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=reply_timeout_s)
        self.decoder = proto.FrameDecoder()
        self.replies: list[tuple[Header, bytes]] = []
        self.closed = False
        self.sealer: auth.Sealer | None = None
        if credentials is not None:
            self.sealer = raw_handshake(self.call, credentials, self.decoder)

    def frame(self, header: Header, payload: bytes = b"") -> bytes:
        """A frame as the client library would send it on this connection."""
        return proto.encode(header, payload, self.sealer)

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True

    def _receive(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        self.replies += self.decoder.feed(data)

    def wait_replies(self, count: int) -> list[tuple[Header, bytes]]:
        while len(self.replies) < count and not self.closed:
            self._receive()
        assert len(self.replies) >= count, f"connection closed after {self.replies}"
        return self.replies

    def wait_closed(self) -> None:
        """The sheep closes its end (socket.timeout fails the test: a hang)."""
        while not self.closed:
            self._receive()

    def call(self, header: Header, payload: bytes = b"") -> tuple[Header, bytes]:
        """One request on this connection; the connection must still be served."""
        before = len(self.replies)
        self.send(self.frame(header, payload))
        return self.wait_replies(before + 1)[before]

    def close(self) -> None:
        self.sock.close()


class HonestClient(threading.Thread):
    """Writes and reads objects through the sheep under attack until stopped."""

    def __init__(self, port: int, credentials: auth.Credentials) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.credentials = credentials
        self.stop_event = threading.Event()
        self.rounds = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        rng = random.Random(7)
        try:
            with SyncClient("127.0.0.1", self.port, self.credentials) as client:
                while not self.stop_event.is_set():
                    oid = make_oid(ObjectType.RAW, 77, self.rounds % 32)
                    data = rng.randbytes(rng.randrange(1, 64 << 10))
                    offset = rng.randrange(object_size - len(data))
                    client.create_and_write(oid, data, offset)
                    assert client.read(oid, offset, len(data)) == data
                    self.rounds += 1
        except BaseException as error:  # reported by finish()
            self.errors.append(error)

    def finish(self, rounds_after: int = 2) -> None:
        """Fail if any round failed, or if it is not served after the attack either."""
        mark = self.rounds
        deadline = time.monotonic() + 10
        while self.rounds < mark + rounds_after and not self.errors:
            assert time.monotonic() < deadline, "the honest client is no longer served"
            time.sleep(0.01)
        self.stop_event.set()
        self.join(timeout=30)
        assert not self.is_alive(), "the honest client hangs"
        assert not self.errors, self.errors


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(str(tmp_path_factory.mktemp("garbage")), nodes=2) as local:
        local.start()
        local.format(copies=2)
        yield local


@pytest.fixture
def honest(cluster) -> Iterator[HonestClient]:
    client = HonestClient(cluster.sheep[0].port, cluster.credentials)
    client.start()
    deadline = time.monotonic() + 10
    while client.rounds == 0 and not client.errors and time.monotonic() < deadline:
        time.sleep(0.01)
    yield client
    client.stop_event.set()
    client.join(timeout=30)


def port(cluster: LocalCluster) -> int:
    return cluster.sheep[0].port


def rss_bytes(cluster: LocalCluster, index: int = 0) -> int:
    process = cluster.sheep[index].process
    assert process is not None
    with open(f"/proc/{process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def check_still_serving(cluster: LocalCluster) -> None:
    """A brand-new client gets full service after the attack."""
    with cluster.client(0) as client:
        oid = make_oid(ObjectType.RAW, 78, 0)
        client.create_and_write(oid, b"after", 4096)
        assert client.read(oid, 4096, 5) == b"after"
    with cluster.client(1) as client:
        assert client.read(oid, 4096, 5) == b"after"


def error_reply(reply: tuple[Header, bytes], result: Result, request_id: int) -> str:
    header, payload = reply
    assert header.is_reply and header.request_id == request_id
    assert header.result == result, (Result(header.result), proto.error_message(payload))
    message = proto.error_message(payload)
    assert message
    return message


def ping(request_id: int) -> Header:
    return Header(opcode=Op.PING, request_id=request_id)


# --- the cases -----------------------------------------------------------------

def test_random_bytes_close_the_connection(cluster, honest):
    rng = random.Random(1)
    for size in (HEADER_SIZE, 1000, 1 << 16):
        garbage = bytearray(rng.randbytes(size))
        garbage[0:2] = b"\x00\x00"  # never the magic by chance
        exchange = Exchange(port(cluster))
        exchange.send(bytes(garbage))
        exchange.wait_closed()
        assert exchange.replies == []  # no header to answer: just closed
        exchange.close()
    honest.finish()
    check_still_serving(cluster)


def test_garbage_after_good_requests_closes_only_that_connection(cluster, honest):
    exchange = Exchange(port(cluster), cluster.credentials)
    assert exchange.call(ping(1))[0].result == Result.SUCCESS
    exchange.send(random.Random(2).randbytes(4096))
    exchange.wait_closed()
    exchange.close()
    honest.finish()
    check_still_serving(cluster)


@pytest.mark.parametrize("length", [2**32 - 1, constants.payload_max_bytes + 1])
def test_huge_length_gets_an_error_and_a_close(cluster, honest, length):
    exchange = Exchange(port(cluster))
    header = Header(opcode=Op.WRITE_OBJ, request_id=5, oid=1, count=4096, length=length)
    exchange.send(header.pack() + b"\x00" * 1024)
    message = error_reply(exchange.wait_replies(1)[0], Result.BAD_REQUEST, 5)
    assert str(length) in message
    exchange.wait_closed()
    exchange.close()
    honest.finish()
    check_still_serving(cluster)


def test_bad_version_gets_an_error_and_a_close(cluster, honest):
    exchange = Exchange(port(cluster))
    exchange.send(Header(opcode=Op.PING, request_id=6, version=99).pack())
    assert "version" in error_reply(exchange.wait_replies(1)[0], Result.BAD_REQUEST, 6)
    exchange.wait_closed()
    exchange.close()
    honest.finish()


@pytest.mark.parametrize("request_, payload, result", [
    (Header(opcode=0x7F, request_id=11), b"", Result.UNKNOWN_OP),
    (Header(opcode=0x00, request_id=11), b"", Result.UNKNOWN_OP),
    (Header(opcode=Op.PING, request_id=11, flags=FLAG_REPLY), b"", Result.BAD_REQUEST),
    (Header(opcode=Op.PING, request_id=11, flags=0x8000), b"", Result.BAD_REQUEST),
    (Header(opcode=Op.READ_OBJ, request_id=11, oid=1, count=10), b"payload", Result.BAD_REQUEST),
    (Header(opcode=Op.WRITE_OBJ, request_id=11, oid=1, count=99), b"short", Result.BAD_REQUEST),
    (Header(opcode=Op.READ_OBJ, request_id=11, oid=1, offset=2**63, count=4096), b"",
     Result.INVALID_PARMS),
    (Header(opcode=Op.READ_OBJ, request_id=11, oid=1, offset=object_size, count=1), b"",
     Result.INVALID_PARMS),
    (Header(opcode=Op.FORMAT, request_id=11), b"{not json", Result.BAD_REQUEST),
    (Header(opcode=Op.FORMAT, request_id=11), b"[3]", Result.INVALID_PARMS),
    (Header(opcode=Op.FORMAT, request_id=11), b'{"copies": 0}', Result.INVALID_PARMS),
], ids=["opcode-0x7f", "opcode-0", "reply-flag", "unknown-flag", "payload-on-read",
        "count-vs-length", "offset-2^63", "past-object-end", "bad-json", "json-list",
        "zero-copies"])
def test_bad_request_gets_its_error_code_and_the_connection_lives(cluster, honest, request_,
                                                                   payload, result):
    exchange = Exchange(port(cluster), cluster.credentials)
    reply = exchange.call(request_, payload)
    error_reply(reply, result, 11)
    assert exchange.call(ping(12))[0].result == Result.SUCCESS
    exchange.close()
    honest.finish()


def test_truncated_frames_then_close(cluster, honest):
    whole = proto.encode(Header(opcode=Op.WRITE_OBJ, request_id=3, oid=1, count=1 << 20),
                         bytes(1 << 20))
    for cut in (1, HEADER_SIZE // 2, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1000):
        exchange = Exchange(port(cluster))
        exchange.send(whole[:cut])
        exchange.close()
    # The half-sent write never happened: its object is not there.
    assert cluster.object_files(1) == []
    honest.finish()
    check_still_serving(cluster)


def test_memory_stays_bounded(cluster, honest):
    baseline = rss_bytes(cluster)
    figures = {"baseline": baseline}

    # Headers claiming 4 GiB are refused before a byte of payload is buffered.
    for _ in range(50):
        exchange = Exchange(port(cluster))
        exchange.send(Header(opcode=Op.WRITE_OBJ, request_id=1, oid=1, length=2**32 - 1,
                             count=2**32 - 1).pack())
        exchange.wait_closed()
        exchange.close()
    figures["after 50 x 4 GiB claims"] = rss_bytes(cluster)

    # Many authenticated connections claiming the largest legal payload, sending only
    # part of it (before the handshake, a frame may not exceed a few KiB).
    claims = []
    for request_id in range(100):
        exchange = Exchange(port(cluster), cluster.credentials)
        exchange.send(Header(opcode=Op.WRITE_OBJ, request_id=request_id, oid=1,
                             length=constants.payload_max_bytes + auth.TAG_BYTES,
                             count=constants.payload_max_bytes).pack() + bytes(4096))
        claims.append(exchange)
    time.sleep(0.2)
    figures["100 open 64 MiB claims"] = rss_bytes(cluster)
    for exchange in claims:
        exchange.close()

    # A client that pipelines 4 MiB reads and never reads a reply.
    oid = make_oid(ObjectType.RAW, 79, 0)
    with cluster.client(0) as client:
        client.create_and_write(oid, os.urandom(object_size), 0)
    greedy = Exchange(port(cluster), cluster.credentials)
    greedy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    greedy.send(b"".join(greedy.frame(Header(opcode=Op.READ_OBJ, request_id=i, oid=oid,
                                             count=object_size)) for i in range(300)))
    rounds_before = honest.rounds
    peak = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        peak = max(peak, rss_bytes(cluster))
        time.sleep(0.05)
    figures["300 x 4 MiB reads never read (peak)"] = peak
    assert honest.rounds > rounds_before, "the honest client starved during the read flood"
    greedy.close()

    report = ", ".join(f"{name}: {value >> 20} MiB" for name, value in figures.items())
    print(f"\nsheep RSS: {report}")
    assert max(figures.values()) - baseline < rss_growth_max_bytes, report
    honest.finish()
    check_still_serving(cluster)
