"""The fork server (``shardc.forkserver``): workers for callers with other threads.

The threaded-program test runs in a subprocess with a timeout: a deadlocked
worker would hang the program, not the test run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest

import shardc
from shardc.errors import InvalidArgumentError

# Reliability evidence (threaded callers, kill -9, a dead server): its own CI step (-m evidence),
# ~20-35 s of interpreter starts that the core run's 3-minute budget cannot hold.
pytestmark = pytest.mark.evidence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A program with busy threads: one takes the logging module's lock over and
# over (and logs), one allocates in a loop (malloc arenas busy), while pools
# start and workers are replaced.  Functions and a lambda from __main__ must
# reach the served workers (by value).
THREADED = textwrap.dedent(
    """
    import logging, os, signal, sys, threading, time
    import numpy as np
    import shardc, joblib

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    stop = threading.Event()

    def hold_logging_lock():
        lock = getattr(logging, "_lock")
        while not stop.is_set():
            with lock:
                time.sleep(0.0005)
            logging.getLogger("busy").debug("tick")

    def hammer_malloc():
        keep = []
        while not stop.is_set():
            keep.append(bytearray(np.random.randint(1, 1 << 16)))
            keep.append(np.ones(np.random.randint(1, 4096)))
            if len(keep) > 200:
                keep.clear()

    def square(x):
        return x * x

    def die_once(x, flag):
        if x == 3 and not os.path.exists(flag):
            open(flag, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return x + 1

    threads = [threading.Thread(target=f, daemon=True) for f in (hold_logging_lock, hammer_malloc)]
    for t in threads:
        t.start()
    flagdir = sys.argv[1]
    for it in range(int(sys.argv[2])):
        r = shardc.shard_map(16, lambda s: s.id * 3, workers=2, progress=False)
        assert r.results == [i * 3 for i in range(16)], r.results
        assert r.diagnostics.worker_start == ["server"], r.diagnostics.worker_start
        shardc.pool_stop()
        with shardc.Executor(2) as ex:
            assert all(w.server is not None for w in ex.pool.workers)
            assert list(ex.map(square, range(20))) == [i * i for i in range(20)]
            flag = os.path.join(flagdir, f"died{it}")
            assert list(ex.map(die_once, range(6), [flag] * 6, chunksize=1)) == [1, 2, 3, 4, 5, 6]
            assert os.path.exists(flag)
            assert ex.submit(lambda a: a + 1, 41).result(timeout=30) == 42
        with joblib.parallel_config(backend="shardc", n_jobs=2):
            out = joblib.Parallel()(joblib.delayed(square)(i) for i in range(10))
        assert out == [i * i for i in range(10)]
    stop.set()
    print("OK", flush=True)
    """
)


def _run_threaded(tmp_path, iterations: int) -> subprocess.CompletedProcess:
    script = tmp_path / "threaded.py"
    script.write_text(THREADED)
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("SHARDC_FORK_SERVER", None)  # auto: the threads make it use the server
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(iterations)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=str(tmp_path),
    )


@pytest.mark.timeout(200)
def test_threaded_program_runs_shard_map_executor_and_joblib(tmp_path):
    """Busy threads (logging lock, malloc) while pools start and workers are
    replaced: shard_map, the Executor and the joblib backend finish, twice."""
    for run in range(2):
        d = tmp_path / f"run{run}"
        d.mkdir()
        out = _run_threaded(d, iterations=2)
        assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.fixture
def served():
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    pool = shardc.Pool(2, fork_mode="server")
    yield pool
    pool.stop()
    _assert_no_leftovers(before)


def _assert_no_leftovers(before: set[int]) -> None:
    end = time.monotonic() + 5
    while True:
        left = {c.pid for c in psutil.Process().children(recursive=True)} - before
        if not left or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert not left, f"processes left after pool stop: {left}"


def _slow_or_die(shard, att):
    att[shard.id] += 1
    if shard.id == 5 and att[shard.id] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return shard.id


@pytest.mark.timeout(60)
def test_served_workers_come_from_the_server(served):
    srv = served._server
    assert srv is not None and srv.alive()
    for w in served.workers:
        assert w.server is srv
        assert psutil.Process(w.pid).ppid() == srv.pid
    r = served.shard_map(8, lambda s: s.id + 1, progress=False)
    assert r.results == list(range(1, 9))
    assert "fork server" in str(shardc.copy_report(r))
    assert shardc.copy_report(r).data["worker_start"] == ["server"]


@pytest.mark.timeout(60)
def test_kill_9_mid_shard_is_retried(served):
    att = shardc.buffer("int64", 12, init=0)
    r = served.shard_map(12, _slow_or_die, out={"att": att}, progress=False)
    assert r.succeeded and r.results == list(range(12))
    assert att.array[5] == 2
    deaths = [e for e in r.diagnostics.events if e["event"] == "death"]
    assert deaths and "SIGKILL" in str(deaths[0]), deaths  # the exit status the server reported
    assert all(w.server is served._server for w in served.workers)


def _sleepy(shard):
    time.sleep(0.3)
    return shard.id


@pytest.mark.timeout(60)
def test_kill_from_outside_is_detected_fast(served):
    """A worker SIGKILLed by someone else mid-shard: the call goes on, the shard is retried."""
    victim = served.workers[0].pid
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", served.shard_map(6, _sleepy, progress=False)))
    t.start()
    time.sleep(0.15)
    os.kill(victim, signal.SIGKILL)
    t.join(30)
    r = box["r"]
    assert r.succeeded and r.results == list(range(6))
    assert victim not in [w.pid for w in served.workers]


@pytest.mark.timeout(60)
def test_server_death_is_detected_and_a_new_server_started(served):
    old = served._server
    assert served.shard_map(4, lambda s: s.id, progress=False).results == [0, 1, 2, 3]
    pids = [w.pid for w in served.workers]
    os.kill(old.pid, signal.SIGKILL)
    # Its workers die with it (parent-death signal; portable mode: their parent watch, 0.2 s).
    psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)
    r = served.shard_map(6, lambda s: s.id * 2, progress=False)  # replaced, from a new server
    assert r.results == [0, 2, 4, 6, 8, 10]
    assert served._server is not old and served._server.alive()
    assert [e for e in served.events if e["event"] == "forkserver_restart"]


@pytest.mark.timeout(60)
def test_server_killed_mid_call(served):
    old = served._server
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", served.shard_map(6, _sleepy, progress=False)))
    t.start()
    time.sleep(0.15)
    os.kill(old.pid, signal.SIGKILL)
    t.join(40)
    assert box["r"].succeeded and box["r"].results == list(range(6))


@pytest.mark.timeout(60)
def test_executor_on_a_served_pool_retries_a_crash(served, tmp_path):
    flag = str(tmp_path / "crashed")

    def crash_once(x):
        if x == 2 and not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(3)
        return -x

    with shardc.Executor(pool=served, max_retries=2) as ex:
        assert [ex.submit(crash_once, i).result(timeout=30) for i in range(5)] == [0, -1, -2, -3, -4]
    assert os.path.exists(flag)


@pytest.mark.timeout(60)
def test_auto_pool_in_a_threaded_caller_copies_instead_of_inheriting(monkeypatch):
    """fork_mode='auto' with a thread alive: served workers, and a big input takes the copy path."""
    monkeypatch.delenv("SHARDC_FORK_SERVER", raising=False)
    monkeypatch.setenv("SHARDC_INHERIT_MIN_BYTES", str(1 << 16))
    X = np.arange(1 << 15, dtype=np.float64)  # 256 KiB: above the lowered threshold
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    try:
        with shardc.Pool(2) as pool:
            assert pool.fork_mode == "auto" and all(w.server is not None for w in pool.workers)
            r = pool.shard_map(4, lambda s, X: float(X[s.id]), borrow={"X": X}, progress=False)
            assert r.results == [0.0, 1.0, 2.0, 3.0]
            rep = shardc.copy_report(r).data
            assert rep["borrow"]["X"]["how"] != "inherited" and rep["worker_start"] == ["server"]
    finally:
        stop.set()
        t.join()
    _assert_no_leftovers(before)
    with shardc.Pool(1) as pool:  # no other thread now: forked directly, as before
        assert pool.workers[0].server is None and pool._server is not None and pool._server.zygote


def test_fork_mode_is_checked(monkeypatch):
    with pytest.raises(InvalidArgumentError, match="fork_mode"):
        shardc.Pool(1, fork_mode="spawn")
    monkeypatch.setenv("SHARDC_FORK_SERVER", "1")
    from shardc.forkserver import resolve_mode

    assert resolve_mode("auto") == "server" and resolve_mode("fork") == "fork"
    monkeypatch.setenv("SHARDC_FORK_SERVER", "0")
    assert resolve_mode("auto") == "fork"


def _has_module(shard):
    import sys

    return "colorsys" in sys.modules


@pytest.mark.timeout(60)
def test_served_workers_start_with_the_callers_modules():
    """The server imports what the caller has imported before it forks: a served worker does
    not import it in its first task (time, and memory growth that would read as drift)."""
    import colorsys  # noqa: F401 - a stdlib module shardc itself never imports

    with shardc.Pool(1, fork_mode="server") as pool:
        assert pool.shard_map(1, _has_module, progress=False).results == [True]


def _authkey(shard):
    import multiprocessing

    return bytes(multiprocessing.current_process().authkey)


@pytest.mark.timeout(60)
def test_served_workers_have_the_callers_multiprocessing_authkey(served):
    """As a forked worker does: a multiprocessing.Manager proxy passed to a task must connect."""
    import multiprocessing

    assert (
        served.shard_map(2, _authkey, progress=False).results == [bytes(multiprocessing.current_process().authkey)] * 2
    )
