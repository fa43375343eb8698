"""Keys, principals, and the session layer every connection runs: sans-IO.

Keyrings are Ceph-like INI files, one section per principal:

    [client.admin]
    key = <base64 of 32 random bytes>
    caps = admin

Principals and what their caps let them do:

- ``node``: the sheep themselves. One key per cluster (the cluster's password, as in
  Virtuozzo Storage); it alone may send peer ops, and it may do all an admin may.
- ``admin``: everything but peer ops.
- ``rw vdi=PATTERN ...``: list, create, read, write, snapshot, clone and delete the
  VDIs whose names match a pattern (fnmatch, case-sensitive); nothing else.
- ``ro vdi=PATTERN ...``: list and read those VDIs only.

The node key lives in each sheep's keyring file; every other principal lives in the
cluster state (made by format and ``dog auth``), so every sheep knows it.

The handshake (docs/security.md): mutual challenge-response with HMAC-SHA256, a
fresh 32-byte nonce from each side, never the key on the wire; then HKDF-SHA256
gives one AES-256-GCM key per direction. Every later frame carries a 16-byte tag:

- signed (the default): the GMAC of the header and the payload (AES-GCM with the
  whole frame as associated data, nothing encrypted);
- encrypted (``dog cluster format --encrypt``), and always for ops that carry keys:
  the payload is sealed with AES-GCM, the header is associated data.

The nonce is a per-direction frame counter, so a frame replayed, reordered, dropped
or injected fails its tag, and the counters restart with fresh keys on every
connection, so nothing recorded from one connection means anything on another.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import fnmatch
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sheep.errors import AuthFailed, BadRequest, SheepError, UsageError

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 32
TAG_BYTES = 16
NODE = "node"
ADMIN = "client.admin"
MODES = ("sign", "encrypt")
_LABEL = b"sheepdog-auth-v1"

# A principal's name: 'node', or 'client.' and a name of letters, digits and . _ -
_name_re = re.compile(r"^(node|client\.[A-Za-z0-9][A-Za-z0-9._-]{0,62})$")
_pattern_re = re.compile(r"^[A-Za-z0-9._*?\[\]!:@+-]{1,256}$")


def name_problem(name: Any) -> str | None:
    """Why this cannot be a principal's name, or None."""
    if not isinstance(name, str) or not _name_re.match(name):
        shown = repr(name)[:80]
        return (f"bad principal name {shown}: 'node', or 'client.' followed by up to 63"
                " letters, digits, '.', '_' or '-'")
    return None


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


def decode_key(text: Any, where: str = "key") -> bytes:
    """A key from its base64 text; ValueError naming the problem unless it is one."""
    if not isinstance(text, str):
        raise ValueError(f"{where} is not text")
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where} is not base64") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"{where} holds {len(key)} bytes, not {KEY_BYTES}")
    return key


# --- capabilities --------------------------------------------------------------


@dataclass(frozen=True)
class Caps:
    node: bool = False
    admin: bool = False
    vdis: tuple[str, ...] = ()
    read_only: bool = False

    @classmethod
    def parse(cls, text: Any) -> Caps:
        """Caps from their text: 'node', 'admin', 'rw vdi=PATTERN...' or 'ro vdi=PATTERN...';
        ValueError naming the problem otherwise."""
        if not isinstance(text, str) or len(text) > 4096:
            raise ValueError("caps must be a short text")
        words = text.split()
        if words == ["node"]:
            return cls(node=True)
        if words == ["admin"]:
            return cls(admin=True)
        if not words or words[0] not in ("rw", "ro") or len(words) < 2:
            raise ValueError(f"bad caps {text[:80]!r}: 'admin', 'node', 'rw vdi=PATTERN...'"
                             " or 'ro vdi=PATTERN...'")
        patterns = []
        for word in words[1:]:
            key, _, pattern = word.partition("=")
            if key != "vdi" or not _pattern_re.match(pattern):
                raise ValueError(f"bad caps word {word[:80]!r}: vdi=PATTERN, where PATTERN"
                                 " has letters, digits and . _ - : @ + and the wildcards * ? [ ]")
            patterns.append(pattern)
        return cls(vdis=tuple(patterns), read_only=words[0] == "ro")

    def text(self) -> str:
        if self.node:
            return "node"
        if self.admin:
            return "admin"
        return " ".join(["ro" if self.read_only else "rw", *(f"vdi={p}" for p in self.vdis)])

    @property
    def privileged(self) -> bool:
        """Admin or node: every VDI and every admin op."""
        return self.node or self.admin

    def may_touch(self, vdi_name: str) -> bool:
        return self.privileged or any(fnmatch.fnmatchcase(vdi_name, p) for p in self.vdis)


