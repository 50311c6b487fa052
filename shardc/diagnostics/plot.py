"""The timeline picture: one row per worker (shards as bars coloured ok /
retried / failed, deaths and recycles marked), memory underneath; for a
``cluster=`` run one row per node (macro-shards as bars, tries lost with a
node marked, bytes moved in its label), under it a lane per worker of the
node's pool, and each node's peak memory underneath.

Memory is sampled, not continuous, and each series is drawn as what it is:
a worker's own anonymous memory (statm at shard boundaries and at ticks,
put on the smaps scale) and the master's as steps that hold each sample
until the next one, every sample marked; PSS exists only in the sparse
precise (smaps_rollup) samples, so it is markers alone, never a line
between them.  Each legend entry says how many samples the series has and
how often they came.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from ..errors import InvalidTypeError, MissingDependencyError
from ..units import fmt_bytes
from .collect import FAILED, OK, OK_RETRIED, Diagnostics
from .lanes import lanes_by_node

_COLORS = {OK: "#4c9a2a", OK_RETRIED: "#e0a000", FAILED: "#c0392b"}


def _cadence(t_ns: np.ndarray) -> str:
    """How a series was sampled: "12 samples, every ~40 ms" (median interval)."""
    n = len(t_ns)
    if n < 2:
        return f"{n} sample"
    dt = float(np.median(np.diff(np.sort(t_ns)))) * 1e-9
    every = f"{dt * 1e3:.0f} ms" if dt < 1 else f"{dt:.1f} s"
    return f"{n} samples, every ~{every}"


def plot_timeline(result: Any, path: Any = None, show: bool | None = None) -> Any:
    """Draw one row per worker and the memory of every process underneath.

    Args:
        result: a ShardResult (or anything with its ``diagnostics``).
        path: save to this file (PNG, SVG, PDF by extension).
        show: display (default: only in a notebook).

    Returns:
        The matplotlib Figure.

    Raises:
        ImportError: matplotlib is not installed (extra ``plot``).
    """
    # matplotlib is imported here, not at module level: it is an optional
    # dependency (shardc[plot]) and takes ~0.3 s to import.
    try:
        import matplotlib

        if path is not None and "ipykernel" not in sys.modules:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        raise MissingDependencyError("result.plot() needs matplotlib: pip install 'shardc[plot]'") from None
    d = getattr(result, "diagnostics", None)
    if not isinstance(d, Diagnostics):
        raise InvalidTypeError(f"expected a ShardResult from shard_map, got {type(result).__name__}")
    if d.cluster:
        fig = _draw_cluster(plt, d.cluster, d)
        return _finish(plt, fig, path, show)
    t0 = d.t_start_ns
    rows = max(1, len(d.workers))
    fig, (ax, axm) = plt.subplots(
        2, 1, figsize=(11, 2.5 + 0.5 * rows + 3), sharex=True, gridspec_kw={"height_ratios": [rows, 2.5]}
    )
    _draw_shards(ax, d, t0)
    ax.set_yticks(sorted(d.workers))
    ax.set_yticklabels([f"worker {s}" for s in sorted(d.workers)])
    ax.set_title(f"shard_map: {d.completed}/{d.num_shards} ok, {d.failed} failed, {d.wall_seconds:.2f} s ({d.mode})")
    keys = [
        Patch(color=_COLORS[OK], label="shard ok"),
        Patch(color=_COLORS[OK_RETRIED], label="ok after retry"),
        Patch(color=_COLORS[FAILED], label="failed"),
        Line2D([], [], marker="x", color="#c0392b", linestyle="none", label="death"),
        Line2D([], [], marker="o", color="#2c6fbb", linestyle="none", label="recycle"),
    ]
    ax.legend(handles=keys, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    _draw_memory(axm, d, t0)
    axm.set_ylabel("MiB")
    axm.set_xlabel("seconds since start")
    axm.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize="small",
        frameon=False,
        title="memory (sampled)",
        title_fontsize="small",
    )
    return _finish(plt, fig, path, show)


def _finish(plt: Any, fig: Any, path: Any, show: bool | None) -> Any:
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), bbox_inches="tight")
    if show or (show is None and "ipykernel" in sys.modules):
        plt.show()
    else:
        plt.close(fig)
    return fig


def _draw_cluster(plt: Any, c: dict[str, Any], d: Diagnostics) -> Any:
    """A cluster run: per node a row of its macro-shards (amber: a shard in it was
    retried; a try lost with its node an x at its start), then a lane per worker of
    the node's pool (its span of shards in each macro-shard, as the agent measured
    it); per-node peak memory and bytes moved underneath."""
    nodes = sorted(set(c["nodes"]) | {s["node"] for s in c["starts"]})
    by_node = lanes_by_node(c)
    lanes = {n: by_node.get(n, {}) for n in nodes}
    row: dict[Any, int] = {}
    labels: list[str] = []
    for n in nodes:
        rec = c["nodes"].get(n)
        row[n] = len(labels)
        labels.append(
            f"{n}\nagent {','.join(map(str, rec['agents']))}; in {fmt_bytes(rec['bytes_inputs'])}, "
            f"replies {fmt_bytes(rec['bytes_replies'])}"
            if rec
            else f"{n}\nlost"
        )
        for slot, lane in lanes[n].items():
            row[(n, slot)] = len(labels)
            labels.append(f"worker {slot} (pid {','.join(map(str, lane['pids']))}): {lane['shards']} shards")
    w0 = c["t_start_wall"]
    fig, (ax, axm) = plt.subplots(
        2, 1, figsize=(11, 2.5 + 0.4 * len(labels) + 3), gridspec_kw={"height_ratios": [max(1, len(labels)), 2.5]}
    )
    for m in c["macros"]:
        color = _COLORS[OK_RETRIED] if m["retries"] else _COLORS[OK]
        ax.barh(row[m["node"]], m["seconds"], left=m["t_done"] - m["seconds"] - w0, height=0.6, color=color)
    for n in nodes:
        for slot, lane in lanes[n].items():
            for t0, t1 in lane["spans"]:
                ax.barh(row[(n, slot)], max(t1 - t0, 1e-6), left=t0 - w0, height=0.4, color="#7fb3d5", linewidth=0)
    done = {(m["macro"], m["node"]) for m in c["macros"]}
    for s in c["starts"]:
        if (s["macro"], s["node"]) not in done:
            ax.plot([s["t"] - w0], [row[s["node"]]], marker="x", color="#c0392b", markersize=10, linestyle="none")
    ax.set_xlim(left=0)  # the start: agents begin when their node's first macro-shard arrives
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize="small")
    ax.invert_yaxis()  # each node above its workers
    ax.set_xlabel(
        "seconds since start (node rows: macro-shards on the node's pool, x: a try lost with its node; "
        "worker lanes: each one's shards in each macro-shard)"
    )
    ax.set_title(
        f"shard_map on {c['backend']}: {d.completed}/{d.num_shards} ok, {d.failed} failed, {d.wall_seconds:.2f} s"
    )
    names = [n for n in nodes if n in c["nodes"]]
    x = np.arange(len(names))
    for k, (key, label) in enumerate(
        [("engine_peak_rss", "engine worker RSS"), ("agent_peak_rss", "agent RSS"), ("workers_peak_uss", "pool USS")]
    ):
        axm.bar(x + (k - 1) * 0.27, [c["nodes"][n][key] / 2**20 for n in names], width=0.27, label=label)
    axm.set_xticks(x)
    axm.set_xticklabels(names, fontsize="small")
    axm.set_ylabel("peak MiB")
    axm.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig


def _draw_shards(ax: Any, d: Diagnostics, t0: int) -> None:
    if d.enabled and d.mode == "rpc_chunked":
        done = np.nonzero(d.shard_worker >= 0)[0]
        for code, color in _COLORS.items():
            sel = done[d.shard_ok[done] == code]
            if len(sel):
                starts = (d.shard_t0[sel] - t0) * 1e-9
                widths = np.maximum((d.shard_t1[sel] - d.shard_t0[sel]) * 1e-9, 1e-6)
                ax.barh(d.shard_worker[sel], widths, left=starts, height=0.6, color=color, linewidth=0)
    for slot, _start, _count, b0, b1 in d.blocks:
        ax.barh(slot, max((b1 - b0) * 1e-9, 1e-6), left=(b0 - t0) * 1e-9, height=0.6, color=_COLORS[OK], linewidth=0)
    for e in d.events:
        x = (e["t"] - t0) * 1e-9
        death = e["event"] == "death"
        ax.plot(
            [x],
            [e["worker"]],
            marker="x" if death else "o",
            color="#c0392b" if death else "#2c6fbb",
            markersize=10,
            linestyle="none",
        )


def _draw_memory(axm: Any, d: Diagnostics, t0: int) -> None:
    for slot in sorted(d.workers):
        pts = np.array(
            [(t, anon, pss, precise) for (t, s, _pid, _rss, pss, _uss, anon, precise) in d.mem if s == slot],
            dtype=float,
        ).reshape(-1, 4)
        if not len(pts):
            continue
        x = (pts[:, 0] - t0) * 1e-9
        (line,) = axm.step(
            x,
            pts[:, 1] / 2**20,
            where="post",
            marker=".",
            markersize=4,
            label=f"worker {slot} own anon ({_cadence(pts[:, 0])})",
        )
        exact = pts[:, 3] > 0
        if exact.any():
            axm.plot(
                x[exact],
                pts[exact, 2] / 2**20,
                linestyle="none",
                marker="D",
                markersize=5,
                markerfacecolor="none",
                color=line.get_color(),
                label=f"worker {slot} PSS, smaps_rollup only ({_cadence(pts[exact, 0])})",
            )
    if d.master_mem:
        arr = np.array(d.master_mem, dtype=float)
        axm.step(
            (arr[:, 0] - t0) * 1e-9,
            arr[:, 4] / 2**20,
            where="post",
            color="k",
            linestyle="--",
            marker=".",
            markersize=4,
            label=f"master anon ({_cadence(arr[:, 0])})",
        )
