"""Test "hosts" in network namespaces: each a namespace with one veth into a bridge
that the test creates, with its own address; a host is cut off by taking its
link down (a silent cut: no resets, packets just stop). Everything is created by
the test and removed by it; processes are stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    probe = f"sdprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _free_prefix(subnet: int) -> str:
    """A 10.SUBNET.X/24 that no link on this machine has an address in: tests running
    side by side (pytest -n) each get their own."""
    shown = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True,
                           text=True).stdout
    start = os.getpid() % 200
    for step in range(200):
        prefix = f"10.{subnet}.{(start + step) % 200 + 20}"
        if f" {prefix}." not in shown:
            return prefix
    raise RuntimeError(f"no free 10.{subnet}.X/24 for test hosts")


@dataclass
class Host:
    index: int
    namespace: str
    veth: str  # the root side of its link
    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, command: list[str], log_path: str) -> subprocess.Popen[bytes]:
        """Start a process inside this host."""
        with open(log_path, "ab") as log:
            process = subprocess.Popen(["ip", "netns", "exec", self.namespace, *command],
                                       stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def call(self, command: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # errors="replace": a command may print raw bytes (dog vdi read does).
        return subprocess.run(["ip", "netns", "exec", self.namespace, *command],
                              capture_output=True, text=True, errors="replace", timeout=timeout)


class Network:
    """A bridge on the root side (address .1) and hosts .11, .12, ... behind it."""

    def __init__(self, hosts: int, subnet: int = 77) -> None:
        tag = f"{os.getpid() % 10000}"
        self.bridge = f"sdbr{tag}"
        self.prefix = _free_prefix(subnet)
        self.gateway = f"{self.prefix}.1"
        self.hosts: list[Host] = []
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for index in range(hosts):
                self._add_host(index, tag)
        except BaseException:
            self.close()
            raise

    def _add_host(self, index: int, tag: str) -> None:
        host = Host(index, f"sd{tag}h{index}", f"sd{tag}v{index}", f"{self.prefix}.{11 + index}")
        _ip("netns", "add", host.namespace)
        self.hosts.append(host)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", f"sd{tag}p{index}")
        _ip("link", "set", f"sd{tag}p{index}", "netns", host.namespace)
        _ip("link", "set", host.veth, "master", self.bridge)
        _ip("link", "set", host.veth, "up")
        inside = ["netns", "exec", host.namespace, "ip"]
        _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "link", "set", f"sd{tag}p{index}", "name", "eth0")
        _ip(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip(*inside, "link", "set", "eth0", "up")
        _ip(*inside, "route", "add", "default", "via", self.gateway)

    def cut(self, host: Host) -> None:
        _ip("link", "set", host.veth, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.veth, "up")

    def close(self) -> None:
        for host in self.hosts:
            for process in host.processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    process.wait(timeout=30)
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def sheep_command(directory: str, address: str, port: int, driver: str, zone: int,
                  keyring: str) -> list[str]:
    return [sys.executable, "-m", "sheep", directory, "-f", "-b", address, "-p", str(port),
            "-z", str(zone), "-c", driver, "-w", "80G", "--keyring", keyring]
