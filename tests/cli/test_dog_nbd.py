"""dog nbd serve, list and stop: the nbdkit command serve runs, serving in the
background and the foreground, the records list and stop read, and their errors.
Every test keeps its records in its own state directory (DOG_NBD_STATE_DIR); nbdkit
is stopped by the PID it reports, never by name."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dog.nbd_servers import parse_listen, runs
from sheep.errors import EXIT_EXISTS, EXIT_MISSING, EXIT_SYSTEM, EXIT_USAGE
from sheep.testing.cluster import LocalCluster, free_port
from sheep.testing.nbd import needs_tools

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "nbd_plugin" / "plugin.py"
MiB = 1 << 20

needs_nbdkit = needs_tools("nbdkit", "nbdinfo", "qemu-io",
                           packages="nbdkit, nbdkit-plugin-python, libnbd-bin, qemu-utils")


def dog(*args: str, env: dict[str, str] | None = None,
        check: int | None = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "dog", *args], capture_output=True, text=True,
                            timeout=60, env=env)
    if check is not None:
        assert result.returncode == check, (args, result.returncode, result.stdout, result.stderr)
    return result


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("dog: ")
    return lines[0]


def process_state(pid: int) -> str | None:
    """The process's state letter (R, S, Z...), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def stop_pid(pid: int) -> None:
    """SIGTERM one process by PID; wait until it is gone (or a zombie nobody reaps)."""
    if process_state(pid) in (None, "Z"):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while process_state(pid) not in (None, "Z"):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.05)


def wait_listening(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"nothing listening on {port}"
        time.sleep(0.05)


def exports(uri: str) -> dict[str, dict]:
    listing = subprocess.run(["nbdinfo", "--list", "--json", uri], capture_output=True, text=True,
                             timeout=60)
    assert listing.returncode == 0, listing.stderr
    return {item["export-name"]: item for item in json.loads(listing.stdout)["exports"]}


@pytest.fixture
def cluster(make_cluster) -> LocalCluster:
    """One sheep, one copy: alice with snapshot t1, and bob."""
    local: LocalCluster = make_cluster(1)
    local.format(copies=1)
    with local.client(0) as client:
        client.vdi_create("alice", 16 * MiB)
        client.vdi_snapshot("alice", "t1")
        client.vdi_create("bob", 1 << 30)
    return local


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch) -> Iterator[Path]:
    """This test's records of running servers; whatever nbdkit they or its pid files
    there still name is stopped by its PID at teardown."""
    path = tmp_path / "nbd-state"
    monkeypatch.setenv("DOG_NBD_STATE_DIR", str(path))
    yield path
    for record in map(json.loads, map(Path.read_text, path.glob("*.json"))):
        if runs(record["pid"], record["nbdkit_command"]):  # not a pid handed on since
            stop_pid(record["pid"])
    for pidfile in path.glob("*.pid"):  # an nbdkit whose serve failed before its record
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text())
            if str(pidfile).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                stop_pid(pid)


@pytest.fixture
def pidfiles(tmp_path) -> Iterator[list[Path]]:
    """Pid files of background nbdkits: each one is stopped by its PID at teardown."""
    files: list[Path] = []
    yield files
    for path in files:
        if path.exists():
            stop_pid(int(path.read_text().strip()))


# --- the command ----------------------------------------------------------------------------


