"""The per-call path, third round (issue 18): what a 10-shard call no longer pays for.

* A small call's END goes with its work (``RpcDispatcher.start``): no second
  wake-up per worker when the call is over.  A retry sent to a worker that
  ended the call is preceded by the call's setup again
  (``Supervisor.resume``); a worker that hands chunks back keeps the call
  open (its END is void).
* Workers run under SCHED_BATCH (``SHARDC_WORKER_SCHED``).
* A worker's statm is not read while it cannot show growth
  (``MemoryModel.unmoved``); the call-start liveness check reads no
  ``/proc/PID/stat``.
* A worker's end-of-call heap check waits until it is idle.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np
import pytest

import shardc
from shardc import _lowlevel as ll
from shardc import memory as mem
from shardc.dispatch_rpc import RpcDispatcher
from shardc.handle import WorkerHandle
from shardc.protocol import END
from shardc.supervisor import Supervisor
from shardc.worker.heap import HeapPolicy

pytestmark = pytest.mark.timeout(120)


def _ident(shard: Any) -> int:
    return int(shard.id)


def _first_slow(shard: Any) -> int:
    time.sleep(0.5 if shard.id == 0 else 0.01)
    return int(shard.id)


def _ends_sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every END message the master sends, as sent."""
    sent: list[tuple[Any, ...]] = []
    from shardc._channel import Channel

    orig = Channel.send

    def spy(self: Channel, obj: Any, fds: Any = ()) -> int:
        if isinstance(obj, tuple) and obj and obj[0] == END:
            sent.append(obj)
        return orig(self, obj, fds)

    monkeypatch.setattr(Channel, "send", spy)
    return sent


def _resumes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    orig = Supervisor.resume

    def spy(self: Supervisor, w: Any) -> bool:
        seen.append(w.slot)
        return orig(self, w)

    monkeypatch.setattr(Supervisor, "resume", spy)
    return seen


def test_a_small_call_sends_its_end_with_its_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """10 shards on 2 workers: one END per worker, carrying the call id, sent with the work; none
    when the call is over.  A one-shard call: the worker without a share gets its END at the end
    (it stays in the call, ready for a retry).  A bigger call (three rounds) ends as before: a plain
    END per worker at its end.  Every result is exact, and the next call runs on the same workers."""
    ends = _ends_sent(monkeypatch)
    with shardc.Pool(2) as pool:
        pids = [w.pid for w in pool.workers]
        for _ in range(3):
            del ends[:]
            r = shardc.shard_map(10, _ident, pool=pool, progress=False)
            assert r.results == list(range(10)) and not r.failures
            assert len(ends) == 2 and all(len(e) == 2 for e in ends), ends
            assert all(not w.call_ended for w in pool.workers)  # (cleared for the next call)
        del ends[:]
        r = shardc.shard_map(1, _ident, pool=pool, progress=False)  # one worker has no share: it stays in
        assert r.results == [0]
        assert sorted(len(e) for e in ends) == [1, 2], ends  # the one with the shard early, the other at the end
        del ends[:]
        r = shardc.shard_map(200, _ident, pool=pool, progress=False, autotune=False)
        assert r.results == list(range(200))
        assert ends == [(END,), (END,)]
        assert [w.pid for w in pool.workers] == pids


def _into(shard: Any, out: Any) -> None:
    out[shard.id] = shard.id + 1


def test_an_shm_queue_call_sends_its_end_with_the_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """shm_queue: each worker's END goes right behind its QUEUE (it reads it when it leaves the
    ring), none at the call's end; outputs exact over calls of several sizes."""
    ends = _ends_sent(monkeypatch)
    with shardc.Pool(2) as pool:
        for n in (100, 2000, 100):
            out = shardc.buffer("i8", n)
            del ends[:]
            r = shardc.shard_map(n, _into, out={"out": out}, dispatch_mode="shm_queue", pool=pool, progress=False)
            assert r.succeeded and np.array_equal(out.array, np.arange(1, n + 1))
            assert len(ends) == 2 and all(len(e) == 2 for e in ends), ends
            out.close()
        assert shardc.shard_map(10, _ident, pool=pool, progress=False).results == list(range(10))


