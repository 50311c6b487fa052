"""Cluster pieces that need no cluster: windows of a descriptor, out-buffer diffs and merging, the planner, arguments."""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shardc
from shardc.cluster import Cluster
from shardc.cluster.base import MacroPlanner
from shardc.cluster.outs import PAGE, OutMerger, rollback, take_diff
from shardc.cluster.window import WindowDescriptor
from shardc.errors import ClusterError, InvalidArgumentError
from shardc.share import default_cache


@pytest.mark.parametrize(
    "desc",
    [
        shardc.shards(1000, block_size=7),
        shardc.shards(1000, block_size=3, strategy="strided"),
        shardc.shards_list([[5, 1], [2], [9, 9, 3], [0], [4, 8]]),
    ],
    ids=["contiguous", "strided", "list"],
)
def test_window_shards_keep_their_global_identity(desc: shardc.ShardDescriptor) -> None:
    """Local shard k of window lo..hi is the descriptor's shard lo+k (id, idx, rng), also after pickling."""
    lo, hi = 1, min(4, desc.num_shards)
    w = WindowDescriptor(desc, lo, hi)
    back = pickle.loads(pickle.dumps(w))
    assert len(w) == len(back) == hi - lo
    for k in range(hi - lo):
        for make in (w.shard, back.shard, w.maker(), back.maker()):
            s = make(k, 1234)
            ref = desc.shard(lo + k, 1234)
            assert s == ref and s.id == lo + k
            assert np.array_equal(s.rng.random(3), ref.rng.random(3))


def test_window_of_a_list_descriptor_pickles_only_its_lists() -> None:
    """A window of shards_list carries its own index lists, not the whole descriptor's."""
    desc = shardc.shards_list([np.arange(10_000) for _ in range(50)])
    small = len(pickle.dumps(WindowDescriptor(desc, 3, 4)))
    assert small < len(pickle.dumps(desc)) / 20


def test_diff_sends_only_changed_bytes_and_snapshot_catches_up() -> None:
    """take_diff finds scattered byte changes (mask) and dense runs (no mask); a second diff is empty."""
    cur = np.zeros(5 * PAGE + 100, dtype=np.uint8)
    snap = cur.copy()
    cur[10] = 1
    cur[2 * PAGE : 3 * PAGE] = 7  # a whole page: no mask needed
    cur[-1] = 9  # the tail beyond the last full page
    runs = take_diff(cur, snap)
    assert [r[0] for r in runs] == [0, 2 * PAGE, 5 * PAGE]
    assert runs[0][2] is not None and runs[1][2] is None
    assert np.array_equal(cur, snap) and take_diff(cur, snap) == []
    cur[PAGE + 3] = 5
    rollback(cur, snap)
    assert cur[PAGE + 3] == 0


def test_merger_merges_disjoint_writes_into_a_view_and_names_a_conflict() -> None:
    """Writes of two macro-shards merge at byte precision (same value twice is fine); different values fail naming buffer, offset and element."""
    base = shardc.buffer("i4", (4, 6))
    view = base.array[:, ::2]  # not contiguous: merged through a copy
    view[...] = -1
    m = OutMerger({"o": view})
    a, sa = np.full(12, -1, np.int32), np.full(12, -1, np.int32)
    b, sb = sa.copy(), sa.copy()
    a[0], b[1], a[5], b[5] = 10, 11, 55, 55
    ra = take_diff(a.view(np.uint8), sa.view(np.uint8))
    rb = take_diff(b.view(np.uint8), sb.view(np.uint8))
    m.apply("o", ra, "A")
    m.apply("o", rb, "B")
    m.finish()
    assert view[0, 0] == 10 and view[0, 1] == 11 and view[1, 2] == 55 and view[3, 2] == -1
    assert base.array[0, 1] == 0  # the skipped columns untouched
    c, sc = np.full(12, -1, np.int32), np.full(12, -1, np.int32)
    c[5] = 99
    with pytest.raises(ClusterError, match=r"out\['o'\]: byte offset 20 \(element \(1, 2\)\).*by A, B and by C"):
        m.apply("o", take_diff(c.view(np.uint8), sc.view(np.uint8)), "C")
    base.close()