@dataclass(frozen=True)
class Principal:
    name: str
    caps: Caps


# --- keyring files ---------------------------------------------------------------


class KeyringError(UsageError):
    """A keyring file that cannot be used: named, with the reason."""


@dataclass(frozen=True)
class Entry:
    key: bytes
    caps: Caps


def section_text(name: str, key: bytes, caps: Caps) -> str:
    return f"[{name}]\n\tkey = {encode_key(key)}\n\tcaps = {caps.text()}\n"


_warned_open: set[str] = set()  # keyrings open to others, warned about already


def load_keyring(path: str) -> dict[str, Entry]:
    """The principals of a keyring file. Refused, naming the problem, if the file is
    missing or malformed; a warning if others than its owner may read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as error:
        raise KeyringError(f"cannot read keyring {path}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyringError(f"keyring {path} is not a regular file")
        if info.st_mode & 0o077 and path not in _warned_open:
            # As ssh warns (refusing would break 'add > FILE'); once per file and process.
            _warned_open.add(path)
            log.warning("keyring %s is open to others (mode %o): chmod 600 it", path,
                        stat.S_IMODE(info.st_mode))
        if info.st_size > 1 << 20:
            raise KeyringError(f"keyring {path} is larger than 1 MiB")
        with os.fdopen(os.dup(fd), "r", encoding="utf-8", errors="strict") as file:
            text = file.read()
    except UnicodeDecodeError:
        raise KeyringError(f"keyring {path} is not UTF-8 text") from None
    finally:
        os.close(fd)
    return parse_keyring(text, path)


def parse_keyring(text: str, path: str = "keyring") -> dict[str, Entry]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as error:
        raise KeyringError(f"keyring {path} is malformed: {str(error).splitlines()[0]}") from None
    entries: dict[str, Entry] = {}
    for name in parser.sections():
        problem = name_problem(name)
        if problem is not None:
            raise KeyringError(f"keyring {path}: {problem}")
        section = parser[name]
        if "key" not in section:
            raise KeyringError(f"keyring {path}: [{name}] has no key")
        try:
            key = decode_key(section["key"], f"[{name}] key")
            caps = Caps.parse(section.get("caps", "node" if name == NODE else ""))
        except ValueError as error:
            raise KeyringError(f"keyring {path}: {error}") from None
        if (name == NODE) != caps.node:
            raise KeyringError(f"keyring {path}: only [node] has caps 'node'")
        entries[name] = Entry(key, caps)
    return entries


def keyring_text(entries: dict[str, Entry]) -> str:
    return "".join(section_text(name, e.key, e.caps) for name, e in sorted(entries.items()))


def write_keyring(path: str, entries: dict[str, Entry], exclusive: bool = False) -> None:
    """Write a keyring file with mode 0600, atomically (a temporary file renamed over
    it). exclusive: fail with FileExistsError if the path exists."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temporary = f"{path}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(keyring_text(entries))
            file.flush()
            os.fsync(file.fileno())
        if exclusive:
            os.link(temporary, path)  # FileExistsError if another made it first
            os.unlink(temporary)
        else:
            os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def merge_into_keyring(path: str, name: str, entry: Entry) -> None:
    """Add or replace one principal in a keyring file, keeping the others."""
    entries = load_keyring(path) if os.path.exists(path) else {}
    entries[name] = entry
    write_keyring(path, entries)


