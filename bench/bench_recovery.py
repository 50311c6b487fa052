"""Recovery cost per worker crash, and the cost of ``diagnostics=True``.

Measures, per dispatch mode (``rpc_chunked``, ``shm_queue``), on **2 workers**:
the time from a worker's death to its shard's retry starting.  A victim
shard, on its first attempt, writes ``time.monotonic_ns()`` into a shardc
buffer and SIGKILLs its own worker; the retry writes its start time first
thing.  CLOCK_MONOTONIC is system-wide, so the two stamps compare across
processes.  Two scenarios:

* ``alone``: a call with one shard (the victim); the other worker is idle.
* ``busy``: 200 shards of ~1 ms (``time.sleep``) with 5 victims spread out;
  the retry also waits for its turn behind work already dispatched.

It reports the median and max over all crashes, and checks that every
shard ran exactly once to completion (each shard does ``done[id] += 1`` in an
out buffer; a shard that completed on a worker that then died before
reporting it is run again, which shows up here as 2).

Then ``diagnostics=True`` vs ``False`` on bench_tiny's trivial shards
(tasks/s), per dispatch mode: calls alternate between the two settings on one
warm pool (order flipped every pair) and the cost is the median of the
per-pair ratios, so load from other jobs on the box hits both settings alike.

Does not measure: crashes of the master, hangs (timeouts are detected by a
watchdog tick), memory-cap kills, or the peers (none retries a shard after
its worker is SIGKILLed: Pool.map hangs or raises, loky raises
TerminatedWorkerError).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

WORKERS = 2
MODES = ["rpc_chunked", "shm_queue"]
SCENARIOS = ["alone", "busy"]
BUSY_N = 200
BUSY_VICTIMS = (20, 60, 100, 140, 180)


def victim_fun(shard: Any, death: Any, retry: Any, done: Any, victims: Any, nap: Any) -> None:
    sid = shard.id
    if victims[sid]:
        if death[sid] == 0:
            death[sid] = time.monotonic_ns()
            os.kill(os.getpid(), signal.SIGKILL)
        if retry[sid] == 0:
            retry[sid] = time.monotonic_ns()
    elif nap[0] > 0:
        time.sleep(nap[0])
    done[sid] += 1


def run_child(variant: str, quick: bool, repeats: int) -> dict[str, Any]:
    import shardc
    mode, scenario = variant.split(":")
    pool = shardc.pool_create(WORKERS)
    n = 1 if scenario == "alone" else BUSY_N
    calls = (10 if quick else 30) if scenario == "alone" else (2 if quick else 6)
    gaps: list[float] = []
    walls: list[float] = []
    bad = lost = dup = 0
    dup_ids: list[int] = []
    deaths = 0
    try:
        shardc.shard_map(4, lambda s: None, pool=pool)  # warm
        for _ in range(calls):
            bufs = {k: shardc.buffer("i8", n) for k in ("death", "retry", "done")}
            victims = shardc.buffer("u1", n)
            nap = shardc.buffer("f8", 1)
            if scenario == "alone":
                victims[0] = 1
            else:
                victims[list(BUSY_VICTIMS)] = 1
                nap[0] = 0.001
            t0 = time.perf_counter()
            r = shardc.shard_map(n, victim_fun, borrow={"victims": victims, "nap": nap}, out=bufs,
                                 dispatch_mode=mode, pool=pool, on_failure="collect")
            walls.append(time.perf_counter() - t0)
            d, rt, dn = bufs["death"].array, bufs["retry"].array, bufs["done"].array
            vic = np.flatnonzero(victims.array)
            for sid in vic:
                if d[sid] and rt[sid]:
                    gaps.append((int(rt[sid]) - int(d[sid])) * 1e-9)
            deaths += sum(1 for e in r.diagnostics.events if e["event"] == "death")
            if r.failures or not np.all(dn == 1):
                bad += 1
                lost += int(np.count_nonzero(dn == 0))
                dup += int(np.count_nonzero(dn > 1))
                dup_ids.extend(int(i) for i in np.flatnonzero(dn > 1)[:10])
            for b in list(bufs.values()) + [victims, nap]:
                b.close()
    finally:
        pool.stop()
    return {"times": gaps, "median_s": C.median(gaps), "min_s": min(gaps) if gaps else float("nan"),
            "max_s": max(gaps) if gaps else float("nan"), "crashes": len(gaps), "deaths": deaths,
            "bad_calls": bad, "calls": calls, "lost": lost, "dup": dup, "dup_ids": dup_ids[:20], "call_wall_median": C.median(walls)}


DIAG_N = {"rpc1": 40_000, "rpc_auto": 400_000, "shm_queue": 1_000_000}


def diag_child(kind: str, quick: bool) -> dict[str, Any]:
    """diagnostics=True vs False, paired: alternate calls on one warm pool
    (the order flips every pair), so a neighbour's load hits both alike."""
    import shardc
    from bench_tiny import shard_return, shard_write
    n = DIAG_N[kind] // (4 if quick else 1)
    pairs = 5 if quick else 9
    pool = shardc.pool_create(WORKERS)
    buf = shardc.buffer("i8", n)

    def call(diag: bool) -> float:
        t0 = time.perf_counter()
        if kind == "shm_queue":
            shardc.shard_map(n, shard_write, out={"out": buf}, dispatch_mode="shm_queue", pool=pool,
                             diagnostics=diag)
        elif kind == "rpc1":
            shardc.shard_map(n, shard_return, chunk_size=1, autotune=False, pool=pool, diagnostics=diag)
        else:
            shardc.shard_map(n, shard_return, chunk_size="auto", pool=pool, diagnostics=diag)
        return n / (time.perf_counter() - t0)

    try:
        call(True), call(False)  # warm
        on, off, ratio = [], [], []
        for i in range(pairs):
            order = (True, False) if i % 2 == 0 else (False, True)
            r = {d: call(d) for d in order}
            on.append(r[True])
            off.append(r[False])
            ratio.append(r[False] / r[True])
    finally:
        pool.stop()
    return {"n": n, "pairs": pairs, "rate_on": C.median(on), "rate_off": C.median(off),
            "cost": C.median(ratio) - 1, "ratios": ratio}