def test_planner_covers_every_shard_once_and_grows_to_the_target() -> None:
    """Macro-shards tile 0..n-1 in order; after a measurement they are sized to about the target time."""
    p = MacroPlanner(1_000_000, 2, 2.0)
    lo, hi = p.take()
    assert lo == 0 and hi == 4096  # n / (nodes * 64), at most 4096
    p.observe(hi - lo, (hi - lo) * 1e-5)  # 10 us a shard
    lo2, hi2 = p.take()
    assert lo2 == hi and hi2 - lo2 == 200_000  # 2 s worth
    covered = hi2
    while p.has_next():
        a, b = p.take()
        assert a == covered and b > a
        covered = b
    assert covered == 1_000_000
    few = MacroPlanner(8, 1, 2.0, workers=2)  # 8 long shards: every macro-shard keeps the node's 2 workers busy
    sizes = []
    while few.has_next():
        a, b = few.take()
        sizes.append(b - a)
        few.observe(b - a, 0.25 * (b - a))
    assert sum(sizes) == 8 and min(sizes) >= 2


def test_planner_sizes_the_first_macro_shards_from_an_earlier_calls_measure() -> None:
    """A repeated job (the session remembers its seconds per shard) starts with full-size
    macro-shards, not probes: 8 shards of 30 ms (0.24 s in all, under the tail's floor of
    0.1 x macro_seconds) go as one macro-shard, not as 2 + 2 + 4 one after the other."""
    sizes = []
    p = MacroPlanner(8, 1, 2.0, workers=2, per_shard=0.03)
    while p.has_next():
        a, b = p.take()
        sizes.append(b - a)
    assert sizes == [8]
    big = MacroPlanner(1_000_000, 2, 2.0, per_shard=1e-5)
    lo, hi = big.take()
    assert lo == 0 and hi == 200_000  # 2 s worth at once
    one = MacroPlanner(3_000_000, 1, 2.0, per_shard=3e-7)  # one node, 0.9 s of work: one macro-shard
    assert one.take() == (0, 3_000_000)
    one = MacroPlanner(30_000_000, 1, 2.0, per_shard=3e-7)  # 9 s of work: ~2 s pieces
    assert one.take() == (0, round(2.0 / 3e-7))
    probe = MacroPlanner(8, 1, 2.0, workers=2)
    assert probe.take() == (0, 2)  # without a measure: a probe of the pool's size


def test_job_signature_tells_jobs_apart() -> None:
    """The planner's hint is keyed by fun (by value), descriptor and local options."""
    import cloudpickle

    from shardc.cluster.base import job_signature

    def job(fun: object, n: int, workers: int) -> dict[str, object]:
        blob = cloudpickle.dumps(fun)
        local = {"workers": workers, "dispatch_opts": {}}
        return {"fun": blob, "kernel": None, "kernel_name": None, "desc": shardc.shards(n), "local": local}

    f, g = (lambda s: s.id), (lambda s: -s.id)
    assert job_signature(job(f, 100, 2)) == job_signature(job(f, 100, 2))
    assert (
        len(
            {
                job_signature(job(f, 100, 2)),
                job_signature(job(g, 100, 2)),
                job_signature(job(f, 101, 2)),
                job_signature(job(f, 100, 1)),
            }
        )
        == 4
    )


