"""The wire protocol without sockets: headers, framing, request checks, JSON."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sheep import constants
from sheep.errors import BadRequest, Result
from sheep.proto import (
    FLAG_FUA,
    FLAG_REPLY,
    FLAG_SPARSE,
    HEADER_SIZE,
    OPS,
    Caller,
    FrameDecoder,
    Header,
    Kind,
    Op,
    Payload,
    ProtocolError,
    check_handlers,
    decode_extents,
    decode_json,
    encode,
    encode_extents,
    encode_extents_into,
    encode_json,
    extent_table_bytes,
    extents_bytes,
    request_problem,
    unpack_header,
)

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

headers = st.builds(
    Header, opcode=u8, request_id=u32, flags=u16, result=u16, epoch=u32, oid=u64,
    offset=u64, length=u32, count=u32, arg0=u64, arg1=u64, magic=u16, version=u8)


def frame(request_id: int, payload: bytes = b"", opcode: Op = Op.WRITE_OBJ) -> bytes:
    return encode(Header(opcode=opcode, request_id=request_id, count=len(payload)), payload)


def some_frames() -> tuple[bytes, list[tuple[int, bytes]]]:
    """Three frames back to back, and the (request id, payload) of each."""
    expected = [(1, b"hello"), (2, b""), (3, bytes(range(256)) * 5)]
    return b"".join(frame(request_id, payload) for request_id, payload in expected), expected


def summary(frames: list[tuple[Header, bytes]]) -> list[tuple[int, bytes]]:
    return [(header.request_id, payload) for header, payload in frames]


# --- header ------------------------------------------------------------------

@given(headers)
def test_header_round_trip(header):
    packed = header.pack()
    assert len(packed) == HEADER_SIZE
    assert unpack_header(packed) == header
    assert unpack_header(b"xyz" + packed, 3) == header


def test_reply_keeps_request_identity():
    request = Header(opcode=Op.READ_OBJ, request_id=42, epoch=7, oid=99, count=4096)
    reply = request.reply(Result.NO_OBJ)
    assert reply.is_reply and not request.is_reply
    assert (reply.opcode, reply.request_id, reply.epoch, reply.oid) == (Op.READ_OBJ, 42, 7, 99)
    assert reply.result == Result.NO_OBJ
    assert reply.flags & FLAG_REPLY


def test_encode_sets_length_from_payload():
    data = encode(Header(opcode=Op.WRITE_OBJ, length=12345), b"abc")
    assert unpack_header(data).length == 3
    assert data[HEADER_SIZE:] == b"abc"


# --- framing -----------------------------------------------------------------

def test_decoder_whole_frames():
    data, expected = some_frames()
    decoder = FrameDecoder()
    frames = []
    for request_id, payload in expected:
        frames += decoder.feed(frame(request_id, payload))
    assert summary(frames) == expected
    assert decoder.buffered_bytes == 0


def test_decoder_one_byte_at_a_time():
    data, expected = some_frames()
    decoder = FrameDecoder()
    frames = []
    for position in range(len(data)):
        frames += decoder.feed(data[position:position + 1])
    assert summary(frames) == expected
    assert decoder.buffered_bytes == 0


def test_decoder_several_frames_at_once_with_trailing_partial_bytes():
    data, expected = some_frames()
    tail = frame(4, b"the rest")
    decoder = FrameDecoder()
    assert summary(decoder.feed(data + tail[:HEADER_SIZE + 3])) == expected
    assert decoder.buffered_bytes == HEADER_SIZE + 3  # the header stays until its payload
    assert summary(decoder.feed(memoryview(tail)[HEADER_SIZE + 3:])) == [(4, b"the rest")]
    assert decoder.buffered_bytes == 0


def test_decoder_partial_header_waits():
    decoder = FrameDecoder()
    assert decoder.feed(frame(1)[:HEADER_SIZE - 1]) == []
    assert decoder.buffered_bytes == HEADER_SIZE - 1


@given(st.lists(st.binary(max_size=300), max_size=5), st.data())
@settings(max_examples=50)
def test_decoder_any_split(payloads, data):
    stream = b"".join(frame(number, payload) for number, payload in enumerate(payloads))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    frames = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        frames += decoder.feed(stream[start:end])
    assert summary(frames) == list(enumerate(payloads))


def bad_header_frame(**fields: int) -> bytes:
    return Header(opcode=Op.PING, request_id=5, **fields).pack()


@pytest.mark.parametrize(("fields", "reason", "header_known"), [
    ({"magic": 0x1234}, "bad magic 0x1234", False),
    ({"version": 9}, "unsupported protocol version 9", True),
    ({"length": 2**32 - 1}, f"payload length {2**32 - 1} exceeds", True),
    ({"length": constants.payload_max_bytes + 1}, "exceeds", True),
])
def test_decoder_rejects_unframeable_headers(fields, reason, header_known):
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as raised:
        decoder.feed(bad_header_frame(**fields) + b"x" * 100)
    assert reason in raised.value.reason
    assert (raised.value.header is not None) == header_known
    if header_known:
        assert raised.value.header.request_id == 5
    # Nothing near the announced length was buffered or allocated.
    assert decoder.buffered_bytes <= HEADER_SIZE + 100
    # A broken stream stays broken.
    with pytest.raises(ProtocolError):
        decoder.feed(frame(6))
    with pytest.raises(ProtocolError):
        decoder.feed(b"")


def test_decoder_own_payload_limit():
    decoder = FrameDecoder(payload_max_bytes=1024)
    assert len(decoder.feed(frame(1, b"x" * 1024))) == 1
    with pytest.raises(ProtocolError, match="exceeds 1024"):
        decoder.feed(frame(2, b"x" * 1025))


def test_decoder_huge_length_allocates_nothing():
    decoder = FrameDecoder()
    header = Header(opcode=Op.WRITE_OBJ, length=constants.payload_max_bytes).pack()
    # A legal but large length: the decoder waits for the payload without
    # reserving room for it.
    assert decoder.feed(header) == []
    assert decoder.buffered_bytes == 0
    assert decoder.feed(b"x" * 10) == []
    assert decoder.buffered_bytes == 10


def test_decoder_keeps_good_frames_before_a_bad_one():
    decoder = FrameDecoder()
    try:
        frames = decoder.feed(frame(1, b"ok") + bad_header_frame(magic=0))
    except ProtocolError:
        frames = []
    assert summary(frames) == [(1, b"ok")]


# --- request checks ----------------------------------------------------------

def test_well_formed_requests_pass():
    assert request_problem(Header(opcode=Op.READ_OBJ, count=4096, offset=4096)) is None
    assert request_problem(Header(opcode=Op.WRITE_OBJ, count=512, length=512)) is None
    assert request_problem(Header(opcode=Op.FORMAT, length=100)) is None
    assert request_problem(Header(opcode=Op.PING, flags=FLAG_REPLY)) is None
    assert request_problem(Header(
        opcode=Op.WRITE_OBJ, flags=FLAG_FUA, offset=constants.object_size_max_bytes - 1,
        count=1, length=1)) is None


def test_unknown_opcode():
    result, reason = request_problem(Header(opcode=0xEE))
    assert result == Result.UNKNOWN_OP
    assert "0xee" in reason


def test_unknown_flags():
    result, reason = request_problem(Header(opcode=Op.PING, flags=0x8000))
    assert result == Result.BAD_REQUEST
    assert "0x8000" in reason


@pytest.mark.parametrize("op", [op for op, info in OPS.items() if info.request is Payload.NONE])
def test_payload_on_a_no_payload_op(op):
    result, reason = request_problem(Header(opcode=op, length=1))
    assert result == Result.BAD_REQUEST
    assert OPS[op].name in reason and "no payload" in reason


def test_json_payload_too_large():
    header = Header(opcode=Op.FORMAT, length=constants.payload_control_max_bytes + 1)
    assert request_problem(header)[0] == Result.BAD_REQUEST


@pytest.mark.parametrize("op", [Op.WRITE_OBJ, Op.CREATE_AND_WRITE_OBJ, Op.WRITE_PEER])
def test_count_differs_from_length_on_data_ops(op):
    result, reason = request_problem(Header(opcode=op, count=4096, length=4095))
    assert result == Result.BAD_REQUEST
    assert "4096" in reason and "4095" in reason


@pytest.mark.parametrize(("offset", "count"), [
    (constants.object_size_max_bytes, 1),
    (0, constants.object_size_max_bytes + 1),
    (2**64 - 1, 1),
])
def test_range_past_the_largest_object(offset, count):
    result, reason = request_problem(Header(opcode=Op.READ_OBJ, offset=offset, count=count))
    assert result == Result.INVALID_PARMS
    assert str(offset) in reason


# --- JSON payloads -----------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20)


@given(json_values)
def test_json_round_trip(value):
    encoded = encode_json(value)
    assert decode_json(encoded) == value
    assert decode_json(memoryview(encoded)) == value


def test_json_is_canonical():
    assert encode_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'


@pytest.mark.parametrize("garbage", [b"", b"{", b"\xff\xfe\x00", b"nope", b'{"a":}', b"[1,]",
                                     b"NaN", b'{"copies": Infinity}', b"[-Infinity]",
                                     b"1" * 5000])
def test_decode_json_garbage(garbage):
    with pytest.raises(BadRequest, match="malformed JSON"):
        decode_json(garbage)


def test_decode_json_deep_nesting():
    with pytest.raises(BadRequest):
        decode_json(b"[" * 100_000)


@given(st.lists(st.sampled_from([0, 10, 65_536, 65_537, 70_000, 300_000, 2_200_000]),
                max_size=6),
       st.data())
@settings(max_examples=30, deadline=None)
def test_decoder_large_payloads_received_in_place_any_split(sizes, data):
    """Payloads above direct_min_bytes go to a buffer of their own (get_buffer hands
    it out); whatever the chunking, the frames come out whole and in order."""
    payloads = [bytes([number % 251]) * size for number, size in enumerate(sizes)]
    stream = b"".join(frame(number, payload) for number, payload in enumerate(payloads))
    decoder = FrameDecoder()
    frames = []
    position = 0
    while position < len(stream):
        buffer = decoder.get_buffer()
        count = min(len(buffer), data.draw(st.integers(1, 400_000)), len(stream) - position)
        buffer[:count] = stream[position:position + count]
        position += count
        frames += decoder.buffer_updated(count)
    assert summary(frames) == list(enumerate(payloads))
    assert decoder.buffered_bytes == 0


# --- who may send which op ----------------------------------------------------------------


def test_every_op_names_the_caller_it_needs():
    assert all(isinstance(info.caller, Caller) for info in OPS.values())
    replica_traffic = {op for op in Op if op.name.endswith("_PEER") and op is not Op.LIST_PEER}
    assert {op for op, info in OPS.items() if info.caller is Caller.PEER} == replica_traffic
    assert OPS[Op.FORMAT].caller is Caller.ADMIN and OPS[Op.VDI_WRITE].caller is Caller.CLIENT
    assert OPS[Op.NODE_LIST].caller is Caller.CLIENT, "the NBD plugin lists nodes to fail over"


def test_check_handlers_fires_for_a_missing_or_an_unexpected_op():
    peer_ops = {op for op, info in OPS.items() if info.kind is Kind.PEER}
    table = dict.fromkeys(peer_ops, "handler")
    check_handlers(table, {Kind.PEER}, "Peer.handlers")
    del table[Op.STAT_PEER]
    with pytest.raises(AssertionError, match=r"Peer.handlers .* missing \['STAT_PEER'\]"):
        check_handlers(table, {Kind.PEER}, "Peer.handlers")
    table[Op.STAT_PEER] = table[Op.READ_OBJ] = "handler"
    with pytest.raises(AssertionError, match=r"unexpected \['READ_OBJ'\]"):
        check_handlers(table, {Kind.PEER}, "Peer.handlers")


@pytest.mark.parametrize("kind", [Kind.PEER, Kind.GATEWAY, Kind.ADMIN, Kind.VDI, Kind.VDI_ADMIN])
def test_an_op_added_without_a_handler_fails_at_construction(monkeypatch, tmp_path, kind):
    """As if an op of this kind were added to the table and nobody wrote its handler:
    here an op of another kind is moved over."""
    from sheep.cluster.memory import MemoryBus, MemoryDriver
    from sheep.cluster_state import ClusterState
    from sheep.daemon import Sheep, SheepConfig
    from sheep.gateway import Gateway, PeerPool
    from sheep.group import Group
    from sheep.peer import Peer
    from sheep.store import Store
    from sheep.vdi_service import VdiService

    op = Op.PING if kind is Kind.VDI_ADMIN else Op.VDI_UNLOCK
    monkeypatch.setitem(OPS, op, dataclasses.replace(OPS[op], kind=kind))
    group = Group(ClusterState())
    store = Store(str(tmp_path))
    builders = {
        Kind.PEER: lambda: Peer(store, group),
        Kind.GATEWAY: lambda: Gateway(group, Peer(store, group), "n", PeerPool()),
        Kind.ADMIN: lambda: Sheep(SheepConfig(str(tmp_path)), store, MemoryDriver(MemoryBus())),
        Kind.VDI: lambda: VdiService(group, None, "n", None, None),  # type: ignore[arg-type]
    }
    builders[Kind.VDI_ADMIN] = builders[Kind.VDI]
    with pytest.raises(AssertionError, match=rf"does not match the op table: missing \['{op.name}'\]"):
        builders[kind]()


# --- sparse copies (FLAG_SPARSE) -----------------------------------------------------

sparse_object_size = 1 << 20
block = constants.block_size_bytes


def sparse_payload(*entries: tuple[int, int], data: bytes | None = None,
                   count: int | None = None) -> bytes:
    """An extent table as the encoder lays it out, with data that fits it unless given."""
    table = struct.pack("<I", len(entries) if count is None else count)
    for offset, length in entries:
        table += struct.pack("<II", offset, length)
    body = bytes(sum(length for _, length in entries)) if data is None else data
    return table + body


def test_extents_round_trip() -> None:
    first, second = bytes(range(256)) * 16, b"\xab" * (3 * block)
    extents = [(0, memoryview(first)), (5 * block, memoryview(second))]
    payload = encode_extents(extents)
    assert len(payload) == 4 + 2 * 8 + len(first) + len(second)
    decoded = decode_extents(payload, sparse_object_size)
    assert [(offset, bytes(data)) for offset, data in decoded] == [
        (0, first), (5 * block, second)]
    assert extents_bytes(decoded) == len(first) + len(second)
    # An object of zeros is no extent at all; a whole object is one.
    assert decode_extents(encode_extents([]), sparse_object_size) == []
    whole = decode_extents(encode_extents([(0, memoryview(bytes(sparse_object_size)))]),
                           sparse_object_size)
    assert [(offset, len(data)) for offset, data in whole] == [(0, sparse_object_size)]


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "no extent count"),
    (b"\x01\x00", "no extent count"),
    (sparse_payload(count=1), "do not fit"),  # a table shorter than its count
    (sparse_payload(count=2**32 - 1), "do not fit"),  # a hostile count: nothing allocated
    (sparse_payload(*[(index * 2 * block, block) for index in range(129)]), "do not fit"),
    (sparse_payload((1, block)), "not whole blocks"),
    (sparse_payload((0, block + 1)), "not whole blocks"),
    (sparse_payload((0, 0)), "not whole blocks"),
    (sparse_payload((block, block), (0, block)), "not whole blocks"),  # out of order
    (sparse_payload((0, 2 * block), (block, block)), "not whole blocks"),  # overlapping
    (sparse_payload((sparse_object_size, block)), "not whole blocks"),  # past the end
    (sparse_payload((2**32 - block, block)), "not whole blocks"),
    (sparse_payload((0, block), data=bytes(block - 1)), "cut short"),
    (sparse_payload((0, block), data=bytes(block + 1)), "past the last extent"),
])
def test_malformed_sparse_copies_are_bad_requests(payload: bytes, reason: str) -> None:
    small = 128 * block  # 512 KiB: at most 128 extents
    with pytest.raises(BadRequest, match=reason):
        decode_extents(payload, small)


def test_sparse_copies_of_impossible_objects_are_bad_requests() -> None:
    for size in (0, block + 1, constants.object_size_max_bytes * 2):
        with pytest.raises(BadRequest, match="no object"):
            decode_extents(encode_extents([]), size)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=3 * block))
def test_any_sparse_payload_decodes_to_a_valid_copy_or_is_a_bad_request(
        table: bytes, body: bytes) -> None:
    """Whatever bytes arrive: either BadRequest, or extents that are whole blocks, in
    order, inside the object, and that account for every byte of the payload."""
    try:
        extents = decode_extents(table + body, 16 * block)
    except BadRequest:
        return
    end = 0
    for offset, data in extents:
        assert offset % block == 0 and len(data) % block == 0 and len(data)
        assert end <= offset and offset + len(data) <= 16 * block
        end = offset + len(data)
    assert 4 + 8 * len(extents) + extents_bytes(extents) == len(table + body)


def test_flag_sparse_is_for_whole_object_reads_and_creates() -> None:
    read = Header(opcode=Op.READ_PEER, count=4 << 20, flags=FLAG_SPARSE)
    assert request_problem(read) is None
    # A sparse create's payload is the extents, not count bytes of data.
    create = Header(opcode=Op.CREATE_AND_WRITE_OBJ, count=4 << 20, length=12,
                    flags=FLAG_SPARSE)
    assert request_problem(create) is None
    assert request_problem(create._replace(flags=0))[0] == Result.BAD_REQUEST
    write = Header(opcode=Op.WRITE_OBJ, count=12, length=12, flags=FLAG_SPARSE)
    assert request_problem(write) == (Result.BAD_REQUEST, "write_obj takes no FLAG_SPARSE")
    problem = request_problem(read._replace(offset=block))
    assert problem is not None and problem[0] == Result.INVALID_PARMS
    # A sparse payload of the largest object, with the largest table, can be framed.
    assert constants.payload_max_bytes >= (constants.object_size_max_bytes
                                           + constants.extent_table_max_bytes)


def test_extents_encoded_in_place_are_the_same_payload() -> None:
    room = extent_table_bytes(sparse_object_size)
    assert room == 4 + 8 * (sparse_object_size // block)
    first, second = b"\x01" * block, b"\x02" * (2 * block)
    buffer = bytearray(room) + first + second
    view = memoryview(buffer)
    extents = [(block, view[room:room + block]), (8 * block, view[room + block:])]
    payload = encode_extents_into(buffer, room, extents)
    assert bytes(payload) == encode_extents([(block, memoryview(first)),
                                             (8 * block, memoryview(second))])
