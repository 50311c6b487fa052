"""A set of shard ids kept as runs of consecutive ids: what an rpc worker holds.

The master's per-worker in-flight set (``supervisor.WorkerState.inflight``)
used to be a dict with one key per id: a chunk of 8,000 fresh ids cost 8,000
inserts when sent and 8,000 pops when its frame came back (~0.17 s of the
master's CPU per million tiny shards, a quarter of such a call).  Chunks of
fresh ids are ranges and frames report ranges, so this keeps ``[start,
stop)`` runs: adding or removing a run is O(runs held), not O(ids).  A worker
holds a few dozen chunks at most, so the runs stay few; ids that are not
consecutive (retries) are runs of one.

Only what the dispatcher needs: ``add``, ``discard_run``, ``discard``,
``in``, ``len``, ``bool``, iteration in insertion order of runs, ``clear``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class IdRuns:
    """Disjoint runs ``[start, stop)`` of ids and their total count."""

    __slots__ = ("_runs", "_n")

    def __init__(self) -> None:
        self._runs: list[list[int]] = []  # [start, stop] pairs, disjoint, in the order added
        self._n = 0

    def add(self, ids: Iterable[int]) -> None:
        """Add ids not held yet (a ``range`` of step 1 is one run; other
        iterables are split into runs of consecutive ids)."""
        runs = self._runs
        if isinstance(ids, range) and ids.step == 1:
            if len(ids):
                runs.append([ids.start, ids.stop])
                self._n += len(ids)
            return
        cur: list[int] | None = None
        for s in ids:
            if cur is not None and s == cur[1]:
                cur[1] += 1
            else:
                cur = [s, s + 1]
                runs.append(cur)
            self._n += 1

    def discard_run(self, a: int, b: int) -> None:
        """Remove every held id in ``[a, b)``."""
        if a >= b or not self._n:
            return
        out: list[list[int]] = []
        removed = 0
        for r in self._runs:
            s, e = r
            if e <= a or s >= b:
                out.append(r)
                continue
            lo, hi = max(s, a), min(e, b)
            removed += hi - lo
            if s < lo:
                out.append([s, lo])
            if hi < e:
                out.append([hi, e])
        self._runs = out
        self._n -= removed

    def discard(self, sid: int) -> None:
        self.discard_run(sid, sid + 1)

    def __contains__(self, sid: object) -> bool:
        return any(s <= sid < e for s, e in self._runs)  # type: ignore[operator]

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __iter__(self) -> Iterator[int]:
        for s, e in self._runs:
            yield from range(s, e)

    def clear(self) -> None:
        self._runs = []
        self._n = 0

    def __repr__(self) -> str:
        return f"IdRuns({[tuple(r) for r in self._runs]})"
