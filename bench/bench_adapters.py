"""shardc.Executor and the joblib backend side by side with their peers.

``python bench/bench_adapters.py [--quick] [--repeats 5]``

Sections (each in a fresh interpreter per variant: no peer's processes,
threads or caches leak into another's numbers; medians of ``--repeats``):

* ``map``: ``Executor.map`` vs ``ProcessPoolExecutor.map`` over N tiny tasks:
  no chunksize given (each library's default: shardc chunks automatically,
  ProcessPoolExecutor sends one item per task), ``chunksize=1``, and a tuned
  chunksize (N / (4 x workers), what ``multiprocessing.Pool.map`` picks);
* ``latency``: one task at a time, ``submit(...).result()`` round trip
  (p50/p99) and the ``submit`` call alone, shardc vs ProcessPoolExecutor;
* ``joblib_tiny``: ``Parallel(n_jobs=2)(delayed(f)(i) ...)`` for N tiny
  tasks, backends shardc, loky, multiprocessing (batch_size="auto");
* ``map_pair``: ``Executor.map`` and ``ProcessPoolExecutor.map`` alternating
  call by call in one process, ``chunksize=1`` over N items and the tuned
  chunksize over 10 x N (per-round ratios printed).
* ``joblib_pair``: the same tiny tasks, shardc and loky alternating call by
  call in one process (medians, and the median of the paired ratios): on a
  shared machine the load changes between two fresh interpreters' runs;
* ``joblib_big``: a 1 GiB float64 array argument to 8 tasks, each summing
  an eighth of it, a fresh ``Parallel`` per call: wall time of the first
  call and the median, and the process tree's peak extra memory
  (``_common.MemSampler``: PSS plus shared-memory objects, counted once;
  sampled from a helper process, :class:`SideSampler`, so the measured
  program has no thread of the benchmark's);
* ``sklearn``: ``cross_val_score(RandomForestClassifier(n_estimators=50,
  random_state=0), X, y, cv=5, n_jobs=2)``, loky vs shardc;
* ``crash``: 20 tasks of 50 ms, the 6th SIGKILLs its worker on its first
  attempt: shardc retries it; ProcessPoolExecutor and loky break the call.

The machine is shared (2 vCPUs): compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import _common as C  # noqa: E402

WORKERS = 2


def tiny(x: int) -> int:
    return x + 1


def part_sum(X: Any, i: int, k: int) -> float:
    n = X.shape[0]
    return float(X[i * n // k : (i + 1) * n // k].sum())


def napper(i: int, marker: str) -> int:
    if i == 5 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return i


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


# -- the variants (each runs in a child) ------------------------------------------------
def run_map(lib: str, n: int, repeats: int) -> dict[str, Any]:
    import concurrent.futures as cf

    import shardc

    ex: Any = shardc.Executor(WORKERS) if lib == "shardc" else cf.ProcessPoolExecutor(WORKERS)
    tuned = max(1, n // (4 * WORKERS))
    out: dict[str, Any] = {}
    with ex:
        list(ex.map(tiny, range(200)))  # warm: workers started
        # "default": no chunksize given (shardc: auto chunks; ProcessPoolExecutor: 1)
        for label, cs in (("default", None), ("chunksize=1", 1), (f"chunksize={tuned}", tuned)):
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = list(ex.map(tiny, range(n)) if cs is None else ex.map(tiny, range(n), chunksize=cs))
                ts.append(time.perf_counter() - t0)
                assert r[-1] == n
            out[label] = _med(ts)
    return out


def run_map_pair(n: int, repeats: int) -> dict[str, Any]:
    """Executor.map and ProcessPoolExecutor.map alternating call by call in ONE
    process (the order flips every pair): ``chunksize=1`` over ``n`` items and
    the tuned chunksize over ``10 * n`` (a tuned call of ``n`` items is ~10 ms,
    too short to time on a shared machine).  The shardc pool starts first."""
    import concurrent.futures as cf

    import shardc

    exs: dict[str, Any] = {"shardc": shardc.Executor(WORKERS)}
    list(exs["shardc"].map(tiny, range(200)))
    exs["ppe"] = cf.ProcessPoolExecutor(WORKERS)
    list(exs["ppe"].map(tiny, range(200)))
    big = 10 * n
    cases = {"chunksize=1": (n, 1), f"chunksize={big // (4 * WORKERS)} ({big} items)": (big, big // (4 * WORKERS))}
    out: dict[str, Any] = {}
    pairs = max(repeats, 9)
    try:
        for label, (m, cs) in cases.items():
            times: dict[str, list[float]] = {k: [] for k in exs}
            for r in range(pairs):
                for k in ("shardc", "ppe") if r % 2 == 0 else ("ppe", "shardc"):
                    t0 = time.perf_counter()
                    res = list(exs[k].map(tiny, range(m), chunksize=cs))
                    times[k].append(time.perf_counter() - t0)
                    assert res[-1] == m
            ratios = [p / s for s, p in zip(times["shardc"], times["ppe"], strict=True)]
            out[label] = {
                "shardc": _med(times["shardc"]),
                "ppe": _med(times["ppe"]),
                "ratio": _med(ratios),
                "rounds": ratios,
            }
    finally:
        for ex in exs.values():
            ex.shutdown()
    out["pairs"] = pairs
    return out


def run_latency(lib: str, n: int, repeats: int) -> dict[str, Any]:
    import concurrent.futures as cf

    import shardc

    ex: Any = shardc.Executor(WORKERS) if lib == "shardc" else cf.ProcessPoolExecutor(WORKERS)
    rt, sub = [], []
    with ex:
        for _ in range(50):
            ex.submit(tiny, 1).result()
        for _ in range(n):
            t0 = time.perf_counter()
            f = ex.submit(tiny, 1)
            t1 = time.perf_counter()
            f.result()
            t2 = time.perf_counter()
            sub.append(t1 - t0)
            rt.append(t2 - t0)
    rt.sort()
    sub.sort()
    return {
        "rt_p50_us": rt[len(rt) // 2] * 1e6,
        "rt_p99_us": rt[int(len(rt) * 0.99)] * 1e6,
        "submit_p50_us": sub[len(sub) // 2] * 1e6,
        "submit_p99_us": sub[int(len(sub) * 0.99)] * 1e6,
    }


def run_joblib_tiny(backend: str, n: int, repeats: int) -> dict[str, Any]:
    from joblib import Parallel, delayed

    import shardc  # noqa: F401 - registers the backend

    with Parallel(n_jobs=WORKERS, backend=backend) as par:
        par(delayed(tiny)(i) for i in range(200))  # warm
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = par(delayed(tiny)(i) for i in range(n))
            ts.append(time.perf_counter() - t0)
            assert r[-1] == n
    return {"median_s": _med(ts)}


class SideSampler:
    """``_common.MemSampler`` of this process's tree, run in a helper process
    (``--mem-side PID``) instead of a thread: a thread in the measured
    program would change what it measures (shardc forks workers from its
    fork server, without inheritance, while the caller has other threads).
    The helper's own memory is in the baseline."""

    def __init__(self) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--mem-side", str(os.getpid())]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._ask("")

    def _ask(self, cmd: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        if cmd:
            self.p.stdin.write(cmd + "\n")
            self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def start(self) -> None:
        self._ask("start")

    def stop(self) -> int:
        return int(self._ask("stop"))

    def close(self) -> None:
        self._ask("quit")
        self.p.wait(timeout=10)


def mem_side(root: int) -> None:
    """The helper of :class:`SideSampler`: start/stop a MemSampler of ``root``'s tree."""
    print("ready", flush=True)
    sampler = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "start":
            sampler = C.MemSampler(root=root).start()
            print("started", flush=True)
        elif cmd == "stop" and sampler is not None:
            sampler.stop()
            print(sampler.extra_total, flush=True)
        else:
            print("bye", flush=True)
            return


def run_joblib_pair(n: int, repeats: int) -> dict[str, Any]:
    """shardc and loky alternating call by call in ONE process (the order
    flips every pair), so a neighbour's load hits both alike; the shardc pool
    is started first (before loky's threads exist, as in a program that uses
    only shardc)."""
    from joblib import Parallel, delayed

    import shardc  # noqa: F401

    pars = {b: Parallel(n_jobs=WORKERS, backend=b) for b in ("shardc", "loky")}
    times: dict[str, list[float]] = {b: [] for b in pars}
    for p in pars.values():
        p.__enter__()
        p(delayed(tiny)(i) for i in range(200))  # warm
    pairs = max(repeats, 15)
    for r in range(pairs):
        for b in ("shardc", "loky") if r % 2 == 0 else ("loky", "shardc"):
            t0 = time.perf_counter()
            out = pars[b](delayed(tiny)(i) for i in range(n))
            times[b].append(time.perf_counter() - t0)
            assert out[-1] == n
    for p in pars.values():
        p.__exit__(None, None, None)
    ratios = [lk / sc for sc, lk in zip(times["shardc"], times["loky"], strict=True)]
    return {
        "shardc": _med(times["shardc"]),
        "loky": _med(times["loky"]),
        "ratio": _med(ratios),
        "pairs": pairs,
        "rounds": ratios,
        "at_least_1": sum(x >= 1.0 for x in ratios),
    }


def run_joblib_big(backend: str, gib: float, repeats: int) -> dict[str, Any]:
    import threading

    import numpy as np
    from joblib import Parallel, delayed

    import shardc  # noqa: F401

    X = np.ones(int(gib * (1 << 30)) // 8)
    X.reshape(-1)[::512] = 2.0  # touched: all pages resident before the baseline
    want = float(X.sum())
    k = 8
    ts, extra = [], []
    side = SideSampler()
    assert threading.active_count() == 1, threading.enumerate()
    for _ in range(repeats):
        side.start()
        t0 = time.perf_counter()
        with Parallel(n_jobs=WORKERS, backend=backend) as par:
            got = sum(par(delayed(part_sum)(X, i, k) for i in range(k)))
        ts.append(time.perf_counter() - t0)
        extra.append(side.stop())
        assert got == want, (got, want)
    side.close()
    # shardc keeps its shared copy while X lives: the first call pays the copy,
    # the later ones reuse it (their baseline includes it): report both.
    return {
        "median_s": _med(ts),
        "first_s": ts[0],
        "extra_bytes": _med(extra),
        "first_extra": extra[0],
        "array_bytes": X.nbytes,
    }


def run_sklearn(backend: str, repeats: int) -> dict[str, Any]:
    from joblib import parallel_config
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import cross_val_score

    import shardc  # noqa: F401

    X, y = make_classification(n_samples=2000, n_features=20, random_state=0)
    ts, scores = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        with parallel_config(backend=backend):
            scores = cross_val_score(RandomForestClassifier(n_estimators=50, random_state=0), X, y, cv=5, n_jobs=2)
        ts.append(time.perf_counter() - t0)
    return {"median_s": _med(ts), "scores": [float(s) for s in scores]}


def run_crash(lib: str) -> dict[str, Any]:
    import concurrent.futures as cf

    import shardc

    marker = os.path.join(tempfile.mkdtemp(), "m")
    t0 = time.perf_counter()
    try:
        if lib == "loky":
            from joblib import Parallel, delayed

            r = Parallel(n_jobs=WORKERS, backend="loky")(delayed(napper)(i, marker) for i in range(20))
        else:
            ex: Any = shardc.Executor(WORKERS) if lib == "shardc" else cf.ProcessPoolExecutor(WORKERS)
            with ex:
                r = list(ex.map(napper, range(20), [marker] * 20))
        outcome = "all 20 results" if r == list(range(20)) else "wrong results"
    except Exception as exc:  # noqa: BLE001 - the outcome is the measurement
        outcome = f"{type(exc).__name__}"
    return {"outcome": outcome, "seconds": time.perf_counter() - t0}


# -- driver ---------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    section, variant = args.child.split(":")
    r = args.repeats
    fn = {
        "map": lambda: run_map(variant, args.map_n, r),
        "map_pair": lambda: run_map_pair(args.map_n, r),
        "latency": lambda: run_latency(variant, args.latency_n, r),
        "joblib_tiny": lambda: run_joblib_tiny(variant, args.joblib_n, r),
        "joblib_pair": lambda: run_joblib_pair(args.joblib_n, r),
        "joblib_big": lambda: run_joblib_big(variant, args.gib, r),
        "sklearn": lambda: run_sklearn(variant, r),
        "crash": lambda: run_crash(variant),
    }[section]
    C.child_main(args.child, fn)


def spawn(section: str, variant: str, argv: list[str], timeout: float = 1800) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{section}:{variant}", *argv]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(HERE))
    for line in cp.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    return {"error": (cp.stderr or cp.stdout).strip().splitlines()[-3:]}


def spawn_paired(section: str, peer: str, argv: list[str]) -> dict[str, Any] | None:
    """Run a paired section, print its heading; None (the error printed) if it failed."""
    r = spawn(section, "both", argv)
    print(f"\n### the same, shardc and {peer} alternating in one process ({r.get('pairs')} pairs)\n")
    if "error" in r:
        print(r["error"])
        return None
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--map-n", type=int, default=20000)
    ap.add_argument("--latency-n", type=int, default=2000)
    ap.add_argument("--joblib-n", type=int, default=20000)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--only", default="map,map_pair,latency,joblib_tiny,joblib_pair,joblib_big,sklearn,crash")
    ap.add_argument("--child")
    ap.add_argument("--mem-side", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_side:
        mem_side(args.mem_side)
        return
    if args.quick:
        args.map_n, args.latency_n, args.joblib_n, args.gib, args.repeats = 2000, 300, 2000, 0.125, 3
    if args.child:
        child(args)
        return
    argv = [
        f"--repeats={args.repeats}",
        f"--map-n={args.map_n}",
        f"--latency-n={args.latency_n}",
        f"--joblib-n={args.joblib_n}",
        f"--gib={args.gib}",
    ]
    only = args.only.split(",")
    print(f"# bench_adapters: {WORKERS} workers, medians of {args.repeats}, loadavg {C.loadavg():.1f} (shared machine)")
    print(f"# joblib tasks per call: {args.joblib_n}")
    if "map" in only:
        s, p = spawn("map", "shardc", argv), spawn("map", "ppe", argv)
        rows = [[k, f"{s[k]:.3f}", f"{p[k]:.3f}", f"{p[k] / s[k]:.2f}x"] for k in s if k != "loadavg"]
        print(f"\n### Executor.map vs ProcessPoolExecutor.map, {args.map_n} tiny tasks (s)\n")
        print(C.table(["chunksize", "shardc", "ProcessPoolExecutor", "speed-up"], rows))
    if "map_pair" in only:
        r = spawn_paired("map_pair", "ProcessPoolExecutor", argv)
        if r is not None:
            rows = [
                [k, f"{v['shardc']:.3f}", f"{v['ppe']:.3f}", f"{v['ratio']:.2f}x"]
                for k, v in r.items()
                if isinstance(v, dict)
            ]
            print(C.table(["chunksize", "shardc s", "ProcessPoolExecutor s", "PPE / shardc, paired"], rows))
            for k, v in r.items():
                if isinstance(v, dict):
                    print(f"\n{k}, per round (PPE / shardc): " + " ".join(f"{x:.2f}" for x in v["rounds"]))
    if "latency" in only:
        s, p = spawn("latency", "shardc", argv), spawn("latency", "ppe", argv)
        rows = [[k, f"{s[k]:.0f}", f"{p[k]:.0f}", f"{p[k] / s[k]:.2f}x"] for k in s if k.endswith("_us")]
        print(f"\n### one task at a time, {args.latency_n} tasks (us)\n")
        print(C.table(["metric", "shardc", "ProcessPoolExecutor", "ppe / shardc"], rows))
    if "joblib_tiny" in only:
        res = {b: spawn("joblib_tiny", b, argv) for b in ("shardc", "loky", "multiprocessing")}
        base = res["shardc"]["median_s"]
        rows = [[b, f"{r['median_s']:.3f}", f"{r['median_s'] / base:.2f}x"] for b, r in res.items()]
        print(f"\n### joblib.Parallel, {args.joblib_n} tiny tasks (s; ratio = peer / shardc)\n")
        print(C.table(["backend", "median s", "ratio"], rows))
    if "joblib_pair" in only:
        r = spawn_paired("joblib_pair", "loky", argv)
        if r is not None:
            rows = [
                ["median s", f"{r['shardc']:.3f}", f"{r['loky']:.3f}"],
                ["loky / shardc, paired", "", f"{r['ratio']:.2f}x"],
            ]
            print(C.table(["", "shardc", "loky"], rows))
            per = " ".join(f"{x:.2f}" for x in r["rounds"])
            print(f"\nper round (loky / shardc): {per}; >= 1.0 in {r['at_least_1']} of {r['pairs']}")
    if "joblib_big" in only:
        res = {b: spawn("joblib_big", b, argv) for b in ("shardc", "loky", "multiprocessing")}
        base = res["shardc"].get("median_s", float("nan"))
        first = res["shardc"].get("first_s", float("nan"))
        rows = []
        for b, r in res.items():
            if "error" in r:
                rows.append([b, "error", str(r["error"])[:80], "", "", "", ""])
                continue
            a = r["array_bytes"]
            rows.append(
                [
                    b,
                    f"{r['first_s']:.2f}",
                    f"{r['first_s'] / first:.2f}x",
                    f"{r['median_s']:.2f}",
                    f"{r['median_s'] / base:.2f}x",
                    f"{r['first_extra'] / a:.2f}",
                    f"{r['extra_bytes'] / a:.2f}",
                ]
            )
        print(f"\n### joblib.Parallel, a {args.gib:g} GiB array argument, 8 tasks (peak extra memory of the tree)\n")
        hdr = ["backend", "first call s", "peer / shardc", "median s", "peer / shardc", "extra / array, 1st", "median"]
        print(C.table(hdr, rows))
    if "sklearn" in only:
        res = {b: spawn("sklearn", b, argv) for b in ("loky", "shardc")}
        rows = [[b, f"{r['median_s']:.2f}", str(r.get("scores"))[:60]] for b, r in res.items()]
        print("\n### cross_val_score(RandomForest(50), cv=5, n_jobs=2) (s)\n")
        print(C.table(["backend", "median s", "scores"], rows))
        print(f"\nidentical scores: {res['loky'].get('scores') == res['shardc'].get('scores')}")
    if "crash" in only:
        res = {b: spawn("crash", b, argv) for b in ("shardc", "ppe", "loky")}
        rows = [[b, r.get("outcome", r.get("error")), f"{r.get('seconds', float('nan')):.2f}"] for b, r in res.items()]
        print("\n### a worker SIGKILLed mid-run (20 tasks of 50 ms)\n")
        print(C.table(["library", "outcome", "s"], rows))


if __name__ == "__main__":
    main()
