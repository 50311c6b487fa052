"""Memory samples of the master process itself, for :class:`~shardc.diagnostics.Diagnostics`.

One place keeps, across runs, what the last precise sample cost (the end of
a run takes one only while that fits its budget) and the last sample taken,
which the start of the next run reuses when it is recent (a call's start is
the previous call's end; a statm read is ~10 us of a ~0.5 ms small call).
"""

from __future__ import annotations

import os
import time
from typing import Any

from .. import _lowlevel as ll

cost = [0.0]  # how long the master's last precise sample took (s)
_last: list[Any] = [0, 0, None]  # pid, monotonic ns, the sample


def sample(precise: bool, max_age: float = 0.0) -> tuple[int, dict[str, int]] | None:
    """``(monotonic ns, sample)`` of this process: precise (smaps_rollup) or
    cheap (statm); a cheap one is the last sample taken (with its own time)
    if that is under ``max_age`` seconds old.  None if it cannot be read."""
    pid, now = os.getpid(), time.monotonic_ns()
    if not precise and _last[0] == pid and now - _last[1] <= max_age * 1e9:
        return _last[1], _last[2]
    if precise:
        t0 = time.perf_counter()
        m = ll.proc_mem(pid)
        cost[0] = time.perf_counter() - t0
    else:
        m = ll.proc_mem_fast(pid)
    if m is None:
        return None
    _last[:] = [pid, time.monotonic_ns(), m]
    return _last[1], m
