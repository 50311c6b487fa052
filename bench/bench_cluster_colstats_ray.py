"""The 1 GiB column-statistics job on a one-node Ray runtime: shardc against Ray tasks, on its own.

``bench_cluster.py --only ray`` measures this job after its tiny-shard part, in one set of
interleaved rounds, and gave shardc 0.74-1.09x batched Ray tasks (median 0.95x over eleven runs
of the eleventh session).  This script runs only the column-statistics forms, each set with two
untimed warm-up rounds and then ``--rounds`` interleaved rounds, in two kinds of set: ``pair``
(shardc with a plain array against batched Ray tasks, nothing else) and ``all`` (the benchmark's
five forms: the local pool, shardc with a plain array, shardc with a ``shardc.share`` handle, a
Ray task per block, batched Ray tasks).  ``--before`` first runs what the benchmark runs before
this job (``tiny``: three 2M-shard cluster calls; ``batch``: three batched ones returning lists;
``raytiny``: five rounds of batched Ray tasks returning lists), to see whether it matters.

Like for like: the same NumPy lines (``X[:, block].mean(0)``, ``.var(0)``) over 32 blocks of
256 columns, 2 worker processes each side (the node's pool; ``ray.init(num_cpus=2)``); Ray's
input is ``ray.put`` once and shardc's repeated calls send nothing (the node keeps the input).

Usage::

    PYTHONPATH=. python bench/bench_cluster_colstats_ray.py [--rounds 7] [--before tiny]

Prints per set the median of shardc's speed over batched Ray's (time of Ray / time of shardc,
per round; > 1: shardc faster) and each form's median seconds.
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
from shardc.cluster import Cluster

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cluster  # noqa: E402  (the same kernels as the full benchmark)
from bench_cluster import BLOCK, colstats, ray_blocks  # noqa: E402


def tiny(shard: Any, o: Any) -> None:
    o[shard.id] = shard.id


def batch_shard(shard: Any) -> list[int]:
    return list(range(shard.start, shard.stop))


def ray_batch(lo: int, hi: int) -> list[int]:
    return list(range(lo, hi))


def rounds(forms: dict[str, Callable[[], Any]], r: int, warmup: int = 2) -> dict[str, list[float]]:
    for _ in range(warmup):
        for f in forms.values():
            f()
    ts: dict[str, list[float]] = {k: [] for k in forms}
    for _ in range(r):
        for k, f in forms.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return ts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--before", choices=["none", "tiny", "batch", "raytiny"], default="none")
    ap.add_argument("--sets", default="pair,all,pair,all")
    args = ap.parse_args()
    import cloudpickle
    import ray

    for mod in (bench_cluster, sys.modules[__name__]):  # Ray's workers and the nodes cannot import them
        cloudpickle.register_pickle_by_value(mod)

    print(f"# load average {os.getloadavg()}, {os.cpu_count()} CPUs, shared machine", flush=True)
    X = np.random.default_rng(0).random((16384, 8192))
    ray.init(num_cpus=2, object_store_memory=int(X.nbytes * 2.5), include_dashboard=False, log_to_driver=False)
    try:
        blocks = ray.remote(ray_blocks)
        on = Cluster("ray", macro_seconds=2.0)
        d = shardc.shards(X.shape[1], block_size=BLOCK)
        mean, var = shardc.buffer("f8", X.shape[1]), shardc.buffer("f8", X.shape[1])
        Xs = shardc.share(X)
        xr = ray.put(X)
        nb = X.shape[1] // BLOCK
        half = nb // 2
        if args.before == "tiny":
            with shardc.buffer("i8", 2_000_000) as o:
                for _ in range(3):
                    shardc.shard_map(2_000_000, tiny, out={"o": o}, profile="speed", workers=2, cluster=on)
        elif args.before == "batch":
            bd = shardc.shards(2_000_000, block_size=250_000)
            for _ in range(3):
                shardc.shard_map(bd, batch_shard, workers=2, cluster=on)
        elif args.before == "raytiny":
            rb = ray.remote(ray_batch)
            for _ in range(5):
                ray.get([rb.remote(lo, lo + 250_000) for lo in range(0, 2_000_000, 250_000)])
        out = {"mean": mean, "var": var}
        forms: dict[str, Callable[[], Any]] = {
            "local": lambda: shardc.shard_map(d, colstats, borrow={"X": X}, out=out, workers=2),
            "shardc": lambda: shardc.shard_map(d, colstats, borrow={"X": X}, out=out, workers=2, cluster=on),
            "shardc_share": lambda: shardc.shard_map(d, colstats, borrow={"X": Xs}, out=out, workers=2, cluster=on),
            "ray_task": lambda: ray.get([blocks.remote(xr, [j]) for j in range(nb)]),
            "ray_batched": lambda: ray.get(
                [blocks.remote(xr, list(range(0, half))), blocks.remote(xr, list(range(half, nb)))]
            ),
        }
        for kind in args.sets.split(","):
            keys = ["shardc", "ray_batched"] if kind == "pair" else list(forms)
            ts = rounds({k: forms[k] for k in keys}, args.rounds)
            ratio = statistics.median(b / a for a, b in zip(ts["shardc"], ts["ray_batched"], strict=True))
            medians = " ".join(f"{k} {statistics.median(v):.3f}" for k, v in ts.items())
            print(f"{kind}\tshardc_vs_ray_batched\t{ratio:.3f}\tx\t# {medians} s", flush=True)
        want = X[:, :BLOCK].mean(axis=0)  # both sides computed the same numbers
        assert np.allclose(mean.array[:BLOCK], want) and np.allclose(forms["ray_batched"]()[0][0][0], want)
        Xs.close()
    finally:
        shardc.cluster.close("ray")
        ray.shutdown()
    print(f"# load average at the end {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
