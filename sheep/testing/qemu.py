"""QEMU with no guest, for tests: a VDI as its virtio-blk drive (through NBD), QMP
on a unix socket, and HMP's qemu-io to write and read through QEMU's block layer.
Under TCG (-accel tcg): KVM's -cpu host fails on these machines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from typing import Any

from sheep.testing.cluster import stop_process


class Qmp:
    """A QMP connection to one QEMU (its unix socket)."""

    def __init__(self, path: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.socket = socket.socket(socket.AF_UNIX)
                self.socket.connect(path)
                break
            except OSError:
                self.socket.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.socket.makefile("rw")
        self.file.readline()  # the greeting
        self.lock = threading.Lock()
        self.command("qmp_capabilities")

    def command(self, name: str, **arguments: Any) -> Any:
        with self.lock:
            self.file.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
            self.file.flush()
            while True:
                reply = json.loads(self.file.readline())
                if "error" in reply:
                    raise RuntimeError(f"{name}: {reply['error']}")
                if "return" in reply:
                    return reply["return"]

    def close(self) -> None:
        self.socket.close()


class Qemu:
    """qemu-system-x86_64 with no guest, the VDI as a virtio-blk drive, and QMP."""

    def __init__(self, directory: str, name: str, nbd_uri: str,
                 incoming: int | str | None = None, wrap: tuple[str, ...] = ()) -> None:
        """incoming: a port on 127.0.0.1, or HOST:PORT, to wait for a migration on;
        wrap: a command prefix (ip netns exec NAME) to run QEMU inside a test host."""
        self.qmp_path = os.path.join(directory, f"{name}.qmp")
        self.log_path = os.path.join(directory, f"{name}.log")
        command = ["qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-nodefaults",
                   "-display", "none", "-m", "64",
                   "-drive", f"file={nbd_uri},format=raw,if=none,id=d0,cache=none",
                   "-device", "virtio-blk-pci,drive=d0",
                   "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if incoming is not None:
            where = incoming if isinstance(incoming, str) else f"127.0.0.1:{incoming}"
            command += ["-incoming", f"tcp:{where}"]
        command = [*wrap, *command]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL)
        try:
            self.qmp = Qmp(self.qmp_path)
        except OSError:
            stop_process(self.process)
            raise AssertionError(f"QEMU {name} did not start: {self.log()}") from None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as file:
            return file.read()

    def qemu_io(self, command: str, timeout_s: float = 30.0) -> str:
        """One qemu-io command on drive d0, through HMP; its outcome line. HMP's
        qemu-io prints to QEMU's stdout (our log), not into the QMP reply."""
        before = len(self.log())
        self.qmp.command("human-monitor-command",
                         **{"command-line": f'qemu-io d0 "{command}"'})
        deadline = time.monotonic() + timeout_s
        while True:
            output = self.log()[before:]
            if any(word in output for word in ("wrote ", "read ", "failed", "rror")):
                return output
            if time.monotonic() > deadline:
                return output
            time.sleep(0.01)

    def migrated(self, timeout_s: float = 120) -> str:
        """Wait for this (the source's) migration to end; its status then."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status: str = self.qmp.command("query-migrate").get("status", "")
            if status in ("completed", "failed", "cancelled"):
                return status
            time.sleep(0.05)
        raise AssertionError("the migration did not end in time")

    def stop(self) -> None:
        self.qmp.close()
        stop_process(self.process)


def wrote(output: str, count: int, offset: int) -> bool:
    return f"wrote {count}/{count} bytes at offset {offset}" in output


def read_ok(output: str, count: int, offset: int) -> bool:
    return (f"read {count}/{count} bytes at offset {offset}" in output
            and "Pattern verification failed" not in output)
