"""Speculative runs: the rpc path of known-short shards (one status write per
run of shards instead of one per shard boundary; see :func:`run_spec`).

A part of the one shard executor (:mod:`shardc.worker.executor`, which calls
this for a chunk of consecutive ids when its running mean says shards are
short); kept in its own module for size.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from ..protocol import ERR, FRAME
from ..shards import reusable_shard
from .records import failure_record
from .seeding import Legacy

SPEC_RUN_NS = 100_000  # a speculative run holds about this much work: a rerun after a crash is cheap
SPEC_MAX = 4096  # ids in one speculative run, at most


class _Redo(Exception):
    """A run's shards drew from random/np.random unseeded: the run is run again, seeded."""


_REDO = _Redo()


def _loop_parts(ex: Any) -> tuple[Callable[..., Any], tuple[Any, ...], Any, Any, Any, int, Legacy | None]:
    """What both loops need from ``ex._bound``: ``call`` and ``extra``, such
    that ``call(shard, *extra)`` runs fun on a shard (keywords bound with
    ``partial``; over two extra arguments, a closure; with seeding, what
    ``lg``, the call's :class:`~shardc.worker.seeding.Legacy`, says); the
    shard class to make inline (``cls``, the descriptor's BlockShard; None
    when it has none: then ``make(sid, entropy)``); ``make``; ``entropy``;
    and ``off``, what a shard's id adds to the local id (a window of a bigger
    descriptor, as a cluster macro-shard runs: global ids; else 0); and
    ``lg`` (None unless ``seed=``).  The
    loops spell out the calls with 0, 1 and 2 extra arguments:
    ``fun(shard, *args)`` builds a tuple per call, and a closure around it
    is one more frame (py-spy: 38% of a trivial shm_queue shard writing
    into one out buffer)."""
    fun, kwargs, args, make, entropy, seeded, _guard, _done, _diag = ex._bound
    call: Callable[..., Any] = fun
    extra: tuple[Any, ...] = args if args is not None else ()
    if args is None:
        call = functools.partial(fun, **kwargs)  # fun(shard, **kwargs), bound in C
    if len(extra) > 2:
        inner, inner_extra = call, extra

        def call_closed(shard: Any) -> Any:
            return inner(shard, *inner_extra)

        call, extra = call_closed, ()
    lg: Legacy | None = None
    if seeded:  # random/np.random seeded lazily: the loops call lg.fn and check lg.drawn() per run
        st = ex.legacy
        if st[0] is not ex._bound:  # a new call: learn afresh
            st[:] = [ex._bound, Legacy(entropy, fun)]
        lg = st[1]
        call = lg.loop_start(call)
    cls = getattr(make, "block_class", None)
    return call, extra, cls, make, entropy, getattr(make, "id_offset", 0), lg


