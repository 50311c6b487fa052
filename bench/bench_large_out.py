"""Large outputs: each shard produces a 1 MiB block; write in place vs gather.

Measures: wall time (median over repeats) and peak memory of the whole
process tree (one extra run; see ``_common.py``) to produce a
``(512, 131072)`` float64 result (512 MiB; ``--quick``: 128 shards, 128 MiB)
on **2 workers**, where block ``i`` is ``sin(arange(131072) * (i+1) * 1e-3)``.
Every repeat starts from fresh memory for the result (a new shardc buffer,
untouched; or nothing for the peers), so first-touch page faults are paid by
all variants inside the timed region.  The memory run comes first, right
after warming the pool: shardc workers keep a closed buffer's segment mapped
until their next call, which would otherwise sit in the baseline.

Variants (each in a fresh interpreter, pools warm):

* ``shardc``: ``shard_map`` with ``out={"out": buffer}``; each shard computes
  straight into its row of the shared buffer (nothing pickled back).
* ``mp_pool_map``: ``Pool(2).map`` returning arrays, then ``np.stack`` into
  one array (the usual way: list of blocks, then one result).
* ``mp_pool_imap``: ``Pool(2).imap`` into a preallocated array as blocks
  arrive (the careful way: no list of all blocks).
* ``joblib``: ``Parallel(n_jobs=2)`` (loky) returning arrays, then ``np.stack``.
* ``mpire``: ``WorkerPool(2).map`` returning arrays, which mpire concatenates
  itself (its default ``concatenate_numpy_output``); reshaped, no extra copy.

Does not measure: outputs that are not arrays, results bigger than RAM,
the cost of reading the result afterwards.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

WORKERS = 2
ROW = 131072  # 1 MiB of float64
BASE = np.arange(ROW, dtype=np.float64)
VARIANTS = ["shardc", "mp_pool_map", "mp_pool_imap", "joblib", "mpire"]


def nshards(quick: bool) -> int:
    return 128 if quick else 512


def block(i: int) -> np.ndarray:
    row = BASE * ((i + 1) * 1e-3)
    np.sin(row, out=row)
    return row


def shard_block(shard: Any, out: Any) -> None:
    row = out[shard.id]
    np.multiply(BASE, (shard.id + 1) * 1e-3, out=row)
    np.sin(row, out=row)


def run_child(variant: str, quick: bool, repeats: int) -> dict[str, Any]:
    n = nshards(quick)
    holder: dict[str, Any] = {}
    before = None
    if variant == "shardc":
        import shardc
        pool = shardc.pool_create(WORKERS)
        cleanup = pool.stop

        def before() -> None:
            old = holder.pop("buf", None)
            if old is not None:
                old.close()
            holder["buf"] = shardc.buffer("f8", (n, ROW))

        def run() -> None:
            buf = holder["buf"]
            shardc.shard_map(n, shard_block, out={"out": buf}, pool=pool)
            holder["res"] = buf.array
    elif variant.startswith("mp_pool"):
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(WORKERS)
        pool.map(abs, range(4))
        cleanup = pool.terminate
        if variant == "mp_pool_map":
            def run() -> None:
                holder["res"] = np.stack(pool.map(block, range(n), chunksize=1))
        else:
            def run() -> None:
                res = np.empty((n, ROW))
                for i, b in enumerate(pool.imap(block, range(n), chunksize=1)):
                    res[i] = b
                holder["res"] = res
    elif variant == "joblib":
        import joblib
        par = joblib.Parallel(n_jobs=WORKERS)
        par.__enter__()
        par(joblib.delayed(abs)(i) for i in range(4))
        cleanup = lambda: par.__exit__(None, None, None)  # noqa: E731

        def run() -> None:
            holder["res"] = np.stack(par(joblib.delayed(block)(i) for i in range(n)))
    elif variant == "mpire":
        from mpire import WorkerPool
        pool = WorkerPool(n_jobs=WORKERS, keep_alive=True, start_method="fork")
        pool.map(abs, range(4))
        cleanup = pool.terminate

        def run() -> None:
            # mpire concatenates NumPy results itself (concatenate_numpy_output=True).
            holder["res"] = pool.map(block, range(n)).reshape(n, ROW)
    else:
        raise SystemExit(f"unknown variant {variant}")

    def run_fresh() -> None:
        holder.pop("res", None)  # drop the previous result (untimed, before)
        run()

    def before_all() -> None:
        holder.pop("res", None)
        if before is not None:
            before()

    try:
        res = C.measure(run_fresh, repeats, before_all, mem_first=True)
        out = holder["res"]
        expect = np.stack([block(i) for i in (0, n // 2, n - 1)])
        res["ok"] = bool(out.shape == (n, ROW) and np.array_equal(out[[0, n // 2, n - 1]], expect))
        res["out_bytes"] = n * ROW * 8
    finally:
        cleanup()
    return res


def report(results: dict[str, dict[str, Any]], quick: bool) -> None:
    n = nshards(quick)
    table = []
    for name, r in results.items():
        if "error" in r:
            C.emit(f"large_out.{name}.error", r["error"].replace("\t", " ")[:200], "text")
            table.append([name, "ERROR", "", "", "", "", r["error"][:100]])
            continue
        C.emit(f"large_out.{name}.wall_median", r["median_s"], "s")
        C.emit(f"large_out.{name}.cpu_median", r["cpu_s"], "s")
        C.emit(f"large_out.{name}.peak_mem", C.mib(r["peak"]), "MiB")
        C.emit(f"large_out.{name}.extra_mem", C.mib(r["extra"]), "MiB")
        C.emit(f"large_out.{name}.extra_vs_output", r["extra"] / r["out_bytes"], "x")
        C.emit(f"large_out.{name}.correct", int(r["ok"]), "bool")
        C.emit(f"large_out.{name}.loadavg", r["loadavg"], "load")
        note = [f"load {r['loadavg']:.1f}"] + ([] if r["ok"] else ["WRONG RESULT"])
        table.append([name, r["median_s"], r["cpu_s"], C.mib(r["peak"]), C.mib(r["extra"]), r["extra"] / r["out_bytes"],
                      "; ".join(note)])
    print()
    print(f"### large_out: {n} shards x 1 MiB -> one {n} MiB array, {WORKERS} workers")
    print()
    print(C.table(["variant", "wall s (median)", "CPU s (all procs)", "peak MiB", "extra MiB", "extra / output", "notes"], table))
    ok = lambda k: k in results and "error" not in results[k]  # noqa: E731
    lines = []
    peers = [k for k in VARIANTS[1:] if ok(k)]
    if ok("shardc") and peers:
        best = min(peers, key=lambda k: results[k]["median_s"])
        a, b = results["shardc"]["peak"], results[best]["peak"]
        lines.append(("peak_vs_fastest_peer", f"shardc peak memory <= 0.5x the fastest gathering peer's ({best})",
                      f"{a / b:.2f}x ({C.mib(a):.0f} vs {C.mib(b):.0f} MiB)", a <= 0.5 * b))
        ea, eb = results["shardc"]["extra"], results[best]["extra"]
        lines.append(("extra_vs_fastest_peer", f"(same, counting only memory added by the call, vs {best})",
                      f"{ea / eb:.2f}x", ea <= 0.5 * eb))
    C.print_targets("large_out", lines)


def main(argv: list[str] | None = None) -> int:
    return C.variant_main(__doc__, __file__, VARIANTS, run_child, report, argv)


if __name__ == "__main__":
    sys.exit(main())
