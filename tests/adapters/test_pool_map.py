"""Pool.map / Pool.imap and the reference's pool_lapply / pool_sapply /
dispatch_chunks: supervised, chunked, ordered; imap streams."""

from __future__ import annotations

import itertools
import os
import signal

import numpy as np
import pytest

import shardc
from shardc.errors import InvalidArgumentError, WorkerCrashedError


def square(x):
    return x * x


def fail_on_3(x):
    if x == 3:
        raise KeyError(x)
    return x


def die_once(x, marker):
    if x == 5 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 1


def pair(x):
    return np.full(2, x)


def die_on(x):
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@pytest.fixture(scope="module")
def pool():
    with shardc.Pool(2) as p:
        yield p


def test_map_ordered_any_iterable_and_chunksize(pool):
    assert pool.map(square, range(50)) == [i * i for i in range(50)]
    assert pool.map(square, iter(range(7)), chunksize=3) == [i * i for i in range(7)]
    assert pool.map(square, []) == []
    assert pool.map(str.upper, ["a", "b"]) == ["A", "B"]


def test_map_raises_the_first_failure_with_its_traceback(pool):
    with pytest.raises(KeyError) as info:
        pool.map(fail_on_3, range(10), chunksize=1)
    assert "raise KeyError" in str(info.value.__cause__)
    assert pool.map(square, range(3)) == [0, 1, 4]  # the pool serves the next call


def test_imap_streams_a_endless_iterable_and_close_cancels(pool):
    consumed = itertools.count()

    def source():
        for i in itertools.count():
            next(consumed)
            yield i

    it = pool.imap(square, source(), chunksize=2)
    assert [next(it) for _ in range(20)] == [i * i for i in range(20)]
    it.close()
    # bounded lookahead: 4 chunks per worker in flight, 2 items each
    assert next(consumed) <= 20 + 4 * pool.size * 2 + 2
    assert pool.map(square, range(3)) == [0, 1, 4]


def test_imap_retries_a_chunk_whose_worker_died(pool, tmp_path):
    import functools

    fn = functools.partial(die_once, marker=str(tmp_path / "m"))
    before = len(pool.events)
    assert list(pool.imap(fn, range(12), chunksize=3)) == list(range(1, 13))
    assert any(e["event"] == "restart" for e in pool.events[before:])


def test_map_fails_with_worker_crashed_error_after_retries(pool):
    with pytest.raises(WorkerCrashedError, match="died on each of 2 attempt"):
        pool.map(die_on, range(4), chunksize=1, max_retries=1)


def test_lapply_sapply(pool):
    assert shardc.pool_lapply(range(5), pow, 2, pool=pool) == [0, 1, 4, 9, 16]
    assert shardc.pool_lapply(["a"], str.replace, "a", "b", pool=pool) == ["b"]
    v = shardc.pool_sapply(range(5), pow, 2, pool=pool)
    assert isinstance(v, np.ndarray) and v.tolist() == [0, 1, 4, 9, 16]
    m = shardc.pool_sapply(range(3), pair, pool=pool, chunk_size=2)
    assert m.shape == (3, 2) and m[:, 0].tolist() == [0, 1, 2]
    mixed = shardc.pool_sapply([1, 2], lambda x: [x] * x, pool=pool)
    assert mixed == [[1], [2, 2]]
    assert shardc.pool_sapply(range(3), square, pool=pool, simplify=False) == [0, 1, 4]


def test_dispatch_chunks_collects_failures_and_streams(pool):
    seen = []
    r = shardc.dispatch_chunks(
        [[1, 2], [3], [4, 5]], lambda c, k: sum(c) * k, 10, pool=pool, on_result=lambda i, v: seen.append((i, v))
    )
    assert r.results == [30, 30, 90] and not r.failures
    assert sorted(seen) == [(0, 30), (1, 30), (2, 90)]
    r = shardc.dispatch_chunks([1, 3, 5], fail_on_3, pool=pool)
    assert r.results == [1, None, 5] and list(r.failures) == [1] and isinstance(r.failures[1], KeyError)
    assert r.pool_stats["workers"] == pool.size


def test_bad_arguments(pool):
    with pytest.raises(InvalidArgumentError, match="chunksize"):
        pool.map(square, range(3), chunksize=0)
    with pytest.raises(InvalidArgumentError, match="callable"):
        pool.imap(3, range(3))
    with pytest.raises(InvalidArgumentError, match="pool must be"):
        shardc.pool_lapply(range(3), square, pool="mine")
    with pytest.raises(InvalidArgumentError, match="max_retries"):
        pool.map(square, range(3), max_retries=-1)
