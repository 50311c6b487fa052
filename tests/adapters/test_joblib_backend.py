"""shardc's joblib backend: registration without importing joblib, big
arrays zero-copy and read-only, crash retries, generators, nesting, threads
fallback, and scikit-learn giving loky's results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import shardc
from shardc.errors import BorrowedInputWriteError, WorkerCrashedError

joblib = pytest.importorskip("joblib", minversion="1.3")
from joblib import Parallel, delayed, parallel_config  # noqa: E402

shardc.register_joblib()


def square(x):
    return x * x


def address_and_sum(X, i):
    return X.ctypes.data, float(X[i].sum()), X.flags.writeable


def write_first(X):
    X[0, 0] = -1.0
    return X[0, 0]


def die_once(x, marker):
    if x == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def die_always(x):
    os.kill(os.getpid(), signal.SIGKILL)


def inner_sum(n):
    return sum(Parallel(n_jobs=2)(delayed(square)(i) for i in range(n)))


def test_import_shardc_registers_without_importing_joblib():
    code = (
        "import sys, shardc; assert 'joblib' not in sys.modules, 'imported joblib'\n"
        "import joblib\n"
        "from joblib.parallel import BACKENDS\n"
        "assert 'shardc' in BACKENDS, sorted(BACKENDS)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_results_in_order_generators_and_auto_batches():
    with parallel_config(backend="shardc", n_jobs=2):
        assert Parallel()(delayed(square)(i) for i in range(200)) == [i * i for i in range(200)]
        gen = Parallel(return_as="generator")(delayed(square)(i) for i in range(20))
        assert list(gen) == [i * i for i in range(20)]
        unordered = Parallel(return_as="generator_unordered")(delayed(square)(i) for i in range(20))
        assert sorted(unordered) == [i * i for i in range(20)]
        assert Parallel(n_jobs=-1, batch_size="auto")(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]


def test_big_array_argument_is_shared_zero_copy_and_read_only():
    X = np.ones((1024, 256))  # 2 MiB > max_nbytes 1M
    with parallel_config(backend="shardc", n_jobs=2):
        out = Parallel()(delayed(address_and_sum)(X, i) for i in range(16))
        assert [o[1] for o in out] == [256.0] * 16
        assert len({o[0] for o in out}) <= 2  # one mapping per worker for every task
        with pytest.raises(BorrowedInputWriteError, match=r"element \[0, 0\]"):
            Parallel()(delayed(write_first)(X) for _ in range(2))
        assert X[0, 0] == 1.0
        # mmap_mode="c": copy-on-write, the write stays private to the task
        assert Parallel(mmap_mode="c")(delayed(write_first)(X) for _ in range(2)) == [-1.0, -1.0]
        # max_nbytes=None: pickled, a private copy
        assert Parallel(max_nbytes=None)(delayed(write_first)(X) for _ in range(2)) == [-1.0, -1.0]
    assert X[0, 0] == 1.0


def test_crash_is_retried_and_finally_names_the_function(tmp_path):
    marker = str(tmp_path / "m")
    with parallel_config(backend="shardc", n_jobs=2):
        assert Parallel(batch_size=1)(delayed(die_once)(i, marker) for i in range(6)) == list(range(6))
    with parallel_config(backend="shardc", n_jobs=2, max_retries=1):
        with pytest.raises(WorkerCrashedError, match="joblib batch of 1 call.* to die_always"):
            Parallel(batch_size=1)(delayed(die_always)(i) for i in range(2))
        assert Parallel()(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]


def test_nested_parallel_runs_on_threads_and_sharedmem_falls_back():
    with parallel_config(backend="shardc", n_jobs=2):
        assert Parallel()(delayed(inner_sum)(n) for n in range(5)) == [sum(i * i for i in range(n)) for n in range(5)]
        seen = []
        Parallel(require="sharedmem")(delayed(seen.append)(i) for i in range(5))
        assert sorted(seen) == list(range(5))


sklearn = pytest.importorskip("sklearn")


def test_sklearn_cross_val_score_and_grid_search_match_loky():
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.svm import SVC

    X, y = make_classification(n_samples=300, n_features=12, random_state=0)
    rf = RandomForestClassifier(n_estimators=50, random_state=0)
    grid = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.01]}
    res = {}
    for backend in ("loky", "shardc"):
        with parallel_config(backend=backend):
            cv = cross_val_score(rf, X, y, cv=5, n_jobs=2)
            gs = GridSearchCV(SVC(), grid, cv=3, n_jobs=2).fit(X, y)
        res[backend] = (cv, gs.best_params_, gs.cv_results_["mean_test_score"])
    np.testing.assert_array_equal(res["loky"][0], res["shardc"][0])
    assert res["loky"][1] == res["shardc"][1]
    np.testing.assert_array_equal(res["loky"][2], res["shardc"][2])


def read_then_write(X):
    before = float(X[0, 0])
    X[0, 0] = -1.0
    return before


def die_once_sum(X, i, marker):
    if i == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return X.ctypes.data, float(X[i].sum())


def _copied(X):
    from shardc.share import default_cache

    return any(wr() is X for wr, _ in default_cache._entries.values())


def test_big_array_of_the_first_batch_is_inherited_at_fork_not_copied(monkeypatch, tmp_path):
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True)  # its threads (a test above ran loky) rule out a fork
    monkeypatch.setenv("SHARDC_INHERIT_MIN_BYTES", str(1 << 20))
    X = np.ones((1024, 256))  # 2 MiB >= max_nbytes and the inheritance threshold
    with parallel_config(backend="shardc", n_jobs=2):
        out = Parallel()(delayed(address_and_sum)(X, i) for i in range(16))
        assert [o[1] for o in out] == [256.0] * 16
        # the workers were forked again while X existed: the very same pages, at X's own address
        assert {o[0] for o in out} == {X.ctypes.data}
        assert not _copied(X)
        with pytest.raises(BorrowedInputWriteError, match=r"element \[0, 0\]"):
            Parallel()(delayed(write_first)(X) for _ in range(2))
        assert X[0, 0] == 1.0
        # mmap_mode="c": a write stays private, and the next task sees X pristine again
        assert Parallel(mmap_mode="c", batch_size=1)(delayed(read_then_write)(X) for _ in range(6)) == [1.0] * 6
        assert X[0, 0] == 1.0 and not _copied(X)
        marker = str(tmp_path / "m")  # a crash: the replacement worker inherits X too
        out = Parallel(batch_size=1)(delayed(die_once_sum)(X, i, marker) for i in range(6))
        assert os.path.exists(marker) and out == [(X.ctypes.data, 256.0)] * 6
    # one Parallel object for several calls: each call sees the array as it is then
    with Parallel(n_jobs=2, backend="shardc") as par:
        assert par(delayed(address_and_sum)(X, i) for i in range(4))[0][1] == 256.0
        X[0] = 2.0
        assert [o[1] for o in par(delayed(address_and_sum)(X, i) for i in range(4))] == [512.0, 256.0, 256.0, 256.0]
    assert not _copied(X)
    # a caller with another thread alive: workers come from the fork server, X is copied
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="h15-busy")
    t.start()
    try:
        with parallel_config(backend="shardc", n_jobs=2):
            out = Parallel()(delayed(address_and_sum)(X, i) for i in range(4))
        assert [o[1] for o in out] == [512.0, 256.0, 256.0, 256.0] and X.ctypes.data not in {o[0] for o in out}
        assert _copied(X)
    finally:
        stop.set()
        t.join()


def nap_or_fail(i):
    import time

    if i == 0:
        time.sleep(30)
    if i == 3:
        raise ValueError(f"task {i} failed")
    return i


def test_in_order_calls_wait_for_the_batch_instead_of_polling(monkeypatch):
    """Ordered results: joblib's main thread waits in retrieve_result (woken
    by the batch's completion), not in its 10 ms sleep loop; unordered
    generators keep the completion callbacks."""
    import time

    import joblib.parallel as jp

    main = threading.get_ident()
    naps = []
    real_sleep = time.sleep

    def counting_sleep(s):
        if threading.get_ident() == main:
            naps.append(s)
        real_sleep(s)

    monkeypatch.setattr(jp.time, "sleep", counting_sleep)  # the module joblib's _retrieve calls
    with Parallel(n_jobs=2, backend="shardc") as par:
        assert par._backend.supports_retrieve_callback is False
        for n in (1, 2, 50, 2000):
            assert par(delayed(square)(i) for i in range(n)) == [i * i for i in range(n)]
    assert naps == []
    gen = Parallel(n_jobs=2, backend="shardc", return_as="generator")(delayed(square)(i) for i in range(30))
    assert list(gen) == [i * i for i in range(30)] and naps == []
    par = Parallel(n_jobs=2, backend="shardc", return_as="generator_unordered")
    assert sorted(par(delayed(square)(i) for i in range(30))) == [i * i for i in range(30)]
    assert par._backend.supports_retrieve_callback is True


@pytest.mark.timeout(60)
def test_in_order_call_aborts_at_a_later_batchs_error_without_waiting_for_earlier_ones():
    import time

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="task 3 failed"):
        Parallel(n_jobs=2, backend="shardc", batch_size=1)(delayed(nap_or_fail)(i) for i in range(6))
    assert time.monotonic() - t0 < 20  # task 0 naps 30 s: its worker was killed, not waited for
    # the same Parallel object afterwards (managed): a fresh call runs normally
    with Parallel(n_jobs=2, backend="shardc", batch_size=1) as par:
        with pytest.raises(ValueError, match="task 3 failed"):
            par(delayed(nap_or_fail)(i) for i in range(6))
        assert par(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]


@pytest.mark.timeout(60)
def test_parallel_timeout_raises_joblibs_timeout_error():
    import multiprocessing
    import time

    from shardc.errors import ShardTimeoutError

    t0 = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError, match=r"Parallel\(timeout=0.2\)") as info:
        Parallel(n_jobs=2, backend="shardc", timeout=0.2)(delayed(time.sleep)(30) for _ in range(4))
    assert isinstance(info.value, ShardTimeoutError) and time.monotonic() - t0 < 20
    assert Parallel(n_jobs=2, backend="shardc", timeout=10)(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]


def test_dispatch_callback_runs_with_the_gc_paused_unless_told_not_to():
    import gc

    from shardc.errors import InvalidArgumentError

    def tasks(seen):
        for i in range(3000):
            seen.append(gc.isenabled())
            yield delayed(square)(i)

    for pause, want in ((True, False), (False, True)):
        seen: list[bool] = []
        with parallel_config(backend="shardc", n_jobs=2, pause_gc=pause):
            assert Parallel()(tasks(seen)) == [i * i for i in range(3000)]
        # the first items are taken by the caller's thread; the rest by the completion callbacks
        assert want in seen[8:] and (pause is False or all(seen[:4]))
        assert gc.isenabled()
    gc.disable()  # the caller's own choice is kept
    try:
        with parallel_config(backend="shardc", n_jobs=2):
            assert Parallel()(delayed(square)(i) for i in range(300)) == [i * i for i in range(300)]
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(InvalidArgumentError, match="pause_gc must be True or False"):
        with parallel_config(backend="shardc", n_jobs=2, pause_gc="yes"):
            Parallel()(delayed(square)(i) for i in range(3))


def total_of(a):
    return float(a.sum())


def test_a_reused_parallel_never_sums_a_stale_copy_of_a_changed_array():
    """A reused Parallel keeps its executor across calls; an array over joblib's max_nbytes
    ('1M') changed in place between the calls reaches the second call as it is now (found by
    review: the sharer's memo served the first call's copy)."""
    a = np.zeros(1 << 18)  # 2 MiB
    with parallel_config(backend="shardc", n_jobs=2), Parallel() as par:
        assert par(delayed(total_of)(a) for _ in range(2)) == [0.0, 0.0]
        a[:] = 1.0
        assert par(delayed(total_of)(a) for _ in range(2)) == [float(a.size)] * 2
