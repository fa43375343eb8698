"""dog vdi: virtual disks, their snapshots and clones.

Names and commands follow Sheepdog's dog. Snapshots are named NAME@TAG (or
with -s TAG); a tag may also be a snapshot's numeric id.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO

import click

from dog.common import RATE, SIZE, connection_options, json_option, run
from dog.output import Progress, format_time, print_json, print_table
from sheep import constants
from sheep.client import Client
from sheep.errors import InvalidParameters, ReadOnly, SheepError, SystemFailure
from sheep.size import format_size

io_chunk_bytes = 4 << 20  # one object at the default size
io_depth = 8  # requests in flight for import/export/read/write
extents_step_bytes = 1 << 30
export_block_bytes = constants.block_size_bytes  # zero blocks this size stay holes


@click.group()
def vdi() -> None:
    """Create, snapshot, clone and move data in and out of virtual disks."""


def split_name(name: str, tag: str | None) -> tuple[str, str | None]:
    """NAME@TAG and -s TAG both name a snapshot; give both and they must agree."""
    if "@" in name:
        base, _, at_tag = name.partition("@")
        if tag is not None and tag != at_tag:
            raise InvalidParameters(f"{name!r} and -s {tag!r} name different snapshots")
        return base, at_tag
    return name, tag


snapshot_option = click.option("-s", "--snapshot", "tag", default=None,
                               help="Snapshot tag or id.")


@vdi.command()
@click.argument("name")
@click.argument("size", type=SIZE)
@click.option("-c", "--copies", type=click.IntRange(1, 8), default=None,
              help="Copies of this VDI's objects (default: the cluster's).")
@connection_options
def create(name: str, size: int, copies: int | None) -> None:
    """Create a thin VDI of SIZE, such as 256G or 1T: it uses no space until written."""
    value = run(lambda client: client.vdi_create(name, size, copies))
    click.echo(f"created VDI {value['name']!r} ({format_size(value['size'])}, id {value['id']})")


@vdi.command(name="list")
@click.argument("name", required=False)
@click.option("--no-usage", is_flag=True, help="Skip computing used and shared space (faster).")
@json_option
@connection_options
def list_(name: str | None, no_usage: bool, as_json: bool) -> None:
    """List VDIs and their snapshots (marked s; clones marked c).

    Used and Shared count as Sheepdog did, per image and per copy: Used the data
    this image wrote itself (the objects of its own generation), Shared the data
    it reads from the snapshots before it. 'dog vdi du' counts the other way, as
    rbd du does: all the data an image reaches, and what deleting it frees.
    """
    items = run(lambda client: client.vdi_list([name] if name else None, not no_usage))
    if name and not items:
        from sheep.errors import NoVdi

        raise NoVdi(f"no VDI named {name!r}")
    if as_json:
        print_json(items)
        return
    rows = []
    for item in sorted(items, key=lambda i: (i["name"], not i["snapshot"], i["id"])):
        mark = "s" if item["snapshot"] else ("c" if item["parent"] else "")
        used = "-" if no_usage else format_size(item["used"])
        shared = "-" if no_usage else format_size(item["shared"])
        rows.append([mark, item["name"], item["id"], format_size(item["size"]), used, shared,
                     format_time(item["ctime"]), item["copies"], item["tag"],
                     "locked" if item.get("lock") else "", qos_text(item.get("qos"))])
    print_table(["", "Name", "Id", "Size", "Used", "Shared", "Creation time", "Copies", "Tag",
                 "Lock", "QoS"], rows, right=["Id", "Size", "Used", "Shared", "Copies"])


def qos_text(qos: dict[str, Any] | None) -> str:
    """A VDI's limits in a few words: "300 IOPS, 10 MiB/s, burst 0.25s", or ""."""
    if not qos:
        return ""
    parts = []
    if qos.get("iops"):
        parts.append(f"{qos['iops']} IOPS")
    if qos.get("bps"):
        parts.append(f"{format_size(qos['bps'])}/s")
    parts.append(f"burst {qos.get('burst', 1.0):g}s")
    return ", ".join(parts)


class _Positive(click.ParamType):
    """A whole number >= 0 (0: no limit)."""

    name = "count"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value), 10)
            except ValueError:
                self.fail(f"{value!r} is not a whole number", param, ctx)
        if number < 0:
            self.fail(f"{value!r} is negative (0 means no limit)", param, ctx)
        return number


