"""The ``sheep`` command: check the store and the port, daemonize, run a Sheep.

Every check that can fail for a user's reason (a busy store directory, a port
in use, an unwritable directory) runs before the fork, so the error reaches the
terminal. The daemon reports back through a pipe once it has joined the
cluster; only then does the command return 0, so a loop of ``sheep`` commands
leaves a working cluster behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import logging.handlers
import os
import signal
import socket
import sys
import time
from typing import IO

import click
import uvloop

from sheep import auth, constants, world
from sheep.allocator import keep_large_blocks_in_the_heap
from sheep.cluster.driver import default_local_directory, make_driver
from sheep.daemon import Sheep, SheepConfig
from sheep.errors import EXIT_FAILURE, EXIT_USAGE, SheepError, UsageError
from sheep.node import parse_domain
from sheep.size import parse_size
from sheep.store import Store

log = logging.getLogger("sheep")

ready_timeout_s = 60.0
note_prefix = "note: "  # a line the daemon sends its waiting parent before its verdict


class StartError(Exception):
    """A reason the sheep cannot start, told to the user in one line."""


def _lock_directory(directory: str) -> int:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise StartError(f"cannot create store directory {directory}: {error.strerror}") from error
    if not os.path.isdir(directory):
        raise StartError(f"store path {directory} is not a directory")
    probe = os.path.join(directory, ".write-test")
    try:
        with open(probe, "w") as file:
            file.write("ok")
        os.unlink(probe)
    except OSError as error:
        raise StartError(f"cannot write to store directory {directory}: {error.strerror}") from error
    lock_path = os.path.join(directory, "sheep.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = _read_pid(directory)
        holder = f" (pid {pid})" if pid else ""
        raise StartError(f"store directory {directory} is in use by a running sheep{holder}") from None
    return fd


def _read_pid(directory: str) -> int | None:
    try:
        with open(os.path.join(directory, "sheep.pid")) as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None


def _bind(address: str, port: int) -> socket.socket:
    try:
        return world.bind(address, port)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise StartError(f"port {port} on {address} is already in use") from error
        if error.errno == errno.EADDRNOTAVAIL:
            raise StartError(f"address {address} is not an address of this host") from error
        raise StartError(f"cannot listen on {address}:{port}: {error.strerror}") from error


def _setup_logging(level: str, stream: IO[str] | None, path: str | None) -> None:
    handlers: list[logging.Handler] = []
    if stream is not None:
        handlers.append(logging.StreamHandler(stream))
    if path is not None:  # reopened once renamed (logrotate), at the next line logged
        handlers.append(logging.handlers.WatchedFileHandler(path))
    logging.basicConfig(
        level=level.upper(), handlers=handlers, force=True,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")


def _reopen_log() -> None:
    """SIGHUP, from logrotate: sheep.log is the file now at its path, at once."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.WatchedFileHandler):
            with handler.lock or contextlib.nullcontext():
                handler.reopenIfNeeded()
    log.info("SIGHUP: log file reopened")


def _daemonize(directory: str) -> int:
    """Fork into the background. Returns the write end of the readiness pipe in the daemon;
    the parent never returns: it exits with the daemon's verdict."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_end)
        sys.exit(_wait_ready(read_end, pid, directory))
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return write_end


def _wait_ready(read_end: int, pid: int, directory: str) -> int:
    import select

    os.waitpid(pid, 0)  # the first child exits at once; the daemon is its child
    message = b""
    deadline = time.monotonic() + ready_timeout_s
    notes: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([read_end], [], [], left)
        if not readable:
            break
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        message += chunk
        while b"\n" in message and message.startswith(note_prefix.encode()):
            line, _, message = message.partition(b"\n")
            notes.append(line[len(note_prefix):].decode(errors="replace"))
            click.echo(f"sheep: {notes[-1]}", err=True)  # said at once, while it waits
    text = message.decode(errors="replace").strip()
    if text == "ok":
        return 0
    if not text:
        waiting = f" ({notes[-1]})" if notes else ""
        text = (f"the sheep did not report ready within {ready_timeout_s:.0f} s{waiting};"
                f" it goes on trying in the background: see"
                f" {os.path.join(directory, 'sheep.log')}")
    click.echo(f"sheep: {text}", err=True)
    return EXIT_FAILURE


def _report(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, message.encode())
        os.close(fd)
    except OSError:
        pass


def _note(fd: int, message: str) -> None:
    """A line for the waiting parent's terminal while the daemon starts (a cluster
    driver that cannot reach its service yet)."""
    try:
        os.write(fd, f"{note_prefix}{message}\n".encode())
    except OSError:
        pass


def _serve_metrics(sheep: Sheep, port: int) -> None:
    """Prometheus text on http://ADDRESS:PORT/metrics, from a thread of its own."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=sheep.config.address, registry=sheep.metrics.registry)
    except OSError as error:
        raise StartError(f"cannot serve metrics on {sheep.config.address}:{port}:"
                         f" {error.strerror}") from error


