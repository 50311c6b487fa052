"""Reports on a finished run, each a :class:`~shardc.diagnostics.base.Report`
(``to_dict()`` for JSON, ``str()`` to read): tasks, memory, copies,
copy-on-write, workers, live segments, and :func:`report` which joins them
with the recommendations.  They read the run's
:class:`~shardc.diagnostics.collect.Diagnostics` only (a pickled result
gives the same reports in another process), except
:func:`segment_report`, which lists this process's live segments."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError
from ..segment import live_segments
from ..units import fmt_bytes
from .advice import dispatch_overhead, fmt_seconds, recommendations
from .base import Report, diag_of
from .cluster import cluster_report
from .collect import NOT_RUN

RETRIED_LINES = 20  # retried or failed shards listed in the text (to_dict() has them all)


def _retried_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per retried or failed shard, the first :data:`RETRIED_LINES` of them."""
    if not rows:
        return []
    failed = sum(1 for r in rows if r["outcome"] == "failed")
    lines = [
        (
            f"retried     {len(rows)} shard(s) had a failed attempt ({len(rows) - failed} ok in the end, "
            f"{failed} failed):"
        )
    ]
    for r in rows[:RETRIED_LINES]:
        workers = ", ".join("?" if w is None else str(w) for w in r["workers"])
        lines.append(
            f"  shard {r['shard']}: {r['attempts']} attempt(s), {r['outcome']}, worker(s) {workers}; "
            f"last error {r['last_error'][:100]}"
        )
    if len(rows) > RETRIED_LINES:
        lines.append(f"  ... and {len(rows) - RETRIED_LINES} more (all in to_dict()['retried_shards'])")
    return lines


def task_report(result: Any) -> Report:
    """Shards, retries (which shard, how many attempts, on which worker), wall time, dispatch, per-shard times."""
    d = diag_of(result)
    retried = d.retried_shards()
    data: dict[str, Any] = {
        "shards_total": d.num_shards,
        "shards_completed": d.completed,
        "shards_failed": d.failed,
        "retries": d.retries,
        "wall_seconds": round(d.wall_seconds, 6),
        "throughput": d.throughput(),
        "dispatch_mode": d.mode,
        "chunk_size_final": d.chunk_size_final,
        "autotune_steps": len(d.autotune),
        "throttle_events": d.throttles,
        "messages_dispatched": d.messages_dispatch,
        "bytes_dispatched": d.bytes_dispatch,
        "bytes_per_dispatch": round(d.bytes_dispatch / max(1, d.messages_dispatch), 1),
        "bytes_setup": d.bytes_setup,
        "retried_shards": retried,
    }
    if d.enabled and d.mode == "rpc_chunked":
        ok = d.shard_ok > NOT_RUN
        if ok.any():
            wall = (d.shard_t1[ok] - d.shard_t0[ok]) * 1e-9
            data.update(
                shard_seconds_median=float(np.median(wall)),
                shard_seconds_p99=float(np.percentile(wall, 99)),
                shard_seconds_max=float(wall.max()),
            )
            dm = d.shard_mem_delta[ok]
            if np.isfinite(dm).any():
                k = int(np.nanargmax(dm))
                data.update(
                    shard_mem_delta_max=float(np.nanmax(dm)), shard_mem_delta_max_shard=int(np.nonzero(ok)[0][k])
                )
    o = dispatch_overhead(d)
    if o is not None:
        data["dispatch_overhead"] = o
    lines = [
        f"shards      {d.completed}/{d.num_shards} ok, {d.failed} failed, {d.retries} retries",
        f"wall        {d.wall_seconds:.3f} s  ({d.throughput():,.0f} shards/s, {d.mode})",
        (
            f"dispatch    {d.messages_dispatch} messages, {data['bytes_per_dispatch']:.0f} B each, "
            f"setup {fmt_bytes(d.bytes_setup)}"
        ),
    ]
    if o is not None:
        lines.append(
            f"overhead    {fmt_seconds(o['chunk_cost_seconds'])} per "
            f"{'chunk' if d.mode == 'rpc_chunked' else 'block'} of {o['shards_per_chunk']:.1f} shard(s) "
            f"on a worker ({o['overhead_share']:.1%} of a chunk's time, median); "
            f"{o['gap_share']:.1%} of worker time between units"
        )
    if "shard_seconds_median" in data:
        lines.append(
            f"per shard   median {data['shard_seconds_median'] * 1e3:.3f} ms, p99 "
            f"{data['shard_seconds_p99'] * 1e3:.3f} ms, max {data['shard_seconds_max'] * 1e3:.3f} ms"
        )
    if "shard_mem_delta_max" in data:
        lines.append(
            f"memory      largest growth over one shard: {fmt_bytes(data['shard_mem_delta_max'])} "
            f"(shard {data['shard_mem_delta_max_shard']})"
        )
    if d.autotune:
        lines.append(
            f"autotune    chunk {d.autotune[0]['chunk_from']} -> {d.chunk_size_final} in {len(d.autotune)} steps"
        )
    lines += _retried_lines(retried)
    return Report("tasks", data, lines)


