"""The memory model of a pool's workers: sampling, footprint, verdicts.

What counts as a worker's own memory is the subtle part: not RSS (it counts
every page of borrowed inputs a worker reads) and not USS (it counts clean
pages of a shared segment only that worker maps), but its anonymous memory
(Pss_Anon from ``/proc/PID/smaps_rollup``, ~0.3 ms a sample) less its share of
borrowed arrays it inherited at fork.  Cheap samples (statm, ~8 us) are put
on that scale by calibration against the last precise sample.

:class:`MemoryModel` is a mixin of :class:`shardc.pool.Pool` (it reads the
pool's workers, status rows and limits); the supervisor asks it for
verdicts: ``("cap" | "drift", reason)`` or None.
"""

from __future__ import annotations

import time
from typing import Any

from . import _lowlevel as ll
from . import config
from .handle import WorkerHandle
from .units import fmt_bytes

PROFILES = ("default", "memory", "speed")
HEAP_KEEP_MAX = 256 * 1024**2

# A statm read is skipped while it cannot show growth of STATM_SLACK: the last
# one is under STATM_MAX_AGE s old and the shards reported since ran too short
# to make that much memory resident at MEM_RATE, an upper bound of how fast a
# process faults in and zeroes pages (~3 GiB/s measured here with 4 KiB pages,
# ~10 GiB/s with huge pages): 8 MiB takes >= 0.25 ms of shard time.
MEM_RATE = 32 * 1024**3
STATM_SLACK = 8 * 1024**2
STATM_MAX_AGE = 0.05
BUSY_UNKNOWN = 1 << 62  # reported work whose shard time is not known: never skip


