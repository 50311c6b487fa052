"""Diagnostics are measured during the run and true: memory peaks, copies,
cow events, deaths; reports round-trip through JSON; the timeline renders;
the progress bar shows on a terminal and stays off otherwise."""

from __future__ import annotations

import ast
import copyreg
import gc
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import types
import weakref
from pathlib import Path

import numpy as np
import pytest

import shardc
from shardc.diagnostics import Diagnostics, Progress, chunk_advice, dispatch_overhead
from shardc.diagnostics.advice import MIN_GAIN
from shardc.diagnostics.reports import RETRIED_LINES

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


@pytest.fixture(scope="module")
def pool():
    with shardc.Pool(2) as p:
        yield p


def hold_200mb(shard):
    """Allocate 200 MiB (touched), hold it for 0.4 s, free it before returning."""
    if shard.id == 1:
        block = np.ones(200 * MiB // 8)
        time.sleep(0.4)
        del block
    return shard.id


def test_peak_memory_sees_an_allocation_freed_inside_the_shard(pool):
    """A shard that holds 200 MiB for a moment shows in that worker's peak anonymous memory."""
    r = pool.shard_map(shardc.shards(4, block_size=1), hold_200mb, progress=False)
    peaks = {k: v["peak_anon"] for k, v in r.diagnostics.worker_memory().items()}
    assert max(peaks.values()) > 190 * MiB, peaks
    assert min(peaks.values()) < 100 * MiB, peaks  # the other worker never held it
    rep = shardc.mem_report(r).to_dict()
    assert rep["peak_worker_anon"] > 190 * MiB


def keep_50mb(shard, _store=[]):  # noqa: B006 - deliberate leak kept by the worker
    if shard.id == 3:
        _store.append(np.ones(50 * MiB // 8))
    time.sleep(0.002)
    return shard.id


def test_per_shard_memory_delta_names_the_growing_shard(pool):
    """The task report names the shard whose run grew memory the most, with the size."""
    r = pool.shard_map(shardc.shards(12, block_size=1), keep_50mb, progress=False, recycle=False)
    t = shardc.task_report(r).to_dict()
    assert t["shard_mem_delta_max_shard"] == 3
    assert 45 * MiB < t["shard_mem_delta_max"] < 80 * MiB
    assert "shard 3" in str(shardc.task_report(r))


def write_rows(shard, X):
    X[shard.id, :] = -1.0  # one 4 KiB page per shard (512 float64)
    return float(X[shard.id, 0])


@pytest.mark.parametrize("mode", ["allow", "audit"])
def test_cow_writes_show_bytes_in_reports(pool, mode):
    """Writes into a borrowed input under allow/audit show pages and bytes per input, shared data unchanged."""
    X = np.zeros((8, 512))
    Xs = shardc.share(X)
    r = pool.shard_map(shardc.shards(8, block_size=1), write_rows, borrow={"X": Xs}, cow=mode, progress=False)
    assert r.results == [-1.0] * 8  # each shard saw its own private write
    cow = shardc.cow_report(r).to_dict()
    assert cow["policy"] == mode
    assert sorted(cow["inputs"]["X"]["shards"]) == list(range(8))
    assert cow["inputs"]["X"]["pages"] == 8 and cow["inputs"]["X"]["bytes"] == 8 * 4096
    assert shardc.copy_report(r).to_dict()["materialized_bytes"] == 8 * 4096
    assert not Xs.array.any()  # the shared copy is untouched


def test_borrow_bytes_and_how_are_reported(pool):
    """The copy report says what borrowing cost: copied once, then cached, and by reference when shared."""
    X = np.arange(1 << 20, dtype=np.float64)
    f = lambda s, X: float(X[s.id])  # noqa: E731
    r1 = pool.shard_map(4, f, borrow={"X": X}, progress=False)
    r2 = pool.shard_map(4, f, borrow={"X": X}, progress=False)
    r3 = pool.shard_map(4, f, borrow={"X": shardc.share(X)}, progress=False)
    hows = [shardc.copy_report(r).to_dict()["borrow"]["X"]["how"] for r in (r1, r2, r3)]
    copied = [shardc.copy_report(r).to_dict()["borrow_bytes_copied"] for r in (r1, r2, r3)]
    assert hows == ["copied", "cached", "reference"]
    assert copied == [X.nbytes, 0, 0]


def test_result_bytes_and_dispatch_bytes_are_counted(pool):
    """Result bytes gathered grow with what fun returns; the per-dispatch message stays small."""
    small = pool.shard_map(200, lambda s: 1, progress=False, autotune=False)
    big = pool.shard_map(200, lambda s: b"x" * 10_000, progress=False, autotune=False)
    ds, db = small.diagnostics, big.diagnostics
    assert db.bytes_results > 200 * 10_000 > ds.bytes_results
    assert ds.bytes_dispatch / ds.messages_dispatch < 64  # a run message is tens of bytes


def test_forced_crash_shows_the_death(pool, tmp_path):
    """A SIGKILLed worker appears in the workers report and the events with its signal."""
    marker = tmp_path / "once"

    def die_once(shard, marker=str(marker)):
        if shard.id == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return shard.id

    r = pool.shard_map(5, die_once, progress=False)
    assert r.results == list(range(5))
    deaths = [e for e in r.diagnostics.events if e["event"] == "death"]
    assert len(deaths) == 1 and deaths[0]["signal"] == "SIGKILL(-9)" and deaths[0]["shard"] == 2
    text = str(shardc.report(r, level="workers"))
    assert "SIGKILL(-9)" in text and "shard 2" in text


def test_reports_round_trip_through_json(pool):
    """Every report's to_dict() survives json.dumps/loads unchanged."""
    r = pool.shard_map(shardc.shards(10, block_size=2), lambda s: s.id, progress=False)
    for rep in (
        shardc.report(r, level="segments"),
        shardc.mem_report(r),
        shardc.copy_report(r),
        shardc.cow_report(r),
        shardc.task_report(r),
        shardc.segment_report(),
        shardc.recommendations(r),
    ):
        d = rep.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert str(rep).strip()


def test_report_takes_the_result_first(pool):
    """report(result, level) works; report('summary') is a clear error, not a crash later."""
    r = pool.shard_map(3, lambda s: 0, progress=False)
    assert "3/3 shards ok" in str(shardc.report(r))
    with pytest.raises(TypeError, match="result first"):
        shardc.report("summary")
    with pytest.raises(ValueError, match="level"):
        shardc.report(r, level="everything")


def test_recommendations_for_tiny_rpc_shards(pool):
    """Sub-millisecond shards in rpc mode with chunk_size=1 get the chunk_size/shm_queue advice."""
    r = pool.shard_map(2000, lambda s: s.id, progress=False, autotune=False)
    recs = shardc.recommendations(r).to_dict()["recommendations"]
    assert any("chunk_size" in x and "shm_queue" in x for x in recs)


def test_segment_report_lists_live_segments():
    """segment_report() lists this process's live segments with backing, size and owner."""
    b = shardc.buffer("f8", 1000)
    try:
        segs = shardc.segment_report().to_dict()["segments"]
        mine = [s for s in segs if s["key"] == b.segment.key]
        assert len(mine) == 1 and mine[0]["size"] == 8000 and mine[0]["owner"] is True
    finally:
        b.close()
    assert b.segment.key not in [s["key"] for s in shardc.segment_report().to_dict()["segments"]]


def test_timeline_plot_renders_png(pool, tmp_path):
    """result.plot(path=...) writes a non-empty PNG without a display (Agg)."""
    pytest.importorskip("matplotlib")
    r = pool.shard_map(shardc.shards(20, block_size=1), lambda s: time.sleep(0.01), progress=False)
    path = tmp_path / "timeline.png"
    fig = r.plot(path=path)
    assert path.stat().st_size > 5000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2
    svg = tmp_path / "t.svg"
    shardc.report(r).plot(path=svg)
    assert svg.read_text().lstrip().startswith("<?xml")


_PROGRESS = r"""
import time, shardc
r = shardc.shard_map(shardc.shards(40, block_size=1), lambda s: time.sleep({sleep}), workers=2, progress={flag})
print("done", len(r.results))
"""


def _run(flag: str, tty: bool) -> str:
    """Run a shard_map in a fresh interpreter (~1.6 s on a terminal, where the bar must
    redraw; a short one otherwise, where only its last state is read); return its stderr."""
    code = _PROGRESS.format(flag=flag, sleep=0.08 if tty else 0.002)
    if not tty:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stderr
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    # A real terminal has a size; a fresh pty is 0x0, where tqdm draws nothing.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, close_fds=True
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    p.wait(timeout=60)
    os.close(master)
    assert p.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal():
    """On a terminal the default shows a bar with shards done/total and the failure count."""
    err = _run("None", tty=True)
    assert "40/40" in err and "failed=0" in err


def test_progress_bar_off_when_not_a_tty_and_when_silenced():
    """Not a terminal: no bar by default; progress=True forces it; progress=False silences it."""
    assert "40/40" not in _run("None", tty=False)
    assert "40/40" in _run("True", tty=False)
    assert "40/40" not in _run("False", tty=False)


def test_out_bytes_written_are_measured(pool):
    """The copy report counts the out-buffer pages the run wrote for the first time."""
    out = shardc.buffer("f8", 1 << 20)  # 8 MiB, nothing allocated yet
    try:

        def write_half(s, out):
            lo = s.id * (1 << 17)
            out[lo : lo + (1 << 16)] = 1.0  # 512 KiB of each 1 MiB slice

        r = pool.shard_map(8, write_half, out={"out": out}, progress=False)
        written = shardc.copy_report(r).to_dict()["out_written"]["out"]
        assert 4 * MiB <= written <= 4 * MiB + 8 * 4096
        again = pool.shard_map(8, write_half, out={"out": out}, progress=False)
        assert shardc.copy_report(again).to_dict()["out_written"]["out"] == 0  # rewrites allocate nothing
    finally:
        out.close()


# --------------------------------------------------------------------------------------------
# a result is plain data: it pickles, pins nothing, reads the same in another process
# --------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def fail_some(shard, marker):
    """Shard 2 fails on its first attempt only; shard 4 fails on every attempt."""
    if shard.id == 4:
        raise ValueError("shard 4 always fails")
    if shard.id == 2 and not os.path.exists(marker):
        open(marker, "w").close()
        raise KeyError("first attempt of shard 2")
    return shard.id * 10


def _plain_leaves(obj, path="d"):
    """Yield (path, object) for every leaf of ``obj`` that is not plain data."""
    if obj is None or isinstance(obj, (bool, int, float, str, np.generic)):
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            yield path, obj
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _plain_leaves(k, f"{path}[{k!r}] key")
            yield from _plain_leaves(v, f"{path}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _plain_leaves(v, f"{path}[{i}]")
        return
    yield path, obj


@pytest.mark.parametrize("mode", ["rpc_chunked", "shm_queue"])
def test_task_report_names_retried_and_failed_shards(pool, tmp_path, mode):
    """The task report lists each retried/failed shard with its attempts, outcome and workers, in text and to_dict."""
    r = pool.shard_map(
        6,
        fail_some,
        borrow={"marker": str(tmp_path / "m")},
        max_retries=2,
        progress=False,
        on_failure="collect",
        dispatch_mode=mode,
    )
    rep = shardc.task_report(r)
    rows = {row["shard"]: row for row in rep.to_dict()["retried_shards"]}
    assert sorted(rows) == [2, 4]
    assert rows[2]["attempts"] == 2 and rows[2]["outcome"] == "ok" and "KeyError" in rows[2]["last_error"]
    assert rows[4]["attempts"] == 3 and rows[4]["outcome"] == "failed" and "ValueError" in rows[4]["last_error"]
    assert len(rows[2]["workers"]) == 2 and len(rows[4]["workers"]) == 3
    assert all(w in (0, 1) for w in rows[4]["workers"] + rows[2]["workers"])
    text = str(rep)
    assert "shard 2: 2 attempt(s), ok, worker(s)" in text
    assert "shard 4: 3 attempt(s), failed, worker(s)" in text
    assert rep.to_dict()["retries"] == 3 == r.diagnostics.retries


def test_retried_shard_list_is_bounded_in_text_but_complete_in_to_dict():
    """Over RETRIED_LINES retried shards: the text lists the first ones and says how many more; to_dict has all."""
    d = Diagnostics(mode="rpc_chunked", num_shards=100, cow="deny", enabled=False)
    n = RETRIED_LINES + 5
    for sid in range(n):
        d.attempt_failed(sid, sid % 2, 1, {"type": "builtins.OSError", "message": "flaky"}, final=False)
    res = type("R", (), {"diagnostics": d})()
    rep = shardc.task_report(res)
    assert len(rep.to_dict()["retried_shards"]) == n
    text = str(rep)
    assert f"shard {RETRIED_LINES - 1}: 2 attempt(s), ok" in text
    assert f"shard {RETRIED_LINES}:" not in text
    assert "and 5 more" in text


def test_result_pickles_and_round_trips(pool, tmp_path):
    """pickle.dumps(result) works; values, failures with their exceptions, pool_stats and reports survive."""
    r = pool.shard_map(
        6, fail_some, borrow={"marker": str(tmp_path / "m")}, max_retries=1, progress=False, on_failure="collect"
    )
    back = pickle.loads(pickle.dumps(r))
    assert back.results[:4] == [0, 10, 20, 30] and back.results[5] == 50 and not back.results[4]
    assert list(back.failures) == [4]
    f = back.failures[4]
    assert f.attempts == 2 and f.error_type == "builtins.ValueError" and "always fails" in f.message
    assert isinstance(f.exception, ValueError) and "always fails" in str(f.exception)
    assert "always fails" in str(f.exception.__cause__)  # the remote traceback comes back as __cause__
    assert back.results[4].failure is f
    assert json.loads(json.dumps(back.pool_stats)) == back.pool_stats  # plain data
    assert back.pool_stats == r.pool_stats
    for fn in (shardc.task_report, shardc.mem_report, shardc.copy_report, shardc.cow_report, shardc.recommendations):
        assert fn(back).to_dict() == fn(r).to_dict()
    assert str(shardc.report(back, level="workers")) == str(shardc.report(r, level="workers"))


def test_failure_whose_exception_does_not_pickle_keeps_its_text():
    """A failure whose exception object cannot be pickled travels with type, message and traceback only."""
    exc = RuntimeError("holds a lock")
    exc.lock = threading.Lock()
    f = shardc.ShardFailure(3, 2, "builtins.RuntimeError", "holds a lock", "Traceback: ...", exc, ["a", "b"])
    back = pickle.loads(pickle.dumps(f))
    assert back.exception is None
    assert (back.shard_id, back.attempts, back.error_type, back.message, back.traceback, back.history) == (
        3,
        2,
        "builtins.RuntimeError",
        "holds a lock",
        "Traceback: ...",
        ["a", "b"],
    )
    assert f.exception is exc  # pickling did not change the original


class _NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")  # pickles, but unpickling calls __init__ with one argument


class _Vanishing(Exception):
    pass


def test_failure_whose_exception_does_not_unpickle_still_loads(monkeypatch):
    """An exception that pickles but cannot be rebuilt where it is loaded (its class is gone there, or
    its __init__ wants other arguments) is dropped on load; the failure record still loads."""
    f = shardc.ShardFailure(1, 1, "x._Vanishing", "gone", "tb", _Vanishing("gone"))
    blob = pickle.dumps(f)
    monkeypatch.delattr(sys.modules[__name__], "_Vanishing")
    back = pickle.loads(blob)
    assert back.exception is None and back.message == "gone" and back.traceback == "tb"
    # __init__ with other arguments: only while no global reducer rebuilds such exceptions
    # (tblib's, installed by dask.multiprocessing when a test ran it, does: then it loads).
    f = shardc.ShardFailure(1, 1, "x._NeedsTwoArgs", "1/2", "tb", _NeedsTwoArgs(1, 2))
    back = pickle.loads(pickle.dumps(f))
    assert back.message == "1/2"
    if _NeedsTwoArgs not in copyreg.dispatch_table:
        assert back.exception is None


def test_result_keeps_no_pool_alive():
    """A pool that is stopped and deleted is garbage-collected while a result of it lives."""
    p = shardc.Pool(1)
    try:
        r = p.shard_map(3, lambda s: s.id, progress=False)
    finally:
        p.stop()
    ref = weakref.ref(p)
    del p
    gc.collect()
    assert ref() is None, [type(o).__name__ for o in gc.get_referrers(ref())]
    assert r.results == [0, 1, 2]


def _reader(X):
    """A fun that captures ``X`` in its closure."""
    return lambda s: float(X[s.id])


def test_result_keeps_no_captured_array_alive(pool):
    """An array captured by fun is freed once the caller drops it, though the result lives on."""
    X = np.arange(1000.0)
    ref = weakref.ref(X)
    r = pool.shard_map(4, _reader(X), progress=False)
    assert r.results == [0.0, 1.0, 2.0, 3.0]
    del X
    gc.collect()
    assert ref() is None
    assert r.results == [0.0, 1.0, 2.0, 3.0]


def test_diagnostics_record_is_plain_data(pool, tmp_path):
    """Every attribute of a finished run's Diagnostics is plain data (no pool, worker, segment or function)."""
    out = shardc.buffer("f8", 8)
    try:
        r = pool.shard_map(8, lambda s, out: out.__setitem__(s.id, 1.0), out={"out": out}, progress=False)
    finally:
        out.close()
    bad = list(_plain_leaves(vars(r.diagnostics)))
    assert bad == []
    assert r.diagnostics.out_written["out"] > 0  # measured at finish, on segments passed in, not kept


_READ_ELSEWHERE = r"""
import pickle, sys, shardc
r = pickle.load(sys.stdin.buffer)
t = shardc.task_report(r).to_dict()
print(t["shards_completed"], t["shards_failed"], [x["shard"] for x in t["retried_shards"]])
print(type(r.failures[4].exception).__name__)
print(shardc.report(r, level="workers"))
"""


def test_result_read_in_another_process(pool, tmp_path):
    """A pickled result sent to a fresh interpreter gives the same reports there."""
    r = pool.shard_map(
        6, fail_some, borrow={"marker": str(tmp_path / "m")}, max_retries=1, progress=False, on_failure="collect"
    )
    p = subprocess.run(
        [sys.executable, "-c", _READ_ELSEWHERE],
        input=pickle.dumps(r),
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr.decode()
    lines = p.stdout.decode().splitlines()
    assert lines[0] == "5 1 [2, 4]"
    assert lines[1] == "ValueError"
    assert "\n".join(lines[2:]) == str(shardc.report(r, level="workers"))


# --------------------------------------------------------------------------------------------
# advice comes from the measured dispatch overhead
# --------------------------------------------------------------------------------------------


def _synthetic(num, shard_ns, gap_ns, chunk=1, workers=2):
    """A Diagnostics of an rpc run: ``num`` shards of ``shard_ns`` each, in chunks of ``chunk``,
    ``gap_ns`` between chunks on each of ``workers`` workers (1 us between shards of one chunk)."""
    d = Diagnostics(mode="rpc_chunked", num_shards=num, cow="deny", chunk_size=chunk)
    t = [0] * workers
    for c, start in enumerate(range(0, num, chunk)):
        w = c % workers
        for sid in range(start, min(num, start + chunk)):
            d.shard_done(sid, w, t[w], t[w] + shard_ns, True, 0)
            t[w] += shard_ns + 1000
        t[w] += gap_ns - 1000
    d.dispatched(40 * (num // chunk), -(-num // chunk))
    d.completed = num
    d.wall_seconds = max(t) * 1e-9
    return d


def test_overhead_is_measured_from_gaps_between_shards():
    """The measured per-chunk cost and its share of worker time match a run with known gaps."""
    o = dispatch_overhead(_synthetic(1000, 1_000_000, 200_000))
    assert o["chunk_cost_seconds"] == pytest.approx(200e-6, rel=0.01)
    assert o["shard_seconds"] == pytest.approx(1e-3)
    assert o["overhead_share"] == pytest.approx(0.2 / 1.2, rel=0.02)
    o = dispatch_overhead(_synthetic(1000, 1_000_000, 200_000, chunk=10))
    assert o["chunk_cost_seconds"] == pytest.approx(199e-6, rel=0.01)  # the 1 us step inside a chunk is not counted
    assert o["shards_per_chunk"] == 10


def test_chunk_advice_states_the_expected_gain():
    """Costly dispatch gets a larger chunk_size with its expected gain; cheap dispatch gets no advice."""
    adv = chunk_advice(_synthetic(1000, 1_000_000, 200_000))
    assert adv["advised"] == 20  # 200 us per chunk is 1% of 20 shards of 1 ms
    assert adv["gain"] == pytest.approx((0.2 / 1.2) * (1 - 1 / 20), rel=0.02)
    # 12 ms shards with 100 us per chunk: under 1% to win, no advice.
    assert chunk_advice(_synthetic(200, 12_000_000, 100_000)) is None
    assert chunk_advice(_synthetic(200, 12_000_000, 12_000_000 * MIN_GAIN * 0.9)) is None


def test_block_advice_in_shm_queue_mode_comes_from_gaps_between_blocks():
    """shm_queue: the per-block claim cost is the gap between a worker's blocks; the advice names block_size."""
    d = Diagnostics(mode="shm_queue", num_shards=4000, cow="deny")
    t = [0, 0]
    for b in range(400):  # blocks of 10 shards of 20 us, 300 us apart on each worker
        w = b % 2
        d.block_done(w, 10 * b, 10, t[w], t[w] + 200_000)
        t[w] += 500_000
    d.completed, d.wall_seconds = 4000, max(t) * 1e-9
    o = dispatch_overhead(d)
    assert o["chunk_cost_seconds"] == pytest.approx(300e-6) and o["shard_seconds"] == pytest.approx(20e-6)
    assert o["overhead_share"] == pytest.approx(0.6)
    rec = shardc.recommendations(types.SimpleNamespace(diagnostics=d)).to_dict()
    assert rec["chunk_advice"]["advised"] == 500  # capped: 4000 shards / (4 x 2 workers)
    assert any("dispatch_opts={'block_size': 500}" in x and "expected gain" in x for x in rec["recommendations"])


def test_recommendation_text_says_the_gain(pool):
    """Tiny rpc shards: the advice names a chunk_size above 1 and the expected gain in percent and seconds."""
    r = pool.shard_map(2000, lambda s: s.id, progress=False, autotune=False)
    rec = shardc.recommendations(r).to_dict()
    adv = rec["chunk_advice"]
    assert adv["advised"] > 1 and adv["gain"] >= MIN_GAIN
    text = next(x for x in rec["recommendations"] if "chunk_size=" in x)
    assert f"chunk_size={adv['advised']}" in text and "expected gain about" in text and " s of " in text


def test_no_chunk_advice_for_long_shards(pool):
    """Shards of 100 ms dispatched one at a time cost well under the gain threshold: no chunk_size advice."""
    r = pool.shard_map(12, lambda s: time.sleep(0.1), progress=False, autotune=False)
    o = shardc.task_report(r).to_dict()["dispatch_overhead"]
    assert o["overhead_share"] < MIN_GAIN, o
    assert not [x for x in shardc.recommendations(r).to_dict()["recommendations"] if "chunk_size" in x]


# --------------------------------------------------------------------------------------------
# the timeline draws samples as samples; the progress bar is its own object
# --------------------------------------------------------------------------------------------


def test_timeline_draws_sampled_memory_as_steps_and_markers(tmp_path):
    """Memory is drawn as steps (anon) or bare markers (PSS, precise samples only), legend saying the sampling."""
    pytest.importorskip("matplotlib")
    d = _synthetic(40, 5_000_000, 100_000)
    w = types.SimpleNamespace(slot=0, pid=123, baseline=0)
    d.worker_started(w)
    for i in range(12):  # cheap samples (statm: pss is an estimate) with a precise one every 4th
        precise = int(i % 4 == 3)
        d.mem_sample(
            w,
            {"rss": 300 * MiB, "pss": (150 if precise else 10) * MiB, "uss": 10 * MiB, "precise": precise},
            anon=10 * MiB,
        )
        time.sleep(0.002)
    fig = shardc.diagnostics.plot_timeline(types.SimpleNamespace(diagnostics=d), path=tmp_path / "t.png")
    axm = fig.axes[1]
    pss = [ln for ln in axm.lines if "PSS" in ln.get_label()]
    anon = [ln for ln in axm.lines if "anon" in ln.get_label()]
    assert len(pss) == 1 and pss[0].get_linestyle() == "None" and pss[0].get_marker() not in (None, "None", "")
    assert len(pss[0].get_xdata()) == 3 and max(pss[0].get_ydata()) == 150  # the estimates are not drawn as PSS
    assert len(anon) == 1 and anon[0].get_drawstyle() == "steps-post" and len(anon[0].get_xdata()) == 12
    labels = [t.get_text() for t in axm.get_legend().get_texts()]
    assert "3 samples, every ~" in labels[1] and "12 samples, every ~" in labels[0], labels


def test_progress_object_is_fed_counts():
    """Progress(total, desc, flag): off draws nothing; on counts done shards and closes once."""
    off = Progress(10, "x", False)
    assert not off.active
    off.update(5, 1, 2)
    off.close()
    pytest.importorskip("tqdm")
    on = Progress(10, "x", True)
    assert on.active
    on.update(4, 1, 2)
    assert on._bar.n == 4
    on.update(3, 1, 2)  # counts never go back
    assert on._bar.n == 4
    on.close()
    on.close()
    assert not on.active


def test_diagnostics_package_imports_stay_low():
    """shardc.diagnostics imports no pool/map/result, and inside functions only matplotlib or tqdm."""
    banned = {"pool", "map", "result", "dispatch_queue", "worker"}
    for path in sorted((REPO / "shardc" / "diagnostics").glob("*.py")):
        tree = ast.parse(path.read_text())
        top = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
                if node.level:  # relative: "..pool" or "from .. import pool"
                    assert not banned & {n.split(".")[0] for n in names}, (path.name, names)
                roots = {(node.module or "").split(".")[0]}
            elif isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            else:
                continue
            if node not in top:
                assert roots <= {"matplotlib", "tqdm"}, (path.name, node.lineno, roots)
