"""Heap reuse in a worker: how much freed memory it keeps between shards.

glibc hands every big temporary (a NumPy kernel's block-sized arrays) a
fresh mmap and unmaps it on free, so each shard faults and zeroes those
pages again.  With reuse on (``csrc/heap.c``: every allocation from the heap,
up to ``keep`` freed bytes kept at its top) the next shard reuses them.  This
module bounds what is kept and tells the master about it:

* **on** at a call's setup with the master's ``heap_keep`` (``shardc.pool.heap_keep``),
  from a trimmed heap (the reference point of every estimate);
* **checked** after shards (or blocks) long enough to amortize it (~20 us):
  an estimate of the freed memory still resident is published in the
  worker's status row (``set_heap_kept``: the master does not count it as
  drift) and bounded by trimming;
* **off** at the end of the call (an idle worker keeps nothing, bar ``END_SLACK``);
* **drained** once switched off (``heap_keep`` 0 after a call that kept memory):
  a trim gives back the pages of free chunks below the top of the heap but
  leaves the chunks, so a hole as big as a temporary goes on serving it from
  the heap, resident between shards, as if reuse were on (glibc looks in its
  bins before it considers an mmap).  The checks go on with ``END_SLACK`` as
  the bound (``watch``) until the heap's free bytes are under it, or until a
  call's checks found nothing to trim (a free top of a thread arena, which a
  trim cannot give back, would otherwise keep it on for good);
* **refused** for the rest of the process once the estimate cannot be made
  (no ``mallinfo2``, /proc unreadable) or threads other than the main one ran
  (a thread allocates in an arena of its own, whose free top glibc keeps up
  to ``keep`` and ``malloc_trim`` cannot give back) or thread arenas grew.
  A thread that ran is seen whether it is alive or not and whichever arena
  glibc gave it (growing one or not, which the arena check alone missed in
  CI): its CPU time stays in the process's (``others_cpu``); shardc's own
  threads (``quiet_thread``) do not count.

Nothing here is shared between processes except the one published number.
"""

from __future__ import annotations

import resource
import time

from .. import _lowlevel as ll
from ..status import StatusRow

# Thread arenas may grow this much under reuse before it is refused for good.
THREAD_ARENA_SLACK = 8 * 1024**2
# Other threads (ended or alive) may run this much CPU time under reuse before it is refused
# for good (a thread that fills a block-sized temporary spends more).
THREAD_CPU_SLACK = 0.002
# Threads of shardc's own that allocate next to nothing (the parent watcher): their idents.
_QUIET: list[int] = []


def quiet_thread(ident: int | None) -> None:
    """Thread ``ident`` is shardc's own and allocates next to nothing: its CPU
    time is not other threads' (:func:`others_cpu`)."""
    if ident is not None:
        _QUIET.append(ident)


