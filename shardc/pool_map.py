"""``Pool.map``/``Pool.imap`` and the reference's ``pool_lapply``,
``pool_sapply`` and ``dispatch_chunks``: a supervised map over any iterable.

One mechanism: each runs on :class:`shardc.Executor` with ``pool=`` (the open
call of ``shardc.stream`` on the engine core), so a worker that dies is
replaced and its chunk runs again (``max_retries``), ``timeout`` bounds each
chunk, and results come back in order.  Items travel in chunks
(``chunksize``: items per task); ``imap`` keeps a bounded number of chunks in
flight and yields results as they are ready, in order, so an iterable larger
than memory streams.

The methods are attached to :class:`shardc.Pool` here (``pool.py`` sits
below the front ends and does not import them).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidArgumentError
from .executor import Executor, chunked
from .pool import Pool, pool_create, pool_get
from .validate import check_int, check_timeout

AHEAD_PER_WORKER = 4  # imap: chunks in flight per worker


def _pool(pool: Pool | None) -> Pool:
    if pool is None:
        return pool_get() or pool_create()
    if not isinstance(pool, Pool):
        raise InvalidArgumentError(f"pool must be a shardc.Pool or None, got {type(pool).__name__}")
    pool.check_open()
    return pool


def _check_fun(fun: Any) -> None:
    if not callable(fun):
        raise InvalidArgumentError(f"fun must be callable, got {type(fun).__name__}")


def _chunksize(chunksize: Any, n: int | None, workers: int) -> int:
    """``chunksize`` checked; None: about 4 chunks per worker (as multiprocessing's Pool.map)."""
    if chunksize is not None:
        return check_int(chunksize, "chunksize", 1)
    if n is None:
        return 1
    return max(1, math.ceil(n / (4 * workers)))


def _stream(
    pool: Pool,
    fun: Callable[..., Any],
    items: Iterator[tuple[Any, ...]],
    chunksize: int,
    kwargs: dict[str, Any] | None,
    ahead: int | None,
    max_retries: int,
    timeout: float | None,
) -> Iterator[list[Any]]:
    """Each chunk's results (a list), in order; at most ``ahead`` chunks in
    flight (None: all submitted at once)."""
    ex = Executor(pool=pool, max_retries=max_retries, timeout=timeout)
    try:
        chunks = chunked(items, chunksize)
        pending: deque[Any] = deque()
        for chunk in chunks if ahead is None else itertools.islice(chunks, ahead):
            pending.append(ex.submit_batch(fun, chunk, kwargs))
        while pending:
            res = pending.popleft().result()
            if ahead is not None:
                for chunk in itertools.islice(chunks, 1):
                    pending.append(ex.submit_batch(fun, chunk, kwargs))
            yield res
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _options(max_retries: Any, timeout: Any) -> tuple[int, float | None]:
    return check_int(max_retries, "max_retries", 0), None if timeout is None else check_timeout(timeout)


def pool_map(
    self: Pool,
    fun: Callable[..., Any],
    iterable: Iterable[Any],
    chunksize: int | None = None,
    *,
    max_retries: int = 3,
    timeout: float | None = None,
) -> list[Any]:
    """``[fun(x) for x in iterable]`` on this pool's workers, supervised.

    Args:
        fun: called once per item in a worker (pickled once per chunk).
        iterable: any iterable of picklable items (read to the end first).
        chunksize: items per task (None: about 4 tasks per worker).
        max_retries: times a chunk runs again after its worker died.
        timeout: seconds one chunk may run (None: no limit).

    Raises:
        The first exception ``fun`` raised (in item order), with the worker's
        traceback as ``__cause__``; ``WorkerCrashedError`` if a chunk's worker
        died on every attempt.
    """
    _check_fun(fun)
    items = list(iterable)
    size = _chunksize(chunksize, len(items), self.size)
    retries, limit = _options(max_retries, timeout)
    self.check_open()
    out: list[Any] = []
    for res in _stream(self, fun, ((x,) for x in items), size, None, None, retries, limit):
        out.extend(res)
    return out


def pool_imap(
    self: Pool,
    fun: Callable[..., Any],
    iterable: Iterable[Any],
    chunksize: int = 1,
    *,
    max_retries: int = 3,
    timeout: float | None = None,
) -> Iterator[Any]:
    """Like :meth:`Pool.map`, but lazy: reads ``iterable`` as it goes (at
    most ``4 x workers`` chunks in flight) and yields each result in order as
    soon as it and those before it are ready.  Closing the iterator early
    cancels the chunks not started."""
    _check_fun(fun)
    size = check_int(chunksize, "chunksize", 1)
    retries, limit = _options(max_retries, timeout)
    self.check_open()
    ahead = AHEAD_PER_WORKER * self.size

    def gen() -> Iterator[Any]:
        for res in _stream(self, fun, ((x,) for x in iterable), size, None, ahead, retries, limit):
            yield from res

    return gen()


setattr(Pool, "map", pool_map)  # noqa: B010 - attached here: pool.py does not import front ends
setattr(Pool, "imap", pool_imap)  # noqa: B010


def pool_lapply(
    X: Iterable[Any], FUN: Callable[..., Any], *args: Any, pool: Pool | None = None, chunk_size: int = 1, **kwargs: Any
) -> list[Any]:
    """The reference's ``pool_lapply``: ``[FUN(x, *args, **kwargs) for x in X]``, supervised."""
    _check_fun(FUN)
    p = _pool(pool)
    size = check_int(chunk_size, "chunk_size", 1)
    out: list[Any] = []
    for res in _stream(p, FUN, ((x, *args) for x in X), size, kwargs or None, None, 3, None):
        out.extend(res)
    return out


def pool_sapply(
    X: Iterable[Any],
    FUN: Callable[..., Any],
    *args: Any,
    simplify: bool = True,
    pool: Pool | None = None,
    chunk_size: int = 1,
    **kwargs: Any,
) -> Any:
    """The reference's ``pool_sapply``: :func:`pool_lapply`, then (``simplify``)
    a NumPy array when every value is a scalar, or an array of one shape
    (stacked); else the list."""
    values = pool_lapply(X, FUN, *args, pool=pool, chunk_size=chunk_size, **kwargs)
    return simplify_values(values) if simplify else values


def simplify_values(values: list[Any]) -> Any:
    """``values`` as one array (R's ``simplify``), or the list unchanged."""
    if not values:
        return values
    if all(np.isscalar(v) for v in values):
        return np.asarray(values)
    if all(isinstance(v, np.ndarray) for v in values) and len({v.shape for v in values}) == 1:
        return np.stack(values)
    return values


@dataclass
class DispatchResult:
    """What :func:`dispatch_chunks` returns.

    Attributes:
        results: each chunk's value in chunk order (None where it failed, or
            when ``store_results=False``).
        failures: chunk index -> the exception it failed with.
        pool_stats: the pool's size and events (deaths, restarts, recycles).
    """

    results: list[Any]
    failures: dict[int, BaseException] = field(default_factory=dict)
    pool_stats: dict[str, Any] = field(default_factory=dict)


def dispatch_chunks(
    chunks: Iterable[Any],
    fun: Callable[..., Any],
    *args: Any,
    pool: Pool | None = None,
    max_retries: int = 3,
    timeout: float = 3600,
    on_result: Callable[[int, Any], None] | None = None,
    store_results: bool = True,
    **kwargs: Any,
) -> DispatchResult:
    """The reference's ``dispatch_chunks``: ``fun(chunk, *args, **kwargs)`` per
    chunk, supervised; a failed chunk is recorded, not raised.

    ``on_result(index, value)`` runs in the caller as each chunk finishes (in
    completion order).  (The reference also passes the worker id; a task here
    is not tied to one worker across its retries, so it is not given.)"""
    _check_fun(fun)
    if on_result is not None and not callable(on_result):
        raise InvalidArgumentError("on_result must be callable or None")
    retries, limit = _options(max_retries, timeout)
    p = _pool(pool)
    items = list(chunks)
    ex = Executor(pool=p, max_retries=retries, timeout=limit)
    try:
        fs = {ex.submit(fun, c, *args, **kwargs): i for i, c in enumerate(items)}
        result = DispatchResult([None] * len(items))
        for f in as_completed(fs):
            i = fs[f]
            exc = f.exception()
            if exc is not None:
                result.failures[i] = exc
                continue
            v = f.result()
            if on_result is not None:
                on_result(i, v)
            if store_results:
                result.results[i] = v
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    result.failures = dict(sorted(result.failures.items()))
    result.pool_stats = {"workers": p.size, "events": list(p.events)}
    return result