def test_print_command_shows_the_raw_nbdkit_command():
    port = free_port()
    line = dog("nbd", "serve", "-p", str(port), "--print-command").stdout.strip()
    command = shlex.split(line)
    assert os.path.basename(command[0]) == "nbdkit"
    assert command[-3:] == ["python", str(PLUGIN), f"sheep=127.0.0.1:{port}"], line
    assert PLUGIN.is_file()
    assert " -p 10809 -i 127.0.0.1 " in line and "-f" not in command and "-r" not in command

    line = dog("-a", "10.1.2.3", "nbd", "serve", "--unix", "/run/x.sock", "--readonly", "-f",
               "--print-command").stdout.strip()
    command = shlex.split(line)
    assert command[-3:] == ["python", str(PLUGIN), "sheep=10.1.2.3:7000"], line
    assert {"-f", "-r"} <= set(command) and command[command.index("-U") + 1] == "/run/x.sock"
    assert "-p" not in command

    command = shlex.split(dog("nbd", "serve", "--listen", "0.0.0.0:10900",
                              "--print-command").stdout)
    assert command[command.index("-p"): command.index("-i") + 2] == [
        "-p", "10900", "-i", "0.0.0.0"]
    line = one_line_error(dog("nbd", "serve", "--listen", "10809", "--print-command",
                              check=EXIT_USAGE))
    assert "--listen" in line and "write :10809 (loopback) or HOST:10809" in line, line

    # The plugin gets the keyring and name dog would use, given before or after the
    # command or by DOG_KEYRING/DOG_NAME (a printed command must not fall back to another
    # keyring when it runs without them); an option beats the environment.
    env = {**os.environ, "DOG_KEYRING": "env.keyring", "DOG_NAME": "client.env",
           "DOG_SHEEP_KEYRING": "auto.keyring"}
    command = shlex.split(dog("nbd", "serve", "--print-command", env=env).stdout)
    assert f"keyring={os.path.abspath('env.keyring')}" in command, command
    assert "name=client.env" in command and not any("auto" in arg for arg in command)
    command = shlex.split(dog("--keyring", "a.keyring", "nbd", "serve", "--keyring", "b.keyring",
                              "--name", "client.b", "--print-command", env=env).stdout)
    assert f"keyring={os.path.abspath('b.keyring')}" in command and "name=client.b" in command

    # Old scripts' --bind (the NBD side) still works, deprecated.
    result = dog("nbd", "serve", "-p", "7001", "--bind", "0.0.0.0", "--print-command")
    command = shlex.split(result.stdout)
    assert command[command.index("-p"): command.index("-i") + 2] == [
        "-p", "10809", "-i", "0.0.0.0"] and command[-1] == "sheep=127.0.0.1:7001"
    assert one_line_error(result) == "dog: --bind is deprecated: use --listen HOST:PORT"
    line = one_line_error(dog("nbd", "serve", "--bind", "0.0.0.0", "--listen", ":10904",
                              "--print-command", check=EXIT_USAGE))
    assert "--bind excludes --listen" in line, line


def test_port_is_the_sheeps_port_as_in_every_dog_command():
    """--port once meant the NBD port here; now it is -p's long form, the sheep's port,
    and the NBD side is --listen only (the old long form --sheep-port still works)."""
    short = dog("nbd", "serve", "-p", "7003", "--print-command")
    assert short.stderr == ""
    for spelling in (["--port", "7003"], ["--port=7003"], ["--sheep-port", "7003"]):
        result = dog("nbd", "serve", *spelling, "--print-command")
        assert (result.stdout, result.stderr) == (short.stdout, ""), spelling
    command = shlex.split(short.stdout)
    assert command[-1] == "sheep=127.0.0.1:7003"
    assert command[command.index("-p"): command.index("-i") + 2] == [
        "-p", "10809", "-i", "127.0.0.1"]  # the NBD side unchanged
    line = shlex.split(dog("nbd", "serve", "--port", "7004", "--listen", ":10905",
                           "--print-command").stdout)
    assert line[-1] == "sheep=127.0.0.1:7004" and line[line.index("-p") + 1] == "10905"
    assert "port" in dog("nbd", "serve", "--port", "0", "--print-command",
                         check=EXIT_USAGE).stderr


@pytest.mark.parametrize("text, listen", [
    (":10901", ("127.0.0.1", 10901)), ("10.0.0.5", ("10.0.0.5", 10809)),
    ("[::1]:10902", ("::1", 10902)), ("[::]", ("::", 10809)), ("host.example:1", ("host.example", 1)),
    ("10809", None), ("::1:10809", None), ("host:0", None), ("host:port", None), ("a/b:1", None),
])
def test_listen_addresses(text, listen):
    if listen is None:
        with pytest.raises(ValueError):
            parse_listen(text)
    else:
        assert parse_listen(text) == listen


