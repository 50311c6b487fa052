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

``shard_map`` itself only wires these together; front ends built later
(reductions, tables, an Executor, cluster agents) reuse the same pieces.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .call import Call
from .diagnostics import Diagnostics, Progress
from .dispatch_queue import QueueDispatcher
from .dispatch_rpc import RpcDispatcher
from .errors import InvalidArgumentError, ShardMapError, signal_label
from .forget import call_finished, call_started
from .inputs import InputPlan
from .kernels import get_kernel
from .memory import PROFILES, heap_keep
from .pool import Pool, pool_create, pool_get, register_front_end
from .result import ShardResult
from .scheduler import Scheduler
from .status import DoneMap
from .supervisor import Supervisor
from .units import check_recycle, parse_bytes
from .validate import (
    COW_MODES,
    DISPATCH_MODES,
    check_autotune,
    check_binding,
    check_choice,
    check_dispatch_opts,
    check_int,
    check_names,
    check_out,
    check_packages,
    check_scheduler_policy,
    check_seed,
    check_timeout,
    pickle_function,
    resolve_shards,
)

log = logging.getLogger("shardc")


class _DefaultStr(str):
    """The default of ``dispatch_mode``: "rpc_chunked", but distinguishable
    from an explicit "rpc_chunked" so ``profile="speed"`` may pick shm_queue."""


RPC_DEFAULT = _DefaultStr("rpc_chunked")


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
        dispatch_opts: per mode: rpc_chunked {"prefetch"}; shm_queue
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
    check_choice(cow, "cow", COW_MODES)
    check_choice(profile, "profile", PROFILES)
    check_choice(on_failure, "on_failure", ("raise", "collect"))
    if not (isinstance(chunk_size, str) and chunk_size == "auto"):
        chunk_size = check_int(chunk_size, "chunk_size", 1)
    if dispatch_mode is RPC_DEFAULT:
        # shm_queue is picked at every size: since issue 18 it is at least as
        # fast as rpc_chunked (chunk_size="auto") from 10^2 to 10^6 trivial
        # shards (bench/bench_tiny.py --only grid); before, it lost below ~200k.
        mode = "shm_queue" if (profile == "speed" and scalar_n and out and chunk_size == 1) else "rpc_chunked"
    else:
        mode = check_choice(dispatch_mode, "dispatch_mode", DISPATCH_MODES)
    opts = check_dispatch_opts(dispatch_opts, mode)
    if workers is not None:
        check_int(workers, "workers", 1)
    cap = parse_bytes(mem_cap, "mem_cap")
    seed_v = check_seed(seed)
    tune = check_autotune(autotune, scalar_n)
    if chunk_size == "auto" and tune is None:
        tune = {"mode": "online", "target_chunk_seconds": 0.005, "max_rounds": 64}
    policy = check_scheduler_policy(scheduler_policy)
    if policy.get("max_huge_concurrency") and kern is None:
        log.info(
            "scheduler_policy max_huge_concurrency applies to kernels with a footprint; "
            "fun= has none, so nothing is throttled"
        )
    if progress is not None and not isinstance(progress, bool):
        raise InvalidArgumentError(f"progress must be None, True or False, got {progress!r}")
    check_packages(packages)
    if cluster is not None:
        if pool is not None:
            raise InvalidArgumentError("pool= is a pool on this machine; with cluster= every node runs its own pool")
        from .cluster.base import run_on_cluster  # imports Dask/Ray only here

        local = {
            "dispatch_mode": mode,
            "dispatch_opts": opts,
            "chunk_size": chunk_size,
            "autotune": tune if tune is not None else False,
            "scheduler_policy": policy,
            "workers": workers,
            "profile": profile,
            "mem_cap": mem_cap,
            "recycle": recycle,
            "cow": cow,
            "seed": seed_v,
            "diagnostics": bool(diagnostics),
            "packages": packages,
            "init_expr": init_expr,
            "timeout": check_timeout(timeout),
            "max_retries": check_int(max_retries, "max_retries", 0),
            "health_check_interval": check_int(health_check_interval, "health_check_interval", 1),
        }
        return run_on_cluster(cluster, desc, fun, kernel, borrow, out, local, on_failure)
    call = Call(
        desc=desc,
        mode=mode,
        opts=opts,
        cow=cow,
        profile=profile,
        mem_cap=cap,
        drift=check_recycle(recycle),
        seed=seed_v,
        diagnostics=bool(diagnostics),
        timeout=check_timeout(timeout),
        max_retries=check_int(max_retries, "max_retries", 0),
        health_check_interval=check_int(health_check_interval, "health_check_interval", 1),
        heap_keep=heap_keep(profile, cap),
    )
    call.entropy = np.random.SeedSequence(seed_v).entropy  # type: ignore[assignment]
    chunk = 1 if chunk_size == "auto" else chunk_size
    diag = Diagnostics(mode=mode, num_shards=desc.num_shards, cow=cow, enabled=call.diagnostics, chunk_size=chunk)
    huge = None
    if kern is not None and policy.get("max_huge_concurrency"):
        huge = (int(policy["max_huge_concurrency"]), lambda sid: kern.classify(desc.shard(sid))[0] == "huge")
    sched = Scheduler(desc.num_shards, call.max_retries, chunk, tune, huge, diag)

    # Inheritance relies on the page guards to keep each shard's view of the
    # array pristine (and to catch writes on its partial end pages): a pool
    # without them (Pool(cow_guard=False)) gets segment copies instead.
    known = pool if pool is not None else pool_get()
    plan = InputPlan(target, allow_inherit=known.cow_guard if known is not None else True)
    call.plan = plan
    run_pool: Pool | None = None
    call_started()
    try:
        # Pickle fun before any worker exists (clear errors first), collecting
        # the buffers, shared inputs and inheritable arrays it captures.
        call.fun_blob = pickle_function(target, plan.capture)
        call.donemap = DoneMap(desc.num_shards)
        plan.add_segment(call.donemap.segment)
        plan.add_out(out)
        plan.add_borrow(borrow)
        for name, nbytes, seg in plan.out_records:
            diag.add_out(name, nbytes, seg)
        for rec in plan.borrow_records:
            diag.add_borrow(*rec)
        run_pool = _get_pool(pool, workers, packages, init_expr, profile)
        _run(call, run_pool, sched, diag, progress)
    finally:
        if plan.release() and run_pool is not None:
            run_pool.released_inherited()  # also when the call failed before it ran
        if call.donemap is not None:
            call.donemap.close()
        call_finished()  # workers let go of segments closed meanwhile (temporaries, done map)
    diag.wall_seconds = time.perf_counter() - t_start
    diag.completed = sched.completed
    diag.failed = sched.n_failed
    pool_stats = {
        "workers": run_pool.size,
        "status": [w.info() for w in run_pool.workers],
        "events": list(run_pool.events),
    }
    result = ShardResult(sched.results, dict(sorted(sched.failures.items())), diag, pool_stats, desc)
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


