"""Human sizes: '256G', '4M', '1.5T', '4096' in, '256 GiB' out.

Units are binary (K = 1024), as in Sheepdog and qemu-img.
"""

from __future__ import annotations

import re
from fractions import Fraction

_units = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50, "E": 2**60}
_pattern = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGTPE])(?:I?B)?|B?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a size; raise ValueError naming the problem."""
    match = _pattern.match(str(text))
    if not match:
        raise ValueError(
            f"invalid size {text!r}: use a number with an optional unit K, M, G, T, P or E"
            " (for example 256G)")
    number, unit = match.groups()
    if len(number) > 40:
        raise ValueError(f"invalid size {text!r}: too large")
    value = Fraction(number) * _units[(unit or "").upper()]
    if value.denominator != 1:
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(value: int) -> str:
    """'0 B', '4.0 MiB', '256 GiB': at most one decimal, the largest unit that fits."""
    if value < 1024:
        return f"{value} B"
    scaled = float(value)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        scaled /= 1024
        # Round first: 1023.96 KiB must show as 1 MiB, not as 1024 KiB.
        if round(scaled, 1) < 1024 or unit == "EiB":
            text = f"{scaled:.1f}"
            if text.endswith(".0"):
                text = text[:-2]
            return f"{text} {unit}"
    raise AssertionError("unreachable")
