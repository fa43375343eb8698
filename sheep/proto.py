"""The sheep wire protocol, sans-IO: no sockets, no asyncio, no clocks.

Every message, request or reply, is one fixed 56-byte header followed by
``length`` bytes of payload. The header is one precompiled struct:

    magic u16, version u8, opcode u8, flags u16, result u16,
    request_id u32, epoch u32, oid u64, offset u64,
    length u32 (payload bytes that follow), count u32 (bytes asked to read),
    arg0 u64, arg1 u64 (op-specific words)

Replies reuse the request's opcode and request id, set FLAG_REPLY and carry a
result code; a failed reply's payload is a UTF-8 message naming the problem.
Requests are pipelined and answered out of order, matched by request id.

Data travels raw; control payloads are JSON. Limits are checked on the header
before a single payload byte is buffered, so a hostile length costs nothing.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from sheep import auth, constants
from sheep.errors import BadRequest, Result, SheepError

HEADER = struct.Struct("<HBBHHIIQQIIQQ")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 56

FLAG_REPLY = 0x0001
FLAG_FUA = 0x0002  # the write is on stable storage before it is acknowledged
FLAG_DIRECT = 0x0004  # gateway ops: serve from this node's store only (admin, tests)
FLAG_SCRUB = 0x0008  # STAT: verify every block of the copy first (a scrub)
# READ, CREATE_AND_WRITE of a whole object: its data travels as extents (see
# encode_extents), so a copy of a sparse object moves and allocates only its data.
FLAG_SPARSE = 0x0010
# STAT: the reply's "map" is the copy's allocation, a hex mask of 4 KiB blocks
# (sheep/changes.py): block status, diffs and du at that granularity.
FLAG_MAP = 0x0020
FLAGS_KNOWN = FLAG_REPLY | FLAG_FUA | FLAG_DIRECT | FLAG_SCRUB | FLAG_SPARSE | FLAG_MAP


class Payload(enum.Enum):
    NONE = "none"
    DATA = "data"
    JSON = "json"


class Kind(enum.Enum):
    GATEWAY = "gateway"  # object ops from clients: the receiver fans out to replicas
    PEER = "peer"  # object ops between sheep: the receiver serves from its store
    ADMIN = "admin"  # cluster and node management
    VDI = "vdi"  # byte I/O on an open VDI (arg0 = handle, offset = byte in the VDI)
    VDI_ADMIN = "vdi_admin"  # VDI management: JSON in, JSON out
    AUTH = "auth"  # the handshake: served by the connection itself, before any op (sheep/net.py)


class Caller(enum.Enum):
    """Who may send an op: the capability it needs. Kind says who serves an op; this
    says who may ask for it, and is what a connection's credentials are checked
    against (today only PEER is: by the connection's address, in Sheep.dispatch)."""

    CLIENT = "client"  # VDI and object I/O, VDI management, reading the cluster's state
    PEER = "peer"  # replica traffic between sheep: cluster members only
    ADMIN = "admin"  # changes to the cluster or a node, repairs, inventories, forced unlocks


@dataclass(frozen=True)
class OpInfo:
    name: str
    kind: Kind
    request: Payload
    reply: Payload
    caller: Caller


class Op(enum.IntEnum):
    CREATE_AND_WRITE_OBJ = 0x01
    READ_OBJ = 0x02
    WRITE_OBJ = 0x03
    REMOVE_OBJ = 0x04
    DISCARD_OBJ = 0x05
    FLUSH = 0x06
    STAT_OBJ = 0x07
    CHECK_OBJS = 0x08  # JSON {"oids": [...]}: bring each object back to N good copies

    CREATE_AND_WRITE_PEER = 0x11
    READ_PEER = 0x12
    WRITE_PEER = 0x13
    REMOVE_PEER = 0x14
    DISCARD_PEER = 0x15
    FLUSH_PEER = 0x16
    STAT_PEER = 0x17
    LIST_PEER = 0x18  # the oids this node stores (JSON list)

    CLUSTER_INFO = 0x21
    FORMAT = 0x22
    SHUTDOWN = 0x23
    NODE_INFO = 0x24
    NODE_LIST = 0x25
    KILL_NODE = 0x26
    PING = 0x27
    FORCE_RECOVER = 0x28
    SET_RECOVERY = 0x29  # JSON {"max_rate": bytes/s}, for every sheep, through the log
    REWEIGHT = 0x2A  # JSON {"node_id": ..., "weight": bytes or null (capacity)}; 0 drains
    SET_SCRUB = 0x2B  # JSON {"max_rate": bytes/s, "interval": s}: the background scrub
    ALTER_COPY = 0x2C  # JSON {"copies": n}: the cluster's default copies (dog cluster alter-copy)

    VDI_OPEN = 0x31
    VDI_CLOSE = 0x32
    VDI_READ = 0x33
    VDI_WRITE = 0x34
    VDI_DISCARD = 0x35
    VDI_EXTENTS = 0x36

    VDI_CREATE = 0x41
    VDI_DELETE = 0x42
    VDI_SNAPSHOT = 0x43
    VDI_CLONE = 0x44
    VDI_ROLLBACK = 0x45
    VDI_RESIZE = 0x46
    VDI_LIST = 0x47
    VDI_SETATTR = 0x48
    VDI_GETATTR = 0x49
    VDI_OBJECT = 0x4A
    VDI_UNLOCK = 0x4B
    VDI_QOS = 0x4C  # JSON {"name", "iops"?, "bps"?, "burst"?, "clear"?}: a VDI's I/O limits
    # JSON {"name", "from_session", "node_id", "session", "owner"} -> {"granted", "why"?}:
    # sent to the lock holder's sheep by a contender's (VdiService.handoff)
    VDI_HANDOFF = 0x4D
    VDI_ATTACHMENTS = 0x4E  # JSON {} -> [{"name", "mode", "holds_lock", "owner", ...}]
    # JSON {"name", "snapshot"?, "from"?, "offset", "length"} -> {"size", "ranges":
    # [[offset, length, "data" | "zero"], ...]}: what changed (sheep/vdi_diff.py)
    VDI_DIFF = 0x4F
    # JSON {"name"?} -> [{"name", "provisioned", "used", "exclusive", ..., "images":
    # [{"tag", "id", "snapshot", "used", "exclusive", ...}]}] (sheep/vdi_du.py)
    VDI_DU = 0x50
    # JSON {"name", "action": "mv" | "restore", "expires_in"?}: dog vdi trash
    VDI_TRASH = 0x59
    VDI_ALTER_COPY = 0x5A  # JSON {"name", "copies"}: the VDI's own copies (dog vdi alter-copy)
    VDI_RENAME = 0x5B  # JSON {"name", "new_name"}: snapshots and clones' parent follow
    # JSON {"name"} -> {"name", "id", "size", "copies", "lock", "snapshots", "usage", ...}
    VDI_INFO = 0x5C

    AUTH_HELLO = 0x51  # JSON {"name", "nonce"} -> {"nonce", "mode", "proof"} (sheep/auth.py)
    AUTH_PROVE = 0x52  # JSON {"proof"} -> {"principal", "caps"}; sealed frames from then on
    AUTH_ADD = 0x53  # JSON {"name", "caps"} -> {"name", "key", "caps"}: a new principal
    AUTH_RM = 0x54  # JSON {"name"}: the principal is gone, its connections are cut
    AUTH_ROTATE = 0x55  # JSON {"name"} -> {"name", "key", "caps"}: a new key, the old one void
    AUTH_LIST = 0x56  # -> [{"name", "caps"}]: principals, never their keys
    AUTH_GET = 0x57  # JSON {"name"} -> {"name", "key", "caps"}: a principal's keyring section


_NONE, _DATA, _JSON = Payload.NONE, Payload.DATA, Payload.JSON  # the table's columns fit a line

OPS: dict[Op, OpInfo] = {
    Op.CREATE_AND_WRITE_OBJ: OpInfo("create_and_write_obj", Kind.GATEWAY, _DATA, _NONE, Caller.CLIENT),
    Op.READ_OBJ: OpInfo("read_obj", Kind.GATEWAY, _NONE, _DATA, Caller.CLIENT),
    Op.WRITE_OBJ: OpInfo("write_obj", Kind.GATEWAY, _DATA, _NONE, Caller.CLIENT),
    Op.REMOVE_OBJ: OpInfo("remove_obj", Kind.GATEWAY, _NONE, _NONE, Caller.CLIENT),
    Op.DISCARD_OBJ: OpInfo("discard_obj", Kind.GATEWAY, _NONE, _NONE, Caller.CLIENT),
    Op.FLUSH: OpInfo("flush", Kind.GATEWAY, _NONE, _NONE, Caller.CLIENT),
    Op.STAT_OBJ: OpInfo("stat_obj", Kind.GATEWAY, _NONE, _JSON, Caller.CLIENT),
    Op.CHECK_OBJS: OpInfo("check_objs", Kind.GATEWAY, _JSON, _JSON, Caller.ADMIN),  # dog cluster check
    Op.CREATE_AND_WRITE_PEER: OpInfo("create_and_write_peer", Kind.PEER, _DATA, _NONE, Caller.PEER),
    Op.READ_PEER: OpInfo("read_peer", Kind.PEER, _NONE, _DATA, Caller.PEER),
    Op.WRITE_PEER: OpInfo("write_peer", Kind.PEER, _DATA, _NONE, Caller.PEER),
    Op.REMOVE_PEER: OpInfo("remove_peer", Kind.PEER, _NONE, _NONE, Caller.PEER),
    Op.DISCARD_PEER: OpInfo("discard_peer", Kind.PEER, _NONE, _NONE, Caller.PEER),
    Op.FLUSH_PEER: OpInfo("flush_peer", Kind.PEER, _NONE, _NONE, Caller.PEER),
    Op.STAT_PEER: OpInfo("stat_peer", Kind.PEER, _NONE, _JSON, Caller.PEER),
    # An inventory, no replica traffic: recovery asks members, dog cluster check asks
    # every node from wherever the operator runs it.
    Op.LIST_PEER: OpInfo("list_peer", Kind.PEER, _NONE, _JSON, Caller.ADMIN),
    # Reading the cluster's state is for clients too: the NBD plugin lists the nodes
    # to fail over, every client pings, sheep ask each other for these as well.
    Op.CLUSTER_INFO: OpInfo("cluster_info", Kind.ADMIN, _NONE, _JSON, Caller.CLIENT),
    Op.NODE_INFO: OpInfo("node_info", Kind.ADMIN, _NONE, _JSON, Caller.CLIENT),
    Op.NODE_LIST: OpInfo("node_list", Kind.ADMIN, _NONE, _JSON, Caller.CLIENT),
    Op.PING: OpInfo("ping", Kind.ADMIN, _NONE, _JSON, Caller.CLIENT),
    Op.FORMAT: OpInfo("format", Kind.ADMIN, _JSON, _JSON, Caller.ADMIN),
    Op.SHUTDOWN: OpInfo("shutdown", Kind.ADMIN, _NONE, _NONE, Caller.ADMIN),
    Op.KILL_NODE: OpInfo("kill_node", Kind.ADMIN, _NONE, _NONE, Caller.ADMIN),
    Op.FORCE_RECOVER: OpInfo("force_recover", Kind.ADMIN, _JSON, _JSON, Caller.ADMIN),
    Op.SET_RECOVERY: OpInfo("set_recovery", Kind.ADMIN, _JSON, _JSON, Caller.ADMIN),
    Op.ALTER_COPY: OpInfo("alter_copy", Kind.ADMIN, _JSON, _JSON, Caller.ADMIN),
    Op.REWEIGHT: OpInfo("reweight", Kind.ADMIN, _JSON, _JSON, Caller.ADMIN),
    Op.SET_SCRUB: OpInfo("set_scrub", Kind.ADMIN, _JSON, _JSON, Caller.ADMIN),
    Op.VDI_OPEN: OpInfo("vdi_open", Kind.VDI, _JSON, _JSON, Caller.CLIENT),
    Op.VDI_CLOSE: OpInfo("vdi_close", Kind.VDI, _NONE, _NONE, Caller.CLIENT),
    Op.VDI_READ: OpInfo("vdi_read", Kind.VDI, _NONE, _DATA, Caller.CLIENT),
    Op.VDI_WRITE: OpInfo("vdi_write", Kind.VDI, _DATA, _NONE, Caller.CLIENT),
    Op.VDI_DISCARD: OpInfo("vdi_discard", Kind.VDI, _NONE, _NONE, Caller.CLIENT),
    Op.VDI_EXTENTS: OpInfo("vdi_extents", Kind.VDI, _NONE, _JSON, Caller.CLIENT),
    **{op: OpInfo(op.name.lower(), Kind.VDI_ADMIN, _JSON, _JSON, Caller.CLIENT) for op in (
        Op.VDI_CREATE, Op.VDI_DELETE, Op.VDI_SNAPSHOT, Op.VDI_CLONE, Op.VDI_ROLLBACK,
        Op.VDI_RESIZE, Op.VDI_LIST, Op.VDI_SETATTR, Op.VDI_GETATTR, Op.VDI_OBJECT)},
    # Takes another session's lock away (dog vdi unlock): the operator's call.
    Op.VDI_UNLOCK: OpInfo("vdi_unlock", Kind.VDI_ADMIN, _JSON, _JSON, Caller.ADMIN),
    # Limits on a VDI's I/O: the operator's call, as taking a lock away is.
    Op.VDI_QOS: OpInfo("vdi_qos", Kind.VDI_ADMIN, _JSON, _JSON, Caller.ADMIN),
    # Moves a lock between sessions: asked by sheep (the node key) for their clients.
    Op.VDI_HANDOFF: OpInfo("vdi_handoff", Kind.VDI_ADMIN, _JSON, _JSON, Caller.ADMIN),
    # Who has which VDI open on this sheep (dog vdi lock list): cut to the caller's VDIs.
    Op.VDI_ATTACHMENTS: OpInfo("vdi_attachments", Kind.VDI_ADMIN, _JSON, _JSON, Caller.CLIENT),
    Op.VDI_DIFF: OpInfo("vdi_diff", Kind.VDI_ADMIN, _JSON, _JSON, Caller.CLIENT),
    Op.VDI_DU: OpInfo("vdi_du", Kind.VDI_ADMIN, _JSON, _JSON, Caller.CLIENT),
    Op.VDI_TRASH: OpInfo("vdi_trash", Kind.VDI_ADMIN, _JSON, _JSON, Caller.CLIENT),
    Op.VDI_ALTER_COPY: OpInfo("vdi_alter_copy", Kind.VDI_ADMIN, _JSON, _JSON, Caller.ADMIN),
    Op.VDI_RENAME: OpInfo("vdi_rename", Kind.VDI_ADMIN, _JSON, _JSON, Caller.CLIENT),
    Op.VDI_INFO: OpInfo("vdi_info", Kind.VDI_ADMIN, _JSON, _JSON, Caller.CLIENT),
    Op.AUTH_HELLO: OpInfo("auth_hello", Kind.AUTH, _JSON, _JSON, Caller.CLIENT),
    Op.AUTH_PROVE: OpInfo("auth_prove", Kind.AUTH, _JSON, _JSON, Caller.CLIENT),
    Op.AUTH_ADD: OpInfo("auth_add", Kind.ADMIN, _JSON, _JSON, Caller.ADMIN),
    Op.AUTH_RM: OpInfo("auth_rm", Kind.ADMIN, _JSON, _JSON, Caller.ADMIN),
    Op.AUTH_ROTATE: OpInfo("auth_rotate", Kind.ADMIN, _JSON, _JSON, Caller.ADMIN),
    Op.AUTH_LIST: OpInfo("auth_list", Kind.ADMIN, _NONE, _JSON, Caller.ADMIN),
    Op.AUTH_GET: OpInfo("auth_get", Kind.ADMIN, _JSON, _JSON, Caller.ADMIN),
}
assert set(OPS) == set(Op), "every opcode has an entry in the op table"

# Ops whose frames carry keys: encrypted after the handshake even when the cluster
# only signs frames (a key must never cross the wire in clear).
SEALED_OPS = frozenset({Op.FORMAT, Op.AUTH_ADD, Op.AUTH_ROTATE, Op.AUTH_GET})
auth.Sealer.always_sealed = frozenset(int(op) for op in SEALED_OPS)
assert all(info.kind is Kind.PEER for info in OPS.values() if info.caller is Caller.PEER), \
    "an op only members may send is one a sheep serves from its own store"


def check_handlers(table: Mapping[Op, object], kinds: set[Kind], owner: str) -> None:
    """Fail loudly, where a handler table is built, unless it serves exactly the ops of
    these kinds: an op added to OPS without a handler must never reach dispatch."""
    expected = {op for op, info in OPS.items() if info.kind in kinds}
    missing, extra = expected - set(table), set(table) - expected
    if missing or extra:
        raise AssertionError(
            f"{owner} does not match the op table: missing {sorted(op.name for op in missing)}"
            f", unexpected {sorted(op.name for op in extra)}")

# Ops whose offset and count address bytes of a VDI.
VDI_RANGE_OPS = frozenset({Op.VDI_READ, Op.VDI_WRITE, Op.VDI_DISCARD, Op.VDI_EXTENTS})

# Ops whose offset and count address bytes inside one object.
OBJECT_RANGE_OPS = frozenset({
    Op.CREATE_AND_WRITE_OBJ, Op.READ_OBJ, Op.WRITE_OBJ, Op.DISCARD_OBJ,
    Op.CREATE_AND_WRITE_PEER, Op.READ_PEER, Op.WRITE_PEER, Op.DISCARD_PEER,
})


# Ops that take FLAG_SPARSE: a whole object read, or made, as its extents.
SPARSE_OPS = frozenset({
    Op.READ_OBJ, Op.READ_PEER, Op.CREATE_AND_WRITE_OBJ, Op.CREATE_AND_WRITE_PEER,
})


class Header(NamedTuple):
    """A frame's header. A named tuple: built for every request and reply, and a
    tuple is several times cheaper to make than a frozen dataclass."""

    opcode: int
    request_id: int = 0
    flags: int = 0
    result: int = 0
    epoch: int = 0
    oid: int = 0
    offset: int = 0
    length: int = 0
    count: int = 0  # type: ignore[assignment]  # shadows tuple.count, on purpose
    arg0: int = 0
    arg1: int = 0
    magic: int = constants.proto_magic
    version: int = constants.proto_version

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def pack(self) -> bytes:
        return HEADER.pack(
            self.magic, self.version, self.opcode, self.flags, self.result,
            self.request_id, self.epoch, self.oid, self.offset, self.length, self.count,
            self.arg0, self.arg1)

    def pack_request(self, request_id: int, length: int) -> bytes:
        """pack() with this request id and payload length in place of the header's own."""
        return HEADER.pack(
            self.magic, self.version, self.opcode, self.flags, self.result,
            request_id, self.epoch, self.oid, self.offset, length, self.count,
            self.arg0, self.arg1)

    def with_length(self, length: int) -> Header:
        """This header with another payload length (a tuple made directly: _replace is
        three times slower, and this runs for every frame)."""
        return tuple.__new__(Header, (*self[:7], length, *self[8:]))  # type: ignore[type-var]

    def reply(self, result: int = Result.SUCCESS, length: int = 0, arg0: int | None = None,
              arg1: int | None = None) -> Header:
        """The header of the reply to this request."""
        return Header(self.opcode, self.request_id, self.flags | FLAG_REPLY, int(result),
                      self.epoch, self.oid, self.offset, length, self.count,
                      self.arg0 if arg0 is None else arg0, self.arg1 if arg1 is None else arg1,
                      self.magic, self.version)


def unpack_header(buffer: bytes | bytearray | memoryview, offset: int = 0) -> Header:
    (magic, version, opcode, flags, result, request_id, epoch, oid, offset_, length, count,
     arg0, arg1) = HEADER.unpack_from(buffer, offset)
    return Header(opcode, request_id, flags, result, epoch, oid, offset_, length, count, arg0, arg1,
                  magic, version)


def reply_problem(reply: Header, opcode: int) -> str | None:
    """Why a frame that names a request we sent cannot be its reply, or None: a reply
    carries FLAG_REPLY and its request's opcode. Anything else means the stream is
    not the one we think it is, and no answer on it can be trusted."""
    if not reply.is_reply:
        return f"a request (opcode {reply.opcode:#x}) where the reply to request" \
               f" {reply.request_id} was due"
    if reply.opcode != opcode:
        return f"the reply to request {reply.request_id} carries opcode {reply.opcode:#x}," \
               f" not its request's {opcode:#x}"
    return None


class ProtocolError(Exception):
    """The byte stream cannot be framed any further: the connection must close.

    ``header`` is set when the header itself was readable, so the peer can be
    told which request was bad before the connection closes.
    """

    def __init__(self, reason: str, header: Header | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.header = header


def framing_problem(header: Header) -> str | None:
    """Why this header cannot be framed (the stream is lost), or None."""
    if header.magic != constants.proto_magic:
        return f"bad magic 0x{header.magic:04x}"
    if header.version != constants.proto_version:
        return f"unsupported protocol version {header.version}"
    if header.length > constants.payload_max_bytes + auth.TAG_BYTES:
        return f"payload length {header.length} exceeds {constants.payload_max_bytes}"
    return None


def request_problem(header: Header) -> tuple[Result, str] | None:
    """Why a well-framed request cannot be served: (result code, reason), or None.

    The connection survives these: the server answers with the code and goes on.
    """
    try:
        op = Op(header.opcode)
    except ValueError:
        return Result.UNKNOWN_OP, f"unknown opcode 0x{header.opcode:02x}"
    info = OPS[op]
    if header.flags & ~FLAGS_KNOWN:
        return Result.BAD_REQUEST, f"unknown flags 0x{header.flags:04x}"
    if info.kind is Kind.AUTH:
        return Result.BAD_REQUEST, f"{info.name}: the handshake is over on this connection"
    if info.kind in (Kind.GATEWAY, Kind.PEER):
        # arg0: the version a write gives its copies; arg1: the copies of a gateway op.
        if header.arg0 > constants.version_max:
            return Result.INVALID_PARMS, (
                f"{info.name}: version {header.arg0} exceeds {constants.version_max}")
        if info.kind is Kind.GATEWAY and header.arg1 > constants.copies_max:
            return Result.INVALID_PARMS, (
                f"{info.name}: {header.arg1} copies exceed {constants.copies_max}")
    if info.request is Payload.NONE and header.length:
        return Result.BAD_REQUEST, f"{info.name} takes no payload, got {header.length} bytes"
    if info.request is Payload.JSON and header.length > constants.payload_control_max_bytes:
        return Result.BAD_REQUEST, f"{info.name} payload of {header.length} bytes is too large"
    if op in VDI_RANGE_OPS:
        if info.request is Payload.DATA and header.count != header.length:
            return Result.BAD_REQUEST, (
                f"{info.name}: count {header.count} differs from payload length {header.length}")
        if op is Op.VDI_READ and header.count > constants.payload_data_max_bytes:
            return Result.INVALID_PARMS, (
                f"{info.name}: {header.count} bytes exceed {constants.payload_data_max_bytes}")
    if header.flags & FLAG_SPARSE:
        if op not in SPARSE_OPS:
            return Result.BAD_REQUEST, f"{info.name} takes no FLAG_SPARSE"
        if header.offset:
            return Result.INVALID_PARMS, (
                f"{info.name}: a sparse copy is of the whole object, not from {header.offset}")
    if op in OBJECT_RANGE_OPS:
        # A sparse payload is the object's extents: count is the object's size.
        if (info.request is Payload.DATA and header.count != header.length
                and not header.flags & FLAG_SPARSE):
            return Result.BAD_REQUEST, (
                f"{info.name}: count {header.count} differs from payload length {header.length}")
        end = header.offset + header.count
        if end > constants.object_size_max_bytes:
            return Result.INVALID_PARMS, (
                f"{info.name}: range {header.offset}+{header.count} exceeds the largest object")
    return None


class FrameDecoder:
    """Incremental decoder: hand it bytes, take whole frames.

    It owns the receive buffers (asyncio's BufferedProtocol): ``get_buffer()`` says
    where the next bytes go, ``buffer_updated(n)`` takes n of them and returns the
    frames now complete. Headers and small payloads land in a staging buffer; a
    payload larger than ``direct_min_bytes`` is received straight into buffers of
    its own, each as large as all before it together (so memory is at most twice
    the bytes that came, never the length a header claims: a client that claims
    64 MiB and stalls costs what it sent), joined once at the end: one copy by us
    where an accumulate-and-slice decoder makes three. ``feed(data)`` does the
    same from bytes already read.

    Frames come out as (Header, payload): bytes for small payloads, a bytearray for
    direct ones (a memoryview once sealed and signed). When the stream breaks (a
    header that cannot be framed, a wrong tag), the frames before the break are
    still returned and ``error`` is set; a call that decodes nothing raises the
    ProtocolError. After a break the decoder refuses
    more input.
    """

    direct_min_bytes = 64 * 1024
    staging_bytes = 128 * 1024  # a header and a payload up to direct_min_bytes fit

    def __init__(self, payload_max_bytes: int = constants.payload_max_bytes,
                 place: Callable[[Header, int], memoryview | None] | None = None) -> None:
        self._staging = bytearray(self.staging_bytes)
        self._view = memoryview(self._staging)
        self._start = 0  # undecoded bytes are _staging[_start:_end]
        self._end = 0
        self._header: Header | None = None
        # Where a large payload may go: place(header, length) gives a buffer of its
        # caller's of exactly the payload's length, or None. The payload comes out as
        # that buffer: received into it, or (encrypted) opened into it once whole.
        self._place = place
        self._into: memoryview | None = None  # an encrypted payload's placed buffer
        # The payload being received in place: its full chunks, the chunk being filled,
        # the chunks decided already (a placed payload's tag).
        self._direct: bytearray | memoryview | None = None
        self._chunks: list[bytearray | memoryview] = []
        self._planned: list[bytearray] = []
        self._filled = 0  # bytes of the payload received so far
        self._payload_max_bytes = payload_max_bytes
        self._broken: ProtocolError | None = None
        self._sealer: auth.Sealer | None = None
        self._header_bytes: bytes | None = None  # a sealed direct frame's, for its tag

    def allow(self, payload_max_bytes: int) -> None:
        """From now on, take payloads up to this length (more once a peer authenticated)."""
        self._payload_max_bytes = payload_max_bytes

    def seal(self, sealer: auth.Sealer) -> None:
        """From now on every frame carries a tag: frames come out opened, their header's
        length the payload's, and a wrong tag breaks the stream. Between frames only:
        the handshake's last frame is whole before its sealer exists, and whoever
        sends more before the handshake's answer is not following the protocol."""
        if self._header is not None:
            self._broken = ProtocolError("a frame began before the handshake finished")
            raise self._broken
        self._sealer = sealer

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes of the frame in progress, or staged bytes (a header that waits
        for its payload among them)."""
        return self._filled if self._direct is not None else self._end - self._start

    def _chunk_filled(self) -> int:
        return self._filled - sum(len(chunk) for chunk in self._chunks)

    @property
    def error(self) -> ProtocolError | None:
        return self._broken

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._broken is not None:
            return self._view  # whatever still arrives is dropped
        if self._direct is not None:
            return memoryview(self._direct)[self._chunk_filled():]
        if self._end == len(self._staging):
            # Move the undecoded tail to the front. It is always less than a whole
            # staged frame (a header and at most direct_min_bytes), so room remains.
            pending = self._end - self._start
            self._staging[:pending] = self._view[self._start:self._end]
            self._start, self._end = 0, pending
        return self._view[self._end:]

    def buffer_updated(self, count: int) -> list[tuple[Header, bytes]]:
        if self._broken is not None:
            raise self._broken
        if self._direct is not None:
            self._filled += count
            return self._direct_progress()
        self._end += count
        frames: list[tuple[Header, bytes]] = []
        while True:
            try:
                frame = self._next()
            except ProtocolError:
                if not frames:
                    raise
                return frames
            if frame is None:
                break
            frames.append(frame)
        if self._start == self._end:
            self._start = self._end = 0
        return frames

    def _direct_progress(self) -> list[tuple[Header, bytes]]:
        """The direct payload's frame if it is complete; else the next chunk if needed."""
        assert self._direct is not None and self._header is not None
        if self._chunk_filled() < len(self._direct):
            return []
        self._chunks.append(self._direct)
        if self._filled < self._header.length:
            self._direct = (self._planned.pop() if self._planned else
                            bytearray(min(self._header.length - self._filled, self._filled)))
            return []
        chunks, self._chunks, self._direct = self._chunks, [], None
        header, self._header = self._header, None
        if self._sealer is None:
            payload = chunks[0] if len(chunks) == 1 else bytearray().join(chunks)
            return [(header, payload)]  # type: ignore[list-item]
        assert self._header_bytes is not None
        header_bytes, self._header_bytes = self._header_bytes, None
        into, self._into = self._into, None
        opened: bytes | bytearray | memoryview
        try:
            if self._sealer.sealed(header.opcode):
                opened = self._sealer.open_into(header.opcode, header_bytes, chunks, into)
            else:
                opened = self._sealer.open_pieces(header.opcode, header_bytes, chunks)
        except BadRequest as bad:
            raise self._break(bad) from None
        return [(header.with_length(len(opened)), opened)]  # type: ignore[list-item]

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[Header, bytes]]:
        if self._broken is not None:
            raise self._broken
        data = memoryview(data).cast("B")
        frames: list[tuple[Header, bytes]] = []
        while True:
            buffer = self.get_buffer()
            count = min(len(buffer), len(data))
            buffer[:count] = data[:count]
            data = data[count:]
            try:
                frames += self.buffer_updated(count)
            except ProtocolError:
                if not frames:
                    raise
                return frames
            if self._broken is not None or not data:
                return frames

    def _next(self) -> tuple[Header, bytes] | None:
        # A header stays staged until its frame is whole (a tag covers it): _start
        # moves past it only with its payload, or when the payload goes direct.
        header = self._header
        if header is None:
            if self._end - self._start < HEADER_SIZE:
                return None
            header = unpack_header(self._staging, self._start)
            problem = framing_problem(header)
            if problem is None and header.length > self._payload_max_bytes:
                problem = f"payload length {header.length} exceeds {self._payload_max_bytes}"
            if problem is None and self._sealer is not None and header.length < auth.TAG_BYTES:
                problem = f"a payload of {header.length} bytes has no room for its tag"
            if problem is not None:
                self._broken = ProtocolError(
                    problem, header if header.magic == constants.proto_magic else None)
                raise self._broken
            self._header = header
        length = header.length
        start = self._start + HEADER_SIZE
        if length > self.direct_min_bytes:
            # Buffers of its own: what is staged already moves there, the rest comes
            # in place.
            sealed = self._sealer is not None
            if sealed:
                self._header_bytes = bytes(self._view[self._start:start])
            taken = min(self._end - start, length)
            staged = self._view[start:start + taken]
            self._start = start + taken
            self._filled = taken
            place = self._placed(header)
            encrypted = self._sealer is not None and self._sealer.sealed(header.opcode)
            if place is None or encrypted:
                # Buffers that double with what came (an authenticated peer that claims
                # 64 MiB and stalls costs what it sent too). Ciphertext is opened piece
                # by piece when whole, into the caller's buffer if it gave one.
                self._into = place if encrypted else None
                self._direct = bytearray(min(length, max(taken, self.direct_min_bytes)))
                self._direct[:taken] = staged
            elif not sealed:
                place[:taken] = staged
                self._direct = place
            else:  # a signed payload into place, then its tag
                body = len(place)
                tag = bytearray(auth.TAG_BYTES)
                place[:min(taken, body)] = staged[:body]
                if taken >= body:
                    tag[:taken - body] = staged[body:]
                    self._chunks, self._direct = [place], tag
                else:
                    self._direct, self._planned = place, [tag]
            frames = self._direct_progress()
            return frames[0] if frames else None
        end = start + length
        if end > self._end:
            return None
        self._header = None
        if self._sealer is None:
            self._start = end
            return header, bytes(self._view[start:end])
        frame = self._view[self._start:end]
        self._start = end
        payload = bytes(self._open(header, frame))
        return header.with_length(len(payload)), payload

    def _placed(self, header: Header) -> memoryview | None:
        """The caller's buffer for this large payload, if it has one that fits. It is
        told the payload's length (without the tag): a buffer it gives is then used,
        whole (received into, or opened into)."""
        if self._place is None:
            return None
        length = header.length
        if self._sealer is not None:
            length -= auth.TAG_BYTES
        place = self._place(header, length)
        return place if place is not None and len(place) == length else None

    def _open(self, header: Header, frame: memoryview) -> bytes | memoryview:
        """The payload of a whole staged sealed frame; a wrong tag breaks the stream
        (nothing is answered to a frame that may be forged)."""
        assert self._sealer is not None
        try:
            return self._sealer.open(header.opcode, frame, HEADER_SIZE)
        except BadRequest as bad:
            raise self._break(bad) from None

    def _break(self, bad: SheepError) -> ProtocolError:
        """A frame failed its tag: the stream is broken for good (every later feed
        raises the same)."""
        self._broken = ProtocolError(bad.message)
        return self._broken


def encode(header: Header, payload: bytes | bytearray | memoryview = b"",
           sealer: auth.Sealer | None = None) -> bytes:
    """One whole frame; the header's length is set from the payload, and its tag's when
    the sealer of an authenticated connection seals it."""
    if sealer is None:
        return header.with_length(len(payload)).pack() + bytes(payload)
    return b"".join(sealer.seal(
        header.opcode, header.with_length(len(payload) + auth.TAG_BYTES).pack(), payload))


# --- sparse copies ---------------------------------------------------------------
#
# A whole object as its extents (FLAG_SPARSE): a u32 count, a (u32 offset, u32
# length) per extent, then the extents' data one after another. Extents are whole
# blocks (constants.block_size_bytes), in order, not overlapping, inside the object; every
# byte outside them is zero. The decoder checks all of that, and that the data
# is exactly as long as the table says, before it hands out a single extent: a
# malformed copy is an error, never a wrong copy.

_extent_count = struct.Struct("<I")
_extent = struct.Struct("<II")

Extent = tuple[int, memoryview]  # offset in the object, the bytes there


def encode_extents(extents: list[Extent]) -> bytes:
    """The payload of a sparse copy (its bytes copied once, into the payload)."""
    table = bytearray(_extent_count.pack(len(extents)))
    for offset, data in extents:
        table += _extent.pack(offset, len(data))
    return b"".join([table, *(data for _, data in extents)])


def extent_table_bytes(object_size: int) -> int:
    """The largest extent table of an object this size (one extent per block)."""
    return _extent_count.size + _extent.size * (object_size // constants.block_size_bytes)


def encode_extents_into(buffer: bytearray, data_at: int, extents: list[Extent]) -> memoryview:
    """The payload of a sparse copy whose extents lie one after another in buffer from
    data_at on (Store.read_extents): its table goes just before them, so the data is
    not copied again."""
    size = _extent_count.size + _extent.size * len(extents)
    assert size <= data_at, f"no room for {len(extents)} extents before byte {data_at}"
    table_at = data_at - size
    _extent_count.pack_into(buffer, table_at, len(extents))
    for index, (offset, data) in enumerate(extents):
        _extent.pack_into(buffer, table_at + _extent_count.size + index * _extent.size,
                          offset, len(data))
    return memoryview(buffer)[table_at:data_at + extents_bytes(extents)]


def extents_bytes(extents: list[Extent]) -> int:
    """The data bytes of a sparse copy (what it holds besides zeros)."""
    return sum(len(data) for _, data in extents)


def decode_extents(payload: bytes | bytearray | memoryview, object_size: int) -> list[Extent]:
    """The extents of a sparse copy of an object of object_size bytes, as views of the
    payload; BadRequest, naming the problem, unless the payload is well formed."""
    view = memoryview(payload).cast("B")
    block = constants.block_size_bytes
    if object_size <= 0 or object_size % block or object_size > constants.object_size_max_bytes:
        raise BadRequest(f"sparse copy: no object is {object_size} bytes")
    if len(view) < _extent_count.size:
        raise BadRequest(f"sparse copy: {len(view)} bytes hold no extent count")
    (count,) = _extent_count.unpack_from(view)
    data_at = _extent_count.size + count * _extent.size
    if count > object_size // block or data_at > len(view):
        raise BadRequest(f"sparse copy: {count} extents do not fit {len(view)} bytes"
                         f" of a {object_size}-byte object")
    extents: list[Extent] = []
    end = 0
    for offset, length in _extent.iter_unpack(view[_extent_count.size:data_at]):
        if (offset % block or length % block or not length or offset < end
                or offset + length > object_size):
            raise BadRequest(f"sparse copy: extent {offset}+{length} is not whole blocks"
                             f" in order inside the object")
        if data_at + length > len(view):
            raise BadRequest(f"sparse copy: extent {offset}+{length} is cut short")
        extents.append((offset, view[data_at:data_at + length]))
        data_at += length
        end = offset + length
    if data_at != len(view):
        raise BadRequest(f"sparse copy: {len(view) - data_at} bytes past the last extent")
    return extents


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_json(payload: bytes | bytearray | memoryview) -> Any:
    """A JSON payload's value; BadRequest, naming the problem, for anything else (bad
    UTF-8, bad syntax, nesting too deep, an integer of more digits than Python
    converts, NaN or Infinity, which Python's json takes and JSON has not)."""
    try:
        return json.loads(bytes(payload), parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError too
        raise BadRequest(f"malformed JSON payload: {str(error)[:200]}") from error


def error_message(payload: bytes | bytearray | memoryview) -> str:
    return bytes(payload).decode("utf-8", "replace")
