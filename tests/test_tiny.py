"""Issue 18, the batched tiny-shard path: result frames, speculative runs (and
what a worker lost inside one costs), the autotune ramp, fast legacy seeding."""

from __future__ import annotations

import os
import pickle
import random
import signal
import time
from typing import Any

import numpy as np
import pytest
from _engine_helpers import no_stray_children, pool2  # noqa: F401 (fixtures)

import shardc
from shardc.protocol import ERR, FRAME, OK
from shardc.scheduler import Scheduler
from shardc.status import STATE_IDLE, DoneMap, StatusTable
from shardc.worker import spec
from shardc.worker.executor import ShardExecutor
from shardc.worker.heap import HeapPolicy
from shardc.worker.seeding import _mix64, seed_key, seed_legacy

pytestmark = pytest.mark.timeout(60)


class Exec:
    """An executor over ``n`` one-item shards with its status row and done map (no workers)."""

    def __init__(self, fun: Any, n: int) -> None:
        self.table = StatusTable(1)
        self.row = self.table.row(0)
        self.done = DoneMap(n)
        self.ex = ShardExecutor(self.row, None, HeapPolicy(self.row, os.getpid()))
        c = self.ex.call
        c.fun, c.kwargs, c.desc = fun, {}, shardc.shards(n, block_size=1)
        c.entropy, c.seeded, c.diagnostics, c.donemap = 99, False, True, self.done
        self.ex.begin_call()

    def close(self) -> None:
        self.done.close()
        self.table.close()


def flatten(outcomes: list[tuple]) -> list[tuple[int, int, Any]]:
    """(sid, OK/ERR, value) per shard, frames opened."""
    out: list[tuple[int, int, Any]] = []
    for o in outcomes:
        if o[1] == FRAME:
            out += [(o[0] + k, OK, v) for k, v in enumerate(o[2])]
        else:
            out.append((o[0], o[1], o[2]))
    return out


def mixed(shard: Any) -> Any:
    """Fails on ids = 5 mod 13; returns None on even ids, the id on odd ones (marks 1 and 2 interleave)."""
    if shard.id % 13 == 5:
        raise ValueError(f"bad {shard.id}")
    return None if shard.id % 2 == 0 else shard.id


@pytest.mark.parametrize("spec_on", [True, False])
def test_frames_and_failures_mixed_in_one_chunk(spec_on):
    """One chunk of consecutive short shards with failures: OK runs come as frames, failures as outcomes, every id exactly once and in order; done marks exact (1 None, 2 value, 0 failed); the row idle after; with and without speculative runs."""
    h = Exec(mixed, 400)
    try:
        h.ex.run_ids([0])  # learns that shards are short
        h.ex.ewma_ns = 1_000 if spec_on else spec.SPEC_RUN_NS  # speculative runs of ~100, or none
        ids = list(range(1, 400))
        out = h.ex.run_ids(ids) if spec_on else h.ex.run_ids(ids, careful=True)
        assert any(o[1] == FRAME for o in out) and any(o[1] == ERR for o in out)
        assert all(o[1] in (FRAME, ERR) for o in out)
        flat = flatten(out)
        assert [f[0] for f in flat] == ids
        for sid, ok, value in flat:
            if sid % 13 == 5:
                assert ok == ERR and value["message"] == f"bad {sid}" and value["shard"] == sid
            else:
                assert ok == OK and value == (None if sid % 2 == 0 else sid)
        marks = [h.done.get(i) for i in ids]
        assert marks == [0 if i % 13 == 5 else (1 if i % 2 == 0 else 2) for i in ids]
        row = h.table.read(0)
        assert row.state == STATE_IDLE
        frames = [o for o in out if o[1] == FRAME]
        assert all(f[3] <= f[4] for f in frames) and all(a[4] <= b[3] for a, b in zip(frames, frames[1:]))
    finally:
        h.close()


def test_run_ids_takes_a_range_of_fresh_ids():
    """The master sends a chunk of fresh ids as a range: the worker runs it like the list (frames, marks)."""
    h = Exec(mixed, 100)
    try:
        h.ex.run_ids(range(0, 1))
        out = h.ex.run_ids(range(1, 100))
        assert [f[0] for f in flatten(out)] == list(range(1, 100)) and any(o[1] == FRAME for o in out)
        assert [h.done.get(i) for i in range(1, 100)] == [
            0 if i % 13 == 5 else (1 if i % 2 == 0 else 2) for i in range(1, 100)
        ]
    finally:
        h.close()


