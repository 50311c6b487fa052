"""Big borrowed arrays inherited over fork (``shardc.inherit``) through the public API.

The threshold is lowered per test (``SHARDC_INHERIT_MIN_BYTES``) so small
arrays take the path; the write-policy cases shared with segment inputs are in
test_cow.py (parametrized by ``source``).  Here: the path is taken (and only
when it should be), workers are re-forked and see a snapshot per call, a crash
retry still sees the data, writes on the partial edge pages are caught,
writes beyond what can be saved retire the worker without losing or
repeating a shard, the memory policy does not count the inherited pages as
the worker's own, and idle workers give the pages back.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from _engine_helpers import fd_targets, no_stray_children, pool2  # noqa: F401 (fixtures)

import shardc
from shardc import _lowlevel as ll

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="inheritance needs Linux /proc"),
]

MODES = ["rpc_chunked", "shm_queue"]
PS = ll.PAGE_SIZE


@pytest.fixture
def low_threshold(monkeypatch):
    monkeypatch.setenv("SHARDC_INHERIT_MIN_BYTES", str(1024 * 1024))


def make(rows=512, cols=512, seed=0):
    return np.random.default_rng(seed).random((rows, cols))  # 2 MiB


def col_sums(shard, X, out):
    out[shard.idx] = X[:, shard.idx].sum(axis=0)


def run_sums(X, mode="rpc_chunked", **kw):
    out = shardc.buffer("f8", X.shape[1])
    try:
        r = shardc.shard_map(
            shardc.shards(X.shape[1], block_size=32),
            col_sums,
            borrow={"X": X},
            out={"out": out},
            dispatch_mode=mode,
            progress=False,
            **kw,
        )
        return r, out.array.copy()
    finally:
        out.close()


@pytest.mark.parametrize("mode", MODES)
def test_big_array_is_inherited_not_copied(pool2, low_threshold, mode):
    """A big plain array reaches workers by fork: nothing copied, workers re-forked, exact results."""
    X = make()
    old = {w.pid for w in pool2.workers}
    r, got = run_sums(X, mode)
    np.testing.assert_allclose(got, X.sum(axis=0), rtol=1e-12)
    b = r.diagnostics.borrow["X"]
    assert b["how"] == "inherited" and b["bytes_copied"] == 0 and b["bytes"] == X.nbytes
    cp = shardc.copy_report(r).to_dict()
    assert cp["borrow_bytes_copied"] == 0 and cp["reforked_workers"] == 2
    assert not old & {w.pid for w in pool2.workers}
    assert {e["event"] for e in pool2.events[-2:]} == {"refork"}


def test_each_call_sees_the_array_as_it_is_then(pool2, low_threshold):
    """A change between calls is seen by the next call (a new snapshot per call)."""
    X = make()
    _, first = run_sums(X)
    X[:, 7] += 1.0
    _, second = run_sums(X)
    np.testing.assert_allclose(second - first, np.eye(1, X.shape[1], 7)[0] * X.shape[0], atol=1e-9)


def test_small_arrays_memmaps_and_opt_out_are_copied(pool2, low_threshold, monkeypatch, tmp_path):
    """Below the threshold and SHARDC_INHERIT=0: the segment copy, as before; an np.memmap is
    never inherited: workers map its file (issue 13)."""
    small = np.ones((64, 64))
    assert run_sums(small)[0].diagnostics.borrow["X"]["how"] in ("copied", "cached")
    mm = np.lib.format.open_memmap(str(tmp_path / "m.npy"), mode="w+", dtype="f8", shape=(512, 512))
    mm[:] = 1.0
    assert run_sums(mm)[0].diagnostics.borrow["X"]["how"] == "file"
    monkeypatch.setenv("SHARDC_INHERIT", "0")
    X = make()
    r, got = run_sums(X)
    assert r.diagnostics.borrow["X"]["how"] in ("copied", "cached")
    np.testing.assert_allclose(got, X.sum(axis=0), rtol=1e-12)


def test_an_array_in_a_segment_is_still_by_reference(pool2, low_threshold):
    """share()d and buffer arrays keep going by reference: no re-fork."""
    X = make()
    with shardc.share(X) as Xs:
        pids = {w.pid for w in pool2.workers}
        r, got = run_sums(Xs.array)
        assert r.diagnostics.borrow["X"]["how"] == "reference"
        assert {w.pid for w in pool2.workers} == pids
    np.testing.assert_allclose(got, X.sum(axis=0), rtol=1e-12)


def crash_once(shard, X, out, flag):
    if shard.id == 3 and not os.path.exists(flag):
        open(flag, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    out[shard.idx] = X[:, shard.idx].sum(axis=0)


@pytest.mark.parametrize("mode", MODES)
def test_a_crash_is_retried_on_a_worker_that_inherits_too(pool2, low_threshold, tmp_path, mode):
    """SIGKILL mid-call: the replacement is forked while the array is held, and the retry succeeds."""
    X = make()
    out = shardc.buffer("f8", X.shape[1])
    try:
        r = shardc.shard_map(
            shardc.shards(X.shape[1], block_size=32),
            crash_once,
            borrow={"X": X, "flag": str(tmp_path / f"flag-{mode}")},
            out={"out": out},
            dispatch_mode=mode,
            progress=False,
        )
        np.testing.assert_allclose(out.array, X.sum(axis=0), rtol=1e-12)
    finally:
        out.close()
    assert r.succeeded and r.diagnostics.retries == 1


def write_edges(shard, X, out):
    if shard.id == 0:
        X[0, 0] = -5.0
    elif shard.id == 1:
        X[-1, -1] = -5.0
    out[shard.id] = X[0, 0] + X[-1, -1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cow", ["deny", "audit"])
def test_writes_on_the_partial_edge_pages_are_caught_and_undone(pool2, low_threshold, cow, mode):
    """X's first and last elements share pages with other memory (not guarded by mprotect):
    a write there is still reported, named, and undone before the next shard."""
    X = make()
    assert X.ctypes.data % PS != 0  # malloc'd: its first element is not page aligned
    want = X[0, 0] + X[-1, -1]
    out = shardc.buffer("f8", 8, init=0.0)
    try:
        with shardc.Pool(1) as pool:  # one worker: shards 2.. run after the writes, in the same process
            r = pool.shard_map(
                8,
                write_edges,
                borrow={"X": X},
                out={"out": out},
                cow=cow,
                dispatch_mode=mode,
                on_failure="collect",
                progress=False,
            )
        got = out.array.copy()
    finally:
        out.close()
    assert r.diagnostics.borrow["X"]["how"] == "inherited"
    np.testing.assert_allclose(got[2:], want)
    rep = shardc.cow_report(r).to_dict()
    assert rep["inputs"]["X"]["shards"] == [0, 1]
    if cow == "deny":
        assert sorted(r.failures) == [0, 1]
        assert r.failures[0].message.startswith("shard 0 wrote to borrowed input 'X' at byte 0 (element [0, 0])")
        last = X.nbytes - 8
        assert r.failures[1].message.startswith(
            f"shard 1 wrote to borrowed input 'X' at byte {last} (element [511, 511])"
        )
    else:
        assert r.succeeded
    assert X[0, 0] != -5.0 and X[-1, -1] != -5.0


def overwrite_all(shard, X, out):
    if shard.id == 0:
        X[...] = 0.0  # 512 pages: more than the guards save (256 per input)
    out[shard.id] = X.sum()


def run_overwrite_all(X, n=12, **kw):
    """12 one-shard blocks of overwrite_all on one worker (cow="allow"); (result, out)."""
    out = shardc.buffer("f8", n, init=np.nan)
    try:
        with shardc.Pool(1) as pool:
            r = pool.shard_map(
                shardc.shards(n, block_size=1),
                overwrite_all,
                borrow={"X": X},
                out={"out": out},
                cow="allow",
                progress=False,
                **kw,
            )
            return r, out.array.copy()
    finally:
        out.close()


@pytest.mark.parametrize("mode", MODES)
def test_a_write_beyond_restoring_retires_the_worker_and_loses_nothing(low_threshold, mode):
    """allow + a write of every page: the shard completes, its worker retires, every later
    shard (on a fresh worker) sees the pristine array, and no shard is lost or charged."""
    X = make()
    want = X.sum()
    r, got = run_overwrite_all(X, dispatch_mode=mode)
    pids = r.diagnostics.workers[0]["pids"]
    assert r.succeeded and r.diagnostics.retries == 0
    assert got[0] == 0.0
    np.testing.assert_allclose(got[1:], want, rtol=1e-12)
    assert len(set(pids)) >= 2
    ev = [e for e in r.diagnostics.events if e["event"] == "recycle"]
    assert ev and "inherited at fork" in ev[0]["reason"]
    assert not [e for e in r.diagnostics.events if e["event"] == "death"]


def worker_memory(shard, X, out):
    out[shard.id] = X[:, shard.id % X.shape[1]].sum()


def test_inherited_pages_do_not_count_as_worker_memory(low_threshold):
    """mem_cap below the worker's share of the inherited array: no recycling (the share is not its own)."""
    X = np.ones((4096, 8192))  # 256 MiB
    out = shardc.buffer("f8", 64)
    try:
        with shardc.Pool(2, mem_cap="60MB") as pool:  # its share of X is ~89 MB
            r = pool.shard_map(
                64, worker_memory, borrow={"X": X}, out={"out": out}, progress=False, health_check_interval=1
            )
            np.testing.assert_allclose(out.array, 4096.0)
    finally:
        out.close()
    assert r.succeeded
    assert not [e for e in r.diagnostics.events if e["event"] in ("recycle", "death")], r.diagnostics.events
    mem = shardc.mem_report(r).to_dict()
    assert mem["peak_worker_anon"] < 60 * 1000**2


