"""dog's output and exit codes, against real sheep processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from sheep.errors import EXIT_FAILURE, EXIT_MISSING, EXIT_SYSTEM, EXIT_USAGE
from sheep.testing.cluster import free_port


def dog(*args: str, port: int | None = None, stdin: bytes | None = None,
        check: int | None = 0) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "dog", *args]
    if port is not None:
        command += ["-p", str(port)]
    result = subprocess.run(command, input=stdin, capture_output=True, timeout=60)
    if check is not None:
        assert result.returncode == check, (result.returncode, result.stdout, result.stderr)
    return result


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("dog: ")
    return lines[0]


@pytest.fixture
def cluster(make_cluster):
    return make_cluster(3)


def test_no_sheep_listening():
    port = free_port()
    result = dog("node", "list", port=port, check=EXIT_SYSTEM)
    line = one_line_error(result)
    assert f"127.0.0.1:{port}" in line and "refused" in line.lower()


def test_global_and_trailing_connection_options():
    port = free_port()
    result = dog("-p", str(port), "cluster", "info", check=EXIT_SYSTEM)
    assert f":{port}" in one_line_error(result)
    result = subprocess.run([sys.executable, "-m", "dog", "node", "list"], capture_output=True,
                            env={**os.environ, "DOG_PORT": str(port)}, timeout=60)
    assert result.returncode == EXIT_SYSTEM and f":{port}" in result.stderr.decode()


@pytest.mark.parametrize("size", ["12Q", "abc", "1.5", "3M"])
def test_bad_object_size_is_a_usage_error(size):
    result = dog("cluster", "format", "--object-size", size, port=free_port(), check=EXIT_USAGE)
    line = one_line_error(result)
    assert "--object-size" in line
    if size in ("12Q", "abc"):
        assert repr(size) in line


def test_bad_arguments_are_usage_errors():
    assert "No such command" in one_line_error(dog("nodee", check=EXIT_USAGE))
    one_line_error(dog("node", "kill", "x", check=EXIT_USAGE))
    one_line_error(dog("cluster", "format", "--copies", "0", check=EXIT_USAGE))
    one_line_error(dog("object", "stat", "0xzz", check=EXIT_USAGE))


@pytest.mark.parametrize("command", [
    [], ["cluster"], ["cluster", "format"], ["cluster", "info"], ["cluster", "shutdown"],
    ["node"], ["node", "list"], ["node", "info"], ["node", "kill"], ["object"], ["object", "put"],
    ["object", "get"], ["object", "stat"], ["object", "rm"],
])
def test_help_everywhere(command):
    result = dog(*command, "--help")
    assert b"Usage:" in result.stdout


def test_unformatted_cluster(cluster):
    port = cluster.sheep[0].port
    info = json.loads(dog("cluster", "info", "--json", port=port).stdout)
    assert info["status"] == "wait_for_format"
    assert "waiting for the cluster to be formatted" in dog(
        "cluster", "info", port=port).stdout.decode()
    line = one_line_error(dog("object", "put", "7", port=port, stdin=b"x", check=EXIT_FAILURE))
    assert "not formatted" in line and "dog cluster format" in line


def test_copies_larger_than_zones(make_cluster):
    cluster = make_cluster(2)
    line = one_line_error(dog("cluster", "format", "--copies", "3", port=cluster.sheep[0].port,
                              check=EXIT_FAILURE))
    assert "3 copies" in line and "2 hosts" in line


def test_format_list_and_objects(cluster):
    port = cluster.sheep[0].port
    result = dog("cluster", "format", "--copies", "2", "--object-size", "1M", port=port)
    assert result.stdout.decode().splitlines() == [
        "formatted: 2 copies, 1 MiB objects",
        f"admin key (client.admin) written to {cluster.keyring}"]  # DOG_KEYRING
    line = one_line_error(dog("cluster", "format", port=port, check=3))
    assert "already formatted" in line

    table = dog("node", "list", port=port).stdout.decode().splitlines()
    assert table[0].split()[:4] == ["Id", "Node", "id", "Address"]
    assert len(table) == 4
    nodes = json.loads(dog("node", "list", "--json", port=port).stdout)
    assert [node["port"] for node in nodes] == sorted(node.port for node in cluster.sheep)
    assert all(node["status"] == "ok" for node in nodes)

    payload = os.urandom(5000)
    dog("object", "put", "0x2a", port=port, stdin=payload)
    other = cluster.sheep[2].port
    got = dog("object", "get", "42", "--length", "5000", port=other).stdout
    assert got == payload
    stat = json.loads(dog("object", "stat", "42", "--json", port=other).stdout)
    assert len(stat["replicas"]) == 2
    assert len({replica["zone"] for replica in stat["replicas"]}) == 2
    assert "Version" in dog("object", "stat", "42", port=port).stdout.decode()
    too_big = one_line_error(dog("object", "put", "43", port=port, stdin=bytes(1 << 20 | 1),
                                 check=EXIT_USAGE))
    assert "do not fit" in too_big

    info = json.loads(dog("node", "info", "--json", port=port).stdout)
    assert sum(node["objects"] for node in info) == 2
    assert "Total" in dog("node", "info", port=port).stdout.decode()

    dog("object", "rm", "42", port=port)
    line = one_line_error(dog("object", "get", "42", "--length", "1", port=port,
                              check=EXIT_MISSING))
    assert "does not exist" in line

    cluster_info = json.loads(dog("cluster", "info", "--json", port=port).stdout)
    assert cluster_info["copies"] == 2 and cluster_info["object_size"] == 1 << 20
    text = dog("cluster", "info", port=port).stdout.decode()
    assert "Cluster status: running" in text and "Epoch" in text


def test_node_kill_and_cluster_shutdown(cluster):
    port = cluster.sheep[0].port
    dog("cluster", "format", "--copies", "2", port=port)
    nodes = json.loads(dog("node", "list", "--json", port=port).stdout)
    victim = next(node for node in nodes if node["port"] != port)
    # By HOST:PORT: an index shifts when a node leaves.
    result = dog("node", "kill", f"{victim['address']}:{victim['port']}", port=port)
    assert victim["node_id"] in result.stdout.decode()
    assert f"node {victim['index']} " in result.stdout.decode()
    process = next(s for s in cluster.sheep if s.port == victim["port"]).process
    assert process.wait(timeout=15) == 0
    deadline = time.monotonic() + 5
    while len(json.loads(dog("node", "list", "--json", port=port).stdout)) != 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    line = one_line_error(dog("node", "kill", "9", port=port, check=EXIT_USAGE))
    assert "no node with index 9" in line
    line = one_line_error(dog("node", "kill", f"127.0.0.1:{victim['port']}", port=port,
                              check=EXIT_USAGE))
    assert f"no node '127.0.0.1:{victim['port']}'" in line and f":{port}" in line

    result = dog("cluster", "shutdown", port=port)
    assert "cluster shut down: 2 sheep stopped" in result.stdout.decode()
    # It returned once every sheep had exited (a zombie not reaped yet counts).
    for sheep in cluster.sheep:
        assert sheep.process is not None and sheep.process.poll() == 0


def test_an_explicit_port_beats_dog_port_before_or_after_the_command(cluster):
    live, dead = cluster.sheep[0].port, free_port()
    env = {**os.environ, "DOG_PORT": str(dead)}
    for args in (["-p", str(live), "cluster", "info"], ["cluster", "info", "-p", str(live)],
                 ["-a", "127.0.0.1", "-p", str(live), "node", "list"]):
        result = subprocess.run([sys.executable, "-m", "dog", *args], capture_output=True,
                                env=env, timeout=60)
        assert result.returncode == 0, (args, result.stderr)
    result = subprocess.run([sys.executable, "-m", "dog", "cluster", "info"], capture_output=True,
                            env=env, timeout=60)
    assert result.returncode == EXIT_SYSTEM and f":{dead}" in result.stderr.decode()


def test_a_keyring_open_to_others_is_warned_about_once_as_dogs_own_line(cluster, tmp_path):
    open_keyring = tmp_path / "open.keyring"
    shutil.copyfile(cluster.keyring, open_keyring)
    open_keyring.chmod(0o644)
    result = dog("--keyring", str(open_keyring), "node", "list", port=cluster.sheep[0].port)
    assert result.stderr.decode().splitlines() == [
        f"dog: warning: keyring {open_keyring} is open to others (mode 644): chmod 600 it"]


def test_every_command_takes_its_options_once_and_the_connection_ones_after_it():
    """-a/-p/--keyring/--name work after any command that talks to a sheep (as before
    it); an option declared twice (click only warns, and the later one silently wins)
    is a bug."""
    import click

    from dog.main import dog as dog_group

    def commands(command: click.Command, path: str):
        yield path, command
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from commands(sub, f"{path} {name}")

    for path, command in commands(dog_group, "dog"):
        names = [o for p in command.params for o in [*p.opts, *getattr(p, "secondary_opts", [])]]
        assert len(names) == len(set(names)), (path, sorted(names))
        if path == "dog nbd list":  # asks the sheep each server names, with dog's key
            assert {"--keyring", "--name"} <= set(names), names
        if "-p" not in names:  # talks to no sheep (dog auth new-keyring)
            continue
        # (dog cluster format's --keyring is its own: where the admin key goes.)
        wanted = {"-a", "-p", "--keyring", "--name"}
        assert wanted <= set(names), (path, sorted(wanted - set(names)))
