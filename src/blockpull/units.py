"""Human sizes and bandwidths: 512K, 50M, 2G (1024-based); plain numbers are bytes."""
from __future__ import annotations

import re
from typing import Union

__all__ = ["parse_size", "parse_bandwidth", "format_size"]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50,
          "E": 1 << 60}
#: the largest rate the limiter counts in (a signed 64-bit byte count)
_MAX_RATE = (1 << 63) - 1
_RX = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: Union[int, str]) -> int:
    """Bytes from an int or a string like "512K", "50M", "2G", "1.5G" (1024-based)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    m = _RX.match(str(value))
    if not m:
        raise ValueError(f"invalid size {value!r}: use bytes or a number with K, M, G or T")
    n = float(m.group(1)) * _UNITS[m.group(2).upper()]
    return int(n)


def parse_bandwidth(value: Union[int, str, None]) -> int:
    """Bytes per second from an int or a string; a bare number string means bytes,
    "50M" means 50 MiB/s. 0 (or None) means unlimited. Raises ValueError for anything
    else, negative rates, rates above 0 but below 1 byte/s ("0.5") and rates of 2**63
    bytes/s or more."""
    if value is None:
        return 0
    v = value
    if isinstance(v, str):
        v = v.strip()
        if v.lower().endswith("/s"):
            v = v[:-2]
    try:
        n = parse_size(v)
    except ValueError:
        raise ValueError(f"invalid bandwidth {value!r}: use bytes/s or a number with K, M "
                         f"or G") from None
    m = _RX.match(str(v))
    if n == 0 and m is not None and float(m.group(1)) > 0:
        # a rate below 1 byte/s rounds to 0, which would mean unlimited
        raise ValueError(f"bandwidth {value!r} is below 1 byte/s: give at least 1 byte/s, "
                         f"or 0 for unlimited")
    if n > _MAX_RATE:
        raise ValueError(f"bandwidth {value!r} is too large: at most {_MAX_RATE} bytes/s; "
                         f"0 means unlimited")
    return n


def format_size(n: float) -> str:
    """Short human form of a byte count: 1.5 GiB, 640 KiB, 12 B."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
