"""Copy-on-write policy for borrowed inputs (``cow=``), enforced by page guards.

Runs in a forked worker.  Each borrowed input is mapped ``MAP_PRIVATE`` +
``PROT_READ`` from a sealed segment; :func:`protect` registers the mapping
with the C fault handler (``csrc/guard.c``); the worker runs each shard inside
:func:`shard_scope`::

    guard.install()                                   # once per worker process
    rid = guard.protect_array("X", X, "deny")         # once per mapped input
    with guard.shard_scope(shard_id) as scope:        # per shard
        fun(X=X, ...)
    scope.events                                      # [{input, pages, bytes, ...}]
    guard.unprotect(rid)                              # before unmapping X

Data flow of one write into a borrowed input::

    store into X ──> SIGSEGV (page is PROT_READ) ──> C handler (guard.c)
       │  region found: record {region, page, first offset}; mprotect page RW;
       │  the store retries and lands in a private COW page (never shared memory)
       └─ deny region: PyErr_SetInterruptEx(SIGUSR2) ──> Python handler
              raises BorrowedInputWriteError as soon as the C call returns
    scope exit ──> collect + restore each written region (MADV_DONTNEED on the
              written pages, PROT_READ again) ──> events; re-raise deny errors

Policies (per input):

* ``deny`` (default): the shard fails with
  :class:`~shardc.errors.BorrowedInputWriteError` naming input, shard, first
  written byte offset (relative to the input's first element) and element
  index.  Raised promptly by the Python signal handler (at the next
  eval-breaker check after the writing C call returns: right after a call such
  as ``np.copyto(X, ...)``, or at the next call after a bare ``X[0] = 1``), and
  raised again at scope exit if user code swallowed it.  The write itself only
  ever reached private pages, which are dropped at scope exit.
* ``audit``: the write goes to a private copy, the shard completes, and an
  event records pages and bytes (page granularity) and the first offset.
* ``allow``: the same mechanics as audit; the event counts the materialized
  private bytes.  (Mapping allow inputs writable up front and counting private
  pages in ``/proc/self/pagemap`` after each shard would let kernel writes
  through, but that scan costs ~14 ms per 256 MiB per shard here, even for
  shards that only read; fault tracking costs those nothing.)
* All modes: the next shard sees pristine data; shared memory never changes.
  Kernel writes (``f.readinto(X)`` with a large read, ``os.readv``) are not
  faults but ``EFAULT``: the kernel refuses to write into a read-only page and
  no handler can make it retry, so under *every* mode an ``OSError(EFAULT)``
  escaping the shard becomes ``BorrowedInputWriteError`` naming the input
  (found from the buffers in the innermost frame of the traceback that overlap
  a protected input; if that is ambiguous, every candidate is named).

Notification: ``PyErr_SetInterruptEx`` versus ``raise()``.  Both wake the
same Python-level handler (installed with :func:`signal.signal` on
``SHARDC_GUARD_SIGNAL``, default SIGUSR2, which needs no real delivery for the
first option).  The default is ``PyErr_SetInterruptEx``, called through a hook
defined in the cffi preamble (``csrc/*.c`` never includes ``Python.h``): it is
async-signal-safe, costs no extra system call, and no second signal is
delivered on top of the SIGSEGV, whereas ``raise()`` is a ``tgkill`` plus a
nested signal frame for every denied page.  Measured on the project VM
(2 vCPU, Linux 6.x; ``tests/test_guard.py`` prints these), per first write to a
page, 1000 pages written by one NumPy call:

=========================  ===============
plain copy-on-write fault  2.0-2.7 us/page
audit (no notification)    4.5-6.2 us/page
deny, PyErr_SetInterruptEx 4.9-5.0 us/page
deny, raise(SIGUSR2)       6.4-6.5 us/page
=========================  ===============

so the interrupt hook is both the simpler and the cheaper option (~1.5 us per
page less).  ``install(notify="signal")`` selects ``raise()`` for comparison.

Costs.  A read-only workload pays nothing per access: protection is set once
by :func:`protect`; a shard scope with no writes costs two short C calls
(~1.5 us per shard).  Summing a 256 MiB guarded input takes the same time as an
unguarded one (measured ratio 0.98-1.00, ~30 ms).
Each first write to a page costs one fault + one ``mprotect``; restore costs
one ``madvise`` + one ``mprotect`` per run of adjacent written pages.

VMAs (``vm.max_map_count``, 65530 by default).  Single-page mprotects split
mappings, so a region tracks at most ``SHARDC_GUARD_PAGES_PER_REGION`` (256)
pages one by one, and all regions together ``SHARDC_GUARD_PAGES_TOTAL``
(8192); past that the region becomes writable as a whole and its private pages
are counted (and later dropped) from ``/proc/self/pagemap``.  Adding a region
primes one anon_vma over the whole mapping so restored pages merge back into
one VMA instead of staying split forever.

Limits.  :func:`install` must run after ``faulthandler.enable()`` (it chains to
it) and in the main thread (Python signal handlers).  The guard takes over the
Python handler of the notify signal: a real one from elsewhere goes to the
Python handler installed before, if any, and is otherwise ignored (not the
default "terminate").  The Python notification
only runs in the main thread; writes from other threads are still caught at
scope exit.  Under deny, a single C call that writes a whole large input
(``X += 1``) completes into private pages before the error is raised; those
pages are dropped at scope exit.

Settings (:mod:`shardc.config`): ``SHARDC_GUARD_SIGNAL`` (default SIGUSR2),
``SHARDC_GUARD_PAGES_PER_REGION`` (256) and ``SHARDC_GUARD_PAGES_TOTAL`` (8192).
Where a write landed and the errors naming it: :mod:`shardc.guard_locate`; the
partial end pages of inherited inputs: :mod:`shardc.guard_edges`.

API:

* :func:`install` / :func:`uninstall`: the process-wide handlers.
* :func:`protect` / :func:`protect_array` / :func:`unprotect`: inputs.  Protecting
  the same mapping (address and size) again shares its region (reference
  counted); an event is named after the input whose elements hold the first
  written byte.
* :func:`protect_inherited`: an array inherited over fork (``shardc.inherit``):
  a snapshot region (written pages are saved, then copied back) over its
  whole pages, and its partial end pages compared and put back after each
  shard; :func:`take_lost` names inputs written beyond what could be saved
  (the process must not run another shard on them).
* :func:`shard_scope` (a :class:`ShardScope`): one shard; ``scope.events``; an
  exception leaving the scope carries the same list as ``exc.cow_events``.
* :func:`cow_stats`: cumulative per-input counters in this process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from . import _lowlevel as _ll
from . import config
from . import inherit as _inherit
from .errors import InvalidArgumentError, UsageError
from .guard_locate import Input as _Input
from .guard_locate import byte_bounds_of as _byte_bounds
from .guard_locate import element_index as _element_index  # noqa: F401 - tests read it here
from .guard_scope import ShardScope, _new_stats, _on_notify, _state, cow_stats, shard_scope

__all__ = [
    "install",
    "uninstall",
    "protect",
    "protect_array",
    "protect_inherited",
    "unprotect",
    "take_lost",
    "ShardScope",
    "shard_scope",
    "cow_stats",
    "MODES",
]

MODES = ("deny", "audit", "allow")


def install(signum: int | None = None, *, notify: str = "interrupt") -> None:
    """Install the fault handlers in this process (idempotent; call in each worker).

    Chains to the SIGSEGV/SIGBUS handlers present now (faulthandler: enable it
    first), gives the process an alternate signal stack if it has none, and
    registers the Python handler that raises deny errors.

    Args:
        signum: signal used to notify Python; default ``SHARDC_GUARD_SIGNAL`` or SIGUSR2.
        notify: ``"interrupt"`` (PyErr_SetInterruptEx, default) or ``"signal"`` (raise()).

    Raises:
        InvalidArgumentError: bad ``notify`` or signal.
        UsageError: called outside the main thread (a RuntimeError).
    """
    if notify not in ("interrupt", "signal"):
        raise InvalidArgumentError(f"notify must be 'interrupt' or 'signal', not {notify!r}")
    signum = config.get_int("SHARDC_GUARD_SIGNAL") if signum is None else int(signum)
    if signum in (signal.SIGSEGV, signal.SIGBUS, signal.SIGINT):
        raise InvalidArgumentError(f"cannot notify on {signal.Signals(signum).name}")
    if threading.current_thread() is not threading.main_thread():
        raise UsageError("shardc.guard.install() must run in the main thread")
    if _state.pid == os.getpid() and _state.signum == signum and _state.notify == notify:
        return
    if _state.signum is not None and _state.signum != signum:
        signal.signal(_state.signum, _state.prev_handler or signal.SIG_DFL)
        _state.prev_handler = None
    prev = signal.signal(signum, _on_notify)
    if prev is not _on_notify:  # after fork the inherited handler is already ours
        _state.prev_handler = prev
    _ll.guard_set_limits(config.get_int("SHARDC_GUARD_PAGES_PER_REGION"), config.get_int("SHARDC_GUARD_PAGES_TOTAL"))
    _ll.guard_install(signum, raise_signal=(notify == "signal"))
    _state.pid = os.getpid()
    _state.signum = signum
    _state.notify = notify
    _state.seen_notified = _ll.guard_counters()["notified"]


def uninstall() -> None:
    """Remove every protection and restore the previous signal handlers."""
    for rid in list(_state.inputs):
        while rid in _state.inputs:
            unprotect(rid)
    _ll.guard_uninstall()
    if _state.signum is not None:
        signal.signal(_state.signum, _state.prev_handler or signal.SIG_DFL)
    _state.pid = _state.signum = _state.prev_handler = None


def _mapping_is_private(addr: int) -> bool | None:
    """From /proc/self/maps: True/False for the mapping holding addr, None if unknown."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, perms = line.split(None, 2)[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= addr < hi:
                    return perms[3] == "p"
    except OSError:
        return None
    return False


