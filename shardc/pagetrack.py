"""Which pages of a caller's array may have changed: the kernel keeps count.

The share cache (:class:`shardc.share.ShareCache`) reuses the sealed copy of a
borrowed array only after proving the array still holds the copy's bytes.
Comparing every byte proves it at 0.1-0.2 s per GiB.  Here the kernel keeps
the proof (Linux >= 6.7, ``csrc/wtrack.c``): the array's pages are
write-protected with a userfaultfd in *asynchronous* mode before the copy
is made, so any later write clears a page's protection bit (the kernel
resolves the fault itself: no signal, no handler thread); at the next call
one ``PAGEMAP_SCAN`` walk lists the pages that are not provably unchanged
and protects them again, and only those bytes are compared.

**What is seen** (each tested in ``tests/c/test_wtrack.c`` and
``tests/cluster/test_cluster_units.py``): stores by any thread of this
process, whatever the value written (even the byte it held); writes the
kernel makes for this process (``read()``, ``recv()`` into the array; it
faults like a store); writes through ``/proc/self/mem`` or
``process_vm_writev`` (the kernel faults the page in for write); memory
zapped (``madvise(DONTNEED)``/``MADV_FREE``), swapped, not present or
replaced by the zero page (never vouched for: compared); memory replaced by
another mapping or moved (``mmap(MAP_FIXED)``, ``mremap``: the new pages
carry no protection bit, or the scan fails on an unregistered range).
**What cannot change the bytes and is rightly ignored**: a fork child's
writes (copy-on-write gives the child its own page).  **Not vouched for,
so compared**: pages shared with another mapping (``MAP_SHARED``, file
pages of a private file mapping: they could be written without touching
our page tables; ``PAGE_IS_FILE``).  **Not seen**: a device or the kernel
writing through a page pin taken before the array was armed (RDMA memory
registration, io_uring fixed buffers, an ``O_DIRECT`` read in flight) --
like any change while a call runs, not supported for a borrowed array.

Where tracking is unavailable -- not Linux, a kernel before 6.7,
userfaultfd refused (``vm.unprivileged_userfaultfd=0`` without the
user-mode-only flag, a seccomp filter, a container), portable mode
(``SHARDC_PORTABLE=1``) -- or refused for one array (too small, not
contiguous, its pages overlapping another tracked array's, registered by
another userfaultfd), the cache compares every byte as before.  A process
forked from a tracking one (the pool's workers) does not inherit tracking:
its own calls compare bytes.

Cost to the caller's program: the first write to a page after each check
takes one minor fault (~1 us), and a transparent huge page written after a
check is mapped by 4 KiB pages from then on.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable

import numpy as np

from . import _lowlevel as ll
from . import config

log = logging.getLogger("shardc")

TRACK_MIN_BYTES = 16 << 20  # smaller arrays are compared (a few ms at most)

_lock = threading.RLock()  # reentrant: a weakref callback (-> Tracker.close) may run inside
_state: tuple[int, int, int] | None = None  # (pid, uffd, pagemap fd) of the process that opened them
_why_not: tuple[int, str] | None = None  # (pid, reason) when this process cannot track
_live: dict[int, tuple[int, int]] = {}  # id(tracker) -> its page range, in this process


def _open() -> tuple[int, int] | None:
    """This process's (uffd, pagemap fd), opened at first use; None where unavailable."""
    global _state, _why_not
    pid = os.getpid()
    if _state is not None and _state[0] == pid:
        return _state[1], _state[2]
    if _why_not is not None and _why_not[0] == pid:
        return None
    if _state is not None:  # inherited over fork: those fds watch the parent's memory
        _state = None
        _live.clear()
    if config.get_bool("SHARDC_PORTABLE"):
        _why_not = (pid, "portable mode (SHARDC_PORTABLE=1)")
        return None
    rc, uffd, pm = ll.wt_open()
    if rc < 0:
        _why_not = (pid, f"{os.strerror(-rc)} ({errno.errorcode.get(-rc, -rc)})")
        log.debug("shardc: no kernel write tracking here (%s): borrowed arrays are compared byte by byte", _why_not[1])
        return None
    _state = (pid, uffd, pm)
    return uffd, pm


def unavailable() -> str | None:
    """None if this process can track writes, else why not."""
    with _lock:
        if _open() is not None:
            return None
        return _why_not[1] if _why_not is not None else "unknown"


