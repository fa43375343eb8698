"""BlockingConnection, the NBD plugin's connection, against a sheep the test drives:
it runs the real handshake, then hands each request to the test, which answers in
any order, late, or never."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sheep import auth, proto
from sheep.client import BlockingConnection
from sheep.errors import NetworkError, NoVdi, Timeout
from sheep.proto import Header, Op, Result


class DrivenSheep:
    """One connection's sheep side: the handshake, then each request queued for the
    test, answered by answer()."""

    def __init__(self) -> None:
        self.key = auth.new_key()
        self.credentials = auth.Credentials("client.test", self.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: queue.Queue[tuple[Header, bytes]] = queue.Queue()
        self.sock: socket.socket | None = None
        self.sealer: auth.Sealer | None = None
        self._send = threading.Lock()
        self.ready = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        sock, _ = self.listener.accept()
        self.sock = sock
        decoder = proto.FrameDecoder()
        entry = auth.Entry(self.key, auth.Caps.parse("admin"))
        handshake = auth.ServerHandshake(lambda name: entry, "sign")
        try:
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    return
                for header, payload in decoder.feed(data):
                    if self.sealer is None:
                        body = proto.decode_json(bytes(payload))
                        if header.opcode == Op.AUTH_HELLO:
                            answer = handshake.hello(body)
                        else:
                            principal = handshake.prove(body)
                            answer = {"principal": principal.name, "caps": "admin"}
                        sock.sendall(proto.encode(header.reply(), proto.encode_json(answer)))
                        if header.opcode == Op.AUTH_PROVE:
                            self.sealer = handshake.sealer()
                            decoder.seal(self.sealer)
                            self.ready.set()
                        continue
                    self.requests.put((header, bytes(payload)))
        except OSError:
            return

    def next(self, timeout_s: float = 5) -> tuple[Header, bytes]:
        return self.requests.get(timeout=timeout_s)

    def answer(self, header: Header, payload: bytes = b"", result: int = Result.SUCCESS
               ) -> None:
        assert self.sock is not None and self.sealer is not None
        with self._send:
            self.sock.sendall(proto.encode(header.reply(result), payload, self.sealer))

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        self.listener.close()


@pytest.fixture
def sheep() -> Iterator[DrivenSheep]:
    server = DrivenSheep()
    yield server
    server.close()


@pytest.fixture
def connection(sheep: DrivenSheep) -> Iterator[BlockingConnection]:
    conn = BlockingConnection("127.0.0.1", sheep.port, sheep.credentials)
    assert sheep.ready.wait(5)
    yield conn
    conn.close()


def call_in_thread(conn: BlockingConnection, header: Header, **kwargs: object
                   ) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["reply"] = conn.call(header, **kwargs)  # type: ignore[arg-type]
        except Exception as error:  # noqa: BLE001 - the test looks at it
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def readers(conn: BlockingConnection) -> int:
    """Threads of this connection's own (a reply reader): callers read in theirs."""
    return sum(1 for t in threading.enumerate() if t.name.startswith("sheep-reply-")
               and t.name.endswith(f":{conn.port}") and t.is_alive())


def test_a_lone_call_reads_its_own_reply_in_its_own_thread(sheep, connection):
    seen: list[str] = []
    original = connection._receive

    def receive() -> list[tuple[Header, bytes]]:
        seen.append(threading.current_thread().name)
        return original()

    connection._receive = receive  # type: ignore[method-assign]
    thread, outcome = call_in_thread(connection, Header(opcode=Op.PING))
    header, _ = sheep.next()
    sheep.answer(header, b"pong")
    thread.join(5)
    assert outcome["reply"][1] == b"pong"  # type: ignore[index]
    assert seen and set(seen) == {thread.name}  # no reader thread between reply and caller


def test_replies_out_of_order_reach_their_callers_and_the_reader_thread_takes_over(
        sheep, connection):
    calls = [call_in_thread(connection, Header(opcode=Op.PING, arg0=i)) for i in range(8)]
    requests = [sheep.next() for _ in range(8)]
    # The newest first: the first caller (reading) hands the reading on while the
    # others still wait, and every one gets its own answer.
    for header, _ in reversed(requests):
        sheep.answer(header, f"answer {header.arg0}".encode())
    for (thread, outcome) in calls:
        thread.join(5)
        assert not thread.is_alive()
    for index, (_, outcome) in enumerate(calls):
        reply_header, data = outcome["reply"]  # type: ignore[misc]
        assert reply_header.arg0 == index and data == f"answer {index}".encode()
    # Once nothing waits, the next call reads for itself again.
    thread, outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=99))
    header, _ = sheep.next()
    sheep.answer(header, b"last")
    thread.join(5)
    assert outcome["reply"][1] == b"last"  # type: ignore[index]


