"""Shard descriptors: how ``0..n-1`` is cut into pieces of work.

``shards(n, ...)`` cuts a range into contiguous blocks (``X[:, shard.idx]``
is then a zero-copy view, since ``idx`` is a ``slice``) or strided sets;
``shards_list(idxs)`` takes arbitrary index lists (searchlights, feature
sets).  Descriptors are lazy: a million shards cost a few integers until a
shard is looked at, so the master can describe any run in O(1) memory and the
per-shard message to a worker is just its id.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from . import config
from .errors import InvalidTypeError, ShardIndexError, ShardSpecError
from .seedseq import shard_rng

STRATEGIES = ("contiguous", "strided")
_COUNT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMB]?)\s*$", re.I)
_MULT = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


def parse_count(value: Any, arg: str) -> int:
    """Parse a positive count: an int, or a string like "10K", "1M", "3B" (B = billions)."""
    if isinstance(value, bool):
        raise ShardSpecError(f"{arg} must be a positive integer or a count like '10K', got {value!r}")
    if isinstance(value, (numbers.Integral, np.integer)) or isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str):
        m = _COUNT_RE.match(value)
        if not m:
            raise ShardSpecError(
                f"{arg}={value!r} is not a count; use an integer or a string such "
                "as '500', '10K', '1M' or '3B' (K=thousand, M=million, B=billion)"
            )
        exact = Fraction(m.group(1)) * _MULT[m.group(2).upper()]  # floats lose digits past 2**53
        if exact.denominator != 1:
            raise ShardSpecError(f"{arg}={value!r} is not a whole number of items")
        n = int(exact)
    else:
        raise ShardSpecError(f"{arg} must be a positive integer or a count like '10K', got {value!r}")
    if n < 1:
        raise ShardSpecError(f"{arg} must be at least 1, got {value!r}")
    return n


class Shard:
    """One piece of work.

    Attributes:
        id: 0-based shard id (its position in the descriptor).
        start, stop: first index and one past the last (for list shards:
            min and max+1 of ``idx``).
        len: number of items.
        idx: a ``slice`` (contiguous) or an int64 index array (strided/list).
        stride: step between items (strided shards; 1 for contiguous).
        rng: a ``numpy.random.Generator`` for this shard, set inside
            ``shard_map`` (its stream depends only on the seed and ``id``).
            Built on first use: a shard that never draws pays nothing for it.
    """

    __slots__ = ("id", "start", "stop", "len", "idx", "stride", "_seedseq", "_rng")

    def __init__(
        self, id: int, start: int, stop: int, length: int, idx: Any, stride: int = 1, seedseq: Any = None
    ) -> None:
        self.id = id
        self.start = start
        self.stop = stop
        self.len = length
        self.idx = idx
        self.stride = stride
        self._seedseq: Any = seedseq
        self._rng: Any = None

    @property
    def rng(self) -> np.random.Generator:
        """This shard's random generator (created on first use)."""
        try:
            r = self._rng
        except AttributeError:  # unset: a hot loop's BlockShard (shardc.worker.spec)
            r = None
        if r is None:
            ss = self._seedseq
            if ss is None:
                self._rng = np.random.default_rng()
            else:
                # The run's entropy (the executor passes just that: no tuple
                # per shard), or (entropy, shard id): built only now.
                if isinstance(ss, (int, np.integer)):
                    self._rng = shard_rng(int(ss), self.id)
                elif isinstance(ss, tuple):
                    self._rng = shard_rng(int(ss[0]), int(ss[1]))
                else:
                    self._rng = np.random.Generator(np.random.PCG64(ss))
        return self._rng

    def indices(self) -> np.ndarray:
        """The shard's indices as an int64 array (a copy for contiguous shards)."""
        if isinstance(self.idx, slice):
            return np.arange(self.start, self.stop, dtype=np.int64)
        return np.asarray(self.idx)

    def __len__(self) -> int:
        return self.len

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Shard):
            return NotImplemented
        return (self.id, self.start, self.stop, self.len, self.stride) == (
            other.id,
            other.start,
            other.stop,
            other.len,
            other.stride,
        ) and np.array_equal(self.indices(), other.indices())

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        return (Shard, (self.id, self.start, self.stop, self.len, self.idx, self.stride))

    def __repr__(self) -> str:
        if isinstance(self.idx, slice):
            return f"Shard(id={self.id}, start={self.start}, stop={self.stop}, len={self.len})"
        return f"Shard(id={self.id}, len={self.len}, idx={np.asarray(self.idx)[:6]}{'...' if self.len > 6 else ''})"


