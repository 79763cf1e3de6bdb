"""Byte sizes: parsing ``4K``/``1MiB`` and printing them back."""

from __future__ import annotations

import argparse


def parse_size(text: str) -> int:
    """``"8"``, ``"4K"``, ``"1M"``, ``"256MiB"``, ``"1G"`` -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    if scale != 1:
        t = t[:-1]
    try:
        value = int(float(t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def human(nbytes: int) -> str:
    """``1048576`` -> ``"1MiB"``; sizes that are not whole units print in bytes."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"
