"""``shard_reduce``: validate -> plan -> run -> result, for a streaming reduction.

::

    shard_reduce(shards, map, combine, init, borrow=, out=, ...)
      │ validate       map/kernel, combine, init, every engine option (frontend.check_options)
      │ groups         G consecutive shard ids per group, G from num_shards only
      ▼
    frontend.execute   the same InputPlan, Scheduler, Supervisor and Dispatcher as shard_map,
      │                running one task per group: reduction.Fold in the worker
      │                (acc = init; acc = combine(acc, map(shard)) in id order)
      │  Scheduler(sink=TreeCombiner.put): each group's partial goes straight
      │  into the master's fixed tree; no list of values is kept
      ▼
    ReduceResult       value, failures by shard id, missing shard ranges, diagnostics

The design (groups, tree, determinism) is in ``reduction.py``.

Dispatch modes.  Both modes give the same value, bit for bit.  The engine
sees one task per group (at most ~1024 with ``group_size="auto"``), and the
per-shard hot loop is the fold inside the worker, identical in both modes;
what ``shm_queue`` saves (a message per shard) is already saved by the
groups.  ``shm_queue`` gathers no return values, and a group's partial is
one, so ``dispatch_mode="shm_queue"`` runs the groups over the
``rpc_chunked`` transport (``diagnostics.mode`` says so): a second channel
for values in the queue would add a transport path for no measured gain.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import numpy as np

from .buffer import buffer
from .diagnostics import Diagnostics
from .errors import BindingError, InvalidArgumentError, ReduceError, UnpicklableFunctionError
from .frontend import RPC_DEFAULT, check_options, execute
from .kernels import get_kernel
from .pool import Pool
from .reduction import AT_NAME, Fold, GroupDescriptor, ReduceResult, TreeCombiner, auto_group_size, shard_failure
from .scheduler import Scheduler
from .validate import check_binding, check_int, check_names, check_out, pickle_function, resolve_shards

log = logging.getLogger("shardc")

_REQUIRED: Any = object()


def _check_combine(combine: Any) -> None:
    if combine is _REQUIRED:
        raise InvalidArgumentError(
            "shard_reduce needs combine=: a function combine(acc, value) -> acc, associative, "
            "with init as its identity (e.g. combine=operator.add, init=0)"
        )
    if not callable(combine):
        raise InvalidArgumentError(f"combine must be callable as combine(acc, value), got {type(combine).__name__}")
    try:
        sig = inspect.signature(combine)
    except (TypeError, ValueError):
        return  # a builtin without a signature (operator.add has one): cannot check here
    try:
        sig.bind(None, None)
    except TypeError:
        raise BindingError(
            f"combine {getattr(combine, '__qualname__', combine)!r} must accept two positional "
            f"arguments, combine(acc, value); its signature is {sig}"
        ) from None


def _check_picklable(obj: Any, what: str) -> None:
    try:
        cloudpickle.dumps(obj, protocol=5)
    except Exception as exc:  # noqa: BLE001 - any failure: name it
        raise UnpicklableFunctionError(
            f"{what} cannot be pickled to send it to the workers: {type(exc).__name__}: {exc}"
        ) from exc


def _name_unpicklable_map(fn: Any, what: str, exc: UnpicklableFunctionError) -> None:
    """The engine could not pickle the fold: combine and init were checked, so it is ``map``
    (or the kernel); raise naming it and what it captures, not the internal Fold object."""
    try:
        pickle_function(fn, lambda obj: None)
    except UnpicklableFunctionError as inner:
        raise UnpicklableFunctionError(f"shard_reduce's {what.split(' ', 1)[0]}=: {inner}") from inner.__cause__
    raise exc


def shard_reduce(
    shards: Any,
    map: Callable[..., Any] | None = None,  # noqa: A002 - the R package's name
    combine: Callable[[Any, Any], Any] = _REQUIRED,
    init: Any = _REQUIRED,
    *,
    kernel: str | None = None,
    borrow: dict[str, Any] | None = None,
    out: dict[str, Any] | None = None,
    group_size: Any = "auto",
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
) -> ReduceResult:
    """Reduce ``map(shard, **borrow, **out)`` over every shard with ``combine``, in parallel.

    The value is ``combine``-folded over the shards in a tree fixed by shard
    ids alone, so it is bit-identical for any worker count, chunk size,
    dispatch mode, and across retries.

    Args:
        shards: a descriptor from :func:`shards`/:func:`shards_list`, or an int N.
        map: called in a worker once per shard as ``map(shard, **borrow,
            **out)``; its value is folded into the group's partial.  Or use
            ``kernel=``.
        combine: ``combine(acc, value) -> acc``, associative; used in the
            workers (folding a group's shards in id order) and on the master
            (combining group partials in a fixed binary tree).  It may update
            ``acc`` in place and return it.
        init: the identity of ``combine`` (``combine(init, v) == v``), e.g. 0
            or ``np.zeros(k)``; each group starts from its own copy, so it is
            applied once per group (never once per worker).
        kernel: name of a registered kernel instead of ``map``.
        borrow, out: as in :func:`shard_map`.
        group_size: shards per group, or "auto" (``ceil(num_shards / 1024)``):
            a function of the shards only, never of workers or chunking.
            Larger groups mean fewer partials (use them for big array
            partials), smaller ones better balance.
        dispatch_mode: "rpc_chunked" or "shm_queue" (same value; groups run
            over the rpc transport either way, see the module docstring).
        chunk_size: groups per dispatch (int or "auto").
        workers, dispatch_opts, profile, mem_cap, recycle, cow, seed,
        diagnostics, packages, init_expr, timeout, max_retries,
        health_check_interval, pool, progress: as in :func:`shard_map`;
            ``timeout`` bounds one group, retries rerun a whole group.
        on_failure: "raise" (default: :class:`ReduceError` carrying the
            result) or "collect" (return it: ``value`` reduces the groups
            that succeeded, ``missing`` lists the shards left out).

    Returns:
        A :class:`ReduceResult`.

    Raises:
        InvalidArgumentError, BindingError, UnpicklableFunctionError: bad
            arguments, before any worker starts.
        ReduceError: a group failed permanently (``on_failure="raise"``), or
            ``combine`` raised on the master.
    """
    t_start = time.perf_counter()
    desc, scalar_n = resolve_shards(shards)
    if map is not None and kernel is not None:
        raise InvalidArgumentError("give either map= or kernel=, not both")
    if map is None and kernel is None:
        raise InvalidArgumentError("give the function to map over the shards: map=... (or kernel='name')")
    kern = get_kernel(kernel) if kernel is not None else None
    fn = kern.impl if kern is not None else map
    if not callable(fn):
        raise InvalidArgumentError(f"map must be callable as map(shard, ...), got {type(map).__name__}")
    if kern is not None:
        kern.check_shards(desc)
    _check_combine(combine)
    if init is _REQUIRED:
        raise InvalidArgumentError(
            "shard_reduce needs init=: the identity of combine (0 for a sum, np.zeros(k) for "
            "a vector sum); each group starts from a copy of it"
        )
    _check_picklable(combine, f"combine {getattr(combine, '__qualname__', combine)!r}")
    _check_picklable(init, f"init ({type(init).__name__})")
    borrow = check_names(borrow, "borrow")
    out = check_names(out, "out")
    clash = set(borrow) & set(out)
    if clash:
        raise InvalidArgumentError(f"names {sorted(clash)} appear in both borrow= and out=; use distinct names")
    if AT_NAME in borrow or AT_NAME in out:
        raise InvalidArgumentError(f"the name {AT_NAME!r} is reserved by shard_reduce")
    check_out(out)
    what = f"kernel {kernel!r}" if kern else f"map {getattr(map, '__qualname__', map)!r}"
    check_binding(fn, list(borrow) + list(out), what)
    if isinstance(group_size, str) and group_size == "auto":
        gsize = auto_group_size(desc.num_shards)
    else:
        gsize = min(check_int(group_size, "group_size", 1), desc.num_shards)
    gdesc = GroupDescriptor(desc, gsize)
    call, chunk, tune = check_options(
        gdesc,
        False,
        has_out=True,
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
        autotune=None,
    )
    if call.opts.get("auto_table"):
        raise InvalidArgumentError("dispatch_opts['auto_table'] is a shard_map option: shard_reduce returns one value")
    requested = call.mode
    if requested == "shm_queue":
        call.mode, call.opts = "rpc_chunked", {}  # partials are values: see the module docstring
    fold = Fold(fn, combine, init, call.seed is not None)
    n_groups = gdesc.num_shards
    diag = Diagnostics(mode=call.mode, num_shards=n_groups, cow=cow, enabled=call.diagnostics, chunk_size=chunk)
    tree = TreeCombiner(n_groups, combine)
    sched = Scheduler(n_groups, call.max_retries, chunk, tune, None, diag, sink=tree.put)
    at_buf = buffer(np.int64, n_groups, init=-1)
    try:
        pool_stats = execute(
            call,
            fold,
            borrow,
            {**out, AT_NAME: at_buf},
            sched,
            diag,
            pool=pool,
            workers=workers,
            packages=packages,
            init_expr=init_expr,
            progress=progress,
            label="shard_reduce",
        )
        at = at_buf.array.copy()
    except UnpicklableFunctionError as exc:
        if call.fun_blob:
            raise  # fun was pickled: this came from something else
        _name_unpicklable_map(fn, what, exc)
    finally:
        at_buf.close()
    # The fold's bookkeeping array is not the caller's output: leave it out of the reports.
    diag.out.pop(AT_NAME, None)
    diag.out_written.pop(AT_NAME, None)
    diag._out_alloc = {k: v for k, v in diag._out_alloc.items() if v[0] != AT_NAME}
    diag.wall_seconds = time.perf_counter() - t_start
    failures = {}
    missing = []
    for g in sorted(sched.failures):
        f = shard_failure(sched.failures[g], gdesc, at)
        failures[f.shard_id] = f
        missing.append(gdesc.bounds(g))
    diag.reduce = {
        "groups": n_groups,
        "group_size": gsize,
        "requested_mode": requested,
        "partials": tree.partials,
        "combine_steps": tree.steps,
        "fold_steps": desc.num_shards - sum(b - a for a, b in missing),
        "partial_max_bytes": tree.max_bytes,
        "max_partials_held": tree.max_held,
    }
    result = ReduceResult(tree.result(init), failures, missing, diag, pool_stats, desc)
    if tree.error is not None:
        raise ReduceError(
            f"combine raised on the master while {tree.error_where}: {type(tree.error).__name__}: "
            f"{tree.error} (the partial result is in err.result)",
            result,
        ) from tree.error
    if failures and on_failure == "raise":
        first = min(failures)
        f = failures[first]
        n = sum(b - a for a, b in missing)
        err = ReduceError(
            f"{len(failures)} of {n_groups} groups failed ({n} of {desc.num_shards} shards missing "
            f"from the value); first: shard {first} after {f.attempts} attempt(s): "
            f"{f.error_type.rsplit('.', 1)[-1]}: {f.message} (the full result is in err.result; "
            "pass on_failure='collect' to get the reduction over the groups that succeeded)",
            result,
        )
        if f.exception is not None:
            raise err from f.exception
        raise err
    return result
