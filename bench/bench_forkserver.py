"""Fork server vs plain fork: pool start, first result, replacement, crash recovery.

Same run, alternating the two modes (``Pool(fork_mode="fork")`` and
``Pool(fork_mode="server")``), medians over ``--repeats`` (default 7):

* ``start``: ``Pool(2)`` until both workers said hello (the server variant
  includes starting the server: an interpreter that imports shardc);
* ``first``: then the first ``shard_map`` result (8 trivial shards);
* ``replace``: ``pool.replace`` of one idle worker (kill, fork a new one, HELLO);
* ``recovery``: bench_recovery's measure, "alone" scenario, rpc_chunked: a shard
  stamps the time and SIGKILLs its worker; the retry stamps its start; the
  gap is death -> retry running (detection, exit status, new worker, setup).

``--zygote`` measures instead what the zygote changes (``SHARDC_ZYGOTE``
on vs off, alternating): ``Pool(2)`` with ``fork_mode="auto"`` started with
no other thread, then a thread started (as an Executor's engine or
``Pool.map``'s stream do), then a worker replaced twice: with the zygote
both replacements are forks of it; without, the first starts the exec'ed
server (which imports every module this process has: ``--heavy`` imports
pandas and pyarrow first, as a data-science session has them).

Usage: python bench/bench_forkserver.py [--repeats N] [--zygote [--heavy]]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
from bench_recovery import victim_fun  # noqa: E402

import shardc  # noqa: E402

MODES = ("fork", "server")


def one_round(mode: str) -> dict[str, float]:
    t0 = time.perf_counter()
    pool = shardc.Pool(2, fork_mode=mode)
    t1 = time.perf_counter()
    try:
        r = pool.shard_map(8, lambda s: s.id, progress=False)
        t2 = time.perf_counter()
        assert r.results == list(range(8))
        t3 = time.perf_counter()
        pool.replace(pool.workers[0], "bench", "restart")
        t4 = time.perf_counter()
        bufs = {k: shardc.buffer("i8", 1, init=0) for k in ("death", "retry", "done")}
        victims = shardc.buffer("u1", 1, init=1)
        nap = shardc.buffer("f8", 1, init=0)
        res = pool.shard_map(1, victim_fun, borrow={"victims": victims, "nap": nap}, out=bufs, progress=False)
        assert res.succeeded and int(bufs["done"].array[0]) == 1
        gap = (int(bufs["retry"].array[0]) - int(bufs["death"].array[0])) * 1e-9
        for b in [*bufs.values(), victims, nap]:
            b.close()
    finally:
        pool.stop()
    return {"start": t1 - t0, "first": t2 - t0, "replace": t4 - t3, "recovery": gap}


def zygote_round(on: bool) -> dict[str, float]:
    import threading

    os.environ["SHARDC_ZYGOTE"] = "1" if on else "0"
    stop = threading.Event()
    t0 = time.perf_counter()
    pool = shardc.Pool(2)
    t1 = time.perf_counter()
    th = threading.Thread(target=stop.wait, daemon=True)
    th.start()
    try:
        times = []
        for _ in range(2):
            a = time.perf_counter()
            pool.replace(pool.workers[0], "bench", "restart")
            times.append(time.perf_counter() - a)
        assert pool.workers[0].server is not None and pool._server.zygote is on
        assert pool.shard_map(8, lambda s: s.id, progress=False).results == list(range(8))
    finally:
        pool.stop()
        stop.set()
        th.join()
        os.environ.pop("SHARDC_ZYGOTE", None)
    return {"start": t1 - t0, "replace1": times[0], "replace2": times[1]}


def zygote_main(repeats: int, heavy: bool) -> int:
    if heavy:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    zygote_round(True), zygote_round(False)  # warm
    for i in range(repeats):
        for on in (True, False) if i % 2 == 0 else (False, True):
            runs[on].append(zygote_round(on))
    load = os.getloadavg()[0]
    print(
        f"# zygote on vs off, Pool(2) auto, a thread started after the pool, {repeats} rounds "
        f"interleaved, medians (ms); {len(sys.modules)} modules imported; load {load:.1f}"
    )
    print("| measure | zygote | exec'ed server | server / zygote |")
    print("|---|---|---|---|")
    for k in ("start", "replace1", "replace2"):
        z = statistics.median(r[k] for r in runs[True]) * 1e3
        s = statistics.median(r[k] for r in runs[False]) * 1e3
        print(f"| {k} | {z:.1f} | {s:.1f} | {s / z:.2f}x |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--zygote", action="store_true", help="zygote on vs off (see the module docstring)")
    p.add_argument("--heavy", action="store_true", help="with --zygote: import pandas and pyarrow first")
    args = p.parse_args()
    if args.zygote:
        return zygote_main(args.repeats, args.heavy)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    one_round("fork"), one_round("server")  # warm (page cache, imports)
    for i in range(args.repeats):
        for m in MODES if i % 2 == 0 else MODES[::-1]:
            runs[m].append(one_round(m))
    load = os.getloadavg()[0]
    print(f"# fork vs fork server, 2 workers, {args.repeats} rounds interleaved, medians (ms); load {load:.1f}")
    print("| measure | fork | server | server / fork |")
    print("|---|---|---|---|")
    for k in ("start", "first", "replace", "recovery"):
        f = statistics.median(r[k] for r in runs["fork"]) * 1e3
        s = statistics.median(r[k] for r in runs["server"]) * 1e3
        print(f"| {k} | {f:.1f} | {s:.1f} | {s / f:.2f}x |")
    print(
        "recovery all (ms): fork",
        np.round(np.array([r["recovery"] for r in runs["fork"]]) * 1e3, 1).tolist(),
        "server",
        np.round(np.array([r["recovery"] for r in runs["server"]]) * 1e3, 1).tolist(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