# What the pss/uss columns hold where the platform has no PSS/USS (mem_sampler).
_SAMPLER_NOTES = {
    "footprint": "macOS has neither; the pss and uss columns repeat the physical footprint, "
    "which counts the worker's own memory and not the shared inputs it maps",
    "psutil": "the psutil sampler (portable mode, or a platform without a native one) "
    "estimates them as RSS less its shared part",
}


def mem_report(result: Any) -> Report:
    """Peak and end memory of every worker (RSS, PSS, USS, own anonymous memory) and of the master."""
    d = diag_of(result)
    mem = d.worker_memory()
    master_rss = max((m[1] for m in d.master_mem), default=0)
    master_uss = max((m[3] for m in d.master_mem), default=0)
    data = {
        "workers": {str(k): v for k, v in mem.items()},
        "peak_worker_anon": max((v["peak_anon"] for v in mem.values()), default=0),
        "peak_worker_uss": max((v["peak_uss"] for v in mem.values()), default=0),
        "peak_worker_rss": max((v["peak_rss"] for v in mem.values()), default=0),
        "sum_peak_pss": sum(v["peak_pss"] for v in mem.values()),
        "master_peak_rss": master_rss,
        "master_peak_uss": master_uss,
        "samples": len(d.mem),
        "sampler": getattr(d, "mem_sampler", "smaps_rollup"),
    }
    lines = [
        "worker  peak rss    peak pss    peak uss    peak anon   end anon    baseline anon",
        "        (rss/pss/uss include pages of shared inputs; anon is the worker's own memory)",
    ]
    for k, v in sorted(mem.items()):
        lines.append(
            f"{k:>6}  {fmt_bytes(v['peak_rss']):>10}  {fmt_bytes(v['peak_pss']):>10}  "
            f"{fmt_bytes(v['peak_uss']):>10}  {fmt_bytes(v['peak_anon']):>10}  "
            f"{fmt_bytes(v['end_anon']):>10}  {fmt_bytes(v['baseline']):>10}"
        )
    note = _SAMPLER_NOTES.get(data["sampler"])
    if note:
        lines.append(f"        note: PSS and USS are not available on this platform: {note}")
    est = "" if d.master_precise else " (statm estimate, an upper bound: run < 0.5 s)"
    lines.append(
        f"master  peak rss {fmt_bytes(master_rss)}, peak uss {fmt_bytes(master_uss)}{est}  "
        f"({len(d.mem)} worker samples)"
    )
    return Report("memory", data, lines)


def copy_report(result: Any) -> Report:
    """What moved or was copied: borrowed inputs, out buffers, results gathered, private copies."""
    d = diag_of(result)
    shared = sum(v["bytes"] for v in d.borrow.values())
    copied = sum(v["bytes_copied"] for v in d.borrow.values())
    materialized = sum(v["bytes"] for v in d.cow.values())
    data = {
        "borrow": d.borrow,
        "borrow_bytes": shared,
        "borrow_bytes_copied": copied,
        "result_bytes": d.bytes_results,
        "out_bytes": sum(d.out.values()),
        "out": d.out,
        "out_bytes_written": sum(d.out_written.values()),
        "out_written": d.out_written,
        "materialized_bytes": materialized,
        "dispatch_bytes": d.bytes_dispatch,
        "setup_bytes": d.bytes_setup,
        "reforked_workers": d.reforked,
        "worker_start": sorted(getattr(d, "worker_start", ())),
        "refork_seconds": d.refork_seconds,
        **getattr(d, "tables", {}),
    }
    lines = []
    for name, v in d.borrow.items():
        lines.append(
            f"borrow {name!r}: {fmt_bytes(v['bytes'])} {v['how']}"
            + (
                f" ({fmt_bytes(v['bytes_copied'])} copied in {v['seconds'] * 1e3:.1f} ms)"
                if v["bytes_copied"]
                else f" (0 copied, {v['seconds'] * 1e3:.2f} ms)"
            )
        )
    if any(v["how"] == "inherited" for v in d.borrow.values()):
        lines.append(
            f"inherited inputs: workers see the caller's pages copy-on-write, as of fork time "
            f"({d.reforked} worker(s) re-forked for it in {d.refork_seconds * 1e3:.1f} ms)"
        )
    if "server" in getattr(d, "worker_start", ()):
        lines.append(
            "workers started by the fork server (the caller had other threads, or fork_mode='server'): "
            "borrowed inputs took the copy path, none was inherited at fork"
        )
    for name, n in d.out.items():
        w = d.out_written.get(name)
        written = f", {fmt_bytes(w)} newly written during the run" if w is not None else ""
        lines.append(f"out    {name!r}: {fmt_bytes(n)} shared buffer{written} (in place, nothing gathered)")
    lines.append(
        f"results gathered: {fmt_bytes(d.bytes_results)}; sent to workers: {fmt_bytes(d.bytes_setup)} "
        f"setup + {fmt_bytes(d.bytes_dispatch)} dispatch"
    )
    lines.append(f"materialized (private copies of borrowed pages): {fmt_bytes(materialized)}")
    t = getattr(d, "tables", None)
    if t:
        lines.append(
            f"table (auto_table): {t['table_rows']} rows in {t['table_parts']} part(s), "
            f"{fmt_bytes(t['table_bytes_written'])} written by workers, "
            f"{fmt_bytes(t['table_bytes_materialized'])} materialized on the master"
        )
    return Report("copies", data, lines)


