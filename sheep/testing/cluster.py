"""A cluster of real sheep processes for tests, benchmarks and the demo.

Each sheep runs in the foreground as a child process (``python -m sheep -f``)
on a free 127.0.0.1 port with its own store directory and a private local
driver directory, so tests never touch a user's cluster. Processes are stopped
by PID: SIGTERM for a graceful stop, SIGKILL to simulate a crash.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sheep import auth, constants, proto
from sheep.client import SyncClient
from sheep.errors import SheepError
from sheep.proto import FrameDecoder, Header

# The keyrings of the LocalClusters open in this process, the newest last.
_open_keyrings: list[str] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raw_call(port: int, header: Header, payload: bytes = b"",
             source: str = "127.0.0.1",
             credentials: auth.Credentials | None = None) -> tuple[Header, bytes]:
    """One request on a fresh TCP connection from the source address; the reply (a
    frame as an attacker or an old peer would send it, past the client's checks).
    With credentials the connection runs the handshake first and seals the request."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        decoder = FrameDecoder()
        sealer: auth.Sealer | None = None

        def call(header: Header, payload: bytes) -> tuple[Header, bytes]:
            sock.sendall(proto.encode(header, payload, sealer))
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("the sheep closed the connection")
                frames = decoder.feed(data)
                if frames:
                    reply, body = frames[0]
                    return reply, bytes(body)

        if credentials is not None:
            sealer = raw_handshake(call, credentials, decoder)
        return call(header, payload)


def raw_handshake(call: Callable[[Header, bytes], tuple[Header, bytes]],
                  credentials: auth.Credentials, decoder: FrameDecoder) -> auth.Sealer:
    """The handshake over a raw connection's call(header, payload) -> reply; the sealer
    its later frames go through, which from then on opens the frames decoder takes."""
    handshake = auth.ClientHandshake(credentials)
    reply, body = call(Header(opcode=proto.Op.AUTH_HELLO), proto.encode_json(handshake.hello()))
    assert reply.result == 0, proto.error_message(body)
    reply, body = call(Header(opcode=proto.Op.AUTH_PROVE), proto.encode_json(
        handshake.answer(proto.decode_json(body))))
    assert reply.result == 0, proto.error_message(body)
    sealer = handshake.sealer()
    decoder.allow(constants.payload_max_bytes + auth.TAG_BYTES)
    decoder.seal(sealer)
    return sealer


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    """SIGTERM by PID (SIGCONT first, in case it was paused), SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)


@dataclass
class SheepProcess:
    index: int
    directory: str
    port: int
    zone: int
    process: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    driver: str | None = None  # this sheep's -c, when not the cluster's

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log_path(self) -> str:
        return os.path.join(self.directory, "sheep.log")


class LocalCluster:
    def __init__(self, base: str, nodes: int = 3, zones: list[int] | None = None,
                 driver: str | None = None) -> None:
        self.base = base
        self.driver = driver or f"local:{os.path.join(base, 'cluster')}"
        zones = zones if zones is not None else list(range(nodes))
        assert len(zones) == nodes
        self.sheep = [
            SheepProcess(i, os.path.join(base, f"store{i}"), free_port(), zones[i])
            for i in range(nodes)
        ]
        # The cluster's node keyring, given to every sheep (--keyring), whatever the
        # driver; tests authenticate with it (the node may do all an admin may). dog and
        # clients made without credentials find it through DOG_KEYRING, which points
        # here while this cluster is the last one made in this process.
        self.keyring = os.path.join(base, "keyring")
        self.credentials = auth.Credentials(auth.NODE, auth.node_keyring(self.keyring).key)
        _open_keyrings.append(self.keyring)
        os.environ["DOG_KEYRING"] = self.keyring

    def serve_metrics(self) -> list[int]:
        """Give every sheep (before it starts) a free --metrics-port; the ports."""
        ports = [free_port() for _ in self.sheep]
        for node, port in zip(self.sheep, ports, strict=True):
            node.extra_args = [*node.extra_args, "--metrics-port", str(port)]
        return ports

    def add(self, zone: int | None = None) -> SheepProcess:
        index = len(self.sheep)
        node = SheepProcess(index, os.path.join(self.base, f"store{index}"), free_port(),
                            index if zone is None else zone)
        self.sheep.append(node)
        return node

    def start(self, index: int | None = None, wait: bool = True) -> None:
        targets = self.sheep if index is None else [self.sheep[index]]
        for node in targets:
            if node.alive:
                continue
            os.makedirs(node.directory, exist_ok=True)
            with open(os.path.join(node.directory, "stderr.log"), "ab") as log:
                node.process = subprocess.Popen(
                    [sys.executable, "-m", "sheep", node.directory, "-f", "-p", str(node.port),
                     "-z", str(node.zone), "-c", node.driver or self.driver, "-w", "80G",
                     "--keyring", self.keyring, *node.extra_args],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            if wait:
                self.wait_ready(node.index)

    def wait_ready(self, index: int, timeout_s: float = 20.0) -> None:
        node = self.sheep[index]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not node.alive:
                raise RuntimeError(f"sheep {index} exited; see {node.directory}/stderr.log")
            try:
                with SyncClient("127.0.0.1", node.port, self.credentials) as client:
                    if client.ping()["joined"]:
                        return
            except SheepError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"sheep {index} not ready within {timeout_s} s")

    def client(self, index: int = 0) -> SyncClient:
        return SyncClient("127.0.0.1", self.sheep[index].port, self.credentials)

    def format(self, copies: int, object_size: int = 4 << 20) -> None:
        """Format through the first live sheep, once it has applied every live sheep's
        join (each one's own ping says only that it joined; a format sent before the
        last join reached this sheep would count one zone short)."""
        alive = sum(1 for node in self.sheep if node.alive)
        with self.client(self.first_alive()) as client:
            deadline = time.monotonic() + 10
            while (len(client.cluster_info()["members"]) < alive
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            client.format(copies, object_size)

    def first_alive(self) -> int:
        return next(node.index for node in self.sheep if node.alive)

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        node = self.sheep[index]
        assert node.process is not None
        node.process.send_signal(sig)
        node.process.wait(timeout=30)

    def stop(self, index: int) -> int:
        """Graceful stop (SIGTERM); returns the exit code."""
        node = self.sheep[index]
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        return node.process.wait(timeout=30)

    def wait_epoch(self, index: int, members: int, timeout_s: float = 10.0) -> dict:
        """Wait until sheep index sees exactly ``members`` members; return its cluster info."""
        deadline = time.monotonic() + timeout_s
        info: dict = {}
        while time.monotonic() < deadline:
            with self.client(index) as client:
                info = client.cluster_info()
            if len(info["members"]) == members:
                return info
            time.sleep(0.05)
        raise AssertionError(f"sheep {index} sees {len(info.get('members', []))} members, "
                             f"not {members}")

    def object_path(self, index: int, oid: int) -> str:
        name = f"{oid:016x}"
        return os.path.join(self.sheep[index].directory, "obj", name[-2:], name)

    def object_files(self, oid: int) -> list[int]:
        """Indexes of the sheep whose store directory holds the object's file."""
        return [node.index for node in self.sheep
                if os.path.exists(self.object_path(node.index, oid))]

    def index_of(self, endpoint: str) -> int:
        """The index of the sheep listening on endpoint ("host:port")."""
        port = int(endpoint.rpartition(":")[2])
        return next(node.index for node in self.sheep if node.port == port)

    def all_oids(self) -> set[int]:
        """Every oid some live sheep stores (LIST_PEER of each)."""
        oids: set[int] = set()
        for node in self.sheep:
            if node.alive:
                with self.client(node.index) as client:
                    oids.update(client.list_objects())
        return oids

    def recovery_unsettled(self) -> str | None:
        """Why recovery is not over yet, or None: every live sheep must be a member
        of one epoch whose members are exactly the live sheep, and have run that
        epoch's recovery to its end, with no failure and every copy verified."""
        alive = [node.index for node in self.sheep if node.alive]
        infos = []
        for index in alive:
            with self.client(index) as client:
                infos.append(client.node_info())
            if len(infos) == 1:
                with self.client(index) as client:
                    members = len(client.cluster_info()["members"])
                if members != len(alive):
                    return f"{members} members, {len(alive)} sheep alive"
        epochs = {info["epoch"] for info in infos}
        if len(epochs) != 1:
            return f"the sheep are in epochs {sorted(epochs)}"
        for index, info in zip(alive, infos, strict=True):
            recovery = info["recovery"]
            if recovery is None or recovery["epoch"] != info["epoch"] or recovery["running"] \
                    or recovery["failed"] or recovery["unverified"]:
                return f"sheep {index} in epoch {info['epoch']}: recovery {recovery}"
        return None

    def wait_recovered(self, timeout_s: float = 60.0) -> float:
        """Wait until recovery_unsettled() is None; return the seconds it took."""
        started = time.monotonic()
        while (why := self.recovery_unsettled()) is not None:
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"recovery not over within {timeout_s} s: {why}")
            time.sleep(0.1)
        return time.monotonic() - started

    def close(self) -> None:
        for node in self.sheep:
            if node.alive:
                assert node.process is not None
                node.process.send_signal(signal.SIGKILL)
                node.process.wait(timeout=30)
        if self.keyring in _open_keyrings:  # DOG_KEYRING: the last cluster still open
            _open_keyrings.remove(self.keyring)
            if _open_keyrings:
                os.environ["DOG_KEYRING"] = _open_keyrings[-1]
            else:
                os.environ.pop("DOG_KEYRING", None)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
