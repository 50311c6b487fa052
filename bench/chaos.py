"""Chaos run: many shards under random worker deaths, in both dispatch modes.

What it measures: whether supervision keeps its promises when workers die at
random moments.  Rounds of ``shard_map`` alternate ``rpc_chunked`` and
``shm_queue``; every shard does a random amount of work and writes
``out[i] = f(i)`` (idempotent), and a random few of its attempts end badly:
SIGKILL, a real SIGSEGV (a NULL read), ``os._exit``, a hang past
``timeout``, a memory blow-up past 2x ``mem_cap``, or an exception.  A few
"doomed" shards fail every attempt, so the failure path is exercised too.
Each attempt claims one record of the shard's row in a shared attempt log
(start time, worker pid, outcome, end time) before it runs.

Checks (each a line ``check_<name><TAB>0|1<TAB>bool``; exit status 1 if any
failed):

* ``out`` equals the serial result for every shard reported done;
* every shard is done or listed as failed: every attempt the result charged
  (its per-shard attempt log, which names the worker's pid or the attempt)
  is a distinct failed attempt in our log, every failed attempt in our log
  was charged (except, in ``rpc_chunked``, an exception whose worker died
  before sending the chunk's outcomes: counted as ``unreported_failures``),
  and a failed shard's ``attempts`` is its number of charged attempts;
* no shard marked done ran again: in ``shm_queue`` no attempt follows an
  ``ok`` attempt of the same shard (the done mark is set as the shard
  returns); in ``rpc_chunked`` one may only when the worker of the ``ok``
  attempt died before it could send the value (a value-lost rerun, counted);
* the log agrees with the result's counts (charged attempts = retries +
  failed shards);
* no file descriptors, shardc mappings, ``/dev/shm`` entries or processes
  leaked (compared before and after, and after ``pool_stop``);
* master RSS grows by at most 5 MiB over repeated calls after a warm-up.

What it does not measure: speed (see bench/run.sh), or deaths of the master.

Usage: ``python3 bench/chaos.py --quick`` (about 30 s, run in CI through
tests/test_chaos.py) or ``python3 bench/chaos.py --minutes 10`` (the long
form).  Output: stable ``name<TAB>value<TAB>unit`` lines.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import shardc  # noqa: E402

K = 12  # attempt records per shard (charged attempts <= 1 + max_retries, plus free reruns)
# Record fields, int64: outcome, pid, start ns, end ns.
EMPTY, STARTED, OK = 0, 1, 2
KINDS = ["sigkill", "sigsegv", "exit", "hang", "mem", "raise"]
KIND_CODE = {k: 10 + i for i, k in enumerate(KINDS)}
CODE_KIND = {v: k for k, v in KIND_CODE.items()}
FATAL = {"sigkill", "sigsegv", "exit", "hang", "mem"}  # the worker dies during the attempt
MAX_RETRIES = 3


def expected(i: np.ndarray | int) -> Any:
    """f(i): what shard i writes (a multiplicative hash, as int64)."""
    return (np.asarray(i, dtype=np.int64) * 2654435761) % 2147483647


def plan_fault(seed: int, sid: int, attempt: int, p_fault: float, doomed: int, kinds: list[str]) -> str | None:
    """The fault attempt ``attempt`` (0-based) of shard ``sid`` commits, or None
    (``doomed``: 0, or the 1-based number of a shard that fails every attempt)."""
    rng = np.random.default_rng([seed, sid, attempt])
    if doomed:
        return ["sigkill", "exit", "raise", "sigsegv"][(doomed + attempt) % 4]
    if rng.random() < p_fault:
        return kinds[int(rng.integers(len(kinds)))]
    return None


def chaos_fun(shard: Any, out: np.ndarray, log: np.ndarray, params: np.ndarray) -> None:
    """One attempt: claim a log record, work, maybe fail on purpose, write out[i]."""
    sid = int(shard.id)
    seed, p_ppm, doomed_every, max_work_us, timeout_ms, blow_mb, nkinds = (int(v) for v in params[:7])
    kinds = [KINDS[int(k)] for k in params[7 : 7 + nkinds]]
    row = log[sid]
    free = np.flatnonzero(row[:, 0] == EMPTY)
    if free.size == 0:
        raise RuntimeError(f"shard {sid}: attempt log row full")
    k = int(free[0])
    row[k, 1] = os.getpid()
    row[k, 2] = time.monotonic_ns()
    row[k, 0] = STARTED
    doomed = sid // doomed_every + 1 if doomed_every > 0 and sid % doomed_every == doomed_every - 1 else 0
    fault = plan_fault(seed, sid, k, p_ppm / 1e6, doomed, kinds)
    rng = np.random.default_rng([seed, sid, k, 1])
    work = rng.random() * max_work_us * 1e-6
    t_end = time.perf_counter() + work
    while time.perf_counter() < t_end:
        pass
    if fault is not None and rng.random() < 0.5:
        out[sid] = expected(sid)  # die after the write half of the time: the write is idempotent
    if fault is not None:
        row[k, 3] = time.monotonic_ns()
        row[k, 0] = KIND_CODE[fault]
        if fault == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "sigsegv":
            import ctypes

            ctypes.string_at(0, 1)  # a real NULL read: SIGSEGV through the guard's chaining
        elif fault == "exit":
            os._exit(7)
        elif fault == "hang":
            time.sleep(timeout_ms * 1e-3 * 20)
        elif fault == "mem":
            blob = np.ones(blow_mb << 17, dtype=np.float64)  # blow_mb MiB, every page touched
            time.sleep(timeout_ms * 1e-3 * 20)
            del blob
        elif fault == "raise":
            raise RuntimeError(f"chaos: planned failure of shard {sid} attempt {k + 1}")
        time.sleep(60)  # never reached: every fault above ends the attempt
    out[sid] = expected(sid)
    row[k, 3] = time.monotonic_ns()
    row[k, 0] = OK


# -- checks ----------------------------------------------------------------------------------------


def snapshot() -> dict[str, Any]:
    """What could leak: fds, shardc (memfd) mappings, /dev/shm names, child processes."""
    import psutil

    maps = Path("/proc/self/maps").read_text().splitlines()
    try:
        # Only names shardc makes (segments "shardc.*", task rings "shardc-q-*"):
        # other programs on the machine (multiprocessing's "sem.mp-*" of a
        # benchmark running beside this one) come and go on their own.
        shm = {n for n in os.listdir("/dev/shm") if n.startswith("shardc")}
    except OSError:
        shm = set()
    me = psutil.Process()
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "memfd_maps": sum(1 for m in maps if "/memfd:" in m),
        "memfd_names": sorted(m.split("/memfd:", 1)[1] for m in maps if "/memfd:" in m),
        "maps": len(maps),
        "shm": shm,
        "children": sorted(p.pid for p in me.children(recursive=True)),
        "segments": len(str(shardc.segment_report()).splitlines()),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGESIZE")


def analyse(res: Any, log: np.ndarray, out: np.ndarray, mode: str, stats: dict[str, int]) -> list[str]:
    """Check one round; returns the violations (empty when all held) and updates stats."""
    bad: list[str] = []
    n = len(out)
    failed = set(res.failures)
    done = np.ones(n, dtype=bool)
    done[list(failed)] = False
    # 1. out equals the serial result for every shard reported done.
    want = expected(np.arange(n))
    wrong = np.flatnonzero(done & (out != want))
    if wrong.size:
        bad.append(f"{mode}: out wrong for {wrong.size} done shard(s), first {int(wrong[0])}")
    outcome = log[:, :, 0]
    pid = log[:, :, 1]
    t0 = log[:, :, 2]
    t1 = log[:, :, 3]
    # When each pid died (the time its fatal record was written), for the rpc rule.
    died: dict[int, int] = {}
    fatal_codes = [KIND_CODE[k] for k in FATAL]
    fr, fk = np.nonzero(np.isin(outcome, fatal_codes))
    for r, k in zip(fr.tolist(), fk.tolist(), strict=True):
        died[int(pid[r, k])] = int(t1[r, k])
    used = outcome != EMPTY
    n_att = used.sum(axis=1)
    n_ok = (outcome == OK).sum(axis=1)
    stats["shards"] += n
    stats["attempts"] += int(n_att.sum())
    stats["failed_shards"] += len(failed)
    for kname, code in KIND_CODE.items():
        stats[f"faults_{kname}"] += int((outcome == code).sum())
    # Attempts that never recorded an outcome: the worker died without a
    # planned fault (an outside death); they are charged like any death.
    stats["unplanned_deaths"] += int((outcome == STARTED).sum())
    # 2. every shard done or failed with its attempts.
    never = np.flatnonzero(n_att == 0)
    if never.size:
        bad.append(f"{mode}: {never.size} shard(s) never ran, first {int(never[0])}")
    no_ok = np.flatnonzero(done & (n_ok == 0))
    if no_ok.size:
        bad.append(f"{mode}: {no_ok.size} shard(s) reported done without an ok attempt, first {int(no_ok[0])}")
    # Every attempt the result charged (diagnostics' attempt log: one entry
    # per failed attempt, naming the worker's pid or, for an exception, the
    # attempt) is a distinct failed attempt in our log.  A failed attempt the
    # result did not charge must be an exception whose report was lost: in
    # rpc_chunked a worker sends a chunk's outcomes together, so one that dies
    # later in the chunk takes the exception with it (the shard reruns free).
    d = res.diagnostics
    n_charged = 0
    suspects = set(np.flatnonzero(n_att > n_ok).tolist()) | set(d.attempt_log)
    for sid in sorted(suspects):
        entries = d.attempt_log.get(sid, [])
        n_charged += len(entries)
        left = np.flatnonzero(used[sid] & (outcome[sid] != OK)).tolist()
        for e in entries:
            m_att = re.search(r"planned failure of shard \d+ attempt (\d+)", e["message"])
            m_pid = re.search(r"pid (\d+)", e["message"])
            k = None
            if m_att and int(m_att.group(1)) - 1 in left:
                k = int(m_att.group(1)) - 1
            elif m_pid:
                k = next((k for k in left if int(pid[sid, k]) == int(m_pid.group(1))), None)
            if k is None:
                bad.append(f"{mode}: shard {sid}: charged attempt {e} matches no failed attempt in the log {left}")
                break
            left.remove(k)
        for k in left:
            p = int(pid[sid, k])
            if outcome[sid, k] == KIND_CODE["raise"] and mode == "rpc_chunked" and died.get(p, -1) > int(t1[sid, k]):
                stats["unreported_failures"] += 1
            else:
                code = int(outcome[sid, k])
                what = CODE_KIND.get(code, "no outcome")
                bad.append(f"{mode}: shard {sid} attempt {k + 1} ({what}, pid {p}) failed but was not charged")
        if sid in res.failures and res.failures[sid].attempts != len(entries):
            bad.append(f"{mode}: failed shard {sid}: {res.failures[sid].attempts} attempts, {len(entries)} charged")
        if sid not in failed and len(entries) > MAX_RETRIES:
            bad.append(f"{mode}: shard {sid} done after {len(entries)} charged attempts")
    # 3. no shard marked done ran again.
    for sid in np.flatnonzero(n_att > 1).tolist():
        ks = np.flatnonzero(used[sid])
        order = ks[np.argsort(t0[sid, ks])]
        for a, b in zip(order[:-1].tolist(), order[1:].tolist(), strict=True):
            if outcome[sid, a] != OK:
                continue
            # b started after an ok attempt a of the same shard.
            p = int(pid[sid, a])
            if mode == "rpc_chunked" and died.get(p, -1) > int(t1[sid, a]):
                stats["value_lost_reruns"] += 1  # its worker died before sending the value
            else:
                stats["done_reruns"] += 1
                bad.append(f"{mode}: shard {sid} ran again (attempt {b + 1}) after attempt {a + 1} was done")
    # 4. the log agrees with the result's counts.
    if n_charged != int(d.retries) + len(failed):
        bad.append(f"{mode}: {n_charged} charged attempts, result {d.retries} retries + {len(failed)} failed")
    if int(d.completed) + int(d.failed) != n or int(d.failed) != len(failed):
        bad.append(f"{mode}: completed {d.completed} + failed {d.failed} != {n} shards")
    return bad


def run_round(mode: str, n: int, seed: int, args: argparse.Namespace, stats: dict[str, int]) -> list[str]:
    """One shard_map call with faults; returns violations."""
    out = shardc.buffer("int64", n, init=-1)
    log = shardc.buffer("int64", (n, K, 4), init=0)
    kinds = [i for i, k in enumerate(KINDS) if k in args.kinds]
    params = np.array(
        [
            seed,
            int(args.p_fault * 1e6),
            args.doomed_every,
            args.max_work_us,
            int(args.timeout * 1000),
            args.blow_mb,
            len(kinds),
            *kinds,
        ],
        dtype=np.int64,
    )
    try:
        rng = np.random.default_rng(seed)
        res = shardc.shard_map(
            n,
            chaos_fun,
            borrow={"params": params},
            out={"out": out, "log": log},
            dispatch_mode=mode,
            chunk_size=int(rng.integers(1, 9)),
            timeout=args.timeout,
            mem_cap=f"{args.mem_cap_mb}MB",
            max_retries=MAX_RETRIES,
            on_failure="collect",
            progress=False,
            diagnostics=True,
        )
        bad = analyse(res, np.asarray(log), np.asarray(out), mode, stats)
        for ev in res.diagnostics.events:
            if ev.get("event") in ("death", "recycle"):
                stats[f"events_{ev['event']}"] += 1
        return bad
    finally:
        out.close()
        log.close()


def tiny(shard: Any, out: np.ndarray) -> None:
    out[shard.id] = shard.id


def rss_growth(calls: int, warmup: int) -> int:
    """Master RSS growth over ``calls`` small calls after ``warmup`` ones (both modes)."""
    out = shardc.buffer("int64", 64, init=0)
    try:
        for i in range(warmup + calls):
            if i == warmup:
                gc.collect()
                base = rss_bytes()
            shardc.shard_map(
                64, tiny, out={"out": out}, dispatch_mode=("rpc_chunked", "shm_queue")[i % 2], progress=False
            )
        gc.collect()
        return rss_bytes() - base
    finally:
        out.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="about 30 s (CI)")
    ap.add_argument("--minutes", type=float, default=None, help="time budget of the fault rounds")
    ap.add_argument("--shards", type=int, default=None, help="shards per round")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=None, help="shard timeout, s")
    ap.add_argument("--p-fault", type=float, default=None, help="chance an attempt fails on purpose")
    ap.add_argument("--doomed-every", type=int, default=None, help="every Nth shard fails every attempt (0: none)")
    ap.add_argument("--max-work-us", type=int, default=300)
    ap.add_argument("--mem-cap-mb", type=int, default=64)
    ap.add_argument("--kinds", default=",".join(KINDS), help="fault kinds to inject")
    ap.add_argument("--rss-calls", type=int, default=None, help="calls for the RSS-growth check")
    args = ap.parse_args(argv)
    quick = args.quick
    # Every planned death is logged by the supervisor as a warning: keep the output parsable.
    logging.getLogger("shardc").setLevel(logging.ERROR)
    args.kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(args.kinds) - set(KINDS):
        ap.error(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
    minutes = args.minutes if args.minutes is not None else (0.3 if quick else 10.0)
    shards_per_round = args.shards or (3000 if quick else 100_000)
    args.timeout = args.timeout or 1.0
    args.p_fault = args.p_fault if args.p_fault is not None else (0.004 if quick else 0.0004)
    args.doomed_every = args.doomed_every if args.doomed_every is not None else (1000 if quick else 20_000)
    args.blow_mb = args.mem_cap_mb * 5 // 2  # past the 2x mem_cap kill line
    rss_calls = args.rss_calls or (150 if quick else 1000)

    stats: dict[str, int] = {
        k: 0
        for k in [
            "shards",
            "attempts",
            "failed_shards",
            "done_reruns",
            "value_lost_reruns",
            "unplanned_deaths",
            "events_death",
            "events_recycle",
            "rounds",
            "unreported_failures",
        ]
        + [f"faults_{k}" for k in KINDS]
    }
    violations: list[str] = []
    t_start = time.monotonic()
    before = snapshot()  # before any pool: the baseline for "after pool_stop"
    pool = shardc.pool_create(args.workers)
    try:
        warm = shardc.buffer("int64", 8)
        # Both modes: the pool keeps one task ring for shm_queue calls (reset per
        # call, released by pool_stop), part of the pool's baseline, not a leak.
        for mode in ("rpc_chunked", "shm_queue"):
            shardc.shard_map(8, tiny, out={"out": warm}, dispatch_mode=mode, progress=False)
        warm.close()
        gc.collect()
        with_pool = snapshot()
        rnd = 0
        while rnd < 2 or time.monotonic() - t_start < minutes * 60:
            mode = ("rpc_chunked", "shm_queue")[rnd % 2]
            violations += run_round(mode, shards_per_round, args.seed * 1_000_003 + rnd, args, stats)
            rnd += 1
            stats["rounds"] = rnd
        t_faults = time.monotonic() - t_start
        growth = rss_growth(rss_calls, warmup=max(20, rss_calls // 10))
        gc.collect()
        after = snapshot()
        if len(after["children"]) != len(with_pool["children"]):
            violations.append(f"children: {len(with_pool['children'])} before, {len(after['children'])} after")
        for key in ("fds", "memfd_maps", "segments"):
            if after[key] > with_pool[key]:
                violations.append(f"{key} leaked: {with_pool[key]} before, {after[key]} after")
        if after["shm"] - with_pool["shm"]:
            violations.append(f"/dev/shm entries leaked: {sorted(after['shm'] - with_pool['shm'])}")
    finally:
        shardc.pool_stop(pool)
    del pool  # a stopped Pool object still maps its status table until it is dropped
    gc.collect()
    deadline = time.monotonic() + 10
    final = snapshot()
    while final["children"] and time.monotonic() < deadline:
        time.sleep(0.05)
        final = snapshot()
    if final["children"]:
        violations.append(f"processes left after pool_stop: {final['children']}")
    if final["shm"] - before["shm"]:
        violations.append(f"/dev/shm entries left after pool_stop: {sorted(final['shm'] - before['shm'])}")
    if final["memfd_maps"] > before["memfd_maps"]:
        violations.append(
            f"memfd mappings left after pool_stop: {before['memfd_maps']} -> {final['memfd_maps']}: "
            f"{final['memfd_names']}; {shardc.segment_report()}"
        )
    if final["fds"] > before["fds"]:
        violations.append(f"fds left after pool_stop: {before['fds']} -> {final['fds']}")
    rss_limit = 5 << 20
    if growth > rss_limit:
        violations.append(f"master RSS grew {growth / 2**20:.1f} MiB over {rss_calls} calls (limit 5 MiB)")

    rows = [(k, v, "count") for k, v in stats.items()]
    rows += [
        ("kills_total", sum(stats[f"faults_{k}"] for k in FATAL), "count"),
        ("fault_seconds", round(t_faults, 1), "s"),
        ("rss_growth", round(growth / 2**20, 2), "MiB"),
        ("rss_calls", rss_calls, "count"),
        ("leaked_fds", max(0, final["fds"] - before["fds"]), "count"),
        ("leaked_shm", len(final["shm"] - before["shm"]), "count"),
        ("leaked_processes", len(final["children"]), "count"),
        ("violations", len(violations), "count"),
    ]
    for name, value, unit in rows:
        print(f"chaos_{name}\t{value}\t{unit}")
    for v in violations[:50]:
        print(f"# VIOLATION: {v}", file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
