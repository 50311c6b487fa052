"""The per-call path (issue 18): the pool's kept done map and the pipelined setup.

A pool keeps one done map for its calls (``StatusTable.done_map``), reset
only once no worker can still mark it; a call on a quiet pool sends its
first work right behind CALL (``Supervisor.setup_all(pipeline=True)``) and
reads the READYs in its event loop.  These tests check that every setup
outcome (error, death, hang) still ends as it did with the waiting setup,
and that an earlier call's late marks never reach a later call.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
import pytest

import shardc
from shardc import call as call_mod
from shardc import status as status_mod

pytestmark = pytest.mark.timeout(120)


def _ident(shard: Any) -> int:
    return int(shard.id)


def _slow_none(shard: Any) -> None:
    time.sleep(0.02)  # marks its shard 1 (done, no value): what a death's loss counts as completed


def _write(shard: Any, out: Any) -> None:
    out[shard.id] = shard.id + 1


def _arm(kind: str, marker: str) -> Any:
    """Runs in a worker while it unpickles ``fun`` (the call's setup):
    worker slot 0 fails, dies once, or hangs; the others get ``_slow_none``."""
    if os.environ.get("SHARDC_WORKER") == "0":
        if kind == "fail":
            raise RuntimeError("this fun cannot be loaded in worker 0")
        if kind == "die_once" and not os.path.exists(marker):
            open(marker, "w").close()  # noqa: SIM115 - a marker: the replacement sets up fine
            os._exit(3)
        if kind == "hang":
            time.sleep(60)
    return _slow_none


class Armed:
    """A ``fun`` whose unpickling in a worker does ``kind`` (see ``_arm``)."""

    def __init__(self, kind: str, marker: str = "") -> None:
        self.kind, self.marker = kind, marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (_arm, (self.kind, self.marker))

    def __call__(self, shard: Any) -> int:
        return int(shard.id)


def _no_wait(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make a waiting setup visible: returns the list of workers waited for."""
    waited: list[int] = []
    orig = call_mod.CallSetup.await_ready

    def spy(self: Any, w: Any, kill: Any) -> None:
        waited.append(w.slot)
        orig(self, w, kill)

    monkeypatch.setattr(call_mod.CallSetup, "await_ready", spy)
    return waited


def test_kept_done_map_reused_across_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small calls share the pool's one done map (same segment, no fd sent again); a bigger call grows it; one over DONE_KEEP gets its own."""
    monkeypatch.setattr(status_mod, "DONE_KEEP", 20_000)
    with shardc.Pool(2) as pool:
        kept = pool.status._kept
        assert kept is not None
        key = kept.segment.key
        buf = shardc.buffer("i8", 30_000)
        for n in (10, 100, 4096, 7):
            r = shardc.shard_map(n, _ident, pool=pool, progress=False)
            assert r.results == list(range(n))
            buf.array[:] = 0
            shardc.shard_map(n, _write, out={"out": buf}, dispatch_mode="shm_queue", pool=pool, progress=False)
            assert np.array_equal(buf.array[:n], np.arange(1, n + 1))
            assert pool.status._kept is kept and kept.segment.key == key
            assert all(key in w.known for w in pool.workers)
        r = shardc.shard_map(5000, _ident, pool=pool, progress=False)  # grows the kept map (8192)
        assert r.results == list(range(5000))
        grown = pool.status._kept
        assert grown is not kept and grown is not None and grown.array.shape[0] == 8192
        r = shardc.shard_map(25_000, _ident, chunk_size="auto", pool=pool, progress=False)  # > DONE_KEEP: its own
        assert r.results == list(range(25_000))
        assert pool.status._kept is grown
        # The next small call starts from a clean map (the 5000-shard call's marks are gone).
        buf.array[:] = 0
        shardc.shard_map(6000, _write, out={"out": buf}, dispatch_mode="shm_queue", pool=pool, progress=False)
        assert np.array_equal(buf.array[:6000], np.arange(1, 6001))
        buf.close()


def test_quiet_pool_pipelines_the_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call on a pool whose last call ended with all work reported does not wait for READY (both modes); the pool stays quiet."""
    waited = _no_wait(monkeypatch)
    with shardc.Pool(2) as pool:
        buf = shardc.buffer("i8", 200)
        for _ in range(3):
            assert pool.status.quiet
            r = shardc.shard_map(50, _ident, pool=pool, progress=False)
            assert r.results == list(range(50)) and not r.failures
            shardc.shard_map(200, _write, out={"out": buf}, dispatch_mode="shm_queue", pool=pool, progress=False)
            assert np.array_equal(buf.array, np.arange(1, 201))
        assert waited == []
        pool.status.quiet = False  # as after a call cut short: the setup waits again
        r = shardc.shard_map(50, _ident, pool=pool, progress=False)
        assert r.results == list(range(50))
        assert sorted(waited) == [0, 1] and pool.status.quiet
        buf.close()


@pytest.mark.parametrize("mode", ["rpc_chunked", "shm_queue"])
def test_pipelined_setup_error_then_late_marks_do_not_leak(mode: str) -> None:
    """A setup error read in the loop fails the call as before; the next call waits for READY, so the other worker's late marks of the failed call never count in it (a death there requeues them)."""
    with shardc.Pool(2) as pool:
        assert pool.status.quiet
        buf = shardc.buffer("i8", 40)
        with pytest.raises(shardc.WorkerSetupError, match="cannot be loaded in worker 0"):
            if mode == "shm_queue":
                shardc.shard_map(40, _FailWrite(), out={"out": buf}, dispatch_mode=mode, pool=pool, progress=False)
            else:
                shardc.shard_map(40, Armed("fail"), chunk_size=10, pool=pool, progress=False)
        assert not pool.status.quiet
        # Worker 1 may still be running the failed call's shards (20 ms each;
        # ids 20..39 in rpc, any in the ring), marking them done.  In the next
        # call worker 1 dies at its first shard holding ids 20..39: the loss
        # requeues them unless marked, so a late mark would lose its value.
        marker = os.path.join(tempfile.gettempdir(), f"shardc-die-{os.getpid()}-{mode}")
        r = shardc.shard_map(
            40, _DieOnce(marker), chunk_size=10, pool=pool, progress=False, on_failure="collect", max_retries=2
        )
        assert r.results == list(range(40)), r.results
        assert not r.failures
        buf.close()


class _FailWrite:
    """shm_queue's fun: fails to load in worker 0, writes (slowly) elsewhere."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_arm_write, ())

    def __call__(self, shard: Any, out: Any) -> None:
        out[shard.id] = shard.id + 1


def _slow_write(shard: Any, out: Any) -> None:
    time.sleep(0.02)
    out[shard.id] = shard.id + 1


def _arm_write() -> Any:
    if os.environ.get("SHARDC_WORKER") == "0":
        raise RuntimeError("this fun cannot be loaded in worker 0")
    return _slow_write


class _DieOnce:
    """Returns the id; the first shard it runs in worker slot 1 kills that worker (once)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, shard: Any) -> int:
        if os.environ.get("SHARDC_WORKER") == "1" and not os.path.exists(self.marker):
            open(self.marker, "w").close()  # noqa: SIM115 - once per test
            os._exit(9)
        return int(shard.id)