@vdi.command()
@click.argument("name")
@click.option("--iops", type=_Positive(), default=None,
              help="Operations per second the VDI may do (0: no limit).")
@click.option("--bps", type=RATE, default=None,
              help="Bytes per second the VDI may move, like 100M (0: no limit).")
@click.option("--burst", type=click.FloatRange(0.01, 3600), default=None,
              help="Seconds' worth of I/O the VDI may run ahead after an idle spell "
                   "(default 0.25).")
@click.option("--clear", is_flag=True, help="Remove every limit.")
@json_option
@connection_options
def qos(name: str, iops: int | None, bps: int | None, burst: float | None, clear: bool,
        as_json: bool) -> None:
    """Limit VDI NAME's I/O (every sheep serving it enforces the limits), clear them,
    or with no option show them. Limits apply per sheep that serves the VDI."""
    if clear and (iops is not None or bps is not None or burst is not None):
        raise click.UsageError("--clear takes no limits with it")
    value = run(lambda client: client.vdi_qos(name, iops, bps, burst, clear))
    if as_json:
        print_json(value)
        return
    text = qos_text(value.get("qos"))
    click.echo(f"VDI {name!r}: {text or 'no limits'}")


@vdi.command()
@click.argument("name")
@click.option("-s", "--snapshot", "tag", default="", help="Tag for the snapshot.")
@connection_options
def snapshot(name: str, tag: str) -> None:
    """Take a snapshot of VDI NAME (O(1); also while it is being written)."""
    _refuse_snapshot(name, "snapshot")
    value = run(lambda client: client.vdi_snapshot(name, tag))
    snap = value["snapshot"]
    label = f"{snap['tag']!r}" if snap["tag"] else "(untagged)"
    click.echo(f"snapshot {label} of {name!r} taken, id {snap['id']}")


@vdi.command()
@click.argument("source")
@click.argument("destination")
@snapshot_option
@connection_options
def clone(source: str, destination: str, tag: str | None) -> None:
    """Create VDI DESTINATION as a writable clone of a snapshot of SOURCE (O(1))."""
    source, tag = split_name(source, tag)
    if tag is None:
        raise click.UsageError("clone needs the snapshot to clone: -s TAG or SOURCE@TAG")
    value = run(lambda client: client.vdi_clone(source, tag, destination))
    click.echo(f"cloned {source}@{tag} as {value['name']!r} (id {value['id']})")


@vdi.command()
@click.argument("name")
@snapshot_option
@click.option("--force", is_flag=True, help="Roll back even if the VDI is attached.")
@connection_options
def rollback(name: str, tag: str | None, force: bool) -> None:
    """Return VDI NAME to a snapshot, discarding what was written since."""
    name, tag = split_name(name, tag)
    if tag is None:
        raise click.UsageError("rollback needs the snapshot: -s TAG or NAME@TAG")
    value = run(lambda client: client.vdi_rollback(name, tag, force))
    click.echo(f"rolled {name!r} back to {tag!r}; freed {value['freed_objects']} objects")


@vdi.command()
@click.argument("name")
@snapshot_option
@click.option("--force", is_flag=True, help="Delete even if the VDI is attached.")
@connection_options
def delete(name: str, tag: str | None, force: bool) -> None:
    """Delete VDI NAME with all its snapshots, or one snapshot with -s TAG.

    Clones of its snapshots stay intact: they keep what they share.
    """
    name, tag = split_name(name, tag)
    value = run(lambda client: client.vdi_delete(name, tag, force))
    what = f"snapshot {tag!r} of {name!r}" if tag is not None else f"VDI {name!r}"
    click.echo(f"deleted {what}; freed {value['freed_objects']} objects")


@vdi.command()
@click.argument("name")
@click.argument("size", type=SIZE)
@click.option("--allow-shrink", is_flag=True,
              help="Allow a smaller SIZE: the data past it is discarded and freed.")
@connection_options
def resize(name: str, size: int, allow_shrink: bool) -> None:
    """Grow VDI NAME to SIZE; with --allow-shrink, also shrink it.

    A shrink frees the data past SIZE (a later grow reads zeros there); snapshots
    keep their own size and data. It runs where the VDI's writer is, between its
    writes.
    """
    _refuse_snapshot(name, "resize")
    value = run(lambda client: client.vdi_resize(name, size, allow_shrink))
    freed = f"; freed {value['freed_objects']} objects" if "freed_objects" in value else ""
    click.echo(f"resized {name!r} to {format_size(value['size'])}{freed}")


