"""shardc.Executor: a concurrent.futures.Executor on the engine core, tested
for real (workers killed, hung, over their memory cap)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import gc
import os
import pickle
import signal
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

import shardc
from shardc.errors import (
    BorrowedInputWriteError,
    InvalidArgumentError,
    ShardTimeoutError,
    UnpicklableFunctionError,
    UsageError,
    WorkerCrashedError,
    WorkerMemoryError,
)


def square(x):
    return x * x


def add(x, y=0):
    return x + y


def fail(x):
    raise ValueError(f"bad {x}")


def pid_of(_=None):
    return os.getpid()


def die_once(marker):
    """Die (SIGKILL) the first time, succeed on the retry."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


def die_always(_):
    os.kill(os.getpid(), signal.SIGKILL)


def sleeper(t):
    time.sleep(t)
    return t


def row_sum(i, X):
    return float(X[i].sum()), X.flags.writeable, X.ctypes.data


def write_x(X):
    X[0, 0] = 1.0


_held = []


def hold(nbytes):
    _held.append(np.ones(nbytes, dtype=np.uint8))
    return os.getpid()


def set_env(key, value):
    os.environ[key] = value


def get_env(key):
    return os.environ.get(key)


def grab(nbytes):
    b = bytearray(nbytes)  # touched: zero-filled
    return len(b)


def test_submit_map_and_futures_api():
    with shardc.Executor(2) as ex:
        assert ex.submit(add, 2, y=5).result(timeout=30) == 7
        assert list(ex.map(square, range(20))) == [i * i for i in range(20)]
        assert list(ex.map(add, range(20), range(20), chunksize=7)) == [2 * i for i in range(20)]
        items = [(1, 2), (3,), (), (4, 5, 6)]  # one iterable of tuples: each item is one argument
        for cs in (None, 1, 3):
            assert list(ex.map(len, items, chunksize=cs)) == [2, 1, 0, 3]
        fs = [ex.submit(square, i) for i in range(50)]
        done, pending = cf.wait(fs, timeout=30)
        assert not pending and sorted(f.result() for f in done) == sorted(i * i for i in range(50))
        assert sum(f.result() for f in cf.as_completed(fs, timeout=30)) == sum(i * i for i in range(50))
        assert ex.submit(lambda: 41 + 1).result(timeout=30) == 42  # cloudpickle for what pickle cannot

        async def main():
            return await asyncio.wrap_future(ex.submit(square, 9))

        assert asyncio.run(main()) == 81


def test_task_exception_fails_its_future_once_with_remote_traceback():
    with shardc.Executor(2, max_retries=3) as ex:
        f = ex.submit(fail, 3)
        with pytest.raises(ValueError, match="bad 3") as info:
            f.result(timeout=30)
        assert "raise ValueError" in str(info.value.__cause__)
        # not retried: the pool's workers are the same ones
        assert not ex.pool.events
        assert ex.submit(square, 4).result(timeout=30) == 16


def test_crash_is_retried_on_a_fresh_worker(tmp_path):
    with shardc.Executor(2, max_retries=2) as ex:
        before = {w.pid for w in ex.pool.workers}
        f = ex.submit(die_once, str(tmp_path / "m"))
        assert f.result(timeout=60) == "survived"
        assert any(e["event"] == "restart" for e in ex.pool.events)
        assert {w.pid for w in ex.pool.workers} != before
        assert list(ex.map(square, range(5))) == [0, 1, 4, 9, 16]  # still usable


def test_crash_every_time_fails_with_worker_crashed_error_after_retries():
    with shardc.Executor(2, max_retries=1) as ex:
        f = ex.submit(die_always, 0)
        with pytest.raises(WorkerCrashedError, match=r"task die_always: its worker died on each of 2 attempt") as info:
            f.result(timeout=60)
        assert isinstance(info.value, BrokenProcessPool) and isinstance(info.value, RuntimeError)
        assert info.value.exitcode == -signal.SIGKILL
        assert ex.submit(square, 3).result(timeout=30) == 9  # after the second worker's replacement
        restarts = [e for e in ex.pool.events if e["event"] == "restart"]
        assert len(restarts) == 2


