"""Keyrings, caps, the handshake and the frame sealer (sheep/auth.py), without sockets."""

from __future__ import annotations

import logging
import os
import random
import stat

import pytest

from sheep import auth, proto
from sheep.errors import AuthFailed, BadRequest, UsageError
from sheep.proto import Header, Op


def pair(key_client: bytes, key_server: bytes | None = None, mode: str = "sign",
         name: str = "client.web") -> tuple[auth.Sealer, auth.Sealer]:
    """A full handshake; (client sealer, server sealer)."""
    entry = auth.Entry(key_client if key_server is None else key_server,
                       auth.Caps.parse("rw vdi=web*"))
    server = auth.ServerHandshake(lambda n: entry if n == name else None, mode)
    client = auth.ClientHandshake(auth.Credentials(name, key_client))
    answer = server.hello(client.hello())
    principal = server.prove(client.answer(answer))
    assert principal == auth.Principal(name, entry.caps)
    return client.sealer(), server.sealer()


def frame(sealer: auth.Sealer, header: Header, payload: bytes) -> tuple[bytes, bytes]:
    """What goes on the wire: (packed header, the rest)."""
    wire = proto.encode(header, payload, sealer)
    return wire[:proto.HEADER_SIZE], wire[proto.HEADER_SIZE:]


def opened(sealer, opcode, packed, rest):
    """The payload of a frame received as (packed header, the rest)."""
    return bytes(sealer.open(opcode, memoryview(packed + rest), len(packed)))


def test_a_handshake_gives_both_sides_sealers_that_understand_each_other():
    key = auth.new_key()
    client, server = pair(key)
    header = Header(Op.VDI_WRITE, request_id=7, offset=4096, count=5)
    packed, rest = frame(client, header, b"hello")
    assert rest[:5] == b"hello"  # signed, not encrypted
    assert len(rest) == 5 + auth.TAG_BYTES
    assert proto.unpack_header(packed).length == 5 + auth.TAG_BYTES
    assert opened(server, Op.VDI_WRITE, packed, rest) == b"hello"
    reply = header.reply()
    packed, rest = frame(server, reply, b"")
    assert opened(client, reply.opcode, packed, rest) == b""


@pytest.mark.parametrize("unknown", [False, True])
def test_a_wrong_key_or_an_unknown_name_fails_alike_on_both_sides(unknown):
    entry = auth.Entry(auth.new_key(), auth.Caps(admin=True))
    server = auth.ServerHandshake(lambda n: None if unknown else entry, "sign")
    client = auth.ClientHandshake(auth.Credentials("client.admin", auth.new_key()))
    answer = server.hello(client.hello())
    with pytest.raises(AuthFailed, match="does not know this key"):
        client.answer(answer)
    # A client that ignores the server's failed proof still cannot prove itself.
    forged = {"proof": os.urandom(32).hex()}
    with pytest.raises(AuthFailed, match="wrong key or no such principal"):
        server.prove(forged)


def test_the_key_never_crosses_the_wire():
    key = auth.new_key()
    entry = auth.Entry(key, auth.Caps(admin=True))
    server = auth.ServerHandshake(lambda n: entry, "sign")
    client = auth.ClientHandshake(auth.Credentials("client.admin", key))
    messages = [client.hello()]
    messages.append(server.hello(messages[0]))
    messages.append(client.answer(messages[1]))
    wire = b"".join(proto.encode_json(m) for m in messages)
    assert key not in wire and key.hex().encode() not in wire
    assert auth.encode_key(key).encode() not in wire


def test_a_tampered_frame_is_refused():
    client, server = pair(auth.new_key())
    header = Header(Op.VDI_WRITE, request_id=1, count=4)
    packed, rest = frame(client, header, b"data")
    bad = bytearray(rest)
    bad[0] ^= 1
    with pytest.raises(BadRequest, match="integrity"):
        opened(server, Op.VDI_WRITE, packed, bytes(bad))
    client, server = pair(auth.new_key())
    packed, rest = frame(client, header, b"data")
    moved = proto.unpack_header(packed)._replace(offset=1 << 20).pack()  # the header too
    with pytest.raises(BadRequest, match="integrity"):
        opened(server, Op.VDI_WRITE, moved, rest)


def test_frames_replayed_reordered_or_from_another_session_are_refused():
    key = auth.new_key()
    client, server = pair(key)
    first = frame(client, Header(Op.PING, request_id=1), b"")
    second = frame(client, Header(Op.PING, request_id=2), b"")
    opened(server, Op.PING, *first)
    with pytest.raises(BadRequest):  # the first again: its counter has passed
        opened(server, Op.PING, *first)
    client, server = pair(key)
    first = frame(client, Header(Op.PING, request_id=1), b"")
    second = frame(client, Header(Op.PING, request_id=2), b"")
    with pytest.raises(BadRequest):  # out of order
        opened(server, Op.PING, *second)
    _, other_server = pair(key)  # same key, fresh nonces: fresh session keys
    client, _ = pair(key)
    with pytest.raises(BadRequest):
        opened(other_server, Op.PING, *frame(client, Header(Op.PING, request_id=1), b""))


