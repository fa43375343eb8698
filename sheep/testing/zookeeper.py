"""Private ZooKeepers for tests: Debian's zookeeper package, run standalone or as an
ensemble, each server with its own data directory and free 127.0.0.1 ports (never
the system service, nothing written outside the directory given), stopped by PID.

One server is one JVM (``_Instance``): a config file written once, a process that
can be launched again with the same data, and the four-letter words (ruok, srvr,
cons) that say whether it serves and as what. ``ZooKeeperServer`` is one standalone
instance; ``ZooKeeperEnsemble`` is N of them that elect a leader among themselves.

tickTime defaults to 200 ms (production uses 2000 ms). After a SIGKILL the survivors
see their TCP connections to the dead server close at once, and the election itself
runs on fixed timers (FastLeaderElection's 200 ms finalize wait), not on ticks; what
ticks bound is how long a server that hangs (no close) takes to be noticed (syncLimit
ticks) and how finely sessions expire (once a tick). At 200 ms both stay well below
the sheep's session timeouts (2 to 6 s in the tests), so elections are the real ones
and the tests spend their time on I/O, not on waiting out ticks.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from sheep.testing.cluster import free_port, stop_process

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"
CONF_DIR = "/etc/zookeeper/conf"  # for its log4j.properties only
STANDALONE_MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"
QUORUM_MAIN = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
tick_ms_default = 200
init_limit_ticks = 25  # a follower syncs with a new leader within 5 s at 200 ms ticks
sync_limit_ticks = 5  # a hung (not killed) leader or follower is dropped after 1 s
serve_timeout_s = 30.0
four_letter_timeout_s = 1.0
modes_serving = ("leader", "follower")


def missing() -> str | None:
    """Why a private ZooKeeper cannot run here, or None."""
    if shutil.which("java") is None:
        return "java is not installed (Debian package zookeeper)"
    if not os.path.exists(ZOOKEEPER_JAR):
        return f"{ZOOKEEPER_JAR} is missing (Debian package zookeeper)"
    return None


def free_ports(count: int) -> list[int]:
    """count distinct free 127.0.0.1 ports (free_port alone may repeat one)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class _Instance:
    """One ZooKeeper server process: its directory, config and four-letter words."""

    def __init__(self, directory: str, address: str, port: int, tick_ms: int,
                 main: str, extra: list[str]) -> None:
        self.directory = directory
        self.address = address
        self.port = port
        self.main = main
        self.data_dir = os.path.join(directory, "data")
        self.config_path = os.path.join(directory, "zoo.cfg")
        self.log_path = os.path.join(directory, "zookeeper.log")
        self.process: subprocess.Popen[bytes] | None = None
        os.makedirs(self.data_dir, exist_ok=True)
        lines = [f"tickTime={tick_ms}", f"dataDir={self.data_dir}", f"clientPort={port}",
                 f"clientPortAddress={address}", "admin.enableServer=false",
                 f"minSessionTimeout={2 * tick_ms}", "maxSessionTimeout=60000",
                 "4lw.commands.whitelist=ruok,srvr,stat,cons", *extra]
        with open(self.config_path, "w") as file:
            file.write("".join(f"{line}\n" for line in lines))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def launch(self) -> None:
        assert not self.alive, f"ZooKeeper in {self.directory} is running already"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["java", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                 "-cp", f"{ZOOKEEPER_JAR}:{CONF_DIR}",
                 f"-Dzookeeper.log.dir={self.directory}", "-Dzookeeper.root.logger=INFO,CONSOLE",
                 self.main, self.config_path],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def four_letter(self, word: str) -> str | None:
        """The answer to a four-letter word, or None if the server does not answer."""
        try:
            with socket.create_connection((self.address, self.port),
                                          timeout=four_letter_timeout_s) as sock:
                sock.sendall(word.encode())
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return None
        return b"".join(chunks).decode(errors="replace")

    def mode(self) -> str | None:
        """'leader', 'follower' or 'standalone' while serving; None otherwise."""
        answer = self.four_letter("srvr") if self.alive else None
        for line in (answer or "").splitlines():
            if line.startswith("Mode: "):
                return line[len("Mode: "):].strip()
        return None

    def wait_running(self, timeout_s: float = serve_timeout_s) -> None:
        """Until it answers ruok: the process is up (an ensemble member may still be
        looking for its leader)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"ZooKeeper exited; see {self.log_path}")
            if self.four_letter("ruok") == "imok":
                return
            time.sleep(0.1)
        raise RuntimeError(f"ZooKeeper not running within {timeout_s} s; see {self.log_path}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts connections and answers nothing, as a
        hung machine."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


class ZooKeeperServer:
    """One standalone server."""

    def __init__(self, directory: str, tick_ms: int = tick_ms_default,
                 address: str = "127.0.0.1") -> None:
        self.directory = directory
        self.address = address
        self.port = free_port()
        self._instance = _Instance(directory, address, self.port, tick_ms, STANDALONE_MAIN, [])
        self.log_path = self._instance.log_path
        self._instance.launch()
        self._instance.wait_running()

    @property
    def hosts(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self._instance.process is not None
        return self._instance.process

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): every session loses its connection."""
        self._instance.pause()

    def resume(self) -> None:
        self._instance.resume()

    def stop(self) -> None:
        self._instance.stop()