@pytest.mark.parametrize("mode", ["rpc_chunked", "shm_queue"])
def test_pipelined_setup_death_is_a_death_before_the_call(tmp_path: Any, mode: str) -> None:
    """A worker dying while it sets up a pipelined call is replaced and reported (in this call) as before the call started; its work reruns, nothing is charged."""
    with shardc.Pool(2) as pool:
        assert pool.status.quiet
        fun = Armed("die_once", str(tmp_path / "died"))
        r = shardc.shard_map(30, fun, dispatch_mode=mode, pool=pool, progress=False)
        assert r.results == [None] * 30 and not r.failures  # (the fun it loads returns None)
        reasons = [e["reason"] for e in r.diagnostics.events if e["event"] == "death"]
        assert len(reasons) == 1 and "died before the call started" in reasons[0], reasons
        if mode == "rpc_chunked":  # (shm_queue records blocks, not per-shard attempts)
            assert np.all(r.diagnostics.shard_attempts == 1)  # every shard ran once: nothing charged
        r = shardc.shard_map(10, _ident, pool=pool, progress=False)
        assert r.results == list(range(10))


def test_pipelined_setup_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker stuck setting up a pipelined call is killed after SHARDC_SETUP_TIMEOUT with CallSetupTimeoutError; the pool serves the next call."""
    monkeypatch.setenv("SHARDC_SETUP_TIMEOUT", "1.5")
    with shardc.Pool(2) as pool:
        assert pool.status.quiet
        t0 = time.monotonic()
        with pytest.raises(shardc.errors.CallSetupTimeoutError, match="within 1.5 s"):
            shardc.shard_map(20, Armed("hang"), pool=pool, progress=False, timeout=600)
        assert time.monotonic() - t0 < 20
        r = shardc.shard_map(10, _ident, pool=pool, progress=False)
        assert r.results == list(range(10))


def _sleep_id(shard: Any) -> int:
    time.sleep(1.6 if shard.id < 2 else 0)  # past the 1 s setup timeout below
    return int(shard.id)


def _hang_first(shard: Any) -> int:
    if shard.id == 0:
        time.sleep(60)
    return int(shard.id)


def test_long_first_shard_is_not_a_setup_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose work followed its CALL skips READY; a first shard running past SHARDC_SETUP_TIMEOUT is seen set up (its status row), not killed."""
    monkeypatch.setenv("SHARDC_SETUP_TIMEOUT", "1")
    with shardc.Pool(2) as pool:
        shardc.shard_map(2, _ident, pool=pool, progress=False)  # warm
        assert pool.status.quiet
        r = shardc.shard_map(4, _sleep_id, pool=pool, progress=False, on_failure="collect")
        assert r.results == [0, 1, 2, 3] and not r.failures
        assert not [e for e in r.diagnostics.events if e["event"] == "death"]


