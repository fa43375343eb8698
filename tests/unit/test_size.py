"""Human sizes in and out."""

from __future__ import annotations

import pytest

from sheep.constants import GiB, KiB, MiB, PiB, TiB
from sheep.size import format_size, parse_size


@pytest.mark.parametrize(("text", "value"), [
    ("256G", 256 * GiB),
    ("4M", 4 * MiB),
    ("1.5T", 3 * TiB // 2),
    ("4096", 4096),
    ("4096B", 4096),
    ("1 GiB", GiB),
    ("1GB", GiB),
    ("1kib", KiB),
    (" 4m ", 4 * MiB),
    ("0.5K", 512),
    ("0", 0),
    ("16P", 16 * PiB),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["12Q", "", "-1", "G", "1.", "1e3", "4 M B", "0x10"])
def test_parse_size_rejects_with_the_input_named(text):
    with pytest.raises(ValueError) as raised:
        parse_size(text)
    assert repr(text) in str(raised.value)


@pytest.mark.parametrize("text", ["1.3", "1.5", "0.1K"])
def test_parse_size_rejects_fractions_of_a_byte(text):
    with pytest.raises(ValueError, match="not a whole number of bytes") as raised:
        parse_size(text)
    assert repr(text) in str(raised.value)


@pytest.mark.parametrize("text", ["9007199254740993", "1.1E"])
def test_parse_size_exact(text):
    # 2**53 + 1 bytes is exact; 1.1 * 2**60 is not a whole number of bytes.
    if text == "1.1E":
        with pytest.raises(ValueError):
            parse_size(text)
    else:
        assert parse_size(text) == 2**53 + 1


def test_parse_size_huge_number_is_a_value_error():
    with pytest.raises(ValueError):
        parse_size("1" + "0" * 400)


@pytest.mark.parametrize(("value", "text"), [
    (0, "0 B"),
    (1, "1 B"),
    (1023, "1023 B"),
    (1024, "1 KiB"),
    (1536, "1.5 KiB"),
    (4 * MiB, "4 MiB"),
    (256 * GiB, "256 GiB"),
    (3 * TiB // 2, "1.5 TiB"),
    (16 * PiB, "16 PiB"),
    (2**60, "1 EiB"),
    (2**70, "1024 EiB"),
])
def test_format_size(value, text):
    assert format_size(value) == text


@pytest.mark.parametrize("value", [4096, 4 * MiB, 256 * GiB, 3 * TiB // 2, 16 * PiB])
def test_format_then_parse(value):
    assert parse_size(format_size(value).replace(" ", "")) == value


def test_format_size_never_shows_1024_of_a_unit():
    assert format_size(MiB - 1) == "1 MiB"
