"""Out buffers across nodes: what a macro-shard wrote, and merging it back.

Each node agent holds its own copy of every out buffer, started from the
caller's contents, and a private *snapshot* of it.  After a macro-shard the
agent compares the two page by page (4 KiB pages as rows of uint64 words:
one vectorised pass, no per-byte Python), and for every run of changed pages
sends the bytes of the run and, unless every byte in it changed, a bit mask
of the changed bytes (:func:`take_diff`); the snapshot then catches up.  So
what travels is what the shards wrote, at byte precision, whatever the write
pattern (``out[shard.idx]`` rows, ``out[shard.id]`` scalars, scattered).

The caller merges each macro-shard's runs into its buffers
(:class:`OutMerger`), keeping a map of the bytes written so far: bytes two
macro-shards both wrote must agree, else the call fails with
:class:`~shardc.errors.ClusterError` naming the buffer, the byte offset and
element, and both macro-shards (a local run would have kept whichever shard
ran last: an order a cluster does not have).  A byte a shard "wrote" with the
value it already had is invisible to the diff; that is the one write pattern
this cannot see, and it cannot change the bytes the caller ends up with.

Costs: per node, the snapshot (1x the out buffers); per macro-shard, one
compare of the buffers at memory speed; at the caller, a written map of 1
byte per buffer byte.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ClusterError

PAGE = 4096
_STEP = 1 << 24  # bytes compared per vectorised pass (bounds the temporaries)

# One changed run: (byte offset, the run's bytes, packed mask of changed bytes or None: all changed).
Run = tuple[int, bytes, "bytes | None"]


def byte_view(arr: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a C-contiguous array (no copy)."""
    return arr.reshape(-1).view(np.uint8)


def _changed_pages(cur: np.ndarray, snap: np.ndarray) -> np.ndarray:
    """Offsets of the pages where ``cur`` and ``snap`` (flat uint8) differ."""
    n = cur.size
    full = n - n % PAGE
    found = []
    for off in range(0, full, _STEP):
        end = min(off + _STEP, full)
        a = cur[off:end].view(np.uint64).reshape(-1, PAGE // 8)
        b = snap[off:end].view(np.uint64).reshape(-1, PAGE // 8)
        hit = np.flatnonzero((a != b).any(axis=1))
        if hit.size:
            found.append(hit * PAGE + off)
    if full < n and not np.array_equal(cur[full:], snap[full:]):
        found.append(np.array([full], dtype=np.int64))
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _runs_of(pages: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Consecutive pages -> (start, stop) byte ranges."""
    if pages.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != PAGE) + 1
    out = []
    for grp in np.split(pages, breaks):
        out.append((int(grp[0]), min(int(grp[-1]) + PAGE, n)))
    return out


def take_diff(cur: np.ndarray, snap: np.ndarray) -> list[Run]:
    """What changed in ``cur`` (flat uint8) since ``snap``; ``snap`` catches up."""
    runs: list[Run] = []
    for start, stop in _runs_of(_changed_pages(cur, snap), cur.size):
        c = cur[start:stop].copy()  # the pool's workers are idle now: a stable copy
        m = c != snap[start:stop]
        runs.append((start, c.tobytes(), None if m.all() else np.packbits(m).tobytes()))
        snap[start:stop] = c
    return runs


def rollback(cur: np.ndarray, snap: np.ndarray) -> None:
    """Put ``cur`` back to ``snap`` where they differ (a macro-shard that did not finish)."""
    for start, stop in _runs_of(_changed_pages(cur, snap), cur.size):
        cur[start:stop] = snap[start:stop]


class OutMerger:
    """Merges macro-shards' runs into the caller's out arrays (see module docstring)."""

    def __init__(self, outs: dict[str, np.ndarray]) -> None:
        self.arrays = outs
        self.work: dict[str, np.ndarray] = {}
        self.written: dict[str, np.ndarray] = {}
        self.sources: dict[str, list[tuple[int, int, str]]] = {}  # name -> (start, stop, who) merged
        self.bytes_merged = 0
        for name, arr in outs.items():
            # A C-contiguous caller array is merged into in place; any other
            # view through a C-order copy, written back by finish().
            w = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
            self.work[name] = byte_view(w)
            self.written[name] = np.zeros(w.nbytes, dtype=bool)
            self.sources[name] = []

    def check(self, name: str, runs: list[Run], who: str) -> None:
        """Raise ClusterError if ``runs`` disagree with bytes merged before."""
        dst, done = self.work[name], self.written[name]
        for start, data, mask in runs:
            new = np.frombuffer(data, dtype=np.uint8)
            stop = start + new.size
            m = _unpack(mask, new.size)
            both = done[start:stop] & m
            if not both.any():
                continue
            bad = np.flatnonzero(both & (dst[start:stop] != new))
            if bad.size:
                self._conflict(name, start + int(bad[0]), who)

    def apply(self, name: str, runs: list[Run], who: str) -> None:
        """Merge ``runs`` (checked first) into buffer ``name``."""
        self.check(name, runs, who)
        dst, done = self.work[name], self.written[name]
        for start, data, mask in runs:
            new = np.frombuffer(data, dtype=np.uint8)
            stop = start + new.size
            if mask is None:
                dst[start:stop] = new
                done[start:stop] = True
            else:
                m = _unpack(mask, new.size)
                np.copyto(dst[start:stop], new, where=m)
                done[start:stop] |= m
            self.sources[name].append((start, stop, who))
            self.bytes_merged += new.size

    def _conflict(self, name: str, off: int, who: str) -> None:
        arr = self.arrays[name]
        item = arr.dtype.itemsize
        elem = np.unravel_index(off // item, arr.shape) if arr.ndim else ()
        prev = [w for s, e, w in self.sources[name] if s <= off < e]
        raise ClusterError(
            f"out[{name!r}]: byte offset {off} (element {tuple(int(i) for i in elem)}) was written with "
            f"different values by {', '.join(prev[-3:]) if prev else 'an earlier macro-shard'} and by {who}; a cluster "
            "run merges each node's writes and cannot order two shards that write the same bytes "
            "differently (a local run keeps whichever ran last). Let each element be written by one shard "
            "only (e.g. out[shard.idx] or out[shard.id])"
        )

    def finish(self) -> None:
        """Write merged copies back into caller views that were not C-contiguous."""
        for name, arr in self.arrays.items():
            if not arr.flags.c_contiguous:
                arr[...] = self.work[name].view(arr.dtype).reshape(arr.shape)

    def summary(self) -> dict[str, Any]:
        return {name: int(w.sum()) for name, w in self.written.items()}


def _unpack(mask: bytes | None, n: int) -> np.ndarray:
    if mask is None:
        return np.ones(n, dtype=bool)
    return np.unpackbits(np.frombuffer(mask, dtype=np.uint8), count=n).astype(bool)