def writes_fails(shard: Any) -> Any:
    if shard.id % 13 == 5:
        raise ValueError(f"bad {shard.id}")
    return shard.id if shard.id % 3 == 0 else None


def test_queue_block_in_speculative_runs_with_failures():
    """run_block with known-short shards: every shard of the block runs once; failures go to on_fail (no mark), the rest are marked 1; the row ends idle with the block's OK count added; RunStats fields right."""
    h = Exec(writes_fails, 300)
    failed: list[tuple] = []
    try:
        h.ex.run_block(0, 1, failed.append, lambda sid, ev: None)
        h.ex.ewma_ns = spec.SPEC_RUN_NS // 16  # runs of 16
        ran, ok, returned, t0, t1, dmem = h.ex.run_block(1, 300, failed.append, lambda sid, ev: None)
        bad = [i for i in range(300) if i % 13 == 5]
        assert [f[0] for f in failed] == bad and all(f[1] == ERR for f in failed)
        assert (ran, ok) == (299, 299 - len(bad)) and t0 <= t1 and dmem is None
        assert returned == len([i for i in range(1, 300) if i % 3 == 0 and i % 13 != 5])
        assert [h.done.get(i) for i in range(300)] == [0 if i in bad else 1 for i in range(300)]
        row = h.table.read(0)
        assert row.state == STATE_IDLE and row.done == 300 - len(bad) and (row.block0, row.blockn) == (1, 299)
    finally:
        h.close()


def test_speculative_run_row_covers_the_run_until_its_marks():
    """Inside a speculative run the row says RUNNING from the run's first id with run_n > 1 and none of the run's ids marked; the marks come with the next run."""
    seen: list[tuple[int, int, int, int]] = []
    box: dict[str, Any] = {}

    def peek(shard: Any) -> int:
        h = box["h"]
        r = h.table.read(0)
        seen.append((shard.id, r.current, r.run_n, h.done.get(shard.id - 1) if shard.id else -1))
        return shard.id

    h = box["h"] = Exec(peek, 64)
    try:
        h.ex.run_ids([0])
        h.ex.ewma_ns = spec.SPEC_RUN_NS // 10  # runs of 10 ids
        h.ex.run_ids(list(range(1, 64)))
        for sid, current, run_n, prev_mark in seen[1:]:
            assert run_n == 10 or current + run_n == 64  # runs of 10, the last one shorter
            assert current <= sid < current + run_n
            assert prev_mark == (0 if sid > current else 2)  # marked only once its run is over
        assert [h.done.get(i) for i in range(64)] == [2] * 64
    finally:
        h.close()


DIE_AT = 12_345


def counts_and_dies(shard: Any, out: Any) -> None:
    out[shard.id] += 1  # writes per shard (a rerun shows)
    if shard.id == DIE_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    # returns None: a finished shard is complete once marked (a value would rerun if its worker died unreported)


@pytest.mark.parametrize("mode", ["rpc_chunked", "shm_queue"])
def test_sigkill_inside_speculative_run_charges_one_shard_and_reruns_no_done_shard(pool2, mode):
    """A worker SIGKILLed inside a speculative run: no shard is charged for that death, the run's ids rerun one shard at a time, where the next crash is charged to exactly the shard that kills; every shard outside the lost run ran exactly once (none marked done reran)."""
    n, die_at = 20_000, DIE_AT
    out = shardc.buffer(np.int64, (n,), init=0)
    r = shardc.shard_map(n, counts_and_dies, out={"out": out}, max_retries=1, on_failure="collect", progress=False)
    writes = out.array.copy()
    out.close()
    assert list(r.failures) == [die_at]
    f = r.failures[die_at]
    assert f.attempts == 2 and "WorkerCrashedError" in f.error_type
    assert r.results[:die_at] == [None] * die_at and r.results[die_at + 1 :] == [None] * (n - die_at - 1)
    deaths = [e for e in r.diagnostics.events if e["event"] == "death"]
    # the first death was inside a speculative run (charged to none), then two careful ones charged to die_at
    assert [e["shard"] for e in deaths] == [None, die_at, die_at]
    assert writes[die_at] == 3
    again = np.flatnonzero(writes > 1)
    lost_run = again[again != die_at]
    # only ids of the lost run (before die_at, within one run's length) ran twice
    assert np.all((lost_run < die_at) & (lost_run >= die_at - spec.SPEC_MAX)) and np.all(writes[lost_run] == 2)
    assert np.all(writes[: die_at - spec.SPEC_MAX] == 1) and np.all(writes[die_at + 1 :] == 1)


HANG_AT = 7_000


