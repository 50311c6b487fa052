"""The pieces of ``shard_reduce``: groups, the worker's fold, the master's tree, the result.

Determinism comes from fixing the whole combine tree by shard ids alone::

    shards 0 .. N-1 ──> groups of G consecutive ids (G from N only: group_size)
                          │  worker: acc = copy of init; for id in group (in order):
                          │          acc = combine(acc, map(shard, **borrow, **out))
                          ▼
    group partials P0 P1 P2 P3 P4 ...  (arrive in any order, from any worker)
                          │  master: a binary tree by group index, each node
                          │  combined as soon as both children exist
                          ▼
                 ((P0+P1)+(P2+P3)) + (P4 ...)  ──>  value

The engine runs one task per *group* (:class:`GroupDescriptor`): the
scheduler, supervisor and dispatchers see group ids, so a retried group (an
exception, a killed worker mid-group) is rerun whole and counted once; which
worker ran it, how groups were chunked and the dispatch mode change nothing
in the order of any ``combine``.  ``shard.rng`` and the legacy RNG seeding
are those of ``shard_map`` for the same shard id.

The fold writes the id of the shard it is folding into a small shared array
(one int64 per group), so a group that fails, even by its worker dying,
is reported under the shard that was running.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .diagnostics import report
from .errors import InvalidTypeError
from .result import ShardFailure, _plain
from .shards import ShardDescriptor, reusable_shard
from .worker.executor import seed_legacy
from .worker.seeding import Legacy

AT_NAME = "_shardc_reduce_at"  # the out= name of the per-group "folding shard" array
TARGET_GROUPS = 1024  # group_size="auto": about this many groups (from num_shards only)
NONE_HINT = "combine returned None as the accumulator: an in-place combine must return it, e.g. a += b; return a"
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes)  # not tuples: they may hold arrays


def auto_group_size(num_shards: int) -> int:
    """Shards per group for ``group_size="auto"``: a function of ``num_shards``
    only (never of workers, chunking or mode), so the value does not change
    with them: ``ceil(num_shards / 1024)``."""
    return max(1, math.ceil(num_shards / TARGET_GROUPS))


class Group:
    """One task of a reduction: shards ``start .. stop-1`` of the caller's descriptor."""

    __slots__ = ("id", "start", "stop", "_seedseq", "make")

    def __init__(self, gid: int, start: int, stop: int, seedseq: Any = None, make: Any = None) -> None:
        self.id, self.start, self.stop, self._seedseq = gid, start, stop, seedseq
        self.make = make  # the caller's descriptor's shard factory: make(sid, seedseq) -> Shard

    def __repr__(self) -> str:
        return f"Group(id={self.id}, shards={self.start}..{self.stop - 1})"


class GroupDescriptor:
    """The engine's view of a reduction: ``num_shards`` groups of ``size`` consecutive shards."""

    def __init__(self, inner: ShardDescriptor, size: int) -> None:
        self.inner = inner
        self.size = size
        self.n_inner = inner.num_shards
        self.num_shards = math.ceil(self.n_inner / size)
        self.n = self.num_shards
        self.strategy = "groups"

    def bounds(self, g: int) -> tuple[int, int]:
        start = g * self.size
        return start, min(start + self.size, self.n_inner)

    def shard(self, g: int, seedseq: Any = None) -> Group:
        start, stop = self.bounds(g)
        return Group(g, start, stop, seedseq, self.inner.shard)

    def maker(self) -> Callable[..., Group]:
        """The worker's group factory; each group carries the caller's fast
        shard factory (``ShardDescriptor.maker``), built once per call."""
        inner = self.inner.maker() if hasattr(self.inner, "maker") else self.inner.shard
        size, n = self.size, self.n_inner

        def make(g: int, seedseq: Any = None) -> Group:
            start = g * size
            return Group(g, start, min(start + size, n), seedseq, inner)

        return make

    def __len__(self) -> int:
        return self.num_shards

    def __iter__(self) -> Iterator[Group]:
        for g in range(self.num_shards):
            yield self.shard(g)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": "groups",
            "num_shards": self.num_shards,
            "group_size": self.size,
            "of": self.inner.to_dict(),
        }


