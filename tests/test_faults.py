"""Fault injection (shardc._lowlevel.faults): a chosen native call fails with
ENOSPC, EMFILE, ENOMEM or EINTR the Nth time.  Each yields a clear error
naming the operation (or a fallback), never a hang, a leaked segment or fd,
or a wrong answer, and the next call works."""

from __future__ import annotations

import errno
import gc
import os

import numpy as np
import pytest

import shardc
from shardc._lowlevel import faults

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def disarm():
    """Every test leaves the wrappers calling the native module directly."""
    yield
    faults.clear()


def state() -> tuple[int, str]:
    """Open fds and live segments of this process."""
    return len(os.listdir("/proc/self/fd")), str(shardc.segment_report())


def ident(shard, out):
    out[shard.id] = shard.id + 1


@pytest.mark.parametrize("err", ["ENOSPC", "EMFILE", "ENOMEM", "EINTR"])
def test_buffer_create_fails(err: str) -> None:
    """buffer(): segment creation failing raises a SegmentError with that errno and the operation (or falls back); nothing leaks."""
    before = state()
    backing = "shm" if os.environ.get("SHARDC_PORTABLE") == "1" else "memfd"  # portable mode refuses memfd
    faults.inject("shardc_seg_create", err, times=10)
    try:
        b = shardc.buffer("f8", 1000, backing=backing)
    except shardc.SegmentError as exc:
        assert exc.errno == getattr(errno, err)
        assert "create" in str(exc) or backing in str(exc), str(exc)
    else:  # pragma: no cover - a fallback would be fine if it worked
        b.close()
        raise AssertionError(f"an explicit backing={backing!r} must not fall back silently")
    assert faults.fired("shardc_seg_create") >= 1
    faults.clear()
    assert state() == before
    b = shardc.buffer("f8", 1000, init=2.0)
    assert float(np.asarray(b).sum()) == 2000.0
    b.close()


def test_buffer_map_enomem() -> None:
    """buffer(): mmap failing with ENOMEM raises a SegmentError naming mmap; the segment's fd is closed."""
    before = state()
    faults.inject("shardc_seg_map", "ENOMEM")
    with pytest.raises(shardc.SegmentError) as ei:
        shardc.buffer("f8", 1000)
    assert ei.value.errno == errno.ENOMEM
    faults.clear()
    assert state() == before


@pytest.mark.parametrize("nth", [1, 2, 3, 5])
def test_shard_map_segment_fault(nth: int) -> None:
    """shard_map(): the Nth segment creation of a call failing gives a clear error; nothing leaks; the next call works."""
    pool = shardc.pool_create(1)
    try:
        out = shardc.buffer("int64", 8)
        borrow = np.arange(64.0)
        before = state()
        pids = [w.pid for w in pool.workers]
        faults.inject("shardc_seg_create", "ENOSPC", nth=nth, times=50)
        try:
            r = shardc.shard_map(
                8, lambda s, X, out: ident(s, out), borrow={"X": borrow}, out={"out": out}, progress=False, timeout=20
            )
        except shardc.ShardcError as exc:
            assert "No space left" in str(exc) or "ENOSPC" in str(exc), str(exc)
        else:
            assert list(np.asarray(out)) == list(range(1, 9)) and not r.failures
        faults.clear()
        del borrow  # its cached sealed copy lives as long as the array (by design)
        gc.collect()
        assert state()[1] == before[1]
        assert all(w.alive for w in pool.workers) and len(pool.workers) == len(pids)
        out2 = shardc.buffer("int64", 8)
        r = shardc.shard_map(8, ident, out={"out": out2}, progress=False, timeout=20)
        assert list(np.asarray(out2)) == list(range(1, 9)) and not r.failures
        out.close()
        out2.close()
    finally:
        shardc.pool_stop(pool)


def test_injection_is_inherited_and_cleared() -> None:
    """An armed fault counts calls and fires once; clear() restores the real module in every wrapper."""
    from shardc import _lowlevel as ll
    from shardc._lowlevel import seg

    faults.inject("shardc_seg_size", "EINTR", nth=2)
    assert seg.lib is not ll.lib
    faults.clear()
    assert seg.lib is ll.lib
    with pytest.raises(ValueError, match="no native function"):
        faults.inject("shardc_nope", "EINTR")


def test_worker_guard_enomem() -> None:
    """Workers forked with mprotect (guard_add) failing ENOMEM: the call fails at setup with the vm.max_map_count hint; the pool serves the next call."""
    X = np.arange(16.0)
    faults.inject("shardc_guard_add", "ENOMEM", times=1000)
    pool = shardc.pool_create(1)  # its worker inherits the armed fault
    faults.clear()
    try:
        out = shardc.buffer("f8", 16)
        before = state()[1]
        with pytest.raises(shardc.WorkerSetupError) as ei:
            shardc.shard_map(16, lambda s, X, out: None, borrow={"X": X}, out={"out": out}, progress=False, timeout=20)
        assert "Cannot allocate memory" in str(ei.value) and "max_map_count" in str(ei.value)
        del X, ei  # the traceback's frames hold the array, whose sealed copy is cached while it lives
        gc.collect()
        assert state()[1] == before
        r = shardc.shard_map(8, ident, out={"out": out}, progress=False, timeout=20)
        assert not r.failures and list(np.asarray(out)[:8]) == list(range(1, 9))
        out.close()
    finally:
        shardc.pool_stop(pool)


