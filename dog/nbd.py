"""dog nbd serve, list, stop: export every VDI over NBD through nbdkit and our plugin.

As everywhere in dog, -a/-p name the sheep; the NBD side is --listen HOST:PORT
(127.0.0.1:10809 unless another address is chosen) or --unix PATH. serve leaves
nbdkit in the background (or becomes it with -f) and records it in a per-user
state directory (dog/nbd_servers.py), which list and stop read; list also asks
the cluster which clients are attached through each nbdkit. (--port is -p's long
form, the sheep's port: the NBD port is only ever --listen.)

With --tls-psk FILE nbdkit requires TLS with pre-shared keys (a psktool file of
USER:KEY lines) from every client, so the NBD hop is encrypted and only holders of
a key may connect; the plugin's own hop to the sheep is authenticated and signed
by the sheep protocol whatever this says (docs/security.md, NBD)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, NoReturn

import click

from dog import nbd_servers
from dog.common import Target, connection_options, credential_options, json_option, run
from dog.nbd_servers import Server, ServerError, format_listen, nbd_port_default
from dog.output import error, format_time, print_json, print_table
from dog.vdi import cluster_attachments
from sheep.client import Client
from sheep.errors import EXIT_EXISTS, EXIT_MISSING, EXIT_SYSTEM, SheepError


def plugin_path() -> str:
    import nbd_plugin

    return os.path.join(os.path.dirname(os.path.abspath(nbd_plugin.__file__)), "plugin.py")


def _fail(message: str, code: int = EXIT_SYSTEM) -> NoReturn:
    error(message)
    sys.exit(code)


def check_nbdkit() -> str:
    """nbdkit and its python plugin, or one line saying which package to install."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        _fail("nbdkit is not installed: install it with 'apt-get install nbdkit "
              "nbdkit-plugin-python'")
    assert nbdkit is not None
    probe = subprocess.run([nbdkit, "python", "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        _fail("nbdkit's python plugin is not installed: install it with "
              "'apt-get install nbdkit-plugin-python'")
    return nbdkit


def nbdkit_command(nbdkit: str, target: Target, listen: tuple[str, int], unix: str | None,
                   readonly: bool, foreground: bool, threads: int,
                   pidfile: str | None, retry: float | None = None,
                   tls_psk: str | None = None, lock_scope: str = "client") -> list[str]:
    command = [nbdkit]
    if foreground:
        command.append("-f")
    if readonly:
        command.append("-r")
    if tls_psk:
        command += ["--tls=require", f"--tls-psk={os.path.abspath(tls_psk)}"]
    if unix:
        command += ["-U", unix]
    else:
        command += ["-p", str(listen[1]), "-i", listen[0]]
    if pidfile:
        command += ["-P", pidfile]
    command += ["-t", str(threads), "python", plugin_path(),
                f"sheep={target.address}:{target.port}"]
    if retry is not None:
        command.append(f"retry={retry:g}")
    if lock_scope != "client":
        command.append(f"lock={lock_scope}")
    if target.keyring is not None:  # else the plugin looks where dog looks (DOG_KEYRING...)
        command.append(f"keyring={os.path.abspath(target.keyring)}")
    if target.name is not None:
        command.append(f"name={target.name}")
    return command


class ListenType(click.ParamType):
    """HOST:PORT, [IPV6]:PORT, HOST or :PORT, as (host, port)."""

    name = "host:port"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        try:
            return nbd_servers.parse_listen(str(value))
        except ValueError as reason:
            self.fail(str(reason), param, ctx)


state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False), default=None, envvar="DOG_NBD_STATE_DIR",
    help="Where the records of running servers are kept (env DOG_NBD_STATE_DIR; default"
         " $XDG_RUNTIME_DIR/sheepdog-nbd, else /tmp/sheepdog-nbd-UID).")


def _state_dir(state_dir: str | None, create: bool) -> str:
    path = os.path.abspath(state_dir or nbd_servers.default_state_dir())
    try:
        nbd_servers.open_state_dir(path, create)
    except ServerError as reason:
        _fail(str(reason))
    return path


@click.group()
def nbd() -> None:
    """Export VDIs over NBD (for QEMU, qemu-img, nbdcopy, fio)."""


def check_psk_file(path: str) -> None:
    """A PSK file nbdkit can read, or one line saying what is wrong with it (nbdkit
    would only find out at the first client, in its log)."""
    try:
        with open(path, "rb") as file:
            first = file.readline(4096)
    except OSError as reason:
        _fail(f"cannot read the TLS PSK file {path}: {reason.strerror}")
    if b":" not in first:
        _fail(f"{path} is not a PSK file (USER:HEXKEY lines): make one with"
              f" 'psktool -u USER -p {path}'")


