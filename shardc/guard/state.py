"""Per-process guard state: the protected inputs, their edges, counters (a leaf of the package)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgumentError

MODES = ("deny", "audit", "allow")


@dataclass
class _Input:
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
        lo = sum((n - 1) * s for n, s in zip(self.shape, self.strides) if s < 0)
        hi = sum((n - 1) * s for n, s in zip(self.shape, self.strides) if s > 0) + self.itemsize
        return self.offset0 + lo, self.offset0 + hi


class _State:
    """Per-process guard state (a forked child inherits and then re-installs)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.signum: int | None = None
        self.notify = "interrupt"
        self.prev_handler: Any = None
        self.inputs: dict[int, _Input] = {}  # region id -> the first input protected there
        self.views: dict[int, list[_Input]] = {}  # region id -> every input sharing the mapping
        self.current: Any = None  # the ShardScope of the running shard
        self.seen_notified = 0
        self.stats: dict[str, dict[str, Any]] = {}
        # Inherited inputs (shardc.inherit): the bytes of the partial pages at
        # their ends, which no page guard can cover, checked after each shard.
        self.edges: dict[tuple[int, int], _Edge] = {}
        self.handle_edges: dict[int, list[tuple[int, int]]] = {}
        self.next_handle = -2
        self.lost: list[str] = []  # inputs written beyond what can be restored


@dataclass
class _Edge:
    """Bytes of an inherited input on a page shared with other memory."""

    lo: int
    saved: bytes
    views: list[_Input]


_state = _State()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgumentError(f"{name}={raw!r} is not an integer") from None


def _default_signal() -> int:
    raw = os.environ.get("SHARDC_GUARD_SIGNAL", "SIGUSR2")
    try:
        return int(raw) if raw.isdigit() else int(getattr(signal.Signals, raw.upper()))
    except AttributeError:
        raise InvalidArgumentError(f"SHARDC_GUARD_SIGNAL={raw!r} is not a signal name") from None


def _byte_bounds(array: Any) -> tuple[int, int]:
    """Lowest and one-past-highest byte address of a NumPy array."""
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:  # numpy < 2
        from numpy import byte_bounds  # type: ignore[attr-defined,no-redef]
    lo, hi = byte_bounds(array)
    return int(lo), int(hi)


def _new_stats(mode: str) -> dict[str, Any]:
    return {"mode": mode, "shards_written": 0, "pages": 0, "bytes": 0, "faults": 0,
            "violations": 0, "kernel_writes": 0}