def test_help_on_every_nbd_command():
    for command in ([], ["serve"], ["list"], ["stop"]):
        assert " dog nbd" in dog("nbd", *command, "--help").stdout.splitlines()[0]
    text = dog("nbd", "serve", "--help").stdout
    assert "--listen HOST:PORT" in text and "Port of the sheep" in text
    assert "-p, --port INTEGER RANGE" in text  # as in every dog command
    assert "--bind" not in text and "--sheep-port" not in text  # hidden


def test_the_retry_budget_reaches_the_plugin_and_a_bad_one_is_refused():
    line = dog("nbd", "serve", "--retry", "90", "--print-command").stdout.strip()
    assert shlex.split(line)[-1] == "retry=90", line
    assert "retry=" not in dog("nbd", "serve", "--print-command").stdout
    for bad in ("0", "-5", "soon"):
        result = dog("nbd", "serve", "--retry", bad, "--print-command", check=EXIT_USAGE)
        assert "--retry" in result.stderr, result.stderr


def test_the_lock_scope_reaches_the_plugin_and_a_bad_one_is_refused():
    line = dog("nbd", "serve", "--lock-scope", "nbdkit", "--print-command").stdout.strip()
    assert shlex.split(line)[-1] == "lock=nbdkit", line
    assert "lock=" not in dog("nbd", "serve", "--print-command").stdout  # per client
    result = dog("nbd", "serve", "--lock-scope", "vm", "--print-command", check=EXIT_USAGE)
    assert "--lock-scope" in result.stderr, result.stderr


def test_tls_psk_reaches_nbdkit_and_a_bad_file_is_refused(tmp_path):
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:" + "ab" * 32 + "\n")
    command = shlex.split(dog("nbd", "serve", "--tls-psk", str(keys),
                              "--print-command").stdout.strip())
    assert {"--tls=require", f"--tls-psk={keys}"} <= set(command), command
    assert command.index("--tls=require") < command.index("python")
    assert not any(part.startswith("--tls") for part in shlex.split(
        dog("nbd", "serve", "--print-command").stdout.strip()))

    line = one_line_error(dog("nbd", "serve", "--tls-psk", str(tmp_path / "none.psk"),
                              check=EXIT_SYSTEM))
    assert f"cannot read the TLS PSK file {tmp_path / 'none.psk'}: No such file" in line, line
    result = dog("nbd", "serve", "--tls-psk", str(tmp_path), check=EXIT_USAGE)
    assert "is a directory" in result.stderr, result.stderr
    not_psk = tmp_path / "keyring"
    not_psk.write_text("[client.admin]\n")
    line = one_line_error(dog("nbd", "serve", "--tls-psk", str(not_psk), check=EXIT_SYSTEM))
    assert "is not a PSK file" in line and "psktool -u USER -p" in line, line