def test_encrypted_sessions_and_key_carrying_ops_hide_their_payloads():
    secret = b"the VDI's bytes " * 64
    client, server = pair(auth.new_key(), mode="encrypt")
    packed, rest = frame(client, Header(Op.VDI_WRITE, count=len(secret)), secret)
    assert secret[:16] not in rest
    assert opened(server, Op.VDI_WRITE, packed, rest) == secret
    client, server = pair(auth.new_key(), mode="sign")  # signed only, but a key travels
    body = proto.encode_json({"key": auth.encode_key(auth.new_key())})
    packed, rest = frame(server, Header(Op.AUTH_ADD, flags=proto.FLAG_REPLY), body)
    assert body[:8] not in rest and len(rest) == len(body) + auth.TAG_BYTES
    assert opened(client, Op.AUTH_ADD, packed, rest) == body


SIZES = [0, 5, proto.FrameDecoder.direct_min_bytes - auth.TAG_BYTES,
         proto.FrameDecoder.direct_min_bytes + 1, 1 << 20]


@pytest.mark.parametrize("mode", ["sign", "encrypt"])
def test_a_sealed_decoder_opens_frames_whole_or_in_pieces(mode):
    """Staged and direct payloads, whole or cut anywhere: each frame comes out opened,
    its header's length the payload's, and the decoder holds nothing after."""
    rng = random.Random(5)
    for cut in (None, 1, 1000, 70000):
        client, server = pair(auth.new_key(), mode=mode)
        decoder = proto.FrameDecoder(1 << 21)
        decoder.seal(server)
        sent = [(Header(Op.VDI_WRITE, request_id=i, count=size), rng.randbytes(size))
                for i, size in enumerate(SIZES)]
        wire = b"".join(proto.encode(header, payload, client) for header, payload in sent)
        got = []
        step = cut or len(wire)
        for at in range(0, len(wire), step):
            got += decoder.feed(wire[at:at + step])
        assert [(h.request_id, h.length, bytes(p)) for h, p in got] == [
            (h.request_id, len(p), p) for h, p in sent]
        assert decoder.buffered_bytes == 0 and decoder.error is None


@pytest.mark.parametrize("mode", ["sign", "encrypt"])
@pytest.mark.parametrize("cut", [None, 1000, 70000])
def test_a_large_payload_lands_in_the_buffer_its_caller_placed(mode, cut):
    """place(header, length) names a buffer (nbdkit's, for a read): a payload of exactly
    its length comes out as it, signed (received into it) or encrypted (opened into it
    once whole); a buffer of another length is left alone. The decoder asks with the
    payload's length, tag excluded."""
    size = 1 << 20
    buffers = {1: memoryview(bytearray(size)), 2: memoryview(bytearray(size - 1))}
    asked: list[tuple[int, int]] = []

    def place(header: Header, length: int) -> memoryview | None:
        asked.append((header.request_id, length))
        return buffers.get(header.request_id)

    client, server = pair(auth.new_key(), mode=mode)
    decoder = proto.FrameDecoder(1 << 21, place)
    decoder.seal(server)
    data = random.Random(3).randbytes(size)
    wire = b"".join(proto.encode(Header(Op.VDI_READ, request_id=i, flags=proto.FLAG_REPLY),
                                 data, client) for i in (1, 2))
    step = cut or len(wire)
    got = []
    for at in range(0, len(wire), step):
        got += decoder.feed(wire[at:at + step])
    assert [bytes(payload) == data for _, payload in got] == [True, True]
    assert got[0][1] is buffers[1] and bytes(buffers[1]) == data
    assert got[1][1] is not buffers[2] and bytes(buffers[2]) == bytes(size - 1)
    assert asked == [(1, size), (2, size)]
    bad = bytearray(proto.encode(Header(Op.VDI_READ, request_id=1), data, client))
    bad[proto.HEADER_SIZE + 5] ^= 1
    with pytest.raises(proto.ProtocolError, match="integrity"):  # its call fails
        decoder.feed(bytes(bad))