# --- byte I/O -------------------------------------------------------------------


async def _open(client: Client, name: str, tag: str | None, writable: bool) -> dict[str, Any]:
    return await client.vdi_open(name, snapshot=tag, writable=writable,
                                 owner=f"dog (pid {os.getpid()})")


def _chunks(offset: int, length: int, step: int = io_chunk_bytes) -> Iterator[tuple[int, int]]:
    """Aligned chunks: the first ends on a step boundary, so each maps to one object."""
    end = offset + length
    while offset < end:
        count = min(step - offset % step, end - offset)
        yield offset, count
        offset += count


def _stdio(which: str) -> Any:
    stream = sys.stdout if which == "stdout" else sys.stdin  # (getattr is a command here)
    if stream is None:
        raise SystemFailure(f"{which} is closed")
    return stream


def _refuse_snapshot(name: str, action: str) -> None:
    if "@" in name:
        raise ReadOnly(f"cannot {action} {name!r}: snapshots are read-only")


def _range(size: int, offset: int, length: int | None) -> int:
    if offset > size:
        raise InvalidParameters(f"offset {offset} is past the end of the VDI ({size} bytes)")
    if length is None:
        return size - offset
    if offset + length > size:
        raise InvalidParameters(
            f"range {offset}+{length} is past the end of the VDI ({size} bytes)")
    return length


@contextlib.contextmanager
def _file_errors(file: str) -> Iterator[None]:
    """A local file that cannot be opened, read or written: one line, a system error."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as error:
        raise SystemFailure(f"{file}: {error.strerror or error}") from error


@vdi.command()
@click.argument("name")
@click.argument("offset", type=SIZE, default=0)
@click.argument("length", type=SIZE, required=False)
@snapshot_option
@connection_options
def read(name: str, offset: int, length: int | None, tag: str | None) -> None:
    """Write LENGTH bytes of NAME[@TAG] from OFFSET to stdout (default: to the end)."""
    name, tag = split_name(name, tag)
    out = _stdio("stdout").buffer

    async def call(client: Client) -> None:
        info = await _open(client, name, tag, writable=False)
        count = _range(info["size"], offset, length)
        pending: list[asyncio.Task[bytes]] = []
        try:
            for start, step in _chunks(offset, count):
                pending.append(asyncio.ensure_future(
                    client.vdi_read(info["handle"], start, step)))
                if len(pending) >= io_depth:
                    out.write(await pending.pop(0))
            while pending:
                out.write(await pending.pop(0))
            out.flush()
        finally:
            for task in pending:
                task.cancel()

    with _file_errors("stdout"):
        run(call)


@vdi.command()
@click.argument("name")
@click.argument("offset", type=SIZE, default=0)
@click.argument("length", type=SIZE, required=False)
@connection_options
def write(name: str, offset: int, length: int | None) -> None:
    """Write stdin into NAME at OFFSET (LENGTH bytes, or until stdin ends)."""
    _refuse_snapshot(name, "write to")
    source = _stdio("stdin").buffer

    async def call(client: Client) -> int:
        info = await _open(client, name, None, writable=True)
        limit = _range(info["size"], offset, length)
        written = await _copy_in(client, info["handle"], source, offset, limit,
                                 skip_zeros=False, progress=None)
        if length is not None and written < length:
            raise InvalidParameters(f"stdin ended after {written} of {length} bytes")
        if length is None and source.read(1):
            await client.flush()
            raise InvalidParameters(
                f"stdin holds more than fits: wrote {written} bytes up to the end of "
                f"{name!r} ({info['size']} bytes) and stopped")
        await client.flush()
        return written

    run(call)


class _Sink:
    """Writes to a VDI with io_depth requests in flight; zero ranges become discards
    (or are skipped, on a VDI that is known to be empty), merged up to 1 GiB."""

    def __init__(self, client: Client, handle: int, skip_zeros: bool) -> None:
        self.client = client
        self.handle = handle
        self.skip_zeros = skip_zeros
        self.pending: set[asyncio.Task[None]] = set()
        self.zero_start = self.zero_end = 0

    async def _submit(self, job: Any) -> None:
        if len(self.pending) >= io_depth:
            done, self.pending = await asyncio.wait(self.pending,
                                                    return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        self.pending.add(asyncio.ensure_future(job))

    async def zeros(self, start: int, length: int) -> None:
        if self.skip_zeros:
            return
        if self.zero_end == start and self.zero_end - self.zero_start + length <= extents_step_bytes:
            self.zero_end += length
            return
        await self._flush_zeros()
        self.zero_start, self.zero_end = start, start + length

    async def _flush_zeros(self) -> None:
        if self.zero_end > self.zero_start:
            await self._submit(self.client.vdi_discard(
                self.handle, self.zero_start, self.zero_end - self.zero_start))
        self.zero_start = self.zero_end = 0

    async def data(self, start: int, data: bytes) -> None:
        """Write data's blocks that hold anything but zeros; its zero blocks are
        zeros (so a chunk with 64 KiB of data allocates 64 KiB, not the object)."""
        at = 0
        view = memoryview(data)
        for begin, end in _data_blocks(data):
            if begin > at:
                await self.zeros(start + at, begin - at)
            await self._flush_zeros()
            await self._submit(self.client.vdi_write(self.handle, start + begin, view[begin:end]))
            at = end
        if at < len(data):
            await self.zeros(start + at, len(data) - at)

    async def close(self) -> None:
        await self._flush_zeros()
        try:
            for task in self.pending:
                await task
        finally:
            for task in self.pending:
                task.cancel()


async def _copy_in(client: Client, handle: int, source: BinaryIO, offset: int, limit: int,
                   skip_zeros: bool, progress: Progress | None) -> int:
    """Copy up to limit bytes from source to the VDI at offset; zero chunks are discarded."""
    written = 0
    sink = _Sink(client, handle, skip_zeros)
    try:
        for start, step in _chunks(offset, limit):
            data = _read_full(source, step)
            if not data:
                break
            await sink.data(start, data)
            written += len(data)
            if progress is not None:
                progress.update(len(data))
            if len(data) < step:
                break
    finally:
        await sink.close()
    return written


def _read_full(source: BinaryIO, count: int) -> bytes:
    parts = []
    while count > 0:
        part = source.read(count)
        if not part:
            break
        parts.append(part)
        count -= len(part)
    return b"".join(parts)


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Where a (sparse) file has data, by SEEK_DATA/SEEK_HOLE; all of it if unsupported."""
    ranges = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past offset
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, min(end, size) - start))
            offset = end
    except (AttributeError, OSError):
        return [(0, size)]
    return ranges