def test_per_task_timeout_kills_only_that_task():
    with shardc.Executor(2, timeout=0.5) as ex:
        slow = ex.submit(sleeper, 30)
        quick = [ex.submit(square, i) for i in range(10)]
        with pytest.raises(ShardTimeoutError, match="timeout=0.5"):
            slow.result(timeout=30)
        assert [f.result(timeout=30) for f in quick] == [i * i for i in range(10)]
        assert ex.submit(sleeper, 0.01).result(timeout=30) == 0.01


def test_map_timeout_raises_and_cancels_the_rest():
    with shardc.Executor(1) as ex:
        it = ex.map(sleeper, [0.0, 1.5, 0.0, 0.0], timeout=0.5)  # shutdown waits for the running one
        assert next(it) == 0.0
        with pytest.raises(cf.TimeoutError):
            next(it)


def test_borrow_reaches_every_task_zero_copy_and_read_only():
    X = np.arange(40.0).reshape(8, 5)
    with shardc.Executor(2, borrow={"X": X}) as ex:
        out = list(ex.map(row_sum, range(8)))
        assert [o[0] for o in out] == [float(X[i].sum()) for i in range(8)]
        # one mapping per worker, reused by every task (the same address in a worker)
        assert len({o[2] for o in out}) <= 2
        assert list(ex.map(row_sum, range(8), chunksize=3)) == out  # chunks of one iterable's items
        with pytest.raises(BorrowedInputWriteError):
            ex.submit(write_x).result(timeout=30)
        assert X[0, 0] == 0.0