@needs_nbdkit
def test_without_a_usable_keyring_nbdkit_fails_at_start_in_one_line(tmp_path):
    """Not at the first client: nbdkit exits before it listens, saying why in one line."""
    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if key not in ("DOG_KEYRING", "DOG_NAME", "XDG_RUNTIME_DIR")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"),
               TMPDIR=str(tmp_path))  # no default keyring either
    result = subprocess.run(["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "python",
                             str(PLUGIN), "sheep=127.0.0.1:1"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"nbdkit: error: sheepdog plugin: no keyring: pass --keyring FILE or set DOG_KEYRING"
        f" (looked in {tmp_path}/config/sheepdog/keyring and"
        f" {tmp_path}/sheepdog-{os.getuid()}/cluster/keyring)"], result.stderr

    line = one_line_error(dog("nbd", "serve", "--listen", f":{port}", "--keyring",
                              str(tmp_path / "missing"), check=EXIT_SYSTEM))
    assert line == (f"dog: nbdkit failed to start: nbdkit: error: sheepdog plugin: cannot read"
                    f" keyring {tmp_path / 'missing'}: No such file or directory"), line
    keyring = tmp_path / "keyring"
    keyring.touch(mode=0o600)
    keyring.write_text("[client.web]\n\tkey = " + "A" * 43 + "=\n\tcaps = rw vdi=web*\n")
    line = one_line_error(dog("nbd", "serve", "--listen", f":{port}", "--keyring", str(keyring),
                              "--name", "client.nobody", check=EXIT_SYSTEM))
    assert f"sheepdog plugin: no [client.nobody] key in {keyring}" in line, line


def test_listen_and_unix_together_are_a_usage_error(tmp_path):
    result = dog("nbd", "serve", "--listen", ":10810", "--unix", str(tmp_path / "s"),
                 check=EXIT_USAGE)
    assert "--listen and --unix" in result.stderr
    assert not (tmp_path / "s").exists()


def test_missing_nbdkit_names_the_package_to_install(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    line = one_line_error(dog("nbd", "serve", env={**os.environ, "PATH": str(empty)},
                              check=EXIT_SYSTEM))
    assert "nbdkit is not installed" in line and "apt-get install nbdkit" in line, line
    assert "nbdkit-plugin-python" in line

    # nbdkit without its python plugin: an nbdkit that cannot load "python".
    fake = empty / "nbdkit"
    fake.write_text("#!/bin/sh\necho \"nbdkit: error: cannot open plugin 'python'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    line = one_line_error(dog("nbd", "serve", env={**os.environ, "PATH": str(empty)},
                              check=EXIT_SYSTEM))
    assert "python plugin is not installed" in line, line
    assert "apt-get install nbdkit-plugin-python" in line


# --- serving -----------------------------------------------------------------------------------


@needs_nbdkit
def test_serving_a_sheep_that_does_not_answer_says_so(cluster, pidfiles, tmp_path):
    """nbdkit serves all the same (a service may start before its cluster), but a
    mistyped -p is named: every client would otherwise wait out the retry budget."""
    nobody = free_port()
    pidfiles.append(tmp_path / "nobody.pid")
    served = dog("-p", str(nobody), "nbd", "serve", "--listen", f":{free_port()}", "--retry",
                 "5", "--pidfile", str(pidfiles[-1]))
    assert served.stdout.startswith("serving VDIs of 127.0.0.1:" + str(nobody))
    warning = [line for line in served.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1, served.stderr
    assert f"the sheep at 127.0.0.1:{nobody} does not serve yet" in warning[0]
    assert "wait for it for up to 5 s, then fail" in warning[0]


def test_a_background_nbdkit_is_named_in_the_lock_by_its_real_pid(cluster, pidfiles,
                                                                   tmp_path):
    """The lock names the nbdkit that serves (its pid after it went to the
    background, and its host), from the first write: attaching took no lock."""
    sheep_port = str(cluster.sheep[0].port)
    port = free_port()
    pidfiles.append(tmp_path / "lock.pid")
    served = dog("-p", sheep_port, "nbd", "serve", "--listen", f":{port}", "--pidfile",
                 str(pidfiles[-1]))
    assert "warning" not in served.stderr, served.stderr  # its sheep answers
    pid = int(pidfiles[-1].read_text())

    def owner() -> str | None:
        locks = json.loads(dog("-p", sheep_port, "vdi", "lock", "list", "--json").stdout)
        return next((lock["owner"] for lock in locks
                     if lock["name"] == "bob" and lock["mode"] == "lock"), None)

    with attached(f"nbd://127.0.0.1:{port}/bob") as holder:
        assert holder.stdin is not None and holder.stdout is not None
        assert owner() is None  # attached and read: no lock
        listed = json.loads(dog("-p", sheep_port, "vdi", "lock", "list", "--json").stdout)
        rows = [row for row in listed if row["name"] == "bob"]
        assert [row["mode"] for row in rows] == ["rw"], rows  # listed all the same
        assert rows[0]["owner"].startswith(f"nbdkit pid {pid} on ")
        holder.stdin.write("write -P 0x5 0 4096\n")
        holder.stdin.flush()
        assert "wrote 4096/4096" in holder.stdout.readline()
        named = owner()
        assert named is not None and named.startswith(
            f"nbdkit pid {pid} on {socket.gethostname()}, NBD client 127.0.0.1:"), named
        assert " (via sheep 127.0.0.1:" in named


@needs_nbdkit
def test_background_serve_lists_every_vdi_and_snapshot(cluster, pidfiles, tmp_path):
    sheep_port = str(cluster.sheep[0].port)
    port = free_port()
    pidfiles.append(tmp_path / "tcp.pid")
    result = dog("-p", sheep_port, "nbd", "serve", "--listen", f":{port}",
                 "--pidfile", str(pidfiles[-1]))
    pid = int(pidfiles[-1].read_text())
    assert result.stdout.strip() == (f"serving VDIs of 127.0.0.1:{sheep_port} at"
                                     f" nbd://127.0.0.1:{port}/NAME (nbdkit pid {pid})")
    assert pid != os.getpid() and Path(f"/proc/{pid}").exists()

    listed = exports(f"nbd://127.0.0.1:{port}")
    assert set(listed) == {"alice", "alice@t1", "bob"}
    assert [listed[name]["is_read_only"] for name in ("alice", "alice@t1", "bob")] == [
        False, True, False]
    assert listed["bob"]["export-size"] == 1 << 30
    io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x7 0 4096", "-c",
                         "read -P 0x7 0 4096", f"nbd://127.0.0.1:{port}/alice"],
                        capture_output=True, text=True, timeout=60)
    assert io.returncode == 0 and "failed" not in io.stdout, io

    # The same on a unix socket, everything read-only.
    socket_path = tmp_path / "nbd.sock"
    pidfiles.append(tmp_path / "unix.pid")
    result = dog("nbd", "serve", "-p", sheep_port, "--unix", str(socket_path), "--readonly",
                 "--pidfile", str(pidfiles[-1]))
    assert f"nbd+unix:///NAME?socket={socket_path}" in result.stdout
    listed = exports(f"nbd+unix://?socket={socket_path}")
    assert set(listed) == {"alice", "alice@t1", "bob"}
    assert all(item["is_read_only"] for item in listed.values())

    # An address served already, and a port another program took: one line each.
    line = one_line_error(dog("nbd", "serve", "-p", sheep_port, "--listen", f":{port}",
                              check=EXIT_EXISTS))
    assert line == (f"dog: 127.0.0.1:{port} is served already, by nbdkit pid {pid}"
                    f" ('dog nbd stop 127.0.0.1:{port}' stops it)"), line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        line = one_line_error(dog("nbd", "serve", "-p", sheep_port, "--listen",
                                  f":{taken.getsockname()[1]}", check=EXIT_SYSTEM))
    assert "nbdkit failed to start" in line, line


