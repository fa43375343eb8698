"""What every dog command shares: where the sheep is, and how to reach it.

-a/--address, -p/--port, --keyring and --name are accepted both before the
command (global, as in ``dog -p 7001 node list``) and after it (as Sheepdog
takes them: ``dog node list -p 7001``); DOG_ADDRESS, DOG_PORT, DOG_KEYRING and
DOG_NAME set the defaults.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from sheep import auth, constants
from sheep.client import Client
from sheep.size import parse_size

T = TypeVar("T")


@dataclass
class Target:
    address: str = constants.address_default
    port: int = constants.port_default
    keyring: str | None = None  # --keyring (DOG_KEYRING)
    name: str | None = None  # --name (DOG_NAME)
    prefer_node: bool = False  # format: the node key first (no admin exists before it)
    explicit: set[str] = field(default_factory=set)  # fields given on the command line

    def credentials(self) -> auth.Auto:
        """Keys as dog finds them; on one box also the node keyring the sheep names."""
        return auth.Auto(self.keyring, self.name, self.prefer_node)


def _setter(field_name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    """A callback that sets a Target field from -a/-p, before or after the command. An
    explicit option always beats the environment: DOG_PORT read again at the
    subcommand does not undo 'dog -p 7001 ...'."""

    def set_field(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is None:
            return
        target = ctx.ensure_object(Target)
        source = ctx.get_parameter_source(param.name or "")
        if source is click.core.ParameterSource.COMMANDLINE:
            target.explicit.add(field_name)
        elif field_name in target.explicit:
            return
        setattr(target, field_name, value)

    return set_field


_set_address = _setter("address")
_set_port = _setter("port")
_set_keyring = _setter("keyring")
_set_name = _setter("name")


def connection_options(function: Callable[..., Any],
                       port_names: tuple[str, ...] = ("-p", "--port"),
                       credentials: bool = True) -> Callable[..., Any]:
    """-a/-p, and --keyring/--name (credential_options) unless credentials is False."""
    function = click.option(
        *port_names, "sheep_port", type=click.IntRange(1, 65535), callback=_set_port,
        expose_value=False, is_eager=True, envvar="DOG_PORT", allow_from_autoenv=False,
        help="Port of the sheep to talk to (default 7000).")(function)
    function = click.option(
        "-a", "--address", callback=_set_address, expose_value=False, is_eager=True,
        envvar="DOG_ADDRESS", allow_from_autoenv=False,
        help="Address of the sheep to talk to (default 127.0.0.1).")(function)
    return credential_options(function) if credentials else function


def credential_options(function: Callable[..., Any], keyring: bool = True
                       ) -> Callable[..., Any]:
    """--keyring and --name, before the command or after it; keyring=False leaves out
    --keyring (a command whose own --keyring means something else: 'dog cluster format
    --keyring' is where the first admin key goes)."""
    if keyring:
        function = click.option(
            "--keyring", "sheep_keyring", type=click.Path(dir_okay=False),
            callback=_set_keyring, expose_value=False, is_eager=True, envvar="DOG_KEYRING",
            allow_from_autoenv=False,
            help="Keyring file with this principal's key (env DOG_KEYRING). Default:"
                 " ~/.config/sheepdog/keyring, then the one-box cluster's own.")(function)
    return click.option(
        "--name", "sheep_name", callback=_set_name, expose_value=False, is_eager=True,
        envvar="DOG_NAME", allow_from_autoenv=False,
        help="Principal to authenticate as (env DOG_NAME; default client.admin).")(function)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def run(call: Callable[[Client], Awaitable[T]]) -> T:
    """Connect to the chosen sheep, run one call, disconnect."""
    target = click.get_current_context().ensure_object(Target)

    async def main() -> T:
        client = await Client.connect(target.address, target.port,
                                      credentials=target.credentials())
        try:
            return await call(client)
        finally:
            client.close()

    return asyncio.run(main())


class SizeType(click.ParamType):
    """Sizes like 4M, 256G, 1.5T (binary units)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


SIZE = SizeType()


class RateType(SizeType):
    """Bytes per second, like 100M or 100M/s."""

    name = "rate"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, str) and value.lower().endswith("/s"):
            value = value[:-2]
        return super().convert(value, param, ctx)


RATE = RateType()


class OidType(click.ParamType):
    """Object ids in hex (0x1f, or 16 hex digits as printed) or decimal."""

    name = "oid"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        try:
            if text.startswith("0x") or len(text) == 16:
                oid = int(text, 16)
            else:
                oid = int(text, 10)
        except ValueError:
            self.fail(f"invalid object id {value!r}: use decimal, 0x-hex or 16 hex digits",
                      param, ctx)
        if not 0 <= oid < 2**64:
            self.fail(f"object id {value!r} does not fit in 64 bits", param, ctx)
        return oid


OID = OidType()


class DurationType(click.ParamType):
    """Durations like 90s, 30m, 24h, 7d (a bare number is seconds)."""

    name = "duration"
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        factor = self.units.get(text[-1:], 0)
        number = text[:-1] if factor else text
        try:
            seconds = int(number) * (factor or 1)
        except ValueError:
            self.fail(f"invalid duration {value!r}: use a number with s, m, h or d", param, ctx)
        if seconds < 0:
            self.fail(f"invalid duration {value!r}: it cannot be negative", param, ctx)
        return seconds


DURATION = DurationType()
