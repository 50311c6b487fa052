"""Many tiny shards: dispatch overhead per task, shardc vs its peers.

Measures: tasks per second for a trivial function over N task ids on
**2 workers**, pools already started (warm, excluded from timing), median
over repeats; N is calibrated per variant so one measurement takes about a
second (at least ``MIN_S``), capped per variant so slow peers keep the script
short.  Peak memory of the whole process tree is taken in one extra run.

Variants (each in a fresh interpreter):

* ``shardc_shm_queue``: ``dispatch_mode="shm_queue"``, ``fun`` writes
  ``out[shard.id] = shard.id + 1`` into a shared buffer (nothing gathered).
* ``shardc_rpc1``: ``rpc_chunked``, ``chunk_size=1, autotune=False``,
  ``fun`` returns ``shard.id`` (gathered in shard order).
* ``shardc_rpc_auto``: ``rpc_chunked`` with ``chunk_size="auto"``.
* ``shardc_default``: ``shard_map(N, f)`` with no options at all (the default
  pool made by ``pool_create(2)``, ``chunk_size=1`` + autotune), ``f``
  returning ``shard.id + 1``, gathered: the call a user writes first.
* ``shardc_seeded``: the same with ``seed=1`` (``random`` and ``np.random``
  seeded from (seed, id) for the shards that use them: lazily, see
  shardc/worker/seeding.py); its target is >= 0.5x ``shardc_default``.
* ``*_nodiag``: the same with ``diagnostics=False`` (its cost is reported by
  ``bench_recovery.py``).
* ``mp_pool_map1``: ``multiprocessing.Pool(2).map(f, range(N), chunksize=1)``.
* ``mp_pool_map_auto``: ``Pool(2).map(f, range(N))`` with its default
  chunksize (``f`` returns ``i + 1``): the batched peer ``shardc_default``
  and ``shardc_shm_queue`` are measured against.
* ``joblib_b1`` / ``joblib_auto``: ``Parallel(n_jobs=2, batch_size=1 |
  "auto")`` (loky), inside one ``with Parallel(...)`` block.
* ``mpire``: ``WorkerPool(2, keep_alive=True).map(f, range(N))`` (its default
  chunking).

* ``pairs``: the issue-18 ratios measured interleaved in ONE process (both
  pools warm, calls alternating, order flipped every round, medians of
  ``--repeats`` x 2 calls): ``shard_map(N, f)`` with defaults vs
  ``Pool.map(f, range(N))`` with default chunking (N = 10^6, 3*10^5 with
  ``--quick``), ``seed=1`` vs unseeded (N / 10), and shm_queue writing
  ``out=`` vs the same ``Pool.map``; for information, ``seed=1`` vs unseeded
  on functions that draw from ``shard.rng`` or ``np.random`` (N / 100).  On a shared machine the separate
  children of the other variants see different load; this does not.
* ``grid``: the per-call-size grid: N = 10^2, 2*10^3 and 10^3 .. 10^6 shards,
  ``shm_queue`` (writing ``out=``) vs ``rpc_chunked`` with ``chunk_size="auto"``
  (gathering), calls of the two modes alternating on one warm pool; ms per
  call and shards/s, median of >= 5 calls (up to 200 for small N).  Its
  targets (issue 18): a 100-shard shm_queue call <= 1.5 ms, 2,000 shards <=
  3 ms, shm_queue throughput non-decreasing in N over 10^2..10^6 (within
  10%), and never below rpc_chunked's on the grid.

* ``call10``: the per-call cost of a small call: ``shard_map(10, f,
  dispatch_mode="rpc_chunked")`` (gathering ``shard.id``) on a warm pool,
  calls alternating with ``Pool(2).map(f, range(10))`` on a warm
  ``multiprocessing`` pool (its default chunking: the call a user would
  otherwise write); ms per call (median and best of >= 200 calls each, 100
  with ``--quick``) and the master's CPU per shardc call (its thread clock).
  Its target (issue 18): a 10-shard rpc_chunked call <= 0.5 ms.

Every variant checks its output (the ids, in order).  Does not measure:
functions that do real work (see bench_colstats), pool start (see
bench_startup), or results bigger than an int (see bench_large_out).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

WORKERS = 2
MIN_S = 0.5
TARGET_S = 1.5  # --quick: half
# variant -> (calibration N, cap on N in full runs, cap with --quick)
SIZES = {
    "shardc_shm_queue": (50_000, 4_000_000, 1_000_000),
    "shardc_shm_queue_nodiag": (50_000, 4_000_000, 1_000_000),
    "shardc_rpc1": (5_000, 400_000, 100_000),
    "shardc_rpc1_nodiag": (5_000, 400_000, 100_000),
    "shardc_rpc_auto": (20_000, 4_000_000, 1_000_000),
    "shardc_rpc_auto_nodiag": (20_000, 4_000_000, 1_000_000),
    "shardc_default": (20_000, 4_000_000, 1_000_000),
    "shardc_seeded": (5_000, 1_000_000, 300_000),
    "mp_pool_map1": (2_000, 200_000, 50_000),
    "mp_pool_map_auto": (20_000, 8_000_000, 3_000_000),
    "joblib_b1": (500, 40_000, 10_000),
    "joblib_auto": (5_000, 1_000_000, 200_000),
    "mpire": (20_000, 8_000_000, 3_000_000),
}
VARIANTS = ["shardc_default", "shardc_seeded", "shardc_shm_queue", "shardc_rpc1", "shardc_rpc_auto",
            "mp_pool_map1", "mp_pool_map_auto",
            "joblib_b1", "joblib_auto", "mpire", "pairs", "grid", "call10"]
GRID_N = [100, 1_000, 2_000, 10_000, 100_000, 1_000_000]
GRID_MODES = ["shm_queue", "rpc_auto"]


def ident(i: int) -> int:
    return i


def ident_mpire(i: int) -> int:
    return i


def plus1(i: int) -> int:
    return i + 1


def shard_plus1(shard: Any) -> int:
    return shard.id + 1


def shard_rng(shard: Any) -> float:
    return float(shard.rng.random())


def shard_legacy(shard: Any) -> float:
    return float(np.random.random())


def shard_write(shard: Any, out: Any) -> None:
    out[shard.id] = shard.id + 1


def shard_return(shard: Any) -> int:
    return shard.id


def make_runner(variant: str, quick: bool) -> tuple[Any, Any, Any]:
    """(run(n) -> check callable, cleanup, info dict)."""
    info: dict[str, Any] = {}
    if variant.startswith("shardc"):
        import shardc
        pool = shardc.pool_create(WORKERS)
        diag = not variant.endswith("_nodiag")
        base = variant.removesuffix("_nodiag")
        bufs: dict[int, Any] = {}

        def run(n: int) -> Any:
            if base in ("shardc_default", "shardc_seeded"):
                r = (shardc.shard_map(n, shard_plus1) if base == "shardc_default"
                     else shardc.shard_map(n, shard_plus1, seed=1))
                info["last"] = r
                return lambda: r.results == list(range(1, n + 1))
            if base == "shardc_shm_queue":
                if n not in bufs:
                    bufs.clear()
                    bufs[n] = shardc.buffer("i8", n)
                buf = bufs[n]
                r = shardc.shard_map(n, shard_write, out={"out": buf}, dispatch_mode="shm_queue", pool=pool,
                                     diagnostics=diag)
                info["last"] = r
                return lambda: np.array_equal(buf.array, np.arange(1, n + 1))
            if base == "shardc_rpc1":
                r = shardc.shard_map(n, shard_return, chunk_size=1, autotune=False, pool=pool, diagnostics=diag)
            else:
                r = shardc.shard_map(n, shard_return, chunk_size="auto", pool=pool, diagnostics=diag)
            info["last"] = r
            return lambda: r.results == list(range(n))
        return run, pool.stop, info
    if variant.startswith("mp_pool"):
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(WORKERS)
        pool.map(ident, range(4))
        if variant == "mp_pool_map1":
            def run(n: int) -> Any:
                res = pool.map(ident, range(n), chunksize=1)
                return lambda: res == list(range(n))
        else:
            def run(n: int) -> Any:
                res = pool.map(plus1, range(n))
                return lambda: res == list(range(1, n + 1))
        return run, pool.terminate, info
    if variant.startswith("joblib"):
        import joblib
        bs = 1 if variant == "joblib_b1" else "auto"
        par = joblib.Parallel(n_jobs=WORKERS, batch_size=bs)
        par.__enter__()
        par(joblib.delayed(ident)(i) for i in range(4))

        def run(n: int) -> Any:
            res = par(joblib.delayed(ident)(i) for i in range(n))
            return lambda: res == list(range(n))
        return run, lambda: par.__exit__(None, None, None), info
    if variant == "mpire":
        from mpire import WorkerPool
        pool = WorkerPool(n_jobs=WORKERS, keep_alive=True, start_method="fork")
        pool.map(ident_mpire, range(4))

        def run(n: int) -> Any:
            res = pool.map(ident_mpire, range(n))
            return lambda: res == list(range(n))
        return run, pool.terminate, info
    raise SystemExit(f"unknown variant {variant}")


def run_grid(quick: bool, repeats: int) -> dict[str, Any]:
    """The per-call-size grid (see the module docstring): one warm pool, the
    two modes' calls alternating (order flipped every round) at each N."""
    import shardc

    pool = shardc.pool_create(WORKERS)
    grid: dict[str, Any] = {}
    ok = True
    try:
        for n in GRID_N:
            buf = shardc.buffer("i8", n)
            last: dict[str, Any] = {}

            def shm(n: int = n, buf: Any = buf) -> None:
                shardc.shard_map(n, shard_write, out={"out": buf}, dispatch_mode="shm_queue", pool=pool)

            def rpc(n: int = n) -> None:
                last["rpc"] = shardc.shard_map(n, shard_return, chunk_size="auto", pool=pool)

            calls = {"shm_queue": shm, "rpc_auto": rpc}
            for call in calls.values():
                call()  # warm: buffers, caches, the ring
            t0 = time.perf_counter()
            shm()
            rpc()
            est = time.perf_counter() - t0
            budget = 0.6 if quick else 1.5  # seconds per size, both modes
            reps = int(min(200, max(repeats, budget / max(est, 1e-4))))
            times: dict[str, list[float]] = {m: [] for m in calls}
            for r in range(reps):
                for m in GRID_MODES if r % 2 == 0 else GRID_MODES[::-1]:
                    t0 = time.perf_counter()
                    calls[m]()
                    times[m].append(time.perf_counter() - t0)
            ok = ok and bool(np.array_equal(buf.array, np.arange(1, n + 1))) and last["rpc"].results == list(range(n))
            grid[str(n)] = {m: {"median_s": C.median(v), "min_s": min(v), "calls": len(v)} for m, v in times.items()}
            buf.close()
    finally:
        pool.stop()
    return {"grid": grid, "ok": ok}