def node_keyring(path: str) -> Entry:
    """The node key of the cluster directory's keyring at path, made if there is none
    (the one-box default: the first sheep makes it, the others read it)."""
    if not os.path.exists(path):
        try:
            write_keyring(path, {NODE: Entry(new_key(), Caps(node=True))}, exclusive=True)
        except FileExistsError:
            pass  # another sheep made it first: use theirs
        except OSError as error:
            raise SheepError(f"cannot use cluster directory {os.path.dirname(path)}:"
                             f" {error.strerror}") from None
    entries = load_keyring(path)
    if NODE not in entries:
        raise KeyringError(f"keyring {path} has no [node] section")
    return entries[NODE]


class Authority(Protocol):
    """What a sheep's server asks: the key and caps of a principal, and the mode."""

    def lookup(self, name: str) -> Entry | None: ...

    def mode(self) -> str: ...

    def keyring_hint(self) -> str | None:
        """The path of the sheep's node keyring, told to clients on this box only."""


@dataclass(frozen=True)
class Credentials:
    """Who a connection authenticates as."""

    name: str
    key: bytes
    source: str = field(default="", compare=False)  # the keyring it came from, if one

    def __repr__(self) -> str:  # never the key
        return f"Credentials({self.name!r})"


# --- the handshake ---------------------------------------------------------------