def test_a_retry_after_an_early_end_sets_the_call_up_again(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard 3 fails its first attempt: its retry goes to a worker that already ended the call,
    which is set up again first (resume); the retry succeeds and nothing else runs twice.

    A worker whose first chunk ran past COALESCE_S (a loaded machine) hands its queued chunks
    back instead, which voids its END: then no resume is due.  Such a run is checked for the
    outcome only and the scenario runs again (at most 6 times) until one has no hand-back."""
    resumes = _resumes(monkeypatch)
    returned: list[int] = []
    orig = RpcDispatcher.on_returned

    def spy(self: RpcDispatcher, w: Any, ids: list[int]) -> None:
        returned.append(w.slot)
        orig(self, w, ids)

    monkeypatch.setattr(RpcDispatcher, "on_returned", spy)

    with shardc.Pool(2) as pool:
        for attempt in range(6):
            marker = str(tmp_path / f"failed-once-{attempt}")

            def flaky(shard: Any, marker: str = marker) -> int:
                if shard.id == 3 and not os.path.exists(marker):
                    open(marker, "w").close()
                    raise RuntimeError("first attempt fails")
                return int(shard.id)  # (short: no worker hands chunks back, each ends the call with its share)

            del resumes[:], returned[:]
            r = shardc.shard_map(10, flaky, pool=pool, progress=False, max_retries=2)
            assert r.results == list(range(10)) and not r.failures
            attempts = list(r.diagnostics.shard_attempts)
            assert attempts[3] == 2 and [a for i, a in enumerate(attempts) if i != 3] == [1] * 9, attempts
            assert shardc.shard_map(10, _ident, pool=pool, progress=False).results == list(range(10))
            if not returned:
                assert resumes, "the retry reached a worker without its call set up again"
                return
        pytest.fail(
            f"a worker handed chunks back in each of 6 runs (last: workers {returned}): the early-END path never ran"
        )


def test_a_worker_that_hands_chunks_back_keeps_the_call_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard 0 runs 0.5 s: its worker hands back what is queued behind its next chunk, so its END
    (sent with the work) is void and it is never set up again (the other worker, which ended the
    call, is, to take the chunks handed back); every shard runs once; the call then ends with a
    plain END to the worker that kept it open."""
    resumes = _resumes(monkeypatch)
    ends = _ends_sent(monkeypatch)
    with shardc.Pool(2) as pool:
        r = shardc.shard_map(10, _first_slow, pool=pool, progress=False)
        assert r.results == list(range(10)) and not r.failures
        assert list(r.diagnostics.shard_attempts) == [1] * 10
        slow = int(r.diagnostics.shard_worker[0])
        assert slow not in resumes, resumes
        assert (END,) in ends  # the worker that handed back: its call stayed open until the end
        assert shardc.shard_map(10, _ident, pool=pool, progress=False).results == list(range(10))


def _policy(shard: Any) -> int:
    return int(os.sched_getscheduler(0))


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
@pytest.mark.parametrize("setting", [None, "normal", "batch"])
def test_workers_run_under_sched_batch(setting: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """SCHED_BATCH by default and with SHARDC_WORKER_SCHED=batch; SCHED_OTHER with =normal.  The
    master's own policy is never changed."""
    if setting is None:
        monkeypatch.delenv("SHARDC_WORKER_SCHED", raising=False)
    else:
        monkeypatch.setenv("SHARDC_WORKER_SCHED", setting)
    before = os.sched_getscheduler(0)
    with shardc.Pool(2) as pool:
        got = set(shardc.shard_map(4, _policy, pool=pool, progress=False).results)
    want = os.SCHED_OTHER if setting == "normal" else os.SCHED_BATCH
    assert got == {want}
    assert os.sched_getscheduler(0) == before


def test_a_bad_worker_sched_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDC_WORKER_SCHED", "fifo")
    with pytest.raises(shardc.InvalidArgumentError, match="SHARDC_WORKER_SCHED"):
        shardc.config.get_str("SHARDC_WORKER_SCHED")


# -- memory reads ---------------------------------------------------------------------------------


class _Model(mem.MemoryModel):
    workers: list[Any] = []


def _handle(rss: int = 100 << 20) -> WorkerHandle:
    w = WorkerHandle(0, os.getpid(), None)  # type: ignore[arg-type]
    w.fast_raw = {"rss": rss, "anon": rss // 2}
    w.fast_t = time.monotonic()
    return w


def test_unmoved_holds_only_while_growth_is_impossible() -> None:
    """A recent read and less shard time than STATM_SLACK takes at MEM_RATE: unmoved.  Shard time
    past that, an old read, no read yet, or a cap within the slack of the last read: read again."""
    m = _Model()
    w = _handle()
    assert m.unmoved(w)
    limit_ns = int(mem.STATM_SLACK / mem.MEM_RATE * 1e9)
    w.busy_unread_ns = limit_ns // 2
    assert m.unmoved(w)
    w.busy_unread_ns = limit_ns + 1
    assert not m.unmoved(w)
    w.busy_unread_ns = mem.BUSY_UNKNOWN
    assert not m.unmoved(w)
    w = _handle()
    w.fast_t -= 2 * mem.STATM_MAX_AGE
    assert not m.unmoved(w)
    w = _handle()
    w.fast_raw = None
    assert not m.unmoved(w)
    w = _handle(rss=100 << 20)
    assert m.unmoved(w, cap=1 << 30)
    assert not m.unmoved(w, cap=(100 << 20) + mem.STATM_SLACK // 2)


def _count_statm(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    pids: list[int] = []
    orig = ll.proc_mem_fast

    def spy(pid: int) -> Any:
        pids.append(pid)
        return orig(pid)

    monkeypatch.setattr(ll, "proc_mem_fast", spy)
    return pids


def _grow(shard: Any) -> int:
    if shard.id == 7:
        a = np.ones(64 * 1024**2 // 8)  # 64 MiB touched: ~10 ms of page faults
        sys.__dict__.setdefault("_shardc_test_keep", []).append(a)  # (held past the call)
    return int(shard.id)


def test_tiny_calls_skip_statm_and_a_growing_shard_is_still_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Twenty 10-shard calls of tiny shards read the workers' statm far less than twice a call;
    a call whose shard makes 64 MiB resident is read after its report, and the growth shows."""
    reads = _count_statm(monkeypatch)
    with shardc.Pool(2, mem_cap="8GB") as pool:
        for _ in range(5):
            shardc.shard_map(10, _ident, pool=pool, progress=False)
        worker_pids = {w.pid for w in pool.workers}
        del reads[:]
        for _ in range(20):
            shardc.shard_map(10, _ident, pool=pool, progress=False)
        assert sum(1 for p in reads if p in worker_pids) < 20, len(reads)
        time.sleep(2 * mem.STATM_MAX_AGE)  # (the growing call must not be within the window either way)
        shardc.shard_map(10, _ident, pool=pool, progress=False)
        before = {w.slot: w.fast_raw["anon"] for w in pool.workers if w.fast_raw}
        del reads[:]
        r = shardc.shard_map(10, _grow, pool=pool, progress=False, recycle=False)
        assert r.results == list(range(10))
        slot = int(r.diagnostics.shard_worker[7])
        w = pool.workers[slot]
        assert w.pid in reads
        assert w.fast_raw is not None and w.fast_raw["anon"] - before.get(slot, 0) >= 48 * 1024**2


# -- the idle check -------------------------------------------------------------------------------


def test_a_worker_killed_while_idle_is_replaced_before_the_next_call() -> None:
    with shardc.Pool(2) as pool:
        shardc.shard_map(4, _ident, pool=pool, progress=False)
        victim = pool.workers[0].pid
        os.kill(victim, 9)
        time.sleep(0.2)
        r = shardc.shard_map(10, _ident, pool=pool, progress=False)
        assert r.results == list(range(10))
        assert victim not in {w.pid for w in pool.workers}
        assert any("died while idle" in e.get("reason", "") for e in r.diagnostics.events), r.diagnostics.events


def test_the_pools_selector_is_kept_and_watches_exactly_its_workers() -> None:
    """One selector for every call of a pool; after a worker is replaced between calls (killed
    while idle) it watches the new socket and no longer the old one; closed with the pool."""
    with shardc.Pool(2) as pool:
        shardc.shard_map(10, _ident, pool=pool, progress=False)
        sel = pool.selector
        assert sel is not None
        old = pool.workers[1].chan.sock
        os.kill(pool.workers[1].pid, 9)
        time.sleep(0.2)
        assert shardc.shard_map(10, _ident, pool=pool, progress=False).results == list(range(10))
        assert pool.selector is sel
        watched = [key.fileobj for key in sel.get_map().values()]
        assert len(watched) == 2 and old not in watched
        assert {id(x) for x in watched} == {id(w.chan.sock) for w in pool.workers}
    with pytest.raises((RuntimeError, ValueError, OSError)):
        sel.select(0)  # closed with the pool


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or ll.heap_stats() is None, reason="heap reuse needs glibc >= 2.33"
)
def test_an_idle_worker_runs_its_end_of_call_heap_check(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls in a row leave the check to idleness: it runs once a worker is idle (not at every
    call), and every worker that took part runs it then."""
    marks = tmp_path / "checks"
    marks.mkdir()
    orig = HeapPolicy.end_call

    def spy(self: HeapPolicy) -> None:
        (marks / f"{os.getpid()}-{time.monotonic_ns()}").touch()
        orig(self)

    monkeypatch.setattr(HeapPolicy, "end_call", spy)  # (the workers fork from this process)
    with shardc.Pool(2) as pool:
        shardc.shard_map(10, _ident, pool=pool, progress=False)
        time.sleep(0.2)
        first = {p.name.split("-")[0] for p in marks.iterdir()}
        assert first == {str(w.pid) for w in pool.workers}
        for p in list(marks.iterdir()):
            p.unlink()
        for _ in range(50):
            shardc.shard_map(10, _ident, pool=pool, progress=False)
        in_a_row = len(list(marks.iterdir()))
        time.sleep(0.2)
        assert {p.name.split("-")[0] for p in marks.iterdir()} == {str(w.pid) for w in pool.workers}
    assert in_a_row < 50, in_a_row


def _twice(shard: Any) -> int:
    return 2 * int(shard.id)


def test_a_worker_keeps_the_shard_time_of_each_recent_fun() -> None:
    """Calls alternating between two functions: each function's first call measures its first shard
    (a memory delta is recorded), its later calls start from the time kept for it (none measured),
    where one guess for the last function alone was lost at every switch."""
    with shardc.Pool(1) as pool:
        seen = []
        for f in (_ident, _twice, _ident, _twice, _ident):
            r = shardc.shard_map(20, f, pool=pool, progress=False)
            assert r.results == [f(type("S", (), {"id": i})()) for i in range(20)]
            seen.append(not np.isnan(r.diagnostics.shard_mem_delta[0]))
    assert seen == [True, True, False, False, False]


def _slow_into(shard: Any, out: Any) -> None:
    time.sleep(0.001)
    out[shard.id] = shard.id + 1


def test_a_call_of_tiny_shards_of_a_known_fun_goes_in_whole_in_equal_blocks() -> None:
    """shm_queue: the first call of a fun probes (8-shard blocks, then growing and shrinking ones);
    once a call of it measured ~ms of work (within a few calls of a fresh pool), its next calls go
    in as 2 equal blocks per worker, and stay so; a different fun probes again, and a fun of 1 ms
    shards never goes in whole; outputs exact throughout."""
    with shardc.Pool(2) as pool:

        def run(fun: Any, n: int = 1000) -> list[int]:
            out = shardc.buffer("i8", n)
            r = shardc.shard_map(n, fun, out={"out": out}, dispatch_mode="shm_queue", pool=pool, progress=False)
            assert r.succeeded and np.array_equal(out.array, np.arange(1, n + 1))
            out.close()
            return sorted(b[2] for b in r.diagnostics.blocks)

        first = run(_into)
        assert min(first) < 250 and len(first) > 4, first
        for _ in range(10):
            if run(_into) == [250] * 4:
                break
        else:
            pytest.fail("calls of a known tiny fun never went in whole")
        assert run(_into) == [250] * 4 and run(_into) == [250] * 4
        assert len(run(_into2)) > 4  # a new fun: probed again
        for _ in range(3):
            assert len(run(_slow_into, 200)) > 4  # 0.2 s of work: never whole


def _into2(shard: Any, out: Any) -> None:
    out[shard.id] = shard.id + 1


def _count(shard: Any, hits: Any) -> None:
    hits[shard.id] += 1


def _count_then_die_once(shard: Any, hits: Any, flag: Any) -> None:
    hits[shard.id] += 1
    if shard.id == 3 and flag[0] == 0:
        flag[0] = 1
        os.kill(os.getpid(), 9)


def test_the_kept_done_map_handle_follows_the_pools_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker reuses its done-map handle while the call's map is the same region of the same
    mapping: small calls, then a call big enough to replace the pool's kept map, then small calls
    again, one with a crash: every shard's mark lands in the map the master reads (no shard rerun
    but the crashed one, none lost)."""
    with shardc.Pool(2) as pool:
        for n in (10, 10, 300_000, 10, 10):
            hits = shardc.buffer("i4", n)
            r = shardc.shard_map(
                n,
                _count,
                out={"hits": hits},
                dispatch_mode="shm_queue" if n > 10 else "rpc_chunked",
                pool=pool,
                progress=False,
            )
            assert r.succeeded and int(hits.array.min()) == 1 == int(hits.array.max()), n
            hits.close()
        hits, flag = shardc.buffer("i4", 10), shardc.buffer("i4", 1)
        r = shardc.shard_map(10, _count_then_die_once, out={"hits": hits, "flag": flag}, pool=pool, progress=False)
        assert r.succeeded
        assert hits.array.tolist() == [1, 1, 1, 2, 1, 1, 1, 1, 1, 1]  # shard 3: its crashed attempt and its retry
        hits.close()
        flag.close()


@pytest.mark.parametrize("n", [1, 10, 12345])
def test_an_int_n_resolves_to_what_shards_makes(n: int) -> None:
    """resolve_shards' fast path for an int N is the descriptor ``shards(N, block_size=1)`` makes."""
    from shardc.shards import shards
    from shardc.validate import resolve_shards

    desc, scalar = resolve_shards(n)
    assert scalar and vars(desc) == vars(shards(n, block_size=1))
