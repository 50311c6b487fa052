"""Cross-process run state: per-worker status rows and the per-call done map.

The master reads, without any message, which shard each worker runs and
since when (timeouts, crash attribution), how many shards it finished
(shm_queue progress), whether it was asked to leave, and how much freed heap
it keeps.  The done map has one byte per shard of a call: 1 = finished and
returned None, 2 = finished with a value still to be gathered.

Every read and write of this shared memory goes through C accessors
(``csrc/status.c``, where the ordering between processes is written down):
Python stores are not ordered on arm64.  Each state change of a shard is one
C call (a cffi call costs ~90 ns): ``shard_begin`` stamps the current shard,
its start time and RUNNING as one update; ``shard_end``/``shard_next``/
``block_end`` store the done mark (release) before the row moves on, so a
master that sees IDLE or a new ``current`` also sees the previous mark.
:meth:`StatusTable.read` returns a consistent snapshot (a two-copy seqlock):
never RUNNING with another shard's start time, and never a torn row, even
if the worker was SIGKILLed in the middle of an update.  Timestamps come
from the clock of :func:`time.monotonic_ns`.

Roles:

* :class:`StatusTable` (master) owns one row per worker slot in a shared
  segment that forked workers inherit.
* :class:`StatusRow` (worker) is one slot's writer.
* :class:`DoneMap` is one call's done map (master creates, worker attaches).
  A pool's calls of up to ``DONE_KEEP`` shards share one kept map
  (:meth:`StatusTable.done_map`): no segment, fd and unmap per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import _lowlevel as ll
from .buffer import Buffer, buffer
from .errors import UsageError
from .segment import Segment

STATE_IDLE, STATE_RUNNING = ll.STATUS_IDLE, ll.STATUS_RUNNING

# The per-shard C calls, bound once (each returns ns >= 0 or a -errno; see _lowlevel.status).
_begin: Callable[[Any, int], int] = ll.status_begin
_end: Callable[[Any, int, int], int] = ll.status_end
_next: Callable[[Any, int, int, int], int] = ll.status_next
_run_next: Callable[[Any, int, int, int, int, int], int] = ll.status_run_next
_block_begin: Callable[[Any, int, int], int] = ll.status_block_begin
_block_end: Callable[[Any, int, int, int], int] = ll.status_block_end
_exit_requested: Callable[[Any], int] = ll.status_exit_requested
_done_get: Callable[[Any, int, int], int] = ll.status_done_get
_done_count: Callable[[Any, int], int] = ll.status_done_count
_NULL = ll.NULL
_fail = ll.status_fail

# Calls of up to this many shards use the pool's kept done map (a byte a
# shard: at most 1 MiB stays mapped per pool); bigger ones get their own.
DONE_KEEP = 1 << 20
DONE_MIN = 4096  # the kept map's first size (one page)


class RowSnapshot(NamedTuple):
    """One consistent read of a worker's row (see :meth:`StatusTable.read`)."""

    state: int  # STATE_IDLE or STATE_RUNNING
    current: int  # shard running (valid while RUNNING)
    start_ns: int  # time.monotonic_ns() when ``current`` started
    done: int  # shards finished in this call (shm_queue)
    call: int  # call id the worker runs (shm_queue), 0 between calls
    block0: int  # first id of the block it runs (shm_queue)
    blockn: int  # ids in that block
    exit_req: int  # 1: leave after the current block
    pid: int
    sending: int  # 1 + id of the shard whose value is being pickled, 0 if none
    heap_kept: int  # freed heap bytes kept for reuse (not drift)
    run_n: int  # ids from ``current`` covered while RUNNING: > 1 in a speculative run (none marked yet)


