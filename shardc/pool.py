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
check, stopping (bounded waits, then SIGKILL), and ``shardc.forkserver`` for threaded callers.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import _lowlevel as ll
from . import config
from . import forkserver as _forkserver
from . import guard as _guard  # noqa: F401 - workers use it; imported once, in the master
from . import inherit as _inherit
from . import worker as _worker_mod
from ._channel import Channel, ChannelClosed
from .errors import ClosedError, InvalidArgumentError, ShardcOSError, WorkerSetupError, signal_label
from .forget import live_pools
from .handle import WorkerHandle
from .memory import PROFILES, MemoryModel
from .protocol import END, EXIT, HELLO
from .segment import run_janitor_once
from .status import StatusTable
from .sysinfo import is_zombie
from .units import check_recycle, parse_bytes
from .validate import check_choice, check_int, check_packages
from .worker import worker_entry

log = logging.getLogger("shardc")


class Pool(MemoryModel):
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
        cow_guard: page guards on borrowed inputs in workers (needed for ``cow=``).
        fork_mode: "fork" (workers forked from this process), "server" (from
            a fork server: safe with threads, see ``shardc.forkserver``) or "auto"
            (the server while other threads are alive; ``SHARDC_FORK_SERVER``).

    Use as a context manager, or call :meth:`stop`.
    """

    def __init__(
        self,
        workers: int | None = None,
        mem_cap: Any = "2GB",
        recycle: Any = True,
        packages: list[str] | None = None,
        init_expr: Any = None,
        profile: str = "default",
        health_check_interval: int = 10,
        cow_guard: bool = True,
        fork_mode: str = "auto",
    ) -> None:
        self.size = config.default_workers() if workers is None else check_int(workers, "workers", 1)
        self.mem_cap = parse_bytes(mem_cap, "mem_cap")
        self.recycle = check_recycle(recycle)
        self.profile = check_choice(profile, "profile", PROFILES)
        self.health_check_interval = check_int(health_check_interval, "health_check_interval", 1)
        self.packages = check_packages(packages)
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
        self.fork_mode = _forkserver.resolve_mode(fork_mode)
        self._server: _forkserver.ForkServer | None = None  # started at the first served spawn
        self.min_recycle_interval = 1.0
        self._closed = False
        self._pid = os.getpid()
        self.events: list[dict[str, Any]] = []  # deaths, recycles, restarts (pool lifetime)
        self.status = StatusTable(self.size)
        self.queue_ring: Any = None  # shm_queue's task ring for every call: (TaskRing, token, backing), pool_ring's
        self.selector: Any = None  # the calls' selector over the worker sockets (Supervisor.run), kept
        self.workers: list[WorkerHandle] = []
        self.start_seconds = 0.0
        t0 = time.perf_counter()
        run_janitor_once()
        # Prepare in the master what every child would otherwise redo.
        _worker_mod._threadpool_controller()
        if self.fork_mode == "fork":
            _forkserver.warn_threads(self.size)
        # Give the master's free heap back to the kernel before forking: pages the allocator keeps
        # (freed arrays, a test suite's or a notebook's leftovers) are inherited, and a worker's
        # anonymous memory (Pss_Anon) counts its share of them against mem_cap and drift.
        ll.heap_trim()
        try:
            for slot in range(self.size):
                self.workers.append(self._spawn(slot))
            for w in self.workers:
                self._await_hello(w)
            self._server = _forkserver.zygote_for(self, self._drop_worker_ends) or self._server  # see there
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - t0
        live_pools.add(self)
        log.debug("started pool of %d workers in %.1f ms", self.size, self.start_seconds * 1e3)

    # -- spawning ------------------------------------------------------------------
    def _spawn(self, slot: int, close: list[WorkerHandle] | None = None) -> WorkerHandle:
        """Fork a worker into ``slot``; the child closes the master's ends of
        every other worker's socket (and of ``close``: workers being replaced)."""
        if self._use_server():
            return _forkserver.spawn_for(self, slot)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.status.reset(slot)
        parent_pid = os.getpid()
        tokens = _inherit.held_tokens()
        # Linux sends PDEATHSIG when the *thread* that forked the worker exits:
        # workers forked from another thread than the main one (a re-fork for an
        # inherited input, a replacement) rely on their socket's EOF instead (0).
        death_signal = signal.SIGKILL if threading.current_thread() is threading.main_thread() else 0
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN (process limit), ENOMEM: nothing was created but the pair
            parent_sock.close()
            child_sock.close()
            raise ShardcOSError(
                exc.errno or 0,
                f"fork a worker for slot {slot}: {exc.strerror or exc} (the per-user process limit, "
                "`ulimit -u`, or memory: fewer workers= or a smaller mem_cap help)",
            ) from None
        if pid == 0:  # child: never returns
            try:
                parent_sock.close()
                self._drop_worker_ends(close or ())
            finally:
                worker_entry(
                    slot,
                    child_sock,
                    self.status,
                    parent_pid,
                    self.packages,
                    None if self._init_blob else self.init_expr,
                    self._init_blob,
                    self.cow_guard,
                    death_signal,
                )
        child_sock.close()
        w = WorkerHandle(slot, pid, Channel(parent_sock))
        w.inherit_tokens = tokens
        w.inherited_bytes = _inherit.held_bytes(tokens)
        return w

    def _drop_worker_ends(self, extra: list[WorkerHandle] | tuple[()] = ()) -> None:
        """In a child of this process: close the master's ends of every worker
        socket (this pool's, ``extra``'s, every live pool's) and of the fork servers."""
        for w in [*self.workers, *extra, *(w for p in list(live_pools) for w in p.workers)]:
            w.chan.close()
        _forkserver.close_in_child()

    def _await_hello(self, w: WorkerHandle, timeout: float = 30.0, sample: bool = True) -> None:
        w.chan.sock.settimeout(timeout)
        try:
            msg, _ = w.chan.recv()
        except (TimeoutError, ChannelClosed, OSError) as exc:
            code = self._reap(w, wait=2.0)
            raise WorkerSetupError(
                f"worker {w.slot} (pid {w.pid}) failed to start "
                f"({signal_label(code) if code is not None else exc}); "
                "check packages= and init_expr= (the worker's traceback is on stderr)"
            ) from None
        finally:
            try:
                w.chan.sock.settimeout(None)
            except OSError:
                pass  # already closed by _reap
        assert msg[0] == HELLO
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
        self.events.append(
            {"t": time.time(), "event": kind, "worker": w.slot, "old_pid": w.pid, "new_pid": nw.pid, "reason": reason}
        )
        log.info(
            "%s worker %d (pid %d -> %d): %s",
            "recycled" if kind == "recycle" else "restarted",
            w.slot,
            w.pid,
            nw.pid,
            reason,
        )
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
                    w.chan.send((EXIT,))
                except OSError:
                    pass
        new = []
        ll.heap_trim()  # as at pool start: forked workers inherit what the allocator keeps
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
        for nw, w in zip(new, old, strict=False):
            self._await_hello(nw, sample=False)
            self.events.append(
                {
                    "t": time.time(),
                    "event": "refork",
                    "worker": w.slot,
                    "old_pid": w.pid,
                    "new_pid": nw.pid,
                    "reason": reason,
                }
            )
        log.debug("re-forked %d worker(s): %s", len(new), reason)
        return new

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
                code = self._poll_exit(w)
            except ChildProcessError:
                w.alive = False
                return w.exitcode
            if code is not None:
                w.exitcode = code
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

    def _poll_exit(self, w: WorkerHandle) -> int | None:
        """``w``'s exit code once it exited, else None (ChildProcessError: not ours)."""
        if w.server is not None:  # forked by the fork server, which reaps it
            return w.server.poll_exit(w.pid)
        pid, status = os.waitpid(w.pid, os.WNOHANG)
        return os.waitstatus_to_exitcode(status) if pid == w.pid else None

    def _use_server(self) -> bool:
        """The next worker comes from the fork server ("auto": threads, no inherited input)."""
        return _forkserver.use_server(self.fork_mode)

    @property
    def can_inherit(self) -> bool:
        """Whether a call now may have its workers inherit big inputs at fork."""
        return self.cow_guard and (self.fork_mode == "fork" or not self._use_server())

    def is_alive(self, w: WorkerHandle, zombie: bool = True) -> bool:
        """True while ``w`` runs; reaps it (recording its exit code) if it died.  ``zombie=False``: no
        /proc read (~5 us) for one whose last threads still exit (not reapable yet; its EOF shows it)."""
        if not w.alive or w.exitcode is not None:
            return False
        try:
            code = self._poll_exit(w)
        except ChildProcessError:
            w.alive = False
            return False
        if code is not None:
            w.exitcode = code
            w.alive = False
            w.chan.close()
            return False
        if zombie and is_zombie(w.pid):
            # Dead, but its other threads (OpenBLAS starts one when the worker
            # limits it to 1 thread) are still being torn down, so waitpid
            # cannot reap it for a moment yet: wait for that, bounded.
            self._reap(w, wait=1.0)
            return False
        return True

    def ensure_alive(self) -> list[WorkerHandle]:
        """Replace the workers that died since last used (one still exiting: the call sees it); returns them."""
        dead = [w for w in self.workers if not self.is_alive(w, zombie=False)]
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
            w.chan.send((EXIT,))
        except OSError:
            pass
        self._reap(w, wait=grace)

    def end_call(self) -> None:
        """Tell every live worker the call is over (it drops the call's state), unless it was told already."""
        for w in self.workers:
            if w.alive and not w.call_ended:
                try:
                    w.chan.send((END,))
                except OSError:
                    pass
            w.call_ended = False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every worker: ask, then SIGKILL after ``timeout``; idempotent."""
        if self._closed or os.getpid() != self._pid:
            return
        self._closed = True
        for w in self.workers:
            if w.alive:
                try:
                    w.chan.send((EXIT,))
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.alive:
                self._reap(w, wait=max(0.0, deadline - time.monotonic()))
            w.chan.close()
        live_pools.discard(self)
        if self._server is not None:
            self._server.close()
        self.status.close()
        if self.selector is not None:
            self.selector.close()
        if self.queue_ring is not None:
            self.queue_ring[0].release()
            self.queue_ring = None

    close = stop

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        if self._closed:
            raise ClosedError("this pool is stopped; create a new one with shardc.Pool() or pool_create()")
        if os.getpid() != self._pid:
            raise ClosedError("a shardc pool cannot be used from a forked child of its master")

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
                actions.append(
                    {"worker": w.slot, "pid": w.pid, "action": "restart", "reason": "worker_dead", "detail": label}
                )
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
        if _front_end is None:  # pragma: no cover - shardc/__init__ imports map
            raise ClosedError("shardc.map is not loaded; import shardc")
        return _front_end(shards, fun, pool=self, **kwargs)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._closed else f"pids={[w.pid for w in self.workers]}"
        return f"<shardc.Pool workers={self.size} {state}>"


_default: Pool | None = None
# The front end Pool.shard_map calls: shardc.map registers shard_map at import
# (the pool sits below the front ends and does not import them).
_front_end: Callable[..., Any] | None = None


def register_front_end(fn: Callable[..., Any]) -> None:
    global _front_end
    _front_end = fn


def pool_create(
    n: int | None = None,
    mem_cap: Any = "2GB",
    recycle: Any = True,
    packages: Any = None,
    init_expr: Any = None,
    profile: str = "default",
    health_check_interval: int = 10,
    fork_mode: str = "auto",
) -> Pool:
    """Create the default pool (stopping any previous default pool)."""
    global _default
    if _default is not None:
        _default.stop()
    _default = Pool(
        n,
        mem_cap=mem_cap,
        recycle=recycle,
        packages=packages,
        init_expr=init_expr,
        profile=profile,
        health_check_interval=health_check_interval,
        fork_mode=fork_mode,
    )
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
    for p in list(live_pools):
        p.stop(timeout=2.0)


import atexit  # noqa: E402

atexit.register(_stop_all)
