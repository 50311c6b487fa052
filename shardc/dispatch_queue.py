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
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from ._channel import ChannelClosed
from .errors import QueueClosedError
from .protocol import ERR, error_record as _error_record
from .status import STATE_RUNNING
from .worker import release_traceback

log = logging.getLogger("shardc")

COUNT_BITS = 24
COUNT_MASK = (1 << COUNT_BITS) - 1
MAX_BLOCK = COUNT_MASK


def encode(start: int, count: int) -> int:
    return (start << COUNT_BITS) | count


# ------------------------------------------------------------------------------------------
# worker side
# ------------------------------------------------------------------------------------------


def worker_queue_loop(worker: Any, msg: dict[str, Any], fds: list[int]) -> None:
    """Pop blocks and run them until the ring is closed (or exit is requested)."""
    from . import _lowlevel as ll
    from .queue import TaskRing
    ring = TaskRing.attach(fds[0], msg["nbytes"])
    ll.seg_close_fd(fds[1])  # the done map: mapped at the call's setup already
    slot = worker.slot
    chan = worker.chan
    call = worker.call
    call_id = msg["call_id"]
    row = worker.row
    done = call.donemap
    fun = call.fun
    kwargs = call.kwargs
    desc = call.desc
    make = desc.shard
    entropy = call.entropy
    seeded = call.seeded
    guarded = worker.guard is not None and bool(call.guard_regions)
    keep_blocks = call.diagnostics
    blocks: list[tuple[int, int, int, int]] = []
    batch = int(msg.get("claim_batch", 1))
    elog = _ErrorLog(msg["error_log"], msg["error_log_max_lines"]) if msg.get("error_log") else None
    returned = 0  # shards whose return value is dropped (this mode gathers none)
    ring.register(slot, worker_pid())
    exiting = False
    # Shards claimed but not run because a shard wrote an inherited input
    # beyond restoring (worker.check_tainted): the master requeues them.
    unfinished: list[int] = []
    try:
        while True:
            if row.exit_requested():
                exiting = True
                break
            try:
                items = ring.pop(slot, batch, timeout=0.05)
            except QueueClosedError:
                break
            if len(items) == 0:
                continue
            for item in items.tolist():
                start = item >> COUNT_BITS
                stop = start + (item & COUNT_MASK)
                if unfinished or worker.tainted:
                    unfinished += range(start, stop)
                    continue
                # Per shard only what supervision needs: which shard runs and
                # since when (timeouts, crash attribution) and its done mark,
                # in one call (csrc/status.c orders them for the master).
                t0 = ts = row.block_begin(start, stop - start)
                ok_in_block = 0
                sid = start
                while sid < stop:
                    shard = make(sid, (entropy, sid))
                    try:
                        if seeded:
                            worker._seed_legacy(sid)
                        if guarded:
                            with worker.guard.shard_scope(sid) as scope:
                                value = fun(shard, **kwargs)
                            if scope.events:  # audit/allow writes: rare, one message each
                                chan.send(("qcow", call_id, (sid, scope.events)))
                        else:
                            value = fun(shard, **kwargs)
                        if value is not None:
                            returned += 1
                    except BaseException as exc:  # noqa: BLE001 - reported to the master
                        row.set_idle()
                        rec = _error_record(exc, sid)
                        release_traceback(exc)
                        if elog is not None:
                            elog.write(rec)
                        chan.send(("qfail", call_id, (sid, ERR, rec, ts, time.monotonic_ns(),
                                                      getattr(exc, "cow_events", None), None)))
                        if guarded and worker.check_tainted():
                            unfinished += range(sid + 1, stop)
                            stop = sid + 1
                        sid += 1
                        if sid < stop:
                            ts = row.shard_begin(sid)
                        continue
                    ok_in_block += 1
                    # A write it could not undo (checked only after a shard
                    # that wrote an input): leave the rest of the block.
                    if guarded and scope.events and worker.check_tainted():
                        unfinished += range(sid + 1, stop)
                        stop = sid + 1
                    if sid + 1 < stop:
                        ts = row.shard_next(done, sid, 1, sid + 1)
                    else:
                        row.block_end(done, sid, 1, ok_in_block)
                        ok_in_block = -1
                    sid += 1
                if ok_in_block >= 0:  # the block ended on a failed shard
                    row.block_end(done, stop - 1, 0, ok_in_block)
                t1 = time.monotonic_ns()
                if keep_blocks:
                    blocks.append((start, stop - start, t0, t1))
                if t1 - t0 > 1_000_000:  # blocks of a millisecond or more: ~1 us is noise
                    worker.heap_check()
            ring.done(slot)
            if unfinished or (guarded and worker.check_tainted()):
                exiting = True
                break
    finally:
        row.set_idle()
    if elog is not None:
        elog.close()
    chan.send(("qdone", call_id, {"blocks": blocks, "exiting": exiting, "returned": returned,
                                  "unfinished": unfinished,
                                  "retire": bool(worker.tainted)}))
    if worker.tainted:
        worker.retire()
    if exiting:
        import os
        os._exit(0)


class _ErrorLog:
    """``dispatch_opts={"error_log": True}``: a worker's failures, appended to
    a text file (bounded by ``error_log_max_lines``), for reading while a long
    run goes on.  The master knows every failure anyway (failure records)."""

    def __init__(self, path: str, max_lines: int) -> None:
        self.path = path
        self.left = max_lines
        self.f: Any = None

    def write(self, rec: dict[str, Any]) -> None:
        if self.left <= 0:
            return
        if self.f is None:
            self.f = open(self.path, "a", encoding="utf-8")
        lines = [f"shard {rec['shard']}: {rec['type']}: {rec['message']}"]
        lines += ["    " + ln for ln in rec["traceback"].rstrip().splitlines()]
        lines = lines[: self.left]
        self.left -= len(lines)
        if self.left <= 0:
            lines.append("(error_log_max_lines reached: later failures are in the result only)")
        self.f.write("\n".join(lines) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def worker_pid() -> int:
    import os
    return os.getpid()


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
        run.record_failure(sid, rec, worker=w.slot)

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
                run.diag.tick()
                run.bar.update(run.completed + run.n_failed, run.n_failed, run.retries_total)
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