def protect(
    name: str,
    addr: int,
    nbytes: int,
    mode: str = "deny",
    *,
    itemsize: int = 1,
    shape: tuple[int, ...] | None = None,
    strides: tuple[int, ...] | None = None,
    offset0: int = 0,
    snapshot: bool = False,
    primed: bool = False,
) -> int:
    """Guard a borrowed input's mapping and return its region id.

    Args:
        name: the input's name (the key in ``borrow=``), used in messages.
        addr: start of the mapping (page aligned; ``MAP_PRIVATE``).
        nbytes: size of the mapping in bytes.
        mode: ``"deny"``, ``"audit"`` or ``"allow"``.
        itemsize, shape, strides: the array's layout, to turn a byte offset into
            an element index (``shape=None``: a flat array of ``itemsize`` items).
        offset0: byte offset of element ``[0, ...]`` from ``addr``.
        snapshot: the range is anonymous memory inherited over fork, not a
            segment mapping: written pages are saved first and copied back
            after the shard (see ``csrc/guard.c``).
        primed: this mapping was guarded before (and not remapped since): skip
            the one-time priming, which walks every page table entry of the
            mapping twice.

    Returns:
        the region id for :func:`unprotect`; ``-1`` for an empty input (nothing to guard).

    Raises:
        InvalidArgumentError: bad mode, shared mapping, misaligned address.
        GuardError: mprotect failed (e.g. too many mappings: see the hint).
    """
    if mode not in MODES:
        raise InvalidArgumentError(f"cow must be one of {MODES}, not {mode!r}")
    if nbytes == 0:
        return -1
    if addr % _ll.PAGE_SIZE:
        raise InvalidArgumentError(f"borrowed input {name!r}: mapping address {addr:#x} is not page aligned")
    if sys.platform.startswith("linux") and _mapping_is_private(addr) is False:
        raise InvalidArgumentError(
            f"borrowed input {name!r} at {addr:#x} is not a MAP_PRIVATE mapping; page guards "
            "would let writes reach shared memory"
        )
    if _state.pid != os.getpid():
        install()

    def view(rid: int) -> _Input:
        return _Input(
            rid,
            name,
            addr,
            nbytes,
            mode,
            int(itemsize),
            None if shape is None else tuple(int(n) for n in shape),
            None if strides is None else tuple(int(s) for s in strides),
            int(offset0),
        )

    _state.stats.setdefault(name, _new_stats(mode))["mode"] = mode
    for inp in _state.inputs.values():
        if inp.addr == addr and inp.nbytes == nbytes:
            # The same mapping again (two views of one shared buffer, or two
            # out-of-band buffers of one pickled object): share the region;
            # each protect() is one reference, each input keeps its layout.
            _state.views[inp.rid].append(view(inp.rid))
            return inp.rid
    flags = _ll.GUARD_SNAPSHOT if snapshot else _ll.GUARD_PRIMED if primed else 0
    rid = _ll.guard_add(addr, nbytes, _ll.GUARD_MODES[mode] | flags, name)
    _state.inputs[rid] = view(rid)
    _state.views[rid] = [_state.inputs[rid]]
    return rid


