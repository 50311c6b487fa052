"""Write tracking (csrc/wtrack.c): pages of the caller's memory written since last looked.

Thin wrappers; every failure comes back as the C layer's ``-errno`` (the
caller, :mod:`shardc.pagetrack`, then compares bytes instead: tracking is an
optimisation and never raises to the user).
"""

from __future__ import annotations

from .core import ffi, lib

WT_MAX_RUNS = 4096  # unsure page runs taken per look (more: -E2BIG, compare everything)


def wt_open() -> tuple[int, int, int]:
    """``(rc, uffd, pagemap_fd)``: rc 0 on success, else ``-errno`` (see wtrack.h)."""
    fds = ffi.new("int[2]")
    rc = int(lib.shardc_wt_open(fds, fds + 1))
    return rc, int(fds[0]), int(fds[1])


def wt_arm(uffd: int, addr: int, length: int) -> int:
    return int(lib.shardc_wt_arm(uffd, addr, length))


def wt_disarm(uffd: int, addr: int, length: int) -> int:
    return int(lib.shardc_wt_disarm(uffd, addr, length))


def wt_take(pagemap: int, addr: int, length: int) -> tuple[int, list[tuple[int, int]]]:
    """``(rc, runs)``: the (start, end) address runs not proven unchanged (rc = their
    count), write-protected again; rc < 0: ``-errno`` (``-E2BIG``: too many runs)."""
    buf = ffi.new("uint64_t[]", 2 * WT_MAX_RUNS)
    rc = int(lib.shardc_wt_take(pagemap, addr, length, buf, WT_MAX_RUNS))
    return rc, [(int(buf[2 * i]), int(buf[2 * i + 1])) for i in range(max(rc, 0))]