def _has_data(ranges: list[tuple[int, int]], start: int, length: int) -> bool:
    index = bisect.bisect_right([r[0] for r in ranges], start + length - 1) - 1
    return index >= 0 and ranges[index][0] + ranges[index][1] > start


@vdi.command(name="import")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--create", is_flag=True, help="Create the VDI at the file's size first.")
@connection_options
def import_(name: str, file: str, create: bool) -> None:
    """Copy a raw image FILE (or - for stdin) into VDI NAME.

    Afterwards the VDI's first bytes are exactly the file's; zero ranges and
    holes are not stored (they are discarded, which is fast).
    """
    _refuse_snapshot(name, "import into")
    regular = file != "-" and os.path.isfile(file)
    if file != "-" and not os.path.exists(file):
        raise click.BadParameter(f"{file} does not exist", param_hint="'FILE'")
    size = os.path.getsize(file) if regular else None
    if create and size is None:
        raise click.UsageError("--create needs a regular file: its size is the VDI's size")

    async def call(client: Client) -> int:
        if create:
            await client.vdi_create(name, size or 0)
        info = await _open(client, name, None, writable=True)
        if size is not None and size > info["size"]:
            raise InvalidParameters(
                f"{file} ({size} bytes) is larger than VDI {name!r} ({info['size']} bytes)")
        if size is None:
            source = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115
            try:
                copied = await _copy_in(client, info["handle"], source, 0, info["size"],
                                        skip_zeros=False, progress=None)
                if source.read(1):
                    raise InvalidParameters(
                        f"{file} is larger than VDI {name!r} ({info['size']} bytes)")
            finally:
                if source is not sys.stdin.buffer:
                    source.close()
            await client.flush()
            return copied
        progress = Progress(size, f"importing {os.path.basename(file)}")
        sink = _Sink(client, info["handle"], skip_zeros=create)
        try:
            with open(file, "rb") as source:
                ranges = _data_ranges(source.fileno(), size)
                for start, step in _chunks(0, size):
                    if _has_data(ranges, start, step):
                        source.seek(start)
                        await sink.data(start, _read_full(source, step))
                    else:
                        await sink.zeros(start, step)
                    progress.update(step)
        finally:
            await sink.close()
            progress.close()
        await client.flush()
        return size

    with _file_errors(file):
        copied = run(call)
    click.echo(f"imported {format_size(copied)} into {name!r}", err=True)


