"""Open calls: a call whose tasks arrive while it runs (the engine under
:class:`shardc.Executor` and ``Pool.map``/``imap``).

A ``shard_map`` call is finite: N shard ids known up front, results collected
into a list.  An open call runs on the same engine, unchanged: the
:class:`~shardc.supervisor.Supervisor` (the one event loop, watchdog, death
handler and replace path) drives an :class:`~shardc.dispatch_rpc.RpcDispatcher`
over the pool's workers.  What differs lives here, in a :class:`Scheduler`
subclass and a call descriptor:

* **ids are slots.**  The call's ids are the slots of a fixed table of
  ``capacity`` entries (:class:`TaskTable`).  A task fed to the call
  (:meth:`StreamScheduler.feed`, from any thread) waits in a deque until a
  slot is free; it gets one when the dispatcher takes a chunk and gives it
  back when its outcome is delivered (done mark cleared, attempts reset).  So
  the done map and the scheduler's arrays stay ``capacity`` long however many
  tasks the call runs, and ``capacity`` bounds the tasks in flight.
* **tasks carry data.**  Each task's pickled function and arguments ride
  with its chunk (:meth:`StreamScheduler.task_data` ->
  ``(RUN, call_id, ids, data)`` -> :meth:`TaskTable.feed` in the worker, whose
  shard for the id is then that data).  The master keeps the data until the
  task is delivered, so a retry after a death resends it.
* **outcomes go to a callback** per task (``deliver(key, ok, value)``) instead
  of into a results list, and the call finishes once the feed is closed
  (:meth:`StreamScheduler.close`) and every task is delivered.  Feeding and
  closing wake the supervisor's loop through ``Call.wake`` (a :class:`Waker`).

Batching: a RUN message carries one task while tasks are long or few (a
worker gets its next task when it reports the last, so no task waits behind
a long one).  When tasks wait for a worker (fed faster than the workers
finish them) and are short, it carries several, about ``BATCH_S`` of work
(:meth:`StreamScheduler.chunk_size`), so the round trip to the master and
the messages are paid per batch, not per task.

Retries: a task is run again only after its worker died (crash or memory kill:
``WorkerCrashedError``, ``WorkerMemoryError``), up to ``max_retries`` times.  An
exception the task raised, or a timeout, fails it at once: it would do the
same again (``concurrent.futures`` semantics; ``shard_map`` retries those too).
"""

from __future__ import annotations

import gc
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .diagnostics import Diagnostics
from .scheduler import FAILED, PENDING, Scheduler
from .status import DoneMap

# Error records of these types (a death, charged by the supervisor) are retried.
RETRIED = ("shardc.errors.WorkerCrashedError", "shardc.errors.WorkerMemoryError")

Deliver = Callable[[Any, bool, Any], None]  # (key, ok, value or ShardFailure)

BATCH_S = 0.001  # seconds of work per RUN message when short tasks wait (see chunk_size)
MAX_BATCH = 64  # tasks per RUN message at most


class Waker:
    """A socket pair that makes the supervisor's ``select`` return: ``wake``
    from any thread, ``drain`` in the loop."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.on_wake: Callable[[], None] | None = None  # run in the loop's thread after each drain

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        try:
            os.write(self._w, b"\0")
        except OSError:
            pass  # full (a wake is pending anyway) or closed

    def drain(self) -> None:
        try:
            while len(os.read(self._r, 4096)) == 4096:  # one read empties it (no EAGAIN raised) but for a flood
                pass
        except OSError:
            pass
        if self.on_wake is not None:
            self.on_wake()

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1


def gc_paused(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with the cyclic garbage collector paused, unless it is off
    already (then it stays off): for work that makes many containers and no
    garbage cycles, which the GC would otherwise walk again and again."""
    if not gc.isenabled():
        return fn(*args)
    gc.disable()
    try:
        return fn(*args)
    finally:
        gc.enable()


class Task:
    """A task's data in a worker; :meth:`load` unpickles it (inside the
    shard's error handling, so a task that cannot be loaded fails alone)."""

    __slots__ = ("blob", "loader")

    def __init__(self, blob: bytes, loader: Callable[[bytes], Any]) -> None:
        self.blob = blob
        self.loader = loader

    def load(self) -> Any:
        # A big task (a joblib batch of 65,536 calls) unpickles into as many
        # containers, and the cyclic GC would run over all of the worker's
        # objects again and again meanwhile (its loads took ~15x longer:
        # 120-170 ms instead of 8 ms).  Unpickling creates no garbage cycles.
        return gc_paused(self.loader, self.blob)