class StatusTable:
    """Master side: the status rows of a pool's worker slots."""

    def __init__(self, nslots: int) -> None:
        self.nslots = nslots
        nbytes = ll.status_bytes(nslots)
        self._buf = buffer(np.uint8, nbytes)
        self._mem = ll.status_mem_ptr(self._buf.array)
        ll.status_init(self._mem, nbytes, nslots)
        # The calls' shared done map (see done_map), made with the pool: it is
        # the pool's, like its rows (a bigger call replaces it with a bigger one).
        self._kept: Buffer | None = buffer(np.uint8, DONE_MIN)
        # No worker holds work of an earlier call (none can still mark a done
        # map or be inside the task ring): the next call may pipeline its setup
        # (Supervisor.setup_all).  Cleared by done_map, set by a call that ended
        # with all its work reported (Dispatcher.quiet).
        self.quiet = True

    def done_map(self, num: int) -> DoneMap:
        """A done map for a call of ``num`` shards: up to ``DONE_KEEP``, a view
        of the pool's kept map (creating one sized for the calls seen so far),
        which workers keep mapped between calls, so a call costs no segment,
        no fd passing and no unmap.  The caller must :meth:`DoneMap.reset` it
        once every worker has answered the call's setup: a worker reads a
        call's setup only after its last message of the previous call, so no
        earlier call's mark can land after that reset (one that was cut short
        included).  Closing the view leaves the kept map to the table."""
        self.quiet = False
        if num > DONE_KEEP:
            return DoneMap(num)
        kept = self._kept
        if kept is None or kept.array.shape[0] < num:
            if kept is not None:
                kept.close()  # workers let it go at the end of the call (shardc.forget)
            size = DONE_MIN
            while size < num:
                size *= 2
            kept = self._kept = buffer(np.uint8, size)
        return DoneMap.over(kept, num)

    def share_spec(self) -> tuple[dict[str, Any], int]:
        """``(info, fd)``: what a worker started elsewhere (the fork server) needs to :meth:`attach`."""
        seg = self._buf.segment
        info = {"nslots": self.nslots, "size": seg.size, "backing": seg.backing, "name": seg.name, "key": seg.key}
        return info, seg.fd

    @classmethod
    def attach(cls, info: dict[str, Any], fd: int) -> StatusTable:
        """A worker's table over the segment of ``fd`` (from :meth:`share_spec`)."""
        self = cls.__new__(cls)
        self.nslots = info["nslots"]
        self._kept, self.quiet = None, False
        seg = Segment.adopt(fd, info["size"], info["backing"], info["name"], info["key"])
        self._buf = Buffer(seg, np.dtype(np.uint8), (ll.status_bytes(self.nslots),))
        self._mem = ll.status_mem_ptr(self._buf.array)
        return self

    # -- master ----------------------------------------------------------------------
    def row(self, slot: int) -> StatusRow:
        """The writer for ``slot`` (used by the worker forked into it)."""
        return StatusRow(self, slot)

    def read(self, slot: int) -> RowSnapshot:
        return RowSnapshot(*ll.status_read(self._mem, slot))

    def running(self, slot: int, call_id: int | None = None) -> int | None:
        """The shard ``slot`` runs, or None (idle, or running another call's)."""
        r = self.read(slot)
        if r.state != STATE_RUNNING:
            return None
        if call_id is not None and r.call not in (0, call_id):
            return None
        return r.current

    def reset(self, slot: int) -> None:
        """Zero ``slot``'s row (before a worker is forked into it)."""
        ll.status_reset(self._mem, slot)

    def set_call(self, slot: int, call_id: int) -> None:
        ll.status_set_call(self._mem, slot, call_id)

    def clear_calls(self) -> None:
        ll.status_clear_calls(self._mem)

    def request_exit(self, slot: int) -> None:
        ll.status_request_exit(self._mem, slot)

    def take_done(self, slot: int) -> int:
        """``slot``'s finished-shard count, zeroed (a worker that is gone)."""
        return ll.status_take_done(self._mem, slot)

    def done_total(self) -> int:
        return ll.status_done_total(self._mem)

    def heap_kept(self, slot: int) -> int:
        return ll.status_heap_kept(self._mem, slot)

    def pid(self, slot: int) -> int:
        return ll.status_pid(self._mem, slot)

    def close(self) -> None:
        if self._kept is not None:
            self._kept.close()
            self._kept = None
        self._buf.close()


