"""Per-column mean and variance of a big borrowed matrix, shardc vs its peers.

The single-pass variants (shardc.col_stats and shard_crossprod against the
NumPy one-liners, numba prange, dask.array, a forked Pool) are described in
``_colstats_native.py``; run them with
``--only np_oneliner,numba_prange,dask_threads,pool_fork_rows,shardc_native``
and ``--only xtx_blas1,xtx_blas2,shardc_crossprod,shardc_crossprod_tiles``.  Below: the column-block
``shard_map`` variants.

Measures: wall time to compute the mean and variance (ddof=0) of every column
of a float64 matrix (16384 x 8192 = 1 GiB; ``--quick``: 4096 x 8192 = 256 MiB)
into result arrays, one task per block of 256 columns (32 tasks), on
**2 workers**: the median over repeats, the speedup against the same
per-block kernel run serially in one process, and the peak memory of the
whole process tree (master + every descendant; see ``_common.py`` for how it
is counted) in one extra run, as "extra" = peak - the tree's memory just
before the call (the matrix itself is in the baseline).  For shardc, each
worker's peak USS and anonymous memory (Pss_Anon) from ``result.diagnostics``
show that no worker holds a private copy of the matrix.

Variants (each in a fresh interpreter; pools created before the timed call
unless the variant needs the matrix at fork time):

* ``serial``: the per-block kernel in a loop (the baseline of "speedup");
  ``numpy_whole`` (``X.mean(0)``, ``X.var(0)``) is reported for reference.
* ``mp_pool_args``: ``multiprocessing.Pool(2).map`` with each task's column
  block as an argument (pickled per task: the whole matrix crosses the pipes
  once per call; passing the whole matrix per task would be 32x worse).
* ``mp_pool_fork``: the matrix as a global inherited by ``fork``: the timed
  call includes creating the pool (it must be forked after the data exists).
* ``joblib``: ``Parallel(n_jobs=2)`` (loky, warm executor) with the matrix as
  an argument; joblib's auto-memmapping dumps it to /dev/shm once per call.
* ``mpire``: ``WorkerPool(2, shared_objects=X)`` (fork; pool creation timed).
* ``shardc_borrow``: ``shard_map(borrow={"X": X})`` with a plain array, the
  default path for arrays of 64 MiB or more: the pool (created before the
  data, like every shardc variant) re-forks its workers in the timed call so
  they inherit X copy-on-write (``shardc.inherit``); nothing is copied.
* ``shardc_copy``: the same with ``SHARDC_INHERIT=0``: X is copied once into
  a sealed segment per call (the copy cache is cleared before each repeat,
  untimed, so every repeat pays the copy).
* ``shardc_cached``: ``SHARDC_INHERIT=0`` and the same unchanged array again:
  the cached copy is reused after a memcmp check.
* ``shardc_global``: ``fun`` reads the matrix from a module global (the
  ``mp_pool_fork`` style), nothing in ``borrow=``: cloudpickle would put the
  1 GiB array inside ``fun`` (this script is ``__main__``); shardc sends it
  by token and the workers inherit it, as for ``shardc_borrow``.
* ``shardc_shared``: ``Xs = shardc.share(X)`` done beforehand (its time is
  reported separately as ``share_s``), then ``shard_map(borrow={"X": Xs})``.

Also: the CPU seconds used by all processes of the tree per call (median),
which, unlike wall time, hardly depends on other jobs on a shared box.

Does not measure: data generation, the cost of bigger or smaller blocks,
BLAS-threaded kernels (every variant is single-threaded NumPy per process),
or results bigger than two vectors (see ``bench_large_out.py``).  The box
is shared, so the load average is printed with each variant.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _colstats_native as N  # noqa: E402
import _common as C  # noqa: E402

WORKERS = 2
BLOCK = 256
VARIANTS = ["serial", "numpy_whole", "mp_pool_args", "mp_pool_fork", "joblib", "mpire",
            "shardc_borrow", "shardc_copy", "shardc_cached", "shardc_global", "shardc_shared",
            *N.STATS, *N.XTX]

_X: np.ndarray | None = None  # the fork-inherited global of mp_pool_fork


def dims(quick: bool) -> tuple[int, int]:
    return (4096, 8192) if quick else (16384, 8192)


def make_matrix(rows: int, cols: int) -> np.ndarray:
    X = np.random.default_rng(0).random((rows, cols))
    X *= np.linspace(0.5, 2.0, cols)
    return X


def blocks(cols: int) -> list[tuple[int, int]]:
    return [(j, min(cols, j + BLOCK)) for j in range(0, cols, BLOCK)]


def stats_block(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return b.mean(axis=0), b.var(axis=0)


# -- peers' task functions (module level: picklable by reference) -------------------------------

def task_block(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return stats_block(b)


def task_global(j0: int, j1: int) -> tuple[np.ndarray, np.ndarray]:
    return stats_block(_X[:, j0:j1])


def task_array(X: np.ndarray, j0: int, j1: int) -> tuple[np.ndarray, np.ndarray]:
    return stats_block(X[:, j0:j1])


def task_mpire(X: np.ndarray, j0: int, j1: int) -> tuple[np.ndarray, np.ndarray]:
    return stats_block(X[:, j0:j1])


def shard_stats(shard: Any, X: np.ndarray, means: Any, variances: Any) -> None:
    b = X[:, shard.idx]
    means[shard.idx] = b.mean(axis=0)
    variances[shard.idx] = b.var(axis=0)


def shard_stats_global(shard: Any, means: Any, variances: Any) -> None:
    b = _X[:, shard.idx]
    means[shard.idx] = b.mean(axis=0)
    variances[shard.idx] = b.var(axis=0)


def gather(parts: list[tuple[np.ndarray, np.ndarray]], bl: list[tuple[int, int]], m: np.ndarray,
           v: np.ndarray) -> None:
    for (j0, j1), (pm, pv) in zip(bl, parts):
        m[j0:j1] = pm
        v[j0:j1] = pv


# -- one variant, in this interpreter -------------------------------------------------------------

def run_child(variant: str, quick: bool, repeats: int) -> dict[str, Any]:
    global _X
    if variant in N.STATS or variant in N.XTX:
        return N.run_native_child(variant, quick, repeats)
    rows, cols = dims(quick)
    bl = blocks(cols)
    extra: dict[str, Any] = {}
    m = np.zeros(cols)
    v = np.zeros(cols)
    before = None
    pool: Any = None

    if variant.startswith("shardc"):
        if variant in ("shardc_copy", "shardc_cached"):
            os.environ["SHARDC_INHERIT"] = "0"
        import shardc
        from shardc.share import default_cache
        pool = shardc.pool_create(WORKERS)  # a long-lived pool, forked before the data exists
        means = shardc.buffer("f8", cols)
        variances = shardc.buffer("f8", cols)
        m, v = means.array, variances.array
    elif variant == "mp_pool_args":
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(WORKERS)
        pool.map(abs, range(WORKERS))
    elif variant == "joblib":
        import joblib
        joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(abs)(i) for i in range(4))  # warm executor

    X = make_matrix(rows, cols)
    nbytes = X.nbytes
    last: dict[str, Any] = {}

    if variant == "serial":
        def run() -> None:
            for j0, j1 in bl:
                m[j0:j1], v[j0:j1] = stats_block(X[:, j0:j1])
    elif variant == "numpy_whole":
        def run() -> None:
            m[:] = X.mean(axis=0)
            v[:] = X.var(axis=0)
    elif variant == "mp_pool_args":
        def run() -> None:
            gather(pool.map(task_block, [X[:, j0:j1] for j0, j1 in bl], chunksize=1), bl, m, v)
    elif variant == "mp_pool_fork":
        import multiprocessing as mp
        _X = X

        def run() -> None:
            with mp.get_context("fork").Pool(WORKERS) as p:
                gather(p.starmap(task_global, bl, chunksize=1), bl, m, v)
    elif variant == "joblib":
        import joblib

        def run() -> None:
            parts = joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(task_array)(X, j0, j1) for j0, j1 in bl)
            gather(parts, bl, m, v)
    elif variant == "mpire":
        from mpire import WorkerPool

        def run() -> None:
            with WorkerPool(n_jobs=WORKERS, shared_objects=X, start_method="fork") as p:
                gather(p.map(task_mpire, bl, chunk_size=1), bl, m, v)
    elif variant.startswith("shardc"):
        desc = shardc.shards(cols, block_size=BLOCK)
        if variant == "shardc_shared":
            t0 = time.perf_counter()
            Xs = shardc.share(X)
            extra["share_s"] = time.perf_counter() - t0
            ref = X  # keep for the check below, then drop: the data lives in the segment
            src: Any = Xs
        else:
            src = X

        def run() -> None:
            last["r"] = shardc.shard_map(desc, shard_stats, borrow={"X": src},
                                         out={"means": means, "variances": variances}, pool=pool)

        if variant == "shardc_global":
            _X = X

            def run() -> None:
                last["r"] = shardc.shard_map(desc, shard_stats_global,
                                             out={"means": means, "variances": variances}, pool=pool)

        if variant == "shardc_copy":
            def before() -> None:
                default_cache.clear()
        elif variant == "shardc_cached":
            run()  # the first call makes the copy; the timed ones reuse it
    else:
        raise SystemExit(f"unknown variant {variant}")

    if variant == "shardc_shared":
        # Check against the original, then keep only the shared copy alive.
        run()
        ok = np.allclose(m, ref.mean(axis=0)) and np.allclose(v, ref.var(axis=0))
        del ref
        X = None  # type: ignore[assignment]
        src_arr = Xs.array
    res = C.measure(run, repeats, before)
    if variant != "shardc_shared":
        ok = np.allclose(m, X.mean(axis=0)) and np.allclose(v, X.var(axis=0))
    else:
        ok = ok and np.allclose(m, src_arr.mean(axis=0))
    res.update(extra)
    res["ok"] = bool(ok)
    res["matrix_bytes"] = nbytes
    if "r" in last:
        d = last["r"].diagnostics
        wm = d.worker_memory()
        res["worker_peak_uss"] = max((w["peak_uss"] for w in wm.values()), default=0)
        res["worker_peak_anon"] = max((w["peak_anon"] for w in wm.values()), default=0)
        res["worker_base_anon"] = max((w.get("baseline") or 0 for w in wm.values()), default=0)
        bx = next(iter(d.borrow.values())) if d.borrow else None  # "X", or "global '_X'"
        if bx is not None:
            res["borrow_how"] = bx["how"]
            res["borrow_s"] = bx["seconds"]
            res["copied"] = bx["bytes_copied"]
        res["setup_bytes"] = d.bytes_setup
    if hasattr(pool, "terminate"):
        pool.terminate()
    elif pool is not None and hasattr(pool, "stop"):
        pool.stop()
    return res


def report(results: dict[str, dict[str, Any]], quick: bool) -> None:
    N.report_native(results, quick)
    results = {k: v for k, v in results.items() if k not in N.STATS and k not in N.XTX}
    if not results:
        return
    rows, cols = dims(quick)
    serial = results.get("serial", {}).get("median_s")
    table = []
    for name, r in results.items():
        if "error" in r:
            C.emit(f"colstats.{name}.error", r["error"].replace("\t", " ")[:200], "text")
            table.append([name, "ERROR", "", "", "", "", "", "", r["error"][:80]])
            continue
        speed = serial / r["median_s"] if serial else float("nan")
        xs = r["extra"] / r["matrix_bytes"]
        C.emit(f"colstats.{name}.wall_median", r["median_s"], "s")
        C.emit(f"colstats.{name}.wall_min", r["min_s"], "s")
        C.emit(f"colstats.{name}.speedup_vs_serial", speed, "x")
        C.emit(f"colstats.{name}.cpu_median", r["cpu_s"], "s")
        C.emit(f"colstats.{name}.peak_mem", C.mib(r["peak"]), "MiB")
        C.emit(f"colstats.{name}.extra_mem", C.mib(r["extra"]), "MiB")
        C.emit(f"colstats.{name}.extra_vs_matrix", xs, "x")
        C.emit(f"colstats.{name}.peak_pss_sum", C.mib(r["peak_pss"]), "MiB")
        C.emit(f"colstats.{name}.loadavg", r["loadavg"], "load")
        C.emit(f"colstats.{name}.correct", int(r["ok"]), "bool")
        wk = ""
        if "worker_peak_uss" in r:
            C.emit(f"colstats.{name}.worker_peak_uss", C.mib(r["worker_peak_uss"]), "MiB")
            C.emit(f"colstats.{name}.worker_peak_anon", C.mib(r["worker_peak_anon"]), "MiB")
            C.emit(f"colstats.{name}.worker_base_anon", C.mib(r["worker_base_anon"]), "MiB")
            wk = (f"{C.mib(r['worker_peak_uss']):.0f} / {C.mib(r['worker_peak_anon']):.0f} "
                  f"(base {C.mib(r['worker_base_anon']):.0f})")
        if "share_s" in r:
            C.emit(f"colstats.{name}.share_s", r["share_s"], "s")
        if "borrow_s" in r:
            C.emit(f"colstats.{name}.borrow_s", r["borrow_s"], "s")
        note = []
        if "share_s" in r:
            note.append(f"share() beforehand {r['share_s']:.2f} s")
        if "borrow_how" in r:
            note.append(f"borrow {r['borrow_how']} in {r['borrow_s']:.2f} s")
        if not r["ok"]:
            note.append("WRONG RESULT")
        note.append(f"load {r['loadavg']:.1f}")
        table.append([name, r["median_s"], speed, r["cpu_s"], C.mib(r["peak"]), C.mib(r["extra"]), xs, wk,
                      "; ".join(note)])
    print()
    print(f"### colstats: {rows} x {cols} float64 ({rows * cols * 8 / 2**20:.0f} MiB), "
          f"{len(blocks(cols))} blocks, {WORKERS} workers")
    print()
    print(C.table(["variant", "wall s (median)", "speedup vs serial", "CPU s (all procs)", "peak MiB", "extra MiB",
                   "extra / matrix", "worker peak USS / anon MiB", "notes"], table))
    targets(results)


def targets(results: dict[str, dict[str, Any]]) -> None:
    ok = lambda name: name in results and "error" not in results[name]  # noqa: E731
    lines = []
    if ok("serial") and ok("shardc_shared"):
        sp = results["serial"]["median_s"] / results["shardc_shared"]["median_s"]
        lines.append(("shared_speedup", "shared: speedup vs serial >= 1.6x", f"{sp:.2f}x", sp >= 1.6))
        sh = results["shardc_shared"]
        xs = sh["extra"] / sh["matrix_bytes"]
        lines.append(("shared_extra_mem", "shared: extra memory ~0 (<= 0.05x)", f"{xs:.3f}x", xs <= 0.05))
        # Each worker's kernel makes block-sized temporaries (var: one block copy);
        # serial's extra is that working set for one process.
        work = WORKERS * results["serial"]["extra"]
        xw = (sh["extra"] - work) / sh["matrix_bytes"]
        lines.append(("shared_extra_beyond_temps", f"shared: extra beyond {WORKERS}x the kernel's temporaries "
                      f"({C.mib(work):.0f} MiB) ~0 (<= 0.05x)", f"{xw:.3f}x", xw <= 0.05))
    if ok("shardc_borrow"):
        peers = [n for n in ("mp_pool_args", "mp_pool_fork", "joblib", "mpire") if ok(n)]
        if peers:
            best = min(peers, key=lambda n: results[n]["median_s"])
            t, tb = results["shardc_borrow"]["median_s"], results[best]["median_s"]
            lines.append(("borrow_vs_fastest_peer", f"borrow: at least as fast as the fastest peer ({best} {tb:.2f} s)", f"{t:.2f} s",
                          t <= tb))
            # Same-run noise on this shared box is several percent: also say
            # whether it is within 5% (the ratio is printed either way).
            lines.append(("borrow_vs_fastest_peer_5pct", "borrow: within 5% of the fastest peer",
                          f"{t / tb:.3f}x", t <= 1.05 * tb))
        xs = results["shardc_borrow"]["extra"] / results["shardc_borrow"]["matrix_bytes"]
        lines.append(("borrow_extra_mem", "borrow: extra memory <= 1.05x the matrix", f"{xs:.3f}x", xs <= 1.05))
    C.print_targets("colstats", lines)


def main(argv: list[str] | None = None) -> int:
    return C.variant_main(__doc__, __file__, VARIANTS, run_child, report, argv)


if __name__ == "__main__":
    sys.exit(main())