# One shard object per loop while fun keeps no reference to it: a loop holds
# the shard in one local, so ``sys.getrefcount(shard) == 2`` (that local and
# the call's argument) after fun returned means nothing else can see it, and
# the next id reuses it (``id`` and ``_rng`` reset; ``_seedseq``, the run's
# entropy, set when it is made; its other fields are computed from the id).
# Anything that kept it (fun stored or returned it, a
# closure, a traceback) raises the count, and the loop makes a fresh one.
# Measured: ~100 vs ~160 ns a trivial shard, of which allocating and freeing
# the object was ~60.


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
    outcome times start at the last status stamp (not its own start).

    The inner loop is a ``for`` over the run's ids with one call, one store
    of the shard's id and one append per shard (all else hoisted into
    :func:`_loop_parts` or done per run)."""
    call, extra, cls, make, entropy, off, lg = _loop_parts(ex)
    na = len(extra)
    x0, x1 = (*extra, None, None)[:2]
    refs = sys.getrefcount
    shard: Any = None if cls is None else reusable_shard(cls, entropy)  # reused while nothing else holds it
    row = ex.row
    run_c, rh = row.run_call(ex._bound[7])
    k = max(2, min(SPEC_MAX, SPEC_RUN_NS // max(ex.ewma_ns, 1)))
    stop = first + n
    a, b = first, min(stop, first + k)  # the open run: ids a..b-1, none marked yet
    t = t_first = run_c(rh, 0, 0, 0, a, b - a)
    f_sid, f_t0 = a, t  # the open frame: its first id, its start
    vals: list[Any] = []
    app = vals.append
    rmark = 0  # the open run's mark (0: none finished yet)
    sid = a
    while a < stop:
        try:
            for sid in range(a, b):
                if cls is not None:
                    if refs(shard) > 2:  # kept by fun (a value, a list, a traceback): a fresh one
                        shard = reusable_shard(cls, entropy)
                    shard.id = sid + off
                    shard._rng = None
                else:
                    shard = make(sid, entropy)
                value = call(shard) if not na else call(shard, x0) if na == 1 else call(shard, x0, x1)
                if value is None:
                    if rmark != 1:
                        if rmark:  # close the run before sid (sid is done: the next run marks it)
                            if lg is not None and lg.drawn():
                                raise _REDO
                            t = run_c(rh, a, sid - a, rmark, sid, b - sid)
                            if t < 0:
                                break  # raised below, outside the try: not this shard's failure
                            a = sid
                        rmark = 1
                elif rmark != 2:
                    if rmark:
                        if lg is not None and lg.drawn():
                            raise _REDO
                        t = run_c(rh, a, sid - a, rmark, sid, b - sid)
                        if t < 0:
                            break
                        a = sid
                    rmark = 2
                app(value)
            if lg is not None:  # before the run's marks: did a shard draw unseeded?
                if lg.drawn():
                    raise _REDO
                call = lg.fn
        except BaseException as exc:  # noqa: BLE001 - everything is reported
            if lg is not None and (exc is _REDO or lg.drawn()):  # run a..sid again, seeded
                call = lg.redo()
                del vals[a - f_sid :]  # the open frame keeps the ids before a
                rmark = 0
                continue
            t1 = run_c(rh, a, sid - a, rmark, 0, 0)  # the run ends before sid: its marks, IDLE
            if t1 < 0:
                row.failed(t1, "run_next", a)
            if vals:
                append((f_sid, FRAME, vals, f_t0, t1, None, None))
                vals = []
                app = vals.append
            rec = failure_record(exc, sid)
            append((sid, ERR, rec, t, t1, None, None))
            t = t1
            a, rmark = sid + 1, 0
            b = min(stop, a + k)
            if a < stop:
                t = f_t0 = run_c(rh, 0, 0, 0, a, b - a)
                f_sid = a
            continue
        if t < 0:
            row.failed(t, "run_next", a)
        nb = min(stop, b + k)
        t = run_c(rh, a, b - a, rmark, b, nb - b)  # nb == b at the end: IDLE
        if t < 0:
            row.failed(t, "run_next", a)
        a, b, rmark = b, nb, 0
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
    call, extra, cls, make, entropy, off, lg = _loop_parts(ex)
    na = len(extra)
    x0, x1 = (*extra, None, None)[:2]
    refs = sys.getrefcount
    shard: Any = None if cls is None else reusable_shard(cls, entropy)  # reused while nothing else holds it
    row = ex.row
    done = ex._bound[7]
    run_c, rh = row.run_call(done)
    k = max(2, min(SPEC_MAX, SPEC_RUN_NS // max(ex.ewma_ns, 1)))
    n = stop - start
    t_first = row.block_begin(start, n)
    a, b = start, min(stop, start + k)  # the open run: ids a..b-1, none marked yet
    t = run_c(rh, 0, 0, 0, a, b - a)
    failed = returned = ret_a = 0  # ret_a: returned before the open run
    sid = a
    while a < stop:
        try:
            for sid in range(a, b):
                if cls is not None:
                    if refs(shard) > 2:  # kept by fun (a value, a list, a traceback): a fresh one
                        shard = reusable_shard(cls, entropy)
                    shard.id = sid + off
                    shard._rng = None
                else:
                    shard = make(sid, entropy)
                if (call(shard) if not na else call(shard, x0) if na == 1 else call(shard, x0, x1)) is not None:
                    returned += 1
            if lg is not None:  # before the run's marks: did a shard draw unseeded?
                if lg.drawn():
                    raise _REDO
                call = lg.fn
        except BaseException as exc:  # noqa: BLE001 - everything is reported
            if lg is not None and (exc is _REDO or lg.drawn()):  # run a..sid again, seeded
                call = lg.redo()
                returned = ret_a
                continue
            t1 = run_c(rh, a, sid - a, 1, 0, 0)  # the run ends before sid: its marks, IDLE
            if t1 < 0:
                row.failed(t1, "run_next", a)
            failed += 1
            on_fail((sid, ERR, failure_record(exc, sid), t, t1, None, None))
            t = t1
            a, ret_a = sid + 1, returned
            b = min(stop, a + k)
            if a < stop:
                t = run_c(rh, 0, 0, 0, a, b - a)
            continue
        nb = min(stop, b + k)
        if nb > b:
            t = run_c(rh, a, b - a, 1, b, nb - b)
            if t < 0:
                row.failed(t, "run_next", a)
        else:  # the last run's marks, IDLE
            t = run_c(rh, a, b - a, 1, 0, 0)
            if t < 0:
                row.failed(t, "run_next", a)
        a, b, ret_a = b, nb, returned
    t = row.block_end(done, stop - 1, 0, n - failed)  # IDLE (again) and the block's OK count
    ex.learn_run(t_first, t, n)
    return (n, n - failed, returned, t_first, t, None)