@needs_nbdkit
def test_foreground_serve_becomes_nbdkit(cluster):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dog", "nbd", "serve", "-p", str(cluster.sheep[0].port),
         "--listen", f":{port}", "-f"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port)
        assert set(exports(f"nbd://127.0.0.1:{port}")) == {"alice", "alice@t1", "bob"}
        assert os.readlink(f"/proc/{process.pid}/exe").endswith("nbdkit")  # dog exec'd it
        listed = json.loads(dog("nbd", "list", "--json").stdout)  # as systemd runs it
        assert [(server["pid"], server["listen"]) for server in listed] == [
            (process.pid, f"127.0.0.1:{port}")]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.stderr is not None
    assert f"at nbd://127.0.0.1:{port}/NAME" in process.stderr.read()


@needs_nbdkit
def test_serve_list_and_stop_a_background_server(cluster, state_dir, tmp_path):
    sheep_port = str(cluster.sheep[0].port)
    port = free_port()
    dog("-p", sheep_port, "nbd", "serve", "--listen", f":{port}")
    socket_path = tmp_path / "nbd.sock"
    dog("-p", sheep_port, "nbd", "serve", "--unix", str(socket_path), "--readonly")

    listed = json.loads(dog("nbd", "list", "--json").stdout)
    assert [(server["listen"], server["unix"], server["readonly"]) for server in listed] == [
        (f"127.0.0.1:{port}", None, False), (None, str(socket_path), True)]
    tcp, unix = listed
    assert tcp["sheep"] == f"127.0.0.1:{sheep_port}"
    assert tcp["url"] == f"nbd://127.0.0.1:{port}/NAME"
    assert tcp["command"] == ["dog", "-p", sheep_port, "nbd", "serve", "--listen", f":{port}"]
    assert time.time() - 60 < tcp["started"] <= time.time()
    assert Path(tcp["pidfile"]).parent == state_dir
    assert int(Path(tcp["pidfile"]).read_text()) == tcp["pid"]
    for server in listed:
        assert sorted(server["exports"]) == ["alice", "alice@t1", "bob"], server
        assert server["clients"] == [] and server["clients_error"] is None, server
    table = dog("nbd", "list").stdout.splitlines()
    assert table[0].split() == ["PID", "ADDRESS", "SHEEP", "STARTED", "MODE", "EXPORTS",
                                "CLIENTS"]
    assert table[1].split()[:3] == [str(tcp["pid"]), f"127.0.0.1:{port}",
                                    f"127.0.0.1:{sheep_port}"]
    assert table[1].split()[-3:] == ["rw", "3", "0"] and table[2].split()[-3:] == ["ro", "3", "0"]
    assert len(table) == 3  # no clients, nothing unknown

    # Stopped by address: the process is gone, and so is its record.
    result = dog("nbd", "stop", f"127.0.0.1:{port}")
    assert result.stdout.strip() == f"stopped nbdkit pid {tcp['pid']} at 127.0.0.1:{port}"
    assert result.stderr == ""  # no SIGKILL was needed
    assert process_state(tcp["pid"]) in (None, "Z")  # gone, or a zombie nobody reaps
    assert not Path(tcp["pidfile"]).exists()
    # One that died behind dog's back is dropped from the list.
    os.kill(unix["pid"], signal.SIGKILL)
    stop_pid(unix["pid"])
    assert json.loads(dog("nbd", "list", "--json").stdout) == []
    assert list(state_dir.iterdir()) == []
    assert dog("nbd", "list").stdout.strip() == f"no NBD servers running (records in {state_dir})"

    line = one_line_error(dog("nbd", "stop", str(unix["pid"]), check=EXIT_MISSING))
    assert line == (f"dog: no NBD server {unix['pid']} is running ('dog nbd list' shows them;"
                    f" records in {state_dir})"), line
    assert dog("nbd", "stop", "--all").stdout.strip() == "no NBD servers running"


