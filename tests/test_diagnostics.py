"""Diagnostics are measured during the run and true: memory peaks, copies,
cow events, deaths; reports round-trip through JSON; the timeline renders;
the progress bar shows on a terminal and stays off otherwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import shardc

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
    for rep in (shardc.report(r, level="segments"), shardc.mem_report(r), shardc.copy_report(r),
                shardc.cow_report(r), shardc.task_report(r), shardc.segment_report(), shardc.recommendations(r)):
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
r = shardc.shard_map(shardc.shards(40, block_size=1), lambda s: time.sleep(0.08), workers=2, progress={flag})
print("done", len(r.results))
"""


def _run(flag: str, tty: bool) -> str:
    """Run a ~1.6 s shard_map in a fresh interpreter; return what it wrote to stderr."""
    code = _PROGRESS.format(flag=flag)
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
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=slave, close_fds=True)
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
            out[lo:lo + (1 << 16)] = 1.0  # 512 KiB of each 1 MiB slice

        r = pool.shard_map(8, write_half, out={"out": out}, progress=False)
        written = shardc.copy_report(r).to_dict()["out_written"]["out"]
        assert 4 * MiB <= written <= 4 * MiB + 8 * 4096
        again = pool.shard_map(8, write_half, out={"out": out}, progress=False)
        assert shardc.copy_report(again).to_dict()["out_written"]["out"] == 0  # rewrites allocate nothing
    finally:
        out.close()