def test_idle_workers_give_the_pages_back(pool2, low_threshold):
    """After the call, the array's whole pages are unmapped (PROT_NONE) in every worker."""
    X = make(1024, 1024)  # 8 MiB
    run_sums(X)
    lo = X.ctypes.data
    a, b = -(-lo // PS) * PS, (lo + X.nbytes) // PS * PS
    import time

    deadline = time.monotonic() + 5
    for w in pool2.workers:
        while True:
            spans = []
            with open(f"/proc/{w.pid}/maps") as f:
                for line in f:
                    rng, perms = line.split()[:2]
                    s, e = (int(x, 16) for x in rng.split("-"))
                    if s < b and e > a:
                        spans.append(perms)
            if spans == ["---p"] or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert spans == ["---p"], spans


def write_middle_or_edge(shard, X, out):
    if shard.id == 0:
        X[256, 3] = -1.0
    elif shard.id == 1:
        X[0, 0] = -1.0  # on the partial first page: only the guards' edge check could see it
    out[shard.id] = X[256, 3] + X[0, 0]


def test_without_guards_big_arrays_are_copied_and_a_write_crashes(low_threshold):
    """Pool(cow_guard=False): no inheritance (the guards keep inherited data pristine),
    so X is a read-only segment copy and any write is a SIGSEGV, never a silent change."""
    X = make()
    want = X[256, 3] + X[0, 0]
    out = shardc.buffer("f8", 4, init=0.0)
    try:
        with shardc.Pool(1, cow_guard=False) as pool:
            r = pool.shard_map(
                4,
                write_middle_or_edge,
                borrow={"X": X},
                out={"out": out},
                max_retries=1,
                on_failure="collect",
                progress=False,
            )
        got = out.array.copy()
    finally:
        out.close()
    assert r.diagnostics.borrow["X"]["how"] in ("copied", "cached")
    assert sorted(r.failures) == [0, 1] and all(f.attempts == 2 for f in r.failures.values())
    assert all("SIGSEGV" in f.message for f in r.failures.values())
    np.testing.assert_array_equal(got[2:], want)
    assert X[256, 3] + X[0, 0] == want


@pytest.mark.parametrize("mode", MODES)
def test_a_big_array_captured_by_fun_is_inherited_not_pickled(pool2, low_threshold, mode):
    """fun using a big array from its closure (or a __main__ global): by token, not by value."""
    X = make()

    def sums(shard, out):
        out[shard.idx] = X[:, shard.idx].sum(axis=0)

    out = shardc.buffer("f8", X.shape[1])
    try:
        r = shardc.shard_map(
            shardc.shards(X.shape[1], block_size=32), sums, out={"out": out}, dispatch_mode=mode, progress=False
        )
        np.testing.assert_allclose(out.array, X.sum(axis=0), rtol=1e-12)
    finally:
        out.close()
    b = r.diagnostics.borrow["closure variable 'X'"]
    assert b["how"] == "inherited" and b["bytes"] == X.nbytes
    assert r.diagnostics.bytes_setup < X.nbytes // 8  # fun went without X


def test_a_write_into_a_captured_array_is_denied_and_named(pool2, low_threshold):
    X = make()

    def writes(shard):
        X[100, 1] = 0.0

    r = shardc.shard_map(2, writes, on_failure="collect", progress=False)
    assert sorted(r.failures) == [0, 1]
    assert r.failures[0].message.startswith("shard 0 wrote to borrowed input \"closure variable 'X'\"")
    assert X[100, 1] != 0.0


def test_a_small_captured_array_is_still_pickled(pool2, low_threshold):
    small = np.arange(1000.0)

    def f(shard):
        return float(small[shard.id])

    r = shardc.shard_map(3, f, progress=False)
    assert r.results == [0.0, 1.0, 2.0] and r.diagnostics.borrow == {}


def test_a_tainted_worker_runs_none_of_its_other_claimed_blocks(low_threshold):
    """shm_queue with claim_batch: the blocks claimed together with the tainting shard go
    back to the master; none runs on the copy that could not be restored."""
    X = make()
    want = X.sum()
    r, got = run_overwrite_all(X, dispatch_mode="shm_queue", dispatch_opts={"claim_batch": 4, "block_size": 1})
    assert r.succeeded and r.diagnostics.retries == 0
    np.testing.assert_allclose(got[1:], want, rtol=1e-12)


def sums_of(shard, X):
    return float(X[:, shard.id].sum())


def test_a_call_from_a_short_lived_thread_leaves_the_workers_alive(low_threshold):
    """The re-fork runs in the calling thread; its workers must not die with that thread
    (Linux ties PDEATHSIG to the forking thread)."""
    import threading
    import time

    X = make()
    with shardc.Pool(2) as pool:
        box = {}
        t = threading.Thread(
            target=lambda: box.setdefault("r", pool.shard_map(4, sums_of, borrow={"X": X}, progress=False))
        )
        t.start()
        t.join(60)
        assert box["r"].succeeded
        time.sleep(0.3)
        assert all(pool.is_alive(w) for w in pool.workers)
        r = pool.shard_map(4, sums_of, borrow={"X": X}, progress=False)
        assert r.succeeded and not [e for e in r.diagnostics.events if e["event"] == "death"]


def test_views_of_foreign_buffers_and_broadcasts_are_copied(pool2, low_threshold):
    """Two np.frombuffer views of one bytearray share pages without sharing an owner, and a
    broadcast view's memory is tiny: both take the copy path (and work)."""
    raw = bytearray(4 * 1024 * 1024)
    A = np.frombuffer(raw, np.float64)
    B = np.frombuffer(raw, np.float64)[8:]
    big = np.broadcast_to(np.arange(512.0), (8192, 512))  # 32 MiB logical, 4 KiB real

    def f(shard, A, B, big):
        return float(A[shard.id] + B[shard.id] + big[shard.id, shard.id])

    r = shardc.shard_map(4, f, borrow={"A": A, "B": B, "big": big}, progress=False)
    assert r.results == [float(i) for i in range(4)]
    assert {v["how"] for v in r.diagnostics.borrow.values()} <= {"copied", "cached", "pickled"}


def test_a_reforked_worker_holds_no_other_worker_socket(pool2, low_threshold):
    """After a re-fork, each worker has exactly one socket: its own."""
    run_sums(make())
    for w in pool2.workers:
        socks = [t for t in fd_targets(w.pid) if t.startswith("socket:")]
        assert len(socks) == 1, (w.slot, socks)


def exit75(shard):
    if shard.id == 2:
        os._exit(75)
    return shard.id


@pytest.mark.parametrize("mode", MODES)
def test_exit_status_75_alone_is_a_crash_not_a_retirement(pool2, mode):
    r = shardc.shard_map(4, exit75, dispatch_mode=mode, max_retries=1, on_failure="collect", progress=False)
    assert list(r.failures) == [2] and r.failures[2].attempts == 2
    assert [e["event"] for e in r.diagnostics.events] == ["death", "death"]
