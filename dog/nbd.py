"""dog nbd serve: export every VDI over NBD through nbdkit and our plugin.

With --tls-psk FILE nbdkit requires TLS with pre-shared keys (a psktool file of
USER:KEY lines) from every client, so the NBD hop is encrypted and only holders of
a key may connect; the plugin's own hop to the sheep is authenticated and signed
by the sheep protocol whatever this says (docs/security.md, NBD)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from typing import NoReturn

import click

from dog.common import Target, connection_options
from sheep.errors import EXIT_SYSTEM

nbd_port_default = 10809


def plugin_path() -> str:
    import nbd_plugin

    return os.path.join(os.path.dirname(os.path.abspath(nbd_plugin.__file__)), "plugin.py")


def _fail(message: str) -> NoReturn:
    click.echo(f"dog: {message}", err=True)
    sys.exit(EXIT_SYSTEM)


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


def nbdkit_command(nbdkit: str, target: Target, port: int | None, unix: str | None,
                   bind: str, readonly: bool, foreground: bool, threads: int,
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
        command += ["-p", str(port or nbd_port_default), "-i", bind]
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


@click.group()
def nbd() -> None:
    """Export VDIs over NBD (for QEMU, qemu-img, nbdcopy, fio)."""


def check_psk_file(path: str) -> None:
    """A PSK file nbdkit can read, or one line saying what is wrong with it (nbdkit
    would only find out at the first client, in its log)."""
    try:
        with open(path, "rb") as file:
            first = file.readline(4096)
    except OSError as error:
        _fail(f"cannot read the TLS PSK file {path}: {error.strerror}")
    if b":" not in first:
        _fail(f"{path} is not a PSK file (USER:HEXKEY lines): make one with"
              f" 'psktool -u USER -p {path}'")


@nbd.command()
@click.option("--port", "nbd_port", type=click.IntRange(1, 65535), default=None,
              help=f"TCP port for NBD clients (default {nbd_port_default}).")
@click.option("--unix", "unix", type=click.Path(dir_okay=False), default=None,
              help="Serve on a unix socket instead of TCP.")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address to serve NBD on (0.0.0.0 for every interface).")
@click.option("--readonly", is_flag=True, help="Export everything read-only.")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground.")
@click.option("-t", "--threads", type=click.IntRange(1, 64), default=8, show_default=True,
              help="nbdkit threads per connection.")
@click.option("--pidfile", type=click.Path(dir_okay=False), default=None,
              help="Write nbdkit's pid here (background mode).")
@click.option("--retry", "retry", type=click.FloatRange(0, 86400, min_open=True), default=None,
              help="Seconds a client's request waits and retries while no sheep can serve it"
                   " (dead, fenced, shutting down) before it fails with EIO (default 60).")
@click.option("--keyring", type=click.Path(dir_okay=False), default=None,
              help="Keyring the plugin authenticates with (default: as dog finds its own).")
@click.option("--name", "principal", default=None,
              help="Principal the plugin authenticates as (default client.admin).")
@click.option("--tls-psk", "tls_psk", type=click.Path(dir_okay=False), default=None,
              help="Require TLS from every NBD client, with the pre-shared keys of this"
                   " file (made by 'psktool -u USER -p FILE').")
@click.option("--lock-scope", type=click.Choice(["client", "nbdkit"]), default="client",
              show_default=True,
              help="Who contends for a VDI's write lock: each NBD client (a process over"
                   " --unix, a connection over TCP), or this whole nbdkit (one nbdkit per VM:"
                   " multi-conn for writers over TCP, no protection between its clients).")
@click.option("--print-command", is_flag=True, help="Print the nbdkit command and exit.")
@lambda function: connection_options(function, ("-p", "--sheep-port"))
def serve(nbd_port: int | None, unix: str | None, bind: str, readonly: bool, foreground: bool,
          threads: int, pidfile: str | None, retry: float | None, keyring: str | None,
          principal: str | None, tls_psk: str | None, lock_scope: str,
          print_command: bool) -> None:
    """Serve every VDI as export NAME (read-write) and NAME@TAG (read-only).

    Clients attach with nbd://HOST:PORT/NAME, e.g.
    qemu-system-x86_64 -drive file=nbd://127.0.0.1:10809/alice,format=raw,if=virtio
    (with --tls-psk: nbds://USER@HOST:PORT/NAME?tls-psk-file=FILE for nbdinfo, and
    QEMU's tls-creds-psk object; see the README).
    """
    if unix and nbd_port:
        raise click.UsageError("--port and --unix exclude each other")
    target = click.get_current_context().ensure_object(Target)
    target.keyring = keyring or target.keyring
    target.name = principal or target.name
    nbdkit = shutil.which("nbdkit") or "nbdkit"
    if not print_command:
        if tls_psk:
            check_psk_file(tls_psk)
        nbdkit = check_nbdkit()
    command = nbdkit_command(nbdkit, target, nbd_port, unix, bind, readonly, foreground,
                             threads, pidfile, retry, tls_psk, lock_scope)
    if print_command:
        click.echo(shlex.join(command))
        return
    if sys.prefix != sys.base_prefix:  # the plugin takes its libraries from dog's virtualenv
        os.environ.setdefault("VIRTUAL_ENV", sys.prefix)
    scheme = "nbds" if tls_psk else "nbd"
    where = f"{scheme}+unix:///NAME?socket={unix}" if unix else \
        f"{scheme}://{bind}:{nbd_port or nbd_port_default}/NAME"
    if tls_psk:
        where += f" (TLS required, keys in {os.path.abspath(tls_psk)})"
    if foreground:
        click.echo(f"serving VDIs of {target.address}:{target.port} at {where}", err=True)
        sys.stderr.flush()
        os.execv(command[0], command)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        _fail(f"nbdkit failed to start: {lines[-1] if lines else 'exit ' + str(result.returncode)}")
    click.echo(f"serving VDIs of {target.address}:{target.port} at {where}")
