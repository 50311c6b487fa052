"""Advice from measurements: the dispatch overhead and the recommendations.

Dispatch overhead is measured from what the run collected, not guessed from
the shard time.  Each worker runs its units (shards in rpc mode, blocks in
shm_queue mode) one after the other, so the time between the end of one
unit and the start of the next on the same worker is what dispatch cost
that worker: reading the chunk, sending results back, waiting for the
master.  In rpc mode a chunk boundary costs more than the step between two
shards of one chunk; with ``M`` chunks sent, the ``M`` largest gaps are
taken as chunk boundaries, the rest as steps inside chunks.

Typical values, not sums: the per-chunk cost ``C`` is the median boundary
gap less the median step, the shard time ``s`` the median shard.  On a
loaded machine a worker descheduled for a few milliseconds in a gap is not
a dispatch cost (bigger chunks would not remove it), and the median is not
moved by it.  (The total time in gaps, ``gap_seconds``, is reported too.)

One chunk of ``k`` shards then takes ``C + k*s + (k-1)*step`` on a worker;
the overhead share is ``C`` over that.  Going from ``k`` to ``k'`` shards per
chunk changes the worker time per shard from ``T(k)`` to ``T(k')``: the
expected gain is ``1 - T(k')/T(k)``, and under :data:`MIN_GAIN` there is no
advice.  ``k'`` is the chunk whose boundary costs :data:`TARGET_SHARE` of its
work, capped so that every worker still gets about four chunks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..units import fmt_bytes
from .base import Report, diag_of
from .collect import NOT_RUN, Diagnostics

MIN_GAIN = 0.03  # advise a larger chunk only when it saves at least this share of worker time
TARGET_SHARE = 0.01  # size the advised chunk so the per-chunk cost is about 1% of its work
MAX_CHUNK = 1 << 16  # rpc's largest chunk (scheduler cap)


def fmt_seconds(t: float) -> str:
    """A duration for people: "850 ns", "3.2 us", "12.5 ms", "1.50 s"."""
    if t < 1e-6:
        return f"{t * 1e9:.0f} ns"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def _units(d: Diagnostics) -> tuple[list[tuple[int, np.ndarray, np.ndarray, np.ndarray]], int] | None:
    """Per worker slot: (slot, t0, t1, shards) of its units in start order, and
    the number of dispatch messages (chunks or blocks) they came in."""
    if d.mode == "rpc_chunked" and d.enabled:
        # Shards with timings: a shard whose every attempt crashed has none.
        ran = np.nonzero((d.shard_ok != NOT_RUN) & (d.shard_worker >= 0) & (d.shard_t1 > 0))[0]
        if len(ran) == 0:
            return None
        slots = d.shard_worker[ran]
        out = []
        for slot in np.unique(slots):
            sel = ran[slots == slot]
            order = np.argsort(d.shard_t0[sel], kind="stable")
            sel = sel[order]
            out.append((int(slot), d.shard_t0[sel], d.shard_t1[sel], np.ones(len(sel), dtype=np.int64)))
        return out, d.messages_dispatch
    if d.mode == "shm_queue" and d.blocks:
        arr = np.array([(s, c, t0, t1) for s, _start, c, t0, t1 in d.blocks], dtype=np.int64)
        out = []
        for slot in np.unique(arr[:, 0]):
            b = arr[arr[:, 0] == slot]
            b = b[np.argsort(b[:, 2], kind="stable")]
            out.append((int(slot), b[:, 2], b[:, 3], b[:, 1]))
        return out, len(d.blocks)
    return None


def dispatch_overhead(d: Diagnostics) -> dict[str, Any] | None:
    """The measured dispatch overhead of a run (see module docstring), or
    None when the run kept no per-shard or per-block timings.

    Returns:
        ``chunk_cost_seconds`` (typical cost of one chunk/block boundary on a
        worker), ``step_cost_seconds`` (between two shards of one chunk),
        ``shard_seconds`` (median), ``shards_per_chunk`` (mean),
        ``overhead_share`` (the chunk cost over a typical chunk's time on a
        worker), ``busy_seconds`` and ``gap_seconds`` (summed over workers),
        ``gap_share`` (all gaps over busy + gaps, preemption included),
        ``messages`` and ``workers``.
    """
    got = _units(d)
    if got is None:
        return None
    per_worker, messages = got
    # Events split a worker's sequence: a gap over a death or recycle is the
    # replacement's fork, not dispatch; each split starts a new sequence.
    cuts: dict[int, list[int]] = {}
    for e in d.events:
        cuts.setdefault(e["worker"], []).append(e["t"])
    gaps_all, durations = [], []
    busy = n_shards = sequences = 0
    for slot, t0, t1, count in per_worker:
        busy += int((t1 - t0).sum())
        n_shards += int(count.sum())
        durations.append((t1 - t0) / np.maximum(count, 1))
        sequences += 1
        if len(t0) < 2:
            continue
        g = np.maximum(t0[1:] - t1[:-1], 0)
        keep = np.ones(len(g), dtype=bool)
        for e_t in cuts.get(slot, ()):
            over = (t1[:-1] <= e_t) & (e_t <= t0[1:])
            sequences += int(over.any())
            keep &= ~over
        gaps_all.append(g[keep])
    gaps = np.sort(np.concatenate(gaps_all)) if gaps_all else np.zeros(0, dtype=np.int64)
    n_gaps = len(gaps)
    shard = float(np.median(np.concatenate(durations))) if durations else 0.0
    # Sequences of units on one worker: their first unit has no gap before it.
    # An rpc worker runs the chunks queued behind the first in one go and
    # replies once for them, so the boundaries that cost are its replies (each
    # a wait for the master); their cost is spread over the chunks they carried.
    replies = getattr(d, "messages_results", 0)
    units = replies if d.mode == "rpc_chunked" and replies else messages
    boundaries = n_gaps if d.mode == "shm_queue" else min(n_gaps, max(0, units - sequences))
    inside = gaps[: n_gaps - boundaries]
    step = float(np.median(inside)) if len(inside) else 0.0
    edge = float(np.median(gaps[n_gaps - boundaries :])) if boundaries else 0.0
    chunk_cost = max(0.0, edge - step)
    if d.mode == "rpc_chunked" and boundaries and messages > units:
        chunk_cost *= boundaries / max(1, messages - sequences)
    k = max(1.0, n_shards / max(1, messages))
    cycle = chunk_cost + k * shard + (k - 1) * step
    gap_total = int(gaps.sum())
    return {
        "chunk_cost_seconds": chunk_cost * 1e-9,
        "step_cost_seconds": step * 1e-9,
        "shard_seconds": shard * 1e-9,
        "shards_per_chunk": k,
        "overhead_share": chunk_cost / cycle if cycle > 0 else 0.0,
        "busy_seconds": busy * 1e-9,
        "gap_seconds": gap_total * 1e-9,
        "gap_share": gap_total / (busy + gap_total) if busy + gap_total else 0.0,
        "messages": messages,
        "workers": len(per_worker),
    }


def _per_shard(o: dict[str, Any], k: float) -> float:
    """Worker time per shard with chunks of ``k`` shards (see module docstring)."""
    return (o["chunk_cost_seconds"] + k * o["shard_seconds"] + (k - 1) * o["step_cost_seconds"]) / k


def chunk_advice(d: Diagnostics) -> dict[str, Any] | None:
    """A larger chunk (rpc) or block (shm_queue) size and the share of worker
    time per shard it is expected to save, or None when that is under :data:`MIN_GAIN`."""
    o = dispatch_overhead(d)
    if o is None or o["chunk_cost_seconds"] <= 0 or o["shard_seconds"] <= 0:
        return None
    k = o["shards_per_chunk"]
    want = math.ceil(o["chunk_cost_seconds"] / (TARGET_SHARE * o["shard_seconds"]))
    # Keep about 4 chunks per worker for balance, as autotune does.
    cap = max(1, d.num_shards // (4 * max(1, o["workers"])))
    want = int(min(want, cap, MAX_CHUNK))
    if want <= k:
        return None
    gain = 1 - _per_shard(o, want) / _per_shard(o, k)
    if gain < MIN_GAIN:
        return None
    return {**o, "advised": want, "gain": gain}


def recommendations(result: Any) -> Report:
    """What to change for the next run, each from this run's measurements."""
    d = diag_of(result)
    recs: list[str] = []
    adv = chunk_advice(d)
    data: dict[str, Any] = {}
    if adv is not None:
        data["chunk_advice"] = adv
        wall = d.wall_seconds
        cost = (
            f"dispatch costs {fmt_seconds(adv['chunk_cost_seconds'])} per "
            f"{'chunk' if d.mode == 'rpc_chunked' else 'block'} of {adv['shards_per_chunk']:.1f} shard(s) "
            f"(shards take {fmt_seconds(adv['shard_seconds'])}, median): {adv['overhead_share']:.0%} of "
            f"a chunk's time on a worker"
        )
        gain = (
            f"expected gain about {adv['gain']:.0%} of the workers' time per shard "
            f"(~{adv['gain'] * wall:.2f} s of this run's {wall:.2f} s)"
        )
        if d.mode == "rpc_chunked":
            alt = (
                ", or dispatch_mode='shm_queue' with out= buffers (no message per chunk)"
                if adv["shard_seconds"] < 1e-3
                else ""
            )
            recs.append(f"{cost}; chunk_size={adv['advised']} would cut it, {gain}{alt}")
        else:
            recs.append(f"{cost}; dispatch_opts={{'block_size': {adv['advised']}}} would cut it, {gain}")
    for name, v in d.borrow.items():
        if v["bytes_copied"] > 64 * 1024**2:
            recs.append(
                f"borrow {name!r} was copied ({fmt_bytes(v['bytes_copied'])}): call shardc.share() once "
                "and pass the result to avoid the copy on every call"
            )
    for name, v in d.cow.items():
        recs.append(
            f"shards wrote {fmt_bytes(v['bytes'])} into borrowed input {name!r} (private copies): copy "
            "the part you modify explicitly, or write results into an out= buffer"
        )
    if d.retries:
        recs.append(f"{d.retries} retries happened: see the tasks report, result.failures and the workers report")
    recycles = sum(1 for e in d.events if e["event"] == "recycle")
    if recycles:
        recs.append(f"{recycles} worker recycles for memory: look for leaks in fun, or raise mem_cap")
    if d.returned_ignored:
        recs.append(
            f"{d.returned_ignored} shards returned a value that dispatch_mode='shm_queue' does not "
            "gather: write results into out= buffers, or use rpc_chunked"
        )
    if d.throttles:
        recs.append(f"{d.throttles} dispatches were throttled by max_huge_concurrency")
    return Report("recommendations", {"recommendations": recs, **data}, [f"- {r}" for r in recs] or ["- none"])
