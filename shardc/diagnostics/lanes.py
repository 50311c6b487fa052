"""A cluster run's workers per node: what each node's agent measures of its
workers on every macro-shard (:func:`worker_spans`), and what the caller makes
of it for the report and the picture (:func:`node_lanes`)."""

from __future__ import annotations

import time
from typing import Any


def worker_spans(d: Any) -> list[list[Any]]:
    """Each worker's part of a local run (the agent's, for one macro-shard):
    ``[slot, pid, first start, last end, shards, busy seconds]``, times as wall
    clock seconds of this machine (the caller draws them beside its macro-shards).
    From what the run's diagnostics count per worker as results arrive (``Diagnostics.workers``)."""
    off = time.time() - time.monotonic_ns() * 1e-9  # monotonic ns -> this machine's wall clock
    return [
        [slot, rec["pids"][-1] if rec["pids"] else None, rec["span"][0] * 1e-9 + off, rec["span"][1] * 1e-9 + off]
        + [int(rec["shards"]), rec["busy_ns"] * 1e-9]
        for slot, rec in sorted(d.workers.items())
        if rec["shards"] and rec.get("span")
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
