"""The nbdkits dog started, as records in a per-user state directory.

Each server has DIR/NAME.json (pid, address, sheep, start time, dog's and nbdkit's
command lines) and DIR/NAME.pid (written by nbdkit), NAME from the address it
serves, so one address has one record. A record is live while its pid runs the
very nbdkit command it recorded (/proc/PID/cmdline): a server that died, or a pid
reused by another process, is stale, and listing drops it. Nothing here asks the
sheep: exports come from nbdinfo, and dog (dog/nbd.py) asks the cluster for its
attachments, which clients() sorts by the nbdkit they came through.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

nbd_port_default = 10809
listen_host_default = "127.0.0.1"
stop_timeout_s_default = 10.0
kill_wait_s = 5.0
pidfile_wait_s = 10.0
poll_interval_s = 0.05
nbdinfo_timeout_s = 5.0
attachments_timeout_s = 10.0  # for asking the whole cluster what is attached

# The owner our plugin names at each open (nbd_plugin/plugin.py, _open_on), to which
# the sheep adds " (via sheep NODE_ID)": how an attachment names its nbdkit and client.
_owner = re.compile(r"nbdkit pid (\d+) on (.+?), NBD client (.+?)(?: \(via sheep [^()]*\))?")


class ServerError(Exception):
    """A reason in one line, for dog to print."""


def default_state_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "sheepdog-nbd")
    return os.path.join(tempfile.gettempdir(), f"sheepdog-nbd-{os.getuid()}")


def open_state_dir(path: str, create: bool) -> bool:
    """Make sure path is our own directory (it may sit in a shared /tmp); False when it
    does not exist and create is False."""
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as error:
            raise ServerError(f"cannot create the state directory {path}:"
                              f" {error.strerror}") from error
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ServerError(f"{path} is not a directory of this user's: pass --state-dir DIR")
    return True


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT, HOST (port 10809) or :PORT (on 127.0.0.1)."""
    host, port = text, nbd_port_default
    if text.startswith("[") and "]" in text:
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r} is not HOST:PORT")
            port = _port(text, rest[1:])
    elif text.count(":") == 1:
        host, _, digits = text.partition(":")
        port = _port(text, digits)
    elif ":" in text:
        raise ValueError(f"write an IPv6 address as [{text}]:PORT")
    elif text.isdigit():
        raise ValueError(f"{text!r} is a port: write :{text} (loopback) or HOST:{text}")
    if not re.fullmatch(r"[\w.:%-]*", host):
        raise ValueError(f"{host!r} is not a host name or address")
    return host or listen_host_default, port


def _port(text: str, digits: str) -> int:
    if not digits.isdigit() or not 1 <= int(digits) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return int(digits)


def format_listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Server:
    pid: int
    listen: str | None  # HOST:PORT, or None on a unix socket
    unix: str | None  # the socket's absolute path
    url: str  # how clients name an export: nbd://HOST:PORT/NAME
    sheep: str  # HOST:PORT of the sheep the plugin talks to first
    started: float  # seconds since the epoch
    command: list[str]  # dog's command line
    nbdkit_command: list[str]
    pidfile: str
    readonly: bool = False
    tls_psk: str | None = None
    path: str = field(default="", compare=False)  # the record's own file, not stored

    @property
    def address(self) -> str:
        return self.listen if self.listen is not None else f"unix:{self.unix}"

    def alive(self) -> bool:
        return (os.path.basename(self.nbdkit_command[0] if self.nbdkit_command else "")
                == "nbdkit" and runs(self.pid, self.nbdkit_command))


def record_name(listen: str | None, unix: str | None) -> str:
    if unix is not None:
        return "unix-" + hashlib.sha256(os.path.abspath(unix).encode()).hexdigest()[:16]
    assert listen is not None
    return "tcp-" + listen.replace("[", "").replace("]", "").replace(":", "-")


def record_path(state_dir: str, listen: str | None, unix: str | None) -> str:
    return os.path.join(state_dir, record_name(listen, unix) + ".json")


def pidfile_path(state_dir: str, listen: str | None, unix: str | None) -> str:
    return os.path.join(state_dir, record_name(listen, unix) + ".pid")


def write(server: Server) -> None:
    """Atomically: a reader sees the old record or the new one."""
    record = asdict(server)
    del record["path"]
    temporary = f"{server.path}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        json.dump(record, file, indent=2, sort_keys=True)
        file.write("\n")
    os.replace(temporary, server.path)


def read(path: str) -> Server | None:
    """The record at path; None when it is gone or unreadable (a half-written record
    cannot exist, see write)."""
    try:
        with open(path) as file:
            return Server(**json.load(file), path=path)
    except (OSError, ValueError, TypeError):
        return None


def remove(server: Server) -> None:
    """The record, and its pid file when it still names this server."""
    paths = [server.path]
    if read_pid(server.pidfile) == server.pid:
        paths.append(server.pidfile)
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def read_pid(path: str) -> int | None:
    try:
        with open(path) as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None


def servers(state_dir: str) -> list[Server]:
    """The live servers, oldest first; stale records are removed on the way."""
    if not open_state_dir(state_dir, create=False):
        return []
    found = []
    for name in sorted(os.listdir(state_dir)):
        if not name.endswith(".json"):
            continue
        server = read(os.path.join(state_dir, name))
        if server is None:
            continue
        if server.alive():
            found.append(server)
        else:
            remove(server)
    return sorted(found, key=lambda server: server.started)


