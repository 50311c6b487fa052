"""shard_map on a 1-node Dask (and Ray) cluster vs the local pool, and vs the same jobs written in Dask and Ray.

Measures (medians of ``--repeats`` runs, default 5, all in ONE run of this
script so the ratios share the machine's load; the forms a ratio compares run
in interleaved rounds, :class:`Rounds`, and the ratio is the median of the
per-round ratios, so a load spike from other jobs hits both sides):

* ``tiny``: N trivial shards (``o[shard.id] = shard.id``; N = 2M, ``--quick``
  200k).  shardc local (``profile="speed"``: shm_queue, 2 workers); shardc on a
  1-node cluster (a ``LocalCluster`` of one process worker, whose agent runs a
  pool of 2 workers: the same 2 cores): the first call (starts the agent) on
  its own, then the median of the repeated calls (agent and inputs reused);
  Dask ``client.map`` one task per item (on a 2k-item subset, as a rate: it is
  that slow) and ``dask.bag`` batched (``from_sequence(range(100k),
  npartitions=8).map``, a rate), both on a 2-worker ``LocalCluster`` (the 2
  cores), and shardc's batched form on the 1-node cluster (8 shards, a plain
  loop in each).  Reported as items/s; for the cluster run also the steady rate once
  macro-shards run (shards / agent busy seconds of every macro-shard after
  the first) and the fixed cost per call.
* ``colstats``: per-column mean and variance of a float64 matrix
  (16384 x 8192 = 1 GiB; ``--quick`` 4096 x 8192 = 256 MiB), one shard per
  256 columns, into out buffers.  shardc local (2 workers), shardc on the
  1-node cluster (first call, then repeated calls: bytes moved by each, the
  content hash's cost, and a call after one element changed: its bytes are
  sent again and the results equal a local run), Dask ``client.map`` per block
  with the matrix scattered once (broadcast), and ``dask.array``
  (``from_array`` of the scattered matrix, chunks of 256 columns: Dask's own
  batched form).
* ``two_nodes``: the colstats job on a 2-worker cluster: bytes of inputs per
  node (must be the matrix's size, once each) and per-node shards.
* ``ray``: a one-node Ray runtime (``ray.init(num_cpus=2)``): shardc with
  ``cluster="ray"`` (first and repeated calls) against Ray written directly:
  tiny items as one task per item (2k subset, a rate) and as batched tasks (8
  tasks over all N items; shardc's batched form alongside: 8 shards, a plain
  loop in each), the column statistics as one task per block and as
  2 batched tasks, the matrix ``ray.put`` once (timed apart).
* ``recovery``: 400 shards of 20 ms on the 2-worker cluster, one worker
  SIGKILLed 1 s in: the run's wall time against an undisturbed one, and the
  time from the kill until the lost macro-shard was done on the other node
  (against that macro-shard's own duration: the rest is detection + restart).

Like for like (checked): every peer runs on 2 worker processes (a 2-worker
``LocalCluster``, ``ray.init(num_cpus=2)``) as shardc does (one node whose
agent runs a pool of 2); every form runs the same kernel (the per-block NumPy
``mean``/``var`` of ``block_stats``/``colstats``, what a Dask or Ray user
would write per row block of columns; shardc's native col_stats kernel is not
used here); the tiny items do the same Python work in every batched form (a
list of ``tiny_item(i)`` per batch of 250k).  What is not timed: the peers'
scatter/``ray.put`` of the matrix, and for shardc the first call (agent start
+ the node transfer, reported on its own line); shardc's repeated calls with
a plain array still check it against the sealed copy (what guarantees nothing
stale is served): where the kernel tracks writes (``shardc.pagetrack``) only
the pages it cannot vouch for are compared, else one ``memcmp`` of 1 GiB;
``*.check`` is that check's time and bytes, beside a full ``memcmp``.  The
strictly equal form of ``ray.put`` is a ``shardc.share(X)`` handle made once
and not timed, reported alongside (``*_share_handle``).  Ratios are named ``A_vs_B`` = speed of A / speed of B
(> 1: A faster); the per-item, batched and cross-form ratios are kept apart.

Does not measure: real networks (loopback only), more than one machine's
cores (two "nodes" share 2 cores).  The machine is shared with other jobs:
compare ratios from the same run, not across runs.
Output: ``name<TAB>value<TAB>unit`` lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import shardc
import shardc.cluster
from shardc.cluster import Cluster

BLOCK = 256


def emit(name: str, value: float, unit: str) -> None:
    print(f"{name}\t{value:.6g}\t{unit}", flush=True)


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, last = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), last


class Rounds:
    """The forms compared, timed in interleaved rounds (A, B, C, A, B, C, ...): on a machine
    shared with other jobs each round's forms see about the same load.  ``vs(a, b)``: the
    median over rounds of (time of b / time of a), i.e. a's speed over b's (> 1: a faster).

    ``warmup`` untimed rounds of every form first: right after the 1 GiB input was copied
    (``ray.put``, a share, a scatter) every form ran up to 2-3x slower for two rounds while
    the kernel settled its memory (seen in the rounds ``show`` prints); first calls are
    reported on their own."""

    def __init__(self, forms: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> None:
        self.times: dict[str, list[float]] = {k: [] for k in forms}
        self.last: dict[str, Any] = {}
        for _ in range(warmup):
            for fn in forms.values():
                fn()
        for _ in range(repeats):
            for k, fn in forms.items():
                t0 = time.perf_counter()
                self.last[k] = fn()
                self.times[k].append(time.perf_counter() - t0)

    def t(self, k: str) -> float:
        return statistics.median(self.times[k])

    def show(self, prefix: str) -> None:
        """Every round's time of every form (a comment line each: the spread behind the medians)."""
        for k, ts in self.times.items():
            print(f"# {prefix}.{k} rounds: " + " ".join(f"{t:.3f}" for t in ts), flush=True)

    def vs(self, a: str, b: str) -> float:
        return statistics.median(tb / ta for ta, tb in zip(self.times[a], self.times[b], strict=True))


