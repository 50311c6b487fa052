"""The supervisor: the master's one event loop, and everything about worker health.

It is shared by both dispatch modes (``shardc.dispatch``).  It

* sets the call up on every worker (``shardc.call.CallSetup``),
* runs the one event loop: wait on every worker's socket (EOF = death) with
  a deadline, hand messages to the dispatcher, and every ~50 ms run the
  watchdog and the diagnostics tick;
* watches time and memory (the **watchdog**): a shard running past
  ``timeout`` (read from the worker's status row), a worker stuck outside any
  shard (the dispatcher says what "stuck" means for its transport), a worker
  over 2x ``mem_cap`` inside a shard; and decides on recycling at shard
  boundaries (``mem_cap``, drift);
* handles every death in one place (:meth:`Supervisor.handle_death`): reap,
  ask the dispatcher what the worker held (:class:`shardc.dispatch.Loss`),
  requeue/charge through the scheduler, then replace the worker;
* replaces workers in one place (:meth:`Supervisor.replace`), for deaths,
  recycles and workers that die before the call starts.

A death charges an attempt only to the shard that was running (read from the
status row); the other shards the worker held are requeued free.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import selectors
import time
from typing import Any

from ._channel import ChannelClosed
from .call import Call, CallSetup, WorkerGone
from .diagnostics import Diagnostics, Progress
from .dispatch import Dispatcher
from .errors import (
    CallSetupTimeoutError,
    ShardTimeoutError,
    WorkerCrashedError,
    WorkerMemoryError,
    WorkerSetupError,
    signal_label,
)
from .idruns import IdRuns
from .memory import BUSY_UNKNOWN
from .protocol import READY, RETIRE_EXIT
from .scheduler import Scheduler
from .status import STATE_RUNNING
from .units import fmt_bytes

log = logging.getLogger("shardc")

# A due check takes a precise sample (smaps_rollup) of a worker when the last one is older than
# PRECISE_MAX_AGE and than its cost / PRECISE_RUN_SHARE (at most PRECISE_MAX_WAIT); a growth of
# 8 MiB brings one at once.  Its cost grows with what the worker maps (~25 ms after reading a
# 1 GiB input) and the master dispatches nothing meanwhile: both workers due at once left one
# idle 20-60 ms in nearly every 0.45 s call of 32 blocks of a 1 GiB matrix.
PRECISE_MAX_AGE = 0.5  # s
PRECISE_RUN_SHARE = 0.005
PRECISE_MAX_WAIT = 5.0  # s (a cost that one slow read inflated does not put it off for long)
STATM_MIN_GAP = 0.001  # s: without mem_cap, statm is read at most this often at shard boundaries (unless due)
REPLACE_ATTEMPTS = 3  # a slot whose fresh workers die this often before the call starts fails the call


class WorkerState:
    """The supervisor's (and dispatcher's) bookkeeping of one worker during a call."""

    __slots__ = ("inflight", "pending_recycle", "since_sample", "last_msg", "deferred", "retiring")

    def __init__(self) -> None:
        self.inflight = IdRuns()  # rpc: shard ids sent, not yet reported
        self.pending_recycle: str | None = None  # why it is to be replaced at its next safe point
        self.since_sample = 0  # shards since the last memory check
        self.last_msg = time.monotonic()
        self.deferred = False  # a drift recycle deferred by the minimum interval (reported once)
        self.retiring = False  # reported a write it cannot undo: exits (RETIRE_EXIT) after the report


def _unregister(sel: selectors.BaseSelector, fileobj: Any) -> None:
    try:
        sel.unregister(fileobj)
    except (KeyError, ValueError, OSError):
        pass  # (not registered, or closed: epoll dropped it with its last descriptor)


class Supervisor:
    """Runs one call on ``pool`` (see the module docstring)."""

    def __init__(self, call: Call, pool: Any, sched: Scheduler, diag: Diagnostics, bar: Progress) -> None:
        self.call = call
        self.pool = pool
        self.status = pool.status
        self.sched = sched
        self.diag = diag
        self.bar = bar
        self.setup = CallSetup(call, diag)
        self.ws: dict[int, WorkerState] = {w.slot: WorkerState() for w in pool.workers}
        self.dispatcher: Dispatcher | None = None
        self.sel: selectors.BaseSelector | None = None
        # Pipelined setup (setup_all(pipeline=True)): worker slot -> when its
        # READY is due (SHARDC_SETUP_TIMEOUT); the loop reads the answers.
        self.unready: dict[int, float] = {}
        self.setup_ns = 0

    # -- setting the call up ------------------------------------------------------------
    def setup_all(self, pipeline: bool = False) -> None:
        """Set up the call on every worker: all messages first, then the
        replies, so workers load fun and map inputs in parallel.

        ``pipeline``: nothing is waited for; :meth:`run` sends each worker its
        CALL and the dispatcher's first work together (one write, one wake-up,
        a round trip less per call), and the event loop reads the answers
        (:meth:`receive`): an error fails the call as before, a death is one
        before the call started, the setup deadline is checked by the
        watchdog.  Only for a pool whose workers hold no work of an earlier
        call (``StatusTable.quiet``): the call's done map and the task ring
        are reset without waiting for them."""
        if pipeline:
            due = time.monotonic() + self.setup.limit
            self.unready = {w.slot: due for w in self.pool.workers}
            return
        sent, dead = [], []
        self.setup_ns = time.monotonic_ns()  # any shard a worker starts after this is this call's
        for w in list(self.pool.workers):
            try:
                self.setup.send(w)
                sent.append(w)
            except OSError:
                dead.append(w)
        for i, w in enumerate(sent):
            try:
                self.setup.await_ready(w, self.pool.kill)
            except CallSetupTimeoutError:
                # The others got the same call: kill those that have not
                # answered yet either, and leave the pool with fresh workers.
                for other in sent[i + 1 :]:
                    if not other.chan.poll_nonblocking():
                        self.pool.kill(other)
                self.pool.ensure_alive()
                raise
            except WorkerGone:
                dead.append(w)
        for w in dead:
            self._died_before_call(w)

    def resume(self, w: Any) -> bool:
        """Set the call up again in ``w``, which ended it early (its END went
        with its first work, ``RpcDispatcher.start``), before it gets more
        work; answered like a pipelined setup (:meth:`receive`).  False if
        ``w`` is dead."""
        try:
            self.setup.send(w)
        except OSError:
            return False
        self.unready[w.slot] = time.monotonic() + self.setup.limit
        return True

    def _died_before_call(self, w: Any) -> Any:
        code = self.pool._reap(w, wait=2.0)
        label = signal_label(code) if code is not None else "unknown status"
        self.diag.event("death", w, f"died before the call started ({label})", code=code)
        return self.replace(w, f"worker died before the call started ({label})", "restart")

    # -- replacing: the one way ---------------------------------------------------------
    def replace(self, w: Any, reason: str, kind: str) -> Any:
        """Stop ``w`` (if alive) and fork a fresh worker into its slot; while
        the call has work left, set the call up in it and hand it to the
        dispatcher.  ``kind``: "restart" (after a death) or "recycle"."""
        for _ in range(REPLACE_ATTEMPTS):
            self._unwatch(w)
            nw = self.pool.replace(w, reason, kind)
            self.ws[nw.slot] = WorkerState()
            self.diag.worker_started(nw)
            self._watch(nw)
            if self.sched.finished():
                return nw
            try:
                self.setup.send(nw)
                self.setup.await_ready(nw, self.pool.kill)
            except CallSetupTimeoutError:
                self.pool.ensure_alive()
                raise
            except (WorkerGone, OSError):
                code = self.pool._reap(nw, wait=2.0)
                label = signal_label(code) if code is not None else "unknown status"
                self.diag.event("death", nw, f"died before the call started ({label})", code=code)
                w, reason, kind = nw, f"worker died before the call started ({label})", "restart"
                continue
            if self.dispatcher is not None:
                self.dispatcher.attach(nw)
            return nw
        raise WorkerSetupError(
            f"worker slot {w.slot}: {REPLACE_ATTEMPTS} fresh workers in a row died before "
            f"the call started (last: {reason}); see the workers' stderr"
        )

    # -- deaths: the one place ----------------------------------------------------------
    def handle_death(self, w: Any, reason: str | None = None, code: int | None = None) -> Any:
        """``w`` died (or was killed for ``reason``): requeue what it held,
        charge what it was running, replace it.  Returns the new worker."""
        assert self.dispatcher is not None
        if code is None:
            code = self.pool._reap(w, wait=2.0)
        st = self.ws[w.slot]
        loss = self.dispatcher.lost(w, reason)
        label = signal_label(code) if code is not None else "?"
        if self.unready.pop(w.slot, None) is not None and reason is None and not self._started(w):
            reason = f"died before the call started ({signal_label(code) if code is not None else 'unknown status'})"
        running = loss.charge[0] if loss.charge else None
        if running is not None:
            log.warning(
                "worker %d (pid %d) %s while running shard %d; %d other shard(s) requeued",
                w.slot,
                w.pid,
                "was killed: " + reason if reason else f"died with {label}",
                running,
                len(loss.requeue),
            )
        retired = code == RETIRE_EXIT and reason is None and st.retiring
        if retired:
            reason = (
                "retired itself: a shard wrote more of a borrowed input inherited at fork "
                "than the page guards can restore"
            )
            self.diag.event("recycle", w, reason)
        else:
            self.diag.event("death", w, reason or f"died with {label}", code=code, shard=running)
        sched = self.sched
        for sid in loss.requeue + loss.charge + loss.completed:
            sched.released(sid)
        for sid in loss.completed:
            sched.record_success(sid, None)
        sched.requeue(loss.requeue)
        for sid in loss.charge:
            sched.record_failure(sid, self.crash_record(w, sid, code, reason), worker=w.slot)
        st.inflight.clear()
        self.dispatcher.requeued()  # survivors start on the requeued shards now
        # A survivor woken for them onto this CPU does not preempt this process (SCHED_BATCH,
        # SHARDC_WORKER_SCHED): let it start before the replacement's fork and setup keep it busy.
        os.sched_yield()
        return self.replace(w, reason or f"worker died with {label}", "recycle" if retired else "restart")

    def crash_record(self, w: Any, sid: int, code: int | None, reason: str | None) -> dict[str, Any]:
        """The error record charged to ``sid`` for ``w``'s death."""
        label = signal_label(code) if code is not None else "unknown status"
        timeout = self.call.timeout
        exc: BaseException
        if reason == "timeout":
            exc = ShardTimeoutError(
                f"shard {sid} ran longer than timeout={timeout:g}s; worker {w.slot} (pid {w.pid}) was killed"
            )
        elif reason == "no progress":
            exc = ShardTimeoutError(
                f"shard {sid} finished, but worker {w.slot} (pid {w.pid}) then made no progress for "
                f"timeout={timeout:g}s outside any shard while reporting it (does pickling its "
                "return value or its exception block?); the worker was killed"
            )
        elif reason and reason.startswith("memory"):
            exc = WorkerMemoryError(
                f"shard {sid}: worker {w.slot} (pid {w.pid}) was killed: {reason.split(':', 1)[1].strip()}"
            )
        else:
            exc = WorkerCrashedError(
                f"worker {w.slot} (pid {w.pid}) died with {label} while running shard {sid}", exitcode=code, pid=w.pid
            )
        return {
            "type": f"shardc.errors.{type(exc).__name__}",
            "message": str(exc),
            "traceback": "",
            "exc": pickle.dumps(exc),
            "deterministic": False,
            "shard": sid,
        }

    # -- memory -----------------------------------------------------------------------------
    def check_memory(self, w: Any, due: bool = False, busy_ns: int | None = None) -> None:
        """Sample ``w`` at a shard boundary, after work that ran ``busy_ns``
        (None: not known): statm (~8 us) unless it cannot have moved
        (:meth:`MemoryModel.unmoved`), a precise sample every
        ``health_check_interval`` shards (or when ``due``) if the last is over
        0.5 s old (and 200x its cost: ``PRECISE_RUN_SHARE``), or whenever
        anonymous memory moved by 8 MiB; decide on
        recycling from the precise one."""
        pool = self.pool
        st = self.ws[w.slot]
        w.busy_unread_ns += BUSY_UNKNOWN if busy_ns is None else busy_ns
        now = time.monotonic()
        if due or st.since_sample >= self.call.health_check_interval:
            st.since_sample = 0
            due = True
        elif self.call.mem_cap is None and now - w.fast_t < STATM_MIN_GAP:
            return  # read under 1 ms ago (replies in a burst), no cap to enforce: nothing new to learn
        # How old the last precise sample may be (none due: any age).
        age = min(PRECISE_MAX_WAIT, max(PRECISE_MAX_AGE, w.precise_cost / PRECISE_RUN_SHARE)) if due else float("inf")
        if now - w.precise_t <= age and pool.unmoved(w, self.call.mem_cap):
            return  # (tiny shards since a recent read: the read could not show a move worth acting on)
        m = pool.sample_cheap(w, max_age=age)
        if m is None:
            return
        self.diag.mem_sample(w, m, anon=pool.footprint(m, w))
        verdict = pool.memory_verdict(w, self.call.mem_cap, self.call.drift, self.call.profile)
        if verdict is not None and st.pending_recycle is None:
            kind, reason = verdict
            # The cap is enforced at the next safe point, always; drift
            # recycling keeps a minimum interval so it cannot thrash.
            if kind == "drift" and time.monotonic() - w.last_recycle < pool.min_recycle_interval:
                if not st.deferred:
                    self.diag.event("defer_recycle", w, reason + " (min recycle interval)")
                    st.deferred = True
                return
            st.pending_recycle = reason
            assert self.dispatcher is not None
            self.dispatcher.recycle(w)

    def recycle_now(self, w: Any) -> Any:
        """Replace ``w`` for its pending recycle (it is at a safe point)."""
        reason = self.ws[w.slot].pending_recycle or "recycle requested"
        log.info("recycling worker %d (pid %d): %s", w.slot, w.pid, reason)
        self.diag.event("recycle", w, reason)
        return self.replace(w, reason, "recycle")

    def watchdog(self) -> None:
        """Timeouts and memory of running shards, stuck workers.

        Reads each status row for which shard runs since when; takes a cheap
        statm sample of every running worker (so a shard that allocates and
        frees within itself still shows in peak memory), and a precise one
        before killing a worker for holding over 2x ``mem_cap``."""
        pool, call = self.pool, self.call
        assert self.dispatcher is not None
        now_ns = time.monotonic_ns()
        now = time.monotonic()
        if self.unready:
            for slot in [s for s in self.unready if self._started(pool.workers[s])]:
                self._answered(pool.workers[slot], None)  # it runs the call's shards: it was set up
            self.setup_overdue(now)
        for w in list(pool.workers):
            if not w.alive or w.slot in self.unready:
                continue  # (a worker setting the call up runs no shard yet)
            row = self.status.read(w.slot)
            if row.state != STATE_RUNNING:
                if self.dispatcher.stalled(w, row, now):
                    pool.kill(w)
                    self.handle_death(w, reason="no progress", code=w.exitcode)
                continue
            if (now_ns - row.start_ns) * 1e-9 > call.timeout:
                pool.kill(w)
                self.handle_death(w, reason="timeout", code=w.exitcode)
                continue
            fast = pool.fast_sample(w)
            if fast is None:
                continue
            if call.diagnostics:
                self.diag.mem_sample(w, fast, anon=pool.footprint(fast, w))
            cap = call.mem_cap
            if cap is not None and fast["anon"] > 2 * cap:
                m = pool.sample(w)  # confirm with the precise number before killing
                if m is not None and pool.footprint(m, w) > 2 * cap:
                    self.diag.mem_sample(w, m, anon=pool.footprint(m, w))
                    why = f"memory: {fmt_bytes(pool.footprint(m, w))} > 2x mem_cap {fmt_bytes(cap)} inside a shard"
                    pool.kill(w)
                    self.handle_death(w, reason=why, code=w.exitcode)

    # -- the loop ---------------------------------------------------------------------------
    def progress_update(self, refresh: bool = False) -> None:
        s = self.sched
        self.bar.update(s.completed + s.n_failed, s.n_failed, s.retries_total, refresh=refresh)

    def _watch(self, w: Any) -> None:
        if self.sel is not None:
            # A worker killed elsewhere (a failed send) has its socket closed
            # while still registered; its fd number can come back with this
            # worker's socket: drop the stale registration first.
            stale = self.sel.get_map().get(w.chan.sock.fileno())
            if stale is not None:
                _unregister(self.sel, stale.fileobj)
            self.sel.register(w.chan.sock, selectors.EVENT_READ, w.slot)

    def _unwatch(self, w: Any) -> None:
        if self.sel is not None:
            _unregister(self.sel, w.chan.sock)

    def _selector(self) -> selectors.BaseSelector:
        """The pool's selector, kept across calls (an epoll set up and torn
        down per call cost ~20 us), watching exactly its current workers'
        sockets: those of workers replaced since the last call are dropped."""
        pool = self.pool
        sel: selectors.BaseSelector | None = pool.selector
        if sel is None:
            sel = pool.selector = selectors.DefaultSelector()
        self.sel = sel
        slots = {w.chan.sock: w.slot for w in pool.workers}
        for key in list(sel.get_map().values()):
            if slots.get(key.fileobj) != key.data:
                _unregister(sel, key.fileobj)
        watched = sel.get_map()
        for w in pool.workers:
            if w.chan.sock not in watched:
                self._watch(w)
        return sel

    def receive(self, w: Any) -> list[tuple[Any, list[int]]] | None:
        """Messages waiting from ``w``; None if it died (the caller handles the death).
        A pipelined setup's READY is taken here (see :meth:`setup_all`)."""
        before = w.chan.bytes_received
        try:
            msgs: list[tuple[Any, list[int]]] = w.chan.recv_ready()
        except (ChannelClosed, ConnectionError):
            return None
        except OSError as exc:
            # EBADF: ``w`` was killed (its socket closed, see Pool.kill) after the
            # select that returned its event, while an earlier event of the same
            # batch was handled (a failed send).  Anything else is not a death.
            if exc.errno == errno.EBADF or not w.alive:
                return None
            raise
        self.diag.bytes_results += w.chan.bytes_received - before
        if w.slot in self.unready:
            for i, (m, _fds) in enumerate(msgs):
                if m[0] == READY and m[1] == self.call.call_id:
                    self._answered(w, m)  # raises WorkerSetupError for an error
                    return msgs[:i] + msgs[i + 1 :]
                if m[1] == self.call.call_id:  # the work behind its CALL answered for it (see Worker.loop)
                    self._answered(w, None)
                    break
        return msgs

    def _answered(self, w: Any, reply: tuple[Any, ...] | None) -> None:
        """``w`` answered a pipelined setup: its READY ``reply``, or None when
        it skipped READY (its first work followed) and a later message or its
        status row shows it set up."""
        del self.unready[w.slot]
        self.setup.answered(w, reply if reply is not None else (READY, self.call.call_id, None))
        self.ws[w.slot].last_msg = time.monotonic()  # its no-progress clock starts now

    def _started(self, w: Any) -> bool:
        """``w`` started a shard since this call's setup was sent (its status row)."""
        row = self.status.read(w.slot)
        return bool(row.start_ns >= self.setup_ns)

    def setup_overdue(self, now: float) -> None:
        """A pipelined setup not answered by its deadline: kill the workers
        still setting up (and replace them) and fail the call, as
        :meth:`CallSetup.await_ready` does."""
        late = [slot for slot, due in self.unready.items() if now > due]
        if not late:
            return
        first = self.pool.workers[late[0]]
        exc = self.setup.overdue(first, self.pool.kill)
        for slot in list(self.unready):
            w = self.pool.workers[slot]
            self._unwatch(w)
            if w is not first:
                self.pool.kill(w)
        self.unready.clear()
        self.pool.ensure_alive()
        raise exc

    def run(self, dispatcher: Dispatcher) -> None:
        """Run the call to the end with ``dispatcher``."""
        self.dispatcher = dispatcher
        pool = self.pool
        self.sel = sel = self._selector()
        wake = self.call.wake
        try:
            if wake is not None:
                sel.register(wake, selectors.EVENT_READ, None)
            if self.unready:
                self._start_pipelined(dispatcher)
            else:
                dispatcher.start()
            self.diag.sample_start(pool)  # (while the workers wake up)
            timeout = self.call.timeout
            tick = 0.05 if timeout > 0.2 else timeout / 4
            next_tick = time.monotonic() + tick
            while not dispatcher.finished():
                wait = min(dispatcher.poll_interval, next_tick - time.monotonic())
                for key, _ in sel.select(timeout=max(0.0, wait)):
                    if key.data is None:  # an open call was fed (or closed)
                        wake.drain()
                        dispatcher.requeued()
                        continue
                    w = pool.workers[key.data]
                    if key.fileobj is not w.chan.sock:
                        continue  # a replaced worker's stale event
                    msgs = self.receive(w)
                    if msgs is None:
                        self.handle_death(w)
                    elif msgs:  # (nothing for the dispatcher: a READY, a frame's first part)
                        dispatcher.on_messages(w, msgs)
                dispatcher.after_poll()
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick
                    self.watchdog()
                    for w in list(pool.workers):
                        if not w.alive:
                            self.handle_death(w)
                    dispatcher.on_tick()
                    self.diag.tick()
                    self.progress_update()
            for slot in list(self.unready):  # lost while setting up a call that ended without it
                if not pool.is_alive(pool.workers[slot]):
                    self.handle_death(pool.workers[slot], code=pool.workers[slot].exitcode)
            dispatcher.drain()
        except KeyboardInterrupt:
            self.interrupted()
            raise
        finally:
            if wake is not None:
                _unregister(sel, wake)
            self.sel = None

    def _start_pipelined(self, dispatcher: Dispatcher) -> None:
        """A pipelined setup (see :meth:`setup_all`): each worker's CALL and
        its first work in one write."""
        corked, failed = [], []
        self.setup_ns = time.monotonic_ns()
        try:
            for w in list(self.pool.workers):
                w.chan.cork()
                corked.append(w)
                self.setup.send(w)
            dispatcher.start()
        finally:
            for w in corked:
                try:
                    w.chan.uncork()
                except OSError:
                    failed.append(w)
                    self.pool.kill(w)  # dead, or its socket unwritable
        for w in failed:  # a death before the call started: its work requeued, a fresh worker set up
            self.handle_death(w, code=w.exitcode)

    def interrupted(self) -> None:
        """Ctrl-C (``KeyboardInterrupt``) in the caller during the run: stop
        every worker's current shard now.  The workers hold the call's work
        (chunks sent, ring blocks) and would run on, so the next call would
        wait for them: each is killed and replaced by a fresh worker (not set
        up for this call), and the pool serves the next call at once."""
        for w in list(self.pool.workers):
            self._unwatch(w)
            if w.alive:
                self.pool.kill(w)
            self.diag.event("death", w, "killed: KeyboardInterrupt in the caller", code=w.exitcode)
            self.pool.replace(w, "the call was interrupted (KeyboardInterrupt in the caller)", "restart")
