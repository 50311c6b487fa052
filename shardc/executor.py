"""``shardc.Executor``: a :class:`concurrent.futures.Executor` on a shardc pool.

::

    submit(fn, *args) ─ Future ─ (fn, args) pickled ─> StreamScheduler.feed ─ wake
                                                              │
    engine thread:  Supervisor.run(RpcDispatcher)  (the engine of shard_map, unchanged)
                    a free slot -> (RUN, call_id, [slot], [task]) -> worker: run_task(task, **borrow)
                    RESULTS -> StreamScheduler.record_* -> deliver -> Future.set_result / set_exception
                    a death -> Supervisor.handle_death (requeue, charge) -> replace -> the task runs again

One open call (``shardc.stream``) runs on the executor's pool from the
constructor to ``shutdown``: the call is set up once in every worker (the
borrowed inputs mapped once, zero-copy), then tasks stream through it.  The
engine thread runs the supervisor's event loop, so worker deaths, timeouts,
memory caps and recycling are handled exactly as in ``shard_map``.

Semantics that differ from ``ProcessPoolExecutor``, on purpose:

* a worker death fails no future at first: the task runs again on a fresh
  worker, up to ``max_retries`` times, and only then fails with
  :class:`~shardc.errors.WorkerCrashedError` (a ``BrokenProcessPool``); the
  executor stays usable;
* ``timeout`` bounds each task (its worker is killed, the future fails with
  :class:`~shardc.errors.ShardTimeoutError`, the executor goes on);
* ``borrow={name: obj}``: objects given once, mapped once in every worker
  (arrays zero-copy, read-only under ``cow``), passed to every task as
  keyword arguments ``name=obj``;
* ``initializer`` failing makes the constructor raise
  (:class:`~shardc.errors.WorkerSetupError`) instead of breaking the executor later.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from concurrent.futures import Executor as _BaseExecutor
from typing import Any

from . import inherit as _inherit_mod
from .call import Call
from .diagnostics import Diagnostics, Progress
from .dispatch_rpc import RpcDispatcher
from .errors import (
    ExecutorBrokenError,
    InvalidArgumentError,
    UnpicklableFunctionError,
    UsageError,
)
from .executor_task import _CALL, _CHUNK, _CHUNK1, run_task, task_error
from .forget import call_finished, call_started
from .inputs import InputPlan
from .memory import heap_keep
from .pool import Pool
from .status import DoneMap
from .stream import StreamScheduler, TaskTable, Waker
from .supervisor import Supervisor
from .task_pickle import ArgSharer, dumps_task
from .units import check_recycle, parse_bytes
from .validate import COW_MODES, check_choice, check_int, check_names, check_timeout, pickle_function

log = logging.getLogger("shardc")

AUTO_CHUNK_MAX = 1024  # map(chunksize=None): items per task at most
CAPACITY = 4096  # tasks in flight at most (slots of the open call); more wait in the master
NO_TIMEOUT = 10.0 * 365 * 86400  # timeout=None: the watchdog never fires


class _Engine:
    """What the engine thread needs (no reference to the Executor, so an
    executor dropped without ``shutdown`` is collected and its engine closed)."""

    def __init__(self, pool: Pool, own_pool: bool, sup: Supervisor, sched: StreamScheduler, call: Call) -> None:
        self.pool = pool
        self.own_pool = own_pool
        self.sup = sup
        self.sched = sched
        self.call = call
        self.broken: BaseException | None = None
        self.lock = threading.Lock()
        self.kill_requested = False
        call.wake.on_wake = self.on_wake
        self.thread = threading.Thread(target=self.serve, name="shardc-executor", daemon=True)

    def serve(self) -> None:
        sup, sched, call = self.sup, self.sched, self.call
        try:
            sup.run(RpcDispatcher(sup))
        except BaseException as exc:  # noqa: BLE001 - fails every pending future
            log.error("shardc.Executor stopped: %s: %s", type(exc).__name__, exc)
            broken = ExecutorBrokenError(f"the executor's engine stopped: {type(exc).__name__}: {exc}")
            broken.__cause__ = exc
            with self.lock:  # submit() checks `broken` under it: nothing is fed after this
                self.broken = broken
            sched.closed = True
            for fut in sched.abandon():
                if fut.running() or fut.set_running_or_notify_cancel():
                    fut.set_exception(broken)
        finally:
            try:
                if not self.pool.closed:
                    self.pool.end_call()
            finally:
                assert call.plan is not None and call.donemap is not None
                if call.plan.release():
                    self.pool.released_inherited()
                call.donemap.close()
                call_finished()
                if self.own_pool:
                    self.pool.stop()
                call.wake.close()

    def close(self) -> None:
        self.sched.close()

    def on_wake(self) -> None:
        """In the engine thread, on each wake: deliver the outcomes held
        back (``StreamScheduler.flush``), carry out a kill request."""
        self.sched.flush()
        if not self.kill_requested:
            return
        self.kill_requested = False
        sched, sup, pool = self.sched, self.sup, self.pool
        sched.closed = True
        busy = [w for w in pool.workers if w.alive and sup.ws[w.slot].inflight]
        for fut in sched.drop_all():
            if fut.running() or fut.set_running_or_notify_cancel():
                fut.set_exception(CancelledError("the executor was terminated while the task was pending or running"))
        for w in busy:
            pool.kill(w)
            sup.handle_death(w, reason="terminated", code=w.exitcode)

    def kill(self) -> None:
        """Ask the engine thread to drop every task and kill busy workers."""
        self.kill_requested = True
        self.sched.close()


_live: weakref.WeakSet[Executor] = weakref.WeakSet()


def _shutdown_all() -> None:
    """At interpreter exit: finish the work of executors still open (as
    ProcessPoolExecutor does), then stop their engines."""
    for ex in list(_live):
        ex.shutdown(wait=True)


atexit.register(_shutdown_all)


class Executor(_BaseExecutor):
    """A ``concurrent.futures.Executor`` whose tasks run in shardc workers.

    Args:
        max_workers: worker processes (default: CPUs - 1); ignored with ``pool=``.
        borrow: name -> object given once to every worker (NumPy arrays and
            :class:`~shardc.Shared` zero-copy, read-only); each task gets them
            as keyword arguments (``fn(*args, **borrow, **kwargs)``; the task's
            own keyword arguments win).
        max_retries: times a task runs again after its worker died (crash,
            memory kill) before its future fails with ``WorkerCrashedError``.
        timeout: seconds one task may run (its worker is killed, its future
            fails with ``ShardTimeoutError``); None: no limit.
        mem_cap: per-worker cap on private memory; above it a worker is
            recycled between tasks, killed above 2x mid-task (the task is retried).
        recycle: True (recycle at 50% growth over the baseline), False, or a fraction.
        cow: "deny", "audit" or "allow": what a write into a borrowed input does.
        initializer, initargs: run ``initializer(*initargs)`` once in each worker.
        packages: modules to import in each worker.
        pool: run on this :class:`Pool` (it then serves only this executor
            until ``shutdown``, and is not stopped by it).
        prefetch: RUN messages sent to a worker at once, counting the one
            it runs.  1 (default): a worker gets its next message when it
            reports the last, so no task waits behind a long one while
            another worker is idle.  A message carries one task, or, while
            tasks wait for a worker and take under ~1 ms each (measured),
            up to ~1 ms of them (``shardc.stream``: the round trip is paid
            per batch).  More saves a round trip per message.
        max_nbytes: None (default: arguments are pickled, as by
            ProcessPoolExecutor), or a size ("1M"): NumPy array arguments
            this big or bigger are shared zero-copy instead (copied once
            into shared memory, reused while the array lives; read-only in
            the task under ``cow``; see ``shardc.task_pickle``).
        inherit: with ``max_nbytes``, arrays (of at least that size) that
            task arguments will be: the workers are forked again now, while
            they exist, and inherit them (``shardc.inherit``: no copy at all;
            read-only under ``cow``) instead of a copy into shared memory.
            Each task sees them as they were now: do not change them until
            ``shutdown``.  Ignored (the copy path) where inheritance is not
            possible (a pool without page guards, a fork server, arrays
            not in private memory, ``SHARDC_INHERIT=0``).

    Raises:
        InvalidArgumentError: a bad argument (before any worker starts).
        WorkerSetupError: workers failed to start (e.g. ``initializer`` raised).
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        borrow: dict[str, Any] | None = None,
        max_retries: int = 3,
        timeout: float | None = None,
        mem_cap: Any = "2GB",
        recycle: Any = True,
        cow: str = "deny",
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        packages: list[str] | None = None,
        pool: Pool | None = None,
        prefetch: int = 1,
        max_nbytes: Any = None,
        inherit: list[Any] | tuple[Any, ...] = (),
    ) -> None:
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
        ):
            raise InvalidArgumentError(f"max_workers must be greater than 0 (worker processes), got {max_workers!r}")
        borrow = check_names(borrow, "borrow")
        retries = check_int(max_retries, "max_retries", 0)
        limit = NO_TIMEOUT if timeout is None else check_timeout(timeout)
        cap = parse_bytes(mem_cap, "mem_cap")
        drift = check_recycle(recycle)
        check_choice(cow, "cow", COW_MODES)
        depth = check_int(prefetch, "prefetch", 1)
        share_min = None if max_nbytes is None else parse_bytes(max_nbytes, "max_nbytes")
        if initializer is not None and not callable(initializer):
            raise InvalidArgumentError(f"initializer must be callable, got {type(initializer).__name__}")
        if not isinstance(initargs, tuple):
            raise InvalidArgumentError(f"initargs must be a tuple, got {type(initargs).__name__}")
        if not isinstance(inherit, (list, tuple)):
            raise InvalidArgumentError(f"inherit must be a list or tuple of NumPy arrays, got {type(inherit).__name__}")
        if pool is not None:
            if not isinstance(pool, Pool):
                raise InvalidArgumentError(f"pool must be a shardc.Pool, got {type(pool).__name__}")
            pool.check_open()
            if initializer is not None or packages:
                raise InvalidArgumentError(
                    "initializer/packages belong to the pool when pool= is given: pass them to Pool(...)"
                )
        self._shutdown = False
        self._engine: _Engine | None = None
        self._sharer = ArgSharer(share_min) if share_min else None
        call = Call(
            desc=TaskTable(CAPACITY),
            mode="rpc_chunked",
            opts={"prefetch": depth},
            cow=cow,
            profile="default",
            mem_cap=cap,
            drift=drift,
            seed=None,
            diagnostics=False,
            timeout=limit,
            max_retries=retries,
            health_check_interval=10,
            heap_keep=heap_keep("default", cap),
        )
        plan = InputPlan(run_task, allow_inherit=False)  # no refork: workers live across tasks
        call.plan = plan
        call.fun_blob = pickle_function(run_task, plan.capture)
        call.wake = Waker()
        own = pool is None
        run_pool: Pool | None = None
        call_started()
        try:
            call.donemap = DoneMap(CAPACITY)
            plan.add_segment(call.donemap.segment)
            plan.add_borrow(borrow)
            if pool is None:
                init = functools.partial(initializer, *initargs) if initializer is not None else None
                run_pool = Pool(max_workers, mem_cap=mem_cap, recycle=recycle, packages=packages, init_expr=init)
            else:
                run_pool = pool
            diag = Diagnostics(mode="rpc_chunked", num_shards=CAPACITY, cow=cow, enabled=False)
            # Tasks are pickled in the engine thread; workers from the fork
            # server do not have this __main__ (shardc.forkserver).
            by_value = run_pool.fork_mode != "fork"
            prepare = functools.partial(dumps_task, sharer=self._sharer, main_by_value=by_value)
            sched = StreamScheduler(
                CAPACITY, retries, _deliver, _accept, call.donemap, call.wake, diag, prepare, _reject
            )
            run_pool.ensure_alive()
            if self._sharer is not None and run_pool.can_inherit:
                self._inherit(inherit, plan, run_pool)
            diag.start(run_pool)
            sup = Supervisor(call, run_pool, sched, diag, Progress(CAPACITY, "Executor", False))
            sup.setup_all()
        except BaseException:
            if plan.release() and run_pool is not None:
                run_pool.released_inherited()
            if call.donemap is not None:
                call.donemap.close()
            call.wake.close()
            call_finished()
            if own and run_pool is not None:
                run_pool.stop()
            raise
        self._engine = _Engine(run_pool, own, sup, sched, call)
        self._max_workers = run_pool.size
        self._engine.thread.start()
        _live.add(self)
        weakref.finalize(self, self._engine.close)

    def _inherit(self, arrays: Iterable[Any], plan: InputPlan, pool: Pool) -> None:
        """Hold the eligible ``arrays`` and re-fork the workers to inherit them."""
        sharer = self._sharer
        assert sharer is not None
        for arr in arrays:
            if sharer.wants(arr) and sharer.inherited_desc(arr) is None and _inherit_mod.eligible(arr):
                token = _inherit_mod.hold(arr)
                plan.inherit_tokens.append(token)  # released with the plan, at the end of the call
                sharer.inherit(arr, token)
        if plan.inherit_tokens:
            pool.refork(frozenset(plan.inherit_tokens), "fork after task arguments existed, to inherit them")

    # -- the Executor API ----------------------------------------------------------------
    @property
    def _broken(self) -> bool:
        return self._engine is not None and self._engine.broken is not None

    @property
    def inherits(self) -> bool:
        """Whether the workers inherited arrays given as ``inherit=``."""
        return self._sharer is not None and bool(self._sharer.inherited)

    @property
    def pool(self) -> Pool:
        """The pool the tasks run on."""
        assert self._engine is not None
        return self._engine.pool

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Schedule ``fn(*args, **kwargs)`` (plus the borrowed inputs); returns its Future."""
        return self._submit(_CALL, fn, args, kwargs)

    def submit_batch(
        self, fn: Callable[..., Any], arg_tuples: list[tuple[Any, ...]], kwargs: dict[str, Any] | None = None
    ) -> Future[list[Any]]:
        """One task running ``[fn(*a, **kwargs) for a in arg_tuples]`` (plus the
        borrowed inputs): what ``map`` with a ``chunksize`` sends per chunk."""
        return self._submit(_CHUNK, fn, list(arg_tuples), kwargs)

    def _submit(self, kind: int, fn: Any, args: Any, kwargs: Any) -> Future[Any]:
        if not callable(fn):
            raise InvalidArgumentError(f"fn must be callable, got {type(fn).__name__}")
        engine = self._engine
        assert engine is not None
        fut: Future[Any] = Future()
        fut._shardc_fn = fn  # type: ignore[attr-defined] # names the task in errors
        with engine.lock:
            if engine.broken is not None:
                raise ExecutorBrokenError(f"this executor cannot run tasks any more: {engine.broken}")
            if self._shutdown:
                raise UsageError("cannot schedule new futures after shutdown")
            # Pickled when it gets a worker slot, in the engine thread (dumps_task).
            engine.sched.feed(fut, (kind, fn, args, kwargs))
        return fut

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[Any]:
        """``fn`` over the items of ``iterables`` in order, like the builtin
        ``map``; ``chunksize`` items travel as one task.  None (default):
        about 8 tasks per worker, at most ``AUTO_CHUNK_MAX`` items each (as
        ``multiprocessing.Pool.map`` chunks; ``ProcessPoolExecutor`` sends
        one item per task unless told otherwise): results, their order and
        the first exception raised are the same whatever the chunking.
        ``timeout``: seconds from this call until every result is due
        (``TimeoutError`` otherwise)."""
        if chunksize is not None:
            check_int(chunksize, "chunksize", 1)
        if not callable(fn):
            raise InvalidArgumentError(f"fn must be callable, got {type(fn).__name__}")
        if timeout is not None:
            timeout = float(timeout)
        end = None if timeout is None else time.monotonic() + timeout
        # One iterable: chunks of its items, not of 1-tuples (less to build and pickle).
        one = len(iterables) == 1
        items: Iterator[Any] = iter(iterables[0]) if one else zip(*iterables, strict=False)
        if chunksize is None:
            todo = list(items)
            per = 8 * self._max_workers
            n = max(1, min(AUTO_CHUNK_MAX, (len(todo) + per - 1) // per))
            items = iter(todo)
        else:
            n = chunksize
        if n == 1:
            fs = [self._submit(_CALL, fn, (a,) if one else a, {}) for a in items]
            return _ordered(fs, end, flat=False)
        kind = _CHUNK1 if one else _CHUNK
        fs = [self._submit(kind, fn, chunk, None) for chunk in chunked(items, n)]
        return _ordered(fs, end, flat=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more tasks; ``cancel_futures``: cancel those not started;
        ``wait``: return once every started task is done and the workers
        stopped (an own pool is stopped; a ``pool=`` given stays)."""
        engine = self._engine
        if engine is None:
            return
        with engine.lock:
            self._shutdown = True
        if cancel_futures:
            for t in engine.sched.take_incoming():
                t[0].cancel()
        engine.close()
        _live.discard(self)
        if wait and engine.thread is not threading.current_thread():
            engine.thread.join()

    def terminate(self) -> None:
        """Stop now: tasks not started are cancelled, workers running tasks
        are killed (those futures fail with ``CancelledError``), then as
        ``shutdown(wait=True)`` (an own pool is stopped; a given pool keeps
        fresh workers in the killed ones' places)."""
        engine = self._engine
        if engine is None:
            return
        with engine.lock:
            self._shutdown = True
        for t in engine.sched.take_incoming():
            t[0].cancel()
        engine.kill()
        _live.discard(self)
        if engine.thread is not threading.current_thread():
            engine.thread.join()

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else f"{self._max_workers} workers"
        return f"<shardc.Executor {state}>"