def test_bad_cluster_arguments_fail_before_anything_starts() -> None:
    """cluster= with pool=, an unknown engine, "ray" without ray.init() or bad options: clear errors."""
    f = lambda shard: shard.id  # noqa: E731
    with pytest.raises(InvalidArgumentError, match="pool= is a pool on this machine"):
        shardc.shard_map(4, f, cluster=object(), pool=object())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="dask.distributed.Client"):
        shardc.shard_map(4, f, cluster=object())
    code = (
        "import shardc, pytest\n"
        "with pytest.raises(shardc.InvalidArgumentError, match=r'call ray.init'):\n"
        "    shardc.shard_map(4, lambda s: s.id, cluster='ray')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)  # importing ray costs seconds
    for kw in ({"macro_seconds": 0}, {"scheduler_timeout": float("nan")}, {"inflight_per_node": 0}):
        with pytest.raises(InvalidArgumentError, match="Cluster"):
            Cluster(None, **kw)


def test_without_cluster_nothing_imports_dask_or_ray() -> None:
    """A local shard_map (and importing shardc.cluster) loads neither Dask nor Ray."""
    code = (
        "import sys, shardc, shardc.cluster\n"
        "r = shardc.shard_map(4, lambda s: s.id, workers=1)\n"
        "assert r.results == [0, 1, 2, 3]\n"
        "bad = [m for m in ('dask', 'distributed', 'ray') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "shardc.pool_stop()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_content_key_follows_every_byte_and_only_the_bytes() -> None:
    """Equal bytes give equal keys (whatever the array object); any one changed byte, in small or chunked inputs, a new key."""
    from shardc.cluster.keys import _CHUNK, content_key

    small = np.arange(1000, dtype=np.float64)
    assert content_key(small) == content_key(small.copy()) == content_key(small.view(np.uint8))
    big = np.zeros(2 * _CHUNK + 12345, dtype=np.uint8)  # hashed in parallel chunks
    k = content_key(big)
    for pos in (0, _CHUNK - 1, _CHUNK, big.size - 1):
        big[pos] = 1
        assert content_key(big) != k
        big[pos] = 0
    assert content_key(big) == k
    assert content_key(np.zeros(8, np.uint8)) != content_key(np.zeros(16, np.uint8))


def test_input_cache_keeps_the_call_and_drops_least_recently_used() -> None:
    """The current call's keys always stay; older ones while they fit in the budget, least recently used dropped first."""
    from shardc.cluster.keys import InputCache

    c = InputCache()
    assert c.use({"a": 10}, 0) == (["a"], [])
    assert c.use({"b": 10}, 15) == (["b"], [])  # a (10) fits in 15
    assert c.use({"a": 10}, 15) == ([], [])  # a used again: now b is the oldest
    assert c.use({"c": 10, "d": 10}, 15) == (["c", "d"], ["b"])
    assert list(c.sizes) == ["a", "c", "d"]
    assert c.use({"e": 100}, 0) == (["e"], ["a", "c", "d"])
    with pytest.raises(InvalidArgumentError, match="input_cache_bytes"):
        Cluster(None, input_cache_bytes=-1)


def test_a_sealed_copy_is_hashed_once_and_a_plain_array_through_the_share_cache() -> None:
    """shardc.share(X) (sealed) and big plain arrays get their key from the sealed copy, hashed once; a changed array gets a new copy and key."""
    from shardc.cluster.base import _input_array
    from shardc.cluster.keys import _sealed_keys, content_key, is_sealed

    x = np.arange(300_000, dtype=np.float64)  # >= 1 MiB: through the share cache
    spec, data, sealed = _input_array("x", x)
    assert sealed is not None and is_sealed(sealed) and np.array_equal(data.view(np.float64), x)
    k1 = content_key(data, sealed)
    assert _sealed_keys[sealed] == k1 == content_key(x.view(np.uint8))
    spec2, data2, sealed2 = _input_array("x", x)
    assert sealed2 is sealed  # the same copy: no hashing
    x[7] = -1.0
    _, data3, sealed3 = _input_array("x", x)
    assert sealed3 is not sealed and content_key(data3, sealed3) != k1
    h = shardc.share(np.ones(1000))
    assert _input_array("h", h)[2] is h
    with shardc.buffer("f8", 200_000) as b:  # writable: no sealed copy, hashed per call
        assert _input_array("b", b)[2] is None
    h.close()


def _seeded_tiny(shard: object, o: np.ndarray) -> None:
    import random

    o[shard.id] = shard.id * 1000 + int(random.random() * 1000) + (shard.start == shard.id)  # type: ignore[attr-defined]


def test_windows_of_tiny_seeded_shards_equal_a_local_run() -> None:
    """A macro-shard's window runs tiny shards through the workers' speculative loops, which
    make each shard inline: ids, starts and the legacy seeding (seed=) stay global, so the
    windows together write exactly what one local call writes."""
    n = 40_000
    d = shardc.shards(n, block_size=1)
    opts = {"seed": 7, "autotune": False, "dispatch_mode": "shm_queue", "dispatch_opts": {"block_size": 512}}
    with shardc.buffer("i8", n) as ref, shardc.buffer("i8", n) as got:
        shardc.shard_map(d, _seeded_tiny, out={"o": ref}, workers=2, **opts)
        for lo, hi in [(0, 1000), (1000, 25_000), (25_000, n)]:
            shardc.shard_map(WindowDescriptor(d, lo, hi), _seeded_tiny, out={"o": got}, workers=2, **opts)
        assert np.array_equal(ref.array, got.array)
        assert got.array[-1] // 1000 == n - 1


# --- the share cache's check with kernel write tracking (shardc.pagetrack) -----------------------------------------

PAGE_BYTES = mmap.PAGESIZE


@pytest.fixture
def tracked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Write tracking on for arrays of >= 1 MiB (16 MiB by default); skipped where the kernel cannot track."""
    from shardc import pagetrack

    why = pagetrack.unavailable()
    if why is not None:
        pytest.skip(f"no kernel write tracking here: {why}")
    monkeypatch.setattr(pagetrack, "TRACK_MIN_BYTES", 1 << 20)
    yield
    default_cache.clear()


def _fresh(n: int = 1 << 19) -> np.ndarray:
    """n random float64 (4 MiB) on pages of their own (no neighbour's write shows on an edge page)."""
    raw = np.empty(n * 8 + PAGE_BYTES, np.uint8)
    off = -raw.ctypes.data % PAGE_BYTES
    x = raw[off : off + n * 8].view(np.float64)
    x[:] = np.random.default_rng(n).random(n)
    return x


def _byte_at(x: np.ndarray, where: str) -> int:
    return {"first page": 0, "last page": x.nbytes - 1, "middle byte": x.nbytes // 2 + 3}[where]


@pytest.mark.parametrize("where", ["first page", "last page", "middle byte"])
def test_a_tracked_array_changed_in_one_byte_is_never_served_stale(tracked: None, where: str) -> None:
    """One byte flipped in the first page, the last page or the middle: the check sees it, the new copy holds it, and
    a local run over the array computes from the new bytes; an unchanged array is vouched for with 0 bytes compared."""
    x = _fresh()
    s1, how, _ = default_cache.get(x, "auto")
    assert how == "copied"
    s2, how, _ = default_cache.get(x, "auto")
    assert (s2, how, default_cache.bytes_compared) == (s1, "cached", 0)  # the kernel vouched for every page
    x.view(np.uint8)[_byte_at(x, where)] ^= 0x40
    s3, how, _ = default_cache.get(x, "auto")
    assert how == "copied" and s3 is not s1 and np.array_equal(s3.array, x)
    assert default_cache.bytes_compared <= PAGE_BYTES  # only the written page was compared
    with shardc.buffer("f8", 8) as o:
        shardc.shard_map(shardc.shards(8, block_size=1), _block_sum, borrow={"x": x}, out={"o": o}, workers=2)
        assert np.array_equal(o.array, x.reshape(8, -1).sum(axis=1))


def _block_sum(shard: Any, x: np.ndarray, o: np.ndarray) -> None:
    o[shard.id] = x.reshape(8, -1)[shard.id].sum()


def test_a_write_of_the_same_bytes_keeps_the_copy(tracked: None) -> None:
    """A page written with the bytes it held is compared (one page) and the copy is kept."""
    x = _fresh()
    s1, _, _ = default_cache.get(x, "auto")
    x[1000] = x[1000]
    s2, how, _ = default_cache.get(x, "auto")
    assert (s2, how) == (s1, "cached") and 0 < default_cache.bytes_compared <= PAGE_BYTES


def test_an_array_that_changes_is_compared_until_it_stays_the_same(tracked: None) -> None:
    """After a change the new copy is not tracked (an array rewritten every call would take a fault per page): the
    next check compares it whole, finds it unchanged and arms it; from then on 0 bytes, and a later write is seen."""
    x = _fresh()
    default_cache.get(x, "auto")
    x[3] += 1.0
    s1, how, _ = default_cache.get(x, "auto")
    assert how == "copied"
    s2, how, _ = default_cache.get(x, "auto")
    assert (s2, how, default_cache.bytes_compared) == (s1, "cached", x.nbytes)
    s3, how, _ = default_cache.get(x, "auto")
    assert (s3, how, default_cache.bytes_compared) == (s1, "cached", 0)
    x[-3] += 1.0
    s4, how, _ = default_cache.get(x, "auto")
    assert how == "copied" and np.array_equal(s4.array, x) and default_cache.bytes_compared <= PAGE_BYTES
    x[0] += 1.0  # changed again while untracked: the whole compare sees it
    s5, how, _ = default_cache.get(x, "auto")
    assert how == "copied" and np.array_equal(s5.array, x)


def test_threads_checking_a_changed_array_at_once_both_see_the_change(tracked: None) -> None:
    """A look consumes the kernel's record: a second thread checking the same changed array meanwhile must not take
    the now-clean record as proof (each gets a copy holding the new bytes)."""
    import threading

    x = _fresh()
    for _ in range(20):
        default_cache.get(x, "auto")
        x[12345] += 1.0
        got: list[np.ndarray] = []
        barrier = threading.Barrier(2)

        def check(barrier: threading.Barrier = barrier, got: list[np.ndarray] = got) -> None:
            barrier.wait()
            got.append(np.array(default_cache.get(x, "auto")[0].array))

        ts = [threading.Thread(target=check) for _ in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert len(got) == 2 and all(np.array_equal(g, x) for g in got)


def test_a_transparent_huge_page_written_once_is_compared_as_one_small_page(tracked: None) -> None:
    """A 64 MiB array on transparent huge pages (NumPy advises them): one byte written splits the mapping, and
    only that 4 KiB page is compared; the change is seen."""
    x = np.random.default_rng(5).random(8 << 20)
    with open("/proc/self/smaps_rollup") as f:
        huge = [int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")]
    if not huge or huge[0] == 0:
        pytest.skip("no transparent huge pages here")
    default_cache.get(x, "auto")
    assert default_cache.get(x, "auto")[1] == "cached" and default_cache.bytes_compared <= 2 * PAGE_BYTES
    x[(4 << 20) + 17] = -1.0
    s, how, _ = default_cache.get(x, "auto")
    assert how == "copied" and s.array[(4 << 20) + 17] == -1.0 and default_cache.bytes_compared <= 3 * PAGE_BYTES


def test_kernel_writes_into_a_tracked_array_are_seen(tracked: None) -> None:
    """read() from a pipe and a write through /proc/self/mem change the array without a store of ours: both seen."""
    x = _fresh()
    default_cache.get(x, "auto")
    r, w = os.pipe()
    os.write(w, b"\x01\x02\x03")
    os.readv(r, [memoryview(x.view(np.uint8))[777_777:777_780]])
    os.close(r)
    os.close(w)
    s, how, _ = default_cache.get(x, "auto")
    assert how == "copied" and np.array_equal(s.array, x)
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(x.ctypes.data + 2_000_000)
        mem.write(b"\xff")
    assert x.view(np.uint8)[2_000_000] == 0xFF
    s, how, _ = default_cache.get(x, "auto")
    assert how == "copied" and np.array_equal(s.array, x)


def test_pages_dropped_with_madvise_dontneed_are_never_vouched_for(tracked: None) -> None:
    """MADV_DONTNEED zaps pages (they read back as zeros, no write happened): the check compares them and sees the change."""
    libc = ctypes.CDLL(None, use_errno=True)
    x = _fresh()
    default_cache.get(x, "auto")
    page = (x.ctypes.data // PAGE_BYTES + 10) * PAGE_BYTES
    assert libc.madvise(ctypes.c_void_p(page), ctypes.c_size_t(PAGE_BYTES), 4) == 0  # MADV_DONTNEED
    assert not x.view(np.uint8)[page - x.ctypes.data : page - x.ctypes.data + PAGE_BYTES].any()
    s, how, _ = default_cache.get(x, "auto")
    assert how == "copied" and np.array_equal(s.array, x)


def test_a_fork_childs_writes_are_its_own_and_it_does_not_inherit_tracking(tracked: None) -> None:
    """A forked child writing the array changes only its copy: the parent keeps its copy, 0 bytes compared.  In the
    child the inherited tracking is not used: it compares every byte (its uffd and pagemap watch the parent)."""
    x = _fresh()
    s1, _, _ = default_cache.get(x, "auto")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _, how, _ = default_cache.get(x, "auto")
            ok = how == "cached" and default_cache.bytes_compared == x.nbytes
            x[5] = -1.0
            s, how2, _ = default_cache.get(x, "auto")
            ok = ok and how2 == "copied" and s.array[5] == -1.0
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == b"1"
    s2, how, _ = default_cache.get(x, "auto")
    assert (s2, how, default_cache.bytes_compared) == (s1, "cached", 0) and x[5] != -1.0


def test_overlapping_arrays_are_not_both_tracked(tracked: None) -> None:
    """Two views sharing pages: the second is compared byte by byte (one look would hide writes from the other)."""
    base = _fresh(1 << 20)
    a, b = base[:600_000], base[500_000:]
    default_cache.get(a, "auto")
    default_cache.get(b, "auto")
    base[550_000] = 7.0  # in both
    for v in (a, b):
        s, how, _ = default_cache.get(v, "auto")
        assert how == "copied" and np.array_equal(s.array, v)
    assert default_cache.bytes_compared == b.nbytes  # b untracked: compared whole


def test_without_tracking_changes_are_still_caught_by_comparing(tmp_path: Path) -> None:
    """SHARDC_PORTABLE=1 turns tracking off (as on macOS or an old kernel): the check compares every byte, still exact."""
    code = (
        "import numpy as np; from shardc import pagetrack; from shardc.share import default_cache as c\n"
        "pagetrack.TRACK_MIN_BYTES = 1 << 20\n"
        "x = np.random.default_rng(0).random(1 << 19); c.get(x, 'auto')\n"
        "assert c.get(x, 'auto')[1] == 'cached' and c.bytes_compared == x.nbytes\n"
        "x[-1] += 1; s, how, _ = c.get(x, 'auto'); assert how == 'copied' and np.array_equal(s.array, x)\n"
        "print(pagetrack.unavailable())\n"
    )
    env = {**os.environ, "SHARDC_PORTABLE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "portable mode" in out.stdout


@pytest.mark.parametrize("mode", ["rpc_chunked", "shm_queue"])
def test_worker_spans_of_a_local_run(mode: str) -> None:
    """What an agent reports per worker of a macro-shard: every shard counted once, each span
    inside the run (wall clock), busy time within the span, the slot's pid."""
    import time

    from shardc.diagnostics.lanes import worker_spans

    def f(shard: Any, o: Any) -> None:
        time.sleep(0.002)
        o[shard.id] = 1

    with shardc.Pool(2) as pool, shardc.buffer("i8", 60) as o:
        t0 = time.time()
        res = shardc.shard_map(60, f, out={"o": o}, pool=pool, progress=False, dispatch_mode=mode)
        t1 = time.time()
        pids = {w.slot: w.pid for w in pool.workers}
        spans = worker_spans(res.diagnostics)
    assert sum(s[4] for s in spans) == 60
    assert {s[0] for s in spans} <= {0, 1} and all(s[1] == pids[s[0]] for s in spans)
    for _slot, _pid, a, b, n, busy in spans:
        assert t0 - 0.05 <= a <= b <= t1 + 0.05
        assert n * 0.002 * 0.9 <= busy <= (b - a) + 1e-3


def test_worker_spans_of_tiny_shards_in_frames() -> None:
    """20,000 tiny shards (rpc frames, batches, single records): every shard in exactly one span."""
    import time

    from shardc.diagnostics.lanes import worker_spans

    with shardc.Pool(2) as pool:
        t0 = time.time()
        res = shardc.shard_map(20_000, lambda s: None, pool=pool, progress=False)
        t1 = time.time()
        spans = worker_spans(res.diagnostics)
    assert sum(s[4] for s in spans) == 20_000 and res.succeeded
    assert all(t0 - 0.05 <= a <= b <= t1 + 0.05 and 0 <= busy <= b - a + 1e-3 for _s, _p, a, b, _n, busy in spans)
