"""The NBD export's security (issue #15) with real nbdkit and real clients.

- ``dog nbd serve --tls-psk FILE``: nbdinfo and qemu-img get in with the key of a
  psktool file, and neither gets in without TLS or with another key.
- ``dog nbd serve --keyring K --name client.web``: the plugin's principal limits
  what the NBD clients see and open; a read-only principal's exports refuse writes;
  a principal the sheep does not know is refused at once, not after the retry budget.

One sheep, one copy, shared by the module. Every nbdkit is ``dog nbd serve -f``
(dog execs nbdkit, so the PID is nbdkit's), logging into the test's tmp dir,
listening on 127.0.0.1, stopped by its PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sheep.testing.cluster import LocalCluster, free_port
from sheep.testing.nbd import NbdServer, needs_tools

MiB = 1 << 20

pytestmark = needs_tools("nbdkit", "nbdinfo", "qemu-img", "qemu-io", "psktool",
                         packages="nbdkit, nbdkit-plugin-python, libnbd-bin, qemu-utils,"
                                  " gnutls-bin")


def run(*command: str, check: bool = True, timeout_s: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    if check:
        assert result.returncode == 0, (command, result.returncode, result.stdout, result.stderr)
    return result


def dog(*args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "dog", *args)


class Served(NbdServer):
    """One ``dog nbd serve -f``: nbdkit itself once dog has exec'd it (NbdServer's wait,
    URIs, log and stop; started by dog instead of directly)."""

    def __init__(self, sheep_port: int, log_path: Path, *options: str) -> None:
        self.port = free_port()
        self.log_path = str(log_path)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dog", "-p", str(sheep_port), "nbd", "serve", "-f",
                 "--listen", f":{self.port}", "--state-dir", str(log_path.parent / "nbd-state"),
                 *options],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self._wait_listening(timeout_s=20.0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(str(tmp_path_factory.mktemp("nbd-security")), nodes=1) as local:
        local.start()
        local.format(copies=1)
        with local.client(0) as client:
            for name in ("web1", "web2", "db"):
                client.vdi_create(name, 16 * MiB)
        yield local


@pytest.fixture
def serve(cluster: LocalCluster, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    servers: list[Served] = []

    def start(*options: str) -> Served:
        servers.append(Served(cluster.sheep[0].port, tmp_path / f"nbdkit{len(servers)}.log",
                              *options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def keyring_of(cluster: LocalCluster, path: Path, name: str, *add_options: str) -> Path:
    """What the README says: dog auth add NAME ... > keyring (mode 0600)."""
    section = dog("-p", str(cluster.sheep[0].port), "auth", "add", name, *add_options).stdout
    path.touch(mode=0o600)
    path.write_text(section)
    return path


def listed(uri: str, *extra: str) -> dict[str, dict]:
    result = run("nbdinfo", "--list", "--json", *extra, uri)
    return {item["export-name"]: item for item in json.loads(result.stdout)["exports"]}


def psk_dir(base: Path, user: str) -> Path:
    """A directory holding keys.psk with a fresh key for user (QEMU reads keys.psk)."""
    base.mkdir(mode=0o700)
    run("psktool", "-u", user, "-p", str(base / "keys.psk"))
    return base


# --- TLS with pre-shared keys -----------------------------------------------------------


def qemu_tls(directory: Path, user: str = "alice") -> list[str]:
    return ["--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={directory},"
                        f"username={user}"]


def nbd_opts(port: int, export: str) -> str:
    return f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0"


def test_tls_psk_lets_in_only_clients_with_the_key(cluster, serve, tmp_path):
    keys = psk_dir(tmp_path / "keys", "alice")
    other = psk_dir(tmp_path / "other", "alice")  # the same user, another key
    server = serve("--tls-psk", str(keys / "keys.psk"))
    tls_uri = f"nbds://alice@127.0.0.1:{server.port}/web1?tls-psk-file={keys / 'keys.psk'}"

    info = run("nbdinfo", "--json", tls_uri)
    assert json.loads(info.stdout)["exports"][0]["export-size"] == 16 * MiB
    assert {"web1", "web2", "db"} <= set(listed(
        f"nbds://alice@127.0.0.1:{server.port}/?tls-psk-file={keys / 'keys.psk'}"))
    # dog nbd list gets the exports over TLS too, as the PSK file's first user.
    [record] = json.loads(dog("nbd", "list", "--json", "--state-dir",
                              str(tmp_path / "nbd-state")).stdout)
    assert record["url"] == f"nbds://127.0.0.1:{server.port}/NAME"
    assert {"web1", "web2", "db"} <= set(record["exports"]), record

    image = tmp_path / "in.raw"
    image.write_bytes(os.urandom(MiB) + bytes(3 * MiB) + os.urandom(MiB))
    run("qemu-img", "convert", "-n", "-f", "raw", str(image), *qemu_tls(keys),
        "--target-image-opts", nbd_opts(server.port, "web1"))
    info = run("qemu-img", "info", "--output=json", *qemu_tls(keys), "--image-opts",
               nbd_opts(server.port, "web1"))
    assert json.loads(info.stdout)["virtual-size"] == 16 * MiB
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-O", "raw", *qemu_tls(keys), "--image-opts",
        nbd_opts(server.port, "web1"), str(back))
    assert back.read_bytes()[:5 * MiB] == image.read_bytes()
    io = run("qemu-io", *qemu_tls(keys), "--image-opts", nbd_opts(server.port, "web2"),
             "-c", "write -P 0x5a 4096 8192", "-c", "read -P 0x5a 4096 8192")
    assert "failed" not in io.stdout + io.stderr, io

    # Without TLS: refused before any export is named.
    plain = run("nbdinfo", server.uri("web1"), check=False)
    assert plain.returncode != 0 and "without TLS" in plain.stdout, plain
    assert "opt_go request: Operation not supported" in plain.stderr, plain.stderr  # TLS_REQD
    plain = run("qemu-img", "info", server.uri("web1"), check=False)
    assert plain.returncode != 0 and "TLS negotiation required" in plain.stderr, plain.stderr
    # With another key: the TLS handshake fails.
    wrong = run("nbdinfo", f"nbds://alice@127.0.0.1:{server.port}/web1?tls-psk-file="
                f"{other / 'keys.psk'}", check=False)
    assert wrong.returncode != 0 and "handshake" in wrong.stderr, wrong.stderr
    wrong = run("qemu-img", "info", *qemu_tls(other), "--image-opts",
                nbd_opts(server.port, "web1"), check=False)
    assert wrong.returncode != 0 and "TLS handshake failed" in wrong.stderr, wrong.stderr
    # And with a user the file does not know.
    stranger = run("qemu-img", "info", *qemu_tls(keys, "mallory"), "--image-opts",
                   nbd_opts(server.port, "web1"), check=False)
    assert stranger.returncode != 0, stranger.stdout


# --- the plugin's principal -----------------------------------------------------------------


def test_a_principal_limited_to_web_vdis_sees_and_opens_only_those(cluster, serve, tmp_path):
    keyring = keyring_of(cluster, tmp_path / "web.keyring", "client.web", "--vdi", "web*")
    server = serve("--keyring", str(keyring), "--name", "client.web")

    exports = listed(server.uri(""))
    assert set(exports) == {"web1", "web2"}
    assert not exports["web1"]["is_read_only"]
    io = run("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 65536", "-c",
             "read -P 0x61 0 65536", server.uri("web1"))
    assert "failed" not in io.stdout + io.stderr, io

    started = time.monotonic()
    refused = run("qemu-img", "info", server.uri("db"), check=False)
    assert refused.returncode != 0, refused.stdout
    refused = run("nbdinfo", server.uri("db"), check=False)
    assert refused.returncode != 0, refused.stdout
    assert time.monotonic() - started < 20, "a refusal is not retried"
    assert ("export 'db' refused to principal client.web: client.web may not touch VDI 'db'"
            in server.log()), server.log()


def test_a_read_only_principal_serves_exports_that_refuse_writes(cluster, serve, tmp_path):
    with cluster.client(0) as client:
        handle = client.vdi_open("web2", writable=True)["handle"]
        client.vdi_write(handle, 0, b"\x77" * 4096)
        client.vdi_close(handle)
    keyring = keyring_of(cluster, tmp_path / "ro.keyring", "client.webro", "--vdi", "web*",
                         "--read-only")
    server = serve("--keyring", str(keyring), "--name", "client.webro")

    exports = listed(server.uri(""))
    assert set(exports) == {"web1", "web2"}
    assert all(item["is_read_only"] for item in exports.values()), exports
    write = run("qemu-io", "-f", "raw", "-c", "write -P 0x62 0 4096", server.uri("web2"),
                check=False)
    assert write.returncode != 0 and "wrote" not in write.stdout, write
    read = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x77 0 4096", server.uri("web2"))
    assert "failed" not in read.stdout + read.stderr, read
    with cluster.client(0) as client:
        handle = client.vdi_open("web2", writable=False)["handle"]
        assert client.vdi_read(handle, 0, 4096) == b"\x77" * 4096
        client.vdi_close(handle)


def test_a_principal_the_sheep_does_not_know_fails_at_once(cluster, serve, tmp_path):
    """A key the sheep does not know will not become known by waiting: the client gets
    an error at once (the retry budget is 60 s) and the log says why."""
    from sheep import auth

    keyring = tmp_path / "ghost.keyring"
    auth.write_keyring(str(keyring), {"client.ghost": auth.Entry(auth.new_key(),
                                                                 auth.Caps.parse("rw vdi=*"))})
    server = serve("--keyring", str(keyring), "--name", "client.ghost")

    started = time.monotonic()
    listing = run("nbdinfo", "--list", server.uri(""), check=False)
    opening = run("qemu-img", "info", server.uri("web1"), check=False)
    elapsed = time.monotonic() - started
    assert listing.returncode != 0 and opening.returncode != 0, (listing, opening)
    assert elapsed < 20, f"{elapsed:.1f} s: retried an authentication failure"
    assert "refused to principal client.ghost: authentication as client.ghost failed" in (
        server.log()), server.log()
