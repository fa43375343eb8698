"""dog vdi export-diff / import-diff (Ceph's names and format) and backup / restore.

A diff holds what changed between two snapshots, at 4 KiB, in Ceph's "rbd diff v1"
format (dog/rbd_diff.py): the sheep say which ranges changed without reading any
data (sheep/vdi_diff.py), and only those are read and written. Applied, a diff
stays thin whoever wrote it: zero blocks inside data records (Ceph's diffs have
them) are treated as zero records, made zero only where the VDI may hold data.

export-diff writes FILE.partial and renames it at the end: FILE is whole or absent.
import-diff checks everything it can before it writes (the from-snapshot, the
to-snapshot, the size; a regular file is read through once first), and if the
VDI has the diff's from-snapshot, a failure halfway rolls it back to it: the VDI
ends with all of the diff or none of it. A diff without a from-snapshot (a full
one) read from stdin has nothing to roll back to and may be left half applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO

import click

from dog import rbd_diff
from dog.common import connection_options, run
from dog.output import Progress
from dog.vdi import (
    _chunks,
    _data_blocks,
    _file_errors,
    _open,
    _Sink,
    _stdio,
    export_block_bytes,
    extents_step_bytes,
    split_name,
    vdi,
)
from sheep.client import Client
from sheep.errors import Exists, InvalidParameters, NoTag, NoVdi, SheepError
from sheep.size import format_size
from sheep.vdi_registry import name_problem

window_objects = 256  # object indexes asked per diff request
# Reads of changed ranges in flight: they are mostly single 4 KiB blocks, each a
# round trip, so more of them than a bulk copy keeps (io_depth) pay off.
diff_reads_in_flight = 32


async def _tag_of(client: Client, name: str, ref: str | None) -> str | None:
    """The tag of snapshot ref (a tag or an id) of NAME: a diff names snapshots by
    tag, as Ceph's format does, so an untagged one cannot be a diff's end."""
    if ref is None:
        return None
    for item in await client.vdi_list([name], usage=False):
        if item["snapshot"] and (item["tag"] == ref or str(item["id"]) == ref):
            if not item["tag"]:
                raise InvalidParameters(f"snapshot {ref} of VDI {name!r} has no tag: a diff"
                                        " names its snapshots by tag (take a tagged one)")
            return str(item["tag"])
    raise NoTag(f"VDI {name!r} has no snapshot {ref!r}")


async def write_diff(client: Client, name: str, tag: str | None, since: str | None,
                     out: BinaryIO, label: str) -> rbd_diff.Writer:
    """The diff of NAME@TAG since snapshot SINCE (None: everything) onto out."""
    tag, since = await _tag_of(client, name, tag), await _tag_of(client, name, since)
    first = await client.vdi_diff(name, tag, since, 0, 0)
    size, object_size = int(first["size"]), int(first["object_size"])

    def same(answer: dict[str, Any]) -> None:
        # The VDI itself (no @SNAP) is diffed as it stands: a writer that came and went
        # meanwhile would tear the diff (a snapshot never changes).
        if answer.get("state") != first.get("state"):
            raise SheepError(f"VDI {name!r} was written or replaced during the export:"
                             " export a snapshot of it (NAME@SNAP)")

    writer = rbd_diff.Writer(out)
    writer.header(rbd_diff.Header(since, tag, size))
    info = await _open(client, name, tag, writable=False)
    progress = Progress(size, label)
    window = window_objects * object_size
    try:
        for offset in range(0, size, window):
            answer = await client.vdi_diff(name, tag, since, offset, window)
            same(answer)
            reads: list[tuple[int, asyncio.Task[bytes]]] = []
            for start, length, kind in answer["ranges"]:
                if kind == "zero":
                    await _drain(reads, writer, 0)
                    writer.zeros(int(start), int(length))
                    continue
                for at, count in _chunks(int(start), int(length)):
                    reads.append((at, asyncio.ensure_future(
                        client.vdi_read(info["handle"], at, count))))
                    await _drain(reads, writer, diff_reads_in_flight)
            await _drain(reads, writer, 0)
            progress.update(min(window, size - offset))
        same(await client.vdi_diff(name, tag, since, 0, 0))  # nobody wrote while we read
        writer.end()
    finally:
        progress.close()
        await client.vdi_close(info["handle"])
    return writer


async def _drain(reads: list[tuple[int, asyncio.Task[bytes]]], writer: rbd_diff.Writer,
                 keep: int) -> None:
    """Write the reads under way, in order, until at most ``keep`` remain: a block
    of zeros goes as a zero record (a changed block may have been zeroed)."""
    try:
        while len(reads) > keep:
            at, task = reads.pop(0)
            data = await task
            done = 0
            view = memoryview(data)
            for begin, end in _data_blocks(data):
                if begin > done:
                    writer.zeros(at + done, begin - done)
                writer.data(at + begin, view[begin:end])
                done = end
            if done < len(data):
                writer.zeros(at + done, len(data) - done)
    except BaseException:
        for _, task in reads:
            task.cancel()
        raise


def _export_diff(name: str, file: str, since: str | None, tag: str | None) -> None:
    name, tag = split_name(name, tag)
    label = f"{name}@{tag}" if tag else name

    async def call(client: Client) -> rbd_diff.Writer:
        if file == "-":
            return await write_diff(client, name, tag, since, _stdio("stdout").buffer,
                                    f"diffing {label}")
        partial = f"{file}.partial"
        try:
            with open(partial, "wb") as out:
                writer = await write_diff(client, name, tag, since, out, f"diffing {label}")
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
        return writer

    with _file_errors(file):
        writer = run(call)
    click.echo(f"exported the diff of {label} since {since or 'its creation'}:"
               f" {format_size(writer.data_bytes)} of data in {writer.records}"
               f" record{'' if writer.records == 1 else 's'},"
               f" {format_size(writer.written)} written", err=True)


@vdi.command(name="export-diff")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--from-snap", "since", default=None,
              help="Snapshot of NAME the diff starts from (default: the whole VDI).")
@click.option("-s", "--snapshot", "tag", default=None, help="Snapshot the diff leads to.")
@connection_options
def export_diff(name: str, file: str, since: str | None, tag: str | None) -> None:
    """Write what changed in NAME[@SNAP] since --from-snap to FILE (- for stdout), in
    Ceph's rbd diff v1 format. Without --from-snap, all of its data."""
    _export_diff(name, file, since, tag)