@vdi.command(name="export")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@snapshot_option
@connection_options
def export(name: str, file: str, tag: str | None) -> None:
    """Copy NAME[@TAG] into a raw image FILE (- for stdout); unwritten ranges stay holes."""
    name, tag = split_name(name, tag)

    async def call(client: Client) -> int:
        info = await _open(client, name, tag, writable=False)
        size = info["size"]
        to_stdout = file == "-"
        out = sys.stdout.buffer if to_stdout else open(file, "wb")  # noqa: SIM115
        progress = Progress(size, f"exporting {name}{'@' + tag if tag else ''}")
        try:
            if not to_stdout:
                out.truncate(size)
            for step_start, step_length in _chunks(0, size, extents_step_bytes):
                extents = await client.vdi_extents(info["handle"], step_start, step_length)
                for start, length, allocated in extents:
                    if allocated:
                        await _copy_out(client, info["handle"], out, start, length, to_stdout)
                    elif to_stdout:
                        _write_zeros(out, length)
                    progress.update(length)
        finally:
            progress.close()
            if not to_stdout:
                out.close()
        return int(size)

    with _file_errors(file):
        copied = run(call)
    click.echo(f"exported {format_size(copied)} from {name!r}", err=True)


async def _copy_out(client: Client, handle: int, out: BinaryIO, start: int, length: int,
                    sequential: bool) -> None:
    pending: list[tuple[int, asyncio.Task[bytes]]] = []

    async def drain_one() -> None:
        offset, task = pending.pop(0)
        data = await task
        if sequential:
            out.write(data)
            return
        for begin, end in _data_blocks(data):
            out.seek(offset + begin)
            out.write(data[begin:end])

    for offset, count in _chunks(start, length):
        pending.append((offset, asyncio.ensure_future(client.vdi_read(handle, offset, count))))
        if len(pending) >= io_depth:
            await drain_one()
    while pending:
        await drain_one()


