"""A persistent pool of forked workers, and the module-level default pool.

``Pool(n)`` forks ``n`` workers (milliseconds: no interpreter start, no
imports), each connected by one unix ``socketpair`` that carries messages,
passes segment fds (``SCM_RIGHTS``) and is the lifeline (EOF = death).  A
shared ``int64`` status table (one row per worker slot, see
``shardc.worker.ST_*``) lets the master see which shard each worker runs and
since when, without messages.

The pool itself does no scheduling: ``shard_map`` (``shardc.map``) drives it.
It provides spawning, replacing (restart after death, recycle on memory),
memory sampling (anonymous memory, Pss_Anon from ``/proc/PID/smaps_rollup``,
so pages of borrowed inputs and out buffers never count as a worker's growth), a health
check, and stopping (every wait bounded; SIGKILL as the last word).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import weakref
from typing import Any

import cloudpickle
import numpy as np

from . import _lowlevel as ll
from ._channel import Channel, ChannelClosed
from .units import check_recycle, fmt_bytes, parse_bytes  # noqa: F401 - re-exported
from .errors import ClosedError, InvalidArgumentError, signal_label
from . import guard as _guard  # noqa: F401 - workers use it; imported once, in the master
from . import inherit as _inherit
from . import worker as _worker_mod
from .protocol import END
from .status import StatusTable
from .worker import worker_entry

log = logging.getLogger("shardc")

PROFILES = ("default", "memory", "speed")

HEAP_KEEP_MAX = 256 * 1024**2


def heap_keep(profile: str, mem_cap: int | None) -> int:
    """Freed heap bytes each worker keeps for its next shards during a call
    (0: glibc's defaults, every big temporary a fresh mmap).

    Keeping them means a kernel's block-sized temporaries are faulted and
    zeroed once per call instead of in every shard (~10% of a memory-bound
    NumPy kernel here).  At most 256 MiB and a quarter of ``mem_cap``; off with
    ``profile="memory"`` or ``SHARDC_HEAP_REUSE=0``.  Workers give it all back
    at the end of the call."""
    if profile == "memory" or os.environ.get("SHARDC_HEAP_REUSE", "1") == "0":
        return 0
    return HEAP_KEEP_MAX if mem_cap is None else min(HEAP_KEEP_MAX, mem_cap // 4)




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
        import math
        return max(1, math.ceil(int(q) / int(period)))
    except (OSError, ValueError):
        return None


class WorkerHandle:
    """The master's view of one worker slot."""

    def __init__(self, slot: int, pid: int, chan: Channel) -> None:
        self.slot = slot
        self.pid = pid
        self.chan = chan
        self.known: set[str] = set()  # segment keys whose fd this worker has
        self.started = time.monotonic()
        self.baseline: int | None = None  # USS (or RSS) after start
        self.last_mem: dict[str, int] | None = None
        self.peak: dict[str, int] = {"rss": 0, "pss": 0, "uss": 0, "anon": 0}
        self.recycles = 0
        self.restarts = 0
        self.last_recycle = 0.0
        self.state = "idle"
        self.alive = True
        self.exitcode: int | None = None
        self.call_id = -1
        self.pids: list[int] = [pid]
        self.precise_t = 0.0  # when the last smaps_rollup sample was taken
        self.anon_offset = 0  # statm RssAnon minus Pss_Anon at that sample
        self.cow_slack = 0  # growth that copy-on-write of inherited pages alone can cause
        self.fast_anon = 0  # statm private estimate at that time
        # Borrowed arrays this worker inherited at fork (shardc.inherit tokens)
        # and their bytes: still mapped until the call that uses them ends.
        self.inherit_tokens: frozenset[int] = frozenset()
        self.inherited_bytes = 0
        self.needs_baseline = False  # set by the first precise sample (Pool.refork)
        self.hello_anon = 0  # statm anonymous memory when it said hello (Pool.refork)

    def info(self) -> dict[str, Any]:
        m = self.last_mem or {}
        return {"worker": self.slot, "pid": self.pid, "state": self.state if self.alive else "dead",
                "rss": m.get("rss"), "pss": m.get("pss"), "uss": m.get("uss"), "anon": m.get("pss_anon"),
                "baseline": self.baseline, "recycles": self.recycles, "restarts": self.restarts}


class Pool:
    """A pool of forked worker processes (see module docstring).

    Args:
        workers: number of workers (default: ``default_workers()``).
        mem_cap: per-worker memory cap ("2GB"); a worker above it is
            recycled between shards, and killed mid-shard above 2x.
        recycle: True (recycle when memory grew 50% over the post-start
            baseline), False, or a fraction (e.g. 0.25).
        packages: modules imported in each worker at start.
        init_expr: a callable or a code string run once in each worker.
        profile: "default", "memory" (stricter recycling) or "speed".
        health_check_interval: sample worker memory at least every N shards.

    Use as a context manager, or call :meth:`stop`.
    """

    def __init__(self, workers: int | None = None, mem_cap: Any = "2GB", recycle: Any = True,
                 packages: list[str] | None = None, init_expr: Any = None, profile: str = "default",
                 health_check_interval: int = 10, cow_guard: bool = True) -> None:
        n = default_workers() if workers is None else workers
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InvalidArgumentError(f"workers must be a positive integer, got {workers!r}")
        self.size = int(n)
        self.mem_cap = parse_bytes(mem_cap, "mem_cap")
        self.recycle = check_recycle(recycle)
        if profile not in PROFILES:
            raise InvalidArgumentError(f"profile={profile!r} is not supported; use one of {', '.join(PROFILES)}")
        self.profile = profile
        if isinstance(health_check_interval, bool) or not isinstance(health_check_interval, int) or health_check_interval < 1:
            raise InvalidArgumentError(f"health_check_interval must be a positive integer, got {health_check_interval!r}")
        self.health_check_interval = health_check_interval
        self.packages = list(packages or [])
        for p in self.packages:
            if not isinstance(p, str):
                raise InvalidArgumentError(f"packages must be module names (str), got {p!r}")
        if init_expr is not None and not (callable(init_expr) or isinstance(init_expr, str)):
            raise InvalidArgumentError("init_expr must be a callable or a string of Python code")
        if isinstance(init_expr, str):
            try:
                compile(init_expr, "<init_expr>", "exec")
            except SyntaxError as exc:
                raise InvalidArgumentError(f"init_expr is not valid Python: {exc}") from None
        self.init_expr = init_expr
        self._init_blob = cloudpickle.dumps(init_expr) if callable(init_expr) else None
        self.cow_guard = cow_guard
        self.min_recycle_interval = 1.0
        self._closed = False
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self.events: list[dict[str, Any]] = []  # deaths, recycles, restarts (pool lifetime)
        self.status = StatusTable(self.size)
        self.workers: list[WorkerHandle] = []
        self.start_seconds = 0.0
        t0 = time.perf_counter()
        from .segment import run_janitor_once
        run_janitor_once()
        # Prepare in the master what every child would otherwise redo.
        _worker_mod._threadpool_controller()
        threads = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        if threads:
            log.warning("forking %d workers while %d other thread(s) run in this process (%s): a "
                        "thread holding a lock at fork time can deadlock a worker; create the pool "
                        "(shardc.pool_create) before starting threads", self.size, len(threads),
                        ", ".join(threads[:5]))
        try:
            for slot in range(self.size):
                self.workers.append(self._spawn(slot))
            for w in self.workers:
                self._await_hello(w)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - t0
        _live_pools.add(self)
        log.debug("started pool of %d workers in %.1f ms", self.size, self.start_seconds * 1e3)

    # -- spawning ------------------------------------------------------------------
    def _spawn(self, slot: int, close: list[WorkerHandle] | None = None) -> WorkerHandle:
        """Fork a worker into ``slot``; the child closes the master's ends of
        every other worker's socket (and of ``close``: workers being replaced)."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.status.reset(slot)
        parent_pid = os.getpid()
        others = [w.chan.sock for w in self.workers if w.slot != slot]
        others += [w.chan.sock for w in close or () if w.chan.sock not in others]
        tokens = _inherit.held_tokens()
        _worker_mod._death_signal = (signal.SIGKILL if threading.current_thread() is threading.main_thread()
                                     else 0)
        pid = os.fork()
        if pid == 0:  # child: never returns
            try:
                parent_sock.close()
                for s in others:
                    s.close()
                for p in list(_live_pools):
                    if p is not self:
                        for w in p.workers:
                            w.chan.close()
            finally:
                worker_entry(slot, child_sock, self.status, parent_pid, self.packages,
                             None if self._init_blob else self.init_expr, self._init_blob,
                             self.cow_guard)
        child_sock.close()
        w = WorkerHandle(slot, pid, Channel(parent_sock))
        w.inherit_tokens = tokens
        w.inherited_bytes = _inherit.held_bytes(tokens)
        return w

    def _await_hello(self, w: WorkerHandle, timeout: float = 30.0, sample: bool = True) -> None:
        w.chan.sock.settimeout(timeout)
        try:
            msg, _ = w.chan.recv()
        except (ChannelClosed, socket.timeout, OSError) as exc:
            code = self._reap(w, wait=2.0)
            raise RuntimeError(f"worker {w.slot} (pid {w.pid}) failed to start "
                               f"({signal_label(code) if code is not None else exc}); "
                               "check packages= and init_expr= (the worker's traceback is on stderr)") from None
        finally:
            try:
                w.chan.sock.settimeout(None)
            except OSError:
                pass  # already closed by _reap
        assert msg[0] == "hello"
        if not sample:
            # A precise sample (smaps_rollup) of a worker sharing a big
            # inherited array costs ~5 ms of master time: the first one taken
            # in the call (when its memory moves, or after max_age) sets the
            # baseline.  Until then cheap samples are calibrated by counting
            # the inherited arrays as shared (see calibrated()).
            w.needs_baseline = True
            fast = ll.proc_mem_fast(w.pid)
            if fast is not None:
                w.fast_anon = w.hello_anon = fast["anon"]
                w.precise_t = time.monotonic()
            return
        self._set_baseline(w, self.sample(w))

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

    def replace(self, w: WorkerHandle, reason: str, kind: str) -> WorkerHandle:
        """Stop ``w`` (if alive) and fork a fresh worker into its slot."""
        if w.alive:
            self._terminate(w)
        nw = self._spawn(w.slot)
        nw.recycles = w.recycles + (1 if kind == "recycle" else 0)
        nw.restarts = w.restarts + (1 if kind == "restart" else 0)
        nw.last_recycle = time.monotonic() if kind == "recycle" else w.last_recycle
        nw.pids = w.pids + [nw.pid]
        self.workers[w.slot] = nw
        self._await_hello(nw)
        self.events.append({"t": time.time(), "event": kind, "worker": w.slot, "old_pid": w.pid,
                            "new_pid": nw.pid, "reason": reason})
        log.info("%s worker %d (pid %d -> %d): %s", "recycled" if kind == "recycle" else "restarted",
                 w.slot, w.pid, nw.pid, reason)
        return nw

    def refork(self, tokens: frozenset[int], reason: str) -> list[WorkerHandle]:
        """Fork a fresh worker in place of every one forked before ``tokens``
        were held (``shardc.inherit``), so all of them inherit those arrays.

        The old workers are asked to exit first and reaped after the new ones
        are forked, so their exits overlap.  Returns the new workers.
        """
        old = [w for w in self.workers if not tokens <= w.inherit_tokens]
        if not old:
            return []
        for w in old:
            if w.alive:
                try:
                    w.chan.send(("exit",))
                except OSError:
                    pass
        new = []
        try:
            for w in old:
                nw = self._spawn(w.slot, close=old)
                nw.recycles, nw.restarts, nw.last_recycle = w.recycles, w.restarts, w.last_recycle
                nw.pids = w.pids + [nw.pid]
                self.workers[w.slot] = nw
                new.append(nw)
        finally:
            for w in old:  # reaped even if a fork failed half-way (no zombies)
                self._reap(w, wait=1.0)
        for nw, w in zip(new, old):
            self._await_hello(nw, sample=False)
            self.events.append({"t": time.time(), "event": "refork", "worker": w.slot, "old_pid": w.pid,
                                "new_pid": nw.pid, "reason": reason})
        log.debug("re-forked %d worker(s): %s", len(new), reason)
        return new

    def inherit_share(self, w: WorkerHandle) -> int:
        """The part of ``w``'s Pss_Anon that is its share of inherited arrays:
        their bytes divided among the master and the live workers holding them."""
        if not w.inherited_bytes:
            return 0
        holders = 1 + sum(1 for x in self.workers
                          if x.inherited_bytes and x.alive and x.inherit_tokens & w.inherit_tokens)
        return w.inherited_bytes // max(holders, 1)

    def released_inherited(self) -> None:
        """The call that used the inherited arrays ended: workers gave their
        pages back (``end``), so their memory is measured without them again."""
        for w in self.workers:
            if w.inherited_bytes:
                w.inherited_bytes = 0
                w.inherit_tokens = frozenset()
                w.last_mem = None

    # -- death and stopping -----------------------------------------------------------
    def _reap(self, w: WorkerHandle, wait: float = 1.0) -> int | None:
        """Collect ``w``'s exit status, waiting up to ``wait`` s, then SIGKILL."""
        if w.exitcode is not None:
            return w.exitcode
        deadline = time.monotonic() + wait
        killed = False
        delay = 0.0002
        while True:
            try:
                pid, status = os.waitpid(w.pid, os.WNOHANG)
            except ChildProcessError:
                w.alive = False
                return w.exitcode
            if pid == w.pid:
                w.exitcode = os.waitstatus_to_exitcode(status)
                w.alive = False
                w.chan.close()
                return w.exitcode
            if time.monotonic() > deadline and not killed:
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed = True
                deadline = time.monotonic() + 5.0
            elif killed and time.monotonic() > deadline:
                w.alive = False
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def is_alive(self, w: WorkerHandle) -> bool:
        """True while ``w`` runs; reaps it (recording its exit code) if it died."""
        if not w.alive or w.exitcode is not None:
            return False
        try:
            pid, status = os.waitpid(w.pid, os.WNOHANG)
        except ChildProcessError:
            w.alive = False
            return False
        if pid == w.pid:
            w.exitcode = os.waitstatus_to_exitcode(status)
            w.alive = False
            w.chan.close()
            return False
        if _is_zombie(w.pid):
            # Dead, but its other threads (OpenBLAS starts one when the worker
            # limits it to 1 thread) are still being torn down, so waitpid
            # cannot reap it for a moment yet: wait for that, bounded.
            self._reap(w, wait=1.0)
            return False
        return True

    def ensure_alive(self) -> list[WorkerHandle]:
        """Replace every worker that died since it was last used; returns the replaced ones."""
        dead = [w for w in self.workers if not self.is_alive(w)]
        for w in dead:
            label = signal_label(w.exitcode) if w.exitcode is not None else "unknown status"
            self.replace(w, f"worker died while idle ({label})", "restart")
        return dead

    def kill(self, w: WorkerHandle) -> int | None:
        """SIGKILL ``w`` and reap it; returns its exit code (negative signal)."""
        try:
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self._reap(w, wait=5.0)

    def _terminate(self, w: WorkerHandle, grace: float = 1.0) -> None:
        try:
            w.chan.send(("exit",))
        except OSError:
            pass
        self._reap(w, wait=grace)

    def end_call(self) -> None:
        """Tell every live worker the call is over (it drops the call's state)."""
        for w in self.workers:
            if w.alive:
                try:
                    w.chan.send((END,))
                except OSError:
                    pass

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every worker: ask, then SIGKILL after ``timeout``; idempotent."""
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        for w in self.workers:
            if w.alive:
                try:
                    w.chan.send(("exit",))
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.alive:
                self._reap(w, wait=max(0.0, deadline - time.monotonic()))
            w.chan.close()
        _live_pools.discard(self)
        self.status.close()

    close = stop

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        if self._closed:
            raise ClosedError("this pool is stopped; create a new one with shardc.Pool() or pool_create()")
        if os.getpid() != self._pid:
            raise ClosedError("a shardc pool cannot be used from a forked child of its master")

    # -- memory --------------------------------------------------------------------------
    def sample(self, w: WorkerHandle) -> dict[str, int] | None:
        """Precise sample (smaps_rollup, ~0.3 ms): RSS, PSS, USS."""
        m = ll.proc_mem(w.pid)
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

    def sample_cheap(self, w: WorkerHandle, max_age: float = 0.5,
                     moved: int = 8 * 1024**2) -> dict[str, int] | None:
        """Sample on the hot path: statm (~8 us) every time, and a precise
        sample only when private memory moved by ``moved`` bytes or the
        precise one is older than ``max_age`` seconds.  Returns the precise
        sample when one was taken, else None."""
        fast = ll.proc_mem_fast(w.pid)
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

    def memory_verdict(self, w: WorkerHandle, mem_cap: Any = _UNSET, recycle: Any = _UNSET,
                       profile: str | None = None) -> tuple[str, str] | None:
        """``("cap" | "drift", reason)`` when ``w`` should be recycled, else None.

        ``mem_cap``/``recycle``/``profile`` default to the pool's; a
        ``shard_map`` call passes its own.
        """
        cap = self.mem_cap if mem_cap is Pool._UNSET else mem_cap
        drift = self.recycle if recycle is Pool._UNSET else recycle
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
            floor = int(os.environ.get("SHARDC_RECYCLE_MIN_BYTES", 32 * 1024**2))
            if growth > floor and growth > limit * max(w.baseline, floor):
                return "drift", (f"{label} grew {fmt_bytes(growth)} over its baseline "
                                 f"{fmt_bytes(w.baseline)} (+ {fmt_bytes(w.cow_slack)} copy-on-write "
                                 f"slack; > recycle={limit:g})")
        return None

    # -- reports ---------------------------------------------------------------------------
    def status_table(self) -> list[dict[str, Any]]:
        for w in self.workers:
            if w.alive:
                self.sample(w)
        return [w.info() for w in self.workers]

    def health_check(self, busy: set[int] | None = None) -> dict[str, Any]:
        """Per worker: action none/restart/recycle/defer_recycle, with the reason."""
        actions = []
        for w in self.workers:
            if not self.is_alive(w):
                label = signal_label(w.exitcode) if w.exitcode is not None else "unknown status"
                actions.append({"worker": w.slot, "pid": w.pid, "action": "restart",
                                "reason": "worker_dead", "detail": label})
                continue
            m = self.sample(w)
            if m is None:
                actions.append({"worker": w.slot, "pid": w.pid, "action": "none", "reason": "rss_unavailable"})
                continue
            verdict = self.memory_verdict(w)
            if verdict is None:
                actions.append({"worker": w.slot, "pid": w.pid, "action": "none", "reason": "ok"})
            else:
                act = "defer_recycle" if busy and w.slot in busy else "recycle"
                actions.append({"worker": w.slot, "pid": w.pid, "action": act, "reason": verdict[1]})
        return {"timestamp": time.time(), "workers": self.size, "actions": actions}

    # -- convenience ----------------------------------------------------------------------
    def shard_map(self, shards: Any, fun: Any = None, **kwargs: Any) -> Any:
        """``shard_map`` on this pool (same arguments as :func:`shardc.shard_map`)."""
        from .map import shard_map
        return shard_map(shards, fun, pool=self, **kwargs)

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._closed else f"pids={[w.pid for w in self.workers]}"
        return f"<shardc.Pool workers={self.size} {state}>"






def _is_zombie(pid: int) -> bool:
    """True if ``pid`` has exited but is not reaped (Linux /proc; False elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] in (b"Z", b"X")


_live_pools: "weakref.WeakSet[Pool]" = weakref.WeakSet()
_default: Pool | None = None

# Segments closed in this process that workers may still map.  Workers are
# told right away when nothing is being sent to them (no shard_map running);
# during a call (a close may come from a GC callback in the middle of a
# frame) the keys wait for the end of the call.
_pending_forget: set[str] = set()
_busy_calls = 0


def _on_segment_closed(key: str) -> None:
    _pending_forget.add(key)
    if _busy_calls == 0:
        flush_forgets()


def flush_forgets() -> None:
    """Tell every idle worker to drop the closed segments it still maps."""
    if not _pending_forget:
        return
    keys = set(_pending_forget)
    _pending_forget.difference_update(keys)
    for p in list(_live_pools):
        if p.closed or os.getpid() != p._pid:
            continue
        for w in p.workers:
            mine = keys & w.known
            if mine and w.alive:
                try:
                    w.chan.send(("forget", sorted(mine)))
                except OSError:
                    continue  # dead: its replacement starts with nothing mapped
                w.known.difference_update(mine)


def call_started() -> None:
    global _busy_calls
    _busy_calls += 1


def call_finished() -> None:
    global _busy_calls
    _busy_calls -= 1
    if _busy_calls == 0:
        flush_forgets()


from . import segment as _segment  # noqa: E402

_segment._close_hooks.append(_on_segment_closed)


def pool_create(n: int | None = None, mem_cap: Any = "2GB", recycle: Any = True, packages: Any = None,
                init_expr: Any = None, profile: str = "default", health_check_interval: int = 10) -> Pool:
    """Create the default pool (stopping any previous default pool)."""
    global _default
    if _default is not None:
        _default.stop()
    _default = Pool(n, mem_cap=mem_cap, recycle=recycle, packages=packages, init_expr=init_expr,
                    profile=profile, health_check_interval=health_check_interval)
    return _default


def pool_get() -> Pool | None:
    """The default pool, or None."""
    if _default is not None and (_default.closed or os.getpid() != _default._pid):
        return None
    return _default


def pool_stop(pool: Pool | None = None, timeout: float = 5.0) -> None:
    """Stop ``pool`` (default: the default pool)."""
    global _default
    target = pool or _default
    if target is not None:
        target.stop(timeout)
    if target is _default:
        _default = None


def pool_status(pool: Pool | None = None) -> list[dict[str, Any]]:
    """Per worker: pid, state, rss/pss/uss, baseline, recycles, restarts."""
    p = pool or pool_get()
    return [] if p is None else p.status_table()


def pool_health_check(pool: Pool | None = None) -> dict[str, Any]:
    p = pool or pool_get()
    if p is None:
        raise ClosedError("there is no pool; create one with pool_create()")
    return p.health_check()


def _stop_all() -> None:
    for p in list(_live_pools):
        p.stop(timeout=2.0)


import atexit  # noqa: E402

atexit.register(_stop_all)
