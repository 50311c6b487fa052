"""Helpers shared by the cluster tests (Dask and Ray): agent processes, the reference job."""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

import cloudpickle
import numpy as np
import psutil

import shardc

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the nodes cannot import the tests

N = 240


def agent_procs() -> list[psutil.Process]:
    """Every live shardc agent process on this machine (and its forked pool workers)."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and "shardc.cluster.agent" in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def wait_no_agents(timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while agent_procs() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = agent_procs()
    assert not left, f"leaked agent processes: {[(p.pid, p.ppid()) for p in left]}"


def rich_fun(shard: Any, x: np.ndarray, f: np.ndarray, meta: dict[str, Any], rows: Any, ids: Any) -> Any:
    rows[shard.idx] = x[shard.idx] * meta["scale"] + shard.rng.random(shard.len)
    ids[shard.id] = shard.id * 3 + 1  # neighbouring shards share pages: merged at byte precision
    return (float(f[shard.idx, 1].sum()), shard.rng.random(), np.random.random(), random.random(), shard.id)


def run_rich(**kw: Any) -> tuple[shardc.ShardResult, np.ndarray, np.ndarray]:
    x = np.arange(N * 10, dtype=np.float64)
    f = np.asfortranarray(np.arange(N * 10 * 3, dtype=np.float32).reshape(N * 10, 3))
    rows = shardc.buffer("f8", N * 10)
    ids = shardc.buffer("i8", N, init=-1)  # non-zero start: the nodes must start from these bytes
    d = shardc.shards(N * 10, block_size=10)
    res = shardc.shard_map(
        d, rich_fun, borrow={"x": x, "f": f, "meta": {"scale": 2.5}}, out={"rows": rows, "ids": ids}, seed=11, **kw
    )
    out = (np.array(rows), np.array(ids))
    rows.close()
    ids.close()
    return res, *out


def leaked_segment_files(pids: list[int]) -> list[str]:
    """Named segments (/dev/shm, the temp dir) created by any of ``pids`` that still exist."""
    from shardc.segment import _tmpdir

    found = []
    for d in ("/dev/shm", _tmpdir()):
        if os.path.isdir(d):
            found += [f for f in os.listdir(d) for p in pids if f".{p}." in f and f.startswith("shardc")]
    return found


def big_values(shard: Any) -> Any:
    """Values of every kind a shard returns: a list (pickled by its worker, forwarded through
    the agent as that pickle), a NumPy array, None, a tuple (a frame of plain values)."""
    k = shard.id % 4
    if k == 0:
        return [shard.id * 7 + i for i in range(40_000)]  # > reply.INLINE_MAX: a memfd reply
    if k == 1:
        return np.full(1000, shard.id, dtype=np.int64)
    return None if k == 2 else (shard.id, float(shard.rng.random()))


def check_big_values(**kw: Any) -> shardc.ShardResult:
    """Run big_values locally and with ``kw`` (cluster=...): the same values, big replies sent."""
    d = shardc.shards(64, block_size=1)
    local = shardc.shard_map(d, big_values, seed=3, workers=1)
    res = shardc.shard_map(d, big_values, seed=3, workers=1, **kw)
    for a, b in zip(local.results, res.results, strict=True):
        assert type(a) is type(b)
        assert (a == b).all() if isinstance(a, np.ndarray) else a == b
    assert res.diagnostics.cluster["bytes_replies"] > 16 * 40_000  # the 16 lists came back (>= 1 byte an item)
    return res
