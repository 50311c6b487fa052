"""Startup: a fresh 2-worker pool until the first task's result is back.

Measures: wall time from just before creating the pool to having the first
result of a trivial task, in a fresh interpreter per measurement (the
library is imported first, untimed; its import time is reported
separately), median over repeats (each repeat is a new process, and
variants are interleaved).  Also the time of pool creation alone where the
library exposes it.

Variants:

* ``shardc``: ``shard_map(1, f, workers=2)`` creating the default pool (fork)
  on the way (``shardc_pool_only``: the ``Pool.start_seconds`` part of it).
* ``mp_pool_fork``: ``multiprocessing.get_context("fork").Pool(2)`` +
  ``apply``.
* ``joblib``: ``Parallel(n_jobs=2)`` (loky: starts fresh interpreters).
* ``mpire``: ``WorkerPool(2)`` (fork) + ``map``.
* ``ray``: ``ray.init(num_cpus=2)`` + ``ray.get(f.remote())`` (if installed).
* ``dask``: ``Client(LocalCluster(n_workers=2, threads_per_worker=1))`` +
  ``submit().result()`` (if installed).

Does not measure: interpreter start, shutdown (untimed), or a warm pool's
per-call cost (see bench_tiny).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

WORKERS = 2
VARIANTS = ["shardc", "mp_pool_fork", "joblib", "mpire", "ray", "dask"]
SLOW = {"ray", "dask"}


def first(x: int) -> int:
    return x + 1


def shard_first(shard: Any) -> int:
    return shard.id + 1


def run_child(variant: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    t_imp = time.perf_counter()
    if variant == "shardc":
        import shardc
        res["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        r = shardc.shard_map(1, shard_first, workers=WORKERS)
        t1 = time.perf_counter()
        assert r.results == [1]
        pool = shardc.pool_get()
        res["pool_s"] = pool.start_seconds
        shardc.pool_stop()
    elif variant == "mp_pool_fork":
        import multiprocessing as mp
        res["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        pool = mp.get_context("fork").Pool(WORKERS)
        tp = time.perf_counter()
        assert pool.apply(first, (0,)) == 1
        t1 = time.perf_counter()
        res["pool_s"] = tp - t0
        pool.terminate()
    elif variant == "joblib":
        import joblib
        res["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        assert joblib.Parallel(n_jobs=WORKERS)([joblib.delayed(first)(0)]) == [1]
        t1 = time.perf_counter()
    elif variant == "mpire":
        from mpire import WorkerPool
        res["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        with WorkerPool(n_jobs=WORKERS, start_method="fork") as pool:
            assert list(pool.map(first, [0])) == [1]
            t1 = time.perf_counter()
    elif variant == "ray":
        import ray
        res["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        ray.init(num_cpus=WORKERS, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        tp = time.perf_counter()
        assert ray.get(ray.remote(first).remote(0)) == 1
        t1 = time.perf_counter()
        res["pool_s"] = tp - t0
        ray.shutdown()
    elif variant == "dask":
        from dask.distributed import Client, LocalCluster
        res["import_s"] = time.perf_counter() - t_imp
        t0 = time.perf_counter()
        cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        tp = time.perf_counter()
        assert client.submit(first, 0).result() == 1
        t1 = time.perf_counter()
        res["pool_s"] = tp - t0
        client.close()
        cluster.close()
    else:
        raise SystemExit(f"unknown variant {variant}")
    res["times"] = [t1 - t0]
    res["median_s"] = res["min_s"] = t1 - t0
    return res


def report(results: dict[str, dict[str, Any]]) -> None:
    table = []
    for name, r in results.items():
        if "error" in r:
            C.emit(f"startup.{name}.error", r["error"].replace("\t", " ")[:200], "text")
            table.append([name, "ERROR", "", "", "", r["error"][:100]])
            continue
        C.emit(f"startup.{name}.first_result_median", r["median_s"] * 1e3, "ms")
        C.emit(f"startup.{name}.first_result_min", r["min_s"] * 1e3, "ms")
        C.emit(f"startup.{name}.import", r["import_s"] * 1e3, "ms")
        if "pool_s" in r:
            C.emit(f"startup.{name}.pool_create", r["pool_s"] * 1e3, "ms")
        C.emit(f"startup.{name}.loadavg", r["loadavg"], "load")
        table.append([name, r["median_s"] * 1e3, r["min_s"] * 1e3, len(r["times"]),
                      r["pool_s"] * 1e3 if "pool_s" in r else "", r["import_s"] * 1e3,
                      f"load {r['loadavg']:.1f}"])
    print()
    print(f"### startup: fresh {WORKERS}-worker pool -> first result (fresh interpreter per repeat)")
    print()
    print(C.table(["variant", "first result ms (median)", "min ms", "repeats", "pool create ms (last)",
                   "import ms (untimed)", "notes"], table))
    lines = []
    r = results.get("shardc", {})
    if "median_s" in r:
        lines.append(("shardc_first_result", "shardc first result < 50 ms", f"{r['median_s'] * 1e3:.1f} ms",
                      r["median_s"] < 0.05))
    C.print_targets("startup", lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = C.base_parser(__doc__).parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    if args.child:
        return C.child_main(args.child, lambda: run_child(args.child))
    variants = args.only.split(",") if args.only else VARIANTS
    installed = []
    for v in variants:
        mod = {"ray": "ray", "dask": "dask.distributed"}.get(v)
        if mod is not None:
            import importlib.util
            if importlib.util.find_spec(mod.split(".")[0]) is None:
                C.emit(f"startup.{v}.skipped", "not installed", "text")
                continue
        installed.append(v)
    fast = [v for v in installed if v not in SLOW]
    slow = [v for v in installed if v in SLOW]
    here = os.path.abspath(__file__)
    results = C.run_variant_children(here, fast, [], args.timeout, rounds=repeats)
    if slow:  # seconds each: fewer repeats
        results.update(C.run_variant_children(here, slow, [], args.timeout, rounds=max(1, min(3, repeats))))
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