def tcp_addresses(pid: int, remote_port: int) -> set[str]:
    """HOST:PORT of each of pid's IPv4 TCP connections to remote_port: the address
    nbdkit sees for that client."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        (local_ip, local_port), remote = fields[1].split(":"), fields[2].split(":")
        if fields[9] in inodes and int(remote[1], 16) == remote_port:
            host = socket.inet_ntoa(int(local_ip, 16).to_bytes(4, sys.byteorder))
            found.add(f"{host}:{int(local_port, 16)}")
    return found


@contextlib.contextmanager
def attached(uri: str, *options: str) -> Iterator[subprocess.Popen[str]]:
    """A qemu-io holding uri open, once it has read from it (so nbdkit opened it)."""
    client = subprocess.Popen(["qemu-io", *options, "-f", "raw", uri], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write("read 0 4096\n")
        client.stdin.flush()
        assert "read 4096/4096" in client.stdout.readline()
        client.stdout.readline()  # its timing
        yield client
    finally:
        if client.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                client.stdin.write("quit\n")
                client.stdin.flush()
        try:
            client.wait(timeout=30)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()


@needs_nbdkit
def test_list_shows_each_servers_clients_from_the_cluster(cluster):
    """The clients come from the cluster's attachments through that nbdkit's pid: the
    NBD client's own address, the export it opened (a snapshot by its tag), rw or ro.
    Without the cluster the servers are still listed, their clients unknown."""
    sheep_port = str(cluster.sheep[0].port)
    port, other_port = free_port(), free_port()
    # --retry 1: without the sheep, nbdinfo --list gets its error in a second.
    dog("-p", sheep_port, "nbd", "serve", "--listen", f":{port}", "--retry", "1")
    dog("--port", sheep_port, "nbd", "serve", "--listen", f":{other_port}", "--retry", "1")
    with attached(f"nbd://127.0.0.1:{port}/bob") as writer, \
            attached(f"nbd://127.0.0.1:{port}/alice@t1", "-r") as reader:
        (writer_address,) = tcp_addresses(writer.pid, port)
        (reader_address,) = tcp_addresses(reader.pid, port)
        listed = json.loads(dog("nbd", "list", "--json").stdout)
        assert [server["listen"] for server in listed] == [
            f"127.0.0.1:{port}", f"127.0.0.1:{other_port}"]
        served, idle = listed
        assert served["clients_error"] is None and idle["clients"] == []
        clients = served["clients"]
        assert [(client["address"], client["vdi"], client["mode"]) for client in clients] == [
            (reader_address, "alice@t1", "ro"), (writer_address, "bob", "rw")], clients
        assert all(client["sheep"] and time.time() - 60 < client["since"] <= time.time()
                   and client["holds_lock"] is False for client in clients), clients

        table = dog("nbd", "list").stdout.splitlines()
        assert table[1].split()[-1] == "2" and table[2].split()[-1] == "0", table
        assert table[3] == "" and table[4].split() == [
            "SERVER", "CLIENT", "VDI", "MODE", "VIA", "SHEEP", "SINCE"], table
        assert [line.split()[:4] for line in table[5:]] == [
            [f"127.0.0.1:{port}", reader_address, "alice@t1", "ro"],
            [f"127.0.0.1:{port}", writer_address, "bob", "rw"]], table

    # The cluster gone: the servers are listed all the same, their clients unknown.
    cluster.kill(0)
    listed = json.loads(dog("nbd", "list", "--json").stdout)
    assert [server["listen"] for server in listed] == [
        f"127.0.0.1:{port}", f"127.0.0.1:{other_port}"]
    for server in listed:
        assert server["clients"] is None, server
        assert server["clients_error"].startswith(
            f"cannot connect to sheep at 127.0.0.1:{sheep_port}: "), server
    table = dog("nbd", "list").stdout.splitlines()
    assert [line.split()[-1] for line in table[1:3]] == ["?", "?"], table
    assert [line for line in table[3:] if line.startswith("clients")] == [
        f"clients: unknown, {listed[0]['clients_error']}"], table  # one line for one sheep
    assert all(line.startswith("exports of ") for line in table[3:-1]), table


def test_stop_kills_a_server_that_ignores_sigterm_and_needs_a_target(state_dir, tmp_path):
    """A process recorded as nbdkit (argv[0] says so) that ignores SIGTERM: stop says
    it sends SIGKILL. No nbdkit needed."""
    stubborn = subprocess.Popen([str(tmp_path / "nbdkit"), "60"], executable="/bin/sleep",
                                preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    try:
        state_dir.mkdir(mode=0o700)
        (state_dir / "tcp-127.0.0.1-10999.json").write_text(json.dumps({
            "pid": stubborn.pid, "listen": "127.0.0.1:10999", "unix": None,
            "url": "nbd://127.0.0.1:10999/NAME", "sheep": "127.0.0.1:7000",
            "started": time.time(), "command": ["dog", "nbd", "serve"],
            "nbdkit_command": [str(tmp_path / "nbdkit"), "60"],
            "pidfile": str(state_dir / "tcp-127.0.0.1-10999.pid")}))
        line = one_line_error(dog("nbd", "stop", check=EXIT_USAGE))
        assert "name one server (ADDRESS or PID) or give --all" in line, line
        result = dog("nbd", "stop", "--timeout", "0.3", ":10999")
        assert result.stderr.strip() == (f"dog: nbdkit pid {stubborn.pid} did not exit within"
                                         f" 0.3 s of SIGTERM: killing it (SIGKILL)")
        assert result.stdout.strip() == f"stopped nbdkit pid {stubborn.pid} at 127.0.0.1:10999"
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert list(state_dir.iterdir()) == []
    finally:
        stubborn.kill()
        stubborn.wait()