async def _run(sheep: Sheep, sock: socket.socket, ready_fd: int | None,
               metrics_port: int | None) -> int:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(sheep.stop()))
    loop.add_signal_handler(signal.SIGHUP, _reopen_log)
    if metrics_port is not None:
        try:
            _serve_metrics(sheep, metrics_port)
        except StartError as error:
            _report(ready_fd, str(error))
            log.error("cannot start: %s", error)
            return EXIT_FAILURE
    if ready_fd is not None:  # the foreground's log on stderr says it already
        sheep.driver.notice = lambda text: _note(ready_fd, text)
    try:
        await sheep.start(sock)
    except Exception as error:  # noqa: BLE001 - a stop during start ends it any way it can
        sheep.driver.notice = lambda text: None  # the pipe closes with the verdict
        if sheep.stopping:  # SIGTERM while starting (its cluster driver unreachable)
            log.info("start ended by the stop: %r", error)
            _report(ready_fd, "stopped before it joined the cluster")
            await sheep.stopped.wait()
            log.info("sheep stopped before it joined the cluster")
            return 0
        if not isinstance(error, SheepError):
            raise
        _report(ready_fd, error.message)
        log.error("cannot start: %s", error.message)
        return EXIT_FAILURE
    sheep.driver.notice = lambda text: None
    _report(ready_fd, "ok")
    await sheep.stopped.wait()
    log.info("sheep stopped")
    return 0


def _keyring_path(keyring: str | None, driver: str) -> str | None:
    """The node keyring's file, as _node_key reads it."""
    if keyring is not None:
        return os.path.abspath(keyring)
    name, _, argument = driver.partition(":")
    if name != "local":
        return None
    return auth.cluster_keyring_path(os.path.abspath(argument or default_local_directory()))


def _node_key(keyring: str | None, driver: str) -> bytes:
    """The cluster's node key: from --keyring, or, with the local driver, from its shared
    directory (made there by the first sheep)."""
    path = _keyring_path(keyring, driver)
    if path is None:
        raise UsageError(f"the {driver.partition(':')[0]} driver needs --keyring FILE with"
                         " the cluster's [node] key ('dog auth new-keyring FILE' makes one;"
                         " copy it to every host)")
    if keyring is None:
        return auth.node_keyring(path).key
    entries = auth.load_keyring(path)
    if auth.NODE not in entries:
        raise UsageError(f"keyring {keyring} has no [node] section")
    return entries[auth.NODE].key


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("-p", "--port", type=click.IntRange(1, 65535), default=constants.port_default,
              show_default=True, help="Port to listen on.")
@click.option("-b", "--bind", "address", default=constants.address_default, show_default=True,
              help="Address to listen on; peers and clients reach the sheep there.")
@click.option("-c", "--cluster", "driver", default="local", show_default=True,
              help="Cluster driver. local or local:PATH: the sheep of this host, through a"
                   " shared directory. zookeeper:HOSTS[/PREFIX][?timeout=SECONDS], HOSTS"
                   " being HOST:PORT[,HOST:PORT...]: sheep on several hosts, through a"
                   " ZooKeeper ensemble (needs --keyring; PREFIX /sheepdog by default).")
@click.option("-z", "--zone", default=None, metavar="[RACK/]HOST",
              help="Failure domains, as whole numbers: the host (zone), and the rack above it."
                   " The copies of an object go to distinct racks when there are as many"
                   " racks as copies, else to distinct hosts spread over every rack. Sheep"
                   " of one machine share a HOST. Default: the sheep is its own host.")
@click.option("-w", "--weight", default=None,
              help="Placement weight as a size (e.g. 4T): the node gets copies in proportion to"
                   " it, at any size (0: it stores nothing). Default: the free space of"
                   " DIRECTORY. 'dog node weight' changes it on a running cluster.")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground, log to stderr.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics on this port, at /metrics, on the sheep's"
                   " address (off when not given).")
