"""Big borrowed arrays inherited over ``fork`` instead of copied.

A plain NumPy array that lives in the master's private memory can reach the
workers in two ways: copied once into a sealed segment (``share()``: ~0.5 s
per GiB on this machine, and 1x its size in new memory), or *inherited*: the
workers are forked while the array exists, so the kernel shares its pages
copy-on-write and nothing is copied at all (fork copies page tables: ~1.5 ms
for 1 GiB of transparent huge pages).  ``shard_map`` takes the second way for
arrays of at least ``SHARDC_INHERIT_MIN_BYTES`` (64 MiB): it registers the
array here (a *token*), and the pool re-forks every worker that was forked
before the token existed (:meth:`shardc.pool.Pool.refork`).  A worker looks
the array up by token in its copy of this module's table: it is the very
same object, at the same address, so workers see it zero-copy.

What a worker sees is a *snapshot*: the array as it was when that worker
was forked, at the start of the call, or later for a worker that replaces
a crashed or recycled one (it is forked from the master as it is then).
So do not change a borrowed array (from another thread) while a call that
uses it runs: shards on replacement workers would see the change.  The
snapshot lives for one call: tokens are not reused across calls (the master
may change the array between calls, and checking that would cost more than
forking again), and at the end of the call each worker unmaps the pages it
inherited (``Worker.end_call``), so a ``del X`` in the master gives the
memory back instead of leaving it pinned in idle workers.

Copy-on-write policy: the worker write-protects the page-aligned interior
of the array with "snapshot" guard regions (``csrc/guard.c``: the original
content of a page is saved before the first write is let through, and put
back after the shard; the memory is anonymous, so dropping a written page
the way segment mappings are restored would zero it), and compares the
bytes of the (at most two) partial pages at its ends after each shard.  So
``cow="deny"`` raises naming the input, and every shard starts from the
pristine snapshot, exactly as for segment inputs.

Eligible arrays (:func:`eligible`): ``type(arr) is np.ndarray`` (a view is
fine) whose owner is an ndarray that allocated its memory (not a view of a
``bytes``/``bytearray``/mmap object), not object dtype, at least the
threshold in bytes of memory (a broadcast view counts what is behind it),
not already in a shardc segment, and every page of it in *private* mappings
(``/proc/self/maps``), on Linux.  ``np.memmap`` keeps the copy path, and so
does every array when the pool has no page guards (``Pool(cow_guard=False)``)
or ``SHARDC_INHERIT=0`` is set.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import numpy as np

from . import config
from .errors import WorkerSetupError

DEFAULT_MIN_BYTES = int(config.SETTINGS["SHARDC_INHERIT_MIN_BYTES"].default or 0)

# token -> the array; read by forked workers in their copy of this dict.
_held: dict[int, np.ndarray] = {}
_tokens = itertools.count(1)


def min_bytes() -> int:
    return max(1, config.get_int("SHARDC_INHERIT_MIN_BYTES"))


def enabled() -> bool:
    return config.get_bool("SHARDC_INHERIT")


def _private_span(lo: int, hi: int) -> bool:
    """True if every mapping overlapping [lo, hi) is private (and [lo, hi) is fully mapped)."""
    covered = lo
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, perms = line.split(None, 2)[:2]
                a, b = (int(x, 16) for x in span.split("-"))
                if b <= lo:
                    continue
                if a >= hi:
                    break
                if a > covered or perms[3] != "p":
                    return False
                covered = max(covered, b)
    except OSError:
        return False
    return covered >= hi


def root_of(arr: np.ndarray) -> np.ndarray:
    """The array at the end of ``arr``'s chain of ndarray bases."""
    while isinstance(arr.base, np.ndarray):
        arr = arr.base
    return arr


def memory_bytes(arr: np.ndarray) -> int:
    """Bytes of memory behind ``arr``: those its owner spans (a broadcast
    view of 4 GiB may sit on 8 KiB; a small view may pin a big array)."""
    from .share import array_extent

    return array_extent(root_of(arr))[1]


def eligible(arr: Any) -> bool:
    """Can ``arr`` reach workers by inheritance (see the module docstring)?

    Its owner must be an ndarray that allocated its own memory: a view of
    a ``bytes``/``bytearray``/mmap object is copied, as two such views may
    share pages without sharing an owner."""
    if not sys.platform.startswith("linux") or not enabled():
        return False
    if type(arr) is not np.ndarray or arr.dtype.hasobject or arr.size == 0:
        return False
    root = root_of(arr)
    if root.base is not None or not root.flags.owndata:
        return False
    from .share import array_extent

    lo, span = array_extent(root)
    if min(array_extent(arr)[1], span) < min_bytes():
        return False
    return _private_span(lo, lo + span)


def hold(arr: np.ndarray) -> int:
    """Register ``arr`` for workers forked from now on; returns its token."""
    token = next(_tokens)
    _held[token] = arr
    return token


def release(token: int) -> None:
    _held.pop(token, None)


def held_tokens() -> frozenset[int]:
    """Tokens a worker forked now inherits."""
    return frozenset(_held)


def held_bytes(tokens: frozenset[int]) -> int:
    """Memory behind the arrays of ``tokens``, each owner counted once."""
    roots = {id(root_of(_held[t])): _held[t] for t in tokens if t in _held}
    return sum(memory_bytes(a) for a in roots.values())


def lookup(token: int) -> np.ndarray:
    """In a worker: the inherited array of ``token``."""
    try:
        return _held[token]
    except KeyError:
        raise WorkerSetupError(
            f"this worker was forked before inherited input #{token} existed "
            "(a shardc bug: the pool should have re-forked it)"
        ) from None


def interior(lo: int, hi: int, page: int) -> tuple[int, int]:
    """The whole pages inside [lo, hi): (start, end), end <= start when there are none."""
    return -(-lo // page) * page, hi // page * page
