"""``dispatch_mode="rpc_chunked"``: chunks of shard ids over per-worker sockets.

The master sends ``(RUN, call_id, ids)`` messages to each worker and keeps
several chunks queued per worker (``depth``), so a worker never waits for the
master; the worker runs them and replies with one ``RESULTS`` message of
:class:`shardc.protocol.Outcome` per few chunks (values pickled one by one).
Return values are gathered into the result.  A call with a value sink
(``Call.value_sink``, e.g. the tables' ``auto_table``) has its workers commit it
before each RESULTS, whose 4th item is then the commit record: the sink's
master side gets it before the outcomes are recorded, and a worker that dies
before reporting had committed nothing of the shards it held (they rerun).

Short shards come back as frames (``shardc.protocol.FRAME``: a run of OK
shards' values), applied with slice stores (``Scheduler.record_run``,
``Diagnostics.frame_done``), not a Python loop per shard.

What a dead worker held (:meth:`RpcDispatcher.lost`): its in-flight ids.  A
worker lost inside a speculative run (row RUNNING with ``run_n`` > 1, see
``shardc.worker.spec``) is charged nothing: the run's ids go to
``Scheduler.careful`` and rerun in ``RUN_CAREFUL`` chunks, one shard at a
time.  Otherwise the one it was running (status row) is charged; ids the done map marks finished
with no value (1) count as done; the rest are requeued free.  A worker killed
for making no progress outside any shard was stuck reporting: the shard whose
value it was pickling (``sending`` in its row) is charged, or, if it was stuck
elsewhere, every finished shard whose value was in transit, so a result that
cannot be sent fails after its retries instead of looping.
"""

from __future__ import annotations

import pickle
import time
from typing import Any

from .dispatch import Dispatcher, Loss
from .errors import ShardcOSError
from .protocol import (
    END,
    ERR,
    FRAME,
    OK,
    OK_PICKLED,
    OK_SEGMENT,
    RESULTS,
    RETURNED,
    RUN,
    RUN_CAREFUL,
    PickledValue,
    error_record,
)
from .scheduler import Scheduler
from .status import DoneMap, RowSnapshot
from .supervisor import Supervisor
from .values import close_fds
from .values import unpack as unpack_value

SEND_FAILURES_MAX = 8  # consecutive failed sends (each retires a worker) before the call fails


def _unpacked(r: tuple[Any, ...], fds: list[int]) -> tuple[Any, ...]:
    """Outcome ``r`` with its segment-borne array mapped (its fd closed either way); an array the
    master cannot map (ENOMEM, ...) fails that attempt like any error, and is retried."""
    try:
        return (r[0], OK, unpack_value(fds[r[2][0]], r[2][1]), *r[3:])
    except OSError as exc:
        return (r[0], ERR, error_record(exc, r[0], deterministic=False), *r[3:])


# Ids in flight per worker, at most (one chunk more if a chunk is bigger): the
# RUN bytes a worker has not read yet (~5 bytes an id) stay well under a unix
# socket's buffer (~208 KiB), so the master's blocking send never waits on a
# worker that is itself blocked sending its RESULTS to the master.  Without
# the cap, 10 ns native shards (chunk 4096, depth 40: 800 KiB of RUN) made
# both block in send for good.
MAX_INFLIGHT_IDS = 16384

# A call of at most this many chunks per worker goes out whole in the first
# round (see RpcDispatcher.start).
SMALL_CALL_CHUNKS = 8