def hangs(shard: Any) -> None:
    if shard.id == HANG_AT:
        time.sleep(60)


@pytest.mark.parametrize("mode", ["rpc_chunked", "shm_queue"])
def test_hang_inside_speculative_run_times_out_on_its_own_shard(pool2, mode):
    """A shard that hangs inside a speculative run: the first timeout (the run's) is charged to none; the careful rerun's timeout is charged to the hanging shard, which fails; every other shard succeeds."""
    r = shardc.shard_map(
        10_000, hangs, timeout=1.0, max_retries=0, on_failure="collect", progress=False, dispatch_mode=mode
    )
    assert list(r.failures) == [HANG_AT] and r.failures[HANG_AT].attempts == 1
    deaths = [e for e in r.diagnostics.events if e["event"] == "death"]
    assert [e["shard"] for e in deaths] == [None, HANG_AT]


def plus1(shard: Any) -> int:
    return shard.id + 1


def test_autotune_ramps_from_chunk_size_1_within_a_few_reports(pool2):
    """shard_map(N, f) with defaults (chunk_size=1, autotune): the chunk is in the thousands after at most three autotune steps, then shrinks for the tail (about 4 chunks per worker)."""
    n = 200_000
    r = shardc.shard_map(n, plus1, progress=False)
    assert r.results == list(range(1, n + 1))
    steps = r.diagnostics.autotune
    assert steps and steps[0]["chunk_from"] == 1
    assert max(s["chunk_to"] for s in steps[:3]) >= 1000, steps[:5]
    assert steps[-1]["chunk_to"] <= n // (4 * 2)


def test_record_run_slices_and_falls_back_per_shard():
    """Scheduler.record_run: a frame of pending shards is stored with slices; a frame holding an id that already finished is recorded shard by shard (the duplicate dropped)."""
    from shardc.diagnostics import Diagnostics

    diag = Diagnostics(mode="rpc_chunked", num_shards=10, cow="deny", enabled=False)
    s = Scheduler(10, 0, 1, None, None, diag)
    s.record_run(2, ["a", "b", "c"])
    assert s.completed == 3 and s.results[2:5] == ["a", "b", "c"] and list(s.state[1:6]) == [0, 1, 1, 1, 0]
    s.record_run(4, ["X", "d"])  # 4 is done already: kept, 5 recorded
    assert s.completed == 4 and s.results[4:6] == ["c", "d"]