@click.option("--io-scheduler", type=click.Choice(["mclock", "fifo"]), default="mclock",
              show_default=True,
              help="mclock: clients first, background work in the room they leave, VDI QoS,"
                   " recovery tuned to client latency. fifo: everything at once, no QoS (for"
                   " comparisons).")
@click.option("--keyring", "keyring", default=None, type=click.Path(dir_okay=False),
              help="Keyring file holding the cluster's [node] key (mode 0600). Default with"
                   " the local driver: 'keyring' in its shared directory, made by the first"
                   " sheep. Required with zookeeper: copy it to every host.")
@click.option("--no-checksums", is_flag=True,
              help="Keep no per-block checksums (damage goes unnoticed). For measuring their"
                   " cost only; a store keeps the setting it was created with.")
@click.option("--lock-handoff-wait", "handoff_wait_s", type=click.FloatRange(0.5, 20),
              default=3.0, show_default=True,
              help="Seconds a client's first write to a VDI whose lock another client holds"
                   " waits for that writer to flush and go idle (then the lock is handed"
                   " over, as in a live migration) before it is refused. At most 20, so the"
                   " answer comes within a client's 30 s request timeout. A holder whose"
                   " sheep does not answer is waited for until the cluster declares it dead.")
@click.version_option(package_name="sheepdog")
def command(directory: str, port: int, address: str, driver: str, zone: str | None,
            weight: str | None, foreground: bool, log_level: str, metrics_port: int | None,
            io_scheduler: str, keyring: str | None, no_checksums: bool,
            handoff_wait_s: float) -> None:
    """Run a sheep: a storage daemon of the cluster, keeping its objects in DIRECTORY."""
    directory = os.path.abspath(directory)
    rack = host = None
    if zone is not None:
        try:
            rack, host = parse_domain(zone)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="'-z/--zone'") from None
    weight_bytes = None
    if weight is not None:
        try:
            weight_bytes = parse_size(weight)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="'-w/--weight'") from None
        if weight_bytes > constants.weight_max_bytes:
            raise click.BadParameter(f"{weight} is above the largest weight, 1E",
                                     param_hint="'-w/--weight'")
    try:
        make_driver(driver)  # a bad -c is told first
    except SheepError as error:
        raise click.BadParameter(error.message, param_hint="'-c/--cluster'") from None
    try:
        node_key = _node_key(keyring, driver)
    except SheepError as error:
        click.echo(f"sheep: {error.message}", err=True)
        sys.exit(error.exit_code)
    # The ZooKeeper driver guards the cluster's znodes with ACLs from the node key.
    cluster_driver = make_driver(driver, secret=node_key)
    try:
        lock_fd = _lock_directory(directory)
        sock = _bind(address, port)
        if metrics_port is not None:
            if metrics_port == port:
                raise StartError(f"the metrics port {metrics_port} is the sheep's own port")
            _bind(address, metrics_port).close()  # in use or not, said here, on the terminal
    except StartError as error:
        click.echo(f"sheep: {error}", err=True)
        sys.exit(EXIT_FAILURE)

    ready_fd = None if foreground else _daemonize(directory)
    log_path = os.path.join(directory, "sheep.log")
    _setup_logging(log_level, sys.stderr if foreground else None, log_path)
    with open(os.path.join(directory, "sheep.pid"), "w") as file:
        file.write(f"{os.getpid()}\n")
    config = SheepConfig(directory=directory, address=address, port=port, zone=host, rack=rack,
                         weight=weight_bytes, io_scheduler=io_scheduler, node_key=node_key,
                         keyring_path=_keyring_path(keyring, driver),
                         handoff_wait_s=handoff_wait_s)
    keep_large_blocks_in_the_heap()  # a frame's buffers without fresh mappings
    sheep = Sheep(config, Store(directory, checksums=not no_checksums), cluster_driver)
    # uvloop (libuv) runs the same asyncio code with far less overhead per event.
    code = uvloop.run(_run(sheep, sock, ready_fd, metrics_port))
    try:
        os.unlink(os.path.join(directory, "sheep.pid"))
    except OSError:
        pass
    os.close(lock_fd)
    sys.exit(code)


def main() -> None:
    try:
        command.main(standalone_mode=False)
    except click.UsageError as error:
        error.show()
        sys.exit(EXIT_USAGE)
    except click.Abort:
        sys.exit(EXIT_FAILURE)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
