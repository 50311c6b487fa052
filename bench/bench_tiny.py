"""Many tiny shards: dispatch overhead per task, shardc vs its peers.

Measures: tasks per second for a trivial function over N task ids on
**2 workers**, pools already started (warm, excluded from timing), median
over repeats; N is calibrated per variant so one measurement takes about a
second (at least ``MIN_S``), capped per variant so slow peers keep the script
short.  Peak memory of the whole process tree is taken in one extra run.

Variants (each in a fresh interpreter):

* ``shardc_shm_queue``: ``dispatch_mode="shm_queue"``, ``fun`` writes
  ``out[shard.id] = shard.id`` into a shared buffer (nothing gathered).
* ``shardc_rpc1``: ``rpc_chunked``, ``chunk_size=1, autotune=False``,
  ``fun`` returns ``shard.id`` (gathered in shard order).
* ``shardc_rpc_auto``: ``rpc_chunked`` with ``chunk_size="auto"``.
* ``*_nodiag``: the same with ``diagnostics=False`` (its cost is reported by
  ``bench_recovery.py``).
* ``mp_pool_map1``: ``multiprocessing.Pool(2).map(f, range(N), chunksize=1)``.
* ``mp_pool_map_auto``: the same with its default chunksize, for reference.
* ``joblib_b1`` / ``joblib_auto``: ``Parallel(n_jobs=2, batch_size=1 |
  "auto")`` (loky), inside one ``with Parallel(...)`` block.
* ``mpire``: ``WorkerPool(2, keep_alive=True).map(f, range(N))`` (its default
  chunking).

Every variant checks its output (the ids, in order).  Does not measure:
functions that do real work (see bench_colstats), pool start (see
bench_startup), or results bigger than an int (see bench_large_out).
"""

from __future__ import annotations

import os
import sys
import time
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
    "mp_pool_map1": (2_000, 200_000, 50_000),
    "mp_pool_map_auto": (20_000, 8_000_000, 3_000_000),
    "joblib_b1": (500, 40_000, 10_000),
    "joblib_auto": (5_000, 1_000_000, 200_000),
    "mpire": (20_000, 8_000_000, 3_000_000),
}
VARIANTS = ["shardc_shm_queue", "shardc_rpc1", "shardc_rpc_auto", "mp_pool_map1", "mp_pool_map_auto",
            "joblib_b1", "joblib_auto", "mpire"]


def ident(i: int) -> int:
    return i


def ident_mpire(i: int) -> int:
    return i


def shard_write(shard: Any, out: Any) -> None:
    out[shard.id] = shard.id


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
            if base == "shardc_shm_queue":
                if n not in bufs:
                    bufs.clear()
                    bufs[n] = shardc.buffer("i8", n)
                buf = bufs[n]
                r = shardc.shard_map(n, shard_write, out={"out": buf}, dispatch_mode="shm_queue", pool=pool,
                                     diagnostics=diag)
                info["last"] = r
                return lambda: np.array_equal(buf.array, np.arange(n))
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
        cs = 1 if variant == "mp_pool_map1" else None

        def run(n: int) -> Any:
            res = pool.map(ident, range(n), chunksize=cs)
            return lambda: res == list(range(n))
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


def run_child(variant: str, quick: bool, repeats: int) -> dict[str, Any]:
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
    if bench == "tiny":
        targets(results)


def targets(results: dict[str, dict[str, Any]]) -> None:
    ok = lambda n: n in results and "error" not in results[n]  # noqa: E731
    lines = []
    if ok("shardc_shm_queue"):
        r = results["shardc_shm_queue"]["rate"]
        lines.append(("shm_queue_rate", "shm_queue >= 1M shards/s", f"{r:,.0f}/s", r >= 1e6))
    else:
        lines.append(("shm_queue_rate", "shm_queue >= 1M shards/s",
                      "not run: " + results.get("shardc_shm_queue", {}).get("error", "skipped")[:80], False))
    if ok("shardc_rpc1") and ok("mp_pool_map1"):
        a, b = results["shardc_rpc1"]["rate"], results["mp_pool_map1"]["rate"]
        lines.append(("rpc1_vs_pool", "rpc chunk_size=1 >= 2x Pool.map(chunksize=1)", f"{a / b:.2f}x", a >= 2 * b))
    C.print_targets("tiny", lines)


def main(argv: list[str] | None = None) -> int:
    return C.variant_main(__doc__, __file__, VARIANTS, run_child, report, argv)


if __name__ == "__main__":
    sys.exit(main())
