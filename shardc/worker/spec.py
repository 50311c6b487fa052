"""Speculative runs: the rpc path of known-short shards (one status write per
run of shards instead of one per shard boundary; see :func:`run_spec`).

A part of the one shard executor (:mod:`shardc.worker.executor`, which calls
this for a chunk of consecutive ids when its running mean says shards are
short); kept in its own module for size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..protocol import ERR, FRAME
from .records import failure_record
from .seeding import seed_legacy

SPEC_RUN_NS = 100_000  # a speculative run holds about this much work: a rerun after a crash is cheap
SPEC_MAX = 4096  # ids in one speculative run, at most


def run_spec(ex: Any, first: int, n: int, append: Callable[[Any], None]) -> None:
    """rpc, known-short shards ``first .. first+n-1`` (no guards, no sink) of
    the executor ``ex`` (a ShardExecutor; outcomes and frames to ``append``):
    speculative runs.  The row says "ids a..b-1 run since t" once per run
    of ~``SPEC_RUN_NS`` of work (``StatusRow.run_call``), and the run's
    done marks are one C call at its end (a run also ends where the mark
    changes: 1 = returned None, 2 = a value to gather, so marks stay
    exact).  A failure closes the run before the failing shard (marks,
    IDLE), is reported as an outcome, and a new run starts after it.  OK
    values go out as frames.  A worker lost inside a run leaves the row
    RUNNING with ``run_n`` > 1 and the run's ids unmarked: the master
    charges none of them and reruns them ``careful``.  A failed shard's
    outcome times start at the last status stamp (not its own start)."""
    fun, kwargs, args, make, entropy, seeded, _guard, done, _diag = ex._bound
    pos = args is not None
    bare = pos and not args  # fun(shard): no argument tuple to unpack
    cls = getattr(make, "block_class", None)
    off = getattr(make, "id_offset", 0)  # a window of a bigger descriptor (a cluster macro-shard): global ids
    new = object.__new__
    row = ex.row
    run_c, rh = row.run_call(done)
    k = max(2, min(SPEC_MAX, SPEC_RUN_NS // max(ex.ewma_ns, 1)))
    stop = first + n
    a, b = first, min(stop, first + k)  # the open run: ids a..b-1, none marked yet
    t = t_first = run_c(rh, 0, 0, 0, a, b - a)
    f_sid, f_t0 = a, t  # the open frame: its first id, its start
    vals: list[Any] = []
    rmark = 0  # the open run's mark (0: none finished yet)
    sid = a
    while sid < stop:
        if cls is None:
            shard = make(sid, entropy)
        else:  # the maker's BlockShard made inline: no call (~0.1 us of a ~0.3 us shard)
            shard = new(cls)
            shard.id = sid + off
            shard._seedseq = entropy
            shard._rng = None
        try:
            if seeded:
                seed_legacy(entropy, shard.id)  # the global id (a cluster agent runs a window)
            value = fun(shard) if bare else fun(shard, *args) if pos else fun(shard, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - everything is reported
            t1 = run_c(rh, a, sid - a, rmark, 0, 0)  # the run ends before sid: its marks, IDLE
            if t1 < 0:
                row.failed(t1, "run_next", a)
            if vals:
                append((f_sid, FRAME, vals, f_t0, t1, None, None))
                vals = []
            rec = failure_record(exc, sid)
            append((sid, ERR, rec, t, t1, None, None))
            t = t1
            sid += 1
            a, b, rmark = sid, min(stop, sid + k), 0
            if sid < stop:
                t = f_t0 = run_c(rh, 0, 0, 0, a, b - a)
                f_sid = sid
            continue
        mark = 1 if value is None else 2
        if mark != rmark:
            if rmark:  # close the run before sid (which is done: the next run marks it)
                t = run_c(rh, a, sid - a, rmark, sid, b - sid)
                if t < 0:
                    row.failed(t, "run_next", a)
                a = sid
            rmark = mark
        vals.append(value)
        sid += 1
        if sid == b:
            b = min(stop, sid + k)
            t = run_c(rh, a, sid - a, rmark, sid, b - sid)  # b == sid at the end: IDLE
            if t < 0:
                row.failed(t, "run_next", a)
            a, rmark = sid, 0
    if vals:
        append((f_sid, FRAME, vals, f_t0, t, None, None))
    ex.learn_run(t_first, t, n)


def run_spec_block(
    ex: Any, start: int, stop: int, on_fail: Callable[[Any], None]
) -> tuple[int, int, int, int, int, None]:
    """shm_queue, known-short shards, the block ``start .. stop-1`` (no
    guards): speculative runs as in :func:`run_spec`, every mark 1 (the
    queue gathers nothing), failures to ``on_fail``.  The row keeps the
    block (``block0``/``blockn``) while runs move ``current``/``run_n``
    through it; the block's end adds its OK count to the row's done counter
    (``block_end``).  Returns the fields of a ``RunStats``."""
    fun, kwargs, args, make, entropy, seeded, _guard, done, _diag = ex._bound
    pos = args is not None
    bare = pos and not args  # fun(shard): no argument tuple to unpack
    cls = getattr(make, "block_class", None)
    off = getattr(make, "id_offset", 0)  # a window of a bigger descriptor (a cluster macro-shard): global ids
    new = object.__new__
    row = ex.row
    run_c, rh = row.run_call(done)
    k = max(2, min(SPEC_MAX, SPEC_RUN_NS // max(ex.ewma_ns, 1)))
    n = stop - start
    t_first = row.block_begin(start, n)
    a, b = start, min(stop, start + k)  # the open run: ids a..b-1, none marked yet
    t = run_c(rh, 0, 0, 0, a, b - a)
    ok = returned = 0
    sid = a
    while sid < stop:
        if cls is None:
            shard = make(sid, entropy)
        else:  # the maker's BlockShard made inline: no call (~0.1 us of a ~0.3 us shard)
            shard = new(cls)
            shard.id = sid + off
            shard._seedseq = entropy
            shard._rng = None
        try:
            if seeded:
                seed_legacy(entropy, shard.id)  # the global id (a cluster agent runs a window)
            value = fun(shard) if bare else fun(shard, *args) if pos else fun(shard, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - everything is reported
            t1 = run_c(rh, a, sid - a, 1, 0, 0)  # the run ends before sid: its marks, IDLE
            if t1 < 0:
                row.failed(t1, "run_next", a)
            rec = failure_record(exc, sid)
            on_fail((sid, ERR, rec, t, t1, None, None))
            t = t1
            sid += 1
            a, b = sid, min(stop, sid + k)
            if sid < stop:
                t = run_c(rh, 0, 0, 0, a, b - a)
            continue
        ok += 1
        if value is not None:
            returned += 1
        sid += 1
        if sid == b:
            b = min(stop, sid + k)
            if b > sid:
                t = run_c(rh, a, sid - a, 1, sid, b - sid)
                if t < 0:
                    row.failed(t, "run_next", a)
                a = sid
    if a < stop:  # the last run's marks, IDLE
        t = run_c(rh, a, stop - a, 1, 0, 0)
        if t < 0:
            row.failed(t, "run_next", a)
    t = row.block_end(done, stop - 1, 0, ok)  # IDLE (again) and the block's OK count
    ex.learn_run(t_first, t, n)
    return (n, ok, returned, t_first, t, None)
