"""shm_queue without a per-call penalty (issue 18): the pool's ring reused and
reset per call, the feeder's probe ramp and tail, the worker's idle notice,
the lazy ``shard.rng``, and the per-block memory delta in diagnostics.

Speed itself is checked by ``bench/bench_tiny.py`` (its ``grid`` variant),
never here: these tests check behaviour only.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import types
from collections import deque
from typing import Any

import numpy as np
import pytest
from _engine_helpers import fd_targets, no_stray_children  # noqa: F401 (fixture)

import shardc
from shardc.dispatch_queue import PROBE_BLOCK, RAMP, QueueFeeder
from shardc.errors import QueueClosedError, UsageError
from shardc.queue import TaskRing
from shardc.shards import shards
from shardc.worker.queue_loop import COUNT_BITS, COUNT_MASK

pytestmark = pytest.mark.timeout(60)


# -- the ring's reset ---------------------------------------------------------------------


def test_reset_gives_an_empty_open_ring_in_the_same_memory():
    """reset() after use and close(): empty, open, no claims, and an attached mapping sees it."""
    ring = TaskRing.create(capacity=16, max_consumers=2)
    other = TaskRing.attach(ring.fd, ring.nbytes)
    try:
        ring.push([1, 2, 3])
        assert other.pop(0, 1, timeout=0).tolist() == [1]
        ring.close()
        ring.reset()
        st = ring.stats()
        assert (st["size"], st["closed"], st["pushed"], st["popped"]) == (0, 0, 0, 0)
        assert ring.consumer_info(0)["claimed"] == 0
        ring.push([7])
        assert other.pop(1, 4, timeout=0).tolist() == [7]  # the attached mapping shares the fresh ring
        ring.close()
        with pytest.raises(QueueClosedError):
            other.pop(1, 1, timeout=0)
    finally:
        other.release()
        ring.release()


def test_only_the_creator_resets():
    """A process that attached the ring may not reset it (it would drop others' claims)."""
    ring = TaskRing.create(capacity=16, max_consumers=1)
    other = TaskRing.attach(ring.fd, ring.nbytes)
    try:
        with pytest.raises(UsageError, match="only the process that created it"):
            other.reset()
    finally:
        other.release()
        ring.release()


# -- the pool's ring across calls ------------------------------------------------------------


def write_id(shard: Any, out: Any) -> None:
    out[shard.id] = shard.id + 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts fds in /proc")
def test_pool_keeps_one_ring_and_workers_hold_no_more_fds_per_call():
    """Every shm_queue call on a pool uses the same ring; a worker's open fds do not
    grow with calls (each call used to leave the ring's received fd open)."""
    out = shardc.buffer(np.int64, 300)
    try:
        with shardc.Pool(2) as pool:
            rings, counts = [], []
            for k in range(12):
                out.array[:] = 0
                pool.shard_map(300, write_id, out={"out": out}, dispatch_mode="shm_queue", progress=False)
                assert np.array_equal(out.array, np.arange(1, 301)), k
                rings.append(pool.queue_ring[0])
                counts.append(sum(len(fd_targets(w.pid)) for w in pool.workers))
            assert all(r is rings[0] for r in rings)
            # A call's done map stays open until the next call's setup (+-1 per
            # worker); a leak of the ring's fd would add 2 per call (22 here).
            assert counts[11] - counts[1] <= 3, counts
        assert pool.queue_ring is None  # released with the pool
    finally:
        out.close()


def test_the_ring_fd_goes_only_to_a_process_that_has_not_mapped_the_ring():
    """QUEUE carries the ring's fd to each worker process once: later calls send none (the worker
    kept its mapping), and a replacement for a killed worker gets it and runs its share."""
    from shardc.protocol import QUEUE

    out = shardc.buffer(np.int64, 200)
    sent: list[tuple[int, int]] = []  # (pid, fds) of each QUEUE message

    def spy(w: Any) -> None:
        orig = w.chan.send

        def send(obj: Any, fds: Any = ()) -> int:
            if obj[0] == QUEUE:
                sent.append((w.pid, len(fds)))
            return orig(obj, fds)

        w.chan.send = send

    try:
        with shardc.Pool(2) as pool:
            for k in range(4):
                for w in pool.workers:
                    if not isinstance(w.chan.send, types.FunctionType):
                        spy(w)
                out.array[:] = 0
                pool.shard_map(200, write_id, out={"out": out}, dispatch_mode="shm_queue", progress=False)
                assert np.array_equal(out.array, np.arange(1, 201)), k
                if k == 1:
                    victim = pool.workers[0].pid
                    os.kill(victim, signal.SIGKILL)
                    deadline = time.monotonic() + 10
                    while pool.is_alive(pool.workers[0]) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    pool.ensure_alive()  # the replacement now, so the spy sees its first QUEUE
            first = {}
            for pid, nfds in sent:
                first.setdefault(pid, []).append(nfds)
            assert len(first) == 3  # two workers, then one replacement
            assert all(v[0] == 1 and not any(v[1:]) for v in first.values()), first
    finally:
        out.close()


def test_rpc_and_queue_calls_alternate_on_one_pool():
    """rpc_chunked calls between shm_queue calls leave the pool's ring usable."""
    out = shardc.buffer(np.int64, 100)
    try:
        with shardc.Pool(2) as pool:
            for k in range(3):
                out.array[:] = 0
                pool.shard_map(100, write_id, out={"out": out}, dispatch_mode="shm_queue", progress=False)
                assert np.array_equal(out.array, np.arange(1, 101)), k
                assert pool.shard_map(10, lambda s: s.id, progress=False).results == list(range(10))
    finally:
        out.close()


# -- the feeder: ramp and tail (fakes: no workers, a controlled clock) ----------------------


class FakeRing:
    capacity = 1024

    def __init__(self) -> None:
        self.items: deque[int] = deque()

    def size(self) -> int:
        return len(self.items)

    def push(self, arr: np.ndarray, timeout: float = 0) -> int:
        self.items.extend(int(x) for x in arr)
        return len(arr)

    def take_all(self) -> list[tuple[int, int]]:
        out = [(it >> COUNT_BITS, it & COUNT_MASK) for it in self.items]
        self.items.clear()
        return out


class FakeDiag:
    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def autotune_step(self, old: int, new: int, shard_s: float) -> None:
        self.steps.append((old, new))

    def dispatched(self, nbytes: int, n: int) -> None:
        pass


class FakeSched:
    def __init__(self, num: int) -> None:
        self.num, self.next_fresh, self.retry, self.chunk = num, 0, deque(), 1
        self.careful: set[int] = set()  # ids lost in a speculative run (Scheduler.careful)

    def pending_count(self) -> int:
        return len(self.retry) + self.num - self.next_fresh

    def take_chunk(self, size: int) -> list[int]:
        k = min(size, self.num - self.next_fresh)
        ids = list(range(self.next_fresh, self.next_fresh + k))
        self.next_fresh += k
        return ids

    def take_fresh(self, size: int) -> tuple[int, int]:
        start = self.next_fresh
        k = min(size, self.num - start)
        self.next_fresh += k
        return start, k

    def put_back(self, ids: list[int]) -> None:
        raise AssertionError("the fake ring never fills")


def feeder(num: int, workers: int = 2) -> tuple[QueueFeeder, FakeRing, FakeDiag, FakeSched]:
    ring, diag, sched = FakeRing(), FakeDiag(), FakeSched(num)
    tune = {"target_chunk_seconds": 0.005, "max_rounds": 64}
    return QueueFeeder(sched, diag, ring, workers, None, tune), ring, diag, sched  # type: ignore[arg-type]


def test_probe_blocks_grow_when_workers_run_through_them_quickly(monkeypatch):
    """Quick rounds of probe blocks (the ring ran dry) grow the blocks at most RAMP-fold per round."""
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    f, ring, diag, sched = feeder(100_000)
    f.feed()
    first = ring.take_all()
    assert [c for _, c in first] == [PROBE_BLOCK] * 4
    done = 4 * PROBE_BLOCK
    clock[0] += 2**-12  # 32 shards in 0.24 ms: ~15 us per shard per worker
    f.dry = True
    f.feed(done)
    second = ring.take_all()
    want = int(0.005 / ((clock[0] - 100.0) * 2 / done))  # 5 ms of work per block: 327
    assert [c for _, c in second] == [want] * 4
    assert diag.steps == [(PROBE_BLOCK, want)] and sched.chunk == want
    ids = [i for s, c in first + second for i in range(s, s + c)]
    assert ids == list(range(len(ids)))  # consecutive, nothing skipped or repeated
    f.dry = True
    f.feed(10**7)  # far below the target per block now, but growth is capped
    assert f.block == want * RAMP and ring.take_all()[0][1] == want * RAMP


def test_probe_blocks_stay_small_for_slow_shards(monkeypatch):
    """A round whose blocks took longer than the target does not grow the blocks."""
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    f, ring, diag, _ = feeder(10_000)
    f.feed()
    ring.take_all()
    clock[0] += 0.1  # 32 shards in 100 ms: 6 ms per shard and worker
    f.dry = True
    f.feed(4 * PROBE_BLOCK)
    assert [c for _, c in ring.take_all()] == [PROBE_BLOCK] * 4
    assert diag.steps == []


def test_ramp_waits_for_the_ring_to_run_dry(monkeypatch):
    """Without a worker's idle notice (the ring not found empty) blocks keep their size."""
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    f, ring, diag, _ = feeder(10_000)
    f.feed()
    ring.take_all()
    clock[0] += 0.0002
    f.feed(4 * PROBE_BLOCK)  # a poll, not a QIDLE
    assert [c for _, c in ring.take_all()] == [PROBE_BLOCK] * 4
    assert diag.steps == []


def test_a_small_call_goes_into_the_ring_whole():
    """A call of a few shards per worker is pushed at once, in blocks of at most a probe."""
    f, ring, _, sched = feeder(100)
    f.feed()
    blocks = ring.take_all()
    assert sum(c for _, c in blocks) == 100 and max(c for _, c in blocks) <= PROBE_BLOCK
    assert sched.pending_count() == 0


def test_the_tail_goes_in_whole_in_shrinking_blocks(monkeypatch):
    """Once less than 2 full blocks per worker are left, all of it goes in, in shrinking blocks."""
    f, ring, _, sched = feeder(100_000)
    f.block, f.tuned = 1000, True
    sched.next_fresh = 100_000 - 5000  # 5 blocks left
    f.feed()
    blocks = [c for _, c in ring.take_all()]
    assert sched.pending_count() == 0 and sum(blocks) == 5000
    assert blocks[:2] == [1000, 1000] and blocks == sorted(blocks, reverse=True) and blocks[-1] == 1
    f2, ring2, _, sched2 = feeder(100_000)
    f2.block, f2.tuned = 1000, True
    f2.feed()  # plenty left: only 2 blocks per worker
    assert [c for _, c in ring2.take_all()] == [1000] * 4


# -- the whole mode ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 100, 2_000, 30_000])
def test_queue_calls_of_every_size_run_each_shard_once(n):
    """shm_queue calls from 1 to 30,000 shards write every shard exactly once, on a reused ring."""
    out = shardc.buffer(np.int64, n)
    try:
        with shardc.Pool(2) as pool:
            for _ in range(2):
                out.array[:] = 0
                r = pool.shard_map(n, count_me, out={"out": out}, dispatch_mode="shm_queue", progress=False)
                assert r.diagnostics.completed == n
                assert np.all(out.array == 1)
    finally:
        out.close()


def count_me(shard: Any, out: Any) -> None:
    out[shard.id] += 1


def grow_memory(shard: Any, out: Any, keep: Any = []) -> None:  # noqa: B006 - grows on purpose
    keep.append(np.ones(256 * 1024))  # 2 MiB kept per shard
    time.sleep(0.002)  # long shards: memory is measured per block
    out[shard.id] = 1


def test_queue_blocks_report_their_memory_growth():
    """shm_queue sends each measured block's memory delta (QDONE "mem"); diagnostics record it,
    per shard for one-shard blocks."""
    out = shardc.buffer(np.int64, 6)
    try:
        with shardc.Pool(1) as pool:
            r = pool.shard_map(
                shardc.shards(6, block_size=1),
                grow_memory,
                out={"out": out},
                dispatch_mode="shm_queue",
                dispatch_opts={"block_size": 1},
                progress=False,
            )
        d = r.diagnostics
        assert len(d.block_mem) >= 1
        assert max(b[3] for b in d.block_mem) >= 1 << 20
        assert d.to_dict()["block_mem_measured"] == len(d.block_mem)
        singles = [b for b in d.block_mem if b[2] == 1]
        assert all(d.shard_mem_delta[b[1]] == b[3] for b in singles)
    finally:
        out.close()


# -- shard.rng ---------------------------------------------------------------------------


def test_shard_rng_is_built_only_when_used():
    """A shard made with the run's entropy has no generator until .rng is read."""
    s = shards(10, block_size=1).shard(3, 12345)
    assert s._rng is None
    s.rng.random()
    assert s._rng is not None


def test_shard_rng_stream_from_entropy_matches_the_seed_sequence():
    """The entropy-only form gives shard k the stream of SeedSequence(entropy, spawn_key=(k,))."""
    d = shards(10, block_size=1)
    want = np.random.Generator(np.random.PCG64(np.random.SeedSequence(99, spawn_key=(4,)))).integers(0, 2**62, 8)
    assert np.array_equal(d.shard(4, 99).rng.integers(0, 2**62, 8), want)
    assert np.array_equal(d.shard(4, (99, 4)).rng.integers(0, 2**62, 8), want)
    assert np.array_equal(d.shard(4, np.int64(99)).rng.integers(0, 2**62, 8), want)


def draw(shard: Any, out: Any) -> None:
    out[shard.id] = shard.rng.integers(0, 2**62)


def test_seeded_draws_are_identical_across_modes_and_calls():
    """seed=s: shard.rng draws agree between shm_queue (reused ring) and rpc_chunked."""
    a = shardc.buffer(np.int64, 50)
    b = shardc.buffer(np.int64, 50)
    try:
        with shardc.Pool(2) as pool:
            pool.shard_map(50, draw, out={"out": a}, dispatch_mode="shm_queue", seed=7, progress=False)
            pool.shard_map(50, draw, out={"out": b}, seed=7, chunk_size=3, progress=False)
            assert np.array_equal(a.array, b.array)
            pool.shard_map(50, draw, out={"out": b}, dispatch_mode="shm_queue", seed=7, progress=False)
            assert np.array_equal(a.array, b.array)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("n,block", [(10, 1), (10, 3), (1000, 7), (5, 5)])
def test_fast_shard_maker_builds_the_same_shards(n, block):
    """desc.maker() (the worker's factory) builds shards equal to desc.shard(), rng included."""
    d = shards(n, block_size=block)
    make = d.maker()
    for k in range(d.num_shards):
        a, b = make(k, 5), d.shard(k, 5)
        assert a == b and (a.id, a.start, a.stop, a.len, a.idx, a.stride) == (
            b.id,
            b.start,
            b.stop,
            b.len,
            b.idx,
            b.stride,
        )
        assert a.rng.integers(0, 2**62) == b.rng.integers(0, 2**62)


def test_maker_of_other_strategies_is_shard():
    """Strided and list descriptors hand out their own shard() as the maker."""
    d = shards(10, block_size=2, strategy="strided")
    assert d.maker() == d.shard


def _two(shard, b, a):
    return (b, a)


def _defaults(shard, a, b=2):
    return (a, b)


def _kwonly(shard, *, a):
    return a


def _varkw(shard, a, **kw):
    return a


def test_positional_args_only_where_binding_is_the_same():
    """The executor calls fun(shard, *args) only for plain functions whose other parameters are exactly the kwargs."""
    from shardc.worker.executor import positional_args

    assert positional_args(_two, {"a": 1, "b": 2}) == (2, 1)
    assert _two(None, *positional_args(_two, {"a": 1, "b": 2})) == _two(None, a=1, b=2)
    assert positional_args(_defaults, {"a": 1}) is None
    assert positional_args(_kwonly, {"a": 1}) is None
    assert positional_args(_varkw, {"a": 1}) is None
    assert positional_args(_two, {"a": 1, "c": 2}) is None
    assert positional_args(len, {}) is None
    assert positional_args(lambda s: s, {}) == ()
