"""shard_map(..., cluster="ray") on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

import shardc
import shardc.cluster
from shardc.cluster import Cluster

ray = pytest.importorskip("ray")  # Ray has wheels for Linux x86-64/arm64 and macOS: runs here, never skipped
from ray.cluster_utils import Cluster as RayCluster  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _cluster_helpers import agent_procs, check_big_values, run_rich, wait_no_agents  # noqa: E402

# Starts a local Dask/Ray cluster: its own CI step (.ci/run), not the core run (-m cluster).
pytestmark = pytest.mark.cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = str(Path(__file__).resolve().parent.parent.parent)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    # The raylets (and so the Ray workers) inherit PYTHONPATH: they import this shardc.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")
    rc = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20})
    rc.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    ray.init(address=rc.address, log_to_driver=False)
    rc.wait_for_nodes()
    try:
        yield rc
    finally:
        shardc.cluster.close("ray")
        ray.shutdown()
        rc.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
        wait_no_agents()


def test_ray_results_outs_and_seeds_equal_a_local_run(ray_cluster: Any) -> None:
    """On two Ray nodes: values, out buffers and every RNG equal a local run; inputs went once per node; agents stopped."""
    local, rows0, ids0 = run_rich(workers=1)
    res, rows1, ids1 = run_rich(workers=1, cluster=Cluster("ray", macro_seconds=0.05))
    assert res.results == local.results
    assert rows1.tobytes() == rows0.tobytes() and ids1.tobytes() == ids0.tobytes()
    c = res.diagnostics.cluster
    assert c["backend"] == "ray" and len(c["nodes_at_start"]) == 2
    for n in c["nodes"].values():
        assert len(n["agents"]) == 1 and n["bytes_inputs"] > 0
    shardc.cluster.close("ray")
    wait_no_agents()


def test_ray_big_values_come_back_as_a_local_run_returns_them(ray_cluster: Any) -> None:
    """Lists (their workers' pickles, forwarded by the agents in memfd replies), arrays, None and
    tuples come back equal to a local run's, in shard order, from two nodes."""
    res = check_big_values(cluster=Cluster("ray", macro_seconds=0.05))
    assert len(res.diagnostics.cluster["nodes"]) >= 1


def test_ray_second_call_reuses_actors_agents_and_inputs(ray_cluster: Any) -> None:
    """On Ray too: a second call runs on the same agents and puts no input bytes; a changed input is put anew."""

    def f(shard: Any, x: np.ndarray) -> float:
        return float(x[shard.idx].sum())

    x = np.arange(20_000, dtype=np.float64)
    d = shardc.shards(x.size, block_size=1000)
    opts = Cluster("ray", macro_seconds=0.05)
    r1 = shardc.shard_map(d, f, borrow={"x": x}, workers=1, cluster=opts)
    r2 = shardc.shard_map(d, f, borrow={"x": x}, workers=1, cluster=opts)
    c1, c2 = r1.diagnostics.cluster, r2.diagnostics.cluster
    assert c1["bytes_inputs_per_node"] == x.nbytes and c2["bytes_inputs_per_node"] == 0
    a1 = {p for n in c1["nodes"].values() for p in n["agents"]}
    a2 = {p for n in c2["nodes"].values() for p in n["agents"]}
    assert a2 <= a1 and all(n["bytes_inputs"] == 0 for n in c2["nodes"].values())
    x[x.size // 2] += 1.0
    r3 = shardc.shard_map(d, f, borrow={"x": x}, workers=1, cluster=opts)
    assert r3.diagnostics.cluster["bytes_inputs_per_node"] == x.nbytes
    assert r3.results == shardc.shard_map(d, f, borrow={"x": x}, workers=1).results != r2.results
    shardc.cluster.close("ray")
    wait_no_agents()


def test_ray_node_removed_mid_run_has_its_work_redone(ray_cluster: Any) -> None:
    """Removing the second Ray node while its agent runs: its macro-shard is rerun on the head node, results equal a local run."""

    def slow(shard: Any, o: Any) -> float:
        time.sleep(0.02)
        o[shard.id] = shard.id + 0.5
        return float(shard.rng.random())

    local = shardc.shard_map(150, slow, out={"o": shardc.buffer("f8", 150)}, seed=3, workers=1)
    shardc.cluster.close("ray")  # no agent of an earlier call: the remover waits for this call's
    wait_no_agents()
    victim = [n for n in ray_cluster.list_all_nodes() if n is not ray_cluster.head_node][0]
    removed: list[float] = []

    def remover() -> None:
        deadline = time.monotonic() + 60
        while len(agent_procs()) < 4 and time.monotonic() < deadline:  # two agents, each with one pool worker
            time.sleep(0.05)
        time.sleep(0.3)
        ray_cluster.remove_node(victim, allow_graceful=False)
        removed.append(time.monotonic())

    t = threading.Thread(target=remover)
    t.start()
    with shardc.buffer("f8", 150) as o:
        res = shardc.shard_map(150, slow, out={"o": o}, seed=3, workers=1, cluster=Cluster("ray", macro_seconds=0.3))
        t.join(60)
        assert removed, "the second node was never removed"
        assert res.results == local.results
        assert np.array_equal(o.array, np.arange(150) + 0.5)
    c = res.diagnostics.cluster
    assert c["lost"] and all("was lost" in e["error"] for e in c["lost"])
    assert sorted(m["macro"] for m in c["macros"]) == sorted({m["macro"] for m in c["macros"]})
    shardc.cluster.close("ray")
    wait_no_agents()


def test_ray_agent_with_another_build_refuses(ray_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Ray too, an agent refuses a caller with another build stamp, with a clear error, and no agent stays."""
    import shardc._lowlevel as ll
    from shardc.errors import ClusterError

    monkeypatch.setattr(ll, "build_stamp", lambda: "0.0.0+feedfacefeedface")
    with pytest.raises(ClusterError, match=r"built 0\.0\.0\+feedfacefeedface; install the same shardc build"):
        shardc.shard_map(8, lambda s: s.id, workers=1, cluster="ray")
    shardc.cluster.close("ray")
    wait_no_agents()
