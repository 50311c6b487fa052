"""The report on a ``shard_map(..., cluster=...)`` run: nodes -> workers.

Reads ``Diagnostics.cluster``, the plain dict :mod:`shardc.cluster.base`
fills: per node the agent and worker pids, macro-shards and shards run, busy
time, peak memory (the engine's worker process, the agent, the pool's
workers' USS summed) and bytes moved (inputs sent once, replies); then the
macro-shards lost with a node or agent and rerun elsewhere; per worker of
each node, shards run and busy time (:func:`worker_spans`, measured by the
node's agent on every macro-shard's local call).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..units import fmt_bytes
from .base import Report, diag_of


def worker_spans(d: Any, pids: dict[int, int]) -> list[list[Any]]:
    """Each worker's part of a local run (the agent's, for one macro-shard):
    ``[slot, pid, first start, last end, shards, busy seconds]``, times as wall
    clock seconds of this machine (the caller draws them beside its macro-shards).
    From per-shard times (rpc_chunked, diagnostics on) or blocks (shm_queue)."""
    acc: dict[int, list[float]] = {}

    def add(slot: int, t0: int, t1: int, n: int, busy: int) -> None:
        a = acc.setdefault(slot, [t0, t1, 0, 0])
        a[0], a[1], a[2], a[3] = min(a[0], t0), max(a[1], t1), a[2] + n, a[3] + busy

    if d.enabled and d.mode == "rpc_chunked":
        w = d.shard_worker
        for slot in np.flatnonzero(np.bincount(w[w >= 0])) if (w >= 0).any() else ():
            sel = w == slot
            t0, t1 = d.shard_t0[sel], d.shard_t1[sel]
            add(int(slot), int(t0.min()), int(t1.max()), int(sel.sum()), int((t1 - t0).sum()))
    for slot, _start, count, b0, b1 in d.blocks:
        add(slot, b0, b1, count, b1 - b0)
    off = time.time() - time.monotonic_ns() * 1e-9  # monotonic ns -> this machine's wall clock
    return [
        [slot, pids.get(slot), a[0] * 1e-9 + off, a[1] * 1e-9 + off, int(a[2]), a[3] * 1e-9]
        for slot, a in sorted(acc.items())
    ]


def node_lanes(c: dict[str, Any], node: str) -> dict[int, dict[str, Any]]:
    """A node's workers over the call: slot -> pids, shards, busy seconds, spans (wall clock)."""
    out: dict[int, dict[str, Any]] = {}
    for m in c["macros"]:
        if m["node"] != node:
            continue
        for slot, pid, t0, t1, n, busy in m.get("lanes", ()):
            lane = out.setdefault(slot, {"pids": [], "shards": 0, "busy": 0.0, "spans": []})
            if pid is not None and pid not in lane["pids"]:
                lane["pids"].append(pid)
            lane["shards"] += n
            lane["busy"] += busy
            lane["spans"].append((t0, t1))
    return dict(sorted(out.items()))


def cluster_report(result: Any) -> Report:
    """Nodes -> workers, per-node memory and bytes moved, lost and rerun macro-shards."""
    c = diag_of(result).cluster
    if not c:
        return Report("cluster", {}, ["not a cluster run"])
    lines = [
        f"{c['backend']}: {len(c['nodes'])} node(s) ran {len(c['macros'])} macro-shard(s); inputs "
        f"{fmt_bytes(c['bytes_inputs_per_node'])} sent once per node ({c.get('inputs_cached', 0)} input(s) already "
        f"on the nodes from earlier calls, not sent), replies {fmt_bytes(c['bytes_replies'])}",
        "node                          agent pid(s)  workers  macros  shards  busy s  inputs    replies   "
        "peak: engine  agent  workers(USS)",
    ]
    for name, n in sorted(c["nodes"].items()):
        lines.append(
            f"{name[:28]:<28}  {','.join(map(str, n['agents']))[:12]:<12}  {n['workers']:>7}  {n['macros']:>6}  "
            f"{n['shards']:>6}  {n['busy_seconds']:6.2f}  {fmt_bytes(n['bytes_inputs']):<8}  "
            f"{fmt_bytes(n['bytes_replies']):<8}  {fmt_bytes(n['engine_peak_rss']):>12}  "
            f"{fmt_bytes(n['agent_peak_rss']):>5}  {fmt_bytes(n['workers_peak_uss']):>12}"
        )
        lines.append(f"  {'':<26}worker pids {', '.join(map(str, n['worker_pids']))}")
        for slot, lane in node_lanes(c, name).items():
            lines.append(
                f"  {'':<26}worker {slot} (pid {', '.join(map(str, lane['pids']))}): {lane['shards']} shards, "
                f"busy {lane['busy']:.2f} s"
            )
        for e in n["events"][:10]:
            lines.append(f"  {'':<26}{e}")
    for lost in c["lost"]:
        lines.append(
            f"  macro-shard {lost['macro']} (shards {lost['lo']}..{lost['hi'] - 1}) try {lost['attempt']} lost: "
            f"{lost['error']}; rerun"
        )
    done = {(m["macro"], m["node"]) for m in c["macros"]}
    for s in c["starts"]:
        if (s["macro"], s["node"]) not in done:
            lines.append(
                f"  macro-shard {s['macro']} started on {s['node']}, which did not finish it (node lost); rerun"
            )
    return Report("cluster", c, lines)