class Tracker:
    """The armed pages of one array (see the module docstring); made by :func:`track`."""

    def __init__(self, addr: int, nbytes: int, lo: int, hi: int, pid: int) -> None:
        self.addr = addr
        self.nbytes = nbytes
        self.lo = lo  # page-aligned range armed
        self.hi = hi
        self.pid = pid
        self.lock = threading.Lock()  # a look consumes the kernel's record: one at a time
        self.closed = False
        self.stale = False  # a check found other bytes: the cache drops its entry

    def matches(self, arr: np.ndarray) -> bool:
        """Whether this tracker still watches exactly ``arr``'s bytes, in this process."""
        return (
            not self.closed
            and self.pid == os.getpid()
            and arr.ctypes.data == self.addr
            and arr.nbytes == self.nbytes
            and (arr.flags.c_contiguous or arr.flags.f_contiguous)
        )

    def check(
        self, arr: np.ndarray, copy: np.ndarray, equal: Callable[[int, int, int], bool], equal_all: Callable[[], bool]
    ) -> tuple[bool, int] | None:
        """``(same, bytes compared)``: whether ``arr`` still holds ``copy``'s bytes, comparing
        (``equal(a, b, n)``) only what the kernel does not vouch for, or all of it
        (``equal_all()``) when the look fails; None if this tracker does not apply
        (another array or layout, another process): the caller compares everything."""
        if not self.matches(arr) or arr.shape != copy.shape or arr.dtype != copy.dtype:
            return None
        c = arr.flags.c_contiguous and copy.flags.c_contiguous
        if not (c or (arr.flags.f_contiguous and copy.flags.f_contiguous)):
            return None  # byte i of arr is not byte i of the copy
        with self.lock:  # a look consumes the kernel's record: one check at a time, compare included
            if self.stale:
                return False, 0
            runs = self.unsure()
            if runs is None:
                same, n = equal_all(), arr.nbytes
            else:
                a, b = arr.ctypes.data, copy.ctypes.data
                same, n = all(equal(a + off, b + off, k) for off, k in runs), sum(k for _, k in runs)
            self.stale = not same  # its record is consumed: never trusted again
            return same, n

    def unsure(self) -> list[tuple[int, int]] | None:
        """Byte ranges ``(offset, length)`` of the array the kernel does not vouch for
        since the last look (or the arming), protected again; None: all of it (the
        look failed; the whole range was protected again first, so compare it all)."""
        fds = _state
        if fds is None or fds[0] != self.pid or self.closed:
            return None
        rc, runs = ll.wt_take(fds[2], self.lo, self.hi - self.lo)
        if rc < 0:
            # Too many runs, or the range lost its registration: protect it all again
            # (before the caller compares, so a later write is seen), compare all.
            log.debug("shardc: write tracking look failed (%s): comparing the whole array", os.strerror(-rc))
            if ll.wt_arm(fds[1], self.lo, self.hi - self.lo) < 0:
                self.close()
            return None
        end = self.addr + self.nbytes
        out = []
        for a, b in runs:
            a, b = max(a, self.addr), min(b, end)
            if a < b:
                out.append((a - self.addr, b - a))
        return out

    def close(self) -> None:
        """Stop tracking (idempotent); the range is unregistered if still mapped."""
        with _lock:
            if self.closed:
                return
            self.closed = True
            _live.pop(id(self), None)
            fds = _state
            if fds is not None and fds[0] == self.pid == os.getpid():
                ll.wt_disarm(fds[1], self.lo, self.hi - self.lo)  # -ENOMEM if already unmapped: fine


def track(arr: np.ndarray) -> Tracker | None:
    """Arm write tracking on ``arr``'s pages, or None where it cannot be (the
    caller then compares bytes).  Call it BEFORE copying the bytes that later
    checks compare against: a write during the copy is then seen."""
    if arr.nbytes < TRACK_MIN_BYTES or not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        return None
    page = ll.PAGE_SIZE
    addr = arr.ctypes.data
    lo = addr - addr % page
    hi = -(-(addr + arr.nbytes) // page) * page
    with _lock:
        fds = _open()
        if fds is None:
            return None
        if any(a < hi and lo < b for a, b in _live.values()):
            return None  # a look by one tracker would hide the writes from the other
        rc = ll.wt_arm(fds[0], lo, hi - lo)
        if rc < 0:
            log.debug("shardc: cannot track writes to an array at 0x%x (%s): comparing it", addr, os.strerror(-rc))
            return None
        t = Tracker(addr, arr.nbytes, lo, hi, os.getpid())
        _live[id(t)] = (lo, hi)
        return t


def release(tracker: Tracker | None) -> None:
    """Stop ``tracker`` (None: nothing to do)."""
    if tracker is not None:
        tracker.close()