def protect_array(
    name: str, array: Any, mode: str = "deny", *, base_addr: int | None = None, nbytes: int | None = None
) -> int:
    """:func:`protect` for a NumPy array that lives in a private mapping.

    Args:
        array: the array the shard will see.
        base_addr: start of the mapping; default: the array's lowest byte rounded down to a page.
        nbytes: size of the mapping; default: up to the array's highest byte.
    """
    lo, hi = _byte_bounds(array)
    data = array.__array_interface__["data"][0]
    base = lo - lo % _ll.PAGE_SIZE if base_addr is None else base_addr
    size = hi - base if nbytes is None else nbytes
    return protect(
        name, base, size, mode, itemsize=array.itemsize, shape=array.shape, strides=array.strides, offset0=data - base
    )


def protect_inherited(name: str, array: Any, root: Any, mode: str = "deny") -> int:
    """Guard an array inherited over fork (``shardc.inherit``); returns a handle
    for :func:`unprotect`.

    ``root`` is the array that owns the memory (``array`` or a base of it):
    the whole pages inside its bytes become a snapshot region; the bytes of
    the partial pages at its two ends (other objects may live on those
    pages, so they cannot be write-protected) are saved now, compared after
    every shard and put back, so a write there is reported (when the shard
    ends rather than at once) and undone like any other.
    """
    if mode not in MODES:
        raise InvalidArgumentError(f"cow must be one of {MODES}, not {mode!r}")
    lo, hi = _byte_bounds(root)
    if hi <= lo:
        return -1
    if _state.pid != os.getpid():
        install()
    page = _ll.PAGE_SIZE
    a, b = _inherit.interior(lo, hi, page)
    data = array.__array_interface__["data"][0]
    layout = {
        "itemsize": array.itemsize,
        "shape": tuple(int(n) for n in array.shape),
        "strides": tuple(int(s) for s in array.strides),
    }
    if b > a:
        handle = protect(name, a, b - a, mode, offset0=data - a, snapshot=True, **layout)
        spans = [(lo, a), (b, hi)]
    else:
        handle = _state.next_handle
        _state.next_handle -= 1
        spans = [(lo, hi)]
    _state.edges.add(
        handle,
        spans,
        lambda s0, s1: _Input(
            -1, name, s0, s1 - s0, mode, int(layout["itemsize"]), layout["shape"], layout["strides"], data - s0
        ),
    )
    return handle


def take_lost() -> list[str]:
    """Inputs (inherited over fork) written beyond what can be restored since
    the last call: the process must not run another shard on them."""
    lost, _state.lost = _state.lost, []
    return lost


def unprotect(region_id: int) -> None:
    """Drop private pages and forget the region (call before unmapping it)."""
    _state.edges.drop(region_id)
    if region_id < 0:
        return
    inp = _state.inputs.get(region_id)
    if inp is not None:
        views = _state.views[region_id]
        views.pop()
        if views:
            return
        del _state.inputs[region_id], _state.views[region_id]
    _ll.guard_remove(region_id, inp.name if inp else None)
