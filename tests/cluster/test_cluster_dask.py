"""shard_map(..., cluster=client) on a Dask LocalCluster of two process workers standing in for two nodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import psutil
import pytest

import shardc
import shardc.cluster
from shardc.cluster import Cluster
from shardc.errors import ClusterError, ShardMapError

distributed = pytest.importorskip("distributed")

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module

sys.path.insert(0, str(Path(__file__).parent))
from _cluster_helpers import (  # noqa: E402, F401
    N,
    agent_procs,
    check_big_values,
    leaked_segment_files,
    run_rich,
    wait_no_agents,
)

ROOT = str(Path(__file__).resolve().parent.parent.parent)

# Starts a local Dask/Ray cluster: its own CI step (.ci/run), not the core run (-m cluster).
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    cluster = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, silence_logs=40
    )
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        shardc.cluster.close(c)  # the session's agents stop with it (psutil-checked below)
        wait_no_agents()
        c.close()
        cluster.close()
        wait_no_agents()


def test_results_outs_and_seeds_equal_a_local_run(client: Any) -> None:
    """Values (shard order), out buffers (bytes) and every RNG (shard.rng, np.random, random) equal a local run; inputs went once per node; nothing leaks."""
    from shardc.segment import live_segments

    local, rows0, ids0 = run_rich(workers=1)
    before = len(live_segments())
    res, rows1, ids1 = run_rich(workers=1, cluster=Cluster(client, macro_seconds=0.05))
    assert len(live_segments()) == before
    assert res.results == local.results
    assert rows1.tobytes() == rows0.tobytes() and ids1.tobytes() == ids0.tobytes()
    c = res.diagnostics.cluster
    assert len(c["macros"]) >= 4 and sorted((m["lo"], m["hi"]) for m in c["macros"])[-1][1] == N
    sent = sum(a.nbytes for a in (np.zeros(N * 10), np.zeros((N * 10, 3), np.float32)))
    for node in c["nodes"].values():
        assert len(node["agents"]) == 1  # one agent per node for the whole call
        assert node["bytes_inputs"] >= sent and node["bytes_inputs"] < sent + 4096  # once (+ the pickled dict, ids)
    assert "cluster" in str(res.report())
    # nodes -> workers: each macro-shard names its node's workers and their shards (all of them)
    assert sum(lane[4] for m in c["macros"] for lane in m["lanes"]) == N
    for m in c["macros"]:
        node_pids = set(c["nodes"][m["node"]]["worker_pids"])
        assert m["lanes"] and {lane[1] for lane in m["lanes"]} <= node_pids
        for _slot, _pid, t0, t1, n, busy in m["lanes"]:
            assert n > 0 and t0 <= t1 and 0 <= busy <= (t1 - t0) + 1e-3
            assert m["t_done"] - m["seconds"] - 0.5 <= t0 and t1 <= m["t_done"] + 0.5  # inside its macro-shard
    assert "worker 0 (pid " in str(res.report())
    pids = [p for n in c["nodes"].values() for p in n["agents"] + n["worker_pids"]]
    assert set(c["nodes"][n]["agents"][0] for n in c["nodes"]) <= {
        p.pid for p in agent_procs()
    }  # kept for the next call
    shardc.cluster.close(client)
    wait_no_agents()  # closing the session stopped its agents (and their pools)
    assert pids and not leaked_segment_files(pids)


def test_big_values_come_back_as_a_local_run_returns_them(client: Any) -> None:
    """Lists (their workers' pickles, forwarded by the agents in memfd replies), arrays, None and
    tuples come back equal to a local run's, in shard order, from two Dask nodes."""
    check_big_values(cluster=Cluster(client, macro_seconds=0.05))


def test_empty_and_object_inputs_reach_the_nodes(client: Any) -> None:
    """A zero-size array and a plain object are borrowed on the nodes as locally."""

    def shapes(shard: Any, e: np.ndarray, cfg: dict[str, Any]) -> Any:
        return (e.shape, e.dtype.str, cfg["k"][shard.id])

    kw: dict[str, Any] = {"borrow": {"e": np.zeros((0, 3), np.float32), "cfg": {"k": list("abcd")}}, "workers": 1}
    res = shardc.shard_map(4, shapes, cluster=Cluster(client, macro_seconds=0.01), **kw)
    assert res.results == shardc.shard_map(4, shapes, **kw).results == [((0, 3), "<f4", c) for c in "abcd"]


def test_same_answers_with_one_node_and_with_retries(client: Any, tmp_path: Path) -> None:
    """Shards failing once are retried inside their node; the values still equal a local run with one node's worth of workers."""

    def flaky(shard: Any, mark: str) -> Any:
        p = Path(mark) / f"{shard.id}"
        if shard.id % 7 == 3 and not p.exists():
            p.touch()
            raise RuntimeError(f"first try of shard {shard.id}")
        return shard.rng.integers(0, 2**62)

    (tmp_path / "l").mkdir()
    (tmp_path / "c").mkdir()
    local = shardc.shard_map(50, flaky, borrow={"mark": str(tmp_path / "l")}, seed=5, workers=1)
    res = shardc.shard_map(
        50, flaky, borrow={"mark": str(tmp_path / "c")}, seed=5, workers=1, cluster=Cluster(client, macro_seconds=0.05)
    )
    assert res.results == local.results and res.diagnostics.retries == 7
    assert sum(m["retries"] for m in res.diagnostics.cluster["macros"]) == 7


def test_a_shard_failing_for_good_is_reported_with_its_global_id(client: Any) -> None:
    """A permanently failing shard: ShardMapError, its failure keyed by its global id, every other value there."""

    def bad(shard: Any) -> int:
        if shard.id == 37:
            raise ValueError("shard 37 is bad")
        return shard.id

    with pytest.raises(ShardMapError, match="first: shard 37 after 2 attempt") as info:
        shardc.shard_map(60, bad, max_retries=1, workers=1, cluster=Cluster(client, macro_seconds=0.05))
    r = info.value.result
    assert list(r.failures) == [37] and r.failures[37].error_type.endswith("ValueError")
    assert [v for i, v in enumerate(r.results) if i != 37] == [i for i in range(60) if i != 37]


def test_an_agent_with_another_build_refuses(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agents check the caller's version and build stamp and refuse a mismatch with a clear error."""
    import shardc._lowlevel as ll

    monkeypatch.setattr(ll, "build_stamp", lambda: "0.0.0+deadbeefdeadbeef")
    with pytest.raises(ClusterError, match=r"caller runs shardc .* built 0\.0\.0\+deadbeefdeadbeef; install the same"):
        shardc.shard_map(8, lambda s: s.id, workers=1, cluster=client)
    shardc.cluster.close(client)
    wait_no_agents()


def test_a_fun_the_nodes_cannot_load_fails_with_the_reason(
    client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fun from a module only the caller can import: ClusterError saying the agent could not set up the call and why (not retried)."""
    (tmp_path / "only_here_mod.py").write_text("def f(shard):\n    return shard.id\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_here_mod  # type: ignore[import-not-found]

    t0 = time.monotonic()
    with pytest.raises(
        ClusterError, match=r"could not set up the call: ModuleNotFoundError: No module named 'only_here_mod'"
    ):
        shardc.shard_map(8, only_here_mod.f, workers=1, cluster=client)
    assert time.monotonic() - t0 < 20
    shardc.cluster.close(client)
    wait_no_agents()


def test_two_nodes_writing_the_same_bytes_differently_fail_loudly(client: Any) -> None:
    """An unmergeable write pattern fails naming the buffer and the offset; equal writes merge."""

    def clash(shard: Any, o: Any) -> None:
        o[0] = shard.id

    def agree(shard: Any, o: Any) -> None:
        o[0] = 42

    with shardc.buffer("i8", 4) as o:
        with pytest.raises(
            ClusterError, match=r"out\['o'\]: byte offset 0 \(element \(0,\)\) was written with different"
        ):
            shardc.shard_map(40, clash, out={"o": o}, workers=1, cluster=Cluster(client, macro_seconds=0.02))
        shardc.shard_map(40, agree, out={"o": o}, workers=1, cluster=Cluster(client, macro_seconds=0.02))
        assert list(o.array) == [42, 0, 0, 0]


def _colsum(shard: Any, x: np.ndarray, o: Any) -> float:
    o[shard.idx] = x[shard.idx] * 2
    return float(x[shard.idx].sum())


def _sum_call(client: Any, x: np.ndarray, **kw: Any) -> tuple[shardc.ShardResult, np.ndarray]:
    with shardc.buffer("f8", x.size) as o:
        opts = Cluster(client, macro_seconds=0.05, **kw)
        res = shardc.shard_map(
            shardc.shards(x.size, block_size=2000), _colsum, borrow={"x": x}, out={"o": o}, workers=1, cluster=opts
        )
        return res, o.array.copy()


def _agents_of(res: shardc.ShardResult) -> set[int]:
    return {p for n in res.diagnostics.cluster["nodes"].values() for p in n["agents"]}


def _bump(shard: Any, o: Any) -> None:
    o[shard.idx] += 1  # reads the out buffer: its start bytes on the node must be the caller's


def test_an_agent_reusing_an_out_buffer_starts_it_from_the_callers_bytes(client: Any) -> None:
    """Agents keep ended calls' out buffers for the next call of the same shape: each call still
    starts from its caller's bytes (zeros, or what the caller put there), never from the last call's."""
    opts = Cluster(client, macro_seconds=0.05)
    d = shardc.shards(4096, block_size=256)
    for start in (0, 0, 5, 0):
        with shardc.buffer("i8", 4096, init=start) as o:
            shardc.shard_map(d, _bump, out={"o": o}, workers=1, cluster=opts)
            assert np.array_equal(o.array, np.full(4096, start + 1))


def test_a_second_call_reuses_the_agents_and_moves_no_input_bytes(client: Any) -> None:
    """Call 2 with the same input: the same agent processes (alive in between, psutil), 0 input bytes sent to or copied on any node."""
    x = np.random.default_rng(1).random(200_000)
    r1, o1 = _sum_call(client, x)
    between = {p.pid for p in agent_procs()}
    assert _agents_of(r1) <= between
    r2, o2 = _sum_call(client, x)
    c1, c2 = r1.diagnostics.cluster, r2.diagnostics.cluster
    assert c1["bytes_inputs_per_node"] == x.nbytes and c2["bytes_inputs_per_node"] == 0
    assert c2["inputs_cached"] == 1 and all(n["bytes_inputs"] == 0 for n in c2["nodes"].values())
    assert _agents_of(r2) <= _agents_of(r1) | between
    assert r2.results == r1.results and np.array_equal(o1, o2) and np.array_equal(o2, x * 2)
    assert "inputs 0 B sent once per node (1 input(s) already on the nodes" in str(r2.report())


def test_a_changed_input_is_sent_again_never_served_stale(client: Any) -> None:
    """One element changed in place between calls: its new bytes are sent and the results match a local run of the new array."""
    x = np.arange(300_000, dtype=np.float64)
    _sum_call(client, x)
    x[123_457] = -7.0  # one element in the middle: a sampled fingerprint could miss it, the content hash does not
    res, o = _sum_call(client, x)
    c = res.diagnostics.cluster
    assert c["bytes_inputs_per_node"] == x.nbytes and c["inputs_cached"] == 0
    with shardc.buffer("f8", x.size) as lo:
        local = shardc.shard_map(
            shardc.shards(x.size, block_size=2000), _colsum, borrow={"x": x}, out={"o": lo}, workers=1
        )
        assert res.results == local.results and np.array_equal(o, lo.array)
    y = x.copy()  # the same bytes in another array: served from the nodes' cache
    r2, _ = _sum_call(client, y)
    assert r2.diagnostics.cluster["bytes_inputs_per_node"] == 0 and r2.results == local.results


@pytest.mark.parametrize("where", ["first page", "last page", "middle byte"])
def test_a_write_tracked_input_changed_in_one_byte_is_sent_again(
    client: Any, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the kernel tracking writes to the array (shardc.pagetrack), one byte flipped in the first page, the last page
    or the middle between calls: only the written page is compared, the new bytes are sent, the results are a local run's."""
    from shardc import pagetrack
    from shardc.share import default_cache

    if pagetrack.unavailable() is not None:
        pytest.skip(f"no kernel write tracking here: {pagetrack.unavailable()}")
    monkeypatch.setattr(pagetrack, "TRACK_MIN_BYTES", 1 << 20)
    x = np.arange(300_000, dtype=np.float64)
    _sum_call(client, x)
    r1, _ = _sum_call(client, x)
    assert r1.diagnostics.cluster["bytes_inputs_per_node"] == 0 and default_cache.bytes_compared <= 2 * 4096
    pos = {"first page": 1, "last page": x.nbytes - 2, "middle byte": x.nbytes // 2 + 5}[where]
    x.view(np.uint8)[pos] ^= 0x10
    res, o = _sum_call(client, x)
    assert res.diagnostics.cluster["bytes_inputs_per_node"] == x.nbytes and default_cache.bytes_compared <= 3 * 4096
    with shardc.buffer("f8", x.size) as lo:
        local = shardc.shard_map(
            shardc.shards(x.size, block_size=2000), _colsum, borrow={"x": x}, out={"o": lo}, workers=1
        )
        assert res.results == local.results and np.array_equal(o, lo.array) and np.array_equal(o, x * 2)
    default_cache.clear()


def test_inputs_beyond_the_cache_budget_are_dropped_and_sent_again(client: Any) -> None:
    """input_cache_bytes=0 keeps only the last call's inputs: A, B, then A again sends A's bytes again."""
    a, b = np.full(50_000, 1.0), np.full(50_000, 2.0)
    assert _sum_call(client, a, input_cache_bytes=0)[0].diagnostics.cluster["bytes_inputs_per_node"] == a.nbytes
    assert _sum_call(client, b, input_cache_bytes=0)[0].diagnostics.cluster["bytes_inputs_per_node"] == b.nbytes
    res, o = _sum_call(client, a, input_cache_bytes=0)
    assert res.diagnostics.cluster["bytes_inputs_per_node"] == a.nbytes and np.array_equal(o, a * 2)
    assert _sum_call(client, a)[0].diagnostics.cluster["bytes_inputs_per_node"] == 0


def test_idle_agents_exit_and_the_next_call_starts_new_ones(client: Any) -> None:
    """agent_idle_timeout=1: the agents exit on their own (psutil), the next call starts fresh ones from the nodes' copy (no bytes over the network)."""
    shardc.cluster.close(client)
    x = np.arange(10_000, dtype=np.float64)
    r1, _ = _sum_call(client, x, agent_idle_timeout=1)
    assert _agents_of(r1) <= {p.pid for p in agent_procs()}
    wait_no_agents(15)
    r2, o = _sum_call(client, x, agent_idle_timeout=1)
    c = r2.diagnostics.cluster
    assert not (_agents_of(r2) & _agents_of(r1)) and np.array_equal(o, x * 2)
    assert c["bytes_inputs_per_node"] == 0 and sum(n["bytes_inputs"] for n in c["nodes"].values()) >= x.nbytes


def test_agents_stop_when_the_calling_process_exits(client: Any, tmp_path: Path) -> None:
    """Another Python process runs a call on this cluster and exits without closing anything: its agents stop (atexit), the workers stay."""
    code = (
        "import sys, numpy as np, shardc, distributed, cloudpickle\n"
        f"c = distributed.Client({client.scheduler.address!r})\n"
        "r = shardc.shard_map(40, lambda s: s.id, workers=1, cluster=c)\n"
        "assert r.results == list(range(40))\n"
        "print(sorted(p for n in r.diagnostics.cluster['nodes'].values() for p in n['agents']))\n"
    )
    shardc.cluster.close(client)
    wait_no_agents()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("[")
    wait_no_agents(15)
    assert len(_worker_pids(client)) == 2


def _worker_pids(client: Any) -> dict[str, int]:
    return client.run(os.getpid)  # type: ignore[no-any-return]


def test_a_worker_killed_mid_run_has_its_work_redone(client: Any, tmp_path: Path) -> None:
    """SIGKILL of a Dask worker while its agent runs a macro-shard: that macro-shard is rerun elsewhere, results equal a local run, the report and the picture say so, no agent survives."""

    def slow(shard: Any, o: Any) -> float:
        time.sleep(0.02)
        o[shard.id] = shard.id + 0.5
        return float(shard.rng.random())

    local = shardc.shard_map(200, slow, out={"o": shardc.buffer("f8", 200)}, seed=3, workers=1)
    shardc.cluster.close(client)  # no agent of an earlier call: the killer waits for this call's
    wait_no_agents()
    pids = _worker_pids(client)
    victim_addr, victim = sorted(pids.items())[0]
    killed: list[float] = []

    def killer() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(p.ppid() == victim for p in agent_procs()):
                time.sleep(0.4)  # inside a macro-shard
                os.kill(victim, signal.SIGKILL)
                killed.append(time.monotonic())
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    with shardc.buffer("f8", 200) as o:
        res = shardc.shard_map(200, slow, out={"o": o}, seed=3, workers=1, cluster=Cluster(client, macro_seconds=0.3))
        t.join(30)
        assert killed, "the victim worker never started an agent"
        assert res.results == local.results
        assert np.array_equal(o.array, np.arange(200) + 0.5)
    c = res.diagnostics.cluster
    finished = {(m["macro"], m["node"]) for m in c["macros"]}
    lost = [s for s in c["starts"] if s["node"] == victim_addr and (s["macro"], s["node"]) not in finished]
    assert lost, "no macro-shard was lost with the killed worker"
    # Each macro-shard is in the result exactly once: completed ones were not rerun.
    assert sorted(m["macro"] for m in c["macros"]) == sorted({m["macro"] for m in c["macros"]})
    assert "did not finish it (node lost); rerun" in str(res.report())
    fig = res.plot(tmp_path / "timeline.png")  # one row per node, the lost try marked, a lane per worker
    assert (tmp_path / "timeline.png").stat().st_size > 0
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert any(victim_addr in t for t in labels)
    assert sum(t.startswith("worker 0 (pid") for t in labels) == len(c["nodes"])  # under each node that finished
    assert len(fig.axes[0].lines) >= 1  # the x of the lost try
    shardc.cluster.close(client)
    wait_no_agents()


def test_a_lost_scheduler_fails_the_call_within_the_timeout() -> None:
    """The scheduler closing mid-run: ClusterError naming the scheduler within scheduler_timeout (+ slack), no hang, no agent left."""

    def slow(shard: Any) -> int:
        time.sleep(0.05)
        return int(shard.id)

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cluster = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, silence_logs=50
    )
    c = distributed.Client(cluster)
    lost: list[float] = []

    def close_scheduler() -> None:
        deadline = time.monotonic() + 30
        while len(agent_procs()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        lost.append(time.monotonic())
        cluster.loop.add_callback(cluster.scheduler.close)

    t = threading.Thread(target=close_scheduler)
    t.start()
    try:
        with pytest.raises(
            ClusterError, match=r"dask scheduler has been unreachable for \d+ s \(scheduler_timeout=2 s\)"
        ):
            shardc.shard_map(4000, slow, workers=1, cluster=Cluster(c, scheduler_timeout=2, macro_seconds=0.5))
        assert lost and time.monotonic() - lost[0] < 2 + 5
    finally:
        t.join(30)
        for close in (c.close, cluster.close):
            try:
                close(timeout=5)
            except Exception:  # noqa: BLE001 - a cluster without its scheduler closes with complaints
                pass
        # Nannies without a scheduler wait for it for minutes: end the processes this test started.
        mine = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        for p in mine:
            if "resource_tracker" not in " ".join(p.cmdline()):
                p.kill()
        psutil.wait_procs(mine, timeout=10)
    wait_no_agents(20)