def tiny(shard: Any, o: Any) -> None:
    o[shard.id] = shard.id


def tiny_item(i: int) -> int:
    return i


def colstats(shard: Any, X: np.ndarray, mean: Any, var: Any) -> None:
    blk = X[:, shard.idx]
    mean[shard.idx] = blk.mean(axis=0)
    var[shard.idx] = blk.var(axis=0)


def block_stats(X: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
    blk = X[:, j * BLOCK : (j + 1) * BLOCK]
    return blk.mean(axis=0), blk.var(axis=0)


def emit_check(prefix: str, X: np.ndarray) -> None:
    """The plain array's per-call check (share cache: kernel write tracking where
    available, else memcmp), against a full memcmp of the array."""
    from shardc import pagetrack
    from shardc.share import _same_bytes, default_cache

    t, _ = median_time(lambda: default_cache.get(X, "auto"), 5)
    emit(f"{prefix}.check", t, "s")
    emit(f"{prefix}.check.bytes_compared", default_cache.bytes_compared, "B")
    shared = default_cache.get(X, "auto")[0]
    emit(f"{prefix}.check_full_memcmp", median_time(lambda: _same_bytes(X, shared), 5)[0], "s")
    emit(f"{prefix}.write_tracking", 0 if pagetrack.unavailable() else 1, "on")


def steady_rate(res: shardc.ShardResult) -> tuple[float, float]:
    """(shards/s over the macro-shards after the first, seconds not spent in macro-shards)."""
    ms = sorted(res.diagnostics.cluster["macros"], key=lambda m: m["lo"])
    rest = ms[1:] or ms
    busy = sum(m["seconds"] for m in ms)
    return sum(m["hi"] - m["lo"] for m in rest) / sum(m["seconds"] for m in rest), res.diagnostics.wall_seconds - busy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--only", choices=["tiny", "colstats", "ray", "recovery"], help="run one part (colstats: with two_nodes)"
    )
    args = ap.parse_args()
    import cloudpickle
    from dask.distributed import Client, LocalCluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    r = args.repeats
    n_tiny = 200_000 if args.quick else 2_000_000
    rows, cols = (4096, 8192) if args.quick else (16384, 8192)
    print(f"# load average {os.getloadavg()}, {os.cpu_count()} CPUs, shared machine", flush=True)

    shardc.pool_create(2)  # before any Dask thread exists in this process
    one = LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address=None, silence_logs=40)
    c1 = Client(one)
    two = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, silence_logs=40)
    c2 = Client(two)
    on1 = Cluster(c1, macro_seconds=2.0)

    X = np.random.default_rng(0).random((rows, cols)) if args.only in (None, "colstats", "ray") else None
    if args.only in (None, "tiny"):
        run_tiny(c1, c2, on1, n_tiny, r)
    if args.only in (None, "colstats"):
        assert X is not None
        run_colstats(c2, on1, X, r)
    if args.only in (None, "recovery"):
        run_recovery(c2)
    shardc.cluster.close()  # the agents and the inputs they hold
    for cl in (c1, c2):
        cl.close()
    one.close()
    two.close()
    if args.only in (None, "ray"):
        assert X is not None
        run_ray(n_tiny, X, r)
    shardc.pool_stop()
    print(f"# load average at the end {os.getloadavg()}", flush=True)