def test_a_read_lands_in_the_callers_buffer(sheep, connection):
    data = os.urandom(256 * 1024)  # larger than the decoder stages: received in place
    into = memoryview(bytearray(len(data)))
    thread, outcome = call_in_thread(connection, Header(opcode=Op.VDI_READ, count=len(data)),
                                     into=into)
    header, _ = sheep.next()
    sheep.answer(header, data)
    thread.join(5)
    assert "error" not in outcome and bytes(into) == data


def test_a_failed_result_raises_its_error_class(sheep, connection):
    thread, outcome = call_in_thread(connection, Header(opcode=Op.VDI_OPEN))
    header, _ = sheep.next()
    sheep.answer(header, proto.encode_json({"error": "no VDI named x"}), Result.NO_VDI)
    thread.join(5)
    assert isinstance(outcome["error"], NoVdi)


def test_a_reading_caller_times_out_and_the_others_still_get_their_replies(sheep, connection):
    slow, slow_outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=1),
                                        timeout_ms=300)
    first, _ = sheep.next()  # the slow caller reads: nobody else was
    others = [call_in_thread(connection, Header(opcode=Op.PING, arg0=2 + i)) for i in range(3)]
    requests = [sheep.next() for _ in range(3)]
    slow.join(5)
    assert isinstance(slow_outcome["error"], Timeout)
    for header, _ in requests:  # answered only after the reading caller gave up
        sheep.answer(header, b"late but fine")
    sheep.answer(first, b"nobody waits")
    for thread, outcome in others:
        thread.join(5)
        assert outcome["reply"][1] == b"late but fine"  # type: ignore[index]
    # The answer to the call that timed out was dropped; the stream goes on.
    thread, outcome = call_in_thread(connection, Header(opcode=Op.PING))
    header, _ = sheep.next()
    sheep.answer(header, b"next")
    thread.join(5)
    assert outcome["reply"][1] == b"next"  # type: ignore[index]


def test_a_waiting_caller_times_out_while_another_reads(sheep, connection):
    reader, reader_outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=1))
    first, _ = sheep.next()
    waiter, waiter_outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=2),
                                            timeout_ms=200)
    sheep.next()
    waiter.join(5)
    assert isinstance(waiter_outcome["error"], Timeout)
    sheep.answer(first, b"ok")
    reader.join(5)
    assert reader_outcome["reply"][1] == b"ok"  # type: ignore[index]


def test_a_lost_connection_fails_every_waiting_call_and_later_ones(sheep, connection):
    calls = [call_in_thread(connection, Header(opcode=Op.PING, arg0=i)) for i in range(4)]
    for _ in range(4):
        sheep.next()
    sheep.close()
    for thread, outcome in calls:
        thread.join(5)
        assert isinstance(outcome["error"], NetworkError)
    assert connection.closed
    with pytest.raises(NetworkError):
        connection.call(Header(opcode=Op.PING))


def test_a_sheep_gone_while_idle_fails_the_next_call_not_a_later_one(sheep, connection):
    thread, outcome = call_in_thread(connection, Header(opcode=Op.PING))
    header, _ = sheep.next()
    sheep.answer(header)
    thread.join(5)
    sheep.close()
    time.sleep(0.1)
    with pytest.raises(NetworkError):
        connection.call(Header(opcode=Op.PING), timeout_ms=5000)
    assert connection.closed


def test_close_wakes_a_caller_reading_and_ends_the_reader_thread(sheep, connection):
    thread, outcome = call_in_thread(connection, Header(opcode=Op.PING))
    sheep.next()
    assert readers(connection) == 1
    connection.close()
    thread.join(5)
    assert isinstance(outcome["error"], NetworkError)
    deadline = time.monotonic() + 5
    while readers(connection) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert readers(connection) == 0


def test_many_threads_many_calls_each_get_their_own_answer(sheep, connection):
    """Queue depth that rises and falls: the reading changes hands between callers and
    the reader thread many times, and no reply is lost or crossed."""
    stop = threading.Event()

    def answer_all() -> None:
        pending: list[Header] = []
        while not stop.is_set():
            try:
                header, payload = sheep.next(0.01)
                pending.append(header)
            except queue.Empty:
                pass
            # Answer in bursts, newest first, so replies cross.
            if len(pending) >= 3 or (pending and sheep.requests.empty()):
                for header in reversed(pending):
                    sheep.answer(header, header.arg0.to_bytes(8, "little"))
                pending.clear()

    server = threading.Thread(target=answer_all, daemon=True)
    server.start()
    failures: list[str] = []

    def work(worker: int) -> None:
        for index in range(150):
            tag = worker * 1000 + index
            _, data = connection.call(Header(opcode=Op.PING, arg0=tag))
            if int.from_bytes(data, "little") != tag:
                failures.append(f"{tag} got {int.from_bytes(data, 'little')}")
            if index % 17 == worker:
                time.sleep(0.001)  # depth falls, then rises again

    workers = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(60)
    stop.set()
    server.join(5)
    assert not failures
    assert not any(thread.is_alive() for thread in workers)