def runs(pid: int, command: list[str]) -> bool:
    """Whether pid is a live process running exactly command (not a zombie, not a pid
    the kernel handed to someone else since)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            arguments = file.read().split(b"\0")
    except OSError:
        return False
    if arguments and arguments[-1] == b"":
        arguments.pop()
    return [argument.decode(errors="surrogateescape") for argument in arguments] == command


def match(found: list[Server], target: str) -> list[Server]:
    """The servers a stop target names: a pid, an address as listed (HOST:PORT, :PORT,
    unix:PATH) or a socket path."""
    if target.isdigit():
        return [server for server in found if server.pid == int(target)]
    if target.startswith("unix:") or "/" in target:
        path = os.path.abspath(target.removeprefix("unix:"))
        return [server for server in found if server.unix == path]
    try:
        listen = format_listen(*parse_listen(target))
    except ValueError:
        return []
    return [server for server in found if server.listen == listen]


def stop(server: Server, timeout_s: float, say: Callable[[str], None]) -> None:
    """SIGTERM, wait; SIGKILL when it outlives timeout_s (said); then its record goes."""
    if _signal(server, signal.SIGTERM) and not _wait_gone(server, timeout_s):
        say(f"nbdkit pid {server.pid} did not exit within {timeout_s:g} s of SIGTERM:"
            f" killing it (SIGKILL)")
        if _signal(server, signal.SIGKILL) and not _wait_gone(server, kill_wait_s):
            raise ServerError(f"nbdkit pid {server.pid} outlived SIGKILL by {kill_wait_s:g} s")
    remove(server)


def _signal(server: Server, signum: int) -> bool:
    """Signal the server if it is still the process recorded; False when it is gone."""
    if not server.alive():
        return False
    try:
        os.kill(server.pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError as error:
        raise ServerError(f"may not signal nbdkit pid {server.pid}: {error.strerror}") from error
    return True


def _wait_gone(server: Server, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while server.alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_interval_s)
    return True


def exports(server: Server) -> tuple[list[str] | None, str | None]:
    """The export names nbdinfo --list gets from the server, or None and why not."""
    nbdinfo = shutil.which("nbdinfo")
    if nbdinfo is None:
        return None, "nbdinfo is not installed (Debian: libnbd-bin)"
    try:
        listing = subprocess.run([nbdinfo, "--list", "--json", list_uri(server)],
                                 capture_output=True, text=True, timeout=nbdinfo_timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"nbdinfo --list did not answer within {nbdinfo_timeout_s:g} s"
    if listing.returncode != 0:
        lines = [line for line in listing.stderr.splitlines() if line.strip()]
        return None, lines[-1] if lines else f"nbdinfo --list exited {listing.returncode}"
    try:
        items = json.loads(listing.stdout)["exports"]
        return [str(item["export-name"]) for item in items], None
    except (ValueError, KeyError, TypeError):
        return None, "nbdinfo --list printed no export list"


def list_uri(server: Server) -> str:
    """The URI nbdinfo lists the server's exports with: over TLS as the first user of
    the PSK file, on TCP through loopback when it listens on every address."""
    user = _psk_user(server.tls_psk) if server.tls_psk else None
    scheme = "nbds" if server.tls_psk else "nbd"
    query = [f"tls-psk-file={server.tls_psk}"] if server.tls_psk else []
    who = f"{user}@" if user else ""
    if server.unix is not None:
        return f"{scheme}+unix://{who}/?" + "&".join([f"socket={server.unix}", *query])
    assert server.listen is not None
    host, port = parse_listen(server.listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://{who}{format_listen(host, port)}/" + (f"?{query[0]}" if query else "")


def _psk_user(path: str) -> str | None:
    try:
        with open(path) as file:
            user, colon, _ = file.readline(4096).partition(":")
    except OSError:
        return None
    return user.strip() if colon else None


def owner_nbdkit(owner: str) -> tuple[int, str, str] | None:
    """(nbdkit's pid, its host, the NBD client) an attachment's owner names; None when
    the open was not made by our plugin (dog vdi write, a plugin given owner=)."""
    found = _owner.fullmatch(owner)
    return (int(found[1]), found[2], found[3]) if found else None


def clients(server: Server, attachments: list[dict[str, Any]], vdis: list[dict[str, Any]],
            host: str) -> list[dict[str, Any]]:
    """The attachments (dog.vdi.cluster_attachments) made through this server's nbdkit
    on this host, as its clients: the client's address, the export it opened (NAME, or
    NAME@TAG for a snapshot: NAME@ID when untagged), rw or ro, the sheep serving it.
    The plugin shares one read-only open among the readers of an export (and one
    writable open among all writers with --lock-scope nbdkit): such a group is one
    client here, named by whoever opened it first."""
    tags = {(item["name"], item["id"]): item["tag"] for item in vdis if item["snapshot"]}
    found = []
    for item in attachments:
        named = owner_nbdkit(str(item.get("owner") or ""))
        if named is None or named[:2] != (server.pid, host):
            continue
        snapshot = item.get("snapshot")
        export = item["name"] if snapshot is None else (
            f"{item['name']}@{tags.get((item['name'], snapshot)) or snapshot}")
        found.append({"address": named[2], "vdi": export, "mode": item["mode"],
                      "holds_lock": bool(item.get("holds_lock")), "sheep": item.get("node_id"),
                      "since": item.get("since")})
    return sorted(found, key=lambda client: (client["vdi"], client["address"]))
