"""Naming a write into a borrowed input, for the page guards (:mod:`shardc.guard`).

Pure functions over the geometry of the protected inputs, with no guard
state: an input's byte extent within its mapping, the element holding a given
byte (any strides, negative ones included), the ``cow="deny"`` error naming
input, shard, offset and element, and, for a system call that failed with
``EFAULT`` because it was handed a read-only borrowed input, which input that
was (from the buffers in the traceback's frames).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from .errors import BorrowedInputWriteError

__all__ = [
    "Input",
    "byte_bounds_of",
    "element_index",
    "format_index",
    "deny_error",
    "buffer_span",
    "efault_candidates",
    "efault_error",
]


@dataclass
class Input:
    """One protected input: a view (``shape``/``strides``/``offset0``) into the
    mapping at ``addr`` of ``nbytes`` bytes, guarded as region ``rid``."""

    rid: int
    name: str
    addr: int
    nbytes: int
    mode: str
    itemsize: int
    shape: tuple[int, ...] | None
    strides: tuple[int, ...] | None
    offset0: int

    def extent(self) -> tuple[int, int]:
        """Byte range [lo, hi) of this input's elements, relative to the mapping start."""
        if self.shape is None or self.strides is None:
            return self.offset0, self.nbytes
        if any(n == 0 for n in self.shape):
            return self.offset0, self.offset0
        lo = sum((n - 1) * s for n, s in zip(self.shape, self.strides, strict=True) if s < 0)
        hi = sum((n - 1) * s for n, s in zip(self.shape, self.strides, strict=True) if s > 0) + self.itemsize
        return self.offset0 + lo, self.offset0 + hi


def byte_bounds_of(array: Any) -> tuple[int, int]:
    """Lowest and one-past-highest byte address of a NumPy array."""
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:  # numpy < 2
        from numpy import byte_bounds  # type: ignore[attr-defined,no-redef]
    lo, hi = byte_bounds(array)
    return int(lo), int(hi)


def element_index(inp: Input, rel: int) -> tuple[int, ...] | None:
    """Index of the element holding byte ``rel`` (relative to element [0, ...]), or None."""
    itemsize = max(inp.itemsize, 1)
    if inp.shape is None:
        if rel < 0 or rel >= inp.nbytes - inp.offset0:
            return None
        return (rel // itemsize,)
    shape = inp.shape
    strides: tuple[int, ...]
    if inp.strides is None:  # C order
        c_order: list[int] = []
        acc = itemsize
        for n in reversed(shape):
            c_order.insert(0, acc)
            acc *= max(n, 1)
        strides = tuple(c_order)
    else:
        strides = inp.strides
    if any(n == 0 for n in shape):
        return None
    # Measure from the lowest-addressed element; a negative stride flips its axis.
    low, dims = 0, []
    for n, s in zip(shape, strides, strict=True):
        if s < 0:
            low += (n - 1) * s
        dims.append((n, abs(s), s < 0))
    rem = rel - low
    if rem < 0:
        return None
    index = [0] * len(shape)
    for k in sorted(range(len(shape)), key=lambda k: -dims[k][1]):
        n, s, flipped = dims[k]
        i = 0 if s == 0 else min(rem // s, n - 1)
        rem -= i * s
        index[k] = n - 1 - i if flipped else i
    return tuple(index) if rem < itemsize else None


def format_index(index: tuple[int, ...] | None) -> str:
    if index is None:
        return "not inside any element"
    return "element [" + ", ".join(str(i) for i in index) + "]"


def deny_error(shard_id: Any, ev: dict[str, Any]) -> BorrowedInputWriteError:
    msg = (
        f"shard {shard_id} wrote to borrowed input {ev['input']!r} at byte {ev['first_offset']} "
        f"({format_index(ev['first_index'])}); cow='deny' forbids writes to borrowed inputs"
    )
    return BorrowedInputWriteError(msg, ev["input"], shard_id, ev["first_offset"], ev["first_index"])


def buffer_span(obj: Any) -> tuple[int, int] | None:
    """(lo, hi) address range of an ndarray/memoryview/bytearray, or None."""
    try:
        if isinstance(obj, (memoryview, bytearray)):
            obj = np.asarray(obj)  # shares the memory: only its address is needed
        if isinstance(obj, np.ndarray):
            lo, hi = byte_bounds_of(obj)
            return int(lo), int(hi)
    except Exception:  # noqa: BLE001 - best effort: exotic buffers are simply not candidates
        return None
    return None


def efault_candidates(
    tb: TracebackType | None, views: dict[int, list[Input]], lookup: Callable[[int, int], list[int]]
) -> list[Input]:
    """Inputs a failed system call may have been given, innermost frame first.

    Args:
        tb: the traceback of the ``OSError(EFAULT)``.
        views: region id -> the inputs protected in that region.
        lookup: ``(addr, size)`` -> ids of the regions overlapping that range.
    """
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        found: dict[int, Input] = {}
        for value in list(frame.f_locals.values()):
            items = value if isinstance(value, (list, tuple)) and len(value) < 64 else [value]
            for item in items:
                span = buffer_span(item)
                if span is None:
                    continue
                for rid in lookup(span[0], max(span[1] - span[0], 1)):
                    for v in views.get(rid, ()):
                        lo, hi = v.extent()
                        if span[0] < v.addr + hi and v.addr + lo < span[1]:
                            found[id(v)] = v
        if found:
            return list(found.values())
    return [v for views in views.values() for v in views]


def efault_error(shard_id: Any, exc: OSError, cands: list[Input]) -> BorrowedInputWriteError:
    """The error for a system call that failed with EFAULT writing into one of ``cands``."""
    if len(cands) == 1:
        what, name, mode = f"borrowed input {cands[0].name!r}", cands[0].name, cands[0].mode
    else:
        names = ", ".join(repr(c.name) for c in cands)
        what, name, mode = f"one of the borrowed inputs {names} (could not tell which)", None, None
    why = (
        "cow='deny' forbids writes to borrowed inputs"
        if mode == "deny"
        else "the kernel cannot write into borrowed inputs under any cow mode (they are read-only "
        "mappings); read into a private copy (e.g. X.copy()) instead"
    )
    msg = (
        f"shard {shard_id} passed {what} to a system call that writes into it "
        f"(readinto/readv/recv_into: {exc.strerror or 'EFAULT'}); {why}"
    )
    return BorrowedInputWriteError(msg, name, shard_id, None, None)
