"""Facts about this machine and its processes (a leaf module)."""

from __future__ import annotations

import math
import os

from .errors import InvalidArgumentError


def default_workers() -> int:
    """``max(1, usable CPUs - 1)``, honouring affinity, cgroup quotas and SHARDC_WORKERS."""
    env = os.environ.get("SHARDC_WORKERS")
    if env:
        try:
            n = int(env)
            if n >= 1:
                return n
        except ValueError:
            pass
        raise InvalidArgumentError(f"SHARDC_WORKERS={env!r} must be a positive integer")
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus - 1)


def _cgroup_cpus() -> int | None:
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, period = f.read().split()
        if q == "max":
            return None
        return max(1, math.ceil(int(q) / int(period)))
    except (OSError, ValueError):
        return None


def is_zombie(pid: int) -> bool:
    """True if ``pid`` has exited but is not reaped (Linux /proc; False elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] in (b"Z", b"X")
