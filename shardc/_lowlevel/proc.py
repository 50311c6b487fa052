"""Processes (csrc/proc.c, csrc/heap.c): after-fork setup, memory sampling, the worker's heap policy.

Memory samplers.  Linux: ``/proc/PID/smaps_rollup`` (precise) and ``statm``
(fast), in C.  macOS: the physical footprint from ``proc_pid_rusage``, in C
(both samplers).  Elsewhere (the C sampler answers ``-ENOSYS``) and in
portable mode (``SHARDC_PORTABLE=1``, which runs this path on Linux so CI
exercises it): psutil's ``memory_info``, an estimate (``precise=0``): RSS less
its shared part where psutil knows one (Linux), else RSS itself.
"""

from __future__ import annotations

import errno as _errno
import os
import sys

from .. import config
from ..errors import (
    ShardcOSError,
)
from .core import _check, ffi, lib

# --------------------------------------------------------------------------
# processes (csrc/proc.c)
# --------------------------------------------------------------------------


def proc_after_fork(expected_parent: int, death_signal: int) -> int:
    """Arm PDEATHSIG in a fresh child.  Returns 0, or the C call's ``-errno``
    (``-ESRCH``: the parent already died): a fresh child cannot raise to anyone,
    so the caller decides (it exits at once on any negative value)."""
    return int(lib.shardc_proc_after_fork(expected_parent, death_signal))


def mem_sampler() -> str:
    """Which sampler :func:`proc_mem` uses here: "smaps_rollup" (Linux: real
    PSS and USS), "footprint" (macOS: the physical footprint stands in for
    PSS and USS, which macOS does not have) or "psutil" (portable mode and
    other platforms: an RSS-based estimate)."""
    if config.get_bool("SHARDC_PORTABLE"):
        return "psutil"
    if sys.platform.startswith("linux"):
        return "smaps_rollup"
    return "footprint" if sys.platform == "darwin" else "psutil"


def _portable_mem(pid: int) -> dict[str, int] | None:
    """The psutil sampler (see the module docstring); None if the process is gone."""
    import psutil  # only here: the native samplers need no import

    try:
        info = psutil.Process(pid).memory_info()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied as exc:
        raise ShardcOSError(_errno.EPERM, f"read memory (psutil) of pid {pid}: {exc}") from None
    rss = int(info.rss)
    anon = max(0, rss - int(getattr(info, "shared", 0)))
    return {"rss": rss, "pss": anon, "uss": anon, "swap": 0, "anon": anon, "pss_anon": anon, "precise": 0}


def _read_mem(fn: object, pid: int, what: str) -> dict[str, int] | None:
    if config.get_bool("SHARDC_PORTABLE"):
        return _portable_mem(pid)
    m = ffi.new("shardc_mem_t *")
    rc = fn(pid, m)  # type: ignore[operator]
    if rc == -_errno.ESRCH or rc == -_errno.ENOENT:
        return None
    if rc == -_errno.ENOSYS:  # no native sampler on this platform
        return _portable_mem(pid)
    _check(rc, f"read memory ({what}) of pid {pid}", error=ShardcOSError)
    return {
        "rss": int(m.rss),
        "pss": int(m.pss),
        "uss": int(m.uss),
        "swap": int(m.swap),
        "anon": int(m.anon),
        "pss_anon": int(m.pss_anon),
        "precise": int(m.precise),
    }


def proc_mem(pid: int) -> dict[str, int] | None:
    """Memory of ``pid`` in bytes from smaps_rollup (~0.3 ms; macOS: the physical
    footprint): rss, pss, uss, swap, anon, pss_anon, precise; None if the process is gone."""
    return _read_mem(lib.shardc_proc_mem, pid, "smaps_rollup")


def proc_mem_fast(pid: int) -> dict[str, int] | None:
    """Cheap estimate from /proc/PID/statm (~8 us; precise=0, pss/uss/anon = RssAnon;
    macOS: the same as :func:`proc_mem`); None if the process is gone."""
    return _read_mem(lib.shardc_proc_mem_fast, pid, "statm")


def own_rss() -> int:
    """This process's resident memory in bytes (:func:`proc_mem_fast`), 0 if it cannot be read."""
    m = proc_mem_fast(os.getpid())
    return m["rss"] if m is not None else 0


def proc_set_affinity(pid: int, cpus: list[int]) -> None:
    arr = ffi.new("int[]", list(cpus))
    _check(lib.shardc_proc_set_affinity(pid, arr, len(cpus)), "sched_setaffinity", error=ShardcOSError)


# --------------------------------------------------------------------------
# heap policy (csrc/heap.c)
# --------------------------------------------------------------------------


def heap_reuse(keep: int) -> bool:
    """This process's heap policy (csrc/heap.c): ``keep > 0`` serves big
    allocations from the heap and keeps up to ``keep`` freed bytes at its top
    for reuse; ``0`` restores glibc's defaults.  False where unsupported (not
    glibc >= 2.33, or an allocator that refuses ``mallopt``)."""
    return lib.shardc_heap_reuse(max(0, int(keep))) == 0


def heap_stats() -> dict[str, int] | None:
    """The allocator's totals: ``free``, ``used``, ``arena`` (bytes taken from the
    system) and ``brk`` (the program break); None where unknown."""
    h = ffi.new("shardc_heap_t *")
    if lib.shardc_heap_stats(h) < 0:
        return None
    return {"free": h.free, "used": h.used, "arena": h.arena, "brk": h.brk}


def heap_trim() -> None:
    """Give the allocator's free memory back to the kernel (``malloc_trim(0)``)."""
    rc = lib.shardc_heap_trim()
    if rc != -_errno.ENOSYS:  # no glibc malloc: nothing to trim
        _check(rc, "malloc_trim", error=ShardcOSError)