@pytest.mark.parametrize("mode", ["rpc_chunked", "shm_queue"])
def test_shard_timeout_in_a_pipelined_call(mode: str) -> None:
    """A shard hanging in a pipelined call's first work still times out (the watchdog knows the worker is set up)."""
    with shardc.Pool(2) as pool:
        buf = shardc.buffer("i8", 4)
        shardc.shard_map(2, _ident, pool=pool, progress=False)  # warm
        assert pool.status.quiet
        t0 = time.monotonic()
        if mode == "shm_queue":
            r = shardc.shard_map(
                4,
                _hang_write,
                out={"out": buf},
                dispatch_mode=mode,
                pool=pool,
                progress=False,
                timeout=1,
                max_retries=0,
                on_failure="collect",
            )
        else:
            r = shardc.shard_map(
                4, _hang_first, pool=pool, progress=False, timeout=1, max_retries=0, on_failure="collect"
            )
        assert time.monotonic() - t0 < 30
        assert list(r.failures) == [0] and "timeout" in r.failures[0].message
        buf.close()


def _hang_write(shard: Any, out: Any) -> None:
    if shard.id == 0:
        time.sleep(60)
    out[shard.id] = shard.id + 1


@pytest.mark.parametrize("mode", ["rpc_chunked", "shm_queue"])
def test_worker_dead_when_a_pipelined_call_is_sent(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """A worker found dead when its CALL and first work go out (the write fails) is replaced; its work reruns, the call completes, nothing is charged."""
    from shardc import _channel

    with shardc.Pool(2) as pool:
        buf = shardc.buffer("i8", 40)
        shardc.shard_map(2, _ident, pool=pool, progress=False)  # warm
        assert pool.status.quiet
        victim = pool.workers[0]
        orig = _channel.Channel.uncork

        def uncork(self: Any) -> None:
            if self is victim.chan and victim.alive:
                os.kill(victim.pid, 9)
                end = time.monotonic() + 5
                while psutil_alive(victim.pid) and time.monotonic() < end:  # dead: the write fails
                    time.sleep(0.005)
            orig(self)

        monkeypatch.setattr(_channel.Channel, "uncork", uncork)
        if mode == "shm_queue":
            r = shardc.shard_map(40, _write, out={"out": buf}, dispatch_mode=mode, pool=pool, progress=False)
            assert np.array_equal(buf.array, np.arange(1, 41))
        else:
            r = shardc.shard_map(40, _ident, pool=pool, progress=False)
            assert r.results == list(range(40))
        assert not r.failures
        if mode == "rpc_chunked":  # (shm_queue records blocks, not per-shard attempts)
            assert np.all(r.diagnostics.shard_attempts == 1)
        deaths = [e for e in r.diagnostics.events if e["event"] == "death"]
        assert len(deaths) == 1 and "before the call started" in deaths[0]["reason"], deaths
        monkeypatch.setattr(_channel.Channel, "uncork", orig)
        r = shardc.shard_map(10, _ident, pool=pool, progress=False)
        assert r.results == list(range(10))
        buf.close()


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