def fresh(init: Any) -> Any:
    """A copy of ``init`` for one group (an in-place ``combine`` must not
    change the identity the next group starts from)."""
    return init if type(init) in _IMMUTABLE else copy.deepcopy(init)


class Fold:
    """What a worker runs per group: fold the group's shards in id order.

    Called by the engine like ``fun``: ``fold(group, **borrow, **out)``.
    """

    def __init__(self, fn: Callable[..., Any], combine: Callable[[Any, Any], Any], init: Any, seeded: bool) -> None:
        self.fn = fn
        self.combine = combine
        self.init = init
        self.seeded = seeded
        self.legacy: Legacy | None = None  # a worker's lazy seeding of this call (seed=), made there

    def __call__(self, group: Group, **kw: Any) -> Any:
        make = group.make
        at = memoryview(kw.pop(AT_NAME))
        fn, combine, seeded = self.fn, self.combine, self.seeded
        ent = group._seedseq
        g = group.id
        acc = fresh(self.init)
        cls = getattr(make, "block_class", None)
        if kw:
            fn = functools.partial(fn, **kw)
        try:
            if cls is not None:
                # The hot case: contiguous shards made inline, one shard object
                # reused while fn keeps no reference to it (as the engine's
                # speculative loops do, shardc.worker.spec).  With seed=,
                # random/np.random are seeded lazily (shardc.worker.seeding):
                # a group whose shards drew unseeded is folded again, seeded.
                lg = None
                if seeded:
                    if self.legacy is None:
                        self.legacy = Legacy(ent, self.fn)
                    lg = self.legacy
                    fn = lg.loop_start(fn)
                off = getattr(make, "id_offset", 0)
                refs = sys.getrefcount
                shard = reusable_shard(cls, ent)
                while True:
                    try:
                        for sid in range(group.start, group.stop):
                            at[g] = sid
                            if refs(shard) > 2:
                                shard = reusable_shard(cls, ent)
                            shard.id = sid + off
                            shard._rng = None
                            acc = combine(acc, fn(shard))
                    except Exception:
                        if lg is None or not lg.drawn():
                            raise
                    else:
                        if lg is None or not lg.drawn():
                            break
                    fn, acc = lg.redo(), fresh(self.init)
            else:
                for sid in range(group.start, group.stop):
                    at[g] = sid
                    if seeded:
                        seed_legacy(ent, sid)
                    acc = combine(acc, fn(make(sid, ent)))
        except TypeError as exc:
            if acc is None and self.init is not None:
                raise InvalidTypeError(f"{exc} ({NONE_HINT})") from exc
            raise
        return acc


_ABSENT = object()  # a failed group's place in the tree (the identity: nothing to add)


def partial_bytes(value: Any) -> int:
    """The size of a partial (``nbytes`` for arrays, else ``sys.getsizeof``)."""
    n = getattr(value, "nbytes", None)
    return int(n) if isinstance(n, (int, np.integer)) else sys.getsizeof(value)