@vdi.command()
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("-F", "--from", "since", default=None,
              help="Snapshot the backup starts from (an incremental backup).")
@click.option("-s", "--snapshot", "tag", default=None, help="Snapshot to back up.")
@connection_options
def backup(name: str, file: str, since: str | None, tag: str | None) -> None:
    """Back up NAME@SNAP to FILE: Sheepdog's name for export-diff (same format)."""
    _export_diff(name, file, since, tag)


# --- import ----------------------------------------------------------------------


def _check_file(file: str) -> None:
    """Read a diff file through once: a damaged or cut short one is refused before
    anything is written."""
    with open(file, "rb") as source:
        reader = rbd_diff.Reader(source, file)
        header = reader.header()
        for _ in reader.records(header.size):
            pass


def _snapshot_tags(items: list[dict[str, Any]]) -> list[str]:
    """The VDI's snapshots' tags (ids for untagged ones), oldest first."""
    return [str(i["tag"] or i["id"]) for i in sorted(items, key=lambda i: i["id"])
            if i["snapshot"]]


def _tag_problem(tag: str) -> str | None:
    """Why a diff's snapshot name cannot be a tag here (Ceph allows more)."""
    problem = name_problem(tag, "snapshot tag")
    if problem is None and tag.isdigit():
        problem = "a snapshot tag must not be all digits"
    return problem