def cow_report(result: Any) -> Report:
    """Writes into borrowed inputs: per input, the shards, pages and bytes privately copied."""
    d = diag_of(result)
    data = {
        "policy": d.cow_policy,
        "inputs": d.cow,
        "violations": sum(len(v["shards"]) for v in d.cow.values()) if d.cow_policy == "deny" else 0,
        "copies_triggered": sum(v["pages"] for v in d.cow.values()),
    }
    lines = [
        f"policy {d.cow_policy!r}: "
        + ("no writes to borrowed inputs" if not d.cow else f"{len(d.cow)} input(s) written")
    ]
    for name, v in d.cow.items():
        lines.append(
            f"  {name!r}: shards {v['shards'][:10]}{'...' if len(v['shards']) > 10 else ''}, "
            f"{v['pages']} pages / {fmt_bytes(v['bytes'])} privately copied, first byte {v['first_offset']}"
        )
    return Report("copy-on-write", data, lines)


def worker_report(result: Any) -> Report:
    """Per worker: pids, shards, busy share, deaths, recycles; then every event with its reason."""
    d = diag_of(result)
    wall_ns = max(1, d.t_end_ns - d.t_start_ns)
    data = {}
    lines = ["worker  pids            shards  busy   deaths  recycles"]
    for slot, rec in sorted(d.workers.items()):
        data[str(slot)] = {**rec, "busy_fraction": rec["busy_ns"] / wall_ns}
        lines.append(
            f"{slot:>6}  {','.join(map(str, rec['pids']))[:14]:<14}  {rec['shards']:>6}  "
            f"{100 * rec['busy_ns'] / wall_ns:4.0f}%  {rec['deaths']:>6}  {rec['recycles']:>8}"
        )
    for e in d.events:
        lines.append(
            f"  {e['event']}: worker {e['worker']} pid {e['pid']}: {e['reason']}"
            + (f" (shard {e['shard']})" if e.get("shard") is not None else "")
        )
    return Report("workers", {"workers": data, "events": d.events}, lines)


def segment_report() -> Report:
    """Live shardc segments of this process: backing, size, owner."""
    segs = [s.info() for s in live_segments()]
    total = sum(s["size"] for s in segs)
    lines = [f"{len(segs)} live segments, {fmt_bytes(total)}"]
    for s in segs:
        lines.append(
            f"  {s['name']:<40} {s['backing']:<6} {fmt_bytes(s['size']):>10} "
            f"{'owner' if s['owner'] else 'attached'}{' sealed' if s['sealed'] else ''}"
        )
    return Report("segments", {"segments": segs, "total_bytes": total}, lines)


LEVELS = ("summary", "workers", "tasks", "segments")


def report(result: Any, level: str = "summary") -> Report:
    """A report on a run: level "summary", "workers", "tasks" or "segments"."""
    if isinstance(result, str) and result in LEVELS:
        raise InvalidTypeError("report() takes the result first: report(result, level=...)")
    if level not in LEVELS:
        raise InvalidArgumentError(f"level={level!r} is not one of {LEVELS}")
    d = diag_of(result)
    parts = [task_report(result), mem_report(result), copy_report(result), cow_report(result)]
    if d.cluster:
        parts.insert(0, cluster_report(result))
    if level in ("workers", "tasks", "segments"):
        parts.append(worker_report(result))
    if level == "segments":
        parts.append(segment_report())
    parts.append(recommendations(result))
    red = getattr(d, "reduce", None)
    if red:  # shard_reduce: the engine's tasks are groups of shards
        head = (
            f"shard_reduce: {d.completed}/{d.num_shards} groups ok ({red['fold_steps']} shards folded, "
            f"{red['group_size']} per group), {d.failed} failed, {d.wall_seconds:.3f} s ({d.mode})"
        )
    else:
        head = (
            f"shard_map: {d.completed}/{d.num_shards} shards ok, {d.failed} failed, {d.wall_seconds:.3f} s, "
            f"{d.throughput():,.0f} shards/s ({d.mode})"
        )
    rep = Report("shardc report", {"level": level, "summary": head}, [head], parts)
    rep.data["_result"] = result
    return rep
