"""BlockingConnection, the NBD plugin's connection, against a sheep the test drives:
it runs the real handshake, then hands each request to the test, which answers in
any order, late, in pieces, or never."""

from __future__ import annotations

import array
import asyncio
import itertools
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sheep import auth, proto
from sheep.client import BlockingConnection
from sheep.errors import InvalidParameters, NetworkError, NoVdi, Timeout
from sheep.proto import Header, Op, Result


class DrivenSheep:
    """One connection's sheep side: the handshake, then each request queued for the
    test, answered by answer()."""

    def __init__(self, forge_hello: bool = False) -> None:
        self.forge_hello = forge_hello  # answer the handshake's first step as another op
        self.key = auth.new_key()
        self.credentials = auth.Credentials("client.test", self.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: queue.Queue[tuple[Header, bytes]] = queue.Queue()
        self.sock: socket.socket | None = None
        self.sealer: auth.Sealer | None = None
        self._send = threading.Lock()
        self.ready = threading.Event()
        self.reading = threading.Event()  # cleared: the sheep stops reading requests
        self.reading.set()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        sock, _ = self.listener.accept()
        self.sock = sock
        decoder = proto.FrameDecoder()
        entry = auth.Entry(self.key, auth.Caps.parse("admin"))
        handshake = auth.ServerHandshake(lambda name: entry, "sign")
        try:
            while True:
                self.reading.wait()
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
                        reply = header.reply()
                        if self.forge_hello and header.opcode == Op.AUTH_HELLO:
                            reply = reply._replace(opcode=Op.AUTH_PROVE)
                        sock.sendall(proto.encode(reply, proto.encode_json(answer)))
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
        self.send_raw(self.frame(header, payload, result))

    def frame(self, header: Header, payload: bytes = b"", result: int = Result.SUCCESS
              ) -> bytes:
        """The reply's bytes, to send in pieces (frames count: send them in this order)."""
        assert self.sealer is not None
        return proto.encode(header.reply(result), payload, self.sealer)

    def send_raw(self, data: bytes) -> None:
        assert self.sock is not None
        with self._send:
            self.sock.sendall(data)

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


def serves(sheep: DrivenSheep, conn: BlockingConnection, answer: bytes) -> None:
    """The connection still serves: a call gets its answer."""
    thread, outcome = call_in_thread(conn, Header(opcode=Op.PING))
    header, _ = sheep.next()
    sheep.answer(header, answer)
    thread.join(5)
    assert outcome["reply"][1] == answer  # type: ignore[index]


def readers(conn: BlockingConnection) -> int:
    """This connection's reply reader threads."""
    return sum(1 for t in threading.enumerate() if t.name.startswith("sheep-reply-")
               and t.name.endswith(f":{conn.port}") and t.is_alive())


def test_replies_out_of_order_reach_their_callers(sheep, connection):
    calls = [call_in_thread(connection, Header(opcode=Op.PING, arg0=i)) for i in range(8)]
    requests = [sheep.next() for _ in range(8)]
    for header, _ in reversed(requests):
        sheep.answer(header, f"answer {header.arg0}".encode())
    for thread, _ in calls:
        thread.join(5)
        assert not thread.is_alive()
    for index, (_, outcome) in enumerate(calls):
        reply_header, data = outcome["reply"]  # type: ignore[misc]
        assert reply_header.arg0 == index and data == f"answer {index}".encode()
    serves(sheep, connection, b"last")


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


def test_a_caller_times_out_and_the_others_still_get_their_replies(sheep, connection):
    slow, slow_outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=1),
                                        timeout_ms=300)
    first, _ = sheep.next()
    others = [call_in_thread(connection, Header(opcode=Op.PING, arg0=2 + i)) for i in range(3)]
    requests = [sheep.next() for _ in range(3)]
    slow.join(5)
    assert isinstance(slow_outcome["error"], Timeout)
    for header, _ in requests:  # answered only after the first caller gave up
        sheep.answer(header, b"late but fine")
    sheep.answer(first, b"nobody waits")
    for thread, outcome in others:
        thread.join(5)
        assert outcome["reply"][1] == b"late but fine"  # type: ignore[index]
    # The answer to the call that timed out was dropped; the stream goes on.
    serves(sheep, connection, b"next")


