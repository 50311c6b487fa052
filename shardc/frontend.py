"""What every front end shares: option checks, running a call on a pool, and the pool choice.

A front end (``shard_map`` in ``map.py``, ``shard_reduce`` in ``reduce.py``)
turns its own arguments into a target function, a shard descriptor and a
:class:`~shardc.scheduler.Scheduler`; everything else is here, once:

::

    check_options(...)  every engine option (mode, retries, memory, seed, ...)
       │                -> a validated Call, the first chunk size, the tuning
    execute(...)        InputPlan (fun pickled, done map, out=, borrow=) -> pool
       │                -> Supervisor + a Dispatcher -> the call's cleanup
       ▼
    pool_stats          a plain snapshot of the pool for the result

Nothing here knows what the front end does with the values: the scheduler
either stores them (``shard_map``) or hands them to a sink (``shard_reduce``).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .call import Call
from .diagnostics import Diagnostics, Progress
from .dispatch_queue import QueueDispatcher
from .dispatch_rpc import RpcDispatcher
from .errors import InvalidArgumentError, signal_label
from .forget import call_finished, call_started
from .forkserver import resolve_mode, use_server
from .funpickle import pickle_fun
from .inputs import InputPlan
from .memory import PROFILES, heap_keep
from .pool import Pool, pool_create, pool_get
from .scheduler import Scheduler
from .supervisor import Supervisor
from .units import check_recycle, parse_bytes
from .validate import (
    COW_MODES,
    DISPATCH_MODES,
    check_autotune,
    check_choice,
    check_dispatch_opts,
    check_int,
    check_packages,
    check_seed,
    check_timeout,
)

log = logging.getLogger("shardc")


class _DefaultStr(str):
    """The default of ``dispatch_mode``: "rpc_chunked", but distinguishable
    from an explicit "rpc_chunked" so ``profile="speed"`` may pick shm_queue."""


RPC_DEFAULT = _DefaultStr("rpc_chunked")


_ENTROPY = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ENTROPY.seed(os.urandom(32)))


def check_options(
    desc: Any,
    scalar_n: bool,
    *,
    has_out: bool,
    dispatch_mode: str,
    dispatch_opts: dict[str, Any] | None,
    workers: int | None,
    chunk_size: Any,
    profile: str,
    mem_cap: Any,
    recycle: Any,
    cow: str,
    seed: int | None,
    diagnostics: bool,
    packages: list[str] | None,
    timeout: float,
    max_retries: int,
    health_check_interval: int,
    on_failure: str,
    progress: bool | None,
    autotune: Any,
) -> tuple[Call, int, dict[str, Any] | None]:
    """Check the engine options every front end takes (see ``shard_map``).

    Returns:
        ``(call, chunk, tune)``: the validated call, the chunk size to start
        with, and the online tuning settings (None: a fixed chunk size).

    Raises:
        InvalidArgumentError: naming the bad option, before any worker starts.
    """
    check_choice(cow, "cow", COW_MODES)
    check_choice(profile, "profile", PROFILES)
    check_choice(on_failure, "on_failure", ("raise", "collect"))
    if not (isinstance(chunk_size, str) and chunk_size == "auto"):
        chunk_size = check_int(chunk_size, "chunk_size", 1)
    if dispatch_mode is RPC_DEFAULT:
        # shm_queue is picked at every size: since issue 18 it is at least as
        # fast as rpc_chunked (chunk_size="auto") from 10^2 to 10^6 trivial
        # shards (bench/bench_tiny.py --only grid); before, it lost below ~200k.
        mode = "shm_queue" if (profile == "speed" and scalar_n and has_out and chunk_size == 1) else "rpc_chunked"
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
    if progress is not None and not isinstance(progress, bool):
        raise InvalidArgumentError(f"progress must be None, True or False, got {progress!r}")
    check_packages(packages)
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
    # Unseeded: fresh 128 bits per call from a generator seeded by the OS (and
    # again in a forked child), where SeedSequence(None) asked the OS each call.
    call.entropy = (
        _ENTROPY.getrandbits(128) if seed_v is None else np.random.SeedSequence(seed_v).entropy  # type: ignore[assignment]
    )
    chunk = 1 if chunk_size == "auto" else chunk_size
    return call, chunk, tune


def execute(
    call: Call,
    target: Callable[..., Any],
    borrow: dict[str, Any],
    out: dict[str, Any],
    sched: Scheduler,
    diag: Diagnostics,
    *,
    pool: Pool | None,
    workers: int | None,
    packages: list[str] | None,
    init_expr: Any,
    progress: bool | None,
    label: str,
) -> dict[str, Any]:
    """Plan the inputs, pick the pool and run ``call`` to the end.

    ``target`` is what the workers run per task (``fun``, a kernel, or a
    front end's own wrapper).  Returns the pool's state after the run (plain
    data for the result); the outcomes are in ``sched``.
    """
    # Inheritance relies on the page guards to keep each shard's view of the
    # array pristine (and to catch writes on its partial end pages): a pool
    # without them (Pool(cow_guard=False)) gets segment copies instead.
    known = pool if pool is not None else pool_get()

    # Workers from a fork server (threaded callers, shardc.forkserver) cannot inherit either.
    def inheritable() -> bool:  # (asked only when an input could be inherited)
        return bool(known.can_inherit) if known is not None else not use_server(resolve_mode("auto"))

    plan = InputPlan(target, allow_inherit=inheritable)
    call.plan = plan
    run_pool: Pool | None = None
    call_started()
    try:
        # Pickle fun before any worker exists (clear errors first), collecting
        # the buffers, shared inputs and inheritable arrays it captures.
        call.fun_blob = pickle_fun(target, plan.capture)  # (reused while provably unchanged)
        plan.add_out(out)
        plan.add_borrow(borrow)
        for name, nbytes, seg in plan.out_records:
            diag.add_out(name, nbytes, seg)
        for rec in plan.borrow_records:
            diag.add_borrow(*rec)
        run_pool = get_pool(pool, workers, packages, init_expr, call.profile)
        quiet = run_pool.status.quiet  # (done_map clears it until this call ends with all work reported)
        call.donemap = run_pool.status.done_map(call.desc.num_shards)  # the pool's kept map (small calls)
        plan.add_segment(call.donemap.segment)
        _run(call, run_pool, sched, diag, progress, label, quiet)
    finally:
        if plan.release() and run_pool is not None:
            run_pool.released_inherited()  # also when the call failed before it ran
        if call.donemap is not None:
            call.donemap.close()
        call_finished()  # workers let go of segments closed meanwhile (temporaries, done map)
    diag.completed = sched.completed
    diag.failed = sched.n_failed
    return {
        "workers": run_pool.size,
        "status": [w.info() for w in run_pool.workers],
        "events": list(run_pool.events),
    }


def _run(
    call: Call, pool: Pool, sched: Scheduler, diag: Diagnostics, progress: bool | None, label: str, quiet: bool
) -> None:
    """Run the call on ``pool``: fresh workers where needed, set up, dispatch, end.
    ``quiet``: no worker holds work of an earlier call, so the first work
    follows the setup without waiting for the answers (a round trip less)."""
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
    bar = Progress(sched.num, f"{label}[{call.mode}]", progress)
    try:
        sup = Supervisor(call, pool, sched, diag, bar)
        sup.setup_all(pipeline=quiet)
        assert call.donemap is not None
        # No earlier call's mark can follow: every worker answered the setup
        # (after its last message of that call), or (quiet) had none left.
        call.donemap.reset()
        dispatcher = QueueDispatcher(sup) if call.mode == "shm_queue" else RpcDispatcher(sup)
        ended_quiet = False
        try:
            sup.run(dispatcher)
            ended_quiet = dispatcher.quiet()  # (a worker still setting up holds no work)
        finally:
            pool.status.quiet = ended_quiet
            if isinstance(dispatcher, QueueDispatcher):
                dispatcher.close()
            diag.finish(pool, segments=plan.segments)
            sup.progress_update(refresh=True)
            pool.end_call()
    finally:
        bar.close()


def get_pool(pool: Pool | None, workers: int | None, packages: Any, init_expr: Any, profile: str) -> Pool:
    """The pool to run on: ``pool``, the current default pool if it fits, or a new one."""
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
