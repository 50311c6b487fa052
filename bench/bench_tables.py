"""Tables: 1,000 shards each return a 10,000-row frame; get them as one table.

Each shard builds a pandas DataFrame of 10,000 rows from its own generator
(``shard.rng``; the peers build the very same stream,
``SeedSequence(SEED, spawn_key=(i,))``): 4 float64 columns, 1 int64, 1
string of 12 characters (pandas' default string dtype).  10 M rows, about
560 MB as pandas.  2 workers everywhere.  Variants (each in a fresh
interpreter, pools warm):

* ``shardc_never``: ``shard_map(..., dispatch_opts={"auto_table": True,
  "auto_table_materialize": "never"})``: workers write Arrow IPC parts, the
  master gets a handle (nothing gathered).
* ``shardc_always``: the same, materialized: a ``pyarrow.Table`` in memory.
* ``shardc_always_pandas``: ``shardc_always`` then ``.to_pandas()``: the
  same thing the gathering peers return, a pandas DataFrame.
* ``shardc_partitioned``: ``auto_table_mode="partitioned"``: a persistent
  Parquet dataset (fsynced parts + manifest).
* ``floor_build``: the FLOOR: the same shards on the same pool, each
  building its frame and returning None (the frame is dropped): what the
  shard functions alone take on 2 workers.
* ``floor_arrow``: the floor plus the conversion to Arrow that auto_table
  does in the worker (``shardc.tables.convert.to_table``), then dropped:
  what is left between it and ``shardc_never`` is writing the parts and the
  master's side.
* ``mp_pool_map``: ``multiprocessing.Pool(2).map`` (default chunking), then
  ``pd.concat(ignore_index=True)``.
* ``joblib``: ``Parallel(n_jobs=2)`` (loky), then ``pd.concat``.
* ``dask_parquet``: ``dd.from_delayed([...]).to_parquet(dir)`` on the
  ``processes`` scheduler with 2 workers (workers write the files).
* ``ray_parquet``: ``ray.data.range(N).map_batches(...).write_parquet(dir)``
  on ``ray.init(num_cpus=2)``.

Measures: wall time (median over repeats), the master's peak memory added by
the call (RSS sampled every 5 ms in the master alone: what gathering costs
the caller) in a separate first run, and the peak of the whole process tree
(``_common.MemSampler``).  Then it reads the output back (untimed: handle
``.to_pandas()``, the Parquet files in their order) and checks it equals the
concatenated frame row by row (a hash per row, in order; Ray's files have no
shard order, so Ray is compared as a set of rows and says so).

``--paired`` (see :func:`run_paired`) runs the floors, ``shardc_never``,
``shardc_always`` and the two gathering peers in ONE master, interleaved
round by round, and gives per-round (paired) ratios: on a box shared with
other jobs, whose load moves by 2-3x within minutes, these are the numbers
to compare (separate children see different loads).  It prints every
round's ratios, load average and CPU pressure, the floor measured in the
same run, and the sink's cost ``(never - floor_build) / best peer`` (what
auto_table adds to the shard functions themselves).  ``--wait-load L``
waits (up to 3 min) before each round for the 1-minute load average to fall
to ``L``.

Does not measure: reading the data afterwards, results larger than RAM.
The machine is shared (~4 agents on 2 cores): compare ratios within a run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's shardc
import _common as C  # noqa: E402

WORKERS = 2
ROWS = 10_000
SEED = 20261206
VARIANTS = [
    "floor_build",
    "floor_arrow",
    "shardc_never",
    "shardc_always",
    "shardc_always_pandas",
    "shardc_partitioned",
    "mp_pool_map",
    "joblib",
    "dask_parquet",
    "ray_parquet",
]
GATHER_PEERS = ["mp_pool_map", "joblib"]


def nshards(quick: bool) -> int:
    return 200 if quick else 1000


def make_frame(rng: Any, n: int = ROWS) -> Any:
    import pandas as pd

    return pd.DataFrame(
        {
            "a": rng.random(n),
            "b": rng.random(n),
            "c": rng.standard_normal(n),
            "d": rng.standard_normal(n),
            "k": rng.integers(0, 1 << 40, n),
            "s": "key-" + pd.Series(rng.integers(10**7, 10**8, n)).astype(str),
        }
    )


def build(i: int) -> Any:
    return make_frame(np.random.Generator(np.random.PCG64(np.random.SeedSequence(SEED, spawn_key=(i,)))))


def shard_build(shard: Any) -> Any:
    return make_frame(shard.rng)


def shard_build_drop(shard: Any) -> None:
    make_frame(shard.rng)


def shard_arrow_drop(shard: Any) -> None:
    from shardc.tables.convert import to_table

    to_table(make_frame(shard.rng), shard.id)


def fingerprint(df: Any) -> dict[str, str]:
    import pandas as pd

    h = pd.util.hash_pandas_object(df[["a", "b", "c", "d", "k", "s"]].reset_index(drop=True), index=False).to_numpy()
    return {
        "rows": str(len(df)),
        "ordered": hashlib.sha1(h.tobytes()).hexdigest(),
        "as_set": hashlib.sha1(np.sort(h).tobytes()).hexdigest(),
    }


class MasterPeak:
    """Peak RSS of this process alone, sampled every 5 ms by a thread."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.base = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> MasterPeak:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def run_child(variant: str, quick: bool, repeats: int) -> dict[str, Any]:
    import pandas as pd

    n = nshards(quick)
    holder: dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="bench-tables-")
    out_dir = os.path.join(tmp, "out")
    cleanup: Any = lambda: None  # noqa: E731
    readback: Any = None

    def fresh_dir() -> None:
        shutil.rmtree(out_dir, ignore_errors=True)

    if variant.startswith("floor"):
        import shardc

        pool = shardc.pool_create(WORKERS)
        cleanup = pool.stop
        fun = shard_build_drop if variant == "floor_build" else shard_arrow_drop
        shardc.shard_map(4, fun, pool=pool, seed=SEED)  # warm
        chunk = -(-n // (8 * WORKERS))  # the chunks auto_table uses

        def run() -> None:
            shardc.shard_map(n, fun, pool=pool, seed=SEED, chunk_size=chunk, progress=False)

        def readback() -> Any:
            return build(0).iloc[:0]  # nothing to compare: the frames were dropped
    elif variant.startswith("shardc"):
        import shardc

        pool = shardc.pool_create(WORKERS)
        cleanup = pool.stop
        shardc.shard_map(4, shard_build, pool=pool, seed=SEED)  # warm: imports pandas/pyarrow in the workers
        opts: dict[str, Any] = {"auto_table": True, "auto_table_materialize": "never"}
        if variant.startswith("shardc_always"):
            opts["auto_table_materialize"] = "always"
        if variant == "shardc_partitioned":
            opts.update(auto_table_mode="partitioned", auto_table_path=out_dir)

        def run() -> None:
            r = shardc.shard_map(n, shard_build, pool=pool, seed=SEED, dispatch_opts=opts, progress=False)
            holder["res"] = r.table.to_pandas() if variant == "shardc_always_pandas" else r.table
            holder["diag"] = shardc.copy_report(r).data

        def readback() -> Any:
            t = holder["res"]
            return t if isinstance(t, pd.DataFrame) else t.to_pandas()
    elif variant == "mp_pool_map":
        import multiprocessing as mp

        mpool = mp.get_context("fork").Pool(WORKERS)
        mpool.map(abs, range(4))
        cleanup = mpool.terminate

        def run() -> None:
            holder["res"] = pd.concat(mpool.map(build, range(n)), ignore_index=True)
    elif variant == "joblib":
        import joblib

        par = joblib.Parallel(n_jobs=WORKERS)
        par.__enter__()
        par(joblib.delayed(build)(i) for i in range(4))
        cleanup = lambda: par.__exit__(None, None, None)  # noqa: E731

        def run() -> None:
            holder["res"] = pd.concat(par(joblib.delayed(build)(i) for i in range(n)), ignore_index=True)
    elif variant == "dask_parquet":
        import dask
        import dask.dataframe as dd

        meta = build(0).iloc[:0]

        def run() -> None:
            parts = [dask.delayed(build)(i) for i in range(n)]
            with dask.config.set(scheduler="processes", num_workers=WORKERS):
                dd.from_delayed(parts, meta=meta).to_parquet(out_dir, write_index=False)

        def readback() -> Any:
            files = sorted(
                (f for f in os.listdir(out_dir) if f.endswith(".parquet")), key=lambda f: int(f.split(".")[1])
            )
            return pd.concat([pd.read_parquet(os.path.join(out_dir, f)) for f in files], ignore_index=True)
    elif variant == "ray_parquet":
        import ray

        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
        cleanup = ray.shutdown

        def batch(b: dict[str, Any]) -> Any:
            return pd.concat([build(int(i)) for i in b["id"]], ignore_index=True)

        def run() -> None:
            ds = ray.data.range(n, override_num_blocks=n).map_batches(batch, batch_size=1, batch_format="numpy")
            ds.write_parquet(out_dir)

        def readback() -> Any:
            files = sorted(f for f in os.listdir(out_dir) if f.endswith(".parquet"))
            return pd.concat([pd.read_parquet(os.path.join(out_dir, f)) for f in files], ignore_index=True)
    else:
        raise SystemExit(f"unknown variant {variant}")
    if readback is None:

        def readback() -> Any:
            return holder["res"]

    def before() -> None:
        old = holder.pop("res", None)
        if hasattr(old, "close"):
            old.close()
        del old
        fresh_dir()

    try:
        before()
        with C.MemSampler(interval=0.05) as tree, MasterPeak() as master:
            t0 = time.perf_counter()
            run()
            t_mem = time.perf_counter() - t0
        res: dict[str, Any] = {
            "master_extra": master.peak - master.base,
            "tree_extra": tree.extra_total,
            "mem_run_s": t_mem,
        }
        cpu: list[float] = []
        times = C.timed_repeats(run, repeats, before, cpu)
        res.update(times=times, median_s=C.median(times), cpu_s=C.median(cpu))
        res.update(fingerprint(readback()))
        if "diag" in holder:
            res["table"] = {k: v for k, v in holder["diag"].items() if k.startswith("table_")}
        before()
    finally:
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def report(results: dict[str, dict[str, Any]], quick: bool) -> None:
    n = nshards(quick)
    ref = results.get("mp_pool_map", {})
    rows = []
    for name, r in results.items():
        if "error" in r:
            C.emit(f"tables.{name}.error", r["error"].replace("\t", " ")[:200], "text")
            rows.append([name, "ERROR", "", "", "", r["error"][:100]])
            continue
        if "ordered" in ref and not name.startswith("floor"):
            same = r["ordered"] == ref["ordered"] if name != "ray_parquet" else r["as_set"] == ref["as_set"]
        else:
            same = None
        C.emit(f"tables.{name}.wall_median", r["median_s"], "s")
        C.emit(f"tables.{name}.cpu_median", r["cpu_s"], "s")
        C.emit(f"tables.{name}.master_peak_extra", C.mib(r["master_extra"]), "MiB")
        C.emit(f"tables.{name}.tree_peak_extra", C.mib(r["tree_extra"]), "MiB")
        if not name.startswith("floor"):
            C.emit(f"tables.{name}.equal_to_concat", int(bool(same)), "bool")
        note = [f"load {r['loadavg']:.1f}", f"n={len(r['times'])}"]
        if same is False:
            note.append("DIFFERENT DATA")
        if name.startswith("floor"):
            note.append("frames dropped: no output")
        if name == "ray_parquet":
            note.append("compared as a set of rows (no shard order)")
        rows.append(
            [name, r["median_s"], r["cpu_s"], C.mib(r["master_extra"]), C.mib(r["tree_extra"]), "; ".join(note)]
        )
    print()
    print(f"### tables: {n} shards x {ROWS} rows -> one table, {WORKERS} workers")
    print()
    print(C.table(["variant", "wall s (median)", "CPU s", "master peak +MiB", "tree peak +MiB", "notes"], rows))
    ok = lambda k: k in results and "error" not in results[k]  # noqa: E731
    peers = [k for k in GATHER_PEERS if ok(k)]
    lines = []
    if peers:
        best = min(peers, key=lambda k: results[k]["median_s"])
        b = results[best]
        if ok("shardc_never"):
            a = results["shardc_never"]
            lines.append(
                (
                    "never_wall",
                    f"materialize never: wall <= 0.5x the fastest gather+concat peer ({best})",
                    f"{a['median_s'] / b['median_s']:.2f}x",
                    a["median_s"] <= 0.5 * b["median_s"],
                )
            )
            lines.append(
                (
                    "never_master_mem",
                    f"materialize never: master peak <= 0.2x {best}'s",
                    f"{a['master_extra'] / b['master_extra']:.3f}x",
                    a["master_extra"] <= 0.2 * b["master_extra"],
                )
            )
        for v in ("shardc_always", "shardc_always_pandas"):
            if ok(v):
                a = results[v]
                lines.append(
                    (
                        f"{v}_wall",
                        f"{v}: wall <= 0.8x {best}",
                        f"{a['median_s'] / b['median_s']:.2f}x",
                        a["median_s"] <= 0.8 * b["median_s"],
                    )
                )
    C.print_targets("tables", lines)
    if ok("floor_build"):
        fl = results["floor_build"]["median_s"]
        notes = [f"floor (frames built and dropped on {WORKERS} workers): {fl:.2f} s"]
        if ok("floor_arrow"):
            notes.append(f"floor + conversion to Arrow: {results['floor_arrow']['median_s']:.2f} s")
        for v in ("shardc_never", "shardc_always", "shardc_partitioned"):
            if ok(v):
                notes.append(f"{v}: {results[v]['median_s'] / fl:.2f}x the floor")
        if peers:
            pb = results[best]["median_s"]
            notes.append(
                f"0.5x {best} = {0.5 * pb:.2f} s = {0.5 * pb / fl:.2f}x the floor"
                + (" (below the floor: not reachable on this machine)" if 0.5 * pb < fl else "")
            )
            C.emit("tables.floor_over_fastest_peer", fl / pb, "x")
        print()
        print("; ".join(notes))


PAIRED = ["floor_build", "floor_arrow", "shardc_never", "shardc_always", "mp_pool_map", "joblib"]


def cpu_pressure() -> str:
    """``/proc/pressure/cpu``'s "some avg10" (the share of the last 10 s in
    which a runnable task waited for a CPU), or "?" where there is none."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[1].split("=")[1] + "%"
    except (OSError, IndexError):
        return "?"


def wait_for_load(limit: float, most: float = 180.0) -> float:
    """Sleep (up to ``most`` s) until the 1-minute load average is <= ``limit``;
    returns the seconds waited."""
    t0 = time.monotonic()
    while C.loadavg() > limit and time.monotonic() - t0 < most:
        time.sleep(2.0)
    return time.monotonic() - t0


def run_paired(quick: bool, rounds: int, wait_load: float | None = None) -> int:
    """``--paired``: every variant of PAIRED set up once in this one master
    (a shardc pool, a Pool(2), a loky Parallel(2): idle ones use no CPU),
    then ``rounds`` rounds, each running every variant once, in an order
    that flips every round, so the other jobs' load falls on all of them
    alike; the ratios are taken per round (paired), printed per round, then
    their median.  ``wait_load``: before each round, wait (up to 3 min) for
    the 1-minute load average to fall to it."""
    import multiprocessing as mp

    import joblib
    import pandas as pd

    import shardc

    n = nshards(quick)
    chunk = -(-n // (8 * WORKERS))
    pool = shardc.pool_create(WORKERS)
    mpool = mp.get_context("fork").Pool(WORKERS)
    par = joblib.Parallel(n_jobs=WORKERS)
    par.__enter__()
    par(joblib.delayed(build)(i) for i in range(4))
    mpool.map(abs, range(4))
    shardc.shard_map(4, shard_build, pool=pool, seed=SEED)

    def auto(mat: str) -> Any:
        def run() -> None:
            opts = {"auto_table": True, "auto_table_materialize": mat}
            r = shardc.shard_map(n, shard_build, pool=pool, seed=SEED, progress=False, dispatch_opts=opts)
            if mat == "never":
                r.table.close()  # removing the parts is part of the cost

        return run

    calls = {
        "floor_build": lambda: shardc.shard_map(
            n, shard_build_drop, pool=pool, seed=SEED, chunk_size=chunk, progress=False
        ),
        "floor_arrow": lambda: shardc.shard_map(
            n, shard_arrow_drop, pool=pool, seed=SEED, chunk_size=chunk, progress=False
        ),
        "shardc_never": auto("never"),
        "shardc_always": auto("always"),
        "mp_pool_map": lambda: pd.concat(mpool.map(build, range(n)), ignore_index=True),
        "joblib": lambda: pd.concat(par(joblib.delayed(build)(i) for i in range(n)), ignore_index=True),
    }
    wall: dict[str, list[float]] = {k: [] for k in PAIRED}
    cpu: dict[str, list[float]] = {k: [] for k in PAIRED}
    loads: list[float] = []
    meter = C.CpuMeter()
    print(f"# start: load {C.loadavg():.1f}, cpu pressure {cpu_pressure()}", file=sys.stderr, flush=True)
    try:
        for r in range(rounds):
            if wait_load is not None:
                waited = wait_for_load(wait_load)
                print(f"# waited {waited:.0f} s for load <= {wait_load}", file=sys.stderr, flush=True)
            load0 = C.loadavg()
            for k in PAIRED if r % 2 == 0 else PAIRED[::-1]:
                meter.start()
                t0 = time.perf_counter()
                calls[k]()
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(meter.stop())
            loads.append((load0 + C.loadavg()) / 2)
            rb = min(GATHER_PEERS, key=lambda k: wall[k][-1])
            print(
                f"# round {r}: load {loads[-1]:.1f}, cpu pressure {cpu_pressure()}: "
                + ", ".join(f"{k} {wall[k][-1]:.2f}" for k in PAIRED)
                + f" | / {rb}: never {wall['shardc_never'][-1] / wall[rb][-1]:.2f}, always "
                f"{wall['shardc_always'][-1] / wall[rb][-1]:.2f}, floor {wall['floor_build'][-1] / wall[rb][-1]:.2f}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        pool.stop()
        mpool.terminate()
        par.__exit__(None, None, None)
    rows = [[k, C.median(wall[k]), min(wall[k]), C.median(cpu[k])] for k in PAIRED]
    print(
        f"### tables, paired in one master: {n} shards x {ROWS} rows, {WORKERS} workers, {rounds} rounds, "
        f"load {min(loads):.1f}-{max(loads):.1f} (median {C.median(loads):.1f}; shared machine)"
    )
    print()
    print(C.table(["variant", "wall s (median)", "wall s (min)", "CPU s (median, all procs)"], rows))

    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(wall[a], wall[b], strict=True)]

    def ratio(a: str, b: str) -> float:
        return C.median(ratios(a, b))

    best = min(GATHER_PEERS, key=lambda k: C.median(wall[k]))
    sink = C.median(
        [(x - f) / y for x, f, y in zip(wall["shardc_never"], wall["floor_build"], wall[best], strict=True)]
    )
    lines = [
        (
            "paired_never_wall",
            f"never / {best} (paired per round), target <= 0.5",
            f"{ratio('shardc_never', best):.2f}x",
            ratio("shardc_never", best) <= 0.5,
        ),
        (
            "paired_always_wall",
            f"always / {best} (paired per round), target <= 0.8",
            f"{ratio('shardc_always', best):.2f}x",
            ratio("shardc_always", best) <= 0.8,
        ),
    ]
    C.print_targets("tables", lines)
    print()
    per_round = lambda a: " ".join(f"{x:.2f}" for x in ratios(a, best))  # noqa: E731
    print(
        f"per round / {best}: never [{per_round('shardc_never')}], always [{per_round('shardc_always')}], "
        f"floor [{per_round('floor_build')}]"
    )
    print(
        f"floor_build / {best}: {ratio('floor_build', best):.2f}x; (never - floor_build) / {best} (the sink's "
        f"cost): {sink:.2f}x; never / floor_build: {ratio('shardc_never', 'floor_build'):.2f}x; floor_arrow / "
        f"floor_build: {ratio('floor_arrow', 'floor_build'):.2f}x; CPU never / {best}: "
        f"{C.median(cpu['shardc_never']) / C.median(cpu[best]):.2f}x; CPU (never - floor_build) / {best}: "
        f"{(C.median(cpu['shardc_never']) - C.median(cpu['floor_build'])) / C.median(cpu[best]):.2f}x"
    )
    for k in PAIRED:
        C.emit(f"tables.paired.{k}.wall_median", C.median(wall[k]), "s")
        C.emit(f"tables.paired.{k}.cpu_median", C.median(cpu[k]), "s")
    C.emit("tables.paired.sink_over_best", sink, "x")
    C.emit("tables.paired.load_median", C.median(loads), "load")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--paired" in argv:  # python bench/bench_tables.py --paired [--quick] [--rounds R] [--wait-load L]
        rest = [a for a in argv if a != "--paired"]
        wait_load = None
        if "--wait-load" in rest:
            i = rest.index("--wait-load")
            wait_load = float(rest[i + 1])
            del rest[i : i + 2]
        args = C.base_parser(__doc__).parse_args(rest)
        return run_paired(args.quick, max(args.rounds, 5), wait_load)
    return C.variant_main(__doc__, __file__, VARIANTS, run_child, report, argv)


if __name__ == "__main__":
    sys.exit(main())
