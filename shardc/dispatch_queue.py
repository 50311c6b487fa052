"""``dispatch_mode="shm_queue"``: workers pull blocks of shard ids from a
shared-memory ring (``shardc.queue.TaskRing``, futex-parked, crash-repairable).
This is the master's half; the worker's is ``shardc.worker.queue_loop``.

The ring belongs to the pool (:func:`pool_ring`): created by the first
shm_queue call, laid out afresh by each later one (no worker is inside it
then: each answered the call's setup, which it reads only after leaving the
previous call's ring), and handed to every worker with a ``QUEUE`` message;
a worker keeps its mapping across calls.  An item is a block of consecutive
shard ids, encoded as ``start << 24 | count``.  The master keeps a few blocks
per worker in the ring and sizes blocks online: probe blocks first, growing
while the workers run through each round of them in less than the target
(:meth:`QueueFeeder.ramp`), then blocks of about ``target_chunk_seconds`` of
work, shrinking at the end so the last blocks spread over all workers.

Nobody waits out a poll interval: a worker that finds the ring empty says so
once (``QIDLE``) before it parks, which wakes the master's loop at once to
top the ring up, or to see that the call is over (with a 2 ms poll before,
a 100-shard call took 10 ms, almost all of it workers waiting).

Workers write only to ``out=`` buffers: return values are not gathered (each
``results`` entry is None), failures are.  Progress needs no message per
shard: each worker counts finished shards in its status row (``done``) and
names the shard it is running (``current`` since ``start_ns``; C accessors,
``shardc.status``), which is all the supervisor needs:

* **exception** -> the worker sends a ``QFAIL`` record; the scheduler requeues
  the shard as a one-shard block (or fails it: deterministic, or out of retries);
* **death** -> :meth:`QueueDispatcher.lost`: ``ring.repair(slot, reaped_pid)``
  returns the dead worker's claimed blocks; ids the done map marks are done,
  the running one is charged an attempt, the rest are requeued free (a
  worker lost inside a speculative run, ``run_n`` > 1 in its row, charges
  none: the run's ids come back as one-id blocks, ``Scheduler.careful``);
* **timeout / memory** -> the supervisor's watchdog kills the worker: a death;
* **recycle** -> the row's exit request asks the worker to leave after its
  current block (``QDONE`` with ``exiting``); the supervisor replaces it and
  the fresh worker joins the same ring.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
import weakref
from typing import Any, cast

import numpy as np

from .dispatch import Dispatcher, Loss
from .errors import QueueClosedError
from .protocol import END, QCOW, QDONE, QFAIL, QIDLE, QUEUE, fun_key
from .queue import TaskRing
from .scheduler import Scheduler
from .status import STATE_RUNNING, DoneMap, RowSnapshot, StatusTable
from .supervisor import Supervisor
from .values import close_fds
from .worker.queue_loop import COUNT_BITS, COUNT_MASK, MAX_BLOCK, encode  # the ring item format

log = logging.getLogger("shardc")

PROBE_BLOCK = 8  # shards per block before anything is measured
RAMP = 64  # a round of blocks the workers ran through quickly grows blocks at most this much
SMALL_CALL = 64  # shards per worker up to which the first feed pushes the whole call
RING_CAPACITY = 1024
# A call of the same fun as the pool's last shm_queue call, whose shard time then says this one is
# at most this much work per worker, goes in whole at once in equal blocks, 2 per worker (QueueFeeder).
WHOLE_CALL_S = 0.002
# A call at most this much longer than the last figure said (a preemption as likely as slower
# shards) keeps that figure once; a second in a row replaces it.
PREEMPT_S = 0.010
_last: weakref.WeakKeyDictionary[Any, tuple[tuple[int, int], float, bool]] = weakref.WeakKeyDictionary()
_ring_serial = itertools.count(1)


def pool_ring(pool: Any, workers: int, backing: str) -> tuple[TaskRing, str]:
    """The pool's task ring, empty and open for a new call, and its token.

    Created once per pool (and backing) and kept on ``pool.queue_ring``;
    every later call lays a fresh ring over the same memory
    (:meth:`TaskRing.reset`), which is safe because no worker is inside it:
    a worker reads the call's setup only after leaving the previous call's
    ring, and the caller has every worker's answer to it.  Workers keep
    their mapping of a ring they know by its token (no map and unmap per
    call).  ``Pool.stop`` releases it."""
    held = getattr(pool, "queue_ring", None)
    if held is not None:
        ring, token, kind = held
        if kind == backing and not ring.released and ring.max_consumers == workers:
            ring.reset()
            return ring, token
        ring.release()
        pool.queue_ring = None
    ring = TaskRing.create(capacity=RING_CAPACITY, max_consumers=workers, backing=backing)
    token = f"{os.getpid()}-{next(_ring_serial)}"
    pool.queue_ring = (ring, token, backing)
    return ring, token


class QueueFeeder:
    """Cuts the remaining shard ids into blocks and keeps the ring supplied."""

    def __init__(
        self,
        sched: Scheduler,
        diag: Any,
        ring: Any,
        workers: int,
        block_size: int | None,
        autotune: dict[str, Any] | None,
        known_s: float | None = None,
    ) -> None:
        self.sched = sched
        self.diag = diag
        self.ring = ring
        self.workers = workers
        self.fixed = int(block_size) if block_size else None
        self.autotune = autotune
        # Probe blocks are small (a retry never waits behind a long untuned
        # block); rounds of them that the workers finish quickly grow them
        # (ramp), and the first 20 ms window of throughput sizes the rest.
        self.block = self.fixed or (PROBE_BLOCK if autotune else max(1, min(4096, sched.num // (workers * 8) or 1)))
        self.tuned = self.fixed is not None or not autotune
        # Shards known to be tiny (``known_s`` s each, the same fun's last call): no probes, no tail.
        self.whole = bool(autotune and not self.fixed and known_s and sched.num * known_s <= WHOLE_CALL_S * workers)
        if self.whole:
            self.block, self.tuned = max(1, -(-sched.num // (2 * workers))), True
        self.win_t: float | None = None
        self.win_done = 0
        self.rounds = 0
        self.pushed_blocks = 0
        self.t_first: float | None = None  # when the first block went in (the ramp's clock)
        self.dry = False  # a worker found the ring empty since the last feed (QIDLE)

    def retune(self, done: int) -> None:
        """Aim at ~target seconds of work per block, from the throughput
        measured over windows of >= 20 ms (the first window starts when the
        first shard is done, so pool wake-up does not count as work)."""
        if self.fixed is not None or not self.autotune:
            return
        sched = self.sched
        now = time.monotonic()
        if self.win_t is None:
            if done > 0:
                self.win_t, self.win_done = now, done
            return
        dt = now - self.win_t
        if dt < 0.02 or done <= self.win_done:
            return
        per_shard = dt * self.workers / (done - self.win_done)
        self.win_t, self.win_done = now, done
        sched.observe(per_shard, weight=0.5)
        ewma = sched.ewma_shard_s
        assert ewma is not None
        target = float(self.autotune["target_chunk_seconds"])
        new = int(max(1, min(MAX_BLOCK, target / max(ewma, 1e-8))))
        if abs(new - self.block) * 4 > self.block and self.rounds < int(self.autotune.get("max_rounds", 64)):
            self.diag.autotune_step(self.block, new, ewma)
            sched.chunk = new
            self.block = new
            self.rounds += 1
        self.tuned = True

    def _retry_items(self, limit: int) -> list[int]:
        """Requeued ids as blocks: consecutive ids (the rest of a dead
        worker's block) travel together, up to the current block size."""
        retry = self.sched.retry
        careful = self.sched.careful  # ids lost in a speculative run: alone, one-id blocks
        items: list[int] = []
        while retry and len(items) < limit:
            start = retry.popleft()
            count = 1
            if careful and start in careful:
                careful.discard(start)
                items.append(encode(start, 1))
                continue
            while retry and retry[0] == start + count and count < max(1, self.block) and retry[0] not in careful:
                retry.popleft()
                count += 1
            items.append(encode(start, count))
        return items

    def ramp(self, done: int) -> None:
        """Before the first window is measured: the workers ran through
        every block handed out (the ring ran dry) and ``done`` shards took
        less than the target per block, so blocks grow, up to ``RAMP``-fold
        per round, towards ``target_chunk_seconds`` of work.  The estimate
        counts the time since the first block went in, workers' wake-ups
        included, so it errs towards small blocks; slow shards (a block of
        probes over the target) never grow here."""
        if self.tuned or self.autotune is None or self.t_first is None or done <= 0:
            return
        per_shard = (time.monotonic() - self.t_first) * self.workers / done
        target = float(self.autotune["target_chunk_seconds"])
        if per_shard * self.block >= target or self.rounds >= int(self.autotune.get("max_rounds", 64)):
            return
        new = int(min(MAX_BLOCK, self.block * RAMP, max(self.block, target / max(per_shard, 1e-8))))
        if new > self.block:
            self.diag.autotune_step(self.block, new, per_shard)
            self.sched.chunk = new
            self.block = new
            self.rounds += 1

    def feed(self, done: int = 0) -> None:
        """Top the ring up to ~2 blocks per worker.  Retries go in first and
        regardless of that mark, so a retried shard waits behind as little
        as possible (this also runs right after a death, before the
        replacement worker is forked).  ``done``: shards finished so far
        (for the ramp, when the ring ran dry)."""
        sched = self.sched
        if sched.pending_count() == 0:
            return
        size = self.ring.size()
        if size == 0 and self.dry:
            self.ramp(done)
        self.dry = False
        items = self._retry_items(max(0, self.ring.capacity - size))
        cap = self.ring.capacity - size - len(items)
        room = 2 * self.workers - size - len(items)
        if self.whole or not self.tuned and self.t_first is None and sched.pending_count() <= SMALL_CALL * self.workers:
            # A small call goes in whole, in probe blocks: no round trip to
            # the master for the rest (a retry waits at most behind the call).
            room = cap
        fresh = 0
        while fresh < cap:
            pending = sched.pending_count()
            if pending == 0:
                break
            # Shrink blocks at the end so the tail spreads over every worker
            # (rounded up: the blocks that fit in the ring cover what is left).
            cover = self.block if self.whole else -(-pending // (2 * self.workers))
            if fresh >= room and cover >= self.block:
                break
            # Past the mark only the tail goes in, whole: less than 2 full
            # blocks per worker in ever smaller blocks, so a retry waits
            # behind no more work than usual, and the last shards need no
            # further round trips to the master.
            if sched.retry:  # (not after _retry_items took them all, unless the ring is full)
                ids = sched.take_chunk(min(self.block, max(1, cover)))
                items.append(encode(ids[0], len(ids)))
            else:
                start, count = sched.take_fresh(min(self.block, max(1, cover)))
                items.append(encode(start, count))
            fresh += 1
        if items:
            try:
                n = self.ring.push(np.asarray(items, dtype=np.uint64), timeout=0)
            except QueueClosedError:
                # A worker closes the ring once every shard is done, so this
                # cannot happen while anything is pending; if it ever did, the
                # ids go back and the master's done map check ends the call.
                n = 0
            if n < len(items):  # ring full: give back what did not fit
                for it in reversed(items[n:]):
                    start, count = it >> COUNT_BITS, it & COUNT_MASK
                    sched.put_back(list(range(start, start + count)))
            if self.t_first is None and n:
                self.t_first = time.monotonic()
            self.pushed_blocks += n
            self.diag.dispatched(8 * n, n)


class QueueDispatcher(Dispatcher):
    """Blocks through the shared ring (see the module docstring)."""

    poll_interval = 0.002  # progress is read from shared counters, not messages

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.call = call = sup.call
        self.sched: Scheduler = sup.sched
        self.diag = sup.diag
        self.pool = pool = sup.pool
        self.status: StatusTable = pool.status
        self.ws = sup.ws
        self.call_id = call.call_id
        opts = call.opts
        backing = opts.get("queue_backing", "memfd")
        backing = {"mmap": "memfd", "auto": "memfd"}.get(backing, backing)
        n = len(pool.workers)
        self.ring, self.ring_token = pool_ring(pool, n, backing)
        assert call.donemap is not None
        self.done: DoneMap = call.donemap  # the call's done map (closed with the call)
        self.fun_key = fun_key(call.fun_blob)
        known = _last.get(pool)
        per = known[1] if known is not None and known[0] == self.fun_key else None
        self.feeder = QueueFeeder(self.sched, self.diag, self.ring, n, opts.get("block_size"), self.sched.autotune, per)
        self.done_base = 0  # finished-shard counts of workers that are gone
        self.queued_pids: set[int] = set()  # workers handed the ring (each sends QDONE)
        self.left_pids: set[int] = set()  # workers that sent QDONE (left the ring)
        self.returned = 0  # shards whose non-None return value was dropped
        self.reported: dict[int, set[int]] = {}  # worker pid -> shards whose failure it reported
        self.progress: dict[int, tuple[tuple[int, ...], float]] = {}
        self.last_done = 0
        self.tick_due = False
        self.closed = False
        self.all_left = False

    # -- handing out work -------------------------------------------------------------
    def _error_log_path(self, w: Any) -> str:
        path = os.path.join(tempfile.gettempdir(), f"shardc-errors-{os.getpid()}-call{self.call_id}-w{w.slot}.log")
        self.diag.error_logs.append(path)
        return path

    def attach(self, w: Any) -> None:
        """Hand ``w`` the ring."""
        opts = self.call.opts
        self.status.set_call(w.slot, self.call_id)
        self.queued_pids.add(w.pid)
        msg = {
            "call_id": self.call_id,
            "ring": self.ring_token,
            "nbytes": self.ring.nbytes,
            "num": self.sched.num,
            "claim_batch": int(opts.get("claim_batch", 1)),
            "error_log": self._error_log_path(w) if opts.get("error_log") else None,
            "error_log_max_lines": int(opts.get("error_log_max_lines", 100)),
        }
        # The fd only to a process without this ring mapped (workers keep it between calls,
        # shardc.worker.queue_loop): an fd passed costs both sides syscalls (SCM_RIGHTS).
        held = getattr(w, "ring_held", None) == (w.pid, self.ring_token)
        self.diag.bytes_setup += w.chan.send((QUEUE, msg), [] if held else [self.ring.fd])
        w.ring_held = (w.pid, self.ring_token)
        # Its END too (nothing else goes to it in this call; read when it leaves the ring): no wake-up at the end.
        w.chan.send((END, self.call_id))
        w.call_ended = True

    def start(self) -> None:
        for w in self.pool.workers:
            self.status.take_done(w.slot)  # counts start at 0 each call
        # Blocks first: a worker's first pop finds work instead of parking (a wake-up: 50-85 us).
        self.feeder.feed()
        for w in self.pool.workers:
            self.attach(w)
        # The ramp's clock starts when the workers can start (sending QUEUE
        # to sleeping workers costs the master ~0.1 ms each here).
        if self.feeder.t_first is not None:
            self.feeder.t_first = time.monotonic()

    def requeued(self) -> None:
        self.feeder.feed()  # retries enter the ring before a replacement is forked

    def done_total(self) -> int:
        return self.done_base + self.status.done_total()

    # -- messages -------------------------------------------------------------------------
    def _report(self, w: Any, m: tuple[Any, ...]) -> None:
        """A failed shard (QFAIL) or a shard's writes into borrowed inputs (QCOW)."""
        if m[0] == QCOW:
            self.diag.cow_events(*m[2])
            return
        sid, _ok, rec, _t0, _t1, events, _dm = m[2]
        self.reported.setdefault(w.pid, set()).add(sid)
        if events:
            self.diag.cow_events(sid, events)
        self.sched.record_failure(sid, rec, worker=w.slot)

    def _qdone(self, w: Any, payload: dict[str, Any]) -> None:
        self.left_pids.add(w.pid)
        for b in payload["blocks"]:
            self.diag.block_done(w.slot, *b)
        for start, count, delta in payload.get("mem", ()):
            self.diag.block_mem_delta(w.slot, start, count, delta)
        self.returned += payload.get("returned", 0)

    def on_messages(self, w: Any, msgs: list[tuple[Any, list[int]]]) -> None:
        for m, fds in msgs:
            close_fds(fds)  # only a stale rpc RESULTS carries fds (big values): nobody will read them
            if m[1] != self.call_id:
                continue
            if m[0] == QIDLE:
                self.feeder.dry = True  # the loop goes on to after_poll: refill, or see the end
            elif m[0] in (QFAIL, QCOW):
                self._report(w, m)
            elif m[0] == QDONE:
                self._qdone(w, m[2])
                if m[2]["exiting"]:
                    self._left(w, m[2])
                    return

    def _left(self, w: Any, payload: dict[str, Any]) -> None:
        """``w`` left the ring (recycle requested, or it retires): requeue
        what it claimed and did not run, and replace it."""
        done, sched = self.done, self.sched
        sched.requeue([sid for sid in payload.get("unfinished", ()) if not done.get(sid)])
        if payload.get("retire"):
            self.ws[w.slot].pending_recycle = "a shard wrote more of an input inherited at fork than can be restored"
        self.done_base += self.status.take_done(w.slot)
        self.pool._reap(w, wait=2.0)
        self.sup.recycle_now(w)

    def after_poll(self) -> None:
        done = self.done_total()
        if done != self.last_done:
            self.feeder.retune(done)
            self.last_done = done
        self.feeder.feed(done)
        self.sched.completed = done

    def on_tick(self) -> None:
        self.tick_due = True
        for w in self.pool.workers:  # a running worker is making progress: its stall clock restarts
            if self.progress and self.status.read(w.slot).state == STATE_RUNNING:
                self.progress.pop(w.slot, None)
        for w in list(self.pool.workers):
            if w.alive and self.ws[w.slot].pending_recycle is None:
                self.sup.check_memory(w, due=True)
        self.sched.completed = self.done_total()

    def finished(self) -> bool:
        sched = self.sched
        if self.done_total() + sched.n_failed < sched.num:
            # The counters can stay one short for good (a worker killed
            # between marking a shard done and counting it): once all work
            # is handed out, ask the done map every tick.
            if not self.tick_due or sched.pending_count() or self.ring.size():
                return False
            self.tick_due = False
        # The counters are a hint; the done map is the truth.
        exact = self.done.count()
        if exact + sched.n_failed >= sched.num:
            sched.completed = exact
            return True
        return False

    # -- supervision hooks ----------------------------------------------------------------
    def recycle(self, w: Any) -> None:
        self.status.request_exit(w.slot)  # it leaves after its current block (QDONE exiting)

    def stalled(self, w: Any, row: RowSnapshot, now: float) -> bool:
        """Holds ring claims, runs no shard, and shows no progress (ring
        heartbeat, done count, current shard) for ``timeout`` seconds: stuck
        outside any shard, e.g. pickling an error report that blocks."""
        info = self.ring.consumer_info(w.slot)
        if not info["claimed"]:
            self.progress.pop(w.slot, None)
            return False
        sig = (cast(int, info["heartbeat"]), row.done, row.current, w.pid)
        seen = self.progress.get(w.slot)
        if seen is None or seen[0] != sig:
            self.progress[w.slot] = (sig, now)
            return False
        if now - seen[1] > self.call.timeout:
            self.progress.pop(w.slot, None)
            return True
        return False

    def lost(self, w: Any, reason: str | None) -> Loss:
        row = self.status.read(w.slot)
        done = self.done
        # A worker killed for making no progress was stuck after its current
        # shard (e.g. pickling that shard's error report): that shard is the
        # one charged, as if it were still running.
        current = row.current if row.state == STATE_RUNNING or reason == "no progress" else None
        self.done_base += self.status.take_done(w.slot)
        claimed = [int(x) for x in self.ring.repair(w.slot, w.pid)]  # w was reaped: its pid may be reused
        charged = None
        if current is not None and any(
            (it >> COUNT_BITS) <= current < (it >> COUNT_BITS) + (it & COUNT_MASK) for it in claimed
        ):
            charged = current
        if charged is not None and done.get(charged):
            charged = None  # killed after marking it done, before leaving RUNNING
        if charged is not None and row.state == STATE_RUNNING and row.run_n > 1:
            # Lost inside a speculative run (shardc.worker.spec): any of its ids may be the
            # one that crashed or hung, none is marked.  Charge none; they come back as
            # one-id blocks (careful: per-shard status), where a crash is charged to one.
            self.sched.careful.update(range(charged, charged + row.run_n))
            charged = None
        # In the block it was running, the ids before the current one failed
        # and were reported (their retry is the scheduler's already), unless
        # the report died unread with the worker (a watchdog kill closes the socket).
        skip = self.reported.pop(w.pid, set())
        requeue = []
        for it in claimed:
            start, stop = it >> COUNT_BITS, (it >> COUNT_BITS) + (it & COUNT_MASK)
            cur = -1 if current is None else current
            running = current is not None and (start, stop - start) == (row.block0, row.blockn) and start <= cur < stop
            requeue += [
                sid
                for sid in range(start, stop)
                if sid != charged and not done.get(sid) and not (running and sid < cur and sid in skip)
            ]
        self.progress.pop(w.slot, None)
        return Loss(requeue, [charged] if charged is not None else [], [])

    # -- the end ------------------------------------------------------------------------
    def drain(self) -> None:
        """Close the ring and collect every worker's QDONE (block timings), with a deadline."""
        self.ring.close()
        sched, t_first = self.sched, self.feeder.t_first
        if t_first is not None and not sched.retries_total and not sched.n_failed and sched.num:
            # The shard time (wall since the first block, wake-ups included: an upper bound) for
            # the next call of this fun on this pool (WHOLE_CALL_S; a first small rise: PREEMPT_S).
            n, prev = len(self.pool.workers), _last.get(self.pool)
            per = (time.monotonic() - t_first) * n / sched.num
            once = prev and prev[0] == self.fun_key and not prev[2] and 0 < per - prev[1] < PREEMPT_S * n / sched.num
            _last[self.pool] = (self.fun_key, prev[1], True) if once and prev else (self.fun_key, per, False)
        deadline = time.monotonic() + 5.0
        # A replacement forked after the last shard finished never got the
        # ring: waiting for its QDONE would only run out the deadline.
        # A worker that saw every shard done has left already (QDONE read).
        waiting = {
            w.slot for w in self.pool.workers if w.alive and w.pid in self.queued_pids and w.pid not in self.left_pids
        }
        sel = self.sup.sel
        assert sel is not None
        while waiting and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.05):
                w = self.pool.workers[key.data]
                msgs = self.sup.receive(w)
                if msgs is None:
                    waiting.discard(w.slot)
                    continue
                for m, fds in msgs:
                    close_fds(fds)
                    if m[1] != self.call_id:
                        continue
                    if m[0] == QDONE:
                        self._qdone(w, m[2])
                        waiting.discard(w.slot)
                    elif m[0] in (QFAIL, QCOW):
                        self._report(w, m)
        self.sched.completed = self.done.count()
        self.all_left = not waiting  # every worker handed the ring left it (QDONE): see quiet
        if self.returned:
            log.warning(
                "dispatch_mode='shm_queue' gathers no return values, but %d shard(s) returned "
                "one: write results into out= buffers, or use dispatch_mode='rpc_chunked'",
                self.returned,
            )
            self.diag.returned_ignored = self.returned

    def quiet(self) -> bool:
        return self.all_left

    def close(self) -> None:
        """Close the ring (also when the call failed): workers still in it
        leave once they have run what is left.  The pool keeps the ring for
        its next shm_queue call (``pool_ring``)."""
        if self.closed:
            return
        self.closed = True
        # The call is over: a later rpc_chunked call attributes a death to the
        # running shard only while the row's call is 0 or its own id.
        self.status.clear_calls()
        if not self.ring.released:
            self.ring.close()
