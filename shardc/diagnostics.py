"""Diagnostics you can prove: collected during the run, reported after it.

:class:`Diagnostics` is filled by the master while a ``shard_map`` call runs
(never by asking workers afterwards): per-shard timings and attempts (rpc
mode; per-block in shm_queue mode), memory samples of every worker (RSS, PSS
and USS from ``/proc/PID/smaps_rollup``) and of the master, deaths with
their signal, recycles with their reason, retries, throttles, the autotune
history, bytes sent to workers, and what borrowing each input cost.

Reports (each a plain object with ``to_dict()`` and a readable ``str``):
``report(result, level)``, ``mem_report``, ``copy_report``, ``cow_report``,
``task_report``, ``segment_report()``, ``recommendations``.  The progress
bar is tqdm; the timeline picture is matplotlib (optional extra ``plot``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _lowlevel as ll
from .errors import signal_label


def _allocated(seg: Any) -> int | None:
    """Bytes the kernel has allocated for a segment (st_blocks), None if unknown."""
    try:
        return os.fstat(seg.fd).st_blocks * 512
    except (OSError, AttributeError):
        return None


def _fmt(n: float | None) -> str:
    from .units import fmt_bytes
    return fmt_bytes(n)


def _want_progress(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Diagnostics:
    """Everything one run measured (see module docstring)."""

    def __init__(self, run: Any) -> None:  # run: mode, num, cow, diagnostics, chunk, progress, opts
        self.mode = run.mode
        self.num_shards = run.num
        self.cow = run.cow
        self.enabled = run.diagnostics
        n = run.num if run.diagnostics else 0
        self.shard_worker = np.full(n, -1, dtype=np.int16)
        self.shard_t0 = np.zeros(n, dtype=np.int64)
        self.shard_t1 = np.zeros(n, dtype=np.int64)
        self.shard_attempts = np.zeros(n, dtype=np.int16)
        self.shard_ok = np.zeros(n, dtype=np.int8)  # 1 ok, 2 ok after retry, 3 failed
        # Anonymous-memory growth over each shard, in bytes; measured only when
        # shards average over 0.5 ms (NaN where not measured).
        self.shard_mem_delta = np.full(n, np.nan, dtype=np.float64)
        self.blocks: list[tuple[int, int, int, int, int]] = []  # shm_queue: worker, start, count, t0, t1
        self.mem: list[tuple[float, int, int, int, int, int, int]] = []  # t, slot, pid, rss, pss, uss, anon
        self.master_mem: list[tuple[float, int, int, int]] = []
        self.master_precise = False  # any precise (smaps_rollup) sample of the master
        self.events: list[dict[str, Any]] = []
        self.autotune: list[dict[str, Any]] = []
        self.borrow: dict[str, dict[str, Any]] = {}
        self.out: dict[str, int] = {}
        self.cow: dict[str, dict[str, Any]] = {}
        self.cow_policy = run.cow
        self.retries = 0
        self.returned_ignored = 0  # shm_queue: shards whose return value was dropped
        self.error_logs: list[str] = []  # shm_queue error_log files
        self.throttles = 0
        self._out_segs: dict[str, tuple[Any, str, int | None]] = {}
        self.out_written: dict[str, int] = {}
        self.bytes_setup = 0
        self.reforked = 0  # workers forked again so they inherit borrowed arrays
        self.refork_seconds = 0.0
        self.bytes_dispatch = 0
        self.messages_dispatch = 0
        self.bytes_results = 0
        self.wall_seconds = 0.0
        self.t_start_ns = 0
        self.t_end_ns = 0
        self.completed = 0
        self.failed = 0
        self.chunk_size = run.chunk
        self.workers: dict[int, dict[str, Any]] = {}
        self._bar: Any = None
        self._progress = _want_progress(run.progress)
        self.chunk_final = run.chunk
        self.block_size_opt = bool(run.opts.get("block_size"))
        self._counts = (0, 0, 0)  # completed, failed, retries (for the progress bar)
        self._last_master = 0.0

    # -- collection -----------------------------------------------------------------------
    def start(self, pool: Any) -> None:
        self.t_start_ns = time.monotonic_ns()
        self._pool = pool
        # Cheap samples at the start (a precise smaps_rollup of the master
        # costs milliseconds); precise ones follow during and after the run.
        for w in pool.workers:
            self.worker_started(w)
            m = ll.proc_mem_fast(w.pid)
            if m is not None:
                self.mem_sample(w, pool.calibrated(w, m))
        self._sample_master(precise=False)
        if self._progress:
            from tqdm.auto import tqdm
            tqdm.monitor_interval = 0  # no monitor thread: workers may be forked mid-run
            self._bar = tqdm(total=self.num_shards, unit="shard", delay=1.0, file=sys.stderr,
                             dynamic_ncols=True, desc=f"shard_map[{self.mode}]", leave=True)

    def worker_started(self, w: Any) -> None:
        rec = self.workers.setdefault(w.slot, {"pids": [], "baseline": w.baseline, "shards": 0,
                                               "busy_ns": 0, "deaths": 0, "recycles": 0})
        if w.pid not in rec["pids"]:
            rec["pids"].append(w.pid)

    def finish(self, pool: Any) -> None:
        self.t_end_ns = time.monotonic_ns()
        self._measure_out_written()
        precise = (self.t_end_ns - self.t_start_ns) > 200_000_000
        for w in pool.workers:
            if w.alive:
                # A precise sample only if the last one is stale (each costs up
                # to ~9 ms with a big input mapped, and this is on the caller's
                # critical path); else a calibrated cheap one.
                m = pool.sample_cheap(w, max_age=2.0) if precise else None
                if m is None:
                    m = ll.proc_mem_fast(w.pid)
                    m = pool.calibrated(w, m) if m is not None else None
                if m is not None:
                    self.mem_sample(w, m)
        # A precise sample of the master costs up to ~10 ms when it holds a
        # big array shared with the workers: only runs of over 0.5 s pay it
        # (< 2%); shorter ones report the statm estimate (an upper bound).
        self._sample_master(precise=(self.t_end_ns - self.t_start_ns) > 500_000_000)
        if self._bar is not None:
            self._update_bar(force=True)
            self._bar.close()
        self._pool = None  # the result outlives the pool; keep it picklable

    def _sample_master(self, precise: bool = True) -> None:
        m = ll.proc_mem(os.getpid()) if precise else ll.proc_mem_fast(os.getpid())
        if m is not None:
            self.master_precise = self.master_precise or bool(m.get("precise", 1))
            self.master_mem.append((time.monotonic_ns(), m["rss"], m["pss"], m["uss"], m["pss_anon"]))

    def tick(self, completed: int, failed: int, retries: int) -> None:
        self._counts = (completed, failed, retries)
        now = time.monotonic()
        if now - self._last_master > 0.5:
            # statm: a precise sample of a master holding a big array costs
            # milliseconds of CPU that the workers need on a full machine.
            self._last_master = now
            self._sample_master(precise=False)
        self._update_bar()

    def _update_bar(self, force: bool = False) -> None:
        bar = self._bar
        if bar is None:
            return
        completed, failed, retries = self._counts
        done = completed + failed
        if done > bar.n:
            bar.update(done - bar.n)
        bar.set_postfix(failed=failed, retries=retries, refresh=force)

    def add_out(self, name: str, nbytes: int, seg: Any = None) -> None:
        self.out[name] = nbytes
        if seg is not None and seg.key not in self._out_segs:
            self._out_segs[seg.key] = (seg, name, _allocated(seg))

    def _measure_out_written(self) -> None:
        """Bytes of out segments allocated during the run: the pages workers
        wrote for the first time (shared memory is allocated on first write;
        rewriting an already written page is not counted)."""
        for seg, name, before in self._out_segs.values():
            after = _allocated(seg)
            if after is not None and before is not None:
                self.out_written[name] = self.out_written.get(name, 0) + max(0, after - before)

    def add_borrow(self, name: str, how: str, nbytes: int, copied: int, seconds: float, kind: str) -> None:
        self.borrow[name] = {"how": how, "bytes": nbytes, "bytes_copied": copied, "seconds": seconds,
                             "kind": kind}

    def dispatched(self, nbytes: int, nmessages: int) -> None:
        self.bytes_dispatch += nbytes
        self.messages_dispatch += nmessages

    def shard_done(self, sid: int, slot: int, t0: int, t1: int, ok: bool, attempts: int,
                   mem_delta: int | None = None) -> None:
        self.shard_worker[sid] = slot
        if mem_delta is not None:
            self.shard_mem_delta[sid] = mem_delta
        self.shard_t0[sid] = t0
        self.shard_t1[sid] = t1
        self.shard_attempts[sid] = attempts + 1
        self.shard_ok[sid] = (1 if attempts == 0 else 2) if ok else 0
        rec = self.workers.get(slot)
        if rec is not None:
            rec["shards"] += 1
            rec["busy_ns"] += t1 - t0

    def batch_done(self, slot: int, results: list[tuple], attempts: np.ndarray) -> None:
        """Record a results message's shards with array stores (one per column,
        not one per shard: this runs in the master's hot loop)."""
        n = len(results)
        if n < 8:
            for sid, ok, _v, t0, t1, _e, dmem in results:
                self.shard_done(sid, slot, t0, t1, ok == 0, int(attempts[sid]), dmem)
            return
        sids = np.fromiter((r[0] for r in results), np.int64, n)
        oks = np.fromiter((r[1] == 0 for r in results), np.bool_, n)
        t0 = np.fromiter((r[3] for r in results), np.int64, n)
        t1 = np.fromiter((r[4] for r in results), np.int64, n)
        att = attempts[sids]
        self.shard_worker[sids] = slot
        self.shard_t0[sids] = t0
        self.shard_t1[sids] = t1
        self.shard_attempts[sids] = att + 1
        self.shard_ok[sids] = np.where(oks, np.where(att == 0, 1, 2), 0)
        if any(r[6] is not None for r in results):
            for r in results:
                if r[6] is not None:
                    self.shard_mem_delta[r[0]] = r[6]
        rec = self.workers.get(slot)
        if rec is not None:
            rec["shards"] += n
            rec["busy_ns"] += int((t1 - t0).sum())

    def block_done(self, slot: int, start: int, count: int, t0: int, t1: int) -> None:
        self.blocks.append((slot, start, count, t0, t1))
        rec = self.workers.get(slot)
        if rec is not None:
            rec["shards"] += count
            rec["busy_ns"] += t1 - t0

    def shard_failed(self, sid: int) -> None:
        if self.enabled:
            self.shard_ok[sid] = 3

    def cow_events(self, sid: int, events: list[dict[str, Any]]) -> None:
        for e in events:
            name = e.get("input", "?")
            rec = self.cow.setdefault(name, {"shards": [], "pages": 0, "bytes": 0, "first_offset": None,
                                             "mode": e.get("mode", self.cow_policy)})
            rec["shards"].append(sid)
            rec["pages"] += int(e.get("pages", 0))
            rec["bytes"] += int(e.get("bytes", 0))
            if rec["first_offset"] is None:
                rec["first_offset"] = e.get("first_offset")

    def mem_sample(self, w: Any, m: dict[str, int]) -> None:
        # "anon" is the worker's own: Pss_Anon less its share of borrowed
        # arrays it inherited at fork (shared with the master, write-protected).
        pool = getattr(self, "_pool", None)
        anon = pool.footprint(m, w) if pool is not None else m["pss_anon"]
        # A cheap (statm) sample has no USS of its own: its estimate is the
        # worker's own anonymous memory.
        uss = m["uss"] if m.get("precise", 1) else anon
        self.mem.append((time.monotonic_ns(), w.slot, w.pid, m["rss"], m["pss"], uss, anon))

    def event(self, kind: str, w: Any, reason: str, code: int | None = None, shard: int | None = None) -> None:
        self.events.append({"t": time.monotonic_ns(), "event": kind, "worker": w.slot, "pid": w.pid,
                            "reason": reason, "signal": signal_label(code) if code is not None else None,
                            "shard": shard})
        rec = self.workers.get(w.slot)
        if rec is not None:
            if kind == "death":
                rec["deaths"] += 1
            elif kind == "recycle":
                rec["recycles"] += 1

    def throttle(self, slot: int, n: int) -> None:
        self.throttles += 1

    def autotune_step(self, old: int, new: int, shard_seconds: float) -> None:
        self.autotune.append({"t": time.monotonic_ns(), "chunk_from": old, "chunk_to": new,
                              "shard_seconds": shard_seconds})

    # -- derived --------------------------------------------------------------------------
    def throughput(self) -> float:
        return self.completed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def worker_memory(self) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for t, slot, pid, rss, pss, uss, anon in self.mem:
            rec = out.setdefault(slot, {"peak_rss": 0, "peak_pss": 0, "peak_uss": 0, "peak_anon": 0,
                                        "end_rss": 0, "end_pss": 0, "end_uss": 0, "end_anon": 0, "samples": 0})
            rec["peak_rss"] = max(rec["peak_rss"], rss)
            rec["peak_pss"] = max(rec["peak_pss"], pss)
            rec["peak_uss"] = max(rec["peak_uss"], uss)
            rec["peak_anon"] = max(rec["peak_anon"], anon)
            rec["end_rss"], rec["end_pss"], rec["end_uss"], rec["end_anon"] = rss, pss, uss, anon
            rec["samples"] += 1
        for slot, rec in out.items():
            rec["baseline"] = self.workers.get(slot, {}).get("baseline")
        return out

    def to_dict(self) -> dict[str, Any]:
        wall_ns = max(1, self.t_end_ns - self.t_start_ns)
        workers = {}
        mem = self.worker_memory()
        for slot, rec in self.workers.items():
            workers[str(slot)] = {**rec, "busy_fraction": rec["busy_ns"] / wall_ns, **mem.get(slot, {})}
        return {
            "mode": self.mode, "num_shards": self.num_shards, "completed": self.completed,
            "failed": self.failed, "retries": self.retries, "wall_seconds": self.wall_seconds,
            "throughput": self.throughput(), "chunk_size": self.chunk_size, "autotune": self.autotune,
            "throttles": self.throttles, "bytes_setup": self.bytes_setup,
            "reforked_workers": self.reforked, "refork_seconds": self.refork_seconds,
            "bytes_dispatch": self.bytes_dispatch, "messages_dispatch": self.messages_dispatch,
            "bytes_per_dispatch": self.bytes_dispatch / max(1, self.messages_dispatch),
            "bytes_results": self.bytes_results, "borrow": self.borrow, "out": self.out,
            "returned_ignored": self.returned_ignored, "error_logs": self.error_logs,
            "cow": self.cow, "cow_policy": self.cow_policy, "events": self.events, "workers": workers,
            "master_peak_rss": max((m[1] for m in self.master_mem), default=0),
            "master_peak_uss": max((m[3] for m in self.master_mem), default=0),
            "master_peak_anon": max((m[4] for m in self.master_mem), default=0),
        }


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    """A report: a title, rows of (label, value), and the data as a dict."""

    title: str
    data: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    parts: list["Report"] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-serializable data (private keys, like the run itself, left out)."""
        public = {k: v for k, v in self.data.items() if not k.startswith("_")}
        d = json.loads(json.dumps(public, default=_jsonable))
        if self.parts:
            d["parts"] = {p.title: p.to_dict() for p in self.parts}
        return d

    def __str__(self) -> str:
        out = [self.title, "-" * len(self.title), *self.lines]
        for p in self.parts:
            out += ["", str(p)]
        return "\n".join(out)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def plot(self, path: Any = None, **kw: Any) -> Any:
        res = self.data.get("_result")
        if res is None:
            raise ValueError("this report has no run to plot")
        return plot_timeline(res, path=path, **kw)


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


def _diag(result: Any) -> Diagnostics:
    d = getattr(result, "diagnostics", None)
    if not isinstance(d, Diagnostics):
        raise TypeError(f"expected a ShardResult from shard_map, got {type(result).__name__}")
    return d


def task_report(result: Any) -> Report:
    d = _diag(result)
    data = {"shards_total": d.num_shards, "shards_completed": d.completed, "shards_failed": d.failed,
            "retries": d.retries, "wall_seconds": round(d.wall_seconds, 6), "throughput": d.throughput(),
            "dispatch_mode": d.mode, "chunk_size_final": d.chunk_final, "autotune_steps": len(d.autotune),
            "throttle_events": d.throttles, "messages_dispatched": d.messages_dispatch,
            "bytes_dispatched": d.bytes_dispatch,
            "bytes_per_dispatch": round(d.bytes_dispatch / max(1, d.messages_dispatch), 1),
            "bytes_setup": d.bytes_setup}
    if d.enabled and d.mode == "rpc_chunked":
        ok = d.shard_ok > 0
        if ok.any():
            wall = (d.shard_t1[ok] - d.shard_t0[ok]) * 1e-9
            data.update(shard_seconds_median=float(np.median(wall)), shard_seconds_p99=float(np.percentile(wall, 99)),
                        shard_seconds_max=float(wall.max()))
            dm = d.shard_mem_delta[ok]
            if np.isfinite(dm).any():
                k = int(np.nanargmax(dm))
                data.update(shard_mem_delta_max=float(np.nanmax(dm)),
                            shard_mem_delta_max_shard=int(np.nonzero(ok)[0][k]))
    lines = [f"shards      {d.completed}/{d.num_shards} ok, {d.failed} failed, {d.retries} retries",
             f"wall        {d.wall_seconds:.3f} s  ({d.throughput():,.0f} shards/s, {d.mode})",
             f"dispatch    {d.messages_dispatch} messages, {data['bytes_per_dispatch']:.0f} B each, "
             f"setup {_fmt(d.bytes_setup)}"]
    if "shard_seconds_median" in data:
        lines.append(f"per shard   median {data['shard_seconds_median']*1e3:.3f} ms, p99 "
                     f"{data['shard_seconds_p99']*1e3:.3f} ms, max {data['shard_seconds_max']*1e3:.3f} ms")
    if "shard_mem_delta_max" in data:
        lines.append(f"memory      largest growth over one shard: {_fmt(data['shard_mem_delta_max'])} "
                     f"(shard {data['shard_mem_delta_max_shard']})")
    if d.autotune:
        lines.append(f"autotune    chunk {d.autotune[0]['chunk_from']} -> {d.chunk_final} in {len(d.autotune)} steps")
    return Report("tasks", data, lines)


def mem_report(result: Any) -> Report:
    d = _diag(result)
    mem = d.worker_memory()
    master_rss = max((m[1] for m in d.master_mem), default=0)
    master_uss = max((m[3] for m in d.master_mem), default=0)
    data = {"workers": {str(k): v for k, v in mem.items()},
            "peak_worker_anon": max((v["peak_anon"] for v in mem.values()), default=0),
            "peak_worker_uss": max((v["peak_uss"] for v in mem.values()), default=0),
            "peak_worker_rss": max((v["peak_rss"] for v in mem.values()), default=0),
            "sum_peak_pss": sum(v["peak_pss"] for v in mem.values()),
            "master_peak_rss": master_rss, "master_peak_uss": master_uss, "samples": len(d.mem)}
    lines = ["worker  peak rss    peak pss    peak uss    peak anon   end anon    baseline anon",
             "        (rss/pss/uss include pages of shared inputs; anon is the worker's own memory)"]
    for k, v in sorted(mem.items()):
        lines.append(f"{k:>6}  {_fmt(v['peak_rss']):>10}  {_fmt(v['peak_pss']):>10}  {_fmt(v['peak_uss']):>10}  "
                     f"{_fmt(v['peak_anon']):>10}  {_fmt(v['end_anon']):>10}  {_fmt(v['baseline']):>10}")
    est = "" if getattr(d, "master_precise", True) else " (statm estimate, an upper bound: run < 0.5 s)"
    lines.append(f"master  peak rss {_fmt(master_rss)}, peak uss {_fmt(master_uss)}{est}  ({len(d.mem)} worker samples)")
    return Report("memory", data, lines)


def copy_report(result: Any) -> Report:
    d = _diag(result)
    shared = sum(v["bytes"] for v in d.borrow.values())
    copied = sum(v["bytes_copied"] for v in d.borrow.values())
    materialized = sum(v["bytes"] for v in d.cow.values())
    data = {"borrow": d.borrow, "borrow_bytes": shared, "borrow_bytes_copied": copied,
            "result_bytes": d.bytes_results, "out_bytes": sum(d.out.values()), "out": d.out,
            "out_bytes_written": sum(d.out_written.values()), "out_written": d.out_written,
            "materialized_bytes": materialized, "dispatch_bytes": d.bytes_dispatch, "setup_bytes": d.bytes_setup,
            "reforked_workers": d.reforked, "refork_seconds": d.refork_seconds}
    lines = []
    for name, v in d.borrow.items():
        lines.append(f"borrow {name!r}: {_fmt(v['bytes'])} {v['how']}"
                     + (f" ({_fmt(v['bytes_copied'])} copied in {v['seconds']*1e3:.1f} ms)" if v["bytes_copied"] else
                        f" (0 copied, {v['seconds']*1e3:.2f} ms)"))
    if any(v["how"] == "inherited" for v in d.borrow.values()):
        lines.append(f"inherited inputs: workers see the caller's pages copy-on-write, as of fork time "
                     f"({d.reforked} worker(s) re-forked for it in {d.refork_seconds*1e3:.1f} ms)")
    for name, n in d.out.items():
        w = d.out_written.get(name)
        written = f", {_fmt(w)} newly written during the run" if w is not None else ""
        lines.append(f"out    {name!r}: {_fmt(n)} shared buffer{written} (in place, nothing gathered)")
    lines.append(f"results gathered: {_fmt(d.bytes_results)}; sent to workers: {_fmt(d.bytes_setup)} setup + "
                 f"{_fmt(d.bytes_dispatch)} dispatch")
    lines.append(f"materialized (private copies of borrowed pages): {_fmt(materialized)}")
    return Report("copies", data, lines)


def cow_report(result: Any) -> Report:
    d = _diag(result)
    data = {"policy": d.cow_policy, "inputs": d.cow,
            "violations": sum(len(v["shards"]) for v in d.cow.values()) if d.cow_policy == "deny" else 0,
            "copies_triggered": sum(v["pages"] for v in d.cow.values())}
    lines = [f"policy {d.cow_policy!r}: " + ("no writes to borrowed inputs" if not d.cow else
                                              f"{len(d.cow)} input(s) written")]
    for name, v in d.cow.items():
        lines.append(f"  {name!r}: shards {v['shards'][:10]}{'...' if len(v['shards']) > 10 else ''}, "
                     f"{v['pages']} pages / {_fmt(v['bytes'])} privately copied, first byte {v['first_offset']}")
    return Report("copy-on-write", data, lines)


def worker_report(result: Any) -> Report:
    d = _diag(result)
    wall_ns = max(1, d.t_end_ns - d.t_start_ns)
    data = {}
    lines = ["worker  pids            shards  busy   deaths  recycles"]
    for slot, rec in sorted(d.workers.items()):
        data[str(slot)] = {**rec, "busy_fraction": rec["busy_ns"] / wall_ns}
        lines.append(f"{slot:>6}  {','.join(map(str, rec['pids']))[:14]:<14}  {rec['shards']:>6}  "
                     f"{100*rec['busy_ns']/wall_ns:4.0f}%  {rec['deaths']:>6}  {rec['recycles']:>8}")
    for e in d.events:
        lines.append(f"  {e['event']}: worker {e['worker']} pid {e['pid']}: {e['reason']}"
                     + (f" (shard {e['shard']})" if e.get("shard") is not None else ""))
    return Report("workers", {"workers": data, "events": d.events}, lines)


def segment_report() -> Report:
    """Live shardc segments of this process: backing, size, owner."""
    from .segment import live_segments
    segs = [s.info() for s in live_segments()]
    total = sum(s["size"] for s in segs)
    lines = [f"{len(segs)} live segments, {_fmt(total)}"]
    for s in segs:
        lines.append(f"  {s['name']:<40} {s['backing']:<6} {_fmt(s['size']):>10} "
                     f"{'owner' if s['owner'] else 'attached'}{' sealed' if s['sealed'] else ''}")
    return Report("segments", {"segments": segs, "total_bytes": total}, lines)


def recommendations(result: Any) -> Report:
    d = _diag(result)
    recs: list[str] = []
    t = task_report(result).data
    med = t.get("shard_seconds_median")
    if d.mode == "rpc_chunked" and med is not None and med < 0.02 and d.chunk_final < 16 and d.num_shards > 100:
        recs.append(f"shards take {med*1e3:.2f} ms (median) in rpc mode: raise chunk_size (e.g. "
                    f"{max(2, int(0.02 / max(med, 1e-6)))}), or use dispatch_mode='shm_queue' with out= buffers")
    for name, v in d.borrow.items():
        if v["bytes_copied"] > 64 * 1024**2:
            recs.append(f"borrow {name!r} was copied ({_fmt(v['bytes_copied'])}): call shardc.share() once and "
                        "pass the result to avoid the copy on every call")
    for name, v in d.cow.items():
        recs.append(f"shards wrote {_fmt(v['bytes'])} into borrowed input {name!r} (private copies): copy the "
                    "part you modify explicitly, or write results into an out= buffer")
    if d.retries:
        recs.append(f"{d.retries} retries happened: see result.failures and the workers report")
    recycles = sum(1 for e in d.events if e["event"] == "recycle")
    if recycles:
        recs.append(f"{recycles} worker recycles for memory: look for leaks in fun, or raise mem_cap")
    if d.returned_ignored:
        recs.append(f"{d.returned_ignored} shards returned a value that dispatch_mode='shm_queue' does not "
                    "gather: write results into out= buffers, or use rpc_chunked")
    if d.throttles:
        recs.append(f"{d.throttles} dispatches were throttled by max_huge_concurrency")
    if d.mode == "shm_queue" and d.num_shards > 10**6 and not d.block_size_opt:
        recs.append("over a million shards in shm_queue mode: a larger dispatch_opts block_size lowers overhead")
    return Report("recommendations", {"recommendations": recs}, [f"- {r}" for r in recs] or ["- none"])


def report(result: Any, level: str = "summary") -> Report:
    """A report on a run: level "summary", "workers", "tasks" or "segments"."""
    levels = ("summary", "workers", "tasks", "segments")
    if isinstance(result, str) and result in levels:
        raise TypeError("report() takes the result first: report(result, level=...)")
    if level not in levels:
        raise ValueError(f"level={level!r} is not one of {levels}")
    d = _diag(result)
    parts = [task_report(result), mem_report(result), copy_report(result), cow_report(result)]
    if level in ("workers", "tasks", "segments"):
        parts.append(worker_report(result))
    if level == "segments":
        parts.append(segment_report())
    parts.append(recommendations(result))
    head = (f"shard_map: {d.completed}/{d.num_shards} shards ok, {d.failed} failed, {d.wall_seconds:.3f} s, "
            f"{d.throughput():,.0f} shards/s ({d.mode})")
    rep = Report("shardc report", {"level": level, "summary": head}, [head], parts)
    rep.data["_result"] = result
    return rep


# --------------------------------------------------------------------------------------------
# the timeline picture
# --------------------------------------------------------------------------------------------


def plot_timeline(result: Any, path: Any = None, show: bool | None = None) -> Any:
    """Draw one row per worker (shards as bars coloured ok / retried / failed,
    deaths and recycles marked) and each worker's memory underneath.

    Args:
        path: save to this file (PNG, SVG, PDF by extension).
        show: display (default: only in a notebook).

    Returns:
        The matplotlib Figure.
    """
    try:
        import matplotlib
        if path is not None and "ipykernel" not in sys.modules:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("result.plot() needs matplotlib: pip install 'shardc[plot]'") from None
    d = _diag(result)
    t0 = d.t_start_ns
    fig, (ax, axm) = plt.subplots(2, 1, figsize=(10, 2 + 0.5 * max(1, len(d.workers)) + 2.5), sharex=True,
                                  gridspec_kw={"height_ratios": [max(1, len(d.workers)), 2]})
    colors = {1: "#4c9a2a", 2: "#e0a000", 3: "#c0392b"}
    if d.enabled and d.mode == "rpc_chunked":
        done = np.nonzero(d.shard_worker >= 0)[0]
        for code, color in colors.items():
            sel = done[d.shard_ok[done] == code]
            if len(sel):
                starts = (d.shard_t0[sel] - t0) * 1e-9
                widths = np.maximum((d.shard_t1[sel] - d.shard_t0[sel]) * 1e-9, 1e-6)
                ax.barh(d.shard_worker[sel], widths, left=starts, height=0.6, color=color, linewidth=0)
    for slot, start, count, b0, b1 in d.blocks:
        ax.barh(slot, max((b1 - b0) * 1e-9, 1e-6), left=(b0 - t0) * 1e-9, height=0.6, color=colors[1], linewidth=0)
    for e in d.events:
        x = (e["t"] - t0) * 1e-9
        mark = "x" if e["event"] == "death" else "o"
        color = "#c0392b" if e["event"] == "death" else "#2c6fbb"
        ax.plot([x], [e["worker"]], marker=mark, color=color, markersize=10, linestyle="none")
    ax.set_yticks(sorted(d.workers))
    ax.set_yticklabels([f"worker {s}" for s in sorted(d.workers)])
    ax.set_title(f"shard_map: {d.completed}/{d.num_shards} ok, {d.failed} failed, {d.wall_seconds:.2f} s "
                 f"({d.mode}); green ok, amber retried, red failed, x death, o recycle")
    for slot in sorted(d.workers):
        pts = [(t, anon, pss) for (t, s, _pid, _rss, pss, _uss, anon) in d.mem if s == slot]
        if pts:
            arr = np.array(pts, dtype=float)
            line, = axm.plot((arr[:, 0] - t0) * 1e-9, arr[:, 1] / 2**20, label=f"worker {slot} anon")
            axm.plot((arr[:, 0] - t0) * 1e-9, arr[:, 2] / 2**20, ":", color=line.get_color(),
                     label=f"worker {slot} PSS")
    if d.master_mem:
        arr = np.array(d.master_mem, dtype=float)
        axm.plot((arr[:, 0] - t0) * 1e-9, arr[:, 4] / 2**20, "k--", label="master anon")
    axm.set_ylabel("MiB")
    axm.set_xlabel("seconds since start")
    axm.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path))
    if show or (show is None and "ipykernel" in sys.modules):
        plt.show()
    else:
        plt.close(fig)
    return fig
