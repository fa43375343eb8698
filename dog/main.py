"""The dog command: parse, call the client library, format. Nothing else.

Errors become one line on stderr and Sheepdog's exit codes: 0 ok, 1 failure,
2 system (unreachable sheep), 3 exists, 4 full, 5 not found, 64 usage.
"""

from __future__ import annotations

import logging
import sys

import click

from dog import backup as _backup  # noqa: F401  (its commands join dog vdi)
from dog import lifecycle as _lifecycle  # noqa: F401  (and these)
from dog.auth import auth
from dog.cluster import cluster
from dog.common import Target, connection_options
from dog.nbd import nbd
from dog.node import node
from dog.object import object_
from dog.output import error
from dog.vdi import vdi
from sheep.errors import EXIT_FAILURE, EXIT_USAGE, SheepError


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "auto_envvar_prefix": "DOG"})
@connection_options
@click.version_option(package_name="sheepdog")
@click.pass_context
def dog(ctx: click.Context) -> None:
    """Manage a sheep cluster: its nodes, virtual disks (VDIs) and objects."""
    ctx.ensure_object(Target)


dog.add_command(auth)
dog.add_command(cluster)
dog.add_command(node)
dog.add_command(object_)
dog.add_command(vdi)
dog.add_command(nbd)


def main() -> None:
    # The library's warnings (a keyring open to others) read as dog's own lines.
    logging.basicConfig(level=logging.WARNING, format="dog: warning: %(message)s")
    if len(sys.argv) == 1:
        click.echo(dog.get_help(click.Context(dog, info_name="dog")))
        sys.exit(0)
    try:
        dog.main(standalone_mode=False)
    except click.UsageError as usage:
        hint = f" (see '{usage.ctx.command_path} --help')" if usage.ctx else ""
        error(f"{_negative(usage) or usage.format_message()}{hint}")
        sys.exit(EXIT_USAGE)
    except click.ClickException as failure:
        failure.show()
        sys.exit(failure.exit_code or EXIT_FAILURE)
    except click.Abort:
        error("aborted")
        sys.exit(EXIT_FAILURE)
    except SheepError as failure:
        error(failure.message)
        sys.exit(failure.exit_code)
    except BrokenPipeError:
        sys.exit(EXIT_FAILURE)
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(130)


def _negative(usage: click.UsageError) -> str | None:
    """A negative size or number ('vdi create x -5G') reads as an unknown option '-5':
    say what it is instead."""
    if not isinstance(usage, click.NoSuchOption) or not usage.option_name[1:2].isdigit():
        return None
    given = next((arg for arg in sys.argv[1:] if arg.startswith(usage.option_name)),
                 usage.option_name)
    return f"{given!r}: sizes and numbers cannot be negative"
