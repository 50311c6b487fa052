"""Ctrl-C in the master during a run, both dispatch modes, with a helper
thread of the caller running: ``KeyboardInterrupt`` reaches the caller
promptly, the workers stop their current shards, no segment leaks, and the
pool serves the next call.  Each case runs in a fresh interpreter (a
subprocess with a deadline), so a hang fails the test instead of hanging it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(90)

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import numpy as np
    import shardc

    mode = sys.argv[1]

    def slow(shard, started, stopped):
        started[shard.id] = time.monotonic_ns()
        t_end = time.monotonic() + 1.6  # the first shards, started 0.5 s before Ctrl-C, would end 1.1 s after it
        while time.monotonic() < t_end:
            time.sleep(0.01)
        stopped[shard.id] = time.monotonic_ns()

    def ident(shard, out):
        out[shard.id] = shard.id + 1

    pool = shardc.pool_create(2)
    warm = shardc.buffer("int64", 4)
    shardc.shard_map(4, ident, out={"out": warm}, dispatch_mode=mode, progress=False)
    warm.close()
    segs_before = str(shardc.segment_report())
    pids = sorted(w.pid for w in pool.workers)

    started = shardc.buffer("int64", 200, init=0)
    stopped = shardc.buffer("int64", 200, init=0)
    busy = threading.Event()
    helper = threading.Thread(target=lambda: busy.wait(30), daemon=True)  # the caller's own thread
    helper.start()
    t_int = []

    def interrupt():
        time.sleep(0.5)
        t_int.append(time.monotonic_ns())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    try:
        shardc.shard_map(200, slow, out={"started": started, "stopped": stopped}, dispatch_mode=mode,
                         progress=False, timeout=30)
    except KeyboardInterrupt:
        t_caught = time.monotonic_ns()
    else:
        print("NO_INTERRUPT"); sys.exit(3)
    lag = (t_caught - t_int[0]) / 1e9
    time.sleep(1.4)  # a shard not stopped would have finished (1.6 s from its start, <= 1.1 s after Ctrl-C) by now
    st = np.asarray(started).copy()
    late = int((st > t_int[0] + 1_000_000_000).sum())   # shards started over 1 s after Ctrl-C
    late_stop = int((np.asarray(stopped) > t_int[0] + 1_000_000_000).sum())  # ran on past 1 s
    started.close(); stopped.close()
    out = shardc.buffer("int64", 6)
    r = shardc.shard_map(6, ident, out={"out": out}, dispatch_mode=mode, progress=False, timeout=30)
    ok_next = list(np.asarray(out)) == [1, 2, 3, 4, 5, 6] and not r.failures
    out.close()
    import gc; gc.collect()
    segs_after = str(shardc.segment_report())
    print(f"lag\\t{lag:.3f}")
    print(f"late\\t{late}")
    print(f"late_stop\\t{late_stop}")
    print(f"ok_next\\t{int(ok_next)}")
    print(f"segments_same\\t{int(segs_after == segs_before)}")
    busy.set()
    shardc.pool_stop(pool)
    """
)


@pytest.mark.parametrize("mode", ["rpc_chunked", "shm_queue"])
def test_ctrl_c_during_run(mode: str) -> None:
    """SIGINT mid-run: KeyboardInterrupt within 1 s, no shard starts after that, nothing leaks, the pool serves the next call."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=80, cwd=REPO, env=env
    )
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    rows = dict(line.split("\t") for line in proc.stdout.splitlines() if "\t" in line)
    assert float(rows["lag"]) < 1.0, rows
    assert rows["late"] == "0", rows
    assert rows["late_stop"] == "0", rows
    assert rows["ok_next"] == "1", rows
    assert rows["segments_same"] == "1", rows
