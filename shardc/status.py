"""Cross-process run state: per-worker status rows and the per-call done map.

The master reads, without any message, which shard each worker runs and
since when (timeouts, crash attribution), how many shards it finished
(shm_queue progress), whether it was asked to leave, and how much freed heap
it keeps.  The done map has one byte per shard of a call: 1 = finished and
returned None, 2 = finished with a value still to be gathered.

Every write to this shared memory goes through these methods (and through C,
``csrc/status.c``, where the ordering between processes is written down):
Python stores are not ordered on arm64.

Roles:

* :class:`StatusTable` (master) owns one row per worker slot in a shared
  segment that forked workers inherit.
* :class:`StatusRow` (worker) is one slot's writer.
* :class:`DoneMap` is one call's done map (master creates, worker attaches).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from .buffer import buffer

STATE_IDLE, STATE_RUNNING = 0, 1

# Row layout (int64 fields).  Only this module (and csrc/status.c) knows it.
_STATE, _CURRENT, _START_NS, _DONE, _CALL, _BLOCK0, _BLOCKN, _EXIT_REQ, _PID, _SENDING, _HEAP_KEPT = range(11)
_NFIELDS = 16


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


class StatusTable:
    """Master side: the status rows of a pool's worker slots."""

    def __init__(self, nslots: int) -> None:
        self.nslots = nslots
        self._buf = buffer(np.int64, (nslots, _NFIELDS))
        self._a = self._buf.array

    # -- master ----------------------------------------------------------------------
    def row(self, slot: int) -> "StatusRow":
        """The writer for ``slot`` (used by the worker forked into it)."""
        return StatusRow(self, slot)

    def read(self, slot: int) -> RowSnapshot:
        return RowSnapshot(*(int(x) for x in self._a[slot, :11]))

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
        self._a[slot, :] = 0

    def set_call(self, slot: int, call_id: int) -> None:
        self._a[slot, _CALL] = call_id

    def clear_calls(self) -> None:
        self._a[:, _CALL] = 0

    def request_exit(self, slot: int) -> None:
        self._a[slot, _EXIT_REQ] = 1

    def take_done(self, slot: int) -> int:
        """``slot``'s finished-shard count, zeroed (a worker that is gone)."""
        n = int(self._a[slot, _DONE])
        self._a[slot, _DONE] = 0
        return n

    def done_total(self) -> int:
        return int(self._a[:, _DONE].sum())

    def heap_kept(self, slot: int) -> int:
        return int(self._a[slot, _HEAP_KEPT])

    def pid(self, slot: int) -> int:
        return int(self._a[slot, _PID])

    def close(self) -> None:
        self._buf.close()


class StatusRow:
    """Worker side: the one writer of a slot's row."""

    __slots__ = ("_r", "slot")

    def __init__(self, table: StatusTable, slot: int) -> None:
        self.slot = slot
        self._r = memoryview(table._a[slot])  # int64 stores through a memoryview are cheapest

    def set_pid(self, pid: int) -> None:
        self._r[_PID] = pid

    def shard_begin(self, sid: int) -> int:
        """``sid`` starts now: current, start time, then RUNNING.  Returns t0 (ns)."""
        r = self._r
        r[_CURRENT] = sid
        t0 = time.monotonic_ns()
        r[_START_NS] = t0
        r[_STATE] = STATE_RUNNING
        return t0

    def shard_end(self, done: "DoneMap | None", sid: int, mark: int) -> int:
        """``sid`` finished: its done mark (1/2; 0 = failed, none), then IDLE.  Returns t1 (ns)."""
        if mark and done is not None:
            done._mv[sid] = mark
        self._r[_STATE] = STATE_IDLE
        return time.monotonic_ns()

    def shard_next(self, done: "DoneMap", sid: int, mark: int, nxt: int) -> int:
        """Inside a block (state stays RUNNING): mark ``sid`` done, start ``nxt``.  Returns now (ns)."""
        r = self._r
        if mark:
            done._mv[sid] = mark
        r[_CURRENT] = nxt
        t = time.monotonic_ns()
        r[_START_NS] = t
        return t

    def block_begin(self, start: int, count: int) -> int:
        """A block of ``count`` ids from ``start`` begins (RUNNING its first shard)."""
        r = self._r
        r[_BLOCK0] = start
        r[_BLOCKN] = count
        return self.shard_begin(start)

    def block_end(self, done: "DoneMap", sid: int, mark: int, ok: int) -> int:
        """The block is over after ``sid`` (its done mark ``mark``, 0 = none):
        IDLE, and ``ok`` more shards finished.  Returns now (ns)."""
        r = self._r
        if mark:
            done._mv[sid] = mark
        r[_STATE] = STATE_IDLE
        r[_DONE] += ok
        return time.monotonic_ns()

    def set_idle(self) -> None:
        self._r[_STATE] = STATE_IDLE

    def set_sending(self, sid: int | None) -> None:
        self._r[_SENDING] = 0 if sid is None else sid + 1

    def set_heap_kept(self, nbytes: int) -> None:
        self._r[_HEAP_KEPT] = nbytes

    def exit_requested(self) -> bool:
        return bool(self._r[_EXIT_REQ])


class DoneMap:
    """One byte per shard of a call, shared by the master and its workers."""

    def __init__(self, num: int) -> None:
        self._buf = buffer(np.uint8, max(num, 1))
        self.num = num
        self._a = self._buf.array
        self._mv = self._a.data

    @property
    def segment(self):  # type: ignore[no-untyped-def]
        return self._buf.segment

    @property
    def array(self) -> np.ndarray:
        """The underlying bytes (for descriptors only: read with :meth:`get`/:meth:`count`)."""
        return self._a

    @classmethod
    def attach(cls, arr: np.ndarray) -> "DoneMap":
        """A worker's handle on the map mapped at ``arr`` (a uint8 view)."""
        self = cls.__new__(cls)
        self._buf = None
        self.num = arr.shape[0]
        self._a = arr
        self._mv = arr.data
        return self

    def get(self, sid: int) -> int:
        return int(self._mv[sid])

    def count(self) -> int:
        """Shards marked done."""
        return int(np.count_nonzero(self._a[: self.num]))

    def close(self) -> None:
        if self._buf is not None:
            self._buf.close()
