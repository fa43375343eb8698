"""A structure-aware fuzzer of the sheep protocol, against real sheep processes.

Frames are built from the op table with boundary and random header fields and
payloads (JSON right, wrong, deep or huge; data of odd lengths), and sent both
before the handshake (a stranger) and after it, sealed, as the most privileged
principal (the node key: every op reaches its handler). Whatever comes, the sheep
must stay up, answer or close, keep its memory bounded, and serve an honest client
after it. Run it longer by hand: SHEEP_FUZZ_EXAMPLES=5000 pytest tests/integration/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sheep import auth, proto
from sheep.oid import ObjectType, make_oid
from sheep.proto import FLAGS_KNOWN, Header, Op
from sheep.testing.cluster import LocalCluster, raw_handshake

examples = int(os.environ.get("SHEEP_FUZZ_EXAMPLES", "150"))
MiB = 1 << 20

u64 = st.one_of(st.sampled_from([0, 1, 2, 4095, 4096, 2**31, 2**32 - 1, 2**32, 2**63 - 1,
                                 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
u32 = st.one_of(st.sampled_from([0, 1, 4095, 4096, 4 * MiB, 2**31, 2**32 - 1]),
                st.integers(0, 2**32 - 1))
oids = st.one_of(u64, st.builds(lambda kind, vid, index: make_oid(kind, vid, index),
                                st.sampled_from(list(ObjectType)), st.integers(0, 2**24 - 1),
                                st.integers(0, 2**32 - 1)))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=True), st.text(max_size=300),
                      st.sampled_from(["v0", "web1", "..", "/", "a/b", "", "x" * 5000,
                                       "client.admin", "node", "admin"]))
json_values = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=20)
keys = st.sampled_from(["name", "size", "copies", "object_size", "force", "snapshot", "tag",
                        "source", "writable", "owner", "oids", "nodes", "max_rate",
                        "node_id", "weight", "key", "value", "index", "iops", "bps", "burst",
                        "clear", "caps", "names", "usage", "interval", "exclusive", "encrypt"])
json_objects = st.dictionaries(keys, json_values, max_size=6)


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


payloads = st.one_of(
    st.just(b""),
    st.binary(max_size=600),
    json_objects.map(lambda value: json.dumps(value).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.integers(100, 200000).map(_deep),
    st.sampled_from([b"{", b"nul\x00l", b'{"name": "\xff"}', b"x" * 70000]),
)
# What the node may rightly do to stop a sheep is not fuzzed as the node.
stopping = {Op.SHUTDOWN, Op.KILL_NODE}
frames = st.tuples(
    st.sampled_from([int(op) for op in Op if op not in stopping] + [0, 0x7F, 0xFF]),
    st.one_of(st.just(0), st.integers(0, 0xFFFF), st.sampled_from(
        [FLAGS_KNOWN, proto.FLAG_SPARSE, proto.FLAG_FUA, proto.FLAG_DIRECT, proto.FLAG_REPLY])),
    u32, oids, u64, u32, u64, u64, payloads)


class Link:
    """One connection to a sheep, authenticated (sealed frames) or not."""

    def __init__(self, port: int, credentials: auth.Credentials | None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.decoder = proto.FrameDecoder()
        self.sealer: auth.Sealer | None = None
        self.closed = False
        if credentials is not None:
            self.sealer = raw_handshake(self.call, credentials, self.decoder)

    def send(self, header: Header, payload: bytes) -> None:
        data = proto.encode(header, payload, self.sealer)
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def receive(self) -> tuple[Header, bytes] | None:
        """The next frame, or None once the sheep closed the connection."""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                return None
            frames = self.decoder.feed(data)
            if frames:
                header, body = frames[0]
                assert len(frames) == 1
                return header, bytes(body)

    def call(self, header: Header, payload: bytes = b"") -> tuple[Header, bytes]:
        self.send(header._replace(length=len(payload)), payload)
        frame = self.receive()
        assert frame is not None, "closed"
        return frame

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(str(tmp_path_factory.mktemp("fuzz")), nodes=2) as local:
        local.start()
        local.format(copies=2)
        with local.client(0) as client:
            client.vdi_create("v0", 8 * MiB)
            client.vdi_snapshot("v0", "s")
            client.create_and_write(make_oid(ObjectType.RAW, 5, 0), b"kept")
        yield local


def rss(cluster: LocalCluster, index: int) -> int:
    process = cluster.sheep[index].process
    assert process is not None
    with open(f"/proc/{process.pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def fuzz(cluster: LocalCluster, connect: Callable[[], Link]) -> None:
    """Drive hypothesis over frames on links from connect(); after each, the sheep must
    be up and answer a PING on a fresh link."""
    baseline = rss(cluster, 0)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(frames)
    def one(frame: tuple) -> None:
        opcode, flags, epoch, oid, offset, count, arg0, arg1, payload = frame
        link = connect()
        try:
            link.send(Header(opcode, request_id=7, flags=flags, epoch=epoch, oid=oid,
                             offset=offset, length=len(payload), count=count, arg0=arg0,
                             arg1=arg1), payload)
            # An answer, or a close: never a hang (the socket's timeout fails the test).
            reply = link.receive()
            if reply is not None:
                assert reply[0].is_reply and reply[0].request_id == 7
        finally:
            link.close()
        for node in cluster.sheep:
            assert node.alive, f"sheep {node.index} died on {frame!r:.300}"

    one()
    with cluster.client(0) as client:
        assert client.ping()["joined"]
        assert client.read(make_oid(ObjectType.RAW, 5, 0), 0, 4) == b"kept"
        client.create_and_write(make_oid(ObjectType.RAW, 5, 1), b"after")
    with cluster.client(1) as client:
        assert client.read(make_oid(ObjectType.RAW, 5, 1), 0, 5) == b"after"
    assert rss(cluster, 0) - baseline < 200 * MiB


def test_fuzzed_frames_before_the_handshake(cluster):
    fuzz(cluster, lambda: Link(cluster.sheep[0].port, None))


def test_fuzzed_frames_after_the_handshake_as_the_node(cluster):
    fuzz(cluster, lambda: Link(cluster.sheep[0].port, cluster.credentials))