def test_shutdown_cancel_futures_and_submit_after_shutdown():
    ex = shardc.Executor(1)
    running = ex.submit(sleeper, 0.5)
    time.sleep(0.2)
    queued = [ex.submit(square, i) for i in range(20)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result() == 0.5
    assert all(f.cancelled() or f.done() for f in queued)
    assert any(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(square, 1)
    assert ex.pool.closed


def test_shutdown_without_wait_finishes_the_work():
    ex = shardc.Executor(2)
    fs = [ex.submit(sleeper, 0.05) for _ in range(6)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=30) for f in fs] == [0.05] * 6
    engine = ex._engine
    engine.thread.join(30)  # the engine stops its pool and leaves by itself
    assert not engine.thread.is_alive() and engine.pool.closed


def test_unpicklable_task_fails_its_future():
    lock = threading.Lock()
    with shardc.Executor(1) as ex:
        f = ex.submit(add, lock)
        with pytest.raises(UnpicklableFunctionError, match="cannot be pickled"):
            f.result(timeout=5)


def test_bad_arguments_are_refused_before_any_worker_starts():
    with pytest.raises(InvalidArgumentError, match="max_workers must be greater than 0"):
        shardc.Executor(0)
    with pytest.raises(InvalidArgumentError, match="cow"):
        shardc.Executor(1, cow="sometimes")
    with pytest.raises(InvalidArgumentError, match="borrow keys"):
        shardc.Executor(1, borrow={"not an identifier": 1})
    with pytest.raises(InvalidArgumentError, match="timeout"):
        shardc.Executor(1, timeout=-1)
    with pytest.raises(InvalidArgumentError, match="inherit must be a list or tuple"):
        shardc.Executor(1, max_nbytes="1M", inherit=np.ones(4))
    with shardc.Executor(1) as ex:
        with pytest.raises(InvalidArgumentError, match="chunksize"):
            ex.map(square, range(3), chunksize=0)
        with pytest.raises(InvalidArgumentError, match="callable"):
            ex.submit(3)


def test_on_a_given_pool_which_stays_open():
    with shardc.Pool(2) as pool:
        with shardc.Executor(pool=pool) as ex:
            pids = set(ex.map(pid_of, range(20)))
        assert pids <= {w.pid for w in pool.workers}
        assert not pool.closed
        res = shardc.shard_map(4, lambda s: s.id * 2, pool=pool)
        assert list(res.results) == [0, 2, 4, 6]


def test_memory_cap_kills_then_fails_and_recycles_at_a_task_boundary():
    # Margins of 100+ MB around the cap and 2x the cap: what a fresh worker
    # holds grows with what the master imported before (sklearn, pyarrow in
    # earlier tests: a 90 MB hold under a 64 MB cap read as over 2x there).
    with shardc.Executor(1, mem_cap="200MB", max_retries=1) as ex:
        # over 2x the cap inside a task: killed mid-task, retried once, then failed
        with pytest.raises(WorkerMemoryError, match="task grab: its worker died on each of 2 attempt"):
            ex.submit(grab, 700 << 20).result(timeout=60)
        assert ex.submit(square, 5).result(timeout=30) == 25
        assert sum(e["event"] == "restart" for e in ex.pool.events) == 2
        # over the cap (not 2x) and kept after the task: recycled before the next one
        pid = ex.submit(hold, 260 << 20).result(timeout=60)
        pids = {ex.submit(pid_of).result(timeout=30) for _ in range(30)}
        assert pid not in pids
        assert any(e["event"] == "recycle" for e in ex.pool.events)


def test_dropped_executor_stops_its_engine():
    ex = shardc.Executor(1)
    assert ex.submit(square, 2).result(timeout=30) == 4
    engine = ex._engine
    ref = weakref.ref(ex)
    del ex
    gc.collect()
    assert ref() is None
    engine.thread.join(timeout=30)
    assert not engine.thread.is_alive() and engine.pool.closed


def test_initializer_runs_in_every_worker():
    with shardc.Executor(2, initializer=set_env, initargs=("H15_INIT", "yes")) as ex:
        assert set(ex.map(get_env, ["H15_INIT"] * 4)) == {"yes"}
    with pytest.raises(UsageError):
        ex.submit(square, 1)


def arg_info(X, i):
    return float(X[i].sum()), X.ctypes.data


def arg_write(X):
    X[3, 0] = 5.0


def test_max_nbytes_shares_big_array_arguments_zero_copy_read_only():
    X = np.ones((512, 512))  # 2 MiB
    small = np.ones((4, 4))
    with shardc.Executor(2, max_nbytes="1M") as ex:
        out = [f.result(timeout=30) for f in [ex.submit(arg_info, X, i) for i in range(20)]]
        assert [o[0] for o in out] == [512.0] * 20
        assert len({o[1] for o in out}) <= 2  # mapped once per worker, not unpickled per task
        with pytest.raises(BorrowedInputWriteError, match=r"'task argument' .*element \[3, 0\]"):
            ex.submit(arg_write, X).result(timeout=30)
        assert X[3, 0] == 1.0
        ex.submit(arg_write, small).result(timeout=30)  # under max_nbytes: pickled, a private copy
    with shardc.Executor(1) as ex:  # default: pickled, as ProcessPoolExecutor does
        ex.submit(arg_write, X).result(timeout=30)


def _counting_wants(sharer, calls, obj):
    from shardc.task_pickle import ArgSharer

    calls.append(type(obj))
    return ArgSharer.wants(sharer, obj)


def test_task_pickling_shares_only_wanted_arrays_and_skips_the_slow_pickler_otherwise():
    from shardc.task_pickle import ArgSharer, dumps_task

    sharer = ArgSharer(1000)
    big, small = np.arange(1000.0), np.arange(3.0)
    fn = lambda x: x  # noqa: E731 - needs cloudpickle
    for by_value in (False, True):
        for f in (len, fn):
            blob, refs = dumps_task((0, f, ({"deep": [small]},), {}), sharer, by_value)
            assert refs is None and b"shared" not in blob
            assert pickle.loads(blob)[2][0]["deep"][0].tolist() == [0.0, 1.0, 2.0]
            blob, refs = dumps_task((0, f, ([{"deep": (big,)}],), {}), sharer, by_value)
            assert refs is not None and len(refs[1]) == 1 and refs[1][0]["shape"] == (1000,)
        # a task with no big array never reaches the per-object persistent_id pickler
        calls: list[type] = []
        sharer.wants = functools.partial(_counting_wants, sharer, calls)  # type: ignore[method-assign]
        dumps_task((0, len, ([small] * 3, list(range(100)), "x"), {}), sharer, by_value)
        del sharer.wants
        assert np.ndarray in calls and len(calls) <= 8  # not once per item of the 100-item list


def test_lambda_task_with_a_big_array_shares_it_read_only():
    X = np.ones((512, 512))
    with shardc.Executor(1, max_nbytes="1M") as ex:
        with pytest.raises(BorrowedInputWriteError, match="'task argument'"):
            ex.submit(lambda A: A.__setitem__((3, 0), 5.0), X).result(timeout=30)
        assert ex.submit(lambda A: float(A.sum()), X).result(timeout=30) == 512.0 * 512


def touch_then_sleep(path, t):
    open(path, "w").close()
    time.sleep(t)
    return path


def test_a_worker_gets_its_next_task_before_the_outcome_callbacks_run(tmp_path):
    """A done-callback runs in the engine thread (joblib dispatches its next
    batches there): the worker that reported must not idle meanwhile."""
    marker = str(tmp_path / "b-started")
    seen = []

    def callback(_f):  # blocks the engine thread until B runs (or 5 s)
        end = time.monotonic() + 5
        while not os.path.exists(marker) and time.monotonic() < end:
            time.sleep(0.005)
        seen.append(os.path.exists(marker))

    with shardc.Executor(1) as ex:
        a = ex.submit(sleeper, 0.3)
        a.add_done_callback(callback)
        b = ex.submit(touch_then_sleep, marker, 0.0)
        assert a.result(timeout=30) == 0.3 and b.result(timeout=30) == marker
    assert seen == [True]


def blob(n):
    return bytes(range(256)) * (n // 256)


def test_big_and_small_messages_alternate_intact():
    """The channel reads small messages with a small buffer, big ones with a big one."""
    with shardc.Executor(1) as ex:
        for n in (256, 3 << 20, 512, (1 << 16) - 256, 1 << 16, 5 << 20, 256):
            assert ex.submit(blob, n).result(timeout=30) == blob(n)


def _gc_state_now():
    return gc.isenabled()


class GcProbe:
    """Unpickles into whether the cyclic GC was enabled at that moment."""

    def __reduce__(self):
        return (_gc_state_now, ())


def gc_states(at_load):
    return at_load, gc.isenabled()


def test_a_task_is_unpickled_with_the_gc_paused_and_runs_with_it_on():
    # A joblib batch of 65,536 calls unpickled ~15x slower with the GC running (shardc.stream.Task.load).
    with shardc.Executor(1) as ex:
        assert ex.submit(gc_states, GcProbe()).result() == (False, True)
        assert ex.submit(gc.disable).result() is None  # a task that turns the GC off keeps it off
        assert ex.submit(gc_states, GcProbe()).result() == (False, False)
        ex.submit(gc.enable).result()


def _sum_of(a):
    return float(a.sum())


@pytest.mark.parametrize("nbytes", [1 << 19, 16 << 20])  # compared / tracked by the kernel where it can
def test_a_big_argument_changed_in_place_between_tasks_is_never_served_stale(nbytes):
    """max_nbytes= shares big arguments through the share cache; every task that sends one gets a
    copy proven equal to the array as it is when the task is pickled (an earlier version kept
    the first copy for the array's lifetime: the second task summed the old zeros)."""
    a = np.zeros(nbytes // 8)
    with shardc.Executor(1, max_nbytes="64K") as ex:
        assert ex.submit(_sum_of, a).result(timeout=60) == 0.0
        a[:] = 1.0
        assert ex.submit(_sum_of, a).result(timeout=60) == float(a.size)
        a[-1] = 2.0
        assert list(ex.map(_sum_of, [a, a])) == [float(a.size) + 1.0] * 2