class BlockShard(Shard):
    """A contiguous shard whose bounds are computed from its id when read
    (``start = id * block``): the worker's fast shard (see
    :meth:`ShardDescriptor.maker`).  Equal to, and pickled as, the
    :class:`Shard` with the same fields.  Subclassed per descriptor with
    ``_block`` and ``_n`` (:func:`block_shard_class`); the base's slots for
    the computed fields stay unused."""

    __slots__ = ()
    _block = 1
    _n = 0

    @property
    def start(self) -> int:  # type: ignore[override]
        return self.id * self._block

    @property
    def stop(self) -> int:  # type: ignore[override]
        e = self.id * self._block + self._block
        return e if e < self._n else self._n

    @property
    def len(self) -> int:  # type: ignore[override]
        return self.stop - self.start

    @property
    def idx(self) -> slice:
        return slice(self.start, self.stop)

    @property
    def stride(self) -> int:  # type: ignore[override]
        return 1


@functools.lru_cache(maxsize=64)
def block_shard_class(block: int, n: int) -> type[BlockShard]:
    """The :class:`BlockShard` subclass for blocks of ``block`` items over ``0..n-1``."""
    return type("BlockShard", (BlockShard,), {"__slots__": (), "_block": block, "_n": n})


def reusable_shard(cls: type[BlockShard], seedseq: Any) -> BlockShard:
    """A fresh ``cls`` shard for a hot loop that reuses it while nothing else
    holds it (``shardc.worker.spec``, ``shardc.reduction``): ``_seedseq`` set
    once; the loop sets ``id`` and resets ``_rng`` per shard."""
    s = object.__new__(cls)
    s._seedseq = seedseq
    return s


class ShardDescriptor(Sequence[Shard]):
    """A lazy sequence of :class:`Shard` covering ``0..n-1`` exactly once.

    Attributes:
        n: number of items covered.
        block_size: items per shard (the last may be shorter); None for lists.
        strategy: "contiguous", "strided" or "list".
        num_shards: number of shards (also ``len(desc)``).
    """

    def __init__(
        self, n: int, block_size: int | None, strategy: str, num_shards: int, lists: list[np.ndarray] | None = None
    ) -> None:
        self.n = n
        self.block_size = block_size
        self.strategy = strategy
        self.num_shards = num_shards
        self._lists = lists

    def __len__(self) -> int:
        return self.num_shards

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.shard(k) for k in range(*i.indices(self.num_shards))]
        if isinstance(i, bool) or not isinstance(i, (numbers.Integral, np.integer)):
            raise InvalidTypeError(f"shard index must be an int or slice, got {i!r}")
        k = int(i)
        if k < 0:
            k += self.num_shards
        if not 0 <= k < self.num_shards:
            raise ShardIndexError(f"shard {i} out of range for {self.num_shards} shards")
        return self.shard(k)

    def shard(self, k: int, seedseq: Any = None) -> Shard:
        """Shard ``k`` (no bounds check; the hot path of workers).

        ``seedseq`` is what ``shard.rng`` is built from, when first used: the
        run's entropy (an int; the stream is ``SeedSequence(entropy,
        spawn_key=(k,))``), ``(entropy, k)``, a ``SeedSequence``, or None
        (a fresh, unseeded generator).
        """
        if self.strategy == "contiguous":
            b = self.block_size
            start = k * b  # type: ignore[operator]
            stop = start + b  # type: ignore[operator]
            if stop > self.n:
                stop = self.n
            return Shard(k, start, stop, stop - start, slice(start, stop), 1, seedseq)
        if self.strategy == "strided":
            idx = np.arange(k, self.n, self.num_shards, dtype=np.int64)
            return Shard(k, k, int(idx[-1]) + 1 if len(idx) else k, len(idx), idx, self.num_shards, seedseq)
        idx = self._lists[k]  # type: ignore[index]
        return Shard(k, int(idx.min()), int(idx.max()) + 1, len(idx), idx, 0, seedseq)

    def maker(self) -> Any:
        """A function ``make(k, seedseq=None)`` equal to :meth:`shard`, for the
        worker's loop.  For contiguous shards it makes a :class:`BlockShard`
        of this descriptor: only ``id`` (and the seed) are stored, ``start``,
        ``stop``, ``len`` and ``idx`` are computed when read.  Measured on
        Python 3.11: ~0.1 us a shard, against ~0.3 us filling every slot and
        0.66 us through ``Shard.__init__`` (whose call by the class is not
        specialized); a trivial shard's whole loop is about 1 us, so the
        shard object was its largest part."""
        if self.strategy != "contiguous" or type(self).shard is not ShardDescriptor.shard:
            return self.shard
        cls = block_shard_class(self.block_size, self.n)
        new = object.__new__

        def make(k: int, seedseq: Any = None) -> Shard:
            s = new(cls)
            s.id = k
            s._seedseq = seedseq
            s._rng = None
            return s

        make.block_class = cls  # type: ignore[attr-defined]  # hot loops make it inline (shardc.worker.spec)
        return make

    def __iter__(self) -> Iterator[Shard]:
        for k in range(self.num_shards):
            yield self.shard(k)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "block_size": self.block_size, "strategy": self.strategy, "num_shards": self.num_shards}

    def __repr__(self) -> str:
        return (
            f"<ShardDescriptor n={self.n} strategy={self.strategy} block_size={self.block_size} "
            f"num_shards={self.num_shards}>"
        )