async def _check_target(client: Client, name: str, header: rbd_diff.Header,
                        force: bool) -> dict[str, Any]:
    """Everything that can be checked before a byte is written."""
    items = await client.vdi_list([name], usage=False)
    if not items:
        raise NoVdi(f"VDI {name!r} does not exist")
    item = next(i for i in items if not i["snapshot"])
    tags = _snapshot_tags(items)
    if header.from_snap is not None:
        if header.from_snap not in tags:
            raise NoTag(f"VDI {name!r} has no snapshot {header.from_snap!r}, which the diff"
                        " starts from: it is not the diff's base (apply the diffs before it"
                        " first)")
        if not force:
            if tags[-1] != header.from_snap:
                raise InvalidParameters(
                    f"{header.from_snap!r} is not the latest snapshot of VDI {name!r}"
                    f" ({tags[-1]!r} is): roll back to it first (dog vdi rollback -s"
                    f" {header.from_snap} {name}), or give --force")
            if item.get("written") is not False:  # None: a VDI from before the flag
                raise InvalidParameters(
                    f"VDI {name!r} was written since snapshot {header.from_snap!r} (or"
                    " may have been): the diff would not give its to-snapshot; roll back to"
                    f" it first (dog vdi rollback -s {header.from_snap} {name}), or give"
                    " --force")
    if header.to_snap is not None:
        problem = _tag_problem(header.to_snap)
        if problem:
            raise InvalidParameters(f"the diff's to-snapshot {header.to_snap!r} cannot be"
                                    f" taken here: {problem}")
        if header.to_snap in tags:
            raise Exists(f"VDI {name!r} already has snapshot {header.to_snap!r}, which the"
                         " diff leads to")
    assert header.size is not None
    if header.size < int(item["size"]):
        raise InvalidParameters(
            f"the diff's image is {header.size} bytes, smaller than VDI {name!r}"
            f" ({item['size']} bytes): shrinking is not supported")
    return item


async def apply_diff(client: Client, reader: rbd_diff.Reader, name: str, force: bool,
                     create: bool, label: str) -> tuple[rbd_diff.Header, int]:
    """Apply the diff and take its to-snapshot. All or nothing where it can be: a
    failure after the first write rolls NAME back to the from-snapshot (which the
    checks made its latest, unwritten state), or deletes NAME if this made it. With
    --force there is no such state to return to: a failure leaves part of the diff."""
    header = reader.header()
    assert header.size is not None
    made = False
    if create and not await client.vdi_list([name], usage=False):
        if header.from_snap is not None:
            raise NoTag(f"the diff starts from snapshot {header.from_snap!r}: it cannot"
                        f" create VDI {name!r} (restore the full backup first)")
        problem = _tag_problem(header.to_snap) if header.to_snap is not None else None
        if problem:
            raise InvalidParameters(f"the diff's to-snapshot {header.to_snap!r} cannot be"
                                    f" taken here: {problem}")
        await client.vdi_create(name, header.size)
        made = True
    try:
        item = await _check_target(client, name, header, force)
    except BaseException:
        if made:
            await client.vdi_delete(name)
        raise
    try:
        applied = await _write_records(client, reader, name, header, item, made, label)
        if header.to_snap is not None:
            await client.vdi_snapshot(name, header.to_snap)
    except BaseException as failure:
        await _undo(client, name, header, force, made, failure)
        raise
    return header, applied


class _DiffSink(_Sink):
    """Applies a diff's records: data blocks are written, and zero blocks (a zero
    record, or zero blocks inside a data record: Ceph's diffs carry them) are
    discarded where the VDI may hold data, and skipped where it reads zeros already
    (a VDI made for the diff, or its unallocated ranges): a data record of 4 MiB
    with 4 KiB of data allocates 4 KiB.

    The VDI's allocation is asked once per extents step, when the records reach it.
    Records go forward and never overlap, so what this diff writes meanwhile lies
    before the zero ranges still to come (a copy-up keeps what the object read).
    """

    def __init__(self, client: Client, handle: int, size: int, skip_zeros: bool) -> None:
        super().__init__(client, handle, skip_zeros)
        self.size = size
        self._step = -1  # the extents step whose allocated ranges are held
        self._allocated: list[tuple[int, int]] = []  # (start, end) in that step

    async def zeros(self, start: int, length: int) -> None:
        if self.skip_zeros:
            return
        for at, count in _chunks(start, length, extents_step_bytes):
            for low, high in await self._allocated_in(at, at + count):
                await super().zeros(low, high - low)

    async def _allocated_in(self, start: int, end: int) -> list[tuple[int, int]]:
        step = start // extents_step_bytes
        if step != self._step:
            base = step * extents_step_bytes
            extents = await self.client.vdi_extents(
                self.handle, base, min(extents_step_bytes, self.size - base))
            self._step = step
            self._allocated = [(int(offset), int(offset) + int(length))
                               for offset, length, allocated in extents if allocated]
        return [(max(low, start), min(high, end)) for low, high in self._allocated
                if low < end and high > start]


