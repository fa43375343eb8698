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


class Progress:
    """A progress bar on a terminal, nothing otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.bar = click.progressbar(length=total, label=label, file=sys.stderr,
                                     show_pos=False) if is_terminal() else None
        if self.bar is not None:
            self.bar.__enter__()

    def update(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


class StatusLine:
    """A line that changes in place on a terminal (with a bar when a fraction is
    given); elsewhere, a new line whenever the text changes, at most every interval."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self.terminal = is_terminal()
        self.interval_s = interval_s
        self._last_text = ""
        self._last_time = 0.0

    def show(self, text: str, done: float | None = None) -> None:
        if self.terminal:
            bar = ""
            if done is not None:
                filled = int(30 * min(max(done, 0.0), 1.0))
                bar = f"[{'#' * filled}{'-' * (30 - filled)}] {100 * done:3.0f}%  "
            click.echo(f"\r\x1b[K{bar}{text}", nl=False, err=True)
            return
        now = time.monotonic()
        if text != self._last_text and now - self._last_time >= self.interval_s:
            click.echo(text, err=True)
            self._last_text, self._last_time = text, now

    def clear(self) -> None:
        """Take the line away (a terminal's), for what is printed next."""
        if self.terminal:
            click.echo("\r\x1b[K", nl=False, err=True)

    def close(self, text: str) -> None:
        self.clear()
        click.echo(text, err=True)
