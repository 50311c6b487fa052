"""Collection: :class:`Diagnostics`, the record one run fills while it runs.

The master fills it during a ``shard_map`` call (never by asking workers
afterwards): per-shard timings and attempts (rpc mode; per block in
shm_queue mode), every failed attempt with its worker, memory samples of
every worker (RSS, PSS and USS from ``/proc/PID/smaps_rollup``, or the cheap
statm estimate) and of the master, deaths with their signal, recycles with
their reason, throttles, the autotune history, bytes sent to workers, and
what borrowing each input cost.

The record is plain data (ints, floats, strings, lists, dicts, NumPy
arrays): it pickles, and it holds no reference to the run, the pool, a
worker, a segment or ``fun``.  A live object a method needs (the pool to
sample workers, a worker handle to read its slot and pid, the call's
segments to measure out buffers) is passed to that method and never kept,
so a :class:`~shardc.ShardResult` pins nothing of the run that made it.

Reports live in :mod:`shardc.diagnostics.reports`, the progress bar in
:mod:`~shardc.diagnostics.progress`, the timeline in
:mod:`~shardc.diagnostics.plot`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from .. import _lowlevel as ll
from ..errors import signal_label
from . import master

# Shard outcomes in ``shard_ok``.
NOT_RUN, OK, OK_RETRIED, FAILED = 0, 1, 2, 3


def _allocated(seg: Any) -> int | None:
    """Bytes the kernel has allocated for a segment (st_blocks), None if unknown."""
    try:
        return os.fstat(seg.fd).st_blocks * 512
    except (OSError, AttributeError):
        return None


# The per-shard arrays: name -> (dtype, initial value).  shard_ok holds OK,
# OK_RETRIED, FAILED (NOT_RUN before); shard_mem_delta the anonymous-memory
# growth over each shard in bytes, measured only when shards average over
# 0.5 ms (NaN where not measured).
_PER_SHARD: dict[str, tuple[Any, Any]] = {
    "shard_worker": (np.int16, -1),
    "shard_t0": (np.int64, 0),
    "shard_t1": (np.int64, 0),
    "shard_attempts": (np.int16, 0),
    "shard_ok": (np.int8, NOT_RUN),
    "shard_mem_delta": (np.float64, np.nan),
}


def _per_shard_array(name: str) -> property:
    """A per-shard array of :class:`Diagnostics`, allocated on first access."""

    def get(self: Diagnostics) -> np.ndarray:
        if self._frames:  # frames not yet in the arrays: apply them first (keeps the order of writes)
            self._apply_frames()
        arr = self._per_shard.get(name)
        if arr is None:
            dtype, fill = _PER_SHARD[name]
            n = self._per_shard_n
            arr = np.zeros(n, dtype=dtype) if fill == 0 else np.full(n, fill, dtype=dtype)
            self._per_shard[name] = arr
        return arr

    return property(get, doc=f"``{name}``: one entry per shard (allocated on first access)")


PRECISE_SHARE = 0.005  # end-of-run precise samples: together at most this share of the run's wall time


class Diagnostics:
    """Everything one run measured (see module docstring).

    Args:
        mode: the dispatch mode ("rpc_chunked" or "shm_queue").
        num_shards: shards in the call.
        cow: the call's copy-on-write policy ("deny", "audit" or "allow").
        enabled: collect per-shard arrays (``shard_map(diagnostics=...)``);
            counters, events and memory samples are always collected.
        chunk_size: the chunk size the run starts with (1 under autotune).
    """

    def __init__(self, *, mode: str, num_shards: int, cow: str, enabled: bool = True, chunk_size: int = 1) -> None:
        self.mode = mode
        self.num_shards = int(num_shards)
        self.cow_policy = cow
        self.enabled = bool(enabled)
        self.chunk_size = int(chunk_size)
        # The per-shard arrays (see _PER_SHARD) are allocated when first
        # used: an shm_queue run (per-block records) of 20M shards without a
        # failure never touches them, and filling them cost its master 0.2-0.5 s.
        self._per_shard_n = self.num_shards if self.enabled else 0
        self._per_shard: dict[str, np.ndarray] = {}
        # rpc frames (frame_done) and single shards (shard_done: ~20 us of scalar stores
        # each) not yet in the per-shard arrays; the scheduler's attempts frames read then.
        self._frames: list[tuple[Any, ...]] = []
        self._attempts: np.ndarray | None = None
        self.blocks: list[tuple[int, int, int, int, int]] = []  # shm_queue: worker, start, count, t0, t1
        # shm_queue: worker, start, count, anonymous-memory growth over the block
        # (bytes); measured, like shard_mem_delta, only for blocks of long shards.
        self.block_mem: list[tuple[int, int, int, int]] = []
        # Worker samples: t, slot, pid, rss, pss, uss, anon, precise (1: smaps_rollup, 0: statm estimate).
        self.mem: list[tuple[int, int, int, int, int, int, int, int]] = []
        self.master_mem: list[tuple[int, int, int, int, int]] = []  # t, rss, pss, uss, anon
        self.master_precise = False  # any precise (smaps_rollup) sample of the master
        self.mem_sampler = ll.mem_sampler()  # what "pss"/"uss" mean here (see mem_report)
        self.events: list[dict[str, Any]] = []
        # Failed attempts: shard id -> one dict per failed attempt (attempt,
        # worker, error, final); kept whether or not ``enabled`` (failures are rare).
        self.attempt_log: dict[int, list[dict[str, Any]]] = {}
        self.autotune: list[dict[str, Any]] = []
        self.borrow: dict[str, dict[str, Any]] = {}
        self.out: dict[str, int] = {}
        self.cow: dict[str, dict[str, Any]] = {}
        self.retries = 0
        self.returned_ignored = 0  # shm_queue: shards whose return value was dropped
        self.reduce: dict[str, Any] = {}  # shard_reduce's own counts (groups, partials, combine steps, ...)
        self.error_logs: list[str] = []  # shm_queue error_log files
        self.throttles = 0
        self._out_alloc: dict[str, tuple[str, int | None]] = {}  # segment key -> (name, bytes allocated at start)
        self.out_written: dict[str, int] = {}
        self.bytes_setup = 0
        self.reforked = 0  # workers forked again so they inherit borrowed arrays
        self.refork_seconds = 0.0
        # How the run's workers were started: "fork" (forked by this process)
        # and/or "server" (by the fork server: inputs copied, not inherited).
        self.worker_start: list[str] = []
        self.bytes_dispatch = 0
        self.messages_dispatch = 0
        self.messages_results = 0  # rpc: RESULTS messages (a worker replies once per few chunks)
        self.bytes_results = 0
        self.tables: dict[str, int] = {}  # auto_table: parts, rows, bytes written / materialized
        self.wall_seconds = 0.0
        self.t_start_ns = 0
        self.t_end_ns = 0
        self.completed = 0
        self.failed = 0
        self.workers: dict[int, dict[str, Any]] = {}
        self.cluster: dict[str, Any] | None = None  # a cluster= run: nodes, macro-shards (shardc.cluster.base)
        # The master's CPU time from start() to finish() (this process, all
        # threads): with the wall time it tells whether the master loop was
        # saturated, i.e. whether workers waited for it.
        self.master_cpu_seconds = 0.0
        self._cpu0: float | None = None
        self._last_master = 0.0

    shard_worker = _per_shard_array("shard_worker")
    shard_t0 = _per_shard_array("shard_t0")
    shard_t1 = _per_shard_array("shard_t1")
    shard_attempts = _per_shard_array("shard_attempts")
    shard_ok = _per_shard_array("shard_ok")
    shard_mem_delta = _per_shard_array("shard_mem_delta")

    # -- collection -----------------------------------------------------------------------
    def start(self, pool: Any) -> None:
        """The run starts on ``pool``'s workers (not kept); :meth:`sample_start` follows."""
        self.t_start_ns = time.monotonic_ns()
        for w in pool.workers:
            self.worker_started(w)
        # The calling thread's CPU (it runs the call): the process clock sums
        # every thread's runtime (up to ~0.1 ms a read on a loaded 2-core VM).
        self._cpu0 = time.thread_time()

    def sample_start(self, pool: Any) -> None:
        """Memory at the start, once the first work is sent (the master waits then): cheap samples (a
        precise smaps_rollup of the master costs ms; precise ones follow during and after the run)."""
        for w in pool.workers:
            m = pool.fast_sample(w, max_age=0.05)  # an idle worker: the last call's end sample
            if m is not None:
                self.mem_sample(w, m, anon=pool.footprint(m, w))
        self._sample_master(precise=False, max_age=0.05)

    def worker_started(self, w: Any) -> None:
        """Worker handle ``w`` (slot, pid, baseline read; not kept) serves the run."""
        rec = self.workers.setdefault(
            w.slot, {"pids": [], "baseline": w.baseline, "shards": 0, "busy_ns": 0, "deaths": 0, "recycles": 0}
        )
        if w.pid not in rec["pids"]:
            rec["pids"].append(w.pid)
        how = "server" if getattr(w, "server", None) is not None else "fork"
        if how not in self.worker_start:
            self.worker_start.append(how)

    def finish(self, pool: Any, segments: Mapping[str, Any] | None = None) -> None:
        """The run is over: last samples of ``pool``'s workers and the master,
        and the out-buffer pages written, measured on ``segments`` (the
        call's segments by key; neither is kept)."""
        self.t_end_ns = time.monotonic_ns()
        if self._cpu0 is not None:
            self.master_cpu_seconds = time.thread_time() - self._cpu0
        self._measure_out_written(segments or {})
        run_s = (self.t_end_ns - self.t_start_ns) * 1e-9
        # The last samples are on the caller's critical path, and a precise one
        # (smaps_rollup) costs in proportion to what a process maps (~20 ms after
        # touching a 1 GiB input): taken while their learned costs fit in
        # PRECISE_SHARE of the run together (runs over 0.2 s, samples over 2 s
        # old); else a cheap statm sample on the last precise one's scale.
        budget = PRECISE_SHARE * run_s
        for w in pool.workers:
            if w.alive:
                precise = run_s > 0.2 and w.precise_cost <= budget
                m = pool.sample_cheap(w, max_age=2.0) if precise else None
                if m is not None:
                    budget -= w.precise_cost
                if m is None:
                    m = pool.fast_sample(w, max_age=0.01)  # the statm read sample_cheap just made
                if m is not None:
                    self.mem_sample(w, m, anon=pool.footprint(m, w))
        # The master: the same rule, runs of over 0.5 s only; shorter ones report the statm
        # estimate (an upper bound; the start's, if this call took under 10 ms).
        precise = run_s > 0.5 and master.cost[0] <= budget
        self._sample_master(precise=precise, max_age=0.0 if precise else 0.01)

    def _sample_master(self, precise: bool = True, max_age: float = 0.0) -> None:
        got = master.sample(precise, max_age)  # (a cheap one may be the last, if under max_age s old)
        if got is not None:
            t, m = got
            self.master_precise = self.master_precise or bool(m.get("precise", 1))
            self.master_mem.append((t, m["rss"], m["pss"], m["uss"], m["pss_anon"]))

    def tick(self) -> None:
        """The master loop's periodic tick: a cheap sample of the master every 0.5 s."""
        now = time.monotonic()
        if now - self._last_master > 0.5:
            # statm: a precise sample of a master holding a big array costs
            # milliseconds of CPU that the workers need on a full machine.
            self._last_master = now
            self._sample_master(precise=False)

    def add_out(self, name: str, nbytes: int, seg: Any = None) -> None:
        """Out buffer ``name`` of ``nbytes`` lives in ``seg`` (its allocation is read now, seg not kept)."""
        self.out[name] = nbytes
        if seg is not None and seg.key not in self._out_alloc:
            self._out_alloc[seg.key] = (name, _allocated(seg))

    def _measure_out_written(self, segments: Mapping[str, Any]) -> None:
        """Bytes of out segments allocated during the run: the pages workers
        wrote for the first time (shared memory is allocated on first write;
        rewriting an already written page is not counted)."""
        for key, (name, before) in self._out_alloc.items():
            seg = segments.get(key)
            after = _allocated(seg) if seg is not None else None
            if after is not None and before is not None:
                self.out_written[name] = self.out_written.get(name, 0) + max(0, after - before)

    def add_borrow(self, name: str, how: str, nbytes: int, copied: int, seconds: float, kind: str) -> None:
        self.borrow[name] = {"how": how, "bytes": nbytes, "bytes_copied": copied, "seconds": seconds, "kind": kind}

    def dispatched(self, nbytes: int, nmessages: int) -> None:
        self.bytes_dispatch += nbytes
        self.messages_dispatch += nmessages

    def shard_done(
        self, sid: int, slot: int, t0: int, t1: int, ok: bool, attempts: int, mem_delta: int | None = None
    ) -> None:
        self._frames.append((slot, sid, t0, t1, ok, attempts, mem_delta))
        self._busy(slot, 1, t0, t1, t1 - t0)

    def batch_done(self, slot: int, results: list[tuple], attempts: np.ndarray) -> None:
        """Record a results message's shards: a few as records, more with array
        stores (one per column, not per shard: the master's hot loop)."""
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
        self.shard_ok[sids] = np.where(oks, np.where(att == 0, OK, OK_RETRIED), NOT_RUN)
        if any(r[6] is not None for r in results):
            for r in results:
                if r[6] is not None:
                    self.shard_mem_delta[r[0]] = r[6]
        self._busy(slot, n, int(t0.min()), int(t1.max()), int((t1 - t0).sum()))

    def frame_done(self, slot: int, start: int, count: int, t0: int, t1: int, attempts: np.ndarray) -> None:
        """An rpc frame (``shardc.protocol.FRAME``): shards ``start`` ..
        ``start + count - 1`` all succeeded on ``slot`` between ``t0`` and
        ``t1``.  Recorded as it is and written into the per-shard arrays
        only when one of them is next read (``_apply_frames``): slice
        stores per frame cost the master ~0.1 us a shard, a tenth of a
        tiny call, for arrays most calls never read.  A frame's shards are
        done, so their ``attempts`` do not change until then."""
        self._frames.append((slot, start, count, t0, t1))
        self._attempts = attempts
        self._busy(slot, count, t0, t1, t1 - t0)

    def _busy(self, slot: int, n: int, t0: int, t1: int, busy: int) -> None:
        """Worker ``slot`` ran ``n`` shards between ``t0`` and ``t1`` (ns), ``busy`` ns of it:
        its shards, busy time and span (first start, last end: ``diagnostics.lanes.worker_spans``)."""
        rec = self.workers.get(slot)
        if rec is not None:
            rec["shards"] += n
            rec["busy_ns"] += busy
            span = rec.get("span")
            rec["span"] = (min(span[0], t0), max(span[1], t1)) if span else (t0, t1)

    def _apply_frames(self) -> None:
        """Write the recorded frames into the per-shard arrays, in order;
        each shard gets an equal part of its frame's time (a frame carries
        no per-shard times: its shards are short)."""
        frames, self._frames = self._frames, []
        attempts = self._attempts
        worker, st0, st1 = self.shard_worker, self.shard_t0, self.shard_t1
        satt, sok = self.shard_attempts, self.shard_ok
        for fr in frames:
            if len(fr) == 7:  # one shard (shard_done)
                slot, sid, t0, t1, ok, att1, dmem = fr
                if dmem is not None:
                    self.shard_mem_delta[sid] = dmem
                worker[sid], st0[sid], st1[sid], satt[sid] = slot, t0, t1, att1 + 1
                sok[sid] = (OK if att1 == 0 else OK_RETRIED) if ok else NOT_RUN
                continue
            slot, start, count, t0, t1 = fr
            b = start + count
            step = (t1 - t0) // count
            if step > 0:
                t = np.arange(t0, t0 + step * count + 1, step, dtype=np.int64)
            else:
                t = np.full(count + 1, t0, np.int64)
            assert attempts is not None
            att = attempts[start:b]
            worker[start:b] = slot
            st0[start:b] = t[:count]
            st1[start:b] = t[1 : count + 1]
            satt[start:b] = att + 1
            sok[start:b] = np.where(att == 0, OK, OK_RETRIED)

    def block_done(self, slot: int, start: int, count: int, t0: int, t1: int) -> None:
        self.blocks.append((slot, start, count, t0, t1))
        self._busy(slot, count, t0, t1, t1 - t0)

    def block_mem_delta(self, slot: int, start: int, count: int, delta: int) -> None:
        """shm_queue: worker ``slot``'s memory grew by ``delta`` bytes over the
        block of ``count`` shards from ``start`` (a one-shard block's is that
        shard's own delta)."""
        if not self.enabled:
            return
        self.block_mem.append((slot, start, count, delta))
        if count == 1:
            self.shard_mem_delta[start] = delta

    def shard_failed(self, sid: int) -> None:
        if self.enabled:
            self.shard_ok[sid] = FAILED

    def attempt_failed(self, sid: int, worker: int | None, attempt: int, err: Mapping[str, Any], final: bool) -> None:
        """Attempt ``attempt`` of shard ``sid`` failed on worker slot ``worker``
        (None if unknown) with error record ``err``; ``final``: no retry follows."""
        self.attempt_log.setdefault(int(sid), []).append(
            {
                "attempt": int(attempt),
                "worker": None if worker is None else int(worker),
                "error": str(err.get("type", "?")).rsplit(".", 1)[-1],
                "message": str(err.get("message", ""))[:200],
                "final": bool(final),
            }
        )
        if final:
            self.shard_failed(sid)
        else:
            self.retries += 1

    def cow_events(self, sid: int, events: list[dict[str, Any]]) -> None:
        for e in events:
            name = e.get("input", "?")
            rec = self.cow.setdefault(
                name,
                {"shards": [], "pages": 0, "bytes": 0, "first_offset": None, "mode": e.get("mode", self.cow_policy)},
            )
            rec["shards"].append(sid)
            rec["pages"] += int(e.get("pages", 0))
            rec["bytes"] += int(e.get("bytes", 0))
            if rec["first_offset"] is None:
                rec["first_offset"] = e.get("first_offset")

    def mem_sample(self, w: Any, m: Mapping[str, int], anon: int) -> None:
        """A memory sample ``m`` of worker ``w``; ``anon`` is the worker's own
        memory (``Pool.footprint``: Pss_Anon less its share of borrowed arrays
        it inherited at fork, which are shared with the master)."""
        precise = int(bool(m.get("precise", 1)))
        # A cheap (statm) sample has no USS of its own: its estimate is the
        # worker's own anonymous memory.
        uss = m["uss"] if precise else anon
        self.mem.append((time.monotonic_ns(), w.slot, w.pid, m["rss"], m["pss"], uss, anon, precise))

    def event(self, kind: str, w: Any, reason: str, code: int | None = None, shard: int | None = None) -> None:
        self.events.append(
            {
                "t": time.monotonic_ns(),
                "event": kind,
                "worker": w.slot,
                "pid": w.pid,
                "reason": reason,
                "signal": signal_label(code) if code is not None else None,
                "shard": shard,
            }
        )
        rec = self.workers.get(w.slot)
        if rec is not None:
            if kind == "death":
                rec["deaths"] += 1
            elif kind == "recycle":
                rec["recycles"] += 1

    def throttle(self, slot: int, n: int) -> None:
        self.throttles += 1

    def autotune_step(self, old: int, new: int, shard_seconds: float) -> None:
        self.autotune.append(
            {"t": time.monotonic_ns(), "chunk_from": old, "chunk_to": new, "shard_seconds": shard_seconds}
        )

    # -- derived --------------------------------------------------------------------------
    @property
    def chunk_size_final(self) -> int:
        """The chunk (rpc) or block (shm_queue) size at the end: the last autotune step's, else the first."""
        return int(self.autotune[-1]["chunk_to"]) if self.autotune else self.chunk_size

    def throughput(self) -> float:
        return self.completed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def retried_shards(self) -> list[dict[str, Any]]:
        """Every shard with a failed attempt, by id: attempts, outcome, the
        worker of each attempt (None where unknown) and the last error."""
        out = []
        for sid in sorted(self.attempt_log):
            log = self.attempt_log[sid]
            failed = log[-1]["final"]
            workers = [a["worker"] for a in log]
            if not failed:
                workers.append(self._last_worker(sid))
            out.append(
                {
                    "shard": sid,
                    "attempts": len(log) + (0 if failed else 1),
                    "outcome": "failed" if failed else "ok",
                    "workers": workers,
                    "last_error": f"{log[-1]['error']}: {log[-1]['message']}",
                }
            )
        return out

    def _last_worker(self, sid: int) -> int | None:
        """The worker that ran ``sid``'s last attempt, if recorded."""
        if self.enabled and self.mode == "rpc_chunked" and self.shard_worker[sid] >= 0:
            return int(self.shard_worker[sid])
        last = None
        for slot, start, count, _t0, t1 in self.blocks:
            if start <= sid < start + count and (last is None or t1 > last[1]):
                last = (slot, t1)
        return None if last is None else int(last[0])

    def worker_memory(self) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for _t, slot, _pid, rss, pss, uss, anon, _precise in self.mem:
            rec = out.setdefault(
                slot,
                {
                    "peak_rss": 0,
                    "peak_pss": 0,
                    "peak_uss": 0,
                    "peak_anon": 0,
                    "end_rss": 0,
                    "end_pss": 0,
                    "end_uss": 0,
                    "end_anon": 0,
                    "samples": 0,
                },
            )
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
            "mode": self.mode,
            "num_shards": self.num_shards,
            "completed": self.completed,
            "failed": self.failed,
            "retries": self.retries,
            "wall_seconds": self.wall_seconds,
            "throughput": self.throughput(),
            "chunk_size": self.chunk_size,
            "chunk_size_final": self.chunk_size_final,
            "autotune": self.autotune,
            "throttles": self.throttles,
            "bytes_setup": self.bytes_setup,
            "reforked_workers": self.reforked,
            "refork_seconds": self.refork_seconds,
            "bytes_dispatch": self.bytes_dispatch,
            "messages_dispatch": self.messages_dispatch,
            "bytes_per_dispatch": self.bytes_dispatch / max(1, self.messages_dispatch),
            "bytes_results": self.bytes_results,
            "messages_results": self.messages_results,
            "master_cpu_seconds": self.master_cpu_seconds,
            "borrow": self.borrow,
            "out": self.out,
            "returned_ignored": self.returned_ignored,
            # shm_queue: blocks whose memory growth was measured, and the largest growth (bytes)
            "block_mem_measured": len(self.block_mem),
            "block_mem_max_delta": max((b[3] for b in self.block_mem), default=None),
            "error_logs": self.error_logs,
            "cow": self.cow,
            "cow_policy": self.cow_policy,
            "events": self.events,
            "workers": workers,
            "retried_shards": self.retried_shards(),
            "master_peak_rss": max((m[1] for m in self.master_mem), default=0),
            "master_peak_uss": max((m[3] for m in self.master_mem), default=0),
            "master_peak_anon": max((m[4] for m in self.master_mem), default=0),
            "cluster": self.cluster,
        }

    def __repr__(self) -> str:
        return (
            f"<Diagnostics {self.mode} {self.completed}/{self.num_shards} ok, {self.failed} failed, "
            f"{self.retries} retries, {self.wall_seconds:.3f} s>"
        )