class StatusRow:
    """Worker side: the one writer of a slot's row.

    Every method is one C call (``csrc/status.c``); the ones that stamp a
    time return it (``time.monotonic_ns()`` clock).  The done map of the
    marks is bound to the C writer when it changes, so the per-shard calls
    pass only the shard ids."""

    __slots__ = ("_done", "_owner", "_p", "_table", "slot")

    def __init__(self, table: StatusTable, slot: int) -> None:
        self.slot = slot
        self._table = table  # keeps the shared memory (which ``_p`` points into) alive
        self._owner, self._p = ll.status_writer(table._mem, slot)
        self._done: DoneMap | None = None

    def _bind(self, done: DoneMap | None) -> None:
        """Marks go to ``done`` from now on (a new call's map)."""
        if done is None:
            ll.status_writer_set_done(self._p, _NULL, 0)
        else:
            ll.status_writer_set_done(self._p, done._p, done.num)
        self._done = done

    def _failed(self, rc: int, op: str, sid: int) -> None:
        _fail(rc, op, sid, self._done.num if self._done is not None else 0)

    def next_call(self, done: DoneMap | None) -> tuple[Callable[[Any, int, int, int], int], Any]:
        """The hot path's shard boundary, unwrapped: ``(fn, handle)`` such that
        ``fn(handle, sid, mark, nxt)`` does what ``shard_next(done, sid, mark, nxt)``
        does, without a Python method call per shard (~70 ns of a ~0.8 us
        trivial shard).  A negative return is an error: hand it to :meth:`failed`."""
        if done is not self._done:
            self._bind(done)
        return _next, self._p

    def run_call(self, done: DoneMap | None) -> tuple[Callable[[Any, int, int, int, int, int], int], Any]:
        """The speculative runs' one call, unwrapped like :meth:`next_call`:
        ``fn(handle, first, count, mark, nxt, nxt_count)`` marks ids
        ``first .. first+count-1`` done with ``mark`` (one C call, one
        fence), then says "ids ``nxt`` .. ``nxt+nxt_count-1`` run since now"
        (``nxt_count`` 0: IDLE).  While such a run (``run_n`` > 1) is on the
        row, none of its ids is marked: a worker lost inside it had finished
        an unknown number of them, so the master charges none and reruns them
        one shard at a time (``dispatch_rpc``)."""
        if done is not self._done:
            self._bind(done)
        return _run_next, self._p

    def failed(self, rc: int, op: str, sid: int) -> None:
        """Raise for ``rc < 0`` returned by a status call on shard ``sid``."""
        self._failed(rc, op, sid)

    def set_pid(self, pid: int) -> None:
        ll.status_set_pid(self._p, pid)

    def shard_begin(self, sid: int) -> int:
        """``sid`` starts now: current, start time, then RUNNING.  Returns t0 (ns)."""
        return _begin(self._p, sid)

    def shard_end(self, done: DoneMap | None, sid: int, mark: int) -> int:
        """``sid`` finished: its done mark (1/2; 0 = failed, none), then IDLE.  Returns t1 (ns)."""
        if done is not self._done:
            self._bind(done)
        t = _end(self._p, sid, mark)
        if t < 0:
            self._failed(t, "shard_end", sid)
        return t

    def shard_next(self, done: DoneMap, sid: int, mark: int, nxt: int) -> int:
        """Inside a block (state stays RUNNING): mark ``sid`` done, start ``nxt``.  Returns now (ns)."""
        if done is not self._done:
            self._bind(done)
        t = _next(self._p, sid, mark, nxt)
        if t < 0:
            self._failed(t, "shard_next", sid)
        return t

    def block_begin(self, start: int, count: int) -> int:
        """A block of ``count`` ids from ``start`` begins (RUNNING its first shard)."""
        return _block_begin(self._p, start, count)

    def block_end(self, done: DoneMap, sid: int, mark: int, ok: int) -> int:
        """The block is over after ``sid`` (its done mark ``mark``, 0 = none):
        IDLE, and ``ok`` more shards finished.  Returns now (ns)."""
        if done is not self._done:
            self._bind(done)
        t = _block_end(self._p, sid, mark, ok)
        if t < 0:
            self._failed(t, "block_end", sid)
        return t

    def set_idle(self) -> None:
        ll.status_set_idle(self._p)

    def set_sending(self, sid: int | None) -> None:
        ll.status_set_sending(self._p, 0 if sid is None else sid + 1)

    def set_heap_kept(self, nbytes: int) -> None:
        ll.status_set_heap_kept(self._p, nbytes)

    def exit_requested(self) -> bool:
        return bool(_exit_requested(self._p))


class DoneMap:
    """One byte per shard of a call, shared by the master and its workers."""

    def __init__(self, num: int) -> None:
        self._buf: Buffer | None = buffer(np.uint8, max(num, 1))
        self._kept: Buffer | None = None
        self.num = num
        self._a = self._buf.array
        self._p = ll.status_bytes_ptr(self._a)

    @property
    def segment(self) -> Segment:
        if self._kept is not None:  # a view of a pool's kept map
            return self._kept.segment
        if self._buf is None:  # a worker's handle: the master owns the segment
            raise UsageError("an attached done map has no segment of its own")
        return self._buf.segment

    @property
    def array(self) -> np.ndarray:
        """The underlying bytes (for descriptors only: read with :meth:`get`/:meth:`count`)."""
        return self._a

    @classmethod
    def attach(cls, arr: np.ndarray) -> DoneMap:
        """A worker's handle on the map mapped at ``arr`` (a uint8 view)."""
        self = cls.__new__(cls)
        self._buf = None
        self._kept = None
        self.num = arr.shape[0]
        self._a = arr
        self._p = ll.status_bytes_ptr(arr)
        return self

    @classmethod
    def over(cls, kept: Buffer, num: int) -> DoneMap:
        """A call's map over the first ``num`` bytes of ``kept`` (owned by
        the caller: :meth:`close` leaves it open).  Not zeroed: see :meth:`reset`."""
        self = cls.attach(kept.array[: max(num, 1)])
        self._kept = kept
        self.num = num
        return self

    def reset(self) -> None:
        """Unmark every shard (a kept map reused by a new call, while no
        worker writes to it: the caller's message to the workers orders it
        before their marks)."""
        self._a.fill(0)

    def get(self, sid: int) -> int:
        v = _done_get(self._p, self.num, sid)
        if v < 0:
            _fail(v, "done get", sid, self.num)
        return v

    def clear(self, sid: int) -> None:
        """Unmark ``sid`` (an open call reuses the id for a new task; no
        worker holds it)."""
        ll.status_done_mark(self._p, self.num, sid, 0)

    def count(self) -> int:
        """Shards marked done."""
        return _done_count(self._p, self.num)

    def close(self) -> None:
        if self._buf is not None:
            self._buf.close()
