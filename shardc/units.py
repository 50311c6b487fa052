"""Sizes and units: parsing "2GB", formatting byte counts (a leaf module)."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .errors import InvalidArgumentError

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1024,
    "KIB": 1024,
    "M": 1024**2,
    "MB": 1024**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GB": 1024**3,
    "GIB": 1024**3,
    "T": 1024**4,
    "TB": 1024**4,
    "TIB": 1024**4,
}


_SIZES: dict[str, int] = {}  # sizes parsed from strings (valid ones only, a few)


def parse_bytes(value: Any, arg: str) -> int | None:
    """Parse a memory size: bytes as a number, or "2GB", "512MB", "1.5G" (binary units).

    None and float("inf") mean "no limit".
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{arg} must be a size like '2GB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, float) and math.isinf(value) and value > 0:
            return None
        if not math.isfinite(float(value)) or value <= 0:
            raise InvalidArgumentError(f"{arg} must be a positive size, got {value!r}")
        return int(value)
    if isinstance(value, str):
        n = _SIZES.get(value)  # (the default mem_cap is parsed at every call)
        if n is not None:
            return n
        m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$", value)
        unit = m.group(2).upper() if m else None
        if not m or unit not in _SIZE_UNITS:
            raise InvalidArgumentError(
                f"{arg}={value!r} is not a size; write a number with an optional unit, e.g. "
                "'2GB', '512MB', '1.5G' or 2_000_000_000 (units: B, KB, MB, GB, TB; binary)"
            )
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
        if n <= 0:
            raise InvalidArgumentError(f"{arg} must be a positive size, got {value!r}")
        if len(_SIZES) < 64:
            _SIZES[value] = n
        return n
    raise InvalidArgumentError(f"{arg} must be a size like '2GB' or a number of bytes, got {value!r}")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_recycle(recycle: Any) -> float | None:
    """The drift fraction of ``recycle=`` (True: 0.5; False/None: no drift recycling)."""
    if recycle is True:
        return 0.5
    if recycle is False or recycle is None:
        return None
    if isinstance(recycle, (int, float)) and not isinstance(recycle, bool) and recycle > 0:
        return float(recycle)
    raise InvalidArgumentError(f"recycle must be True, False or a positive fraction (e.g. 0.5), got {recycle!r}")
