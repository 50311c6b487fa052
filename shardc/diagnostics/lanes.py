"""A cluster run's workers per node: what each node's agent measures of its
workers on every macro-shard (:func:`worker_spans`), and what the caller makes
of it for the report and the picture (:func:`lanes_by_node`)."""

from __future__ import annotations

import time
from typing import Any


def worker_spans(d: Any) -> list[list[Any]]:
    """Each worker's part of a local run (the agent's, for one macro-shard):
    ``[slot, pid, first start, last end, shards, busy seconds]``, times as wall
    clock seconds of this machine (the caller draws them beside its macro-shards).
    From what the run's diagnostics count per worker as results arrive (``Diagnostics.workers``)."""
    off = time.time() - time.monotonic_ns() * 1e-9  # monotonic ns -> this machine's wall clock
    spans = []
    for slot, rec in sorted(d.workers.items()):
        if rec["shards"] and rec.get("span"):
            t0, t1 = rec["span"]
            pid = rec["pids"][-1] if rec["pids"] else None
            spans.append([slot, pid, t0 * 1e-9 + off, t1 * 1e-9 + off, int(rec["shards"]), rec["busy_ns"] * 1e-9])
    return spans


def lanes_by_node(c: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """Each node's workers over the call (one pass over the macro-shards):
    node -> slot -> pids, shards, busy seconds, spans (wall clock)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for m in c["macros"]:
        node = out.setdefault(m["node"], {})
        for slot, pid, t0, t1, n, busy in m.get("lanes", ()):
            lane = node.setdefault(slot, {"pids": [], "shards": 0, "busy": 0.0, "spans": []})
            if pid is not None and pid not in lane["pids"]:
                lane["pids"].append(pid)
            lane["shards"] += n
            lane["busy"] += busy
            lane["spans"].append((t0, t1))
    return {name: dict(sorted(lanes.items())) for name, lanes in out.items()}