def test_a_caller_times_out_while_another_waits(sheep, connection):
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


def test_a_sheep_gone_while_idle_makes_the_connection_closed_before_any_request(
        sheep, connection):
    """The plugin asks before each request, and must not send a change on a dead
    connection (its failover would then resume the lock as a contender that never held
    it)."""
    thread, outcome = call_in_thread(connection, Header(opcode=Op.PING))
    header, _ = sheep.next()
    sheep.answer(header)
    thread.join(5)
    assert not connection.closed
    sheep.close()
    deadline = time.monotonic() + 5
    while not connection.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert connection.closed
    assert sheep.requests.empty()
    with pytest.raises(NetworkError):
        connection.call(Header(opcode=Op.PING), timeout_ms=5000)


def test_late_replies_on_an_idle_connection_are_taken_in(sheep, connection):
    with pytest.raises(Timeout):
        connection.call(Header(opcode=Op.PING, arg0=1), timeout_ms=100)
    late, _ = sheep.next()
    sheep.answer(late, b"too late")
    time.sleep(0.1)
    assert not connection.closed  # took the late reply in, and dropped it
    serves(sheep, connection, b"mine")


def test_close_fails_a_waiting_call_and_ends_the_reader_thread(sheep, connection):
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
    """Queue depth that rises and falls, replies answered in bursts newest first: no
    reply is lost or crossed."""
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
            try:
                _, data = connection.call(Header(opcode=Op.PING, arg0=tag), timeout_ms=10_000)
            except Exception as error:  # noqa: BLE001 - a lost wake-up times out here
                failures.append(f"{tag}: {error!r}")
                return
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


LARGE = 256 * 1024  # above the decoder's staging: received straight into the buffer


def large_read(sheep: DrivenSheep, conn: BlockingConnection, timeout_ms: int = 30_000
               ) -> tuple[threading.Thread, dict[str, object], memoryview, bytes, bytes]:
    """A read whose reply lands straight in its caller's buffer: the call under way,
    its buffer, the data and the reply's bytes, not sent yet."""
    data = os.urandom(LARGE)
    into = memoryview(bytearray(LARGE))
    thread, outcome = call_in_thread(conn, Header(opcode=Op.VDI_READ, count=LARGE), into=into,
                                     timeout_ms=timeout_ms)
    header, _ = sheep.next()
    return thread, outcome, into, data, sheep.frame(header, data)


def rest_lands_nowhere(sheep: DrivenSheep, into: memoryview, rest: bytes) -> None:
    """After its call returned, the rest of a reply that was landing in the caller's
    buffer changes nothing there."""
    before = bytes(into)
    try:
        sheep.send_raw(rest)
    except OSError:
        pass  # the connection is gone: so much the better
    time.sleep(0.1)
    assert bytes(into) == before


