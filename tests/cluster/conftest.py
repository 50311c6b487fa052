"""The cluster engines leave helper processes in the test process: stop them per module.

Dask's process workers start multiprocessing's resource tracker in this
process, which outlives the cluster; the engine-core tests that run after
these (``tests/_engine_helpers.assert_no_stray_children``) demand that every
child of the test process be a pool worker.  Each module here therefore ends
by checking that no other child it started is left, then ending a tracker it
started.
"""

from __future__ import annotations

import multiprocessing.resource_tracker as resource_tracker
import os
import signal
import time
from collections.abc import Iterator

import psutil
import pytest

import shardc


def _pool_pids() -> set[int]:
    """The default pool's workers (the local reference runs') and its fork
    server, if it has one (shardc.forkserver): allowed to stay."""
    p = shardc.pool_get()
    if p is None or p.closed:
        return set()
    server = {p._server.pid} if p._server is not None and not p._server.dead else set()
    return {w.pid for w in p.workers} | server


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE}


@pytest.fixture(scope="module", autouse=True)
def no_engine_children_left() -> Iterator[None]:
    before = _children()
    tracker_running = getattr(resource_tracker._resource_tracker, "_pid", None) is not None
    yield
    tracker = getattr(resource_tracker._resource_tracker, "_pid", None) if not tracker_running else None
    deadline = time.monotonic() + 20
    while (left := _children() - before - {tracker} - _pool_pids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    info = []
    for pid in left:
        try:
            info.append(f"{pid} {' '.join(psutil.Process(pid).cmdline())[:80]!r}")
        except psutil.Error:
            continue
    assert not info, f"processes the cluster engines left behind: {info}"
    if tracker is not None:
        _end_tracker(tracker)


def _end_tracker(pid: int) -> None:
    """End the resource tracker this module's engines started (by its pid).

    Not ``_stop()``: that waits for the tracker to see EOF on its pipe, which
    never comes while a process forked since (a pool worker) holds the pipe's
    write end.  multiprocessing starts a fresh tracker when one is next needed.
    """
    rt = resource_tracker._resource_tracker
    with rt._lock:
        if rt._fd is not None:
            os.close(rt._fd)
            rt._fd = None
        rt._pid = None
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