def heap_keep(profile: str, mem_cap: int | None) -> int:
    """Freed heap bytes each worker keeps for its next shards during a call
    (0: glibc's defaults, every big temporary a fresh mmap).

    Keeping them means a kernel's block-sized temporaries are faulted and
    zeroed once per call instead of in every shard (~10% of a memory-bound
    NumPy kernel here).  At most 256 MiB and a quarter of ``mem_cap``; off with
    ``profile="memory"`` or ``SHARDC_HEAP_REUSE=0``.  Workers give it all back
    at the end of the call."""
    if profile == "memory" or not config.get_bool("SHARDC_HEAP_REUSE"):
        return 0
    return HEAP_KEEP_MAX if mem_cap is None else min(HEAP_KEEP_MAX, mem_cap // 4)


class MemoryModel:
    """Memory sampling and verdicts for the workers of a pool (a mixin of Pool)."""

    workers: list[Any]
    status: Any
    mem_cap: int | None
    recycle: float | None
    profile: str

    def _set_baseline(self, w: WorkerHandle, m: dict[str, int] | None) -> None:
        w.needs_baseline = False
        if m is not None:
            # (A deferred baseline, taken during a call, must not include freed
            # memory the worker keeps for reuse: drift subtracts that itself.)
            w.baseline = max(0, self.footprint(m, w) - self.status.heap_kept(w.slot))
            # Pages still shared with the master after fork count half in
            # Pss_Anon; as the worker touches them (refcounts) they become
            # private and Pss_Anon grows by up to that much with no leak at
            # all.  Drift is measured beyond this slack.  Inherited borrowed
            # arrays are not part of it: they are write-protected, and their
            # pages are given back at the end of the call.
            w.cow_slack = max(0, w.anon_offset - (w.inherited_bytes - self.inherit_share(w)))

    def inherit_share(self, w: WorkerHandle) -> int:
        """The part of ``w``'s Pss_Anon that is its share of inherited arrays:
        their bytes divided among the master and the live workers holding them."""
        if not w.inherited_bytes:
            return 0
        holders = 1 + sum(
            1 for x in self.workers if x.inherited_bytes and x.alive and x.inherit_tokens & w.inherit_tokens
        )
        return w.inherited_bytes // max(holders, 1)

    def released_inherited(self) -> None:
        """The call that used the inherited arrays ended: workers gave their
        pages back (``end``), so their memory is measured without them again."""
        for w in self.workers:
            if w.inherited_bytes:
                w.inherited_bytes = 0
                w.inherit_tokens = frozenset()
                w.last_mem = None

    def sample(self, w: WorkerHandle) -> dict[str, int] | None:
        """Precise sample (smaps_rollup, ~0.3 ms): RSS, PSS, USS."""
        t0 = time.thread_time()  # (CPU time: a preemption does not inflate it)
        m = ll.proc_mem(w.pid)
        w.precise_cost = time.thread_time() - t0
        if m is not None:
            fast = ll.proc_mem_fast(w.pid)
            if fast is not None:
                # statm's RssAnon also counts pages still shared with the master
                # after fork; remember by how much it exceeds Pss_Anon so cheap
                # samples can be put on the same scale (see calibrated()).
                w.anon_offset = fast["anon"] - m["pss_anon"]
                w.fast_anon = fast["anon"]
            w.last_mem = m
            w.precise_t = time.monotonic()
            if w.needs_baseline:
                self._set_baseline(w, m)
            for k in ("rss", "pss", "uss"):
                w.peak[k] = max(w.peak[k], m[k])
            w.peak["anon"] = max(w.peak["anon"], self.footprint(m, w))
        return m

    def _statm(self, w: WorkerHandle) -> dict[str, int] | None:
        """Read ``w``'s statm (~8 us) and remember it, raw, for :meth:`fast_sample`."""
        fast = ll.proc_mem_fast(w.pid)
        w.fast_raw, w.fast_t, w.busy_unread_ns = fast, time.monotonic(), 0
        return fast

    def unmoved(self, w: WorkerHandle, cap: int | None = None) -> bool:
        """True if ``w``'s memory cannot have grown by ``STATM_SLACK`` since its
        last statm read (see ``MEM_RATE``), and, with a ``cap``, that read plus
        the slack is under it: a new read would tell nothing new."""
        raw = w.fast_raw
        if raw is None or time.monotonic() - w.fast_t > STATM_MAX_AGE:
            return False
        if w.busy_unread_ns * 1e-9 * MEM_RATE >= STATM_SLACK:
            return False
        return cap is None or raw["rss"] + STATM_SLACK < cap

    def fast_sample(self, w: WorkerHandle, max_age: float = 0.0) -> dict[str, int] | None:
        """``w``'s statm sample (calibrated, see :meth:`calibrated`), read
        again only if the last one read here is older than ``max_age`` s
        (one call's start reuses the previous call's end; a call's end the
        read its last precise check just made)."""
        raw = w.fast_raw
        if raw is None or (time.monotonic() - w.fast_t > max_age and not self.unmoved(w)):
            raw = self._statm(w)
        return None if raw is None else self.calibrated(w, raw)

    def sample_cheap(self, w: WorkerHandle, max_age: float = 0.5, moved: int = 8 * 1024**2) -> dict[str, int] | None:
        """Sample on the hot path: statm (~8 us) every time, and a precise
        sample only when private memory moved by ``moved`` bytes or the
        precise one is older than ``max_age`` seconds.  Returns the precise
        sample when one was taken, else None."""
        fast = self._statm(w)
        if fast is None:
            return None
        if time.monotonic() - w.precise_t > max_age or abs(fast["anon"] - w.fast_anon) > moved:
            w.fast_anon = fast["anon"]
            return self.sample(w)
        return None

    def calibrated(self, w: WorkerHandle, fast: dict[str, int]) -> dict[str, int]:
        """A cheap (statm) sample with its anonymous memory put on the Pss_Anon
        scale of ``w``'s last precise sample.  Before the first one (a
        re-forked worker), what it mapped at hello counts as shared with the
        master, so its own memory is its growth since then."""
        if w.needs_baseline:
            anon = max(0, fast["anon"] - w.hello_anon) + self.inherit_share(w)
        else:
            anon = max(0, fast["anon"] - w.anon_offset)
        return {**fast, "anon": anon, "pss_anon": anon, "uss": anon, "pss": anon}

    def footprint(self, m: dict[str, int], w: WorkerHandle) -> int:
        """The bytes ``w`` holds by itself: its anonymous memory (Pss_Anon),
        less its share of borrowed arrays it inherited at fork.

        Not RSS (counts every page of borrowed inputs it reads) and not USS
        (counts clean pages of a shared segment that only this worker maps):
        pages of shared segments are never a worker's growth.
        """
        return max(0, m["pss_anon"] - self.inherit_share(w))

    _UNSET: Any = object()

    def memory_verdict(
        self, w: WorkerHandle, mem_cap: Any = _UNSET, recycle: Any = _UNSET, profile: str | None = None
    ) -> tuple[str, str] | None:
        """``("cap" | "drift", reason)`` when ``w`` should be recycled, else None.

        ``mem_cap``/``recycle``/``profile`` default to the pool's; a
        ``shard_map`` call passes its own.
        """
        cap = self.mem_cap if mem_cap is MemoryModel._UNSET else mem_cap
        drift = self.recycle if recycle is MemoryModel._UNSET else recycle
        prof = profile or self.profile
        m = w.last_mem
        if m is None:
            return None
        used = self.footprint(m, w)
        label = "anon"
        if cap is not None and used > cap:
            return "cap", f"{label} {fmt_bytes(used)} > mem_cap {fmt_bytes(cap)}"
        # profile="memory" recycles at half the drift.
        limit = None if drift is None else (drift / 2 if prof == "memory" else drift)
        if limit is not None and w.baseline:
            # Freed memory the worker keeps for reuse (heap_keep) is not a leak.
            growth = used - w.baseline - w.cow_slack - self.status.heap_kept(w.slot)
            floor = config.get_int("SHARDC_RECYCLE_MIN_BYTES")
            if growth > floor and growth > limit * max(w.baseline, floor):
                return "drift", (
                    f"{label} grew {fmt_bytes(growth)} over its baseline "
                    f"{fmt_bytes(w.baseline)} (+ {fmt_bytes(w.cow_slack)} copy-on-write "
                    f"slack; > recycle={limit:g})"
                )
        return None
