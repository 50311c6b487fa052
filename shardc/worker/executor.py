"""The shard executor: the one place a worker runs shards, in both dispatch modes.

::

    rpc_chunked   loop.py:       RUN(ids) ─> run_ids(ids) ─> [outcome tuples] ─> RESULTS
    shm_queue     queue_loop.py: ring item ─> run_block(start, stop, on_fail, on_cow) ─> RunStats fields
                                                  │ failures ─> QFAIL, cow events ─> QCOW
                                    both ─> _run(): one loop over the ids

For every shard, ``_run`` makes the shard object (``shard.rng`` from
``(entropy, id)``, built only when ``fun`` first uses it), seeds ``random``/``np.random`` when the call has a seed,
runs ``fun`` inside the guard scope when inputs are guarded (its cow events
ride with the outcome), turns any exception into an error record
(``shardc.protocol.error_record``) and drops its frames, and writes the
shard's state through the worker's :class:`~shardc.status.StatusRow`: which
shard runs since when, its done mark, idle.  A run of shards costs one status
call per shard boundary (``shard_next``) plus one at each end, and no Python
call per shard beyond ``fun`` and the shard's constructor: the shm_queue hot
loop runs tiny shards (~1 us) where one more call is ~5%.

What differs between the modes is a parameter, not a second copy:

=====================  =============================  ==============================
                       rpc_chunked (``run_ids``)      shm_queue (``run_block``)
=====================  =============================  ==============================
ids                    a list (retries need not be    a block ``range(start, stop)``
                       consecutive)
status calls           ``shard_begin`` ... ``shard_   ``block_begin`` ... ``block_end``
                       next`` ... ``shard_end``       (also counts done shards)
done mark              1 returned None, 2 a value to  always 1: nothing is gathered,
                       gather (a worker dying before  so a finished shard is complete
                       RESULTS loses it: rerun it)    whatever it returned
outcomes               every one, in a list           failures (``on_fail``) and cow
                                                      events (``on_cow``) only
memory delta           per shard                      per block
=====================  =============================  ==============================

Unified behaviours (they had diverged between the two modes):

* A ``BaseException`` that is not an ``Exception`` (``SystemExit`` from
  ``sys.exit()``, ``KeyboardInterrupt``, ``GeneratorExit``) fails only that
  shard, as a ``RuntimeError`` naming it with the original as ``__cause__``:
  unpickled and re-raised in the master, a ``SystemExit`` would end the
  caller's program.
* Memory delta (anonymous memory from statm, ~8 us a read) is measured only
  where shards are long (running mean > 0.5 ms, or not yet known), so that
  the read is noise; per shard in rpc (the outcome's ``mem_delta``), per
  block in the queue (``RunStats.mem_delta``, sent in QDONE's ``"mem"``: the
  queue has no per-shard message to carry it).  The queue used to measure
  none; without ``diagnostics`` neither mode reports one.
* The shard state stays RUNNING across a run (``shard_next`` moves it from
  shard to shard) in both modes; rpc used to go IDLE between the shards of a
  chunk, for no reader's benefit, at one more status write per shard.
* Heap reuse is checked (``HeapPolicy.check``) after each long shard, or
  after a run of short ones that took over 1 ms.
* Taint: after a shard that wrote an input inherited at fork (cow events), or
  failed under guards, a write the guards could not undo stops the run; the
  ids not run are left for the master and the worker retires.
* A call may carry a value sink (``CallState.value_sink``, see :class:`ValueSink`):
  ``begin_call`` then binds ``fun`` wrapped so that each shard's return value
  goes through ``sink.put(shard.id, value)`` inside the shard's ``try`` (a
  sink that rejects a value fails that shard), and what ``put`` returns is
  gathered instead.  Without a sink nothing changes, not even a test per
  shard.  The loop commits the sink before it reports (``commit``).
* The outcome tuples are laid out as :class:`shardc.protocol.Outcome` but
  are plain tuples: a NamedTuple pickles as a class call per item (measured:
  8x the dump and 3x the load time of a plain tuple, in a message of 1000).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from inspect import CO_VARARGS, CO_VARKEYWORDS
from time import monotonic_ns
from types import FunctionType
from typing import Any, NamedTuple, Protocol

import numpy as np

from ..protocol import ERR, FRAME, OK, RETIRE_EXIT, error_record
from ..status import DoneMap, StatusRow
from .heap import HeapPolicy
from .native import NativeRunner, native_runner
from .records import failure_record, open_frames, release_traceback, shard_error
from .seeding import seed_legacy
from .spec import run_spec, run_spec_block

__all__ = ["ShardExecutor", "open_frames", "release_traceback", "seed_legacy", "shard_error"]

LONG_NS = 500_000  # shards longer than this get their memory measured (a statm read is ~8 us)
SPEC_SHARD_NS = 20_000  # shards shorter than this run in speculative runs (one status write a run)
# Fewer ids run one by one (a status write each costs ~0.1 us; a crash inside a speculative
# run costs a worker and a careful rerun of the run: for a few ids it is not worth it).
SPEC_MIN_IDS = 16
HEAP_CHECK_NS = 1_000_000  # a run of short shards this long amortizes a heap check

Events = list[dict[str, Any]]  # cow events of one shard (shardc.guard.ShardScope.events)
# One shard's outcome, laid out as shardc.protocol.Outcome:
# (sid, ok, value or error record, t0, t1, cow events, memory delta).
OutcomeTuple = tuple[int, int, Any, int, int, "Events | None", "int | None"]
RunTuple = tuple[int, int, int, int, int, "int | None"]  # laid out as RunStats
OnFail = Callable[[OutcomeTuple], None]  # gets a failed shard's outcome
OnCow = Callable[[int, Events], None]  # gets (shard id, cow events) of a shard that finished


class ValueSink(Protocol):
    """A per-call value sink in a worker (opened from the call's ``sink`` spec).

    Front ends that keep shard values out of the result messages (the
    tables' ``auto_table`` writes frames into part files) give the call a
    spec whose ``open(slot, call_id)`` returns one of these."""

    def put(self, sid: int, value: Any) -> Any:
        """Take shard ``sid``'s value; return what is gathered instead (not
        None when something was kept: its done mark then says "rerun if lost
        before reported").  Raising fails the shard."""

    def commit(self) -> Any:
        """Make every value put since the last commit durable, before the
        outcomes are reported; returns a record for the master (None:
        nothing to commit).  Raising fails the shards put since then."""

    def abort(self) -> None:
        """Drop whatever was not committed (end of the call)."""


def sink_fun(fun: Any, put: Callable[[int, Any], Any]) -> Callable[..., Any]:
    """``fun`` with its value passed through a sink's ``put`` (see :class:`ValueSink`)."""

    def through_sink(shard: Any, *args: Any, **kwargs: Any) -> Any:
        return put(shard.id, fun(shard, *args, **kwargs))

    return through_sink


class CallState:
    """What a worker holds for the duration of one shard_map call."""

    def __init__(self) -> None:
        self.call_id = -1
        self.fun: Any = None
        self.kwargs: dict[str, Any] = {}
        self.borrowed: frozenset[str] = frozenset()  # names in kwargs that are borrowed inputs (read-only)
        self.desc: Any = None  # shardc.shards.Shards: .shard(id, seedseq) builds a shard
        self.entropy: int | None = None
        self.seeded = False
        self.cow = "deny"
        self.guard_regions: list[int] = []
        self.diagnostics = True
        self.donemap: DoneMap | None = None
        self.inherited: list[np.ndarray] = []  # arrays inherited at fork, by owner of the memory
        self.value_sink: ValueSink | None = None  # the call's value sink, if its front end gave one


class RunStats(NamedTuple):
    """What ``run_block`` did (shm_queue): the layout of the plain tuple it
    returns (``RunStats(*t)`` names the fields; the queue loop unpacks it:
    per block of 8 probe shards a NamedTuple and its attribute reads cost ~5%)."""

    ran: int  # ids run from the start of the block (fewer than asked: tainted, the rest not run)
    ok: int  # of those, finished without an exception
    returned: int  # of those, returned a value (dropped: shm_queue gathers none)
    t0: int  # monotonic ns at the start of the first shard
    t1: int  # monotonic ns at the end of the last
    mem_delta: int | None  # anonymous-memory growth over the block, if measured


def positional_args(fun: Any, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """``kwargs`` as a tuple in ``fun``'s parameter order, when calling
    ``fun(shard, *args)`` binds exactly as ``fun(shard, **kwargs)`` does (a
    plain function whose parameters after the first are exactly these names,
    none positional-only or keyword-only, no ``*args``/``**kwargs``); else
    None.  Measured on Python 3.11: 180 ns a call instead of 230."""
    code = getattr(fun, "__code__", None)
    if not isinstance(fun, FunctionType) or code is None:
        return None
    if code.co_flags & (CO_VARARGS | CO_VARKEYWORDS) or code.co_posonlyargcount or code.co_kwonlyargcount:
        return None
    names = code.co_varnames[1 : code.co_argcount]
    if code.co_argcount != 1 + len(kwargs) or set(names) != set(kwargs):
        return None
    return tuple(kwargs[n] for n in names)


class ShardExecutor:
    """Runs shards of the worker's current call (see the module docstring).

    Attributes:
        call: the current call's state (a fresh :class:`CallState` between calls).
        ewma_ns: running mean of shard wall time (-1: not known yet).
        tainted: inherited inputs this process can no longer restore.
    """

    __slots__ = ("_bound", "_frames", "call", "ewma_ns", "guard", "heap", "legacy", "native", "row", "tainted")

    def __init__(self, row: StatusRow, guard: Any, heap: HeapPolicy) -> None:
        self.row = row
        self.guard = guard  # the shardc.guard module, or None without page guards
        self.heap = heap
        self.call = CallState()
        self.ewma_ns = -1
        self.tainted: list[str] = []
        self._bound: tuple[Any, ...] = ()
        self._frames = False  # rpc: runs of OK shards may travel as one frame (see run_ids)
        self.legacy: list[Any] = [None, None]  # (the call's _bound, its lazy-seeding state): worker/spec.py
        # A native kernel's runner (shardc.worker.native): it runs the ids instead of _run.
        self.native: NativeRunner | None = None

    # -- call ----------------------------------------------------------------------------
    def begin_call(self, ewma_ns: int = -1) -> None:
        """``self.call`` is set up: bind what the loop reads, and start from
        ``ewma_ns``, the shard time of the same ``fun`` (the same pickle) in
        an earlier call on this worker, if known (-1: learn it again, the
        first shard is measured).  A wrong guess changes only how the first
        chunk runs (a speculative run, no per-shard memory delta), never an
        outcome."""
        c = self.call
        guard = self.guard if self.guard is not None and c.guard_regions else None
        make = c.desc.maker() if hasattr(c.desc, "maker") else c.desc.shard  # the fast shard factory
        args = positional_args(c.fun, c.kwargs)
        fun = c.fun if c.value_sink is None else sink_fun(c.fun, c.value_sink.put)
        self._bound = (fun, c.kwargs, args, make, c.entropy, c.seeded, guard, c.donemap, c.diagnostics)
        # Frames carry neither cow events (guards) nor a sink's per-shard commit failure.
        self._frames = guard is None and c.value_sink is None
        self.ewma_ns = ewma_ns
        self.native = native_runner(self)

    def end_call(self) -> CallState:
        """Hand back the finished call's state; a fresh one is current."""
        c, self.call = self.call, CallState()
        self._bound = ()
        self.native = None
        return c

    # -- the two entry points ----------------------------------------------------------------
    def run_ids(
        self, ids: list[int] | range, out: list[OutcomeTuple] | None = None, careful: bool = False
    ) -> list[OutcomeTuple]:
        """rpc_chunked: run ``ids`` and return (``out`` extended with) one
        outcome tuple per shard run, or, for short shards with consecutive
        ids, one frame per run of OK shards (see :data:`shardc.protocol.FRAME`).
        Known-short shards run in speculative runs (:func:`.spec.run_spec`)
        unless ``careful`` (ids the master reruns after losing a worker inside
        such a run: per-shard status, so a crash is charged to one shard).
        Shards after one that tainted this worker are not run (and have no
        outcome)."""
        if self.native is not None:
            return self.native.run_ids(ids, out)
        if out is None:
            out = []
        n = len(ids)
        if n:
            append = out.append
            frames = (
                self._frames
                and ids[-1] - ids[0] == n - 1
                and (n < 3 or isinstance(ids, range) or ids == list(range(ids[0], ids[0] + n)))
            )
            if frames and not careful and n >= SPEC_MIN_IDS and 0 <= self.ewma_ns <= SPEC_SHARD_NS:
                run_spec(self, ids[0], n, append)
            else:
                self._run([*ids, -1], -1, n, False, append, append, None, frames)
        return out

    def run_block(self, start: int, stop: int, on_fail: OnFail, on_cow: OnCow) -> RunTuple:
        """shm_queue: run the block ``start .. stop-1``; failures go to
        ``on_fail``, cow events of finished shards to ``on_cow``.  Returns the
        fields of a :class:`RunStats`."""
        if self.native is not None:
            return self.native.run_block(start, stop, on_fail, on_cow)
        if self._bound[6] is None and stop - start > 1 and 0 <= self.ewma_ns <= SPEC_SHARD_NS:
            return run_spec_block(self, start, stop, on_fail)  # known-short shards: speculative runs
        return self._run(range(start, stop + 1), stop, stop - start, True, None, on_fail, on_cow)

    def commit_sink(self, results: list[OutcomeTuple]) -> Any:
        """Commit the call's sink before ``results`` (every outcome since the
        last commit) are reported; returns its record (None without a sink).
        A failed commit fails every shard of ``results`` that succeeded: none
        of their values was kept."""
        sink = self.call.value_sink
        if sink is None:
            return None
        try:
            return sink.commit()
        except Exception as exc:  # noqa: BLE001 - reported as those shards' failure
            for i, r in enumerate(results):
                if r[1] == OK:
                    err = RuntimeError(f"shard {r[0]}: its output could not be committed: {type(exc).__name__}: {exc}")
                    results[i] = (r[0], ERR, error_record(err, r[0]), *r[3:])
            release_traceback(exc)
            return None

    # -- the one loop ----------------------------------------------------------------------
    def _run(
        self,
        seq: Any,
        end: int,
        n: int,
        block: bool,
        append: OnFail | None,
        on_fail: OnFail,
        on_cow: OnCow | None,
        frames: bool = False,
    ) -> RunTuple:
        """Run the ``n`` ids of ``seq``; its last item is ``end``, a sentinel
        that is not run.  ``append`` gathers every outcome (rpc) or is None.
        ``frames`` (rpc, ``seq`` consecutive ids): while shards are short, OK
        shards gather as frames ``(first id, FRAME, [values], t_first,
        t_last, None, None)``, one per run of them between failures, instead
        of a tuple each (~0.4 us a shard less here and in the master).
        The loop looks one id ahead (``nxt``) so that a shard's end and the
        next one's start are one status call, and ``nxt == end`` is the one
        test for the last shard (cheaper than counting).  Returns the fields
        of a :class:`RunStats`."""
        fun, kwargs, args, make, entropy, seeded, guard, done, diag = self._bound
        pos = args is not None
        row = self.row
        heap = self.heap
        gather = append is not None
        vmark = 2 if gather else 1  # done mark of a shard that returned a value
        ewma = self.ewma_ns
        long = ewma < 0 or ewma > LONG_NS
        if long:
            each = gather  # per-shard memory and timing: rpc, long shards
            sample = bool(diag or heap.watch)  # memory read at all (for the delta, for the heap)
            m0 = heap.own_anon() if diag else None
        else:
            each = sample = False
            m0 = None
        dmem = events = None
        it = iter(seq)
        sid = next(it)
        t0 = t1 = t_first = row.block_begin(sid, n) if block else row.shard_begin(sid)
        vals: list[Any] | None = [] if frames and not long else None  # the open frame's values
        f_sid, f_t0 = sid, t0  # its first id and start
        next_c, rh = row.next_call(done)  # one C call per shard boundary, no method call
        ok = failed = returned = 0
        for nxt in it:
            shard = make(sid, entropy)  # shard.rng from (entropy, sid), built only if fun uses it
            try:
                if seeded:
                    seed_legacy(entropy, shard.id)  # the global id (a cluster agent runs a window)
                if guard is None:
                    value = fun(shard, *args) if pos else fun(shard, **kwargs)
                else:
                    with guard.shard_scope(sid) as scope:
                        value = fun(shard, **kwargs)
                    events = scope.events or None
            except BaseException as exc:  # noqa: BLE001 - everything is reported
                # Idle before the record: formatting (or pickling) it is not the shard's time.
                row.set_idle()
                t1 = monotonic_ns()
                events = getattr(exc, "cow_events", None) or None
                rec = failure_record(exc, sid)
                if each:
                    dmem, m0, each = self._measure(t0, t1, m0, diag)
                if vals:  # the frame ends before the failure (its last shard ended at t0)
                    append((f_sid, FRAME, vals, f_t0, t0, None, None))  # type: ignore[misc]
                    vals = []
                on_fail((sid, ERR, rec, t0, t1, events, dmem))
                events = dmem = None
                failed += 1
                if nxt == end or (guard is not None and self.check_tainted()):
                    if block:
                        t1 = row.block_end(done, sid, 0, ok)
                    break
                sid = nxt
                t0 = row.shard_begin(sid)
                f_sid, f_t0 = sid, t0
                continue
            ok += 1
            if value is None:
                mark = 1
            else:
                mark = vmark
                returned += 1
            if events is not None:  # it wrote a borrowed input (audit/allow, or a lost restore)
                if on_cow is not None:
                    on_cow(sid, events)
                if self.check_tainted():
                    end = nxt  # leave the rest of the run to the master
            if nxt == end:
                t1 = row.block_end(done, sid, mark, ok) if block else row.shard_end(done, sid, mark)
                if vals is not None:
                    vals.append(value)
                elif gather:
                    if each:
                        dmem, m0, each = self._measure(t0, t1, m0, diag)
                    append((sid, OK, value, t0, t1, events, dmem))  # type: ignore[misc]
                break
            if vals is not None:  # the hot path of rpc: the value joins the frame
                t0 = t1 = next_c(rh, sid, mark, nxt)
                if t1 < 0:
                    row.failed(t1, "shard_next", sid)
                vals.append(value)
            elif gather:
                t1 = next_c(rh, sid, mark, nxt)
                if t1 < 0:
                    row.failed(t1, "shard_next", sid)
                if each:
                    dmem, m0, each = self._measure(t0, t1, m0, diag)
                append((sid, OK, value, t0, t1, events, dmem))  # type: ignore[misc]
                dmem = None
                t0 = t1
            else:  # the hot path of shm_queue: nothing more per shard
                t0 = next_c(rh, sid, mark, nxt)
                if t0 < 0:
                    row.failed(t0, "shard_next", sid)
            sid = nxt
        if vals:
            append((f_sid, FRAME, vals, f_t0, t1, None, None))  # type: ignore[misc]
        ran = ok + failed
        bdmem = None
        if not (long and gather):  # no per-shard measure: learn the shard time from the run
            bdmem = self.learn_run(t_first, t1, ran, sample, m0)
        return (ran, ok, returned, t_first, t1, bdmem)

    def learn_run(self, t_first: int, t_end: int, n: int, sample: bool = False, m0: int | None = None) -> int | None:
        """After a run of ``n`` shards timed only as a whole (short shards,
        every loop): its mean shard time updates the running mean (a run of
        8 or more is the new mean by itself: a quick ramp to short), and a
        run that sampled memory or lasted ``HEAP_CHECK_NS`` checks the heap.
        Returns the run's memory delta when ``sample`` read one."""
        avg = (t_end - t_first) // n
        w = min(n, 8)
        e = self.ewma_ns
        self.ewma_ns = avg if e < 0 else (e * (8 - w) + avg * w) >> 3
        if sample or t_end - t_first > HEAP_CHECK_NS:
            return self._after_run(sample, m0)
        return None

    def _after_run(self, sample: bool, m0: int | None) -> int | None:
        """After a run of long shards (``sample``: returns its memory delta if
        ``m0`` was read) or a long run of short ones: check the heap."""
        if not sample:
            self.heap.check()
            return None
        m1 = self.heap.own_anon()
        self.heap.check(m1)
        return m1 - m0 if m0 is not None and m1 is not None else None

    def _measure(self, t0: int, t1: int, m0: int | None, diag: bool) -> tuple[int | None, int | None, bool]:
        """After a long shard (rpc): its memory delta, the reading the next
        shard starts from, whether shards are still long; updates the running
        mean and checks the heap with the same reading."""
        m1 = self.heap.own_anon() if diag or self.heap.watch else None
        dmem = m1 - m0 if diag and m0 is not None and m1 is not None else None
        dt = t1 - t0
        self.ewma_ns = dt if self.ewma_ns < 0 else (self.ewma_ns * 7 + dt) >> 3
        self.heap.check(m1)
        return dmem, m1, self.ewma_ns > LONG_NS

    # -- taint ------------------------------------------------------------------------------
    def check_tainted(self) -> bool:
        """True once a shard wrote an inherited input beyond restoring (the
        worker must run no further shard; it exits with RETIRE_EXIT)."""
        if self.guard is not None:
            self.tainted += self.guard.take_lost()
        return bool(self.tainted)

    def retire(self) -> None:
        """Leave: this process's copy of an inherited input cannot be restored."""
        print(
            f"shardc worker {self.row.slot} (pid {os.getpid()}): retiring: a shard wrote more of "
            f"inherited input(s) {sorted(set(self.tainted))} than can be restored",
            file=sys.stderr,
        )
        sys.stderr.flush()
        os._exit(RETIRE_EXIT)
