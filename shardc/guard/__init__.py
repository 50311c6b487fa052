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

Environment variables:

==================================  =========================================
``SHARDC_GUARD_SIGNAL``             signal used to notify Python (default
                                    ``SIGUSR2``; a name or a number)
``SHARDC_GUARD_PAGES_PER_REGION``   pages tracked one by one per input (256)
``SHARDC_GUARD_PAGES_TOTAL``        ... in all inputs together (8192)
==================================  =========================================

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

Modules: ``state`` (per-process state), ``regions`` (install, protect,
unprotect), ``events`` (faults -> events and errors), ``scope`` (per shard).
"""

from __future__ import annotations

from .events import _element_index
from .regions import (
                      cow_stats,
                      install,
                      protect,
                      protect_array,
                      protect_inherited,
                      take_lost,
                      uninstall,
                      unprotect,
)
from .scope import ShardScope, shard_scope
from .state import MODES, _byte_bounds, _Input

__all__ = ["install", "uninstall", "protect", "protect_array", "protect_inherited", "unprotect",
           "take_lost", "ShardScope", "shard_scope", "cow_stats", "MODES", "_element_index", "_byte_bounds",
           "_Input"]