class TreeCombiner:
    """The master's half: a fixed binary tree over group indexes.

    Node ``(level, i)`` is ``combine(node(level-1, 2i), node(level-1, 2i+1))``,
    a node without a right sibling moves up unchanged, a failed group is an
    absent leaf.  A node is combined as soon as both children exist, so the
    master holds at most one pending node per level per run of groups still
    in flight: O(workers x log(groups)) partials.
    """

    def __init__(self, num_groups: int, combine: Callable[[Any, Any], Any]) -> None:
        self.combine = combine
        self.sizes = [num_groups]
        while self.sizes[-1] > 1:
            self.sizes.append(math.ceil(self.sizes[-1] / 2))
        self.nodes: list[dict[int, Any]] = [{} for _ in self.sizes]
        self.value: Any = _ABSENT
        self.error: BaseException | None = None
        self.error_where = ""
        self.held = 0
        self.max_held = 0
        self.steps = 0
        self.partials = 0
        self.max_bytes = 0

    def put(self, g: int, value: Any, ok: bool = True) -> None:
        """Group ``g`` finished (``ok``) with partial ``value``, or failed for good."""
        if ok:
            self.partials += 1
            self.max_bytes = max(self.max_bytes, partial_bytes(value))
        else:
            value = _ABSENT
        level, i = 0, g
        top = len(self.sizes) - 1
        while level < top:
            sib = i ^ 1
            nodes = self.nodes[level]
            if sib < self.sizes[level]:
                if sib not in nodes:
                    nodes[i] = value
                    self.held += 1
                    self.max_held = max(self.max_held, self.held)
                    return
                other = nodes.pop(sib)
                self.held -= 1
                value = self._join(other, value, level) if sib < i else self._join(value, other, level)
            level, i = level + 1, i // 2
        self.value = value

    def _join(self, left: Any, right: Any, level: int) -> Any:
        if left is _ABSENT:
            return right
        if right is _ABSENT or self.error is not None:
            return left
        try:
            out = self.combine(left, right)
        except Exception as exc:  # noqa: BLE001 - raised after the run, with where it happened
            self.error = exc
            self.error_where = f"combining two partials at level {level} of the tree"
            if left is None or right is None:
                self.error_where += f" (a partial is None: {NONE_HINT})"
            return _ABSENT
        self.steps += 1
        return out

    def result(self, init: Any) -> Any:
        """The value (``init`` itself when no group succeeded)."""
        return fresh(init) if self.value is _ABSENT else self.value


def shard_failure(fail: ShardFailure, gdesc: GroupDescriptor, at: np.ndarray) -> ShardFailure:
    """A failed group's record, under the shard it was folding."""
    g = fail.shard_id
    start, stop = gdesc.bounds(g)
    sid = int(at[g])
    if not start <= sid < stop:
        sid = start  # it died before its first shard began
    note = (
        f"group {g} (shards {start}..{stop - 1}) failed while folding shard {sid}; "
        "its shards are missing from the value"
    )
    return ShardFailure(
        sid,
        fail.attempts,
        fail.error_type,
        f"{fail.message} [{note}]",
        fail.traceback,
        fail.exception,
        [*fail.history, note],
    )


class ReduceResult:
    """What ``shard_reduce`` returns.

    Attributes:
        value: the reduction over every shard (``on_failure="collect"``: over
            the groups that succeeded; see ``missing``).
        failures: shard id -> :class:`ShardFailure`: per failed group, the
            shard it was folding when it failed.
        missing: ``[(start, stop), ...]``: the shard id ranges (groups) left
            out of ``value`` (empty when every shard is in it).
        diagnostics: the run's :class:`~shardc.diagnostics.Diagnostics` (its
            tasks are groups); ``diagnostics.reduce`` has the reduction's own
            counts: groups, group_size, partials, combine_steps, fold_steps,
            partial_max_bytes, max_partials_held.
        pool_stats: the pool's state after the run (plain data).
        shards: the caller's shard descriptor.
    """

    def __init__(
        self,
        value: Any,
        failures: dict[int, ShardFailure],
        missing: list[tuple[int, int]],
        diagnostics: Any,
        pool_stats: dict[str, Any],
        shards: Any,
    ) -> None:
        self.value = value
        self.failures = failures
        self.missing = missing
        self.diagnostics = diagnostics
        self.pool_stats = _plain(pool_stats)
        self.shards = shards

    @property
    def succeeded(self) -> bool:
        """True when every shard is in the value."""
        return not self.failures

    def missing_ids(self) -> np.ndarray:
        """Every shard id left out of ``value``, ascending (int64)."""
        if not self.missing:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.missing])

    def report(self, level: str = "summary") -> Any:
        """The run's report (see :func:`shardc.diagnostics.report`; its tasks are groups)."""
        return report(self, level=level)

    def __repr__(self) -> str:
        wall = getattr(self.diagnostics, "wall_seconds", None)
        extra = f" in {wall:.3f}s" if wall is not None else ""
        n = int(sum(b - a for a, b in self.missing))
        return f"<ReduceResult {len(self.failures)} failed group(s), {n} shard(s) missing{extra}>"