def _grid_chunks(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """_chunks, with an unaligned head cut off first: each chunk's blocks then lie on
    the store's 4 KiB grid, where _data_blocks looks for zero blocks."""
    head = min(-offset % export_block_bytes, length)
    if head:
        yield offset, head
    yield from _chunks(offset + head, length - head)


async def _write_records(client: Client, reader: rbd_diff.Reader, name: str,
                         header: rbd_diff.Header, item: dict[str, Any], made: bool,
                         label: str) -> int:
    assert header.size is not None
    if header.size > int(item["size"]):
        await client.vdi_resize(name, header.size)
    info = await _open(client, name, None, writable=True)
    progress = Progress(header.size, label)
    sink = _DiffSink(client, info["handle"], header.size, skip_zeros=made)
    applied = 0
    try:
        for record in reader.records(header.size):
            if record.kind == "z":
                await sink.zeros(record.offset, record.length)
            else:
                for at, count in _grid_chunks(record.offset, record.length):
                    await sink.data(at, reader.read_data(count))
            applied += record.length
            progress.update(record.length)
        await sink.close()
        await client.flush()
    finally:
        for task in sink.pending:
            task.cancel()
        progress.close()
        with contextlib.suppress(SheepError, OSError):
            await client.vdi_close(info["handle"])
    return applied


async def _undo(client: Client, name: str, header: rbd_diff.Header, force: bool,
                made: bool, failure: BaseException) -> None:
    """After a failure: back to the state before the diff, and say so in the error."""
    if made:
        what = f"VDI {name!r}, which it had created, was deleted"
        action = client.vdi_delete(name)
    elif header.from_snap is not None and not force:
        what = f"VDI {name!r} was rolled back to snapshot {header.from_snap!r}"
        action = client.vdi_rollback(name, header.from_snap)
    else:
        reason = "--force" if force else "a full diff has no from-snapshot"
        failure.args = (f"{failure} (VDI {name!r} holds part of the diff: nothing to roll"
                        f" back to with {reason})",)
        return
    try:
        await action
    except SheepError as error:
        failure.args = (f"{failure}; and undoing it failed too ({what.split(',')[0]}):"
                        f" {error}",)
        return
    failure.args = (f"{failure} ({what}: nothing of the diff was kept)",)


def _import_diff(file: str, name: str, force: bool, create: bool) -> None:
    if "@" in name:
        raise InvalidParameters(f"cannot apply a diff to {name!r}: snapshots are read-only")
    if file != "-":
        if not os.path.exists(file):
            raise click.BadParameter(f"{file} does not exist", param_hint="'FILE'")
        with _file_errors(file):
            _check_file(file)

    async def call(client: Client) -> tuple[rbd_diff.Header, int]:
        source = _stdio("stdin").buffer if file == "-" else open(file, "rb")  # noqa: SIM115
        try:
            reader = rbd_diff.Reader(source, "stdin" if file == "-" else file)
            return await apply_diff(client, reader, name, force, create,
                                    f"applying {os.path.basename(file)}")
        finally:
            if source is not sys.stdin.buffer:
                source.close()

    with _file_errors(file):
        header, applied = run(call)
    click.echo(f"applied the diff {header.from_snap or '(full)'} -> {header.to_snap or name}"
               f" to {name!r}: {format_size(applied)} changed", err=True)


@vdi.command(name="import-diff")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Apply it even if NAME changed since the diff's from-snapshot.")
@connection_options
def import_diff(file: str, name: str, force: bool) -> None:
    """Apply an rbd diff v1 FILE (- for stdin) to VDI NAME, then take the diff's
    to-snapshot. NAME must have the diff's from-snapshot, unchanged since."""
    _import_diff(file, name, force, create=False)


@vdi.command()
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--force", is_flag=True,
              help="Apply it even if NAME changed since the backup's from-snapshot.")
@connection_options
def restore(name: str, file: str, force: bool) -> None:
    """Restore a backup FILE into NAME: a full backup creates NAME if it does not
    exist; an incremental one is applied on top of its from-snapshot."""
    _import_diff(file, name, force, create=True)