def run_tiny(c1: Any, c2: Any, on1: Cluster, n_tiny: int, r: int) -> None:
    with shardc.buffer("i8", n_tiny) as o:
        local = lambda: shardc.shard_map(n_tiny, tiny, out={"o": o}, profile="speed", workers=2)  # noqa: E731
        on = lambda: shardc.shard_map(n_tiny, tiny, out={"o": o}, profile="speed", workers=2, cluster=on1)  # noqa: E731
        t_first, _ = median_time(on, 1)
        rd = Rounds({"local": local, "cluster": on}, r)
        rd.show("tiny")
        t_local, t_cl, res = rd.t("local"), rd.t("cluster"), rd.last["cluster"]
        assert np.array_equal(o.array, np.arange(n_tiny))
    rate, fixed = steady_rate(res)
    emit("tiny.local", n_tiny / t_local, "items/s")
    emit("tiny.cluster1_first_call", n_tiny / t_first, "items/s")
    emit("tiny.cluster1", n_tiny / t_cl, "items/s")
    emit("tiny.cluster1_steady", rate, "items/s")
    emit("tiny.cluster1_fixed_cost", fixed, "s")
    emit("tiny.cluster1_vs_local", rd.vs("cluster", "local"), "x")
    emit("tiny.cluster1_steady_vs_local", rate / (n_tiny / t_local), "x")
    n_map = 2_000  # per-task scheduling runs at a few hundred to a few thousand tasks/s: a subset, as a rate
    t_map, _ = median_time(lambda: c2.gather(c2.map(tiny_item, range(n_map), pure=False)), r)
    emit("tiny.dask_client_map", n_map / t_map, "items/s")
    import dask.bag as db

    n_bag = min(n_tiny, 100_000)  # a subset too, reported as a rate
    t_bag, _ = median_time(lambda: db.from_sequence(range(n_bag), npartitions=8).map(tiny_item).compute(), r)
    emit("tiny.dask_bag", n_bag / t_bag, "items/s")
    # Dask's batched client.map (8 tasks over ranges, as Ray's batched tasks): its gather of
    # Python lists is slow here (minutes for 2M ints), so on n_bag items too, as a rate.
    sb = -(-n_bag // 8)
    t_db, out = median_time(
        lambda: c2.gather(
            c2.map(ray_batch, range(0, n_bag, sb), [min(n_bag, lo + sb) for lo in range(0, n_bag, sb)], pure=False)
        ),
        r,
    )
    assert sum(len(b) for b in out) == n_bag
    emit("tiny.dask_batched_client_map", n_bag / t_db, "items/s")
    bd = shardc.shards(n_tiny, block_size=-(-n_tiny // 8))
    t_sb, res = median_time(lambda: shardc.shard_map(bd, batch_shard, workers=2, cluster=on1), r)
    assert sum(len(b) for b in res.results) == n_tiny
    emit("tiny.cluster1_batched", n_tiny / t_sb, "items/s")
    # Like for like: a shard per item against a task per item, batches against batches.
    emit("tiny.cluster1_vs_dask_client_map", (n_tiny / t_cl) / (n_map / t_map), "x")
    emit("tiny.cluster1_batched_vs_dask_batched_client_map", (n_tiny / t_sb) / (n_bag / t_db), "x")
    emit("tiny.cluster1_batched_vs_dask_bag", (n_tiny / t_sb) / (n_bag / t_bag), "x")


def slow(shard: Any, o: Any) -> None:
    time.sleep(0.02)
    o[shard.id] = shard.id


def run_recovery(c2: Any) -> None:
    """Kill one of two Dask workers 1 s into a run of 400 x 20 ms shards (macro_seconds=0.5):
    when is the macro-shard it was running done elsewhere, and what did the run cost."""
    import signal
    import threading

    opts = Cluster(c2, macro_seconds=0.5)
    with shardc.buffer("i8", 400) as o:
        t_ok, _ = median_time(lambda: shardc.shard_map(400, slow, out={"o": o}, workers=1, cluster=opts), 1)
        pids = c2.run(os.getpid)
        victim_addr, victim = sorted(pids.items())[0]
        killed: list[float] = []

        def killer() -> None:
            time.sleep(1.0)
            os.kill(victim, signal.SIGKILL)
            killed.append(time.time())

        t = threading.Thread(target=killer)
        t.start()
        t_bad, res = median_time(lambda: shardc.shard_map(400, slow, out={"o": o}, workers=1, cluster=opts), 1)
        t.join()
        assert np.array_equal(o.array, np.arange(400))
    c = res.diagnostics.cluster
    done = {(m["macro"], m["node"]) for m in c["macros"]}
    lost = [s["macro"] for s in c["starts"] if s["node"] == victim_addr and (s["macro"], s["node"]) not in done]
    redone = [m for m in c["macros"] if m["macro"] in lost]
    emit("recovery.undisturbed", t_ok, "s")
    emit("recovery.with_node_killed", t_bad, "s")
    emit("recovery.macro_shards_lost", len(lost), "macro-shards")
    if redone and killed:
        emit("recovery.kill_to_rerun_done", max(m["t_done"] for m in redone) - killed[0], "s")
        emit("recovery.rerun_macro_seconds", max(m["seconds"] for m in redone), "s")


def run_colstats(c2: Any, on1: Cluster, X: np.ndarray, r: int) -> None:
    from shardc.cluster.keys import content_key

    rows, cols = X.shape
    d = shardc.shards(cols, block_size=BLOCK)
    mean, var = shardc.buffer("f8", cols), shardc.buffer("f8", cols)
    emit("colstats.bytes", X.nbytes, "B")
    ref_res = shardc.shard_map(
        d, colstats, borrow={"X": X}, out={"mean": mean, "var": var}, workers=2
    )  # warms the sealed copy
    assert not ref_res.failures
    ref = (mean.array.copy(), var.array.copy())
    mean.array[:] = 0
    var.array[:] = 0

    def on_cluster() -> shardc.ShardResult:
        return shardc.shard_map(d, colstats, borrow={"X": X}, out={"mean": mean, "var": var}, workers=2, cluster=on1)

    t_first, first = median_time(on_cluster, 1)
    assert np.array_equal(mean.array, ref[0]) and np.array_equal(var.array, ref[1])
    # The peers' input is put/scattered once and not timed; shardc's like-for-like form
    # is a sealed shardc.share(X) handle, made once and not timed either: a repeated call
    # then neither sends nor checks the 1 GiB (a plain array is checked each call: emit_check).
    Xs = shardc.share(X)

    def on_cluster_shared() -> shardc.ShardResult:
        return shardc.shard_map(d, colstats, borrow={"X": Xs}, out={"mean": mean, "var": var}, workers=2, cluster=on1)

    median_time(on_cluster_shared, 1)  # hashes the handle's key once (the same bytes: nothing sent)
    t0 = time.perf_counter()
    xf = c2.scatter(X, broadcast=True, hash=False)
    t_scatter = time.perf_counter() - t0
    nb = cols // BLOCK
    import dask.array as da

    def dask_array() -> Any:
        A = da.from_delayed(xf, shape=X.shape, dtype=X.dtype).rechunk((rows, BLOCK))
        return da.compute(A.mean(axis=0), A.var(axis=0))

    rd = Rounds(
        {
            "local": lambda: shardc.shard_map(d, colstats, borrow={"X": X}, out={"mean": mean, "var": var}, workers=2),
            "cluster": on_cluster,
            "local_share": lambda: shardc.shard_map(
                d, colstats, borrow={"X": Xs}, out={"mean": mean, "var": var}, workers=2
            ),
            "cluster_share": on_cluster_shared,
            "dask_map": lambda: c2.gather(c2.map(block_stats, [xf] * nb, range(nb), pure=False)),
            "dask_array": dask_array,
        },
        r,
    )
    rd.show("colstats")
    assert np.array_equal(mean.array, ref[0]) and np.array_equal(var.array, ref[1])
    assert np.allclose(np.concatenate([m for m, _ in rd.last["dask_map"]]), ref[0])
    assert np.allclose(rd.last["dask_array"][0], ref[0])
    res, res_s = rd.last["cluster"], rd.last["cluster_share"]
    c = res.diagnostics.cluster
    t_hash, _ = median_time(lambda: content_key(X), 3)
    emit("colstats.local", rd.t("local"), "s")
    emit("colstats.cluster1_first_call", t_first, "s")
    emit("colstats.cluster1_first_call.bytes_inputs_per_node", first.diagnostics.cluster["bytes_inputs_per_node"], "B")
    emit("colstats.cluster1", rd.t("cluster"), "s")
    emit("colstats.cluster1.bytes_inputs_per_node", c["bytes_inputs_per_node"], "B")
    emit("colstats.cluster1.bytes_copied_on_nodes", sum(n["bytes_inputs"] for n in c["nodes"].values()), "B")
    emit("colstats.content_hash", t_hash, "s")
    emit_check("colstats.plain_array", X)
    emit("colstats.cluster1_vs_local", rd.vs("cluster", "local"), "x")
    busy = sum(m["seconds"] for m in c["macros"])
    emit("colstats.cluster1_in_macros", busy, "s")
    emit("colstats.cluster1_macro_shards", len(c["macros"]), "macro-shards")
    for name, n in c["nodes"].items():
        emit(f"colstats.cluster1.node_inputs[{name}]", n["bytes_inputs"], "B")
        emit(f"colstats.cluster1.node_replies[{name}]", n["bytes_replies"], "B")
        emit(f"colstats.cluster1.node_engine_peak_rss[{name}]", n["engine_peak_rss"], "B")
        emit(f"colstats.cluster1.node_agent_peak_rss[{name}]", n["agent_peak_rss"], "B")
    emit("colstats.local_share_handle", rd.t("local_share"), "s")
    emit("colstats.cluster1_share_handle", rd.t("cluster_share"), "s")
    emit(
        "colstats.cluster1_share_handle.bytes_inputs_per_node", res_s.diagnostics.cluster["bytes_inputs_per_node"], "B"
    )
    emit("colstats.cluster1_share_handle_vs_local_share_handle", rd.vs("cluster_share", "local_share"), "x")
    emit("colstats.dask_scatter", t_scatter, "s")
    emit("colstats.dask_client_map", rd.t("dask_map"), "s")
    emit("colstats.dask_array", rd.t("dask_array"), "s")
    emit("colstats.cluster1_vs_dask_client_map", rd.vs("cluster", "dask_map"), "x")
    emit("colstats.cluster1_vs_dask_array", rd.vs("cluster", "dask_array"), "x")
    emit("colstats.cluster1_share_handle_vs_dask_client_map", rd.vs("cluster_share", "dask_map"), "x")
    emit("colstats.cluster1_share_handle_vs_dask_array", rd.vs("cluster_share", "dask_array"), "x")
    Xs.close()
    xf.release()

    # -- a changed input: sent again, never served stale ---------------------------------------
    X[rows // 2, cols // 2] += 1.0
    t_changed, changed = median_time(on_cluster, 1)
    got = (mean.array.copy(), var.array.copy())
    shardc.shard_map(d, colstats, borrow={"X": X}, out={"mean": mean, "var": var})
    assert np.array_equal(got[0], mean.array) and np.array_equal(got[1], var.array)
    emit("colstats.cluster1_changed_input", t_changed, "s")
    emit(
        "colstats.cluster1_changed_input.bytes_inputs_per_node",
        changed.diagnostics.cluster["bytes_inputs_per_node"],
        "B",
    )
    X[rows // 2, cols // 2] -= 1.0

    # -- two nodes: inputs once per node ------------------------------------------------------
    res2 = shardc.shard_map(
        d, colstats, borrow={"X": X}, out={"mean": mean, "var": var}, workers=1, cluster=Cluster(c2, macro_seconds=0.5)
    )
    assert np.array_equal(mean.array, ref[0])
    for name, n in res2.diagnostics.cluster["nodes"].items():
        emit(f"two_nodes.node_inputs[{name}]", n["bytes_inputs"], "B")
        emit(f"two_nodes.node_shards[{name}]", n["shards"], "shards")


def batch_shard(shard: Any) -> list[int]:
    """The batched form in shardc: one shard per batch, a plain loop inside (as the peers' batches)."""
    return [tiny_item(i) for i in range(shard.start, shard.stop)]


def ray_item(i: int) -> int:
    return i


def ray_batch(lo: int, hi: int) -> list[int]:
    return [tiny_item(i) for i in range(lo, hi)]


def ray_blocks(X: np.ndarray, js: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [block_stats(X, j) for j in js]


def run_ray(n_tiny: int, X: np.ndarray, r: int) -> None:
    """shardc on a one-node Ray runtime against Ray tasks written directly (same run, interleaved rounds)."""
    import ray

    rows, cols = X.shape
    ray.init(num_cpus=2, object_store_memory=int(X.nbytes * 2.5), include_dashboard=False, log_to_driver=False)
    try:
        item, batch, blocks = (ray.remote(f) for f in (ray_item, ray_batch, ray_blocks))
        on = Cluster("ray", macro_seconds=2.0)
        n_task = 2_000
        step = -(-n_tiny // 8)
        bd = shardc.shards(n_tiny, block_size=step)
        with shardc.buffer("i8", n_tiny) as o:
            go = lambda: shardc.shard_map(n_tiny, tiny, out={"o": o}, profile="speed", workers=2, cluster=on)  # noqa: E731
            t_first, _ = median_time(go, 1)
            median_time(lambda: shardc.shard_map(bd, batch_shard, workers=2, cluster=on), 1)  # its shard time learned
            rd = Rounds(
                {
                    "local": lambda: shardc.shard_map(n_tiny, tiny, out={"o": o}, profile="speed", workers=2),
                    "shardc": go,
                    "ray_item": lambda: ray.get([item.remote(i) for i in range(n_task)]),
                    "ray_batched": lambda: ray.get(
                        [batch.remote(lo, min(n_tiny, lo + step)) for lo in range(0, n_tiny, step)]
                    ),
                    "shardc_batched": lambda: shardc.shard_map(bd, batch_shard, workers=2, cluster=on),
                },
                r,
            )
            assert np.array_equal(o.array, np.arange(n_tiny))
        rd.show("ray.tiny")
        assert sum(len(b) for b in rd.last["ray_batched"]) == n_tiny
        assert sum(len(b) for b in rd.last["shardc_batched"].results) == n_tiny
        emit("ray.tiny.local", n_tiny / rd.t("local"), "items/s")
        emit("ray.tiny.shardc_first_call", n_tiny / t_first, "items/s")
        emit("ray.tiny.shardc", n_tiny / rd.t("shardc"), "items/s")
        emit("ray.tiny.shardc_vs_local", rd.vs("shardc", "local"), "x")
        emit("ray.tiny.ray_task_per_item", n_task / rd.t("ray_item"), "items/s")
        emit("ray.tiny.ray_batched_tasks", n_tiny / rd.t("ray_batched"), "items/s")
        emit("ray.tiny.shardc_batched", n_tiny / rd.t("shardc_batched"), "items/s")
        # Like for like: a shard per item against a task per item (2k tasks: a rate), batches
        # against batches (the last line crosses forms: 2M shards writing an out buffer
        # against 8 list-building tasks).
        emit("ray.tiny.shardc_vs_ray_task_per_item", (n_tiny / rd.t("shardc")) / (n_task / rd.t("ray_item")), "x")
        emit("ray.tiny.shardc_batched_vs_ray_batched", rd.vs("shardc_batched", "ray_batched"), "x")
        emit("ray.tiny.shardc_per_shard_vs_ray_batched", rd.vs("shardc", "ray_batched"), "x")

        d = shardc.shards(cols, block_size=BLOCK)
        mean, var = shardc.buffer("f8", cols), shardc.buffer("f8", cols)
        shardc.shard_map(d, colstats, borrow={"X": X}, out={"mean": mean, "var": var})
        ref = mean.array.copy()
        go2 = lambda: shardc.shard_map(  # noqa: E731
            d, colstats, borrow={"X": X}, out={"mean": mean, "var": var}, workers=2, cluster=on
        )
        t_first, first = median_time(go2, 1)
        Xs = shardc.share(X)  # made once, not timed: the like-for-like form of ray.put (see run_colstats)
        go3 = lambda: shardc.shard_map(  # noqa: E731
            d, colstats, borrow={"X": Xs}, out={"mean": mean, "var": var}, workers=2, cluster=on
        )
        median_time(go3, 1)
        t0 = time.perf_counter()
        xr = ray.put(X)
        t_put = time.perf_counter() - t0
        nb = cols // BLOCK
        half = nb // 2
        rd = Rounds(
            {
                "local": lambda: shardc.shard_map(
                    d, colstats, borrow={"X": X}, out={"mean": mean, "var": var}, workers=2
                ),
                "shardc": go2,
                "shardc_share": go3,
                "ray_task": lambda: ray.get([blocks.remote(xr, [j]) for j in range(nb)]),
                "ray_batched": lambda: ray.get(
                    [blocks.remote(xr, list(range(0, half))), blocks.remote(xr, list(range(half, nb)))]
                ),
            },
            r,
        )
        rd.show("ray.colstats")
        assert np.array_equal(mean.array, ref)
        assert np.allclose(np.concatenate([g[0][0] for g in rd.last["ray_task"]]), ref)
        emit("ray.colstats.local", rd.t("local"), "s")
        emit("ray.colstats.shardc_first_call", t_first, "s")
        emit("ray.colstats.shardc_first_call.bytes_inputs", first.diagnostics.cluster["bytes_inputs_per_node"], "B")
        emit("ray.colstats.shardc", rd.t("shardc"), "s")
        emit("ray.colstats.shardc.bytes_inputs", rd.last["shardc"].diagnostics.cluster["bytes_inputs_per_node"], "B")
        emit("ray.colstats.shardc_vs_local", rd.vs("shardc", "local"), "x")
        emit("ray.colstats.shardc_share_handle", rd.t("shardc_share"), "s")
        emit(
            "ray.colstats.shardc_share_handle.bytes_inputs",
            rd.last["shardc_share"].diagnostics.cluster["bytes_inputs_per_node"],
            "B",
        )
        emit("ray.colstats.ray_put", t_put, "s")
        emit_check("ray.colstats.plain_array", X)
        emit("ray.colstats.ray_task_per_block", rd.t("ray_task"), "s")
        emit("ray.colstats.ray_batched_tasks", rd.t("ray_batched"), "s")
        emit("ray.colstats.shardc_vs_ray_task_per_block", rd.vs("shardc", "ray_task"), "x")
        emit("ray.colstats.shardc_vs_ray_batched", rd.vs("shardc", "ray_batched"), "x")
        emit("ray.colstats.shardc_share_handle_vs_ray_task_per_block", rd.vs("shardc_share", "ray_task"), "x")
        emit("ray.colstats.shardc_share_handle_vs_ray_batched", rd.vs("shardc_share", "ray_batched"), "x")
        Xs.close()
        mean.close()
        var.close()
    finally:
        shardc.cluster.close("ray")
        ray.shutdown()


if __name__ == "__main__":
    main()