def report_grid(r: dict[str, Any]) -> None:
    """The grid's lines, table and targets."""
    grid = r["grid"]
    rows = []
    for n_s, modes in grid.items():
        n = int(n_s)
        row: list[Any] = [n]
        for m in GRID_MODES:
            med = modes[m]["median_s"]
            C.emit(f"tiny.grid.{m}.n{n}.ms", med * 1e3, "ms/call")
            C.emit(f"tiny.grid.{m}.n{n}.rate", n / med, "shards/s")
            row += [med * 1e3, n / med]
        row += [modes["rpc_auto"]["median_s"] / modes["shm_queue"]["median_s"], modes["shm_queue"]["calls"]]
        rows.append(row)
    print()
    print(f"### tiny grid: ms per call and shards/s by call size, {WORKERS} workers, warm pool, seed=None")
    print()
    print(C.table(["N", "shm_queue ms", "shm_queue shards/s", "rpc auto ms", "rpc auto shards/s",
                   "shm speed-up", "calls/mode"], rows))
    shm = {int(k): v["shm_queue"]["median_s"] for k, v in grid.items()}
    rpc = {int(k): v["rpc_auto"]["median_s"] for k, v in grid.items()}
    lines = []
    if 100 in shm:
        lines.append(("grid_shm_100", "shm_queue 100 shards <= 1.5 ms", f"{shm[100] * 1e3:.2f} ms", shm[100] <= 1.5e-3))
    if 2000 in shm:
        lines.append(("grid_shm_2000", "shm_queue 2,000 shards <= 3 ms", f"{shm[2000] * 1e3:.2f} ms",
                      shm[2000] <= 3e-3))
    decades = sorted(n for n in shm if n in (100, 1_000, 10_000, 100_000, 1_000_000))
    rates = [n / shm[n] for n in decades]
    worst = min((b / a for a, b in zip(rates, rates[1:])), default=1.0)
    lines.append(("grid_shm_monotone", "shm_queue shards/s non-decreasing in N, 10^2..10^6 (within 10%)",
                  f"worst step {worst:.2f}x", worst >= 0.9))
    slow = min(rpc[n] / shm[n] for n in shm)
    lines.append(("grid_shm_vs_rpc", "shm_queue never slower than rpc auto on the grid",
                  f"worst shm/rpc speed {slow:.2f}x", slow >= 1.0))
    if not r.get("ok", True):
        lines.append(("grid_correct", "grid outputs correct", "WRONG RESULT", False))
    C.print_targets("tiny", lines)


