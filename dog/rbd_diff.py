"""Ceph's "rbd diff v1" stream format (Ceph's doc/dev/rbd-diff.rst), both ways.

    "rbd diff v1\\n"
    metadata records, before any data record:
        'f' le32 length, name   the snapshot the diff starts from (absent: from nothing)
        't' le32 length, name   the snapshot it leads to (absent: the image itself)
        's' le64 size           the image's size at the end
    data records, in increasing offset order, apart:
        'w' le64 offset, le64 length, then length bytes   data
        'z' le64 offset, le64 length                      zeros
    'e'                                                   the end

Files written here are what `rbd export-diff` writes, and `rbd import-diff` and
`rbd merge-diff` take them (tests/cli/test_dog_backup.py runs merge-diff on them).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from sheep.errors import InvalidParameters

BANNER = b"rbd diff v1\n"
_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")
_extent = struct.Struct("<QQ")
name_max_bytes = 4096  # longer snapshot names are a damaged file, not a name
zero_merge_max = 1 << 62  # 'z' records are merged up to this length


@dataclass
class Header:
    from_snap: str | None = None
    to_snap: str | None = None
    size: int | None = None


@dataclass
class Record:
    kind: str  # "w" or "z"
    offset: int
    length: int
    at: int  # the record's position in the stream (for messages)


class Writer:
    """Writes a diff: header(), then data() and zeros() in increasing offset order
    (adjacent zeros merge into one record), then end()."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.written = 0
        self.data_bytes = 0
        self.records = 0
        self._next = 0  # records must not go back
        self._zero: tuple[int, int] | None = None

    def _put(self, data: bytes | memoryview) -> None:
        self.out.write(data)
        self.written += len(data)

    def header(self, header: Header) -> None:
        if header.size is None:
            raise ValueError("a diff names the image's size")
        self._put(BANNER)
        for tag, name in (("f", header.from_snap), ("t", header.to_snap)):
            if name is not None:
                raw = name.encode()
                self._put(tag.encode() + _u32.pack(len(raw)) + raw)
        self._put(b"s" + _u64.pack(header.size))

    def _order(self, offset: int, length: int) -> None:
        if offset < self._next or length <= 0:
            raise ValueError(f"diff records must go forward: {offset}+{length} after {self._next}")
        self._next = offset + length

    def data(self, offset: int, data: bytes | memoryview) -> None:
        self._order(offset, len(data))
        self._flush_zeros()
        self._put(b"w" + _extent.pack(offset, len(data)))
        self._put(data)
        self.data_bytes += len(data)
        self.records += 1

    def zeros(self, offset: int, length: int) -> None:
        self._order(offset, length)
        if self._zero is not None and sum(self._zero) == offset and (
                self._zero[1] + length <= zero_merge_max):
            self._zero = (self._zero[0], self._zero[1] + length)
            return
        self._flush_zeros()
        self._zero = (offset, length)

    def _flush_zeros(self) -> None:
        if self._zero is not None:
            self._put(b"z" + _extent.pack(*self._zero))
            self.records += 1
            self._zero = None

    def end(self) -> None:
        self._flush_zeros()
        self._put(b"e")


class Reader:
    """Reads a diff: header() first, then records() yields each data or zero record;
    after a 'w' record, read_data() gives its bytes (records() skips them if not)."""

    def __init__(self, source: BinaryIO, label: str = "the diff") -> None:
        self.source = source
        self.label = label
        self.position = 0
        self._unread = 0  # data bytes of the last 'w' record not read yet
        self._peeked: tuple[str, int] | None = None  # a record tag read ahead, and where

    def _exact(self, count: int, what: str) -> bytes:
        parts = []
        want = count
        while want:
            part = self.source.read(want)
            if not part:
                raise InvalidParameters(f"{self.label} is cut short: {what} at byte"
                                        f" {self.position} is incomplete")
            parts.append(part)
            want -= len(part)
            self.position += len(part)
        return b"".join(parts)

    def _tag(self) -> tuple[str, int]:
        """The next record's tag, and its position in the stream."""
        if self._peeked is not None:
            peeked, self._peeked = self._peeked, None
            return peeked
        at = self.position
        return self._exact(1, "a record").decode("latin-1"), at

    def header(self) -> Header:
        banner = self.source.read(len(BANNER))
        self.position += len(banner)
        if banner != BANNER:
            raise InvalidParameters(f"{self.label} is not an rbd diff v1 stream (it starts"
                                    f" with {banner[:16]!r})")
        header = Header()
        while True:
            tag, at = self._tag()
            if tag in ("f", "t"):
                length = _u32.unpack(self._exact(4, "a snapshot name's length"))[0]
                if length > name_max_bytes:
                    raise InvalidParameters(f"{self.label}: a snapshot name of {length} bytes"
                                            f" at byte {at}")
                try:
                    name = self._exact(length, "a snapshot name").decode()
                except UnicodeDecodeError:
                    raise InvalidParameters(f"{self.label}: the snapshot name at byte {at}"
                                            " is not UTF-8") from None
                if tag == "f":
                    header.from_snap = name
                else:
                    header.to_snap = name
            elif tag == "s":
                header.size = _u64.unpack(self._exact(8, "the image size"))[0]
            elif tag in ("w", "z", "e"):
                self._peeked = (tag, at)
                break
            else:
                raise InvalidParameters(f"{self.label}: unknown record {tag!r} at byte {at}")
        if header.size is None:
            raise InvalidParameters(f"{self.label} does not give the image's size ('s')")
        return header

    def records(self, size: int | None = None) -> Iterator[Record]:
        """Each 'w' and 'z' record, checked to go forward and to fit an image of size
        bytes; ends at 'e' (after which nothing may follow)."""
        end = 0
        while True:
            self._skip_data()
            tag, at = self._tag()
            if tag == "e":
                if self.source.read(1):
                    raise InvalidParameters(f"{self.label}: bytes follow its end record"
                                            f" (at byte {at})")
                return
            if tag not in ("w", "z"):
                raise InvalidParameters(f"{self.label}: unknown record {tag!r} at byte {at}")
            offset, length = _extent.unpack(self._exact(16, "a record's extent"))
            if offset < end:
                raise InvalidParameters(f"{self.label}: the record at byte {at} goes back"
                                        f" to offset {offset} (after {end})")
            end = offset + length
            if size is not None and end > size:
                raise InvalidParameters(f"{self.label}: the record at byte {at} ends past"
                                        f" the image's size ({offset}+{length} > {size})")
            if tag == "w":
                self._unread = length
            yield Record(tag, offset, length, at)

    def read_data(self, count: int) -> bytes:
        """Up to count bytes of the current 'w' record's data."""
        count = min(count, self._unread)
        data = self._exact(count, "a data record") if count else b""
        self._unread -= count
        return data

    def _skip_data(self) -> None:
        while self._unread:
            self.read_data(1 << 20)
