"""``dispatch_mode="shm_queue"``: workers pull blocks of shard ids from a
shared-memory ring (``shardc.queue.TaskRing``, futex-parked, crash-repairable).

Per call the master creates a ring and hands its fd to every worker with a
"queue" message.  An item is a block of consecutive shard ids, encoded as
``start << 24 | count``.  The master keeps a few blocks per worker in the
ring (so nobody waits for it) and sizes blocks online: probe blocks first,
then blocks of about ``target_chunk_seconds`` of work, shrinking at the end so
the last blocks spread over all workers.

Workers write only to ``out=`` buffers: return values are not gathered (each
``results`` entry is None), failures are.  Progress needs no message per
shard: each worker counts finished shards in the shared status table
(``ST_DONE``) and names the shard it is running (``ST_CURRENT`` since
``ST_START_NS``), which is all the supervisor needs:

* **exception** -> the worker sends a "qfail" record; the master requeues the
  shard as a one-shard block (or fails it: deterministic, or out of retries);
* **death** -> ``ring.repair(slot)`` returns the dead worker's claimed blocks;
  ids before ``ST_CURRENT`` in its current block are done, the current one is
  charged an attempt, the rest are requeued free;
* **timeout / memory** -> the watchdog kills the worker: a death;
* **recycle** -> ``ST_EXIT_REQ`` asks the worker to leave after its current
  block; a fresh worker joins the same ring.

This module is the master side only.  The worker side (pop a block, run it
with the one shard executor, report) is ``shardc.worker.queue_loop``, which
also defines the ring's item format imported here.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from ._channel import ChannelClosed
from .status import STATE_RUNNING
from .worker.queue_loop import (  # the ring item format
    COUNT_BITS,
    COUNT_MASK,
    MAX_BLOCK,
    encode,
)

log = logging.getLogger("shardc")

# ------------------------------------------------------------------------------------------
# master side
# ------------------------------------------------------------------------------------------


class QueueFeeder:
    """Cuts the remaining shard ids into blocks and keeps the ring supplied."""

    def __init__(self, run: Any, ring: Any, workers: int) -> None:
        self.run = run
        self.ring = ring
        self.workers = workers
        fixed = run.opts.get("block_size")
        self.fixed = int(fixed) if fixed else None
        # Probe blocks are small (a retry never waits behind a long untuned
        # block); the first 20 ms window of throughput sizes the rest.
        self.block = self.fixed or (8 if run.autotune else max(1, min(4096, run.num // (workers * 8) or 1)))
        self.tuned = self.fixed is not None or not run.autotune
        self.win_t: float | None = None
        self.win_done = 0
        self.rounds = 0
        self.pushed_blocks = 0

    def retune(self, done: int) -> None:
        """Aim at ~target seconds of work per block, from the throughput
        measured over windows of >= 20 ms (the first window starts when the
        first shard is done, so pool wake-up does not count as work)."""
        if self.fixed is not None or not self.run.autotune:
            return
        run = self.run
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
        run.ewma_shard_s = per_shard if run.ewma_shard_s is None else 0.5 * run.ewma_shard_s + 0.5 * per_shard
        target = float(run.autotune["target_chunk_seconds"])
        new = int(max(1, min(MAX_BLOCK, target / max(run.ewma_shard_s, 1e-8))))
        if abs(new - self.block) * 4 > self.block and self.rounds < int(run.autotune.get("max_rounds", 64)):
            run.diag.autotune_step(self.block, new, run.ewma_shard_s)
            run.chunk = new
            self.block = new
            self.rounds += 1
        self.tuned = True

    def _retry_items(self, limit: int) -> list[int]:
        """Requeued ids as blocks: consecutive ids (the rest of a dead
        worker's block) travel together, up to the current block size."""
        run = self.run
        items: list[int] = []
        while run.retry and len(items) < limit:
            start = run.retry.popleft()
            count = 1
            while run.retry and run.retry[0] == start + count and count < max(1, self.block):
                run.retry.popleft()
                count += 1
            items.append(encode(start, count))
        return items

    def feed(self) -> None:
        """Top the ring up to ~2 blocks per worker.  Retries go in first and
        regardless of that mark, so a retried shard waits behind as little
        as possible (this also runs right after a death, before the
        replacement worker is forked)."""
        run = self.run
        if run.pending_count() == 0:
            return
        size = self.ring.size()
        items = self._retry_items(max(0, self.ring.capacity - size))
        low_water = 2 * self.workers
        room = low_water - size - len(items)
        for _ in range(max(0, room)):
            pending = run.pending_count()
            if pending == 0:
                break
            # Shrink blocks at the end so the tail spreads over every worker.
            size = min(self.block, max(1, pending // (2 * self.workers)) if self.tuned else self.block)
            ids = run.take_chunk(size)
            items.append(encode(ids[0], len(ids)))
        if items:
            n = self.ring.push(np.asarray(items, dtype=np.uint64), timeout=0)
            if n < len(items):  # ring full: give back what did not fit
                for it in reversed(items[n:]):
                    start, count = it >> COUNT_BITS, it & COUNT_MASK
                    for sid in range(start + count - 1, start - 1, -1):
                        run.retry.appendleft(sid)
            self.pushed_blocks += n
            run.diag.dispatched(8 * n, n)


def run_queue(run: Any) -> None:
    """The master loop of shm_queue mode (supervision shared with rpc)."""
    import selectors

    from .queue import TaskRing
    pool = run.pool
    n = len(pool.workers)
    backing = run.opts.get("queue_backing", "memfd")
    backing = {"mmap": "memfd", "auto": "memfd"}.get(backing, backing)
    ring = TaskRing.create(capacity=1024, max_consumers=n, backing=backing)
    donemap = run.donemap  # the call's done map (closed by run.release)
    feeder = QueueFeeder(run, ring, n)
    run.on_requeue = feeder.feed  # retries enter the ring before a replacement is forked
    run.done_base = 0  # ST_DONE of workers that are gone
    run.qdone: set[int] = set()
    sel = selectors.DefaultSelector()
    run.sel = sel

    queued_pids: set[int] = set()  # workers that were handed the ring (and will send "qdone")
    returned = [0]  # shards whose non-None return value was dropped

    progress: dict[int, tuple[tuple[int, ...], float]] = {}

    def check_progress(now: float) -> None:
        """Kill a worker that holds ring claims, runs no shard, and shows no
        progress (ring heartbeat, done count, current shard) for ``timeout``
        seconds: it is stuck outside any shard, e.g. pickling an error report
        whose pickling blocks."""
        for w in list(pool.workers):
            row = pool.status.read(w.slot)
            if not w.alive or row.state == STATE_RUNNING:
                progress.pop(w.slot, None)
                continue
            info = ring.consumer_info(w.slot)
            if not info["claimed"]:
                progress.pop(w.slot, None)
                continue
            sig = (int(info["heartbeat"]), row.done, row.current, w.pid)
            seen = progress.get(w.slot)
            if seen is None or seen[0] != sig:
                progress[w.slot] = (sig, now)
            elif now - seen[1] > run.timeout:
                progress.pop(w.slot, None)
                pool.kill(w)
                on_death(w, reason="no progress", code=w.exitcode)

    def on_qdone(w: Any, payload: dict[str, Any]) -> None:
        for b in payload["blocks"]:
            run.diag.block_done(w.slot, *b)
        returned[0] += payload.get("returned", 0)

    def error_log_path(w: Any) -> str:
        import tempfile
        path = os.path.join(tempfile.gettempdir(), f"shardc-errors-{os.getpid()}-call{run.call_id}-w{w.slot}.log")
        run.diag.error_logs.append(path)
        return path

    def start_worker(w: Any) -> None:
        pool.status.set_call(w.slot, run.call_id)
        queued_pids.add(w.pid)
        msg = {"call_id": run.call_id, "nbytes": ring.nbytes, "num": run.num,
               "claim_batch": int(run.opts.get("claim_batch", 1)),
               "error_log": error_log_path(w) if run.opts.get("error_log") else None,
               "error_log_max_lines": int(run.opts.get("error_log_max_lines", 100))}
        n_bytes = w.chan.send(("queue", msg), [ring.fd, donemap.segment.fd])
        run.diag.bytes_setup += n_bytes

    reported: dict[int, set[int]] = {}  # worker pid -> shards whose failure it reported

    def on_report(w: Any, m: tuple) -> None:
        """A failed shard ("qfail") or a shard's writes into borrowed inputs ("qcow")."""
        if m[0] == "qcow":
            run.diag.cow_events(*m[2])
            return
        sid, _ok, rec, _t0, _t1, events, _dm = m[2]
        reported.setdefault(w.pid, set()).add(sid)
        if events:
            run.diag.cow_events(sid, events)
        run.record_failure(sid, rec)

    def done_total() -> int:
        return run.done_base + pool.status.done_total()

    def on_death(w: Any, reason: str | None = None, code: int | None = None) -> None:
        row = pool.status.read(w.slot)
        # A worker killed for making no progress was stuck after its current
        # shard (e.g. pickling that shard's error report): that shard is the one
        # charged, as if it were still running.
        current = row.current if row.state == STATE_RUNNING or reason == "no progress" else None
        block0, blockn = row.block0, row.blockn
        if code is None:
            code = pool._reap(w, wait=2.0)
        run.done_base += pool.status.take_done(w.slot)
        claimed = [int(x) for x in ring.repair(w.slot)]
        charged = None
        if current is not None and any(
                (it >> COUNT_BITS) <= current < (it >> COUNT_BITS) + (it & COUNT_MASK) for it in claimed):
            charged = current
        if charged is not None and donemap.get(charged):
            charged = None  # killed after marking it done, before leaving STATE_RUNNING
        queued = set(run.retry)
        # In the block it was running, the ids before the current one failed
        # and were reported (their retry is the master's already), unless the
        # report died unread with the worker (a watchdog kill closes the socket).
        skip = reported.pop(w.pid, set())
        requeue = []
        for it in claimed:
            start, stop = it >> COUNT_BITS, (it >> COUNT_BITS) + (it & COUNT_MASK)
            running = current is not None and (start, stop - start) == (block0, blockn) and start <= current < stop
            requeue += [sid for sid in range(start, stop)
                        if sid != charged and not donemap.get(sid) and run.state[sid] == 0 and sid not in queued
                        and not (running and sid < current and sid in skip)]
        for sid in reversed(requeue):
            run.retry.appendleft(sid)
        st = run.ws[w.slot]
        st.inflight = {charged: None} if charged is not None else {}
        # Reuse the rpc death path for logging, charging and restart.
        sel.unregister(w.chan.sock)
        run.sel = _NullSel()
        nw = run.on_death(w, reason=reason, code=code, running=charged)
        run.sel = sel
        _reregister(nw)
        if not run.finished():
            start_worker(nw)

    def _reregister(w: Any) -> None:
        try:
            sel.unregister(w.chan.sock)
        except KeyError:
            pass
        sel.register(w.chan.sock, selectors.EVENT_READ, w.slot)

    try:
        for w in pool.workers:
            sel.register(w.chan.sock, selectors.EVENT_READ, w.slot)
            pool.status.take_done(w.slot)  # counts start at 0 each call
            start_worker(w)
        feeder.feed()
        tick = 0.05 if run.timeout > 0.2 else run.timeout / 4
        next_tick = time.monotonic() + tick
        last_done = 0
        while True:
            run.completed = done_total()
            if run.completed + run.n_failed >= run.num:
                # The counters are a hint; the done map is the truth.
                run.completed = donemap.count()
                if run.completed + run.n_failed >= run.num:
                    break
            events = sel.select(timeout=0.002)
            for key, _ in events:
                w = pool.workers[key.data]
                if key.fileobj is not w.chan.sock:
                    continue
                try:
                    msgs = w.chan.recv_ready()
                except (ChannelClosed, ConnectionError):
                    on_death(w)
                    continue
                for m, _fds in msgs:
                    if m[0] in ("qfail", "qcow") and m[1] == run.call_id:
                        on_report(w, m)
                    elif m[0] == "qdone" and m[1] == run.call_id:
                        on_qdone(w, m[2])
                        if m[2]["exiting"]:
                            for sid in reversed(m[2].get("unfinished", ())):
                                if not donemap.get(sid) and run.state[sid] == 0 and sid not in run.retry:
                                    run.retry.appendleft(sid)
                            reason = ("a shard wrote more of an input inherited at fork than can be "
                                      "restored" if m[2].get("retire") else
                                      run.ws[w.slot].pending_recycle or "recycle requested")
                            run.done_base += pool.status.take_done(w.slot)
                            sel.unregister(w.chan.sock)
                            pool._reap(w, wait=2.0)
                            w.alive = False
                            run.diag.event("recycle", w, reason)
                            nw = pool.replace(w, reason, "recycle")
                            run.ws[w.slot] = type(run.ws[w.slot])()
                            run.diag.worker_started(nw)
                            run.sel = _NullSel()
                            nw = run.setup_worker(nw)
                            run.sel = sel
                            _reregister(nw)
                            start_worker(nw)
            done = done_total()
            if done != last_done:
                feeder.retune(done)
                last_done = done
            feeder.feed()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + tick
                if run.pending_count() == 0 and ring.size() == 0:
                    # The counters can stay one short for good (a worker killed
                    # between marking a shard done and counting it): once all
                    # work is handed out, ask the done map every tick.
                    exact = donemap.count()
                    if exact + run.n_failed >= run.num:
                        run.completed = exact
                        break
                run.watchdog(on_death)
                check_progress(time.monotonic())
                for w in list(pool.workers):
                    if not w.alive:
                        on_death(w)
                    elif run.ws[w.slot].pending_recycle is None:
                        run.ws[w.slot].since_sample = run.health_check_interval
                        run.check_memory(w)
                        if run.ws[w.slot].pending_recycle is not None:
                            pool.status.request_exit(w.slot)
                run.completed = done_total()
                run.diag.tick(pool, run)
        ring.close()
        # Collect every worker's qdone (block timings), with a deadline.
        deadline = time.monotonic() + 5.0
        # A replacement forked after the last shard finished never got the
        # ring: waiting for its qdone would only run out the deadline.
        waiting = {w.slot for w in pool.workers if w.alive and w.pid in queued_pids}
        while waiting and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.05):
                w = pool.workers[key.data]
                try:
                    msgs = w.chan.recv_ready()
                except (ChannelClosed, ConnectionError):
                    waiting.discard(w.slot)
                    continue
                for m, _fds in msgs:
                    if m[0] == "qdone" and m[1] == run.call_id:
                        on_qdone(w, m[2])
                        waiting.discard(w.slot)
                    elif m[0] in ("qfail", "qcow") and m[1] == run.call_id:
                        on_report(w, m)
        run.completed = donemap.count()
        if returned[0]:
            log.warning("dispatch_mode='shm_queue' gathers no return values, but %d shard(s) returned "
                        "one: write results into out= buffers, or use dispatch_mode='rpc_chunked'",
                        returned[0])
            run.diag.returned_ignored = returned[0]
    finally:
        # The call is over: a later rpc_chunked call attributes a death to the
        # running shard only while ST_CALL is 0 or its own id.
        pool.status.clear_calls()
        sel.close()
        run.sel = None
        ring.close()
        ring.release()


class _NullSel:
    def unregister(self, *_a: Any) -> None:
        pass

    def register(self, *_a: Any) -> None:
        pass
