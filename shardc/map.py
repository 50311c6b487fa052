"""``shard_map``: validate -> plan -> run -> result.

Data flow (both dispatch modes)::

    shard_map(shards, fun, borrow=, out=, ...)
      │ validate.py   every check, before any worker starts
      │ inputs.py     InputPlan: each input's fate (reference / inherited /
      │               cached copy / pickle-5), fun pickled once
      ▼
    Supervisor (supervisor.py) ── CALL + segment fds ──> every worker: map inputs, load fun
      │  the one event loop: sockets (EOF = death) + a 50 ms tick (watchdog, memory)
      │  Scheduler (scheduler.py): next ids, attempts, retries, chunk size
      │  Dispatcher (dispatch.py), one of:
      │    rpc_chunked  dispatch_rpc.py   RUN chunks over sockets ──> worker ──> RESULTS (values)
      │    shm_queue    dispatch_queue.py blocks in a shared ring ──> worker ──> done map + counters
      │  worker: ONE shard executor (worker/) writes its status row through C (status.py)
      │  on death: dispatcher.lost() -> requeue / charge -> Supervisor.replace()
      ▼
    ShardResult (result.py: results in shard order, failures, plain picklable diagnostics)

``shard_map`` itself only wires these together; what every front end shares
(option checks, planning and running a call, the pool choice) is in
``frontend.py``, which ``shard_reduce`` (``reduce.py``) uses too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .diagnostics import Diagnostics
from .errors import InvalidArgumentError, ShardMapError
from .frontend import RPC_DEFAULT, check_options, execute
from .kernels import get_kernel
from .pool import Pool, pool_get, register_front_end
from .result import ShardResult
from .scheduler import Scheduler
from .validate import (
    check_binding,
    check_names,
    check_out,
    check_scheduler_policy,
    resolve_shards,
)

log = logging.getLogger("shardc")


def shard_map(
    shards: Any,
    fun: Callable[..., Any] | None = None,
    *,
    borrow: dict[str, Any] | None = None,
    out: dict[str, Any] | None = None,
    kernel: str | None = None,
    scheduler_policy: dict[str, Any] | None = None,
    autotune: Any = None,
    dispatch_mode: str = RPC_DEFAULT,
    dispatch_opts: dict[str, Any] | None = None,
    workers: int | None = None,
    chunk_size: Any = 1,
    profile: str = "default",
    mem_cap: Any = "2GB",
    recycle: Any = True,
    cow: str = "deny",
    seed: int | None = None,
    diagnostics: bool = True,
    packages: list[str] | None = None,
    init_expr: Any = None,
    timeout: float = 3600,
    max_retries: int = 3,
    health_check_interval: int = 10,
    pool: Pool | None = None,
    on_failure: str = "raise",
    progress: bool | None = None,
    cluster: Any = None,
) -> ShardResult:
    """Run ``fun(shard, **borrow, **out)`` for every shard, in parallel, supervised.

    Args:
        shards: a descriptor from :func:`shards`/:func:`shards_list`, or an
            int N (N single-item shards; ``shard.id`` is the item).
        fun: called in a worker once per shard as ``fun(shard, **borrow,
            **out)``; shipped once per call.  Or use ``kernel=``.  Every
            argument after ``fun`` is keyword-only.
        borrow: name -> input shared read-only with every worker, zero-copy
            (NumPy arrays, :class:`Shared`, buffers, or any picklable object).
        out: name -> :func:`buffer` that workers write into.
        kernel: name of a registered kernel instead of ``fun``.
        scheduler_policy: ``{"max_huge_concurrency": k}``.
        autotune: None (online chunk tuning for int N), True/"online",
            False/"none", or a dict.
        dispatch_mode: "rpc_chunked" (gathers return values) or "shm_queue"
            (shared ring, no return values: for tiny shards writing to out=).
        dispatch_opts: per mode: rpc_chunked {"prefetch", "auto_table*"
            (see :mod:`shardc.tables.options`: frames returned by shards are
            written to part files; ``result.table`` is the output)}; shm_queue
            {"block_size", "queue_backing", "error_log",
            "error_log_max_lines", "claim_batch"}.
        workers: pool size (None: the existing pool, or CPUs - 1).
        chunk_size: shards per dispatch (int or "auto").
        profile: "default", "memory" (recycle at half the drift) or "speed"
            (picks shm_queue for int N with out buffers).
        mem_cap: per-worker cap on private memory (USS), e.g. "2GB".
        recycle: True (50% growth over baseline), False, or a fraction.
        cow: "deny", "audit" or "allow": what a write into a borrowed input does.
        seed: makes ``shard.rng`` (and random/np.random) depend only on
            (seed, shard id): identical results for any workers/chunking.
            random/np.random are seeded lazily (a run of shards found
            drawing from them unseeded runs again, seeded; see
            ``shardc.worker.seeding``; ``SHARDC_LEGACY_SEEDING=eager``).
        diagnostics: collect per-shard timings and memory samples.
        packages: modules to import in each worker.
        init_expr: callable or code string run once in each worker.
        timeout: seconds one shard may run before its worker is killed.
        max_retries: retries per shard after a failure (so at most
            ``1 + max_retries`` attempts).
        health_check_interval: sample worker memory at least every N shards.
        pool: run on this :class:`Pool` instead of the default pool.
        on_failure: "raise" (default: :class:`ShardMapError` carrying the
            result) or "collect" (return the result with its failures).
        progress: show a progress bar (None: when stderr is a terminal or in
            a notebook, for runs over about a second).
        cluster: run on a cluster instead of this machine: a
            ``dask.distributed.Client``, ``"ray"``, or a
            :class:`shardc.cluster.Cluster` with options (see docs/cluster.md).
            Every other argument means what it means locally; ``workers`` is
            per node.

    Returns:
        A :class:`ShardResult`.

    Raises:
        InvalidArgumentError, BindingError, UnpicklableFunctionError: bad
            arguments, before any worker starts.
        ShardMapError: some shards failed permanently (``on_failure="raise"``).
    """
    t_start = time.perf_counter()
    desc, scalar_n = resolve_shards(shards)
    if fun is not None and kernel is not None:
        raise InvalidArgumentError("give either fun= or kernel=, not both")
    if fun is None and kernel is None:
        raise InvalidArgumentError("give the function to run: fun=... (or kernel='name')")
    kern = get_kernel(kernel) if kernel is not None else None
    target = kern.impl if kern is not None else fun
    if kern is not None:
        kern.check_shards(desc)
    if not callable(target):
        raise InvalidArgumentError(f"fun must be callable, got {type(fun).__name__}")
    borrow = check_names(borrow, "borrow")
    out = check_names(out, "out")
    clash = set(borrow) & set(out)
    if clash:
        raise InvalidArgumentError(f"names {sorted(clash)} appear in both borrow= and out=; use distinct names")
    check_out(out)
    check_binding(
        target, list(borrow) + list(out), f"kernel {kernel!r}" if kern else f"fun {getattr(fun, '__qualname__', fun)!r}"
    )
    call, chunk, tune = check_options(
        desc,
        scalar_n,
        has_out=bool(out),
        dispatch_mode=dispatch_mode,
        dispatch_opts=dispatch_opts,
        workers=workers,
        chunk_size=chunk_size,
        profile=profile,
        mem_cap=mem_cap,
        recycle=recycle,
        cow=cow,
        seed=seed,
        diagnostics=diagnostics,
        packages=packages,
        timeout=timeout,
        max_retries=max_retries,
        health_check_interval=health_check_interval,
        on_failure=on_failure,
        progress=progress,
        autotune=autotune,
    )
    policy = check_scheduler_policy(scheduler_policy)
    if policy.get("max_huge_concurrency") and kern is None:
        log.info(
            "scheduler_policy max_huge_concurrency applies to kernels with a footprint; "
            "fun= has none, so nothing is throttled"
        )
    mode = call.mode
    auto_table = bool(call.opts.get("auto_table"))
    if auto_table:
        if out:
            raise InvalidArgumentError(
                "dispatch_opts['auto_table'] requires out= to be empty: frames go to the table's parts; "
                "write other outputs with an explicit shardc.tables.table_sink / table_buffer instead"
            )
        if chunk_size == 1 and autotune is None:  # a part per chunk: many shards per part
            from .config import default_workers
            from .tables.auto import default_chunk

            known_pool = pool if pool is not None else pool_get()
            n_workers = workers or (known_pool.size if known_pool is not None else default_workers())
            chunk, tune = default_chunk(desc.num_shards, n_workers), None
    if cluster is not None:
        if pool is not None:
            raise InvalidArgumentError("pool= is a pool on this machine; with cluster= every node runs its own pool")
        if auto_table:
            raise InvalidArgumentError(
                "dispatch_opts['auto_table'] is not supported with cluster= yet: return plain values, "
                "or run the table job on one machine"
            )
        from .cluster.base import run_on_cluster  # imports Dask/Ray only here

        local = {
            "dispatch_mode": mode,
            "dispatch_opts": call.opts,
            "chunk_size": chunk_size,
            "autotune": tune if tune is not None else False,
            "scheduler_policy": policy,
            "workers": workers,
            "profile": profile,
            "mem_cap": mem_cap,
            "recycle": recycle,
            "cow": cow,
            "seed": call.seed,
            "diagnostics": call.diagnostics,
            "packages": packages,
            "init_expr": init_expr,
            "timeout": call.timeout,
            "max_retries": call.max_retries,
            "health_check_interval": call.health_check_interval,
        }
        return run_on_cluster(cluster, desc, fun, kernel, borrow, out, local, on_failure)
    diag = Diagnostics(mode=mode, num_shards=desc.num_shards, cow=cow, enabled=call.diagnostics, chunk_size=chunk)
    huge = None
    if kern is not None and policy.get("max_huge_concurrency"):
        huge = (int(policy["max_huge_concurrency"]), lambda sid: kern.classify(desc.shard(sid))[0] == "huge")
    sched = Scheduler(desc.num_shards, call.max_retries, chunk, tune, huge, diag)

    if auto_table:
        from .tables.auto import AutoTable  # the call's value sink (shardc.worker.executor.ValueSink)

        call.value_sink = AutoTable(call.opts, desc.num_shards, diag)
    try:
        pool_stats = execute(
            call,
            target,
            borrow,
            out,
            sched,
            diag,
            pool=pool,
            workers=workers,
            packages=packages,
            init_expr=init_expr,
            progress=progress,
            label="shard_map",
        )
        table = call.value_sink.finish(list(sched.failures)) if call.value_sink is not None else None
    except BaseException:
        if call.value_sink is not None:
            call.value_sink.discard()  # a temporary directory does not outlive a failed call
        raise
    diag.wall_seconds = time.perf_counter() - t_start
    result = ShardResult(sched.results_or_count(), dict(sorted(sched.failures.items())), diag, pool_stats, desc)
    result.table = table
    if result.failures and on_failure == "raise":
        first = min(result.failures)
        f = result.failures[first]
        err = ShardMapError(
            f"{len(result.failures)} of {desc.num_shards} shards failed; first: shard "
            f"{first} after {f.attempts} attempt(s): {f.error_type.rsplit('.', 1)[-1]}: "
            f"{f.message} (the full result is in err.result; pass on_failure='collect' "
            "to get it returned)",
            result,
        )
        if f.exception is not None:
            raise err from f.exception
        raise err
    return result


register_front_end(shard_map)