def _run(call: Call, pool: Pool, sched: Scheduler, diag: Diagnostics, progress: bool | None) -> None:
    """Run the call on ``pool``: fresh workers where needed, set up, dispatch, end."""
    plan = call.plan
    assert plan is not None
    for w in pool.ensure_alive():
        diag.event(
            "death",
            w,
            f"worker died while idle ({signal_label(w.exitcode)})"
            if w.exitcode is not None
            else "worker died while idle",
            code=w.exitcode,
        )
    if plan.inherit_tokens:
        t0 = time.perf_counter()
        fresh = pool.refork(
            frozenset(plan.inherit_tokens),
            f"fork after borrowed input(s) {plan.inherited_names()} existed, to inherit them",
        )
        diag.refork_seconds = time.perf_counter() - t0
        diag.reforked = len(fresh)
    diag.start(pool)
    bar = Progress(sched.num, f"shard_map[{call.mode}]", progress)
    try:
        sup = Supervisor(call, pool, sched, diag, bar)
        sup.setup_all()
        dispatcher = QueueDispatcher(sup) if call.mode == "shm_queue" else RpcDispatcher(sup)
        try:
            sup.run(dispatcher)
        finally:
            if isinstance(dispatcher, QueueDispatcher):
                dispatcher.close()
            diag.finish(pool, segments=plan.segments)
            sup.progress_update(refresh=True)
            pool.end_call()
    finally:
        bar.close()


def _get_pool(pool: Pool | None, workers: int | None, packages: Any, init_expr: Any, profile: str) -> Pool:
    if pool is not None:
        pool.check_open()
        if workers is not None and workers != pool.size:
            raise InvalidArgumentError(f"workers={workers} conflicts with the given pool of {pool.size} workers")
        if packages or init_expr is not None:
            raise InvalidArgumentError(
                "packages/init_expr belong to the pool when pool= is given: pass them to Pool(...)"
            )
        return pool
    cur = pool_get()
    pk = list(packages or [])
    if (
        cur is not None
        and (workers is None or workers == cur.size)
        and cur.packages == pk
        and (init_expr is None or init_expr is cur.init_expr or init_expr == cur.init_expr)
    ):
        return cur
    return pool_create(workers, packages=pk, init_expr=init_expr, profile=profile)


register_front_end(shard_map)
