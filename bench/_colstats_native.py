"""The single-pass variants of bench_colstats.py (issue 13): column mean +
variance (ddof=1) of a float64 C-order matrix already in shared memory, and
``X.T @ X``, each against the fastest code a NumPy user writes, in the same
run.  Imported by bench_colstats.py (``--only`` picks variants).

Mean + variance (16384 x 8192 = 1 GiB; ``--quick``: 4096 x 8192), 2 workers or threads:

* ``np_oneliner``: ``X.mean(0); X.var(0, ddof=1)`` (one process).
* ``numba_prange``: a numba ``prange`` kernel on 2 threads over row blocks
  (shifted sums per block, merged), reading the SAME shardc shared segment.
* ``dask_threads``: ``dask.array`` of row chunks, ``mean``/``var`` computed
  together with the threaded scheduler (2 workers).
* ``pool_fork_rows``: ``multiprocessing.Pool(2)`` forked after the matrix
  exists (inherited, not pickled; the pool is warm, its creation untimed),
  one task per row block returning (count, mean, M2), merged with Chan's
  formula in the parent.
* ``shardc_native``: ``shardc.col_stats(X, pool=pool)`` (built-in C kernel,
  row blocks, partials merged in a fixed tree) on a warm 2-worker pool.

``X.T @ X`` (131072 x 1024 = 1 GiB; ``--quick``: 32768 x 1024):

* ``xtx_blas1`` / ``xtx_blas2``: NumPy ``X.T @ X`` with BLAS limited to 1 / 2
  threads (threadpoolctl); NumPy hands this product to ``syrk``.
* ``shardc_crossprod``: ``shardc.shard_crossprod(X, pool=pool)``: row blocks
  (the default for this tall shape): 16 blocks of 8192 rows, one full-width
  ``syrk`` per block with 1 BLAS thread per worker, the 16 partials (8 MiB
  each, in a shared buffer) summed in a fixed pairwise tree by the master.
* ``shardc_crossprod_tiles``: the same with ``method="tiles"`` (2 x 2 output
  tiles on and above the diagonal, mirrored): the previous default.
* ``xtx_paired``: the four above in ONE interpreter on one matrix and one
  warm pool, interleaved (each round runs all four, the order rotating), so
  a shared box's changing load hits them alike; reports each one's median
  and the ratios of the medians (the numbers to quote on a busy machine).

Does not measure: the one-time copy of a matrix into shared memory (the
matrix is created inside a shardc buffer), pool start-up, numba compilation
(a warm-up call runs first) or float32 inputs.
"""

from __future__ import annotations

import time
from typing import Any

import _common as C
import numpy as np

WORKERS = 2
STATS = ["np_oneliner", "numba_prange", "dask_threads", "pool_fork_rows", "shardc_native"]
XTX = ["xtx_blas1", "xtx_blas2", "shardc_crossprod", "shardc_crossprod_tiles", "xtx_paired"]
ROW_BLOCK = 256  # rows per task / prange block for the peers

_X: np.ndarray | None = None  # the matrix a forked Pool inherits


def stats_dims(quick: bool) -> tuple[int, int]:
    return (4096, 8192) if quick else (16384, 8192)


def xtx_dims(quick: bool) -> tuple[int, int]:
    return (32768, 1024) if quick else (131072, 1024)


def _block_moments(r0: int, r1: int) -> tuple[int, np.ndarray, np.ndarray]:
    b = _X[r0:r1]  # type: ignore[index]
    m = b.mean(0)
    d = b - m
    return r1 - r0, m, np.einsum("ij,ij->j", d, d)


