"""The report on a ``shard_map(..., cluster=...)`` run: nodes -> workers.

Reads ``Diagnostics.cluster``, the plain dict :mod:`shardc.cluster.base`
fills: per node the agent and worker pids, macro-shards and shards run, busy
time, peak memory (the engine's worker process, the agent, the pool's
workers' USS summed) and bytes moved (inputs sent once, replies); then the
macro-shards lost with a node or agent and rerun elsewhere; per worker of
each node, shards run and busy time (:func:`.lanes.worker_spans`, measured
by the node's agent on every macro-shard's local call).
"""

from __future__ import annotations

from typing import Any

from ..units import fmt_bytes
from .base import Report, diag_of
from .lanes import lanes_by_node


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
    lanes = lanes_by_node(c)
    for name, n in sorted(c["nodes"].items()):
        lines.append(
            f"{name[:28]:<28}  {','.join(map(str, n['agents']))[:12]:<12}  {n['workers']:>7}  {n['macros']:>6}  "
            f"{n['shards']:>6}  {n['busy_seconds']:6.2f}  {fmt_bytes(n['bytes_inputs']):<8}  "
            f"{fmt_bytes(n['bytes_replies']):<8}  {fmt_bytes(n['engine_peak_rss']):>12}  "
            f"{fmt_bytes(n['agent_peak_rss']):>5}  {fmt_bytes(n['workers_peak_uss']):>12}"
        )
        lines.append(f"  {'':<26}worker pids {', '.join(map(str, n['worker_pids']))}")
        for slot, lane in lanes.get(name, {}).items():
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
