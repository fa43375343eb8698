"""dog auth: principals and their keys (Ceph's names: add, list, rm, get; and rotate)."""

from __future__ import annotations

from typing import Any

import click

from dog.common import connection_options, json_option, run
from dog.output import print_json, print_table
from sheep import auth as keys
from sheep.errors import UsageError


@click.group()
def auth() -> None:
    """Principals (client.NAME) and their keys and caps; the node key's keyring."""


def _section(value: dict[str, Any]) -> str:
    return keys.section_text(value["name"], keys.decode_key(value["key"]),
                             keys.Caps.parse(value["caps"]))


def _emit(value: dict[str, Any], output: str | None) -> None:
    """Print the keyring section, or add it to the keyring file output (mode 0600)."""
    if output is None:
        click.echo(_section(value), nl=False)
        return
    try:
        keys.merge_into_keyring(output, value["name"], keys.Entry(
            keys.decode_key(value["key"]), keys.Caps.parse(value["caps"])))
    except OSError as error:
        raise UsageError(f"cannot write {output}: {error.strerror}") from None
    click.echo(f"{value['name']} written to {output}")


output_option = click.option(
    "-o", "--output", type=click.Path(dir_okay=False), default=None,
    help="Add the keyring section to this file (mode 0600) instead of printing it.")


def _name(value: str) -> str:
    problem = keys.name_problem(value)
    if problem is not None:
        raise click.BadParameter(problem, param_hint="'NAME'")
    return value


@auth.command()
@click.argument("name", callback=lambda ctx, param, value: _name(value))
@click.option("--vdi", "patterns", multiple=True, metavar="PATTERN",
              help="VDIs it may list, create, read, write, snapshot, clone and delete:"
                   " a name or a pattern with * ? [ ] (repeatable).")
@click.option("--read-only", is_flag=True, help="It may only list and read those VDIs.")
@click.option("--admin", is_flag=True, help="It may do everything (but peer ops).")
@output_option
@connection_options
def add(name: str, patterns: tuple[str, ...], read_only: bool, admin: bool,
        output: str | None) -> None:
    """Add a principal NAME (client.SOMETHING); print its keyring section."""
    if admin and (patterns or read_only):
        raise UsageError("--admin takes no --vdi or --read-only: an admin touches every VDI")
    if not admin and not patterns:
        raise UsageError("give --vdi PATTERN (repeatable) or --admin")
    caps = "admin" if admin else " ".join(
        ["ro" if read_only else "rw", *(f"vdi={pattern}" for pattern in patterns)])
    try:
        keys.Caps.parse(caps)
    except ValueError as error:
        raise UsageError(str(error)) from None
    _emit(run(lambda client: client.auth_add(name, caps)), output)


@auth.command(name="list")
@json_option
@connection_options
def list_(as_json: bool) -> None:
    """List principals and their caps (never their keys)."""
    principals = run(lambda client: client.auth_list())
    if as_json:
        print_json(principals)
        return
    print_table(["Name", "Caps"], [[p["name"], p["caps"]] for p in principals])


@auth.command()
@click.argument("name", callback=lambda ctx, param, value: _name(value))
@connection_options
def rm(name: str) -> None:
    """Remove a principal; its open connections are cut at once."""
    run(lambda client: client.auth_rm(name))
    click.echo(f"removed {name}")


@auth.command()
@click.argument("name", callback=lambda ctx, param, value: _name(value))
@output_option
@connection_options
def rotate(name: str, output: str | None) -> None:
    """Give a principal a new key (the old one stops working, its connections are cut);
    print its new keyring section."""
    _emit(run(lambda client: client.auth_rotate(name)), output)


@auth.command()
@click.argument("name", callback=lambda ctx, param, value: _name(value))
@output_option
@connection_options
def get(name: str, output: str | None) -> None:
    """Print a principal's keyring section."""
    _emit(run(lambda client: client.auth_get(name)), output)


@auth.command(name="new-keyring")
@click.argument("path", type=click.Path(dir_okay=False))
def new_keyring(path: str) -> None:
    """Make a keyring file with a new cluster node key (mode 0600), for
    'sheep --keyring PATH' on every host of a multi-host cluster. Talks to no sheep."""
    try:
        keys.write_keyring(path, {keys.NODE: keys.Entry(keys.new_key(), keys.Caps(node=True))},
                           exclusive=True)
    except FileExistsError:
        raise UsageError(f"{path} exists: not overwriting a keyring") from None
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror}") from None
    click.echo(f"node keyring written to {path}: copy it to every host (mode 0600) and"
               " start each sheep with --keyring")
