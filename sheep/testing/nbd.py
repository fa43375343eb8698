"""nbdkit with our plugin, for tests: started in the foreground, stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from typing import Any

from sheep.testing.cluster import free_port, stop_process

PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "nbd_plugin", "plugin.py")


class NbdServer:
    unix: str | None = None  # a unix socket served instead of a TCP port

    def __init__(self, sheep_ports: list[int], log_path: str, threads: int = 8,
                 readonly: bool = False, unix: str | None = None,
                 params: tuple[str, ...] = ()) -> None:
        """Serve on a free 127.0.0.1 port, or on the unix socket path given; params
        are more plugin parameters (lock=nbdkit)."""
        self.port = free_port()
        self.unix = unix
        self.log_path = log_path
        sheep = ",".join(f"127.0.0.1:{port}" for port in sheep_ports)
        command = ["nbdkit", "-f", "-v" if os.environ.get("NBD_DEBUG") else "-s",
                   *(["-U", unix] if unix else ["-p", str(self.port), "-i", "127.0.0.1"]),
                   "-t", str(threads)]
        command = [part for part in command if part != "-s"]
        if readonly:
            command.append("-r")
        command += ["python", PLUGIN, f"sheep={sheep}", *params]
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)
        self._wait_listening()

    def uri(self, export: str) -> str:
        if self.unix:
            return f"nbd+unix:///{export}?socket={self.unix}"
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def _wait_listening(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nbdkit exited: {self.log()}")
            if self.unix:
                if os.path.exists(self.unix):
                    return
            else:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                        return
            time.sleep(0.05)
        raise RuntimeError(f"nbdkit not listening within {timeout_s} s: {self.log()}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as file:
            return file.read()

    def stop(self) -> None:
        stop_process(self.process)


def needs_tools(*tools: str, packages: str) -> Any:
    """A pytest mark: skip where the NBD tools are absent, except in CI (CI=true),
    where scripts/test installs them, so their absence fails instead of skipping."""
    import pytest

    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing and os.environ.get("CI") == "true":
        raise RuntimeError(
            f"CI lacks {', '.join(missing)}: scripts/test should have installed {packages}")
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} ({packages})")


def fio_command(uri: str, *extra: str, aux_path: str) -> list[str]:
    """fio on the nbd engine: 32 MiB of 64 KiB random writes, 8 in flight, each block
    verified (crc32c) at the end, and by reads interleaved with the writes when extra
    says --verify_backlog; --verify_only=1 reads back and verifies what a run wrote.
    Files fio makes of its own (verify state) go to aux_path, the test's temporary
    directory, never to the current one."""
    return ["fio", "--output-format=json", "--name=continuity", "--ioengine=nbd",
            f"--uri={uri}", "--rw=randwrite", "--bs=64k", "--iodepth=8", "--size=32M",
            "--verify=crc32c", "--randrepeat=1", "--verify_state_save=0",
            f"--aux-path={aux_path}", *extra]


def fio_jobs(returncode: int, stdout: str, stderr: str) -> list[Any]:
    """The jobs of a fio run that must have finished without an error or a bad block."""
    assert returncode == 0, (stdout[-3000:], stderr[-3000:])
    assert "verify" not in stderr and "error" not in stderr.lower(), stderr
    jobs: list[Any] = json.loads(stdout[stdout.index("{"):])["jobs"]
    assert [job["error"] for job in jobs] == [0], jobs
    return jobs