class TaskTable:
    """The call descriptor of an open call (sent to workers with the call).

    In a worker, :meth:`feed` stores the data that came with a chunk and
    :meth:`shard` hands a slot's :class:`Task` to the call's function (once)."""

    def __init__(self, capacity: int) -> None:
        self.num_shards = capacity
        self._data: dict[int, Task] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"num_shards": self.num_shards, "_data": {}}

    def feed(self, ids: list[int], data: list[bytes], loader: Callable[[bytes], Any]) -> None:
        for k, blob in zip(ids, data, strict=True):
            self._data[k] = Task(blob, loader)

    def shard(self, k: int, seedseq: Any = None) -> Task | None:
        return self._data.pop(k, None)


class StreamScheduler(Scheduler):
    """The scheduler of an open call (see the module docstring).

    Args:
        capacity: slots (tasks in flight at most).
        max_retries: retries of a task whose worker died.
        deliver: called in the supervisor's thread with ``(key, True, value)``
            or ``(key, False, ShardFailure)`` once per task.
        accept: called with a task's key when it gets a slot; False drops
            the task (it was cancelled).
        donemap: the call's done map (marks of freed slots are cleared).
        waker: woken when tasks are fed or the feed is closed.
        diag: the call's diagnostics record.
        prepare: None (tasks are fed as data), or a function that turns a
            fed task into ``(data, refs)`` when it gets a slot, in the
            supervisor's thread (the caller's thread only queues it: a
            ``submit`` does not pickle, as ``ProcessPoolExecutor``'s does not).
        reject: ``reject(key, exc)`` when ``prepare`` raised (the task is
            dropped; its slot stays free).
    """

    def __init__(
        self,
        capacity: int,
        max_retries: int,
        deliver: Deliver,
        accept: Callable[[Any], bool],
        donemap: DoneMap,
        waker: Waker,
        diag: Diagnostics,
        prepare: Callable[[Any], tuple[Any, Any]] | None = None,
        reject: Callable[[Any, BaseException], None] | None = None,
    ) -> None:
        super().__init__(capacity, max_retries, 1, None, None, diag)
        self.prepare = prepare
        self.reject = reject
        self.deliver = deliver
        self.accept = accept
        self.donemap = donemap
        self.waker = waker
        self.incoming: deque[tuple[Any, Any, Any]] = deque()  # (key, data, refs), fed from any thread
        self.free = list(range(capacity - 1, -1, -1))  # slots not in use (pop() gives the lowest first)
        self.keys: list[Any] = [None] * capacity
        self.data: dict[int, Any] = {}
        self.refs: dict[int, tuple[Any, Any]] = {}  # slot -> (segments, shared descriptors) its data refers to
        self.closed = False
        self.next_fresh = capacity  # the base class's fresh-id counter is not used
        self.outbox: list[tuple[Any, bool, Any]] = []  # outcomes held until the worker got its next task

    # -- the feed (any thread) ---------------------------------------------------------
    def feed(self, key: Any, data: Any, refs: tuple[Any, Any] | None = None) -> None:
        """A task: ``data`` (bytes, unpickled in the worker by its loader),
        with ``refs``: None, or ``(segments, shared descriptors)`` of the
        arrays it refers to (segments go to workers that lack them)."""
        incoming = self.incoming
        incoming.append((key, data, refs))
        if len(incoming) == 1:
            # Else a wake is pending, or the tasks before this one wait for a
            # free slot and a delivery will dispatch them (and this one); two
            # threads feeding at once may both skip it: the loop's tick (50 ms)
            # dispatches then.
            self.waker.wake()

    def close(self) -> None:
        """No more tasks: the call finishes once those fed are delivered."""
        self.closed = True
        self.waker.wake()

    def take_incoming(self) -> list[tuple[Any, Any, Any]]:
        """Remove and return the tasks fed but not started (to cancel them)."""
        out = []
        while True:
            try:
                out.append(self.incoming.popleft())
            except IndexError:
                return out

    # -- the Scheduler interface (the supervisor's thread) -------------------------------
    def finished(self) -> bool:
        return self.closed and not self.incoming and not self.outbox and len(self.free) == self.num

    def pending_count(self) -> int:
        return len(self.retry) + (len(self.incoming) if self.free else 0)

    def in_flight(self) -> int:
        return self.num - len(self.free)

    def chunk_size(self, workers: int) -> int:
        """Tasks per RUN message: 1, unless tasks wait (at least two per
        worker) and are short: then ~``BATCH_S`` of work (measured mean),
        at most ``MAX_BATCH`` and half of a worker's share of the backlog."""
        e = self.ewma_shard_s
        backlog = len(self.incoming) + len(self.retry)
        if e is None or backlog < 2 * workers:
            return 1
        return max(1, min(MAX_BATCH, int(BATCH_S / max(e, 1e-6)), backlog // (2 * workers)))

    def take_chunk(self, size: int) -> list[int]:
        ids: list[int] = []
        while self.retry and len(ids) < size:
            ids.append(self.retry.popleft())
        while len(ids) < size and self.free:
            try:
                key, data, refs = self.incoming.popleft()
            except IndexError:
                break
            if not self.accept(key):
                continue
            if self.prepare is not None:
                try:
                    data, refs = self.prepare(data)
                except Exception as exc:  # noqa: BLE001 - that task fails alone
                    if self.reject is not None:
                        self.reject(key, exc)
                    continue
            sid = self.free.pop()
            self.keys[sid] = key
            self.data[sid] = data
            if refs:
                self.refs[sid] = refs
            self.state[sid] = PENDING
            self.attempts[sid] = 0
            ids.append(sid)
        return ids

    def task_data(self, ids: Sequence[int]) -> tuple[list[Any], list[Any], list[Any]]:
        data, refs = self.data, self.refs
        if not refs:
            return [data[s] for s in ids], [], []
        segs: dict[str, Any] = {}
        shared: list[Any] = []
        for s in ids:
            r = refs.get(s)
            if r is not None:
                for seg in r[0]:
                    segs[seg.key] = seg
                shared.extend(r[1])
        return [data[s] for s in ids], list(segs.values()), shared

    def record_success(self, sid: int, value: Any) -> None:
        if self.state[sid] != PENDING:
            return
        self.state[sid] = 1  # DONE
        self.completed += 1
        self._release(sid, True, value)

    def record_failure(self, sid: int, err: dict[str, Any], charge: bool = True, worker: int | None = None) -> None:
        if self.state[sid] != PENDING:
            return
        if err["type"] not in RETRIED:
            err = {**err, "deterministic": True}
        super().record_failure(sid, err, charge, worker)
        if self.state[sid] == FAILED:
            fail = self.failures.pop(sid)
            self.results[sid] = None
            self._release(sid, False, fail)

    def _release(self, sid: int, ok: bool, value: Any) -> None:
        key = self.keys[sid]
        self.keys[sid] = None
        self.data.pop(sid, None)
        self.refs.pop(sid, None)
        self.history.pop(sid, None)
        self.diag.attempt_log.pop(sid, None)
        self.donemap.clear(sid)
        self.free.append(sid)
        diag = self.diag
        if len(diag.mem) > 4096 or len(diag.master_mem) > 4096:  # a long-lived call keeps the recent samples
            del diag.mem[:2048], diag.master_mem[:2048]
        if not (self.incoming or self.retry):
            self.deliver(key, ok, value)
            return
        # Tasks wait: the worker that reported gets its next one first (the
        # dispatcher fills it after recording its outcomes), then the outcome
        # is delivered (flush, on the wake): a delivery's callbacks (joblib
        # dispatching its next batches) no longer keep the worker idle.
        if not self.outbox:
            self.waker.wake()
        self.outbox.append((key, ok, value))

    def flush(self) -> None:
        """Deliver the outcomes held back by ``_release``."""
        while self.outbox:
            out, self.outbox = self.outbox, []
            for key, ok, value in out:
                self.deliver(key, ok, value)

    def drop_all(self) -> list[Any]:
        """Stop: every task not delivered is dropped (slots freed, nothing
        retried); returns their keys, in flight first, then those fed."""
        self.flush()
        for sid, k in enumerate(self.keys):
            if k is not None:
                self.state[sid] = FAILED
                self.donemap.clear(sid)
                self.free.append(sid)
        self.retry.clear()
        self.history.clear()
        return self.abandon()

    def abandon(self) -> list[Any]:
        """The call stopped for good: the keys of every task not delivered
        (in flight, then fed), which the caller fails."""
        self.flush()  # those done are delivered as they are
        keys = [k for k in self.keys if k is not None]
        self.keys = [None] * self.num
        self.data.clear()
        self.refs.clear()
        return keys + [t[0] for t in self.take_incoming()]