@pytest.mark.parametrize("size", [4, proto.FrameDecoder.direct_min_bytes + 1])
def test_a_sealed_decoder_keeps_the_frames_before_a_tampered_one_and_breaks(size):
    client, server = pair(auth.new_key())
    decoder = proto.FrameDecoder()
    decoder.seal(server)
    good = proto.encode(Header(Op.PING, request_id=1), b"", client)
    bad = bytearray(proto.encode(Header(Op.VDI_WRITE, request_id=2, count=size),
                                 bytes(size), client))
    bad[-1] ^= 1
    frames = decoder.feed(good + bytes(bad))
    assert [h.request_id for h, _ in frames] == [1]
    assert decoder.error is not None and "integrity" in decoder.error.reason
    assert decoder.error.header is None  # a forged frame gets no answer
    with pytest.raises(proto.ProtocolError):
        decoder.feed(good)


def test_a_sealed_frame_without_room_for_its_tag_is_refused():
    _, server = pair(auth.new_key())
    decoder = proto.FrameDecoder()
    decoder.seal(server)
    with pytest.raises(proto.ProtocolError, match="no room for its tag"):
        decoder.feed(Header(Op.PING, length=auth.TAG_BYTES - 1).pack() + bytes(15))


def test_sealing_a_decoder_in_the_middle_of_a_frame_breaks_it():
    """A frame begun before the handshake's answer cannot be trusted after it."""
    _, server = pair(auth.new_key())
    decoder = proto.FrameDecoder()
    assert decoder.feed(Header(Op.PING, length=10).pack() + b"12345") == []
    with pytest.raises(proto.ProtocolError, match="before the handshake finished"):
        decoder.seal(server)


def test_caps_parse_and_match():
    caps = auth.Caps.parse("rw vdi=web* vdi=db")
    assert caps.may_touch("web1") and caps.may_touch("db") and not caps.may_touch("db2")
    assert not caps.read_only and not caps.privileged
    assert auth.Caps.parse(caps.text()) == caps
    assert auth.Caps.parse("ro vdi=x").read_only
    assert auth.Caps.parse("admin").may_touch("anything")
    for bad in ["", "rw", "rx vdi=a", "rw name=a", "rw vdi=a/b", "rw vdi=", 7, "rw vdi=" + "a" * 300]:
        with pytest.raises(ValueError):
            auth.Caps.parse(bad)


def test_names():
    assert auth.name_problem("client.web-1") is None and auth.name_problem("node") is None
    for bad in ["admin", "client.", "client.a b", "client./x", "client." + "a" * 64, None, 3]:
        assert auth.name_problem(bad) is not None


def test_keyrings_are_written_0600_and_read_back(tmp_path):
    path = str(tmp_path / "sub" / "keyring")
    key = auth.new_key()
    auth.write_keyring(path, {"client.web": auth.Entry(key, auth.Caps.parse("ro vdi=web*"))})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    entries = auth.load_keyring(path)
    assert entries["client.web"] == auth.Entry(key, auth.Caps.parse("ro vdi=web*"))
    auth.merge_into_keyring(path, "client.admin", auth.Entry(key, auth.Caps(admin=True)))
    assert set(auth.load_keyring(path)) == {"client.web", "client.admin"}
    with pytest.raises(FileExistsError):
        auth.write_keyring(path, {}, exclusive=True)


@pytest.mark.parametrize("text, problem", [
    ("[client.a]\nkey = nothex!\ncaps = admin\n", "not base64"),
    ("[client.a]\nkey = AAAA\ncaps = admin\n", "holds 3 bytes"),
    ("[client.a]\ncaps = admin\n", "has no key"),
    ("[bad name]\nkey = AAAA\n", "bad principal name"),
    ("not an ini file", "malformed"),
    ("[client.a]\nkey = " + auth.encode_key(bytes(32)) + "\ncaps = node\n", "only \\[node\\]"),
])
def test_malformed_keyrings_are_refused_naming_the_problem(tmp_path, text, problem):
    path = tmp_path / "keyring"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(auth.KeyringError, match=problem):
        auth.load_keyring(str(path))


def test_a_keyring_others_can_read_is_used_with_a_warning(tmp_path):
    path = str(tmp_path / "keyring")
    key = auth.new_key()
    auth.write_keyring(path, {"client.a": auth.Entry(key, auth.Caps(admin=True))})
    os.chmod(path, 0o644)
    # On the module's own logger: other tests may have configured logging (a sheep run
    # in process), so the root logger's capture is not to be relied on.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("sheep.auth")
    saved = logger.disabled, logger.level
    logger.disabled, logger.level = False, logging.WARNING
    logger.addHandler(handler)
    try:
        assert auth.load_keyring(path)["client.a"].key == key
    finally:
        logger.removeHandler(handler)
        logger.disabled, logger.level = saved
    assert any("chmod 600" in record.getMessage() for record in records)
    with pytest.raises(auth.KeyringError, match="cannot read"):
        auth.load_keyring(str(tmp_path / "missing"))
    with pytest.raises(auth.KeyringError, match="cannot read"):
        auth.load_keyring(str(tmp_path / "missing"))