class ZooKeeperEnsemble:
    """N servers on 127.0.0.1 (server K+1 in directory/serverK), each with its client,
    quorum and election ports; started at once, and at quorum on return."""

    def __init__(self, directory: str, servers: int = 3, tick_ms: int = tick_ms_default) -> None:
        assert servers >= 1
        self.directory = directory
        ports = free_ports(3 * servers)
        client_ports, peer_ports = ports[:servers], ports[servers:]
        members = [f"server.{index + 1}=127.0.0.1:{peer_ports[2 * index]}:"
                   f"{peer_ports[2 * index + 1]}" for index in range(servers)]
        extra = [f"initLimit={init_limit_ticks}", f"syncLimit={sync_limit_ticks}", *members]
        self.servers: list[_Instance] = []
        for index in range(servers):
            server_dir = os.path.join(directory, f"server{index}")
            server = _Instance(server_dir, "127.0.0.1", client_ports[index], tick_ms,
                               QUORUM_MAIN, extra)
            with open(os.path.join(server.data_dir, "myid"), "w") as file:
                file.write(f"{index + 1}\n")
            self.servers.append(server)
        try:
            for server in self.servers:
                server.launch()
            self.wait_quorum()
        except BaseException:
            self.stop()
            raise

    @property
    def hosts(self) -> str:
        return ",".join(f"{server.address}:{server.port}" for server in self.servers)

    def address(self, index: int) -> str:
        server = self.servers[index]
        return f"{server.address}:{server.port}"

    def index_of(self, address: str) -> int:
        """The index of the server whose client address is address ("HOST:PORT")."""
        return next(index for index in range(len(self.servers))
                    if self.address(index) == address)

    def modes(self) -> list[str | None]:
        return [server.mode() for server in self.servers]

    def leader(self) -> int | None:
        """The index of the server that answers srvr with 'Mode: leader', or None."""
        return next((index for index, mode in enumerate(self.modes()) if mode == "leader"), None)

    def alive(self, index: int) -> bool:
        return self.servers[index].alive

    def kill(self, index: int) -> None:
        """SIGKILL server index (by PID) and reap it."""
        self.servers[index].kill()

    def lose_quorum(self) -> list[int]:
        """SIGKILL the leader and the server after it (of 3: the quorum is gone);
        the servers killed, to start again."""
        leader = self.leader()
        assert leader is not None, self.modes()
        victims = [leader, (leader + 1) % len(self.servers)]
        for index in victims:
            self.kill(index)
        return victims

    def pause(self, index: int) -> None:
        """Freeze server index (SIGSTOP): connected, and silent."""
        self.servers[index].pause()

    def resume(self, index: int) -> None:
        self.servers[index].resume()

    def start(self, index: int) -> None:
        """Launch server index again, with its data; return once it answers ruok."""
        self.servers[index].launch()
        self.servers[index].wait_running()

    def restart(self, index: int) -> None:
        """A graceful stop (SIGTERM), then start."""
        self.servers[index].stop()
        self.start(index)

    def wait_leader(self, timeout_s: float = serve_timeout_s, other_than: int | None = None,
                    poll_s: float = 0.02) -> int:
        """Poll until some server (other than other_than) serves as leader; its index."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None and leader != other_than:
                return leader
            time.sleep(poll_s)
        raise AssertionError(f"no leader within {timeout_s} s: modes {self.modes()}")

    def wait_quorum(self, timeout_s: float = serve_timeout_s) -> float:
        """Until a leader exists and every running server serves as leader or follower;
        return the seconds it took."""
        started = time.monotonic()
        while True:
            running = [index for index, server in enumerate(self.servers) if server.alive]
            modes = [self.servers[index].mode() for index in running]
            if "leader" in modes and all(mode in modes_serving for mode in modes):
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"no quorum within {timeout_s} s: servers {running} "
                                     f"answer {modes}; see {self.directory}/server*/zookeeper.log")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop every server by PID (SIGTERM, then SIGKILL if it lingers)."""
        for server in self.servers:
            server.stop()
