"""Portable mode (``SHARDC_PORTABLE=1``, issue #19): on Linux, shardc takes the
paths platforms without Linux's extras take: POSIX shm instead of memfd (segments
and task rings), memory sampled through psutil, no parent-death signal.

These check the switch itself in the normal suite; ``.ci/run`` also runs most of
the suite with the switch on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from shardc import _lowlevel as ll
from shardc.errors import InvalidArgumentError
from shardc.queue import TaskRing
from shardc.segment import Segment

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="portable mode is a Linux switch")


def test_segments_and_rings_use_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto picks shm, an explicit memfd is refused naming the mode, and a task ring lives in shm too."""
    monkeypatch.setenv("SHARDC_PORTABLE", "1")
    with Segment.create(ll.PAGE_SIZE) as seg:
        assert seg.backing == "shm"
    with pytest.raises(InvalidArgumentError, match=r"backing='memfd' is not available in portable mode"):
        Segment.create(ll.PAGE_SIZE, backing="memfd")
    with TaskRing.create(capacity=8, max_consumers=1) as ring:
        assert not os.readlink(f"/proc/self/fd/{ring._fd}").startswith("/memfd:")
    monkeypatch.setenv("SHARDC_PORTABLE", "0")
    with Segment.create(ll.PAGE_SIZE) as seg, TaskRing.create(capacity=8, max_consumers=1) as ring:
        assert seg.backing == "memfd"
        assert os.readlink(f"/proc/self/fd/{ring._fd}").startswith("/memfd:")


def test_memory_comes_from_the_portable_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both samplers answer with psutil's estimate (precise=0, anon within rss), and None for a reaped pid."""
    monkeypatch.setenv("SHARDC_PORTABLE", "1")
    for sample in (ll.proc_mem, ll.proc_mem_fast):
        m = sample(os.getpid())
        assert m is not None and m["precise"] == 0
        assert 0 < m["anon"] <= m["rss"] and m["pss_anon"] == m["uss"] == m["anon"]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert ll.proc_mem(child.pid) is None
    monkeypatch.setenv("SHARDC_PORTABLE", "0")
    assert ll.proc_mem(os.getpid())["precise"] == 1  # type: ignore[index]


def test_memory_report_says_what_the_platform_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where PSS/USS do not exist the memory report says so (instead of a column of estimates read as PSS)."""
    import numpy as np

    import shardc

    def run() -> Any:
        out = shardc.buffer("f8", 4)
        res = shardc.shard_map(4, lambda s, out: out.__setitem__(s.id, 1.0), out={"out": out}, workers=1)
        assert np.array_equal(np.asarray(out), np.ones(4))
        return shardc.mem_report(res)

    monkeypatch.setenv("SHARDC_PORTABLE", "1")
    rep = run()
    assert rep.data["sampler"] == "psutil"
    assert any("PSS and USS are not available on this platform" in line for line in rep.lines)
    monkeypatch.setenv("SHARDC_PORTABLE", "0")
    rep = run()
    assert rep.data["sampler"] == "smaps_rollup"
    assert not any("not available" in line for line in rep.lines)


def test_polling_wait_is_a_runtime_switch() -> None:
    """The polling wait is chosen at run time (SHARDC_PORTABLE=1 sets it at import, no rebuild): workers forked with it on park by polling, the master still wakes, shm_queue gives the right answer, and it can be switched back."""
    import numpy as np

    import shardc

    shardc.pool_stop()
    before = ll.queue_set_portable_wait(True)
    try:
        pool = shardc.pool_create(2)  # forked with the switch on
        try:
            out = shardc.buffer("i8", 5000)
            for _ in range(3):  # idle between calls: the workers park in the polling wait
                r = shardc.shard_map(
                    5000,
                    lambda s, out: out.__setitem__(s.id, s.id * 3),
                    out={"out": out},
                    dispatch_mode="shm_queue",
                    pool=pool,
                    progress=False,
                    timeout=30,
                )
                assert not r.failures and np.array_equal(np.asarray(out), np.arange(5000) * 3)
            out.close()
        finally:
            shardc.pool_stop(pool)
        assert ll.queue_set_portable_wait(before) is True
    finally:
        ll.queue_set_portable_wait(before)