def diag_overhead(quick: bool, rounds: int) -> dict[str, dict[str, Any]]:
    return C.run_variant_children(os.path.abspath(__file__), [f"diag:{k}" for k in DIAG_N],
                                  ["--quick"] if quick else [], 600, rounds=1)


def report(results: dict[str, dict[str, Any]], diag: dict[str, dict[str, Any]]) -> None:
    table = []
    for name, r in results.items():
        if "error" in r:
            C.emit(f"recovery.{name}.error", r["error"].replace("\t", " ")[:200], "text")
            table.append([name, "ERROR", "", "", "", r["error"][:100]])
            continue
        C.emit(f"recovery.{name}.death_to_retry_median", r["median_s"] * 1e3, "ms")
        C.emit(f"recovery.{name}.death_to_retry_max", r["max_s"] * 1e3, "ms")
        C.emit(f"recovery.{name}.crashes", r["crashes"], "count")
        C.emit(f"recovery.{name}.bad_calls", r["bad_calls"], "count")
        C.emit(f"recovery.{name}.shards_never_run", r["lost"], "count")
        C.emit(f"recovery.{name}.shards_run_twice", r["dup"], "count")
        C.emit(f"recovery.{name}.loadavg", r["loadavg"], "load")
        note = [f"load {r['loadavg']:.1f}"]
        if r["bad_calls"]:
            note.append(f"{r['bad_calls']}/{r['calls']} calls ran a shard other than once: {r['lost']} never, "
                        f"{r['dup']} twice or more (e.g. ids {r['dup_ids'][:5]})")
        table.append([name, r["median_s"] * 1e3, r["min_s"] * 1e3, r["max_s"] * 1e3, r["crashes"],
                      r["call_wall_median"] * 1e3, "; ".join(note)])
    print()
    print(f"### recovery: worker SIGKILLed inside a shard -> the shard's retry starts ({WORKERS} workers)")
    print()
    print(C.table(["mode:scenario", "death->retry ms (median)", "min ms", "max ms", "crashes",
                   "call wall ms (median)", "notes"], table))
    if not diag:
        C.print_targets("recovery", _targets(results))
        return
    rows = []
    for name, r in diag.items():
        kind = name.split(":", 1)[1]
        if "error" in r:
            C.emit(f"recovery.diag_cost.{kind}.error", r["error"].replace("\t", " ")[:200], "text")
            rows.append([kind, "ERROR", "", "", "", r["error"][:100]])
            continue
        C.emit(f"recovery.diag_cost.{kind}", r["cost"] * 100, "%")
        C.emit(f"recovery.diag_cost.{kind}.rate_on", r["rate_on"], "tasks/s")
        C.emit(f"recovery.diag_cost.{kind}.rate_off", r["rate_off"], "tasks/s")
        spread = f"{(min(r['ratios']) - 1) * 100:+.0f}% .. {(max(r['ratios']) - 1) * 100:+.0f}%"
        rows.append([kind, r["rate_on"], r["rate_off"], f"{r['cost'] * 100:+.1f}%", spread,
                     f"{r['pairs']} pairs of {r['n']} shards; load {r['loadavg']:.1f}"])
    print()
    print("### diagnostics=True vs False on trivial shards (tasks/s; paired calls on one pool, alternating)")
    print()
    print(C.table(["dispatch", "diagnostics=True", "diagnostics=False", "cost of True (median of pairs)",
                   "pair spread", "notes"], rows))
    C.print_targets("recovery", _targets(results))


def _targets(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, bool]]:
    lines = []
    for name, r in results.items():
        if "median_s" in r and r["crashes"]:
            lines.append((f"{name.replace(':', '_')}_lt_50ms", f"{name}: death -> retry < 50 ms (median)",
                          f"{r['median_s'] * 1e3:.1f} ms", r["median_s"] < 0.05))
        else:
            lines.append((f"{name.replace(':', '_')}_lt_50ms", f"{name}: death -> retry < 50 ms (median)",
                          "not run: " + r.get("error", "no crash measured")[:80], False))
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = C.base_parser(__doc__)
    p.add_argument("--no-diag", action="store_true", help="skip the diagnostics on/off part")
    args = p.parse_args(argv)
    repeats = args.repeats or 1
    if args.child and args.child.startswith("diag:"):
        return C.child_main(args.child, lambda: diag_child(args.child.split(":", 1)[1], args.quick))
    if args.child:
        return C.child_main(args.child, lambda: run_child(args.child, args.quick, repeats))
    variants = args.only.split(",") if args.only else [f"{m}:{s}" for m in MODES for s in SCENARIOS]
    pass_on = ["--quick"] if args.quick else []
    results = C.run_variant_children(os.path.abspath(__file__), variants, pass_on, args.timeout,
                                     rounds=args.rounds)
    diag = {} if args.no_diag else diag_overhead(args.quick, 2 if args.quick else 3)
    report(results, diag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