def _accept(fut: Future[Any]) -> bool:
    return fut.set_running_or_notify_cancel()


def _reject(fut: Future[Any], exc: BaseException) -> None:
    """The task could not be pickled: its future fails, as with ProcessPoolExecutor."""
    fn = getattr(fut, "_shardc_fn", None)
    name = getattr(fn, "__qualname__", None) or repr(fn)
    err = UnpicklableFunctionError(f"task {name} cannot be pickled to send it to a worker: {exc}")
    err.__cause__ = exc
    if not fut.done():
        fut.set_exception(err)


def _deliver(fut: Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        name = getattr(fut, "_shardc_name", None)
        if name is None:
            fn = getattr(fut, "_shardc_fn", None)
            name = getattr(fn, "__qualname__", None) or repr(fn)
        fut.set_exception(task_error(name, value))


def _result(f: Future[Any], end: float | None) -> Any:
    return f.result() if end is None else f.result(end - time.monotonic())


def chunked(items: Iterator[Any], n: int) -> Iterator[list[Any]]:
    while True:
        chunk = list(itertools.islice(items, n))
        if not chunk:
            return
        yield chunk


def _ordered(fs: list[Future[Any]], end: float | None, flat: bool) -> Iterator[Any]:
    """Results of ``fs`` in order, each due by ``end``; closing the iterator
    early cancels the futures not started."""

    def gen() -> Iterator[Any]:
        try:
            fs.reverse()  # pop() from the end: nothing here holds a result once yielded
            while fs:
                if flat:
                    yield from _result(fs.pop(), end)
                else:
                    yield _result(fs.pop(), end)
        finally:
            for f in fs:
                f.cancel()

    return gen()