def shards(
    n: Any,
    block_size: Any = "auto",
    workers: int | None = None,
    strategy: str = "contiguous",
    min_shards_per_worker: int = 4,
    max_shards_per_worker: int = 64,
    scratch_bytes_per_item: int = 0,
    scratch_budget: int = 0,
) -> ShardDescriptor:
    """Cut ``0..n-1`` into shards.

    Args:
        n: number of items (int, or a count string like "10K", "1M", "3B").
        block_size: items per shard, a count string, or "auto": about
            ``min_shards_per_worker`` shards per worker, shrunk so one
            shard's scratch (``scratch_bytes_per_item * block``) fits in
            ``scratch_budget``, but never more than ``max_shards_per_worker``
            shards per worker.
        workers: workers to plan for (default: the pool's size or CPUs - 1).
        strategy: "contiguous" (``idx`` is a slice) or "strided" (shard k
            gets k, k+S, k+2S, ... with S shards).

    Raises:
        ShardSpecError: (a ``ValueError``) naming the bad argument.
    """
    n = parse_count(n, "n")
    for name, v in (("scratch_bytes_per_item", scratch_bytes_per_item), ("scratch_budget", scratch_budget)):
        if isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer)) or v < 0:
            raise ShardSpecError(f"{name} must be a non-negative integer (bytes), got {v!r}")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ShardSpecError(f"strategy={strategy!r} is not supported; use 'contiguous' or 'strided'")
    if isinstance(block_size, str) and block_size.strip().lower() == "auto":
        w = config.default_workers() if workers is None else workers
        if isinstance(w, bool) or not isinstance(w, (numbers.Integral, np.integer)) or w < 1:
            raise ShardSpecError(f"workers must be a positive integer, got {workers!r}")
        for name, v in (
            ("min_shards_per_worker", min_shards_per_worker),
            ("max_shards_per_worker", max_shards_per_worker),
        ):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ShardSpecError(f"{name} must be a positive integer, got {v!r}")
        if max_shards_per_worker < min_shards_per_worker:
            raise ShardSpecError("max_shards_per_worker must be >= min_shards_per_worker")
        # Floor, so there are at least min_shards_per_worker per worker
        # (ceil gave n=10, workers=2 only 5 shards).
        block = max(1, n // (int(w) * min_shards_per_worker))
        if scratch_bytes_per_item > 0 and scratch_budget > 0:
            block = min(block, max(1, scratch_budget // scratch_bytes_per_item))
        block = max(block, math.ceil(n / (int(w) * max_shards_per_worker)), 1)
    else:
        block = parse_count(block_size, "block_size")
    block = min(block, n)
    return ShardDescriptor(n, block, strategy, math.ceil(n / block))


def shards_list(idxs: Any) -> ShardDescriptor:
    """A descriptor from explicit 0-based index lists (one shard each).

    Raises:
        ShardSpecError: empty ``idxs``, an empty list, a non-integer or
            negative index (each message names the offending list).
    """
    if isinstance(idxs, (str, bytes)) or not hasattr(idxs, "__len__"):
        raise ShardSpecError(f"idxs must be a sequence of index lists, got {type(idxs).__name__}")
    if len(idxs) == 0:
        raise ShardSpecError("idxs is empty: give at least one index list")
    lists = []
    total = 0
    for k, raw in enumerate(idxs):
        arr = np.asarray(raw)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1:
            raise ShardSpecError(f"idxs[{k}] must be a 1-D list of indices, got shape {arr.shape}")
        if arr.size == 0:
            raise ShardSpecError(f"idxs[{k}] is empty; every shard needs at least one index")
        if arr.dtype.kind not in "iu":
            if (
                arr.dtype.kind == "f"
                and np.all(np.isfinite(arr))
                and np.all(arr == np.round(arr))
                and arr.max() < 2.0**63
                and arr.min() >= -(2.0**63)  # else the cast below is undefined (NumPy warns)
            ):
                arr = arr.astype(np.int64)
            else:
                raise ShardSpecError(f"idxs[{k}] must hold integer indices, got dtype {arr.dtype}")
        if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
            raise ShardSpecError(f"idxs[{k}] has an index beyond int64 ({int(arr.max())})")
        if arr.min() < 0:
            raise ShardSpecError(f"idxs[{k}] has a negative index ({int(arr.min())}); indices are 0-based and >= 0")
        arr = np.ascontiguousarray(arr, dtype=np.int64)
        arr.flags.writeable = False
        lists.append(arr)
        total += arr.size
    return ShardDescriptor(total, None, "list", len(lists), lists)
