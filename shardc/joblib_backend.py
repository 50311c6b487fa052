"""A joblib parallel backend on shardc: ``joblib.parallel_config(backend="shardc")``.

::

    Parallel(n_jobs=2)(delayed(f)(X, i) for i in ...)
      configure()  -> a shardc.Executor on a cached shardc.Pool of n_jobs workers
                      (one open call per Parallel call: shardc.stream)
      submit(batch) -> Executor.submit(BatchedCalls): big NumPy arguments
                      (joblib's max_nbytes rule) go as shared segments, zero-copy
      terminate()  -> the executor shuts down; the pool stays for the next call

What it changes compared with loky:

* **big arrays**: an argument of ``max_nbytes`` or more (joblib's default
  "1M") is copied once into a sealed shardc segment (reused while the array
  lives) and mapped read-only in each worker under ``cow="deny"`` (joblib's
  ``mmap_mode="r"``; ``"c"`` maps it under ``cow="allow"``: writes stay
  private), instead of being dumped to a memmapped file.  ``mmap_mode``
  "r+"/"w+" (writes meant to reach the caller) and ``max_nbytes=None``
  pickle the arrays instead.
* **crashes**: a batch whose worker died runs again on a fresh worker
  (``max_retries``, default 3) instead of breaking the pool; after that it
  fails with :class:`~shardc.errors.WorkerCrashedError` naming the function.
* ``timeout`` (a backend parameter) bounds each batch: its worker is killed.
* ``require="sharedmem"`` falls back to threads and nested ``Parallel`` calls
  inside a task run on threads, both as with joblib's own process backends.
* **waiting**: a call whose results come in order (a list,
  ``return_as="generator"``) waits for the batch it yields next and is woken
  by its completion (or by another batch's failure: fast abort), instead of
  joblib's 10 ms polling loop; ``"generator_unordered"`` keeps the callbacks.
* **the cyclic GC** is paused while joblib's completion callback builds the
  next batches (``pause_gc``), and while a worker unpickles a batch.

Registration: ``import shardc`` registers the backend when joblib is already
imported, or else when joblib is imported later (a one-shot import hook that
imports nothing itself); :func:`register_joblib` does it explicitly.  joblib
offers no entry point for backends.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from .errors import InvalidArgumentError, MissingDependencyError, ShardTimeoutError
from .executor import Executor
from .pool import Pool
from .stream import gc_paused

try:
    from joblib._parallel_backends import (
        AutoBatchingMixin,
        FallbackToBackend,
        ParallelBackendBase,
        SequentialBackend,
    )
    from joblib.parallel import cpu_count, register_parallel_backend
except ImportError as _exc:  # pragma: no cover - exercised without joblib only
    raise MissingDependencyError("the joblib backend needs joblib >= 1.3: pip install 'shardc[joblib]'") from _exc

_lock = threading.Lock()
_cached: Pool | None = None  # the pool Parallel calls reuse (one size at a time)
_busy: set[int] = set()  # ids of pools an executor runs on now
_owner = os.getpid()  # the process the two above belong to


def _take_pool(n_jobs: int) -> tuple[Pool, bool]:
    """A pool of ``n_jobs`` workers for one Parallel call: the cached one
    when free (else a private one, e.g. for concurrent calls from threads);
    returns ``(pool, private)``."""
    global _cached, _owner
    with _lock:
        if _owner != os.getpid():  # a forked child (e.g. of an outer multiprocessing Parallel)
            _owner, _cached = os.getpid(), None
            _busy.clear()
        p = _cached
        if p is not None and (p.closed or p.size != n_jobs) and id(p) not in _busy:
            p.stop()
            p = _cached = None
        if p is None:
            p = _cached = Pool(n_jobs)
        if id(p) not in _busy:
            _busy.add(id(p))
            return p, False
    return Pool(n_jobs), True


class ParallelTimeoutError(ShardTimeoutError, multiprocessing.TimeoutError):
    """A batch of a ``Parallel(timeout=...)`` call was not done in time (as
    joblib's own, a ``multiprocessing.TimeoutError``)."""


def _note_failure(failed: Future[Any], fut: Future[Any]) -> None:
    """Done-callback of an in-order call's batch: the first that failed is
    put in ``failed``, which wakes ``retrieve_result``."""
    if fut.cancelled() or fut.exception() is None:
        return
    with _lock:
        if not failed.done():
            failed.set_result(fut)


def _give_back(pool: Pool, private: bool) -> None:
    with _lock:
        _busy.discard(id(pool))
    if private:
        pool.stop()


class ShardcBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib backend running batches on a shardc pool (see the module docstring).

    Args (backend parameters, e.g. ``parallel_config(backend="shardc", max_retries=1)``):
        max_retries: times a batch runs again after its worker died.
        timeout: seconds one batch may run (None: no limit).
        mem_cap: per-worker memory cap, as in ``shard_map``.
        pause_gc: run joblib's batch-completion callback (which builds the
            next batches from the caller's iterator: its ``delayed`` calls)
            with Python's cyclic garbage collector paused (process-wide, for
            that callback; re-enabled after it unless it was off already).
            Building 20,000 ``delayed`` calls made the collector traverse
            every object of the process several times; this made the
            callback ~1.3x faster.  False: leave the collector alone.
    """

    supports_retrieve_callback = True  # per call: see configure()
    supports_return_generator = True
    supports_timeout = True
    supports_inner_max_num_threads = False
    uses_threads = False
    supports_sharedmem = False
    default_n_jobs = 1

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        max_retries: int = 3,
        timeout: float | None = None,
        mem_cap: Any = "2GB",
        pause_gc: bool = True,
        **backend_kwargs: Any,
    ) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        if not isinstance(pause_gc, bool):
            raise InvalidArgumentError(f"pause_gc must be True or False, got {pause_gc!r}")
        self.pause_gc = pause_gc
        self.max_retries = max_retries
        self.task_timeout = timeout
        self.mem_cap = mem_cap
        self._executor: Executor | None = None
        self._pool: tuple[Pool, bool] | None = None
        self._options: dict[str, Any] = {}
        self._inherited = False  # the executor's workers inherited the first batch's arrays
        self._failed: Future[Any] = Future()  # in-order calls: the first failed batch (retrieve_result)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise InvalidArgumentError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if os.environ.get("SHARDC_WORKER") is not None:
            return 1  # inside a shardc worker: no pool of its own
        if not (self.in_main_thread() or self.nesting_level == 0):
            if n_jobs != 1:
                warnings.warn(
                    "shardc-backed parallel loops cannot be nested below threads, setting n_jobs=1",
                    stacklevel=3,
                )
            return 1
        if n_jobs < 0:
            return max(cpu_count() + 1 + n_jobs, 1)
        return int(n_jobs)

    def configure(
        self,
        n_jobs: int = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        max_nbytes: Any = "1M",
        mmap_mode: str | None = "r",
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        **backend_kwargs: Any,
    ) -> int:
        n_jobs = self.effective_n_jobs(n_jobs)
        if initializer is None:  # given to parallel_config: a backend parameter
            initializer = self.backend_kwargs.get("initializer")
            initargs = self.backend_kwargs.get("initargs", ())
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        # Results in order (a list, return_as="generator"): joblib's main
        # thread then waits in retrieve_result(), woken by the completion of
        # the batch it yields next, instead of polling every 10 ms (its loop
        # for callback backends); "generator_unordered" needs the callbacks.
        self.supports_retrieve_callback = parallel is None or not getattr(parallel, "return_ordered", True)
        share = max_nbytes if mmap_mode in ("r", "c") and max_nbytes is not None else None
        if self._executor is not None or self._pool is not None:
            self.terminate()
        if initializer is not None:  # a pool of its own, whose workers ran it (joblib >= 1.5)
            init = functools.partial(initializer, *initargs)
            pool, private = self._pool = Pool(n_jobs, init_expr=init), True
        else:
            pool, private = self._pool = _take_pool(n_jobs)
        self._options = {
            "pool": pool,
            "max_retries": self.max_retries,
            "timeout": self.task_timeout,
            "mem_cap": self.mem_cap,
            "cow": "allow" if mmap_mode == "c" else "deny",
            "max_nbytes": share or None,
        }
        if not share:  # nothing to inherit: start now (setup errors surface at configure)
            self._start([])
        return n_jobs

    def _start(self, first: Any) -> Executor:
        """The executor, started at ``configure`` or, when big arrays may be
        shared, at the first batch: the workers are then forked again to
        inherit the big arrays among its arguments (``Executor(inherit=)``),
        which costs no copy; arrays first seen in a later batch are copied."""
        assert self._pool is not None, "configure() first"
        arrays = [a for _f, args, kwargs in getattr(first, "items", ()) for a in (*args, *kwargs.values())]
        try:
            self._executor = Executor(**self._options, inherit=arrays)
        except BaseException:
            _give_back(*self._pool)
            self._pool = None
            raise
        self._inherited = self._executor.inherits
        return self._executor

    def start_call(self) -> None:
        """The start of a Parallel call: no batch of it failed yet."""
        self._failed = Future()

    def stop_call(self) -> None:
        """The end of a Parallel call: an executor whose workers inherited
        this call's arguments stops (a later call may pass changed arrays:
        the next one starts afresh)."""
        if self._inherited and self._executor is not None:
            ex, self._executor = self._executor, None
            ex.shutdown(wait=True)

    def submit(self, func: Any, callback: Any = None) -> Future[Any]:
        ex = self._executor
        if ex is None:
            ex = self._start(func)
        fut = ex.submit(func)
        items = getattr(func, "items", None)
        if items:
            f = items[0][0]
            fname = getattr(f, "__qualname__", None) or type(f).__name__
            fut._shardc_name = f"joblib batch of {len(items)} call(s) to {fname}"  # type: ignore[attr-defined]
        if not self.supports_retrieve_callback:  # first: a failure wakes the main thread at once
            fut.add_done_callback(functools.partial(_note_failure, self._failed))
        if callback is not None:
            fut.add_done_callback(functools.partial(gc_paused, callback) if self.pause_gc else callback)
        return fut

    def retrieve_result(self, out: Future[Any], timeout: float | None = None) -> Any:
        """In-order calls: joblib's main thread waits here for the batch it
        yields next, woken by its completion; or by the failure of any other
        batch of the call, whose error it then raises (joblib's fast abort);
        ``timeout`` (Parallel's): joblib's ``TimeoutError``."""
        failed = self._failed
        if not out.done():
            wait((out, failed), timeout, FIRST_COMPLETED)
            if not out.done():
                if failed.done():
                    return failed.result().result()  # raises the other batch's error
                name = getattr(out, "_shardc_name", "a joblib batch")
                raise ParallelTimeoutError(f"{name} was not done within Parallel(timeout={timeout})")
        return out.result()

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        return out.result()

    def terminate(self) -> None:
        ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)
        if self._pool is not None:
            _give_back(*self._pool)
            self._pool = None
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel the batches not started and kill the workers running the
        others (fresh ones take their places in the pool)."""
        ex, self._executor = self._executor, None
        if ex is not None:
            ex.terminate()
        self.terminate()
        if ensure_ready and self.parallel is not None:
            kw = {**self.backend_kwargs, **self.parallel._backend_kwargs}
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel, **kw)


def register_joblib() -> None:
    """Register the "shardc" joblib backend (idempotent)."""
    register_parallel_backend("shardc", ShardcBackend)