# -- Python-level calls: fork and socket send ------------------------------------
# These are not native calls, so the test is the injector: it wraps the Python
# call the engine makes (os.fork in pool.py, Channel.send_many in the rpc
# dispatcher) to fail the Nth time.


def _failing(real, err: str, nth: int, times: int):
    calls = {"n": 0, "fired": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= nth and calls["fired"] < times:
            calls["fired"] += 1
            code = getattr(errno, err)
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    return wrapper, calls


def test_fork_fails_at_pool_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """fork() failing EAGAIN while a pool starts: ShardcOSError naming fork and the process limit; no fd, segment or worker leaks."""
    shardc.pool_stop()
    before = state()
    wrapper, calls = _failing(os.fork, "EAGAIN", nth=2, times=1)
    monkeypatch.setattr(os, "fork", wrapper)
    with pytest.raises(shardc.errors.ShardcOSError) as ei:
        shardc.pool_create(2)
    monkeypatch.undo()
    assert calls["fired"] == 1 and ei.value.errno == errno.EAGAIN
    assert "fork a worker for slot 1" in str(ei.value) and "ulimit -u" in str(ei.value)
    del ei
    gc.collect()
    assert state() == before  # the first worker was stopped, the socket pair of the second closed
    out = shardc.buffer("f8", 8)
    r = shardc.shard_map(8, ident, out={"out": out}, workers=2, progress=False, timeout=20)
    assert not r.failures and list(np.asarray(out)) == list(range(1, 9))
    out.close()


def test_fork_fails_when_replacing_a_dead_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """fork() failing while a crashed worker is replaced mid-call: the call stops with that ShardcOSError (not a hang) and the pool serves the next call."""
    pool = shardc.pool_create(2)
    try:

        def crash(shard, out):
            if shard.id == 3:
                os._exit(7)
            out[shard.id] = shard.id + 1

        out = shardc.buffer("f8", 16)
        before = state()[1]
        wrapper, calls = _failing(os.fork, "EAGAIN", nth=1, times=1000)
        monkeypatch.setattr(os, "fork", wrapper)
        with pytest.raises(shardc.errors.ShardcOSError, match="fork a worker"):
            shardc.shard_map(16, crash, out={"out": out}, pool=pool, progress=False, timeout=20)
        monkeypatch.undo()
        assert calls["fired"] >= 1
        gc.collect()
        assert state()[1] == before
        r = shardc.shard_map(16, ident, out={"out": out}, pool=pool, progress=False, timeout=20)
        assert not r.failures and list(np.asarray(out)) == list(range(1, 17))
        out.close()
    finally:
        shardc.pool_stop(pool)


def test_send_fails_with_the_worker_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """A send of work failing (ENOBUFS) with the worker alive: that worker is retired, its chunks rerun elsewhere uncharged; every shard done once, no failure, no hang."""
    from shardc._channel import Channel

    pool = shardc.pool_create(2)
    try:
        out = shardc.buffer("f8", 200)
        wrapper, calls = _failing(Channel.send_many, "ENOBUFS", nth=3, times=1)
        monkeypatch.setattr(Channel, "send_many", wrapper)
        r = shardc.shard_map(200, ident, out={"out": out}, pool=pool, chunk_size=4, progress=False, timeout=20)
        monkeypatch.undo()
        assert calls["fired"] == 1
        assert not r.failures and list(np.asarray(out)) == list(range(1, 201))
        deaths = [e for e in r.diagnostics.events if e["event"] == "death"]
        assert len(deaths) == 1, deaths  # the retired worker, replaced
        assert r.diagnostics.retries == 0  # nothing was charged for it
        out.close()
    finally:
        shardc.pool_stop(pool)


def test_send_keeps_failing_stops_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sends that fail every time: the call stops with a ShardcOSError saying so, instead of replacing workers forever."""
    from shardc._channel import Channel

    pool = shardc.pool_create(2)
    try:
        out = shardc.buffer("f8", 50)
        wrapper, calls = _failing(Channel.send_many, "ENOBUFS", nth=1, times=10**6)
        monkeypatch.setattr(Channel, "send_many", wrapper)
        with pytest.raises(shardc.errors.ShardcOSError, match="times in a row"):
            shardc.shard_map(50, ident, out={"out": out}, pool=pool, progress=False, timeout=20)
        monkeypatch.undo()
        r = shardc.shard_map(50, ident, out={"out": out}, pool=pool, progress=False, timeout=20)
        assert not r.failures and list(np.asarray(out)) == list(range(1, 51))
        out.close()
    finally:
        shardc.pool_stop(pool)