def _data_blocks(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of blocks that are not all zeros: what export writes.

    An allocated object may still hold zero blocks (a VDI imported from a sparse
    file keeps the holes inside its objects); skipping them keeps them holes.
    """
    view = memoryview(data)
    zeros = bytes(export_block_bytes)
    start = None
    for at in range(0, len(view), export_block_bytes):
        block = view[at:at + export_block_bytes]
        if block == zeros[:len(block)]:
            if start is not None:
                yield start, at
                start = None
        elif start is None:
            start = at
    if start is not None:
        yield start, len(view)


def _write_zeros(out: BinaryIO, length: int) -> None:
    zeros = bytes(min(length, io_chunk_bytes))
    while length > 0:
        step = min(length, len(zeros))
        out.write(zeros[:step])
        length -= step


# --- the family tree ---------------------------------------------------------------


@vdi.command()
@click.option("--dot", is_flag=True, help="Print Graphviz (dot) instead of text.")
@json_option
@connection_options
def tree(dot: bool, as_json: bool) -> None:
    """Show VDIs, their snapshots and the clones made from them, as a tree."""
    items = run(lambda client: client.vdi_list(usage=False))
    if as_json:
        print_json(items)
        return
    click.echo(render_dot(items) if dot else render_tree(items), nl=not dot)


def _families(items: list[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]],
                                                    dict[int, list[str]], list[str]]:
    snapshots: dict[str, list[dict[str, Any]]] = {}
    clones: dict[int, list[str]] = {}
    names = sorted({item["name"] for item in items})
    roots = []
    existing_snapshots = {item["id"] for item in items if item["snapshot"]}
    for item in items:
        if item["snapshot"]:
            snapshots.setdefault(item["name"], []).append(item)
    for name in names:
        current = next(i for i in items if i["name"] == name and not i["snapshot"])
        parent = current["parent"]
        if parent and parent["snapshot"] in existing_snapshots:
            clones.setdefault(parent["snapshot"], []).append(name)
        else:
            roots.append(name)
    for snaps in snapshots.values():
        snaps.sort(key=lambda s: s["id"])
    return snapshots, clones, roots


def render_tree(items: list[dict[str, Any]]) -> str:
    snapshots, clones, roots = _families(items)
    by_name = {i["name"]: i for i in items if not i["snapshot"]}
    lines: list[str] = []

    def vdi_lines(name: str, prefix: str, label_prefix: str) -> None:
        current = by_name[name]
        note = ""
        if current["parent"] and current["parent"]["snapshot"] not in clones:
            note = f" (clone of deleted {current['parent']['vdi']}@{current['parent']['tag']})"
        lines.append(f"{label_prefix}{name} ({format_size(current['size'])}){note}")
        children = snapshots.get(name, [])
        entries: list[tuple[str, dict[str, Any] | None]] = [
            (f"[{s['tag'] or 'untagged'}] id {s['id']}, {format_time(s['ctime'])}", s)
            for s in children]
        entries.append(("(current)", None))
        for index, (label, snap) in enumerate(entries):
            last = index == len(entries) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{label}")
            if snap is None:
                continue
            below = clones.get(snap["id"], [])
            for clone_index, clone_name in enumerate(below):
                clone_last = clone_index == len(below) - 1
                inner = prefix + ("    " if last else "│   ")
                vdi_lines(clone_name, inner + ("    " if clone_last else "│   "),
                          inner + ("└── " if clone_last else "├── ") + "clone ")

    for root in roots:
        vdi_lines(root, "", "")
    return "\n".join(lines) if lines else "(no VDIs)"


def render_dot(items: list[dict[str, Any]]) -> str:
    snapshots, clones, roots = _families(items)
    out = ["digraph vdis {", '  rankdir="LR";', '  node [shape=box];']
    for item in items:
        if item["snapshot"]:
            label = f"{item['name']}@{item['tag'] or item['id']}"
            out.append(f'  "s{item["id"]}" [label="{label}", style=rounded];')
        else:
            out.append(f'  "v{item["id"]}" [label="{item["name"]}", style=bold];')
    for name, snaps in snapshots.items():
        chain = [f"s{s['id']}" for s in snaps]
        current = next(i for i in items if i["name"] == name and not i["snapshot"])
        chain.append(f"v{current['id']}")
        for left, right in zip(chain, chain[1:], strict=False):
            out.append(f'  "{left}" -> "{right}";')
    for snap_id, names in clones.items():
        for name in names:
            current = next(i for i in items if i["name"] == name and not i["snapshot"])
            out.append(f'  "s{snap_id}" -> "v{current["id"]}" [style=dashed, label="clone"];')
    out.append("}")
    return "\n".join(out) + "\n"


# --- objects and attributes ------------------------------------------------------------


@vdi.command(name="object")
@click.argument("name")
@click.option("-i", "--index", type=click.IntRange(0), default=0, help="Object index.")
@snapshot_option
@json_option
@connection_options
def object_(name: str, index: int, tag: str | None, as_json: bool) -> None:
    """Which object holds index INDEX of NAME, and which nodes hold that object."""
    name, tag = split_name(name, tag)
    value = run(lambda client: client.vdi_object(name, index, tag))
    if as_json:
        print_json(value)
        return
    start = value["offset"]
    end = start + value["object_size"]
    if not value["oid"]:
        click.echo(f"index {index} of {name!r} (bytes {start}-{end - 1}) was never written:"
                   " no object, reads as zeros")
        return
    click.echo(f"index {index} of {name!r} (bytes {start}-{end - 1}) is object "
               f"{value['oid']:016x}, {value['copies']} copies at epoch {value['epoch']}")
    rows = [[r["node_id"], r["endpoint"], r["zone"], r.get("version", "-"),
             r.get("error", "ok")] for r in value["replicas"]]
    print_table(["Node id", "Address", "Zone", "Version", "Status"], rows,
                right=["Zone", "Version"])


@vdi.command()
@click.argument("name")
@click.argument("key")
@click.argument("value", required=False)
@click.option("-d", "--delete", "remove", is_flag=True, help="Delete the attribute.")
@click.option("-x", "--exclusive", is_flag=True, help="Fail if the attribute exists.")
@connection_options
def setattr(name: str, key: str, value: str | None, remove: bool,  # noqa: A001
            exclusive: bool) -> None:
    """Set attribute KEY of VDI NAME to VALUE (or stdin); -d deletes it."""
    if remove:
        if value is not None:
            raise click.UsageError("-d takes no VALUE")
        run(lambda client: client.vdi_setattr(name, key, None))
        return
    if value is None:
        try:
            value = sys.stdin.buffer.read().decode()
        except UnicodeDecodeError as error:
            raise InvalidParameters(
                f"attribute values are UTF-8 text; stdin is not (byte {error.start})") from error
    run(lambda client: client.vdi_setattr(name, key, value, exclusive))


@vdi.command()
@click.argument("name")
@click.argument("key", required=False)
@json_option
@connection_options
def getattr(name: str, key: str | None, as_json: bool) -> None:  # noqa: A001
    """Print attribute KEY of VDI NAME (all attributes without KEY)."""
    value = run(lambda client: client.vdi_getattr(name, key))
    if as_json:
        print_json(value)
    elif key is None:
        print_table(["Key", "Value"], sorted(value.items()))
    else:
        click.echo(value["value"])


async def cluster_attachments(client: Client, vdis: list[dict[str, Any]]
                              ) -> tuple[list[dict[str, Any]], list[str]]:
    """Every VDI open on every sheep, read-only or not, and "NODE_ID: reason" for each
    sheep that could not be asked. A sheep knows only the opens made through it, so
    each node is asked for its own (Op.VDI_ATTACHMENTS); each row gets "id", its
    VDI's id from vdis (client.vdi_list), None for a VDI deleted meanwhile."""
    ids = {i["name"]: i["id"] for i in vdis if not i["snapshot"]}
    rows: list[dict[str, Any]] = []
    missed = []
    for node in await client.node_list():
        try:
            peer = await Client.connect(node["address"], node["port"],
                                        credentials=client.connection.credentials)
        except SheepError as error:
            missed.append(f"{node['node_id']}: {error}")
            continue
        try:
            rows += [{**item, "id": ids.get(item["name"])}
                     for item in await peer.vdi_attachments()]
        except SheepError as error:
            missed.append(f"{node['node_id']}: {error}")
        finally:
            peer.close()
    return rows, missed


@vdi.group()
def lock() -> None:
    """Show and break VDI write locks."""


@lock.command(name="list")
@json_option
@connection_options
def lock_list(as_json: bool) -> None:
    """VDI write locks and who holds them, then every attachment (read-only or not).

    Mode "lock" is the lock holder (since when it took the lock); "rw" an attachment
    that may write but does not hold the lock (it takes it at its first write, by a
    handoff if someone holds it); "ro" a reader. Attachments are asked of every sheep.
    """

    async def gather(client: Client) -> tuple[list[dict[str, Any]], list[str]]:
        items = await client.vdi_list(usage=False)
        rows = [{"mode": "lock", "name": i["name"], "id": i["id"], **i["lock"],
                 "since": float(i["lock"].get("time") or 0)}
                for i in items if not i["snapshot"] and i.get("lock")]
        attached, missed = await cluster_attachments(client, items)
        rows += [item for item in attached if not item.pop("holds_lock")]
        return rows, missed

    rows, missed = run(gather)
    for line in missed:
        click.echo(f"dog: warning: attachments not listed for node {line}", err=True)
    if as_json:
        print_json(rows)
        return
    order = {"lock": 0, "rw": 1, "ro": 2}
    rows.sort(key=lambda r: (r["name"], order.get(r["mode"], 3), r.get("since") or 0))
    print_table(["Name", "Id", "Mode", "Who", "Since"],
                [[r["name"] + (f"@{r['snapshot']}" if r.get("snapshot") else ""),
                  r.get("id") if r.get("id") is not None else "-", r["mode"],
                  r.get("owner") or r.get("node_id"), format_time(float(r.get("since") or 0))]
                 for r in rows], right=["Id"])


@lock.command(name="unlock")
@click.argument("name")
@connection_options
def lock_unlock(name: str) -> None:
    """Break VDI NAME's write lock (its writer's further writes fail)."""
    run(lambda client: client.vdi_unlock(name))
    click.echo(f"unlocked {name!r}")