def others_cpu() -> float | None:
    """CPU seconds of every thread of this process but the calling one and the
    quiet ones, ended threads included (``getrusage``: ~2 us); None without
    ``RUSAGE_THREAD`` (not Linux: no heap reuse there either)."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    if who is None:
        return None
    a, me = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(who)
    t = a.ru_utime + a.ru_stime - me.ru_utime - me.ru_stime
    for ident in _QUIET:
        try:
            t -= time.clock_gettime(time.pthread_getcpuclockid(ident))
        except (OSError, OverflowError):  # it ended (its time stays in the process's): it counts
            pass
    return t


# An idle worker may keep this much freed memory rather than trim at every call's end
# (glibc's own default trim threshold is 128 KiB).
END_SLACK = 256 * 1024


class HeapPolicy:
    """One worker's heap reuse state (see the module docstring).

    Attributes:
        keep: freed bytes kept for the next shard (0: glibc's defaults).
        refused: reuse was turned off for the rest of this process.
        watch: freed memory is checked and bounded after shards (reuse on, or
            off with free chunks left from when it was on).
    """

    __slots__ = ("_arenas", "_drained", "_in_call", "_others", "_ref", "keep", "kept", "pid", "refused", "row", "watch")

    def __init__(self, row: StatusRow, pid: int) -> None:
        self.row = row
        self.pid = pid
        self.keep = 0
        self.kept = 0  # the estimate last published (set_heap_kept)
        self.refused = False
        self.watch = False
        self._ref: tuple[int, int, int] = (0, 0, 0)  # (anon, heap used, heap free) at the last trim
        self._arenas = (0, 0)  # (allocator's system bytes, program break) when reuse was turned on
        self._others = 0.0  # others_cpu() then
        self._in_call = False  # set_keep was called since the last end_call
        self._drained = False  # reuse off: this call's checks trimmed (see _drain)

    def set_keep(self, keep: int) -> None:
        """Keep up to ``keep`` freed bytes from now on (0: glibc's defaults);
        a call's setup."""
        self._in_call = True
        if self.refused:
            keep = 0
        if keep == self.keep:
            return
        self.keep = keep if ll.heap_reuse(keep) else 0  # (0: trims)
        self._publish(0)
        if not self.keep:
            self._drain()
            return
        st, others = ll.heap_stats(), others_cpu()
        if st is None or others is None or not self.trim():
            self.refuse()
            return
        self._arenas = (st["arena"], st["brk"])
        self._others = others
        self.watch = True

    def _drain(self, ref: bool = False) -> None:
        """Reuse is off and the heap was just trimmed: go on bounding freed
        memory while free chunks left from it could serve a temporary (see
        the module docstring); ``ref``: the reference point is taken too
        (its free bytes are the heap's now)."""
        self.watch = (ref or self.trim(done=True)) and self._ref[2] > END_SLACK
        # (counts as this call's trim: a switch-off or refusal late in a call keeps draining
        # through the next call, which has to show a hole is reused or end it)
        self._drained = self.watch

    def _give_up(self) -> None:
        """Reuse cannot go on (no estimate, or other threads ran): refuse it
        for good; draining (reuse is off already), stop draining instead."""
        if self.keep:
            self.refuse()
        else:
            self.watch = False

    def refuse(self) -> None:
        """glibc's defaults for the rest of this process, and give back what
        was kept (freed chunks left in the heap would otherwise serve the next
        big allocations, resident, as if reuse were still on)."""
        self.refused = True
        self.keep = 0
        self._publish(0)
        ll.heap_reuse(0)  # (trims)
        self._drain()  # holes left in the main heap

    def own_anon(self) -> int | None:
        """This process's anonymous memory (statm, ~8 us), or None if unreadable."""
        try:
            m = ll.proc_mem_fast(self.pid)
        except OSError:  # e.g. EMFILE: a shard that leaks file descriptors
            return None
        return None if m is None else int(m["anon"])

    def trim(self, done: bool = False) -> bool:
        """Trim (``done``: the caller just did), and take the reference point:
        nothing freed is resident now.  False if the reference cannot be read."""
        if not done:
            ll.heap_trim()
        st, anon = ll.heap_stats(), self.own_anon()
        if st is None or anon is None:
            return False
        self._ref = (anon, st["used"], st["free"])
        self._publish(0)
        return True

    def _threads_ran(self, st: dict[str, int]) -> bool:
        """Since reuse was turned on, other threads ran (and may have allocated
        in arenas of their own), or the allocator's arenas grew beyond the
        main heap (the program break): thread arenas."""
        others = others_cpu()
        if others is None or others - self._others > THREAD_CPU_SLACK:
            return True
        arena0, brk0 = self._arenas
        return (st["arena"] - arena0) - (st["brk"] - brk0) > THREAD_ARENA_SLACK

    def check(self, anon: int | None = None, bound: int | None = None) -> None:
        """Bound the freed memory kept and publish an estimate of it.

        The estimate (a lower bound) is the growth of anonymous memory since
        the last trim not explained by growth of the memory in use, capped by
        the allocator's free bytes.  Trimmed holes still count as free although
        they are not resident (only they can make it too high, by at most their
        size); memory in use but never touched can make it too low, so the
        growth of free bytes since the trim bounds it from above.  Past either
        bound the worker trims; once other threads ran or thread arenas grew
        (their freed tops cannot be trimmed from here) it stops keeping memory.

        Args:
            anon: this process's anonymous memory, if the caller just read it.
            bound: the most that may stay kept without a trim (default ``keep``).
        """
        if not self.watch:
            return
        st = ll.heap_stats()
        if anon is None:
            anon = self.own_anon()
        if st is None or anon is None or (self.keep and self._threads_ran(st)):
            self._give_up()
            return
        anon0, used0, free0 = self._ref
        resident = (anon - anon0) - (st["used"] - used0)
        limit = (self.keep or END_SLACK) if bound is None else bound
        if resident > limit or st["free"] - free0 > limit:
            if not self.trim():
                self._give_up()
            elif not self.keep:
                self._drain(ref=True)
            return
        self._publish(max(0, min(resident, st["free"])))

    def _publish(self, kept: int) -> None:
        self.kept = kept
        self.row.set_heap_kept(kept)

    def end_call(self) -> None:
        """The call is over: an idle worker keeps no freed memory.  Once per
        call (a worker also ends the last call when the next one is set up:
        a second check and trim there found nothing to give back, and cost
        every small call ~40 us of the worker's time on its critical path)."""
        if self.watch and self._in_call:
            self._in_call = False
            # Trims only past END_SLACK: a trim costs ~40 us even with nothing to give
            # back (small calls skip it); turns reuse off for good if other threads ran.
            draining = not self.keep
            self.check(bound=END_SLACK)
            # Draining: a call whose checks had nothing to trim shows no hole being reused;
            # what is left free (a thread arena's top) would keep it on for good.
            if draining and not self._drained:
                self.watch = False
            self._drained = False
