"""Advice from measurements: the dispatch overhead and the recommendations.

Dispatch overhead is measured from what the run collected, not guessed from
the shard time.  Each worker runs its units (shards in rpc mode, blocks in
shm_queue mode) one after the other, so the time between the end of one
unit and the start of the next on the same worker is what dispatch cost
that worker: receiving the chunk, sending results back, waiting for the
master.  In rpc mode a chunk boundary costs more than the step between two
shards of one chunk; with ``M`` chunks sent, the ``M`` largest gaps are
taken as chunk boundaries, the rest as steps inside chunks.  Medians, not
means: a worker preempted by another process for a few milliseconds is not
a dispatch cost, and bigger chunks would not remove it.

A larger chunk divides the per-chunk part only: going from ``k`` to ``k'``
shards per chunk saves ``(1 - k/k')`` of it.  That saving, as a share of
the workers' time, is the expected gain the advice states; under
:data:`MIN_GAIN` there is no advice.
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


def _units(d: Diagnostics) -> tuple[list[tuple[int, np.ndarray, np.ndarray, np.ndarray]], int] | None:
    """Per worker slot: (slot, t0, t1, shards) of its units in start order, and
    the number of dispatch messages (chunks or blocks) they came in."""
    if d.mode == "rpc_chunked" and d.enabled:
        ran = np.nonzero(d.shard_ok != NOT_RUN)[0]
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
        ``overhead_share`` (chunk costs over all worker time), ``busy_seconds``
        and ``gap_seconds`` (summed over workers), and ``messages``.
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
    shard_s = float(np.median(np.concatenate(durations))) * 1e-9 if durations else 0.0
    boundaries = min(n_gaps, max(0, messages - sequences))
    if d.mode == "shm_queue":
        boundaries = n_gaps  # every gap is a claim of the next block
    inside = gaps[:n_gaps - boundaries]
    step = float(np.median(inside)) if len(inside) else 0.0
    edge = float(np.median(gaps[n_gaps - boundaries:])) if boundaries else 0.0
    chunk_cost = max(0.0, edge - step)
    total = busy + int(gaps.sum())
    per_chunk = n_shards / max(1, messages)
    return {"chunk_cost_seconds": chunk_cost * 1e-9, "step_cost_seconds": step * 1e-9,
            "shard_seconds": shard_s, "shards_per_chunk": per_chunk,
            "overhead_share": chunk_cost * boundaries / total if total else 0.0,
            "busy_seconds": busy * 1e-9, "gap_seconds": int(gaps.sum()) * 1e-9, "messages": messages,
            "workers": len(per_worker)}


def chunk_advice(d: Diagnostics) -> dict[str, Any] | None:
    """A larger chunk (rpc) or block (shm_queue) size and the share of worker
    time it is expected to save, or None when that is under :data:`MIN_GAIN`."""
    o = dispatch_overhead(d)
    if o is None or o["overhead_share"] <= 0 or o["shard_seconds"] <= 0:
        return None
    k = max(1.0, o["shards_per_chunk"])
    want = math.ceil(o["chunk_cost_seconds"] / (TARGET_SHARE * o["shard_seconds"]))
    # Keep about 4 chunks per worker for balance, as autotune does.
    cap = max(1, d.num_shards // (4 * max(1, o["workers"])))
    want = int(min(want, cap, MAX_CHUNK))
    if want <= k:
        return None
    gain = o["overhead_share"] * (1 - k / want)
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
        cost = (f"dispatch costs {adv['chunk_cost_seconds'] * 1e6:.0f} us per "
                f"{'chunk' if d.mode == 'rpc_chunked' else 'block'} of {adv['shards_per_chunk']:.1f} shard(s) "
                f"(shards take {adv['shard_seconds'] * 1e3:.3f} ms, median): {adv['overhead_share']:.0%} of "
                f"the workers' time")
        gain = f"expected gain about {adv['gain']:.0%} of worker time (~{adv['gain'] * wall:.2f} s of {wall:.2f} s)"
        if d.mode == "rpc_chunked":
            alt = (", or dispatch_mode='shm_queue' with out= buffers (no message per chunk)"
                   if adv["shard_seconds"] < 1e-3 else "")
            recs.append(f"{cost}; chunk_size={adv['advised']} would cut it, {gain}{alt}")
        else:
            recs.append(f"{cost}; dispatch_opts={{'block_size': {adv['advised']}}} would cut it, {gain}")
    for name, v in d.borrow.items():
        if v["bytes_copied"] > 64 * 1024**2:
            recs.append(f"borrow {name!r} was copied ({fmt_bytes(v['bytes_copied'])}): call shardc.share() once "
                        "and pass the result to avoid the copy on every call")
    for name, v in d.cow.items():
        recs.append(f"shards wrote {fmt_bytes(v['bytes'])} into borrowed input {name!r} (private copies): copy "
                    "the part you modify explicitly, or write results into an out= buffer")
    if d.retries:
        recs.append(f"{d.retries} retries happened: see the tasks report, result.failures and the workers report")
    recycles = sum(1 for e in d.events if e["event"] == "recycle")
    if recycles:
        recs.append(f"{recycles} worker recycles for memory: look for leaks in fun, or raise mem_cap")
    if d.returned_ignored:
        recs.append(f"{d.returned_ignored} shards returned a value that dispatch_mode='shm_queue' does not "
                    "gather: write results into out= buffers, or use rpc_chunked")
    if d.throttles:
        recs.append(f"{d.throttles} dispatches were throttled by max_huge_concurrency")
    return Report("recommendations", {"recommendations": recs, **data}, [f"- {r}" for r in recs] or ["- none"])
