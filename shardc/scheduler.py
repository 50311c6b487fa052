"""The scheduler: which shard runs next, how many at once, and what a failure costs.

Shared by every dispatcher.  It owns one call's queue of shard ids (fresh ids
are a counter, retries a deque: O(1) memory per pending shard), attempts,
per-shard state and results, chunk sizing (fixed, or tuned online from the
measured shard time) and the huge-kernel throttle
(``scheduler_policy={"max_huge_concurrency": k}``).  It never talks to a
worker: dispatchers take chunks from it and report outcomes to it; the
supervisor reports deaths to it.

A front end that streams values (``shard_reduce``) gives a ``sink``: each
final outcome goes to ``sink(sid, value, ok)`` as it arrives and the
scheduler keeps no value (``results`` holds only None), so the master holds only
what the sink keeps.

Retries: a shard runs at most ``1 + max_retries`` times.  Exceptions known
to be deterministic (a ``cow="deny"`` violation, a binding error, an
unpicklable return value) fail at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from .diagnostics import Diagnostics
from .protocol import raise_from_record
from .result import FailedShard, ShardFailure

PENDING, DONE, FAILED = 0, 1, 2


class Scheduler:
    """One call's shard bookkeeping (see the module docstring).

    Args:
        num: number of shards.
        max_retries: retries per shard after a failure.
        chunk: shards per dispatch to start with.
        autotune: None, or ``{"target_chunk_seconds", "max_rounds"}`` for online tuning.
        huge: None, or ``(k, is_huge)``: at most ``k`` chunks holding shards
            for which ``is_huge(sid)`` is true run at once.
        diag: the call's diagnostics record.
        sink: None (values are kept in ``results``), or ``sink(sid, value,
            ok)`` called once per shard with its final outcome (``ok``
            False: ``value`` is its :class:`ShardFailure`); nothing is kept.
    """

    def __init__(
        self,
        num: int,
        max_retries: int,
        chunk: int,
        autotune: dict[str, Any] | None,
        huge: tuple[int, Any] | None,
        diag: Diagnostics,
        sink: Any = None,
    ) -> None:
        self.num = num
        self.max_retries = max_retries
        self.chunk = chunk
        self.autotune = autotune
        self.huge = huge
        self.diag = diag
        self.sink = sink
        self.next_fresh = 0
        self.retry: deque[int] = deque()
        self.attempts = np.zeros(num, dtype=np.int16)
        self.state = bytearray(num)  # PENDING/DONE/FAILED (bytearray: cheap scalar access)
        self._results: list[Any] | None = None  # made on first store: see results_or_count
        self.failures: dict[int, ShardFailure] = {}
        self.history: dict[int, list[str]] = {}
        self.completed = 0
        self.n_failed = 0
        self.retries_total = 0
        self.ewma_shard_s: float | None = None  # measured seconds per shard
        self.huge_inflight = 0
        self.huge_ids: set[int] = set()
        # Ids lost inside a worker's speculative run (shardc.worker.spec): dispatched in
        # careful chunks (one shard at a time) until they report, so a crash is charged to one.
        self.careful: set[int] = set()

    @property
    def results(self) -> list[Any]:
        """One value per shard (None where nothing was stored), made on first use."""
        if self._results is None:
            self._results = [None] * self.num
        return self._results

    def results_or_count(self) -> list[Any] | int:
        """``results``, or just ``num`` when nothing was ever stored (every
        value None: an shm_queue call without failures), so that a call of
        20M shards does not build a 20M-entry list nobody reads
        (``ShardResult`` makes it when first asked)."""
        return self._results if self._results is not None else self.num

    # -- taking work ---------------------------------------------------------------------
    def finished(self) -> bool:
        return self.completed + self.n_failed >= self.num

    def pending_count(self) -> int:
        return len(self.retry) + (self.num - self.next_fresh)

    def take_chunk(self, size: int) -> Sequence[int]:
        """Up to ``size`` ids: retries first, then fresh ones; a ``range``
        when there is no retry among them (no Python int per id: a chunk of
        tiny shards holds thousands)."""
        if not self.retry:
            start, k = self.take_fresh(size)
            return range(start, start + k)
        ids: list[int] = []
        while self.retry and len(ids) < size:
            ids.append(self.retry.popleft())
        if len(ids) < size and self.next_fresh < self.num:
            k = min(size - len(ids), self.num - self.next_fresh)
            ids.extend(range(self.next_fresh, self.next_fresh + k))
            self.next_fresh += k
        return ids

    def take_fresh(self, size: int) -> tuple[int, int]:
        """Up to ``size`` fresh ids as a range ``(start, count)`` (count 0:
        none left), without a Python object per id: the shm_queue feeder
        hands out ranges (retries it takes from ``retry`` itself)."""
        start = self.next_fresh
        k = max(0, min(size, self.num - start))
        self.next_fresh = start + k
        return start, k

    def task_data(self, ids: Sequence[int]) -> tuple[list[Any], list[Any], list[Any]] | None:
        """What the workers need for ``ids`` beyond their ids, sent with the
        chunk: ``(data per id, segments, shared)`` (the worker's call
        descriptor gets the data; segments it does not hold yet travel as
        fds; ``shared``: descriptors of arrays in them the worker maps, under
        the call's cow policy, before the chunk runs), or None for a
        shard_map call, where an id says it all.  Open calls (``shardc.stream``)
        send each task's pickled function and arguments, and big array
        arguments by reference."""
        return None

    def put_back(self, ids: Sequence[int]) -> None:
        """Return ids that were taken but not handed out (they go first)."""
        for s in reversed(ids):
            self.retry.appendleft(s)

    def requeue(self, ids: list[int]) -> None:
        """Shards a dead or leaving worker held, not run to the end: again, first, free of charge."""
        queued = set(self.retry) if len(ids) > 1 else ()
        for s in reversed(ids):
            if self.state[s] == PENDING and s not in queued:
                self.retry.appendleft(s)

    def admit(self, ids: Sequence[int]) -> bool:
        """The huge-kernel throttle: False (ids put back) when this chunk would
        exceed ``max_huge_concurrency``; else count it as running."""
        if self.huge is None:
            return True
        cap, is_huge = self.huge
        huge = [s for s in ids if is_huge(s)]
        if not huge:
            return True
        if self.huge_inflight + 1 > cap:
            self.put_back(ids)
            self.diag.throttle(-1, len(huge))
            return False
        self.huge_inflight += 1
        self.huge_ids.update(huge)
        return True

    def released(self, sid: int) -> None:
        """``sid`` is no longer running (finished, failed or lost): free its huge slot."""
        if self.huge_ids and sid in self.huge_ids:
            self.huge_ids.discard(sid)
            self.huge_inflight = max(0, self.huge_inflight - 1)

    def observe(self, seconds_per_shard: float, weight: float = 0.2, count: int = 1) -> None:
        """A measured shard time, the mean over ``count`` shards (for
        autotuning and queue depth): weighs as ``count`` observations of it,
        so a report of many shards moves the estimate at once (from
        ``chunk_size=1`` the chunk reaches its tuned size after one report of
        a few hundred shards, ~1 ms, not after dozens of reports)."""
        e = self.ewma_shard_s
        if count > 1:
            weight = 1.0 - (1.0 - weight) ** min(count, 64)
        self.ewma_shard_s = seconds_per_shard if e is None else (1 - weight) * e + weight * seconds_per_shard

    def chunk_size(self, workers: int) -> int:
        """Shards per dispatch now: fixed, or ~target seconds of work (keeping
        about 4 chunks per worker in what is left, for balance)."""
        if self.autotune and self.ewma_shard_s is not None:
            target = float(self.autotune["target_chunk_seconds"])
            want = max(1, int(target / max(self.ewma_shard_s, 1e-7)))
            cap = max(1, self.pending_count() // (4 * workers))
            want = min(want, cap, 1 << 16)
            if want != self.chunk:
                self.diag.autotune_step(self.chunk, want, self.ewma_shard_s)
                self.chunk = want
        return self.chunk

    # -- outcomes ------------------------------------------------------------------------
    def record_success(self, sid: int, value: Any) -> None:
        if self.state[sid] != PENDING:
            return  # a duplicate (a retried shard whose first run also reported)
        self.state[sid] = DONE
        self.completed += 1
        if self.sink is not None:
            self.sink(sid, value, True)
        else:
            self.results[sid] = value

    def record_run(self, start: int, values: list[Any]) -> None:
        """Shards ``start .. start + len(values) - 1`` succeeded with these
        values (an rpc frame): slice stores when every one is still pending,
        else (duplicates from a rerun, a sink, a subclass that delivers each
        value) one :meth:`record_success` each."""
        n = len(values)
        stop = start + n
        if (
            self.sink is None
            and type(self).record_success is Scheduler.record_success
            and self.state.count(PENDING, start, stop) == n
        ):
            self.state[start:stop] = bytes((DONE,)) * n
            self.results[start:stop] = values
            self.completed += n
            return
        for k, v in enumerate(values):
            self.record_success(start + k, v)

    def record_failure(self, sid: int, err: dict[str, Any], charge: bool = True, worker: int | None = None) -> None:
        """An attempt of ``sid`` failed on worker slot ``worker`` (``err``: a protocol error record);
        retry it or fail it for good."""
        if self.state[sid] != PENDING:
            return
        if charge:
            self.attempts[sid] += 1
        hist = self.history.setdefault(sid, [])
        hist.append(f"attempt {int(self.attempts[sid])}: {err['type'].rsplit('.', 1)[-1]}: {err['message']}")
        if err.get("deterministic") or self.attempts[sid] > self.max_retries:
            exc = raise_from_record(err) if err.get("exc") is not None or err.get("traceback") else None
            fail = ShardFailure(
                sid, int(self.attempts[sid]), err["type"], err["message"], err.get("traceback", ""), exc, hist
            )
            self.failures[sid] = fail
            self.state[sid] = FAILED
            self.n_failed += 1
            self.diag.attempt_failed(sid, worker, int(self.attempts[sid]), err, final=True)
            if self.sink is not None:
                self.sink(sid, fail, False)
            else:
                self.results[sid] = FailedShard(fail)
        else:
            self.retries_total += 1
            self.retry.append(sid)
            self.diag.attempt_failed(sid, worker, int(self.attempts[sid]), err, final=False)