def _hex(value: Any, size: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size:
        raise BadRequest(f"handshake: {what} must be {size} bytes in hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise BadRequest(f"handshake: {what} is not hex") from None


def _transcript(role: bytes, name: str, client_nonce: bytes, server_nonce: bytes,
                mode: str) -> bytes:
    return b"\0".join([_LABEL, role, name.encode(), client_nonce, server_nonce, mode.encode()])


def _proof(key: bytes, role: bytes, name: str, cn: bytes, sn: bytes, mode: str) -> bytes:
    return hmac.new(key, _transcript(role, name, cn, sn, mode), hashlib.sha256).digest()


def _session_keys(key: bytes, name: str, cn: bytes, sn: bytes, mode: str) -> tuple[bytes, bytes]:
    """(client-to-server key, server-to-client key)."""
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * KEY_BYTES, salt=cn + sn,
               info=_transcript(b"session", name, cn, sn, mode)).derive(key)
    return okm[:KEY_BYTES], okm[KEY_BYTES:]


class ClientHandshake:
    """The client's side: hello() -> the sheep answers -> answer(reply) -> prove it."""

    def __init__(self, credentials: Credentials,
                 random: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.credentials = credentials
        self.nonce = random(NONCE_BYTES)
        self.mode = ""
        self._keys: tuple[bytes, bytes] | None = None

    def hello(self) -> dict[str, Any]:
        return {"name": self.credentials.name, "nonce": self.nonce.hex()}

    def answer(self, reply: Any) -> dict[str, Any]:
        """The sheep's challenge and proof in; our proof out. AuthFailed unless the sheep
        proved it knows our key."""
        if not isinstance(reply, dict) or reply.get("mode") not in MODES:
            raise AuthFailed("handshake: the sheep's answer is malformed")
        server_nonce = _hex(reply.get("nonce"), NONCE_BYTES, "nonce")
        proof = _hex(reply.get("proof"), hashlib.sha256().digest_size, "proof")
        name, key, mode = self.credentials.name, self.credentials.key, reply["mode"]
        if not hmac.compare_digest(proof, _proof(key, b"server", name, self.nonce,
                                                 server_nonce, mode)):
            source = f" (from {self.credentials.source})" if self.credentials.source else ""
            raise AuthFailed(f"authentication as {name} failed: the sheep does not know this"
                             f" key for {name}{source}: a wrong key, another cluster's, or"
                             " no such principal")
        self.mode = mode
        self._keys = _session_keys(key, name, self.nonce, server_nonce, mode)
        return {"proof": _proof(key, b"client", name, self.nonce, server_nonce, mode).hex()}

    def sealer(self) -> Sealer:
        assert self._keys is not None, "answer() first"
        send, receive = self._keys
        return Sealer(send, receive, self.mode == "encrypt")


class ServerHandshake:
    """The sheep's side. lookup(name) gives (key, caps) or None; an unknown name gets a
    proof under a random key, so it fails exactly as a wrong key does."""

    def __init__(self, lookup: Callable[[str], Entry | None], mode: str,
                 random: Callable[[int], bytes] = secrets.token_bytes) -> None:
        assert mode in MODES
        self.lookup = lookup
        self.mode = mode
        self.random = random
        self.nonce = random(NONCE_BYTES)
        self._state: tuple[str, Entry | None, bytes, bytes] | None = None
        self._keys: tuple[bytes, bytes] | None = None
        self.principal: Principal | None = None

    def hello(self, body: Any) -> dict[str, Any]:
        if self._state is not None:
            raise BadRequest("handshake: hello sent twice")
        if not isinstance(body, dict):
            raise BadRequest("handshake: hello must be a JSON object")
        name = body.get("name")
        problem = name_problem(name)
        if problem is not None or not isinstance(name, str):
            raise BadRequest(f"handshake: {problem}")
        client_nonce = _hex(body.get("nonce"), NONCE_BYTES, "nonce")
        entry = self.lookup(name)
        key = entry.key if entry is not None else self.random(KEY_BYTES)
        self._state = (name, entry, key, client_nonce)
        return {"nonce": self.nonce.hex(), "mode": self.mode,
                "proof": _proof(key, b"server", name, client_nonce, self.nonce,
                                self.mode).hex()}

    def prove(self, body: Any) -> Principal:
        if self._state is None:
            raise BadRequest("handshake: proof before hello")
        name, entry, key, client_nonce = self._state
        proof = _hex(body.get("proof") if isinstance(body, dict) else None,
                     hashlib.sha256().digest_size, "proof")
        expected = _proof(key, b"client", name, client_nonce, self.nonce, self.mode)
        if not hmac.compare_digest(proof, expected) or entry is None:
            raise AuthFailed(f"authentication as {name} failed: wrong key or no such principal")
        self.principal = Principal(name, entry.caps)
        self._keys = _session_keys(key, name, client_nonce, self.nonce, self.mode)
        return self.principal

    def sealer(self) -> Sealer:
        assert self._keys is not None, "prove() first"
        client_to_server, server_to_client = self._keys
        return Sealer(server_to_client, client_to_server, self.mode == "encrypt")


# --- frames after the handshake -----------------------------------------------------


class Sealer:
    """Tags (and, when encrypting, seals) every frame one side sends, and checks every
    frame it receives, in order. Frames of ops in ``always_sealed`` are encrypted in
    either mode (they carry keys).

    A frame is its header, its payload, and the 16-byte tag last; the header's length
    counts the tag. Signed, the tag is AES-GCM's over header and payload as associated
    data (GMAC); encrypted, the payload is sealed with the header as associated data.
    The nonce is the frame's number in its direction, never sent. This runs for every
    frame both ways, so it does no more than the cipher needs: a small signed frame
    is copied once (AESGCM takes one buffer), a large one is tagged where it lies
    (the same GMAC, its associated data fed in pieces), and nothing is copied on the
    way in but what the decoder joins anyway."""

    always_sealed: frozenset[int] = frozenset()  # set by sheep.proto
    # Above this, a signed payload is tagged in pieces: the setup costs more than a copy
    # of a small frame, far less than a copy (and an allocation) of a large one.
    large_bytes = 64 * 1024

    def __init__(self, send_key: bytes, receive_key: bytes, encrypt: bool) -> None:
        self._encrypt = AESGCM(send_key).encrypt
        self._decrypt = AESGCM(receive_key).decrypt
        self._send_key = send_key
        self._receive_key = receive_key
        self.encrypt = encrypt
        self._sent = 0
        self._received = 0

    def sealed(self, opcode: int) -> bool:
        """Whether frames of this op travel encrypted."""
        return self.encrypt or opcode in self.always_sealed

    def seal(self, opcode: int, header: bytes, payload: bytes | bytearray | memoryview
             ) -> list[bytes]:
        """The frame's parts, to send in order. header: packed, its length counting the
        tag (len(payload) + TAG_BYTES)."""
        nonce = self._sent.to_bytes(12, "little")
        self._sent += 1
        if self.sealed(opcode):
            return [header, self._encrypt(nonce, payload, header)]
        if len(payload) > self.large_bytes:
            gmac = Cipher(algorithms.AES(self._send_key), modes.GCM(nonce)).encryptor()
            gmac.authenticate_additional_data(header)
            gmac.authenticate_additional_data(payload)
            gmac.finalize()
            return [header, payload, gmac.tag]  # type: ignore[list-item]
        signed = header + payload
        return [signed, self._encrypt(nonce, b"", signed)]

    def open(self, opcode: int, frame: memoryview, header_bytes: int
             ) -> bytes | memoryview:
        """The payload of a received frame, whole in frame (a memoryview: header_bytes of
        header, the payload, the tag); BadRequest if its tag is wrong: tampered, replayed,
        reordered or injected. A signed payload comes back as a view into frame."""
        nonce = self._next_received()
        try:
            if self.sealed(opcode):
                return self._decrypt(nonce, frame[header_bytes:], frame[:header_bytes])
            self._decrypt(nonce, frame[-TAG_BYTES:], frame[:-TAG_BYTES])
        except InvalidTag:
            raise _tampered() from None
        return frame[header_bytes:-TAG_BYTES]

    def open_into(self, opcode: int, header: bytes, pieces: list[bytearray | memoryview],
                  into: memoryview | None) -> bytes | memoryview:
        """open() of an encrypted frame received in pieces after its header (ciphertext
        and tag, cut anywhere): decrypted piece by piece, nothing joined, into ``into``
        (a buffer of the payload's length, which comes back) or into a buffer of its
        own. On a wrong tag ``into`` may hold anything: the call it was for fails."""
        nonce = self._next_received()
        body, tag = _body_and_tag(pieces)
        length = sum(len(view) for view in body)
        if len(tag) != TAG_BYTES or (into is not None and len(into) != length):
            raise _tampered()
        out = into if into is not None else memoryview(bytearray(length))
        decryptor = Cipher(algorithms.AES(self._receive_key), modes.GCM(nonce)).decryptor()
        decryptor.authenticate_additional_data(header)
        done = 0
        for view in body:
            decryptor.update_into(view, out[done:done + len(view)])
            done += len(view)
        try:
            decryptor.finalize_with_tag(tag)
        except InvalidTag:
            raise _tampered() from None
        return out if into is not None else out.obj  # type: ignore[return-value]

    def open_pieces(self, opcode: int, header: bytes,
                    pieces: list[bytearray | memoryview]) -> bytes | bytearray | memoryview:
        """open() of a large signed frame received in pieces after its header (its
        payload and tag, cut anywhere), checked where they lie. Pieces are joined only
        when the payload is in several; a payload whole in the first piece comes back
        as that first piece itself. (Encrypted frames: open_into.)"""
        nonce = self._next_received()
        views, tag = _body_and_tag(pieces)
        body: bytearray | memoryview
        if len(views) == 1 and len(views[0]) == len(pieces[0]):
            body = pieces[0]
        else:
            body = views[0] if len(views) == 1 else bytearray().join(views)
        try:
            gmac = Cipher(algorithms.AES(self._receive_key), modes.GCM(nonce, tag)).decryptor()
            gmac.authenticate_additional_data(header)
            gmac.authenticate_additional_data(body)
            gmac.finalize()
        except (InvalidTag, ValueError):  # ValueError: a tag cut short
            raise _tampered() from None
        return body

    def _next_received(self) -> bytes:
        """The nonce of the next frame received."""
        nonce = self._received.to_bytes(12, "little")
        self._received += 1
        return nonce


def _body_and_tag(pieces: list[bytearray | memoryview]) -> tuple[list[memoryview], bytes]:
    """A payload received in pieces, cut anywhere: views of its body, and its tag (the
    last TAG_BYTES; shorter if the pieces are)."""
    length = sum(len(piece) for piece in pieces) - TAG_BYTES
    body: list[memoryview] = []
    tag = bytearray()
    done = 0
    for piece in pieces:
        view = memoryview(piece)
        part = max(0, min(len(view), length - done))
        if part:
            body.append(view[:part])
            done += part
        tag += view[part:]
    return body, bytes(tag)


def _tampered() -> SheepError:
    """The error of a frame whose tag is wrong (BadRequest)."""
    return BadRequest("frame failed its integrity check (tampered, replayed or out of order)")


# --- where dog and the client library find their key -----------------------------------


def config_keyring_path() -> str:
    """The default keyring of dog and the client library ('dog cluster format' writes the
    first admin key there unless told otherwise)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "sheepdog", "keyring")


def cluster_keyring_path(directory: str) -> str:
    """The node keyring of a local-driver cluster, in its shared directory."""
    return os.path.join(directory, "keyring")


def resolve_credentials(keyring: str | None = None, name: str | None = None,
                        prefer_node: bool = False) -> Credentials:
    """Who to authenticate as. An explicit keyring or name beats DOG_KEYRING and
    DOG_NAME. Without a keyring: the default keyring, then the one-box cluster's (the
    local driver's default directory, whose first sheep made it). Without a name:
    client.admin, or else the node key if a keyring holds one (before the first format
    there is no admin yet); prefer_node tries the node key first ('dog cluster format')."""
    from sheep.cluster.driver import default_local_directory

    keyring = keyring or os.environ.get("DOG_KEYRING") or None
    explicit = name or os.environ.get("DOG_NAME") or None
    if explicit is not None:
        problem = name_problem(explicit)
        if problem is not None:
            raise UsageError(problem)
    if keyring is not None:
        paths = [keyring]
    else:
        defaults = [config_keyring_path(),
                    cluster_keyring_path(default_local_directory())]
        paths = [path for path in defaults if os.path.exists(path)]
        if not paths:
            raise KeyringError(
                "no keyring: pass --keyring FILE or set DOG_KEYRING (looked in "
                + " and ".join(defaults) + ")")
    loaded = [(path, load_keyring(path)) for path in paths]
    wanted = [explicit] if explicit is not None else (
        [NODE, ADMIN] if prefer_node else [ADMIN, NODE])
    for candidate in wanted:
        for path, entries in loaded:
            if candidate in entries:
                return Credentials(candidate, entries[candidate].key, path)
    raise KeyringError(f"no [{wanted[0]}] key in {' or '.join(paths)}")


@dataclass(frozen=True)
class Auto:
    """Credentials found as dog finds them (resolve_credentials), which may also take the
    node keyring a sheep on this box names in its handshake answer (a path, never a
    key: only a user who may read that file gets anything from it). It is the one-box
    cluster's own key, so it comes first for 'dog cluster format' (prefer_node), and
    last otherwise, when nothing else is found."""

    keyring: str | None = None
    name: str | None = None
    prefer_node: bool = False

    def _explicit(self) -> bool:
        return bool(self.keyring or os.environ.get("DOG_KEYRING") or self.name
                    or os.environ.get("DOG_NAME"))

    def name_to_try(self) -> str:
        """Who to say hello as, before the sheep answered."""
        if self._explicit():
            return resolve_credentials(self.keyring, self.name, self.prefer_node).name
        try:
            return resolve_credentials(prefer_node=self.prefer_node).name
        except KeyringError:
            return NODE  # a sheep on this box may name its keyring

    def resolve(self, name: str, hint: Any) -> Credentials:
        """The credentials for name, now that the sheep may have named its keyring: the
        node key of the sheep answering beats a node key found in a default place,
        which may be another cluster's."""
        if not self._explicit() and name == NODE:
            from_sheep = _hinted_node_key(hint)
            if from_sheep is not None:
                return from_sheep
        found = resolve_credentials(self.keyring, self.name, self.prefer_node)
        if found.name != name:
            raise KeyringError(f"no [{name}] key found")
        return found


def _hinted_node_key(hint: Any) -> Credentials | None:
    """The node key of the keyring file a sheep on this box named, if readable."""
    if not isinstance(hint, str) or not os.path.isabs(hint):
        return None
    try:
        entries = load_keyring(hint)
    except KeyringError:
        return None
    entry = entries.get(NODE)
    return Credentials(NODE, entry.key) if entry is not None else None