def test_a_reply_stalled_mid_frame_past_the_deadline_gives_up_the_connection(
        sheep, connection):
    """A sheep alive but stalled halfway through a reply landing in its caller's
    buffer: at the deadline the connection is given up, and the caller returns only
    once nothing more can land in its buffer."""
    thread, outcome, into, data, frame = large_read(sheep, connection, timeout_ms=200)
    sheep.send_raw(frame[:LARGE // 2])
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], NetworkError) and "stalled" in str(outcome["error"])
    assert connection.closed
    rest_lands_nowhere(sheep, into, frame[LARGE // 2:])


def test_a_slow_reply_landing_within_the_deadline_arrives_whole(sheep, connection):
    reader, reader_outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=1))
    first, _ = sheep.next()
    waiter, outcome, into, data, frame = large_read(sheep, connection, timeout_ms=2000)
    sheep.send_raw(frame[:LARGE // 2])
    time.sleep(0.3)
    sheep.send_raw(frame[LARGE // 2:])
    waiter.join(5)
    assert "error" not in outcome and bytes(into) == data
    sheep.answer(first, b"ok")
    reader.join(5)
    assert reader_outcome["reply"][1] == b"ok"  # type: ignore[index]


def test_a_small_reply_ahead_of_a_large_one_leaves_the_large_one_landing(sheep, connection):
    """In one receive: a whole small reply, then the start of a large one placed in its
    caller's buffer. Delivering the small one must not forget the large one landing:
    at its deadline its caller waits for the landing to end, never times out while
    bytes can still reach its buffer."""
    small, small_outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=1))
    first, _ = sheep.next()
    data = os.urandom(LARGE)
    into = memoryview(bytearray(LARGE))
    large, outcome = call_in_thread(connection, Header(opcode=Op.VDI_READ, count=LARGE),
                                    into=into, timeout_ms=200)
    header, _ = sheep.next()
    small_frame = sheep.frame(first, b"small")
    frame = sheep.frame(header, data)
    sheep.send_raw(small_frame + frame[:LARGE // 2])
    small.join(5)
    assert small_outcome["reply"][1] == b"small"  # type: ignore[index]
    large.join(5)
    assert not isinstance(outcome["error"], Timeout)  # it would return with bytes landing
    assert isinstance(outcome["error"], NetworkError)
    rest_lands_nowhere(sheep, into, frame[LARGE // 2:])


def test_close_while_a_reply_lands_returns_only_once_it_stopped(sheep, connection):
    thread, outcome, into, data, frame = large_read(sheep, connection)
    sheep.send_raw(frame[:LARGE // 2])
    time.sleep(0.1)
    connection.close()
    thread.join(5)
    assert not thread.is_alive() and isinstance(outcome["error"], NetworkError)
    rest_lands_nowhere(sheep, into, frame[LARGE // 2:])


class BrokenBuffer:
    """A caller's buffer that cannot be written (a bug, a read-only view)."""

    def __len__(self) -> int:
        return 4096

    def __setitem__(self, key: slice, value: bytes) -> None:
        raise TypeError("cannot modify read-only memory")


def test_a_reply_that_cannot_be_handed_over_fails_its_call_not_hangs_it(sheep, connection):
    thread, outcome = call_in_thread(connection, Header(opcode=Op.VDI_READ, count=4096),
                                     into=BrokenBuffer(), timeout_ms=200)
    header, _ = sheep.next()
    sheep.answer(header, b"d" * 4096)
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], NetworkError) and "handed over" in str(outcome["error"])
    assert connection.closed  # the reader stopped: the connection with it


def test_replies_ahead_of_a_broken_frame_are_delivered(sheep, connection):
    good, good_outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=1))
    first, _ = sheep.next()
    other, other_outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=2))
    second, _ = sheep.next()
    fine = sheep.frame(first, b"fine")
    forged = bytearray(sheep.frame(second, b"forged"))
    forged[-1] ^= 0xFF  # its tag is wrong
    sheep.send_raw(fine + bytes(forged))
    good.join(5)
    other.join(5)
    assert good_outcome["reply"][1] == b"fine"  # type: ignore[index]
    assert isinstance(other_outcome["error"], NetworkError)


def test_a_late_reply_never_goes_to_the_call_whose_reply_is_landing(sheep, connection):
    with pytest.raises(Timeout):
        connection.call(Header(opcode=Op.PING, arg0=1), timeout_ms=50)
    gone, _ = sheep.next()
    data = os.urandom(LARGE)
    into = memoryview(bytearray(LARGE))
    thread, outcome = call_in_thread(connection, Header(opcode=Op.VDI_READ, count=LARGE),
                                     into=into)
    header, _ = sheep.next()
    late = sheep.frame(gone, b"x" * 100)
    frame = sheep.frame(header, data)
    # In one receive: the late reply whole, then the start of the large one, whose
    # caller's buffer it lands in.
    sheep.send_raw(late + frame[:LARGE // 2])
    time.sleep(0.2)
    assert thread.is_alive(), outcome  # not finished with the late reply's bytes
    sheep.send_raw(frame[LARGE // 2:])
    thread.join(5)
    reply_header, _ = outcome["reply"]  # type: ignore[misc]
    assert reply_header.request_id == header.request_id and bytes(into) == data


class SlowBuffer:
    """A caller's buffer that takes its time to be written (a reply's copy under way)."""

    def __init__(self, size: int, seconds: float) -> None:
        self.data = bytearray(size)
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.data)

    def __setitem__(self, key: slice, value: bytes) -> None:
        time.sleep(self.seconds)
        self.data[key] = value


def test_a_deadline_passing_while_the_reply_is_copied_waits_for_the_copy(sheep, connection):
    reader, reader_outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=1))
    first, _ = sheep.next()
    into = SlowBuffer(4096, 0.4)
    waiter, outcome = call_in_thread(connection, Header(opcode=Op.VDI_READ, count=4096),
                                     into=into, timeout_ms=200)
    header, _ = sheep.next()
    sheep.answer(header, b"d" * 4096)  # copied by the reader, slowly, past 200 ms
    waiter.join(5)
    assert "error" not in outcome, outcome
    assert bytes(into.data) == b"d" * 4096
    sheep.answer(first, b"ok")
    reader.join(5)
    assert reader_outcome["reply"][1] == b"ok"  # type: ignore[index]


def test_a_request_that_cannot_be_sent_abandons_the_connection(sheep, connection):
    with pytest.raises(Exception) as raised:
        connection.call(Header(opcode=Op.PING, offset=-1))  # no such u64
    assert not isinstance(raised.value, Timeout)
    assert connection.closed and not connection._pending


@pytest.mark.parametrize("size", [4096, LARGE])
@pytest.mark.parametrize("delta", [-1, 1])
def test_a_reply_of_another_length_than_the_buffer_fails_the_call(sheep, connection, size,
                                                                   delta):
    """Never success with the caller's buffer left as it was (nbdkit would serve it)."""
    into = memoryview(bytearray(b"\xaa" * size))
    thread, outcome = call_in_thread(connection, Header(opcode=Op.VDI_READ, count=size),
                                     into=into)
    header, _ = sheep.next()
    sheep.answer(header, os.urandom(size + delta))
    thread.join(5)
    assert isinstance(outcome["error"], NetworkError) and "for a buffer of" in str(
        outcome["error"])
    # The stream goes on.
    serves(sheep, connection, b"next")


def test_a_sheep_that_stops_reading_fails_the_calls_by_their_deadline(sheep, connection):
    """Requests pile up unread: the one whose frame cannot be sent by its deadline gives
    the connection up, and the ones waiting to send time out: nobody waits past its
    deadline for the send."""
    sheep.reading.clear()
    payload = os.urandom(4 << 20)
    started = time.monotonic()
    calls = [call_in_thread(connection, Header(opcode=Op.VDI_WRITE, count=len(payload)),
                            payload=payload, timeout_ms=500) for _ in range(6)]
    for thread, _ in calls:
        thread.join(10)
    assert all(not thread.is_alive() for thread, _ in calls)
    assert time.monotonic() - started < 5
    errors = [outcome["error"] for _, outcome in calls]
    assert all(isinstance(error, NetworkError | Timeout) for error in errors), errors
    assert any("not reading" in str(error) for error in errors), errors
    assert connection.closed


@pytest.mark.parametrize("timeout_ms", [-5, -1000, 10**13])
def test_a_timeout_out_of_range_is_refused_before_anything_is_sent(sheep, connection,
                                                                    timeout_ms):
    with pytest.raises(InvalidParameters, match="timeout"):
        connection.call(Header(opcode=Op.PING), timeout_ms=timeout_ms)
    assert not connection._pending and sheep.requests.empty()


def test_request_ids_wrapping_around_skip_one_still_waiting(sheep, connection):
    first, first_outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=1),
                                          timeout_ms=1000)
    old, _ = sheep.next()
    connection._ids = itertools.count(old.request_id + (1 << 32))  # 2**32 calls later
    second, second_outcome = call_in_thread(connection, Header(opcode=Op.PING, arg0=2))
    new, _ = sheep.next()
    assert new.request_id != old.request_id
    sheep.answer(old, b"first's")
    sheep.answer(new, b"second's")
    first.join(5)
    second.join(5)
    assert first_outcome["reply"][1] == b"first's"  # type: ignore[index]
    assert second_outcome["reply"][1] == b"second's"  # type: ignore[index]


def test_a_payload_of_wide_items_is_sent_as_its_bytes(sheep, connection):
    payload = memoryview(array.array("I", range(1000)))
    thread, outcome = call_in_thread(connection, Header(opcode=Op.VDI_WRITE, count=4000),
                                     payload=payload)
    header, data = sheep.next()
    assert data == payload.tobytes()
    sheep.answer(header)
    thread.join(5)
    assert "reply" in outcome


@pytest.mark.parametrize("size", [16, 256 * 1024], ids=["small", "in-place"])
@pytest.mark.parametrize("forged", ["opcode", "not-a-reply"])
def test_a_frame_that_is_not_its_requests_reply_fails_the_call_and_the_connection(
        sheep, connection, forged, size):
    """A sheep (or anything holding the session key) answering a read with another
    op's reply, or with a request: never taken as the read's data, and the stream is
    given up (nothing after it can be trusted). A large reply is not received into the
    caller's buffer either."""
    into = memoryview(bytearray(b"\xee" * size))
    thread, outcome = call_in_thread(connection, Header(opcode=Op.VDI_READ, count=size),
                                     into=into)
    other, other_outcome = call_in_thread(connection, Header(opcode=Op.PING))
    header, _ = sheep.next()
    sheep.next()
    reply = header.reply()
    reply = (reply._replace(opcode=Op.VDI_WRITE) if forged == "opcode"
             else reply._replace(flags=reply.flags & ~proto.FLAG_REPLY))
    assert sheep.sealer is not None
    sheep.send_raw(proto.encode(reply, b"x" * size, sheep.sealer))
    thread.join(5)
    other.join(5)
    error = outcome["error"]
    assert isinstance(error, NetworkError), outcome
    expected = "carries opcode" if forged == "opcode" else "a request (opcode"
    assert expected in str(error) and f":{sheep.port}" in str(error), error
    assert bytes(into) == b"\xee" * size  # the forged data never landed
    assert isinstance(other_outcome["error"], NetworkError)  # the connection is over
    assert connection.closed


@pytest.mark.parametrize("forged", ["opcode", "not-a-reply"])
def test_the_asyncio_connection_fails_on_a_frame_that_is_not_its_requests_reply(sheep, forged):
    """The same check in the gateway's (and dog's) asyncio Connection."""
    from sheep.client import Connection

    async def run() -> None:
        connection = await Connection.open("127.0.0.1", sheep.port, sheep.credentials)
        read = connection.send(Header(opcode=Op.READ_OBJ, oid=1, count=8))
        ping = connection.send(Header(opcode=Op.PING))
        header, _ = await asyncio.to_thread(sheep.next)
        await asyncio.to_thread(sheep.next)
        reply = header.reply()
        reply = (reply._replace(opcode=Op.WRITE_OBJ) if forged == "opcode"
                 else reply._replace(flags=reply.flags & ~proto.FLAG_REPLY))
        assert sheep.sealer is not None
        sheep.send_raw(proto.encode(reply, b"forged!!", sheep.sealer))
        with pytest.raises(NetworkError, match="bad reply from .*(carries opcode|a request)"):
            await asyncio.wait_for(read, 5)
        with pytest.raises(NetworkError):
            await asyncio.wait_for(ping, 5)
        assert connection.closed

    asyncio.run(run())


def test_a_handshake_answer_for_another_step_fails_the_connection():
    """The handshake's own exchange checks its answers the same way."""
    server = DrivenSheep(forge_hello=True)
    try:
        with pytest.raises(NetworkError, match="bad handshake reply .*carries opcode"):
            BlockingConnection("127.0.0.1", server.port, server.credentials)
    finally:
        server.close()