def test_credentials_an_explicit_option_beats_the_environment(tmp_path, monkeypatch):
    admin, node, other = auth.new_key(), auth.new_key(), auth.new_key()
    mine, env = str(tmp_path / "mine"), str(tmp_path / "env")
    auth.write_keyring(mine, {"client.admin": auth.Entry(admin, auth.Caps(admin=True)),
                              "node": auth.Entry(node, auth.Caps(node=True))})
    auth.write_keyring(env, {"client.admin": auth.Entry(other, auth.Caps(admin=True)),
                             "client.x": auth.Entry(other, auth.Caps.parse("rw vdi=x"))})
    monkeypatch.setenv("DOG_KEYRING", env)
    monkeypatch.setenv("DOG_NAME", "client.x")
    assert auth.resolve_credentials() == auth.Credentials("client.x", other)
    assert auth.resolve_credentials(mine, "client.admin") == auth.Credentials("client.admin", admin)
    monkeypatch.delenv("DOG_NAME")
    assert auth.resolve_credentials(mine) == auth.Credentials("client.admin", admin)
    assert auth.resolve_credentials(mine, prefer_node=True) == auth.Credentials("node", node)
    with pytest.raises(auth.KeyringError, match=r"no \[client.nobody\] key"):
        auth.resolve_credentials(mine, "client.nobody")
    with pytest.raises(UsageError, match="bad principal name"):
        auth.resolve_credentials(mine, "root")


def test_without_a_keyring_the_one_box_clusters_node_key_is_found(tmp_path, monkeypatch):
    monkeypatch.delenv("DOG_KEYRING", raising=False)
    monkeypatch.delenv("DOG_NAME", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    os.makedirs(tmp_path / "run")
    with pytest.raises(auth.KeyringError, match="no keyring"):
        auth.resolve_credentials()
    from sheep.cluster.driver import default_local_directory

    node = auth.node_keyring(auth.cluster_keyring_path(default_local_directory()))
    assert auth.resolve_credentials() == auth.Credentials("node", node.key)
    admin = auth.new_key()
    auth.merge_into_keyring(auth.config_keyring_path(), "client.admin",
                            auth.Entry(admin, auth.Caps(admin=True)))
    assert auth.resolve_credentials() == auth.Credentials("client.admin", admin)
    assert auth.resolve_credentials(prefer_node=True) == auth.Credentials("node", node.key)
    # The first sheep makes the node keyring; the next ones read the same key.
    assert auth.node_keyring(auth.cluster_keyring_path(default_local_directory())) == node


@pytest.mark.parametrize("mode", ["sign", "encrypt"])
def test_an_authenticated_peers_large_frame_gets_buffers_as_its_bytes_come(mode):
    """A peer that authenticated and claims a large payload still gets buffers that
    grow with what it sent, not with what it claims (tests/integration/test_garbage:
    100 such claims that stall must not cost 100 x 64 MiB)."""
    client, server = pair(auth.new_key(), mode=mode)
    decoder = proto.FrameDecoder(1 << 27)
    decoder.seal(server)
    wire = proto.encode(Header(Op.VDI_WRITE, request_id=1), bytes(64 << 20), client)
    assert decoder.feed(wire[:proto.HEADER_SIZE + 1000]) == []
    assert len(decoder.get_buffer()) <= proto.FrameDecoder.direct_min_bytes


@pytest.mark.parametrize("cuts", [[], [1], [70000, 70010], [(1 << 20) - 3], [(1 << 20) + 5],
                                  [1 << 19, (1 << 20) + 15]])
def test_an_encrypted_payload_in_pieces_cut_anywhere_opens_into_the_callers_buffer(cuts):
    """Sealer.open_into decrypts piece by piece, nothing joined, a cut inside the tag
    included; a wrong tag fails it."""
    client, server = pair(auth.new_key(), mode="encrypt")
    payload = random.Random(7).randbytes(1 << 20)
    header = Header(Op.VDI_READ, request_id=1, flags=proto.FLAG_REPLY)
    wire = proto.encode(header, payload, client)
    head, rest = wire[:proto.HEADER_SIZE], wire[proto.HEADER_SIZE:]
    bounds = [0, *cuts, len(rest)]
    pieces = [bytearray(rest[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    into = memoryview(bytearray(len(payload)))
    assert server.open_into(header.opcode, head, pieces, into) is into
    assert bytes(into) == payload
    client, server = pair(auth.new_key(), mode="encrypt")
    wire = bytearray(proto.encode(header, payload, client))
    wire[-1] ^= 1
    with pytest.raises(BadRequest, match="integrity"):
        server.open_into(header.opcode, bytes(wire[:proto.HEADER_SIZE]),
                         [wire[proto.HEADER_SIZE:]], None)