def test_seed_legacy_is_exact_seeding_from_seed_and_id():
    """seed_legacy(seed, id) seeds np.random and random exactly as np.random.seed(a) and random.seed(b) do for a, b from splitmix64 of (seed, id), cached Gaussians dropped; a function of (seed, id) only."""
    z = _mix64((seed_key(7) + (42 + 1) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
    np.random.seed(z & 0xFFFFFFFF)
    random.seed(z >> 32)
    want = (np.random.standard_normal(3).tolist(), [random.gauss(0, 1) for _ in range(3)])
    np.random.standard_normal()  # leave a cached Gaussian in both
    random.gauss(0, 1)
    seed_legacy(7, 42)
    got = (np.random.standard_normal(3).tolist(), [random.gauss(0, 1) for _ in range(3)])
    assert got == want
    seed_legacy(7, 43)
    assert np.random.standard_normal(3).tolist() != want[0]
    assert seed_key(7) != seed_key(7 + (1 << 64)) and seed_key(1 << 70) == seed_key(1 << 70)


def draws(shard: Any) -> tuple[float, float]:
    return (float(np.random.random()), random.random())


def test_seeded_values_identical_with_speculative_runs_and_per_shard(pool2):
    """seed=: values are the same with defaults (speculative runs, frames), with chunk_size=1 and no autotune (one shard per chunk), and as a function of the id only."""
    n = 3000
    a = shardc.shard_map(n, draws, seed=11, progress=False).results
    b = shardc.shard_map(n, draws, seed=11, chunk_size=1, autotune=False, progress=False).results
    c = shardc.shard_map(n, draws, seed=12, progress=False).results
    assert a == b and a != c and len(set(a)) == n


def test_idruns_matches_a_set():
    """IdRuns (the master's in-flight ids) behaves as a set of ids under runs, singles and splits."""
    from shardc.idruns import IdRuns

    rng = np.random.default_rng(5)
    runs, ref = IdRuns(), set()
    nxt = 0
    for _ in range(400):
        op = rng.integers(0, 4)
        if op == 0:  # a fresh chunk (range)
            k = int(rng.integers(0, 50))
            runs.add(range(nxt, nxt + k))
            ref.update(range(nxt, nxt + k))
            nxt += k
        elif op == 1:  # retried ids (a list, not consecutive, not held)
            ids = [int(s) for s in rng.integers(0, max(nxt, 1), 5) if int(s) not in ref]
            ids = list(dict.fromkeys(ids))
            runs.add(ids)
            ref.update(ids)
        elif op == 2 and nxt:  # a frame's run back
            a = int(rng.integers(0, nxt))
            b = a + int(rng.integers(0, 40))
            runs.discard_run(a, b)
            ref.difference_update(range(a, b))
        elif nxt:
            s = int(rng.integers(0, nxt))
            runs.discard(s)
            ref.discard(s)
        assert len(runs) == len(ref) and bool(runs) == bool(ref)
        assert sorted(runs) == sorted(ref)
        probe = int(rng.integers(0, nxt + 2))
        assert (probe in runs) == (probe in ref)
    runs.clear()
    assert not runs and list(runs) == []


def test_block_shard_equals_the_descriptors_shard():
    """The worker's fast shard (bounds computed from the id) equals desc.shard(k), pickles as a Shard."""
    import pickle

    from shardc.shards import Shard, shards

    for n, b in ((10, 3), (7, 1), (1000, 64)):
        d = shards(n, block_size=b)
        make = d.maker()
        for k in range(len(d)):
            s, ref = make(k, 11), d.shard(k, 11)
            assert isinstance(s, Shard) and s == ref
            assert (s.id, s.start, s.stop, s.len, s.stride, s.idx) == (
                ref.id,
                ref.start,
                ref.stop,
                ref.len,
                ref.stride,
                ref.idx,
            )
            back = pickle.loads(pickle.dumps(s))
            assert type(back) is Shard and back == ref
            assert s.rng.random() == ref.rng.random()  # the same stream


def test_plain_dumps_pickles_plain_data_only_and_never_runs_a_reduction():
    """A frame goes out as one pickle only when every value is plain data; any other object
    stops the pickling before its own reduction runs (one that blocks or fails must be pickled
    per shard, with the worker's row naming that shard)."""
    from shardc.worker.records import plain_dumps

    plain = [None, True, 7, 2**80, 1.5, "s", b"b", (1, [2, {"k": frozenset({3})}])]
    assert plain_dumps(plain) == pickle.dumps(plain, protocol=5)
    reduced = []

    class Blocks:
        def __reduce__(self):
            reduced.append(1)
            raise AssertionError("must not be reached")

    for bad in (np.float64(1.0), np.arange(3), 1 + 2j, Blocks(), [1, 2, Blocks()]):
        assert plain_dumps([0, bad]) is None
    assert not reduced


@pytest.mark.parametrize("mode", ["rpc", "queue"])
def test_a_reused_shard_object_is_never_one_that_fun_kept(mode):
    """The speculative loops reuse one shard object while nothing else holds it: shards that fun
    kept (stored, returned, captured in a failure), and their rng, stay exactly the shard they
    were; shard.rng of every id is that id's own stream, whether the previous shard drew or not."""
    kept: list[Any] = []
    draws: dict[int, float] = {}

    def fun(shard: Any) -> Any:
        if shard.id % 7 == 0:
            kept.append(shard)
        if shard.id % 5 == 0:
            draws[shard.id] = float(shard.rng.random())
        if shard.id % 11 == 3:
            raise ValueError(shard)  # the exception holds the shard
        return shard if shard.id % 9 == 0 else shard.id

    h = Exec(fun, 400)
    errors: list[tuple] = []
    try:
        if mode == "rpc":
            h.ex.run_ids([0])
            h.ex.ewma_ns = 1_000
            out = flatten(h.ex.run_ids(list(range(1, 400))))
        else:
            h.ex.run_block(0, 1, errors.append, lambda sid, ev: None)
            h.ex.ewma_ns = 1_000
            h.ex.run_block(1, 400, errors.append, lambda sid, ev: None)
            out = []
        assert [s.id for s in kept] == [i for i in range(400) if i % 7 == 0]
        assert len({id(s) for s in kept}) == len(kept)
        for sid, ok, value in out:
            if ok == OK and sid % 9 == 0:
                assert value.id == sid and value.start == sid and value.stop == sid + 1
            elif ok == OK:
                assert value == sid
        ref = shardc.shards(400, block_size=1)
        for sid, x in draws.items():
            s = ref.shard(sid)
            s._seedseq = 99  # the harness's entropy
            assert x == float(s.rng.random())
        assert all(s.rng is s.rng for s in kept)
    finally:
        h.close()