def chan(parts: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    n, mean, m2 = parts[0]
    for nb, mb, qb in parts[1:]:
        tot = n + nb
        d = mb - mean
        mean = mean + d * (nb / tot)
        m2 = m2 + qb + d * d * (n * nb / tot)
        n = tot
    return mean, m2 / (n - 1)


def _numba_kernel() -> Any:
    import numba

    @numba.njit(parallel=True, cache=False)
    def stats(X: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
        n, p = X.shape
        nb = (n + block - 1) // block
        S1 = np.zeros((nb, p))
        S2 = np.zeros((nb, p))
        for b in numba.prange(nb):
            r0 = b * block
            r1 = min(n, r0 + block)
            for i in range(r0, r1):
                for j in range(p):
                    y = X[i, j] - X[r0, j]
                    S1[b, j] += y
                    S2[b, j] += y * y
        mean = np.zeros(p)
        m2 = np.zeros(p)
        cnt = 0.0
        for b in range(nb):
            r0 = b * block
            c = min(n, r0 + block) - r0
            for j in range(p):
                mb = X[r0, j] + S1[b, j] / c
                qb = S2[b, j] - S1[b, j] * S1[b, j] / c
                d = mb - mean[j]
                tot = cnt + c
                mean[j] += d * c / tot
                m2[j] += qb + d * d * cnt * c / tot
            cnt += c
        return mean, m2 / (n - 1)

    numba.set_num_threads(WORKERS)
    return stats


def run_native_child(variant: str, quick: bool, repeats: int) -> dict[str, Any]:
    global _X
    import shardc

    pool = None
    if variant.startswith("shardc") or variant == "xtx_paired":
        pool = shardc.pool_create(WORKERS)  # warm, forked before the data exists
    rows, cols = stats_dims(quick) if variant in STATS else xtx_dims(quick)
    B = shardc.buffer(np.float64, (rows, cols))
    X = B.array
    rng = np.random.default_rng(0)
    for r in range(0, rows, 1024):  # fill in pieces: no second 1 GiB temporary
        X[r : r + 1024] = rng.random((min(1024, rows - r), cols))
    if variant in STATS:
        X[:, ::2] += 1e6  # the accuracy data: half the columns shifted by 1e6
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {"matrix_bytes": X.nbytes}

    if variant == "np_oneliner":

        def run() -> None:
            out["m"], out["v"] = X.mean(0), X.var(0, ddof=1)
    elif variant == "numba_prange":
        kern = _numba_kernel()
        kern(X[:2048], ROW_BLOCK)  # compile, untimed

        def run() -> None:
            out["m"], out["v"] = kern(X, ROW_BLOCK)
    elif variant == "dask_threads":
        import dask
        import dask.array as da

        def run() -> None:
            x = da.from_array(X, chunks=(max(ROW_BLOCK, rows // 16), cols))
            out["m"], out["v"] = dask.compute(x.mean(0), x.var(0, ddof=1), scheduler="threads", num_workers=WORKERS)
    elif variant == "pool_fork_rows":
        import multiprocessing as mp

        _X = X
        mpool = mp.get_context("fork").Pool(WORKERS)
        mpool.map(abs, range(WORKERS))
        bounds = [(r, min(rows, r + 1024)) for r in range(0, rows, 1024)]

        def run() -> None:
            out["m"], out["v"] = chan(mpool.starmap(_block_moments, bounds))
    elif variant == "shardc_native":

        def run() -> None:
            out["m"], out["v"] = shardc.col_stats(X, pool=pool)
    elif variant in ("xtx_blas1", "xtx_blas2"):
        from threadpoolctl import threadpool_limits

        nthreads = 1 if variant == "xtx_blas1" else 2

        def run() -> None:
            with threadpool_limits(limits=nthreads, user_api="blas"):
                out["z"] = X.T @ X
    elif variant in ("shardc_crossprod", "shardc_crossprod_tiles"):
        method = "tiles" if variant.endswith("tiles") else "auto"

        def run() -> None:
            out["z"] = shardc.shard_crossprod(X, pool=pool, method=method)
    elif variant == "xtx_paired":
        return _xtx_paired(X, B, pool, repeats)
    else:
        raise SystemExit(f"unknown variant {variant}")

    t0 = time.perf_counter()
    run()  # warm-up (pages, caches), untimed
    extra["first_s"] = time.perf_counter() - t0
    res = C.measure(run, repeats)
    res.update(extra)
    if variant in STATS:
        m_ref, v_ref = X.mean(0), X.var(0, ddof=1)
        res["err_mean"] = float(np.linalg.norm(out["m"] - m_ref) / np.linalg.norm(m_ref))
        res["err_var"] = float(np.linalg.norm(out["v"] - v_ref) / np.linalg.norm(v_ref))
        # shardc must meet the 1e-12; peers are shown with their error (merging
        # absolute block means of 1e6-shifted columns costs them ~1e-11), checked loosely.
        tol = 1e-12 if variant.startswith("shardc") else 1e-9
        res["ok"] = res["err_mean"] <= tol and res["err_var"] <= tol
    else:
        ref = X[:, :64].T @ X  # a slice of rows of Z, in float64 BLAS
        res["err"] = float(np.linalg.norm(out["z"][:64] - ref) / np.linalg.norm(ref))
        res["ok"] = res["err"] <= 1e-13
    if variant == "pool_fork_rows":
        mpool.terminate()
    if pool is not None:
        pool.stop()
    B.close()
    return res


def _xtx_paired(X: np.ndarray, B: Any, pool: Any, repeats: int) -> dict[str, Any]:
    """xtx_paired: the four X.T @ X variants interleaved in this interpreter (see the docstring)."""
    from threadpoolctl import threadpool_limits

    import shardc

    def blas(k: int) -> Any:
        def run() -> np.ndarray:
            with threadpool_limits(limits=k, user_api="blas"):
                return X.T @ X

        return run

    fns = {
        "xtx_blas1": blas(1),
        "xtx_blas2": blas(2),
        "shardc_crossprod": lambda: shardc.shard_crossprod(X, pool=pool),
        "shardc_crossprod_tiles": lambda: shardc.shard_crossprod(X, pool=pool, method="tiles"),
    }
    names = list(fns)
    ref = fns["xtx_blas1"]()
    for name in names[1:]:
        z = fns[name]()  # warm-up, and the check
        err = float(np.linalg.norm(z - ref) / np.linalg.norm(ref))
        if err > 1e-13:
            raise SystemExit(f"xtx_paired: {name} is off by {err:.1e}")
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    meter = C.CpuMeter()
    for r in range(max(5, repeats)):
        for name in names[r % 4 :] + names[: r % 4]:
            meter.start()
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(meter.stop())
    pool.stop()
    B.close()
    med = {n: C.median(ts) for n, ts in times.items()}
    return {
        "paired": True,
        "times": times,
        "cpu_medians": {n: C.median(c) for n, c in cpu.items()},
        "medians": med,
        "median_s": med["shardc_crossprod"],
        "min_s": min(times["shardc_crossprod"]),
        "cpu_s": float("nan"),
        "peak": 0,
        "extra": 0,
        "ok": True,
        "err": 0.0,
        "loadavg": C.loadavg(),
    }


def report_paired(r: dict[str, Any]) -> None:
    med = r["medians"]
    print()
    rounds = len(r["times"]["xtx_blas1"])
    print(f"### xtx_paired: interleaved in one interpreter, {rounds} rounds, load {r['loadavg']:.1f}")
    print()
    cpu = r["cpu_medians"]
    rows = [
        [n, med[n], min(r["times"][n]), med[n] / med["xtx_blas1"], med[n] / med["xtx_blas2"], cpu[n]] for n in med
    ]
    print(C.table(["variant", "wall s (median)", "wall s (min)", "/ blas1", "/ blas2", "CPU s (tree)"], rows))
    # On a box whose other jobs saturate it (autogroup scheduling gives this
    # session one share whatever its thread count), the wall ratio says
    # little; the CPU ratio is what 2 free cores would turn into wall time.
    print(f"CPU shardc_crossprod / blas1: {cpu['shardc_crossprod'] / cpu['xtx_blas1']:.3f} "
          f"(on 2 free cores the wall ratio is about half of it)")
    for n in med:
        C.emit(f"colstats.xtx_paired.{n}.wall_median", med[n], "s")
    a, b = med["shardc_crossprod"] / med["xtx_blas1"], med["shardc_crossprod"] / med["xtx_blas2"]
    C.print_targets(
        "colstats",
        [
            ("xtx_paired_vs_blas1", "X.T @ X (paired): <= 0.55x single-thread BLAS", f"{a:.2f}x", a <= 0.55),
            ("xtx_paired_vs_blas2", "X.T @ X (paired): <= 1.05x NumPy with 2 BLAS threads", f"{b:.2f}x", b <= 1.05),
        ],
    )


def report_native(results: dict[str, dict[str, Any]], quick: bool) -> None:
    paired = results.get("xtx_paired")
    if paired is not None and "error" not in paired:
        report_paired(paired)
    for group, names, dims in (("onepass", STATS, stats_dims(quick)), ("xtx", XTX, xtx_dims(quick))):
        got = {n: results[n] for n in names if n in results and n != "xtx_paired"}
        if not got:
            continue
        table = []
        for name, r in got.items():
            if "error" in r:
                C.emit(f"colstats.{name}.error", r["error"].replace("\t", " ")[:200], "text")
                table.append([name, "ERROR", "", "", "", "", r["error"][:80]])
                continue
            C.emit(f"colstats.{name}.wall_median", r["median_s"], "s")
            C.emit(f"colstats.{name}.cpu_median", r["cpu_s"], "s")
            C.emit(f"colstats.{name}.peak_mem", C.mib(r["peak"]), "MiB")
            C.emit(f"colstats.{name}.extra_mem", C.mib(r["extra"]), "MiB")
            C.emit(f"colstats.{name}.correct", int(r["ok"]), "bool")
            err = r.get("err_var", r.get("err"))
            table.append(
                [
                    name,
                    r["median_s"],
                    r["min_s"],
                    r["cpu_s"],
                    C.mib(r["peak"]),
                    C.mib(r["extra"]),
                    f"err {err:.1e}; load {r['loadavg']:.1f}" + ("" if r["ok"] else "; WRONG"),
                ]
            )
        print()
        print(
            f"### {group}: {dims[0]} x {dims[1]} float64 ({dims[0] * dims[1] * 8 / 2**20:.0f} MiB), "
            f"{WORKERS} workers/threads (shared machine: ratios within this run only)"
        )
        print()
        print(C.table(["variant", "wall s (median)", "wall s (min)", "CPU s", "peak MiB", "extra MiB", "notes"], table))
    ok = lambda n: n in results and "error" not in results[n]  # noqa: E731
    t = lambda n: results[n]["median_s"]  # noqa: E731
    lines = []
    if ok("shardc_native") and ok("numba_prange"):
        r = t("shardc_native") / t("numba_prange")
        lines.append(("native_vs_numba", "col mean+var: <= 1.1x numba prange", f"{r:.2f}x", r <= 1.1))
    if ok("shardc_native") and ok("np_oneliner"):
        r = t("shardc_native") / t("np_oneliner")
        lines.append(("native_vs_oneliner", "col mean+var: < 0.5x the NumPy one-liners", f"{r:.2f}x", r < 0.5))
    if ok("shardc_native"):
        x = results["shardc_native"]
        xs = x["extra"] / x["matrix_bytes"]
        lines.append(
            (
                "native_extra_mem",
                "col mean+var: extra memory of the tree (partials included) < 1% of X",
                f"{xs * 100:.2f}%",
                xs < 0.01,
            )
        )
    if ok("shardc_crossprod") and ok("xtx_blas1"):
        r = t("shardc_crossprod") / t("xtx_blas1")
        lines.append(("xtx_vs_blas1", "X.T @ X: <= 0.55x single-thread BLAS", f"{r:.2f}x", r <= 0.55))
    if ok("shardc_crossprod") and ok("xtx_blas2"):
        r = t("shardc_crossprod") / t("xtx_blas2")
        lines.append(("xtx_vs_blas2", "X.T @ X: <= 1.05x NumPy with 2 BLAS threads", f"{r:.2f}x", r <= 1.05))
    if lines:
        C.print_targets("colstats", lines)
