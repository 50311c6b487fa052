"""The worker side of ``dispatch_mode="shm_queue"``: pop blocks of shard ids
from the call's shared ring and run each with the executor until the ring is
closed (the master side is ``shardc.dispatch_queue``).

A ring item is a block of consecutive ids, ``start << COUNT_BITS | count``
(this module defines the format; the master encodes with :func:`encode`).
Nothing is gathered: progress is the worker's status row (the shard running
and since when, done shards counted per block), failures go to the master
one ``QFAIL`` message each (and to an optional error log), writes into
borrowed inputs one ``QCOW`` each; ``QDONE`` closes the worker's part of the
call with its block timings, the count of dropped return values and any ids
it claimed but did not run.

A worker that finds the ring empty sends ``QIDLE`` once before it parks
(again only after it got more work): the master's loop wakes at once to
refill the ring or to see the call is over, instead of at its next poll.
A worker that finds the ring empty and every shard of the call done (the
status rows' counts reach the call's shard count) closes the ring itself:
the workers parked in it wake and leave too, without waiting for the
master's close.

The ring is the pool's (the master resets it per call, see
``shardc.dispatch_queue.pool_ring``): the worker keeps its mapping between
calls, keyed by the ring's token, and closes the fd sent again with each
``QUEUE``.

The worker leaves the ring when the master asks (``exit_requested``: a
recycle, after the current block) or when a shard wrote an inherited input
beyond restoring (it retires); either way it exits once ``QDONE`` is sent.
"""

from __future__ import annotations

import os
from typing import Any

from .. import _lowlevel as ll
from .._channel import Channel
from ..errors import QueueClosedError, UsageError
from ..protocol import QCOW, QDONE, QFAIL, QIDLE
from ..queue import TaskRing
from ..status import StatusRow
from .executor import Events, OutcomeTuple, ShardExecutor

COUNT_BITS = 24
COUNT_MASK = (1 << COUNT_BITS) - 1
MAX_BLOCK = COUNT_MASK


_ring: tuple[str, TaskRing] | None = None  # (token, mapping) of the pool's ring, kept between calls


def _attach(token: str | None, fd: int, nbytes: int) -> TaskRing:
    """The ring of ``token``: the mapping kept from an earlier call, or a new
    one from ``fd`` (-1: none sent, the master knows this process holds the
    ring of ``token``; see ``QueueDispatcher.attach``)."""
    global _ring
    if token is not None and _ring is not None and _ring[0] == token and not _ring[1].released:
        if fd >= 0:
            ll.seg_close_fd(fd)
        return _ring[1]
    if fd < 0:
        raise UsageError(f"QUEUE for ring {token!r} came without its fd, and this worker holds no mapping of it")
    if _ring is not None:
        _ring[1].release()
        _ring = None
    ring = TaskRing.attach(fd, nbytes)
    ll.seg_close_fd(fd)  # attach took a duplicate
    if token is not None:
        _ring = (token, ring)
    return ring


def encode(start: int, count: int) -> int:
    """The ring item for ``count`` ids from ``start``."""
    return (start << COUNT_BITS) | count


def run_queue_call(
    slot: int, chan: Channel, row: StatusRow, ex: ShardExecutor, msg: dict[str, Any], fds: list[int]
) -> None:
    """Pop blocks and run them until the ring is closed (or exit is
    requested); then send ``QDONE``.  Exits the process (``os._exit``) when the
    worker leaves the pool: recycled, or retiring (tainted)."""
    ring = _attach(msg.get("ring"), fds[0] if fds else -1, msg["nbytes"])
    for fd in fds[1:]:  # the done map (sent by older masters): mapped at the call's setup already
        ll.seg_close_fd(fd)
    call_id = msg["call_id"]
    keep_blocks = ex.call.diagnostics
    blocks: list[tuple[int, int, int, int]] = []  # (start, count, t0, t1) per block run
    mem: list[tuple[int, int, int]] = []  # (start, count, memory delta) per measured block
    batch = int(msg.get("claim_batch", 1))
    elog = _ErrorLog(msg["error_log"], msg["error_log_max_lines"]) if msg.get("error_log") else None

    def on_fail(outcome: OutcomeTuple) -> None:
        if elog is not None:
            elog.write(outcome[2])
        chan.send((QFAIL, call_id, outcome))

    def on_cow(sid: int, events: Events) -> None:  # audit/allow writes: rare, one message each
        chan.send((QCOW, call_id, (sid, events)))

    returned = 0  # shards whose return value is dropped (this mode gathers none)
    exiting = False
    # Ids claimed but not run because a shard wrote an inherited input beyond
    # restoring (ShardExecutor.check_tainted): the master requeues them.
    unfinished: list[int] = []
    ring.register(slot, os.getpid())
    idle = (QIDLE, call_id, None)
    told = False  # QIDLE sent, no work since
    num = int(msg.get("num", -1))
    # Every row's finished-shard count: once it reaches num, the whole call
    # is done, so the worker that sees it closes the ring (nothing can be
    # pushed any more: no shard is pending) and every worker leaves at once
    # (QDONE) instead of parking until the master closes it.  The count never
    # overcounts (a shard is counted once, by the worker that marked it);
    # after a death it undercounts (the master took the dead row's count),
    # and then the master's close ends the call as before.
    table = row._table
    try:
        while True:
            if row.exit_requested():
                exiting = True
                break
            try:
                items = ring.pop(slot, batch, timeout=0)
                if len(items) == 0:
                    if num >= 0 and table.done_total() >= num:
                        ring.close()  # wakes the workers parked in it: they leave too
                        break
                    if not told:
                        chan.send(idle)
                        told = True
                    items = ring.pop(slot, batch, timeout=0.05)
                    if len(items) == 0:
                        continue
            except QueueClosedError:
                break
            told = False
            for item in items.tolist():
                start = item >> COUNT_BITS
                stop = start + (item & COUNT_MASK)
                if unfinished or ex.tainted:
                    unfinished += range(start, stop)
                    continue
                ran, _ok, nret, t0, t1, dmem = ex.run_block(start, stop, on_fail, on_cow)  # RunStats
                if start + ran < stop:
                    unfinished += range(start + ran, stop)
                returned += nret
                if keep_blocks:
                    blocks.append((start, ran, t0, t1))
                if dmem is not None:
                    mem.append((start, ran, dmem))
            ring.done(slot)
            if unfinished or ex.check_tainted():
                exiting = True
                break
    finally:
        row.set_idle()
    if elog is not None:
        elog.close()
    chan.send(
        (
            QDONE,
            call_id,
            {
                "blocks": blocks,
                "mem": mem,
                "exiting": exiting,
                "returned": returned,
                "unfinished": unfinished,
                "retire": bool(ex.tainted),
            },
        )
    )
    if ex.tainted:
        ex.retire()
    if exiting:
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
            self.f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the call, closed by close()
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