def run_pairs(quick: bool, repeats: int) -> dict[str, Any]:
    """The interleaved ratios (see ``pairs`` in the module docstring)."""
    import multiprocessing as mp

    import shardc

    n = 300_000 if quick else 1_000_000
    ns = n // 10
    pool = shardc.pool_create(WORKERS)
    mpool = mp.get_context("fork").Pool(WORKERS)
    buf = shardc.buffer("i8", n)
    want = list(range(1, n + 1))
    ok = True

    def default() -> None:
        nonlocal ok
        ok = ok and shardc.shard_map(n, shard_plus1).results == want

    def seeded() -> None:
        nonlocal ok
        ok = ok and shardc.shard_map(ns, shard_plus1, seed=1).results == want[:ns]

    def unseeded() -> None:
        nonlocal ok
        ok = ok and shardc.shard_map(ns, shard_plus1).results == want[:ns]

    def shm() -> None:
        shardc.shard_map(n, shard_write, out={"out": buf}, dispatch_mode="shm_queue")

    # What seed= costs a function that draws (information, no target): from
    # shard.rng (a generator per shard either way) and from np.random (seeded
    # before every shard once the function is seen drawing).
    nd = ns // 10

    def drawing(fun: Any, seed: int | None) -> Callable[[], None]:
        def run() -> None:
            nonlocal ok
            r = shardc.shard_map(nd, fun, seed=seed)
            ok = ok and len(r.results) == nd and not r.failures
        return run

    def peer() -> None:
        nonlocal ok
        ok = ok and mpool.map(plus1, range(n)) == want

    calls = {"default": (default, n), "pool_map": (peer, n), "shm_queue": (shm, n),
             "seeded": (seeded, ns), "unseeded": (unseeded, ns),
             "rng_seeded": (drawing(shard_rng, 1), nd), "rng_unseeded": (drawing(shard_rng, None), nd),
             "legacy_seeded": (drawing(shard_legacy, 1), nd), "legacy_unseeded": (drawing(shard_legacy, None), nd)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    try:
        for fn, _ in calls.values():
            fn()  # warm
        order = list(calls)
        for r in range(max(repeats, 5)):
            for k in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                calls[k][0]()
                times[k].append(time.perf_counter() - t0)
        ok = ok and bool(np.array_equal(buf.array, np.arange(1, n + 1)))
    finally:
        mpool.terminate()
        pool.stop()
        buf.close()
    rates = {k: calls[k][1] / C.median(v) for k, v in times.items()}
    return {"rates": rates, "n": n, "n_seeded": ns, "calls": len(times["default"]), "ok": ok,
            "loadavg": os.getloadavg()[0]}


def report_pairs(r: dict[str, Any]) -> None:
    rates = r["rates"]
    for k, v in rates.items():
        C.emit(f"tiny.pairs.{k}.rate", v, "tasks/s")
    print()
    print(f"### tiny pairs: interleaved in one process, {WORKERS} workers, medians of {r['calls']} calls, "
          f"load {r['loadavg']:.1f}")
    print()
    print(C.table(["call", "tasks/s"], [[k, v] for k, v in rates.items()]))
    peer = rates["pool_map"]
    C.print_targets("tiny", [
        ("pairs_default_vs_pool", "shard_map(N, f) defaults >= 1.0x Pool.map default chunking (interleaved)",
         f"{rates['default'] / peer:.2f}x", rates["default"] >= peer),
        ("pairs_shm_vs_pool", "shm_queue out= >= 1.0x Pool.map default chunking (interleaved)",
         f"{rates['shm_queue'] / peer:.2f}x", rates["shm_queue"] >= peer),
        ("pairs_seeded", "seed= set >= 0.5x unseeded (interleaved)",
         f"{rates['seeded'] / rates['unseeded']:.2f}x", rates["seeded"] >= 0.5 * rates["unseeded"]),
        ("pairs_correct", "pairs outputs correct", "ok" if r["ok"] else "WRONG RESULT", bool(r["ok"])),
    ])
    print(f"seed= on functions that draw (no target): shard.rng {rates['rng_seeded'] / rates['rng_unseeded']:.2f}x "
          f"unseeded, np.random {rates['legacy_seeded'] / rates['legacy_unseeded']:.2f}x unseeded")


def run_call10(quick: bool, repeats: int) -> dict[str, Any]:
    """The 10-shard call (see ``call10`` in the module docstring)."""
    import multiprocessing as mp

    import shardc

    pool = shardc.pool_create(WORKERS)
    mpool = mp.get_context("fork").Pool(WORKERS)
    want = list(range(10))
    ok = True
    times: dict[str, list[float]] = {"shardc": [], "pool_map": []}
    cpu: list[float] = []
    try:
        for _ in range(30):  # warm both
            shardc.shard_map(10, shard_return, dispatch_mode="rpc_chunked", pool=pool)
            mpool.map(ident, range(10))
        for r in range(max(100 if quick else 200, repeats)):
            for k in ("shardc", "pool_map") if r % 2 == 0 else ("pool_map", "shardc"):
                c0 = time.thread_time()
                t0 = time.perf_counter()
                if k == "shardc":
                    got = shardc.shard_map(10, shard_return, dispatch_mode="rpc_chunked", pool=pool).results
                else:
                    got = mpool.map(ident, range(10))
                times[k].append(time.perf_counter() - t0)
                if k == "shardc":
                    cpu.append(time.thread_time() - c0)
                ok = ok and got == want
    finally:
        mpool.terminate()
        pool.stop()
    return {"times": {k: {"median_s": C.median(v), "min_s": min(v), "calls": len(v)} for k, v in times.items()},
            "cpu_median_s": C.median(cpu), "ok": ok, "loadavg": os.getloadavg()[0]}


def report_call10(r: dict[str, Any]) -> None:
    t = r["times"]
    for k, v in t.items():
        C.emit(f"tiny.call10.{k}.ms", v["median_s"] * 1e3, "ms/call")
        C.emit(f"tiny.call10.{k}.best_ms", v["min_s"] * 1e3, "ms/call")
    C.emit("tiny.call10.shardc.master_cpu_ms", r["cpu_median_s"] * 1e3, "ms/call")
    print()
    print(f"### tiny call10: one 10-shard call, {WORKERS} workers, warm pools, calls interleaved, "
          f"load {r['loadavg']:.1f}")
    print()
    print(C.table(["call", "ms (median)", "ms (best)", "calls"],
                  [[k, v["median_s"] * 1e3, v["min_s"] * 1e3, v["calls"]] for k, v in t.items()]))
    print(f"shardc master CPU per call (median): {r['cpu_median_s'] * 1e3:.3f} ms")
    med = t["shardc"]["median_s"]
    C.print_targets("tiny", [
        ("call10_rpc", "a 10-shard rpc_chunked call <= 0.5 ms", f"{med * 1e3:.2f} ms", med <= 0.5e-3),
        ("call10_correct", "call10 outputs correct", "ok" if r["ok"] else "WRONG RESULT", bool(r["ok"])),
    ])


def run_child(variant: str, quick: bool, repeats: int) -> dict[str, Any]:
    if variant == "call10":
        return run_call10(quick, repeats)
    if variant == "grid":
        return run_grid(quick, repeats)
    if variant == "pairs":
        return run_pairs(quick, repeats)
    run, cleanup, info = make_runner(variant, quick)
    n0, cap_full, cap_quick = SIZES[variant]
    cap = cap_quick if quick else cap_full
    try:
        # Calibrate: grow N until one run takes long enough, then size for TARGET_S.
        n = n0
        while True:
            t0 = time.perf_counter()
            run(n)
            dt = time.perf_counter() - t0
            if dt >= 0.1 or n >= cap:
                break
            n = min(cap, n * 4)
        n = int(min(cap, max(n, n / dt * (TARGET_S / (2 if quick else 1)))))
        # Warm at the final size (buffers, caches); if that run was still
        # short (the calibration run paid warm-up costs), size up once more.
        t0 = time.perf_counter()
        run(n)
        dt = time.perf_counter() - t0
        if dt < 1.2 * MIN_S and n < cap:
            n = int(min(cap, n / dt * (TARGET_S / (2 if quick else 1))))
        holder: dict[str, Any] = {}

        def timed() -> None:
            holder["check"] = run(n)

        res = C.measure(timed, repeats)
        res["ok"] = bool(holder["check"]())
        res["n"] = n
        res["rate"] = n / res["median_s"]
        res["short"] = res["median_s"] < MIN_S
        r = info.get("last")
        if r is not None:
            d = r.diagnostics.to_dict()
            res["messages"] = d.get("messages_dispatch")
            res["final_chunk"] = getattr(r.diagnostics, "chunk_size_final", r.diagnostics.chunk_size)
    finally:
        cleanup()
    return res


def report(results: dict[str, dict[str, Any]], quick: bool, bench: str = "tiny") -> None:
    table = []
    grid = results.pop("grid", None)
    pairs = results.pop("pairs", None)
    call10 = results.pop("call10", None)
    for name, r in results.items():
        if "error" in r:
            C.emit(f"{bench}.{name}.error", r["error"].replace("\t", " ")[:200], "text")
            table.append([name, "ERROR", "", "", "", r["error"][:100]])
            continue
        C.emit(f"{bench}.{name}.rate", r["rate"], "tasks/s")
        C.emit(f"{bench}.{name}.n", r["n"], "tasks")
        C.emit(f"{bench}.{name}.wall_median", r["median_s"], "s")
        C.emit(f"{bench}.{name}.peak_mem", C.mib(r["peak"]), "MiB")
        C.emit(f"{bench}.{name}.correct", int(r["ok"]), "bool")
        C.emit(f"{bench}.{name}.loadavg", r["loadavg"], "load")
        note = [f"load {r['loadavg']:.1f}"]
        if r["median_s"] < MIN_S:
            note.append(f"run < {MIN_S} s (capped N)")
        if not r["ok"]:
            note.append("WRONG RESULT")
        table.append([name, r["rate"], r["n"], r["median_s"], C.mib(r["peak"]), "; ".join(note)])
    print()
    print(f"### tiny: trivial tasks, {WORKERS} workers, warm pools")
    print()
    print(C.table(["variant", "tasks/s (median)", "N", "wall s", "peak MiB", "notes"], table))
    if bench == "tiny" and results:
        targets(results)
    if pairs is not None:
        if "error" in pairs:
            C.emit(f"{bench}.pairs.error", pairs["error"].replace("\t", " ")[:200], "text")
        else:
            report_pairs(pairs)
    if call10 is not None:
        if "error" in call10:
            C.emit(f"{bench}.call10.error", call10["error"].replace("\t", " ")[:200], "text")
        else:
            report_call10(call10)
    if grid is not None:
        if "error" in grid:
            C.emit(f"{bench}.grid.error", grid["error"].replace("\t", " ")[:200], "text")
        else:
            report_grid(grid)


def targets(results: dict[str, dict[str, Any]]) -> None:
    ok = lambda n: n in results and "error" not in results[n]  # noqa: E731
    lines = []
    if ok("shardc_shm_queue"):
        r = results["shardc_shm_queue"]["rate"]
        lines.append(("shm_queue_rate", "shm_queue >= 1M shards/s", f"{r:,.0f}/s", r >= 1e6))
    else:
        lines.append(("shm_queue_rate", "shm_queue >= 1M shards/s",
                      "not run: " + results.get("shardc_shm_queue", {}).get("error", "skipped")[:80], False))
    if ok("mp_pool_map_auto"):
        peer = results["mp_pool_map_auto"]["rate"]
        for name, key in (("shardc_default", "default_vs_pool"), ("shardc_shm_queue", "shm_queue_vs_pool")):
            if ok(name):
                a = results[name]["rate"]
                lines.append((key, f"{name} >= 1.0x Pool.map default chunking (< 0.8x: not done)",
                              f"{a / peer:.2f}x", a >= peer))
    if ok("shardc_seeded") and ok("shardc_default"):
        a, b = results["shardc_seeded"]["rate"], results["shardc_default"]["rate"]
        lines.append(("seeded_vs_default", "seed= set >= 0.5x unseeded", f"{a / b:.2f}x", a >= 0.5 * b))
    if ok("shardc_rpc1") and ok("mp_pool_map1"):
        a, b = results["shardc_rpc1"]["rate"], results["mp_pool_map1"]["rate"]
        lines.append(("rpc1_vs_pool", "rpc chunk_size=1 >= 2x Pool.map(chunksize=1)", f"{a / b:.2f}x", a >= 2 * b))
    C.print_targets("tiny", lines)


def main(argv: list[str] | None = None) -> int:
    return C.variant_main(__doc__, __file__, VARIANTS, run_child, report, argv)


if __name__ == "__main__":
    sys.exit(main())
