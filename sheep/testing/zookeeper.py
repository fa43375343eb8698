"""A private ZooKeeper for tests: Debian's zookeeper package run standalone, with
its own data directory on a free 127.0.0.1 port (never the system service), and
stopped by PID."""

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


def missing() -> str | None:
    """Why a private ZooKeeper cannot run here, or None."""
    if shutil.which("java") is None:
        return "java is not installed (Debian package zookeeper)"
    if not os.path.exists(ZOOKEEPER_JAR):
        return f"{ZOOKEEPER_JAR} is missing (Debian package zookeeper)"
    return None


class ZooKeeperServer:
    def __init__(self, directory: str, tick_ms: int = 200, address: str = "127.0.0.1") -> None:
        self.directory = directory
        self.address = address
        self.port = free_port()
        os.makedirs(os.path.join(directory, "data"), exist_ok=True)
        config = os.path.join(directory, "zoo.cfg")
        with open(config, "w") as file:
            file.write(f"tickTime={tick_ms}\ndataDir={directory}/data\nclientPort={self.port}\n"
                       f"clientPortAddress={address}\nadmin.enableServer=false\n"
                       f"minSessionTimeout={2 * tick_ms}\nmaxSessionTimeout=60000\n"
                       "4lw.commands.whitelist=ruok,stat\n")
        self.log_path = os.path.join(directory, "zookeeper.log")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["java", "-Xmx256m", "-cp", f"{ZOOKEEPER_JAR}:{CONF_DIR}",
                 f"-Dzookeeper.log.dir={directory}", "-Dzookeeper.root.logger=INFO,CONSOLE",
                 "org.apache.zookeeper.server.ZooKeeperServerMain", config],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self._wait_serving()

    @property
    def hosts(self) -> str:
        return f"{self.address}:{self.port}"

    def _wait_serving(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ZooKeeper exited; see {self.log_path}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1) as sock:
                    sock.sendall(b"ruok")
                    if sock.recv(4) == b"imok":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"ZooKeeper not serving within {timeout_s} s; see {self.log_path}")

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): every session loses its connection."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        stop_process(self.process)