class RpcDispatcher(Dispatcher):
    """Chunks over sockets (see the module docstring)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.call = sup.call
        self.sched = sup.sched
        self.diag = sup.diag
        self.pool = sup.pool
        self.ws = sup.ws
        self.call_id = self.call.call_id
        assert self.call.donemap is not None
        self.done: DoneMap = self.call.donemap
        self.prefetch = self.call.opts.get("prefetch")
        t = self.call.timeout
        self.poll_interval = 0.05 if t > 0.2 else t / 4
        self.send_failures = 0  # in a row: a send that keeps failing fails the call
        self.share = 0  # ids per worker in a small call's first round (start), else 0

    # -- handing out work -------------------------------------------------------------
    def depth(self) -> int:
        """Chunks kept queued per worker."""
        if self.prefetch is not None:
            return int(self.prefetch)
        # One chunk running and one waiting is enough for long shards; tiny
        # ones need more queued so a worker never waits for the master's next
        # message and replies cover many shards: hold ~2 ms of work (at most
        # 64 chunks), which costs nothing in balance at the end of the run.
        s = self.sched.ewma_shard_s
        if s is None:
            return 2
        per_chunk = max(s * self.sched.chunk, 1e-6) + 10e-6  # + worker overhead per chunk
        return max(2, min(64, int(0.002 / per_chunk)))

    def fill(self, w: Any) -> None:
        """Top ``w``'s queue of chunks up to ``depth``."""
        st = self.ws[w.slot]
        sched = self.sched
        if st.pending_recycle is not None or not w.alive or not sched.pending_count():
            return  # (nothing to send: the usual case at the end of a call)
        if w.call_ended and (st.inflight or not self.sup.resume(w)):
            return  # (more after it reported its share; dead: its EOF brings the loop to the death handler)
        size = sched.chunk_size(len(self.ws))
        if not st.inflight:
            st.last_msg = time.monotonic()  # its no-progress clock starts with this dispatch
        batch: list[Any] = []
        limit = self.share or min(size * self.depth(), max(size, MAX_INFLIGHT_IDS))
        while len(st.inflight) < limit and sched.pending_count():
            ids = sched.take_chunk(min(size, limit - len(st.inflight)))
            if not ids:
                break  # an open call's fed tasks were all cancelled (shardc.stream)
            if not sched.admit(ids):
                break  # huge-kernel throttle: wait for a huge chunk to finish
            st.inflight.add(ids)
            tag = RUN_CAREFUL if sched.careful and not sched.careful.isdisjoint(ids) else RUN
            td = sched.task_data(ids)
            if td is None:
                # Fresh ids only (no retry among them): a range, a few bytes, not a list of
                # ~5 bytes an id (a big chunk's RUN could fill the socket and block this send);
                # a list below 9 ids is smaller than a range's pickle.
                fresh = len(ids) > 8 and isinstance(ids, range)
                batch.append((tag, self.call_id, ids if fresh else list(ids)))
                continue
            data, segs, shared = td
            if not shared:
                batch.append((tag, self.call_id, ids, data))
                continue
            # Segments the worker lacks go with this message as fds (SCM_RIGHTS).
            new = [s for s in segs if s.key not in w.known]
            infos = [{"key": s.key, "size": s.size, "backing": s.backing, "name": s.name} for s in new]
            self._send(w, batch)
            batch = []
            try:
                msg = (tag, self.call_id, ids, data, infos, shared)
                self.diag.dispatched(w.chan.send(msg, [s.fd for s in new]), 1)
                w.known.update(s.key for s in new)
            except OSError:
                pass  # the worker died: its EOF is seen by the loop, which requeues
        self._send(w, batch)

    def _send(self, w: Any, batch: list[Any]) -> None:
        if batch:
            try:
                n = w.chan.send_many(batch)
                self.diag.dispatched(n, len(batch))
                self.send_failures = 0
            except OSError as exc:
                self.send_failures += 1
                if self.send_failures > SEND_FAILURES_MAX:
                    raise ShardcOSError(
                        exc.errno or 0,
                        f"sending work to the workers failed {self.send_failures} times in a row "
                        f"(last: worker {w.slot}, {exc.strerror or exc}); the call is stopped rather "
                        "than replacing workers forever",
                    ) from exc
                # Usually the worker died; a send can also fail with the worker
                # alive (ENOBUFS, a frame cut short), and then nothing would ever
                # answer for these chunks.  Kill it either way: its EOF brings the
                # loop to the one death handler, which requeues what it held and
                # charges only a shard the status row says was running.
                self.pool.kill(w)

    def start(self) -> None:
        """The first round.  Nothing is known of the shards yet, so a call
        normally starts with two chunks per worker and sends the rest once the
        first reports say how long a shard is.  A small call (at most
        ``SMALL_CALL_CHUNKS`` chunks per worker) goes out whole instead, an
        equal share of the ids per worker: one message and one report per
        worker instead of two or three rounds.  Balance is kept by the
        workers: one whose chunk runs long hands back what is queued behind
        its next chunk (``RETURNED``, see :mod:`shardc.worker.rpc`).  Not for
        an open call's tasks (``shardc.stream``): their data is sent once and
        never handed back.

        A small call's END goes with its work too: a worker ends the call
        right after its RESULTS instead of being woken again for it when the
        call is over (a wake-up costs the master ~20 us on these VMs).  Work
        it must run later in the call (a retry) waits until it reported its
        share and is preceded by the call's setup again
        (:meth:`Supervisor.resume`); one that hands chunks back
        keeps the call open instead (that END is void, see the worker's
        loop): a call of long shards is not set up twice.  Not
        for a call with a value sink (it is opened once per call in each
        worker) or inputs inherited at fork (their pages go at END), nor to a
        worker that got no share (fewer ids than workers): it stays in the
        call, ready for a retry at once, as before."""
        sched = self.sched
        n = len(self.ws)
        pending = sched.pending_count()
        if (
            self.prefetch is None
            and sched.ewma_shard_s is None
            and sched.huge is None
            and type(sched).task_data is Scheduler.task_data  # (tasks with data are not handed back)
            and pending <= SMALL_CALL_CHUNKS * sched.chunk_size(n) * n
        ):
            self.share = -(-pending // n)
        try:
            for w in self.pool.workers:
                self.fill(w)
        finally:
            share, self.share = self.share, 0
        plan = self.call.plan
        if share and not sched.pending_count() and self.call.value_sink is None and not (plan and plan.inherit_tokens):
            for w in self.pool.workers:
                if w.alive and self.ws[w.slot].inflight:  # (one with no share stays in the call: a retry's)
                    try:
                        w.chan.send((END, self.call_id))
                        w.call_ended = True
                    except OSError:
                        pass  # the worker died: its EOF is seen by the loop, which requeues

    def attach(self, w: Any) -> None:
        self.fill(w)

    def requeued(self) -> None:
        for w in self.pool.workers:
            if w.alive:
                self.fill(w)

    # -- results ------------------------------------------------------------------------
    def on_messages(self, w: Any, msgs: list[tuple[Any, list[int]]]) -> None:
        busy = 0
        for msg, fds in msgs:
            if msg[0] == RESULTS and msg[1] == self.call_id:
                self.diag.messages_results += 1
                if len(msg) > 3:  # the call's value sink committed what these outcomes kept
                    self.call.value_sink.committed(w.slot, msg[3])
                busy += self.on_results(w, msg[2], fds)
            elif msg[0] == RETURNED and msg[1] == self.call_id:
                self.on_returned(w, msg[2])
            else:
                close_fds(fds)
        if w.alive:
            self.sup.check_memory(w, busy_ns=busy)
        w = self.maybe_recycle(w)
        self.fill(w)

    def on_results(self, w: Any, results: list[tuple[Any, ...]], fds: list[int] | None = None) -> int:
        """Record ``w``'s outcomes; returns their shard time (ns)."""
        st = self.ws[w.slot]
        sched, diag = self.sched, self.diag
        inflight = st.inflight
        if fds:  # big arrays in segments (shardc.values): map them, the array is the value
            results = [_unpacked(r, fds) if r[1] == OK_SEGMENT else r for r in results]
        if any(r[1] == OK_PICKLED for r in results):
            load = PickledValue if self.call.keep_pickled else pickle.loads  # kept: forwarded as they are
            results = [(r[0], OK, load(r[2]), *r[3:]) if r[1] == OK_PICKLED else r for r in results]
        huge = sched.huge_ids
        n = len(results)
        busy = 0
        if any(r[1] == FRAME for r in results):  # runs of OK shards (short ones): slices, not a loop
            frames = [r for r in results if r[1] == FRAME]
            results = [r for r in results if r[1] != FRAME]
            for first, _, values, t0, t1, _e, _m in frames:
                k = len(values)
                ids = range(first, first + k)
                inflight.discard_run(first, first + k)
                if sched.careful:
                    sched.careful.difference_update(ids)
                if huge:
                    for sid in ids:
                        sched.released(sid)
                if self.call.diagnostics:  # before the outcomes: attempts are those of the finished run
                    diag.frame_done(w.slot, first, k, t0, t1, sched.attempts)
                sched.record_run(first, values)
                n += k - 1
                busy += t1 - t0
        if self.call.diagnostics and results:
            diag.batch_done(w.slot, results, sched.attempts)
        careful = sched.careful
        for sid, ok, value, _t0, _t1, events, _dmem in results:
            inflight.discard(sid)
            if careful:
                careful.discard(sid)
            if huge:
                sched.released(sid)
            if events:
                diag.cow_events(sid, events)
                if any(e.get("lost") for e in events):
                    st.retiring = True  # it exits (RETIRE_EXIT) after this report
            if ok == OK:
                sched.record_success(sid, value)
            else:
                sched.record_failure(sid, value, worker=w.slot)
        busy += sum(r[4] - r[3] for r in results)
        sched.observe(busy * 1e-9 / max(n, 1), count=n)
        st.since_sample += n
        st.last_msg = time.monotonic()
        return int(busy)

    def on_returned(self, w: Any, ids: list[int]) -> None:
        """``w`` handed back ``ids`` unrun (queued behind a long chunk): they
        are no longer in flight there and go first to whichever worker asks
        next (free: no attempt ran)."""
        w.call_ended = False  # (an END sent with its work is void now: it keeps the call)
        inflight = self.ws[w.slot].inflight
        held = [sid for sid in ids if sid in inflight]
        for sid in held:
            inflight.discard(sid)
            self.sched.released(sid)
        self.sched.requeue(held)
        self.requeued()

    def after_poll(self) -> None:
        pass

    def on_tick(self) -> None:
        for w in list(self.pool.workers):
            w = self.maybe_recycle(w)
            self.fill(w)

    def finished(self) -> bool:
        return self.sched.finished()

    # -- supervision hooks ----------------------------------------------------------------
    def recycle(self, w: Any) -> None:
        pass  # replaced by maybe_recycle once its in-flight chunks are reported

    def maybe_recycle(self, w: Any) -> Any:
        st = self.ws[w.slot]
        if st.pending_recycle is None or st.inflight or not w.alive:
            return w
        return self.sup.recycle_now(w)

    def stalled(self, w: Any, row: RowSnapshot, now: float) -> bool:
        # Holding shards, running none, silent for `timeout` seconds: stuck
        # in shardc's own code (e.g. pickling a result that blocks).
        st = self.ws.get(w.slot)
        return st is not None and bool(st.inflight) and now - st.last_msg > float(self.call.timeout)

    def lost(self, w: Any, reason: str | None) -> Loss:
        row = self.pool.status.read(w.slot)
        running = self.pool.status.running(w.slot, self.call_id)
        st = self.ws[w.slot]
        held = list(st.inflight)
        done = self.done
        charge: list[int] = []
        if running is not None and row.run_n > 1:
            # Lost inside a speculative run (shardc.worker.spec): any of its
            # ids may be the one that crashed or hung, and none is marked.
            # Charge none; they rerun one shard at a time (RUN_CAREFUL), where
            # a crash is charged to exactly the shard that caused it.
            self.sched.careful.update(s for s in range(running, running + row.run_n) if s in st.inflight)
        elif running is not None and running in st.inflight:
            charge.append(running)
        if reason == "no progress":
            sending = row.sending - 1
            charge += [sending] if sending in st.inflight else [sid for sid in held if done.get(sid) == 2]
        completed = [sid for sid in held if sid not in charge and done.get(sid) == 1]
        skip = set(charge) | set(completed)
        return Loss([sid for sid in held if sid not in skip], charge, completed)

    def quiet(self) -> bool:
        # Every chunk sent was answered: a worker marks a shard before its RESULTS.
        return not any(self.ws[w.slot].inflight for w in self.pool.workers if w.alive)

    def drain(self) -> None:
        # Results of chunks that were requeued after a death and also
        # finished elsewhere were dropped by record_success.
        pass
