"""Output for dog: aligned tables for people, JSON for scripts, one-line errors."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import click


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
          right: Sequence[str] = ()) -> str:
    """A plain aligned table; columns named in ``right`` are right-aligned (numbers)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in cells:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))

    def line(row: Sequence[str]) -> str:
        parts = []
        for index, cell in enumerate(row):
            if headers[index] in right:
                parts.append(cell.rjust(widths[index]))
            else:
                parts.append(cell.ljust(widths[index]))
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                right: Sequence[str] = ()) -> None:
    click.echo(table(headers, rows, right))


def format_time(seconds: float) -> str:
    if not seconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def error(message: str) -> None:
    click.echo(f"dog: {message}", err=True)


def is_terminal() -> bool:
    return sys.stderr.isatty()
