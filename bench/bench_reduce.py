"""``shard_reduce`` against its peers, all in one run (ratios are what to read).

Part A, tiny shards: the sum of shard ids over 10^6 one-item shards
(``--quick``: 2x10^5) on 2 workers:

* ``reduce_rpc`` / ``reduce_queue``: ``shard_reduce(N, map=lambda s: s.id,
  combine=operator.add, init=0)`` with ``dispatch_mode`` rpc_chunked /
  shm_queue (the groups run over the rpc transport in both; see
  ``shardc/reduce.py``);
* ``map_queue_out``: ``shard_map(N, fun, out={"o": buf}, dispatch_mode=
  "shm_queue")`` writing the same values (``o[s.id] = s.id``): the peer of
  the issue's target (>= 0.8x its rate), then ``buf.sum()`` (timed);
* ``map_rpc_auto``: the same with rpc_chunked and ``chunk_size="auto"``;
* ``pool_map``: ``multiprocessing.Pool(2).map`` of the same function over
  ``range(N)`` with its default chunking, then ``sum`` (pool warm);
* ``serial_fold``: the same map and combine in one process (a Python loop
  over shard objects), for reference: what the parallel runs must beat.

Part B, column sums over row blocks of a C-order float64 matrix (``--big``:
16384 x 8192 = 1 GiB; default 8192 x 8192 = 512 MiB; ``--quick``: 128 MiB)
already in a shardc segment (``shardc.share``, not timed):

* ``reduce_colsums``: ``shard_reduce(shards(rows, block_size=256), map=lambda
  s, X: X[s.idx].sum(0), combine=operator.add, init=np.zeros(cols))``;
* ``numpy_sum``: ``X.sum(0)`` in the master (1 thread, the one-liner);
* ``numba_prange``: a numba kernel summing row blocks with ``prange`` on 2
  threads, reading the same segment (compiled before timing).

Each variant: median of ``--repeats`` (default 7) timed calls after one
warm-up, in the same process and the same run, on a pool created before
the timing.  Does not measure: pool start-up, the copy into the segment,
peak memory (see bench_colstats.py), accuracy (tests/test_reduce.py).  The
machine may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import operator
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shardc  # noqa: E402

WORKERS = 2


def emit(name: str, value: Any, unit: str) -> None:
    print(f"{name}\t{value:.6g}\t{unit}" if isinstance(value, float) else f"{name}\t{value}\t{unit}", flush=True)


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls after one warm-up, and the last value."""
    out = fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def ident(s: Any) -> int:
    return s.id


def write_id(s: Any, o: Any) -> None:
    o[s.id] = s.id


def plain_id(i: int) -> int:
    return i


def part_a(n: int, repeats: int, pool: shardc.Pool) -> dict[str, float]:
    want = n * (n - 1) // 2
    res: dict[str, float] = {}
    buf = shardc.buffer(np.int64, n)

    def reduce_mode(mode: str) -> Any:
        return lambda: (
            shardc.shard_reduce(
                n, map=ident, combine=operator.add, init=0, dispatch_mode=mode, pool=pool, progress=False
            ).value
        )

    def map_mode(mode: str, chunk: Any) -> Any:
        def run() -> int:
            shardc.shard_map(
                n, write_id, out={"o": buf}, dispatch_mode=mode, chunk_size=chunk, pool=pool, progress=False
            )
            return int(buf.array.sum())

        return run

    desc = shardc.shards(n, block_size=1)

    def serial() -> int:
        acc = 0
        for k in range(n):
            acc = operator.add(acc, ident(desc.shard(k)))
        return acc

    with multiprocessing.get_context("fork").Pool(WORKERS) as mp:
        runs = [
            ("reduce_rpc", reduce_mode("rpc_chunked")),
            ("reduce_queue", reduce_mode("shm_queue")),
            ("map_queue_out", map_mode("shm_queue", 1)),
            ("map_rpc_auto", map_mode("rpc_chunked", "auto")),
            ("pool_map", lambda: sum(mp.map(plain_id, range(n)))),
            ("serial_fold", serial),
        ]
        for name, fn in runs:
            t, v = timed(fn, repeats)
            assert v == want, (name, v, want)
            res[name] = t
            emit(f"tiny.{name}", t, "s")
            emit(f"tiny.{name}.rate", n / t, "shards/s")
    buf.close()
    for mode in ("rpc", "queue"):
        emit(f"tiny.reduce_{mode}_vs_map_queue_out", res["map_queue_out"] / res[f"reduce_{mode}"], "x rate")
    return res


def numba_colsums() -> Any:
    import numba

    @numba.njit(parallel=True, cache=False)
    def colsums(X: np.ndarray, nblocks: int) -> np.ndarray:  # pragma: no cover - compiled
        n, m = X.shape
        parts = np.zeros((nblocks, m))
        for b in numba.prange(nblocks):
            for i in range(b * n // nblocks, (b + 1) * n // nblocks):
                for j in range(m):
                    parts[b, j] += X[i, j]
        out = np.zeros(m)
        for b in range(nblocks):
            out += parts[b]
        return out

    numba.set_num_threads(WORKERS)
    return colsums


def part_b(rows: int, cols: int, repeats: int, pool: shardc.Pool) -> dict[str, float]:
    X0 = np.random.default_rng(0).random((rows, cols))
    Xs = shardc.share(X0)
    del X0
    X = Xs.array
    res: dict[str, float] = {}
    ref = X.sum(0)
    desc = shardc.shards(rows, block_size=256)
    kern = numba_colsums()

    def reduce_colsums() -> np.ndarray:
        return shardc.shard_reduce(
            desc,
            map=lambda s, X: X[s.idx].sum(0),
            combine=operator.add,
            init=np.zeros(cols),
            borrow={"X": Xs},
            pool=pool,
            progress=False,
        ).value

    for name, fn in [
        ("reduce_colsums", reduce_colsums),
        ("numpy_sum", lambda: X.sum(0)),
        ("numba_prange", lambda: kern(X, 2 * WORKERS)),
    ]:
        t, v = timed(fn, repeats)
        err = float(np.abs(v - ref).max() / np.abs(ref).max())
        assert err < 1e-12, (name, err)
        res[name] = t
        emit(f"colsums.{name}", t, "s")
        emit(f"colsums.{name}.bandwidth", X.nbytes / t / 2**30, "GiB/s")
    emit("colsums.reduce_vs_numpy_sum", res["reduce_colsums"] / res["numpy_sum"], "x time")
    emit("colsums.reduce_vs_numba_prange", res["reduce_colsums"] / res["numba_prange"], "x time")
    Xs.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2x10^5 shards, a 128 MiB matrix")
    ap.add_argument("--big", action="store_true", help="a 1 GiB matrix (default 512 MiB)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", choices=["tiny", "colsums"], default=None)
    a = ap.parse_args(argv)
    n = 200_000 if a.quick else 1_000_000
    rows, cols = (2048, 8192) if a.quick else ((16384, 8192) if a.big else (8192, 8192))
    emit("loadavg_1min", os.getloadavg()[0], "")
    pool = shardc.Pool(WORKERS)
    try:
        if a.only in (None, "tiny"):
            part_a(n, a.repeats, pool)
        if a.only in (None, "colsums"):
            part_b(rows, cols, a.repeats, pool)
    finally:
        pool.stop()
    emit("loadavg_1min_end", os.getloadavg()[0], "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