def _url(listen: str | None, unix: str | None, tls: bool) -> str:
    scheme = "nbds" if tls else "nbd"
    return f"{scheme}+unix:///NAME?socket={unix}" if unix else f"{scheme}://{listen}/NAME"


def _old_sheep_port(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    """--sheep-port, the long -p of old scripts: -p/--port now, as in every dog command
    (--port once was the NBD port here: that is --listen :PORT)."""
    if value is not None:
        target = ctx.ensure_object(Target)
        target.port = value
        target.explicit.add("port")


@nbd.command()
@click.option("--listen", type=ListenType(), default=None,
              help=f"Serve NBD on HOST:PORT (default 127.0.0.1:{nbd_port_default}; :PORT for"
                   " loopback; 0.0.0.0:PORT for every interface, with --tls-psk).")
@click.option("--unix", "unix", type=click.Path(dir_okay=False), default=None,
              help="Serve on a unix socket instead of TCP.")
@click.option("--readonly", is_flag=True, help="Export everything read-only.")
@click.option("-f", "--foreground", is_flag=True,
              help="Stay in the foreground (become nbdkit: for systemd, or to watch it).")
@click.option("-t", "--threads", type=click.IntRange(1, 64), default=8, show_default=True,
              help="nbdkit threads per connection.")
@click.option("--pidfile", type=click.Path(dir_okay=False), default=None,
              help="Have nbdkit write its pid here (default: in the state directory).")
@click.option("--retry", "retry", type=click.FloatRange(0, 86400, min_open=True), default=None,
              help="Seconds a client's request waits and retries while no sheep can serve it"
                   " (dead, fenced, shutting down) before it fails with EIO (default 60).")
@click.option("--tls-psk", "tls_psk", type=click.Path(dir_okay=False), default=None,
              help="Require TLS from every NBD client, with the pre-shared keys of this"
                   " file (made by 'psktool -u USER -p FILE').")
@click.option("--lock-scope", type=click.Choice(["client", "nbdkit"]), default="client",
              show_default=True,
              help="Who contends for a VDI's write lock: each NBD client (a process over"
                   " --unix, a connection over TCP), or this whole nbdkit (one nbdkit per VM:"
                   " multi-conn for writers over TCP, no protection between its clients).")
@click.option("--print-command", is_flag=True, help="Print the nbdkit command and exit.")
@state_dir_option
@click.option("--bind", "old_bind", default=None, hidden=True)
@click.option("--sheep-port", type=click.IntRange(1, 65535), callback=_old_sheep_port,
              expose_value=False, is_eager=True, hidden=True)
@connection_options
def serve(listen: tuple[str, int] | None, unix: str | None, readonly: bool, foreground: bool,
          threads: int, pidfile: str | None, retry: float | None,
          tls_psk: str | None, lock_scope: str,
          print_command: bool, state_dir: str | None, old_bind: str | None) -> None:
    """Serve every VDI as export NAME (read-write) and NAME@TAG (read-only).

    -a/-p name the sheep the plugin talks to; --listen or --unix say where NBD
    clients connect. nbdkit goes to the background, 'dog nbd list' shows it and
    'dog nbd stop ADDRESS' stops it. Clients attach with nbd://HOST:PORT/NAME (with
    --tls-psk: nbds://USER@HOST:PORT/NAME?tls-psk-file=FILE for nbdinfo, and QEMU's
    tls-creds-psk object; see the README):

    \b
    qemu-system-x86_64 -drive file=nbd://127.0.0.1:10809/alice,format=raw,if=virtio
    """
    if old_bind is not None:
        listen = _old_listen(listen, unix, old_bind)
    if unix and listen:
        raise click.UsageError("--listen and --unix exclude each other")
    listen = listen or (nbd_servers.listen_host_default, nbd_port_default)
    unix = os.path.abspath(unix) if unix else None
    address = None if unix else format_listen(*listen)
    target = click.get_current_context().ensure_object(Target)
    if print_command:
        command = nbdkit_command(shutil.which("nbdkit") or "nbdkit", target, listen, unix,
                                 readonly, foreground, threads, pidfile, retry, tls_psk,
                                 lock_scope)
        click.echo(shlex.join(command))
        return
    if tls_psk:
        check_psk_file(tls_psk)
    nbdkit = check_nbdkit()
    state = _state_dir(state_dir, create=True)
    path = nbd_servers.record_path(state, address, unix)
    old = nbd_servers.read(path)
    if old is not None and old.alive():
        _fail(f"{old.address} is served already, by nbdkit pid {old.pid}"
              f" ('dog nbd stop {old.address}' stops it)", EXIT_EXISTS)
    if old is not None:
        nbd_servers.remove(old)
    pidfile = os.path.abspath(pidfile or nbd_servers.pidfile_path(state, address, unix))
    command = nbdkit_command(nbdkit, target, listen, unix, readonly, foreground, threads,
                             pidfile, retry, tls_psk, lock_scope)
    server = Server(pid=os.getpid(), listen=address, unix=unix,
                    url=_url(address, unix, bool(tls_psk)),
                    sheep=format_listen(target.address, target.port), started=time.time(),
                    command=["dog", *sys.argv[1:]], nbdkit_command=command, pidfile=pidfile,
                    readonly=readonly, tls_psk=os.path.abspath(tls_psk) if tls_psk else None,
                    path=path)
    if sys.prefix != sys.base_prefix:  # the plugin takes its libraries from dog's virtualenv
        os.environ.setdefault("VIRTUAL_ENV", sys.prefix)
    if foreground:  # exec keeps the pid: the record names nbdkit
        nbd_servers.write(server)
        click.echo(f"serving {_serving(server)}", err=True)
        _warn_if_no_sheep(target, retry)
        sys.stderr.flush()
        os.execv(command[0], command)
    _start_background(server)
    click.echo(f"serving {_serving(server)}")
    _warn_if_no_sheep(target, retry)


def _warn_if_no_sheep(target: Target, retry: float | None) -> None:
    """nbdkit serves whether or not its sheep answers yet (a service may start before
    the cluster does), but a sheep that does not answer now, a mistyped -p say, is
    worth a line: every client would wait for it up to the retry budget."""
    try:
        run(lambda client: client.ping())
    except SheepError as failure:
        budget = f"{retry:g} s" if retry is not None else "the retry budget (--retry)"
        error(f"warning: the sheep at {format_listen(target.address, target.port)} does not"
              f" serve yet ({failure.message}): clients will wait for it for up to"
              f" {budget}, then fail")


def _old_listen(listen: tuple[str, int] | None, unix: str | None,
                host: str) -> tuple[str, int]:
    """The hidden --bind of old scripts, as --listen HOST."""
    if listen or unix:
        raise click.UsageError(f"--bind excludes {'--unix' if unix else '--listen'}")
    error("--bind is deprecated: use --listen HOST:PORT")
    return host, nbd_port_default


def _serving(server: Server) -> str:
    where = f"VDIs of {server.sheep} at {server.url} (nbdkit pid {server.pid})"
    if server.tls_psk:
        where += f", TLS required, keys in {server.tls_psk}"
    return where


def _start_background(server: Server) -> None:
    """Run nbdkit, which forks away once it listens; record it under the pid it writes
    (its background half writes it after the foreground half has exited)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(server.pidfile)  # an old pid is no answer
    result = subprocess.run(server.nbdkit_command, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        _fail(f"nbdkit failed to start: {lines[-1] if lines else 'exit ' + str(result.returncode)}")
    deadline = time.monotonic() + nbd_servers.pidfile_wait_s
    while (pid := nbd_servers.read_pid(server.pidfile)) is None:
        if time.monotonic() > deadline:
            _fail(f"nbdkit started but wrote no pid to {server.pidfile} within"
                  f" {nbd_servers.pidfile_wait_s:g} s")
        time.sleep(0.01)
    assert pid is not None
    server.pid = pid
    nbd_servers.write(server)


@nbd.command("list")
@json_option
@state_dir_option
@credential_options
def list_(as_json: bool, state_dir: str | None) -> None:
    """Show the running NBD servers, with their exports and clients.

    The servers are those 'dog nbd serve' recorded in the state directory; the
    records of servers that have exited are dropped. Exports come from
    'nbdinfo --list' against each server, clients from the cluster: the VDIs
    attached through that nbdkit ('dog vdi lock list' shows every attachment), asked
    of the sheep the server names, with dog's own key (--keyring, --name). Without
    the cluster the servers are still listed, their clients unknown (null in
    --json)."""
    state = _state_dir(state_dir, create=False)
    found = nbd_servers.servers(state)
    listed = []
    with ThreadPoolExecutor(max_workers=min(len(found), 16) or 1) as pool:
        answers = list(pool.map(nbd_servers.exports, found))  # nbdinfo waits in parallel
    attached = _attachments(sorted({server.sheep for server in found}))
    host = socket.gethostname()
    for server, (names, why) in zip(found, answers, strict=True):
        record = asdict(server)
        del record["path"]
        attachments, vdis, clients_error = attached[server.sheep]
        clients = (None if attachments is None
                   else nbd_servers.clients(server, attachments, vdis, host))
        record.update(exports=names, exports_error=why, clients=clients,
                      clients_error=clients_error)
        listed.append(record)
    if as_json:
        print_json(listed)
        return
    if not found:
        click.echo(f"no NBD servers running (records in {state})")
        return
    _print_servers(found, listed)


def _print_servers(found: list[Server], listed: list[dict[str, Any]]) -> None:
    """One table of the servers, then one of their clients; what is unknown, and why,
    in a line each."""
    print_table(["PID", "ADDRESS", "SHEEP", "STARTED", "MODE", "EXPORTS", "CLIENTS"],
                [[server.pid, server.address, server.sheep, format_time(server.started),
                  ("ro" if server.readonly else "rw") + (" tls" if server.tls_psk else ""),
                  "?" if record["exports"] is None else len(record["exports"]),
                  "?" if record["clients"] is None else len(record["clients"])]
                 for server, record in zip(found, listed, strict=True)],
                right=["PID", "EXPORTS", "CLIENTS"])
    rows = [[server.address, client["address"], client["vdi"], client["mode"],
             client["sheep"] or "-", format_time(float(client["since"] or 0))]
            for server, record in zip(found, listed, strict=True)
            for client in record["clients"] or []]
    if rows:
        click.echo()
        print_table(["SERVER", "CLIENT", "VDI", "MODE", "VIA SHEEP", "SINCE"], rows)
    for server, record in zip(found, listed, strict=True):
        if record["exports"] is None:
            click.echo(f"exports of {server.address}: unknown, {record['exports_error']}")
    for line in dict.fromkeys(  # one line for all the servers of one sheep
            f"clients: {'unknown' if record['clients'] is None else 'maybe more'},"
            f" {record['clients_error']}" for record in listed if record["clients_error"]):
        click.echo(line)


def _attachments(sheep: list[str]) -> dict[str, tuple[list[dict[str, Any]] | None,
                                                       list[dict[str, Any]], str | None]]:
    """For each sheep (HOST:PORT) the servers name: the attachments of its cluster (None
    when it could not be asked), its VDIs, and what went wrong, if anything."""
    target = click.get_current_context().ensure_object(Target)

    async def ask(address: str) -> tuple[list[dict[str, Any]] | None,
                                         list[dict[str, Any]], str | None]:
        host, port = nbd_servers.parse_listen(address)
        try:
            async with asyncio.timeout(nbd_servers.attachments_timeout_s):
                client = await Client.connect(host, port, credentials=target.credentials())
                try:
                    vdis = await client.vdi_list(usage=False)
                    rows, missed = await cluster_attachments(client, vdis)
                finally:
                    client.close()
        except TimeoutError:
            return None, [], (f"sheep {address} did not answer within"
                              f" {nbd_servers.attachments_timeout_s:g} s")
        except (SheepError, OSError, ValueError) as reason:
            why = str(reason)
            return None, [], why if address in why else f"sheep {address}: {why}"
        return rows, vdis, ("attachments not listed for node " + "; ".join(missed)
                            if missed else None)

    async def ask_all() -> list[tuple[list[dict[str, Any]] | None,
                                      list[dict[str, Any]], str | None]]:
        return list(await asyncio.gather(*map(ask, sheep)))

    return dict(zip(sheep, asyncio.run(ask_all()) if sheep else [], strict=True))


@nbd.command()
@click.argument("target", required=False)
@click.option("--all", "stop_all", is_flag=True, help="Stop every server listed.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0, 3600),
              default=nbd_servers.stop_timeout_s_default, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@state_dir_option
def stop(target: str | None, stop_all: bool, timeout_s: float, state_dir: str | None) -> None:
    """Stop an NBD server by its ADDRESS or PID, or all of them.

    TARGET is an address as 'dog nbd list' shows it (HOST:PORT, or :PORT on
    loopback; a socket's path) or a pid. nbdkit gets SIGTERM, and SIGKILL if it
    still runs after --timeout; its record goes. Exits 5 when no server matches."""
    if (target is None) == (not stop_all):
        raise click.UsageError("name one server (ADDRESS or PID) or give --all")
    state = _state_dir(state_dir, create=False)
    found = nbd_servers.servers(state)
    chosen = found if stop_all else nbd_servers.match(found, target or "")
    if not chosen and not stop_all:
        _fail(f"no NBD server {target} is running ('dog nbd list' shows them; records in"
              f" {state})", EXIT_MISSING)
    for server in chosen:
        try:
            nbd_servers.stop(server, timeout_s, say=error)
        except ServerError as reason:
            _fail(str(reason))
        click.echo(f"stopped nbdkit pid {server.pid} at {server.address}")
    if not chosen:
        click.echo("no NBD servers running")
