"""``shard_map``: validate -> plan -> dispatch -> gather.

Data flow::

    caller ──shard_map(shards, fun, borrow, out, ...)──────────────────────────┐
      │ validate (no worker started yet: names, sizes, modes, pickling)         │
      │ share borrowed inputs (by reference / cached copy / one copy / pickle5) │
      │ cloudpickle fun once (buffers it captures go by reference)              │
      ▼                                                                         │
    Run (master) ── "call" + segment fds ──> each worker: map inputs, load fun  │
      │   loop:  pick chunk of shard ids ──"run"──> worker runs fun(shard, ...) │
      │          <──"results" (values, errors, timings)── (batched when tiny)   │
      │          watch: EOF (death) · status table (timeouts, current shard) ·  │
      │                 USS samples (mem_cap, recycle) · progress bar           │
      │   on death: requeue the chunk, charge an attempt to the running shard  │
      ▼                                                                         │
    ShardResult(results in shard order, failures, diagnostics, pool_stats) <────┘

Actors:

* **Run** (this module) owns one call: its queue of shard ids (fresh ids are
  a counter, retries a deque: O(1) memory per pending shard), per-worker
  in-flight sets, attempts, results and diagnostics.  It is the only place
  that decides to retry, fail, restart or recycle.
* **Pool** (``shardc.pool``) owns processes: fork, reap, kill, sample memory.
* **Worker** (``shardc.worker``) runs shards and reports; it never decides
  anything about retries.
* ``shm_queue`` mode replaces the "run"/"results" messages by the shared
  ring (``shardc.dispatch_queue``); supervision is the same Run.

Retries: a shard runs at most ``1 + max_retries`` times.  Exceptions known
to be deterministic (a ``cow="deny"`` violation, a binding error, an
unpicklable return value) fail at once.  A worker death charges an attempt
only to the shard that was running (read from the status table); the other
shards it held are requeued free.
"""

from __future__ import annotations

import logging
import os
import pickle
import selectors
import socket
import sys
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from . import _lowlevel as ll
from . import inherit
from ._channel import ChannelClosed
from .buffer import Buffer, buffer
from .diagnostics import Diagnostics, Progress
from .errors import (CallSetupTimeoutError, InvalidArgumentError, ShardMapError, ShardTimeoutError, WorkerCrashedError,
                     WorkerMemoryError, signal_label)
from .kernels import get_kernel
from .pool import (PROFILES, Pool, call_finished, call_started, check_recycle, fmt_bytes, heap_keep, parse_bytes,
                   pool_create, pool_get)
from .result import FailedShard, ShardFailure, ShardResult
from .segment import Segment, find_address
from .share import Shared, array_extent, default_cache, share
from .validate import (capture_label, COW_MODES, DISPATCH_MODES, check_autotune, check_binding, check_choice,
                       check_dispatch_opts, check_int, check_names, check_out, check_scheduler_policy,
                       check_seed, check_timeout, pickle_function, resolve_shards)
from .protocol import ERR, OK, OK_PICKLED, RETIRE_EXIT, raise_from_record
from .status import STATE_RUNNING, DoneMap

log = logging.getLogger("shardc")


class _DefaultStr(str):
    """The default of ``dispatch_mode``: "rpc_chunked", but distinguishable
    from an explicit "rpc_chunked" so ``profile="speed"`` may pick shm_queue."""


RPC_DEFAULT = _DefaultStr("rpc_chunked")
_call_ids = iter(range(1, 1 << 62))


def shard_map(shards: Any, fun: Callable[..., Any] | None = None, borrow: dict[str, Any] | None = None,
              out: dict[str, Any] | None = None, kernel: str | None = None,
              scheduler_policy: dict[str, Any] | None = None, autotune: Any = None,
              dispatch_mode: str = RPC_DEFAULT, dispatch_opts: dict[str, Any] | None = None,
              workers: int | None = None, chunk_size: Any = 1, profile: str = "default",
              mem_cap: Any = "2GB", recycle: Any = True, cow: str = "deny", seed: int | None = None,
              diagnostics: bool = True, packages: list[str] | None = None, init_expr: Any = None,
              timeout: float = 3600, max_retries: int = 3, health_check_interval: int = 10, *,
              pool: Pool | None = None, on_failure: str = "raise", progress: bool | None = None) -> ShardResult:
    """Run ``fun(shard, **borrow, **out)`` for every shard, in parallel, supervised.

    Args:
        shards: a descriptor from :func:`shards`/:func:`shards_list`, or an
            int N (N single-item shards; ``shard.id`` is the item).
        fun: called in a worker once per shard as ``fun(shard, **borrow,
            **out)``; shipped once per call.  Or use ``kernel=``.
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
    check_binding(target, list(borrow) + list(out), f"kernel {kernel!r}" if kern else
                  f"fun {getattr(fun, '__qualname__', fun)!r}")
    check_choice(cow, "cow", COW_MODES)
    check_choice(profile, "profile", PROFILES)
    check_choice(on_failure, "on_failure", ("raise", "collect"))
    if dispatch_mode is RPC_DEFAULT:
        mode = "shm_queue" if (profile == "speed" and scalar_n and out and chunk_size == 1) else "rpc_chunked"
    else:
        mode = check_choice(dispatch_mode, "dispatch_mode", DISPATCH_MODES)
    opts = check_dispatch_opts(dispatch_opts, mode)
    if workers is not None:
        check_int(workers, "workers", 1)
    if chunk_size != "auto":
        chunk_size = check_int(chunk_size, "chunk_size", 1)
    cap = parse_bytes(mem_cap, "mem_cap")
    drift = check_recycle(recycle)
    seed_v = check_seed(seed)
    timeout_s = check_timeout(timeout)
    retries = check_int(max_retries, "max_retries", 0)
    hci = check_int(health_check_interval, "health_check_interval", 1)
    tune = check_autotune(autotune, scalar_n)
    policy = check_scheduler_policy(scheduler_policy)
    if policy.get("max_huge_concurrency") and kern is None:
        log.info("scheduler_policy max_huge_concurrency applies to kernels with a footprint; "
                 "fun= has none, so nothing is throttled")
    if progress not in (None, True, False):
        raise InvalidArgumentError(f"progress must be None, True or False, got {progress!r}")
    if packages is not None and (isinstance(packages, str) or not all(isinstance(p, str) for p in packages)):
        raise InvalidArgumentError("packages must be a list of module names, e.g. ['scipy.stats']")

    run = Run(desc=desc, mode=mode, opts=opts, cow=cow, profile=profile, mem_cap=cap, drift=drift,
              seed=seed_v, diagnostics=bool(diagnostics), timeout=timeout_s, max_retries=retries,
              health_check_interval=hci, autotune=tune, chunk_size=chunk_size, kernel=kern,
              policy=policy, progress=progress)
    run.target = target
    # Inheritance relies on the page guards to keep each shard's view of the
    # array pristine (and to catch writes on its partial end pages): a pool
    # without them (Pool(cow_guard=False)) gets segment copies instead.
    known = pool if pool is not None else pool_get()
    run.allow_inherit = known.cow_guard if known is not None else True
    call_started()
    try:
        # Pickle fun before any worker exists (clear errors first), collecting
        # the buffers, shared inputs and inheritable arrays it captures.
        run.fun_blob = pickle_function(target, run.capture)
        run.prepare_inputs(borrow, out)
        run.pool = _get_pool(pool, workers, packages, init_expr, profile)
        run.execute()
    finally:
        run.release()
        call_finished()  # workers let go of segments closed meanwhile (temporaries, done map)
    run.diag.wall_seconds = time.perf_counter() - t_start
    result = run.result()
    if result.failures and on_failure == "raise":
        first = min(result.failures)
        f = result.failures[first]
        err = ShardMapError(f"{len(result.failures)} of {desc.num_shards} shards failed; first: shard "
                            f"{first} after {f.attempts} attempt(s): {f.error_type.rsplit('.', 1)[-1]}: "
                            f"{f.message} (the full result is in err.result; pass on_failure='collect' "
                            "to get it returned)", result)
        if f.exception is not None:
            raise err from f.exception
        raise err
    return result


def _get_pool(pool: Pool | None, workers: int | None, packages: Any, init_expr: Any, profile: str) -> Pool:
    if pool is not None:
        pool.check_open()
        if workers is not None and workers != pool.size:
            raise InvalidArgumentError(f"workers={workers} conflicts with the given pool of {pool.size} workers")
        if packages or init_expr is not None:
            raise InvalidArgumentError("packages/init_expr belong to the pool when pool= is given: "
                                       "pass them to Pool(...)")
        return pool
    cur = pool_get()
    pk = list(packages or [])
    if cur is not None and (workers is None or workers == cur.size) and cur.packages == pk and (
            init_expr is None or init_expr is cur.init_expr or init_expr == cur.init_expr):
        return cur
    return pool_create(workers, packages=pk, init_expr=init_expr, profile=profile)


class _WState:
    """Per-worker bookkeeping of one Run."""

    __slots__ = ("inflight", "pending_recycle", "since_sample", "last_msg", "deferred", "retiring")

    def __init__(self) -> None:
        self.inflight: dict[int, None] = {}
        self.pending_recycle: str | None = None
        self.since_sample = 0
        self.last_msg = time.monotonic()
        self.deferred = False
        self.retiring = False  # reported a write it cannot undo: exits after the report


class Run:
    """One shard_map call: the scheduler and supervisor (see module docstring)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)
        self.pool: Pool | None = None
        self.call_id = next(_call_ids)
        self.num = self.desc.num_shards
        self.next_fresh = 0
        self.retry: deque[int] = deque()
        self.attempts = np.zeros(self.num, dtype=np.int16)
        self.state = bytearray(self.num)  # 0 pending, 1 done, 2 failed (bytearray: cheap scalar access)
        self.results: list[Any] = [None] * self.num
        self.failures: dict[int, ShardFailure] = {}
        self.history: dict[int, list[str]] = {}
        self.completed = 0
        self.n_failed = 0
        self.retries_total = 0
        self.entropy = (np.random.SeedSequence(self.seed).entropy if self.seed is not None
                        else np.random.SeedSequence().entropy)
        self.captured: dict[int, tuple[Any, dict[str, Any]]] = {}
        self.fun_blob = b""
        self.borrow_desc: dict[str, dict[str, Any]] = {}
        self.out_desc: dict[str, dict[str, Any]] = {}
        self.segments: dict[str, Segment] = {}
        self.temporaries: list[Shared] = []
        self.inherit_tokens: list[int] = []  # borrowed arrays workers inherit at fork (shardc.inherit)
        self.allow_inherit = True  # False for a pool without page guards
        self.huge_inflight = 0
        self.huge_ids: set[int] = set()
        cs = self.chunk_size
        self.chunk = 1 if cs == "auto" else cs
        if cs == "auto" and self.autotune is None:
            self.autotune = {"mode": "online", "target_chunk_seconds": 0.005, "max_rounds": 64}
        self.diag = Diagnostics(mode=self.mode, num_shards=self.num, cow=self.cow, enabled=self.diagnostics,
                                chunk_size=self.chunk)
        self.ewma_shard_s: float | None = None
        self.on_requeue: Callable[[], None] | None = None  # shm_queue: feed the ring
        # One byte per shard, shared with the workers: 1 = finished and
        # returned None, 2 = finished with a value still to be gathered.  After
        # a death, shards marked 1 are complete (nothing to gather), so they
        # are not run again; shm_queue uses it as its source of truth.
        self.donemap = DoneMap(self.num)

    # -- inputs ----------------------------------------------------------------------
    def _seg_info(self, seg: Segment) -> None:
        self.segments[seg.key] = seg

    def capture(self, obj: Any) -> Any:
        """persistent_id hook: a Buffer/Shared captured by fun goes by
        reference; so does a big plain array workers can inherit at fork
        (returns None, i.e. pickle it, for one they cannot)."""
        key = id(obj)
        if key not in self.captured:
            if isinstance(obj, np.ndarray):
                if not self._inheritable(obj):
                    return None
                label = capture_label(self.target, obj)
                desc = self._inherit(label, obj, time.perf_counter())
                self.captured[key] = (obj, ("shared", {**desc, "label": label}))
            elif isinstance(obj, Buffer):
                if obj.closed:
                    raise InvalidArgumentError("fun captures a closed shardc buffer")
                d = _array_desc(obj.array, obj.segment)
                self._seg_info(obj.segment)
                self.captured[key] = (obj, ("buffer", d))
            else:
                d = obj.descriptor()
                d["label"] = "captured shared input"
                for s in obj.segments:
                    self._seg_info(s)
                self.captured[key] = (obj, ("shared", d))
        return self.captured[key][1]

    def _inheritable(self, obj: Any) -> bool:
        """A big array in private memory that workers can inherit at fork."""
        return (self.allow_inherit and type(obj) is np.ndarray
                and find_address(*array_extent(obj)) is None and inherit.eligible(obj))

    def _inherit(self, name: str, obj: np.ndarray, t0: float) -> dict[str, Any]:
        """Hold ``obj`` for workers forked from now on (execute() re-forks the
        older ones); returns the worker's descriptor."""
        token = inherit.hold(obj)
        self.inherit_tokens.append(token)
        self.diag.add_borrow(name, "inherited", obj.nbytes, 0, time.perf_counter() - t0, "array")
        return {"kind": "inherited", "token": token}

    def prepare_inputs(self, borrow: dict[str, Any], out: dict[str, Any]) -> None:
        self._seg_info(self.donemap.segment)
        for name, obj in out.items():
            arr = obj.array if isinstance(obj, Buffer) else obj
            hit = find_address(*array_extent(arr))
            assert hit is not None
            seg = hit[0]
            self._seg_info(seg)
            self.out_desc[name] = _array_desc(arr, seg)
            self.diag.add_out(name, arr.nbytes, seg)
        for name, obj in borrow.items():
            t0 = time.perf_counter()
            if isinstance(obj, Shared):
                sh, how = obj, "reference"
            elif isinstance(obj, Buffer):
                sh, how = share(obj), "reference"
            elif self._inheritable(obj):
                self.borrow_desc[name] = self._inherit(name, obj, t0)
                continue
            elif (type(obj) is np.ndarray or isinstance(obj, np.memmap)) and not obj.dtype.hasobject:
                # Plain arrays (and memmaps) are shared as raw bytes; subclasses
                # with state of their own (masked arrays, ...) go through pickle.
                sh, how, _ = default_cache.get(obj, "auto")
            else:
                sh = share(obj)
                how = sh.how
                self.temporaries.append(sh)
            for s in sh.segments:
                self._seg_info(s)
            self.borrow_desc[name] = sh.descriptor()
            copied = sh.nbytes if how in ("copied", "pickled") else 0
            self.diag.add_borrow(name, how, sh.nbytes, copied, time.perf_counter() - t0, sh.kind)

    def release(self) -> None:
        for token in self.inherit_tokens:
            inherit.release(token)
        if self.inherit_tokens and self.pool is not None:
            self.pool.released_inherited()  # also when the call failed before execute()
        self.donemap.close()
        for sh in self.temporaries:
            sh.close()
        self.temporaries.clear()

    # -- worker setup --------------------------------------------------------------------
    def call_message(self, w: Any) -> tuple[dict[str, Any], list[int]]:
        new = [k for k in self.segments if k not in w.known]
        infos = [{"key": k, "size": self.segments[k].size, "backing": self.segments[k].backing,
                  "name": self.segments[k].name} for k in new]
        fds = [self.segments[k].fd for k in new]
        msg = {"call_id": self.call_id, "cow": self.cow, "entropy": self.entropy,
               "donemap": _array_desc(self.donemap.array, self.donemap.segment),
               "seeded": self.seed is not None, "diagnostics": self.diagnostics, "desc": self.desc,
               "borrow": self.borrow_desc, "out": self.out_desc, "fun": self.fun_blob, "segments": infos,
               "heap_keep": heap_keep(self.profile, self.mem_cap)}
        return msg, fds

    def setup_worker(self, w: Any) -> Any:
        """Send the call to ``w`` and wait for it to be ready; returns the
        worker (a replacement if ``w`` turned out to be dead)."""
        for _attempt in range(3):
            try:
                reply = self._setup_once(w)
                break
            except CallSetupTimeoutError:
                self.pool.ensure_alive()
                raise
            except (ChannelClosed, ConnectionError, OSError) as exc:
                code = self.pool._reap(w, wait=2.0)
                label = signal_label(code) if code is not None else str(exc)
                self.diag.event("death", w, f"died before the call started ({label})", code=code)
                self.sel_unregister(w)
                w = self.pool.replace(w, f"worker died before the call started ({label})", "restart")
                self.ws[w.slot] = _WState()
                self.diag.worker_started(w)
                self.sel_register(w)
        else:
            raise RuntimeError(f"worker slot {w.slot} died three times while setting up the call")
        return self._check_ready(w, reply)

    def _check_ready(self, w: Any, reply: Any) -> Any:
        if reply[2] is not None:
            exc = raise_from_record(reply[2])
            raise InvalidArgumentError(f"worker {w.slot} could not set up the call: {reply[2]['message']}") from exc
        w.call_id = self.call_id
        return w

    def _send_call(self, w: Any) -> None:
        # Segments the worker holds that this process has closed since: let go.
        from .segment import _registry
        stale = [k for k in w.known if (seg := _registry.get(k)) is None or seg.closed]
        if stale:
            w.chan.send(("forget", stale))
            w.known.difference_update(stale)
        msg, fds = self.call_message(w)
        n = w.chan.send(("call", msg), fds)
        self.diag.bytes_setup += n
        w.known.update(k for k in self.segments)

    def setup_all(self) -> None:
        """Set up the call on every worker: all "call" messages first, then
        the replies, so workers unpickle and map inputs in parallel; a worker
        that fails here goes through setup_worker's restart path."""
        sent = []
        for w in list(self.pool.workers):
            try:
                self._send_call(w)
                sent.append(w)
            except OSError:
                self.setup_worker(w)
        for i, w in enumerate(sent):
            try:
                reply = self._await_ready(w)
            except CallSetupTimeoutError:
                # The others got the same call: kill those that have not
                # answered yet either, and leave the pool with fresh workers.
                for other in sent[i + 1:]:
                    if not other.chan.poll_nonblocking():
                        self.pool.kill(other)
                self.pool.ensure_alive()
                raise
            except (ChannelClosed, ConnectionError, OSError):
                self.setup_worker(w)
                continue
            self._check_ready(w, reply)

    def _setup_once(self, w: Any) -> Any:
        self._send_call(w)
        return self._await_ready(w)

    def _await_ready(self, w: Any) -> Any:
        """Wait (bounded: SHARDC_SETUP_TIMEOUT, default 120 s) for ``w`` to
        load fun and map the inputs.  A worker that does not answer in time is
        stuck in code shardc cannot interrupt (e.g. unpickling a borrowed
        object that blocks): it is killed and the call fails, not retried."""
        limit = float(os.environ.get("SHARDC_SETUP_TIMEOUT", "120"))
        w.chan.sock.settimeout(limit)
        try:
            while True:
                reply, _ = w.chan.recv()
                if reply[0] == "ready" and reply[1] == self.call_id:
                    return reply
        except socket.timeout:
            self.pool.kill(w)
            self.diag.event("death", w, f"killed: no answer to the call setup within {limit:g} s", code=w.exitcode)
            raise CallSetupTimeoutError(
                f"worker {w.slot} (pid {w.pid}) did not finish setting up the call within {limit:g} s "
                "(loading fun and mapping borrowed inputs); something fun or a borrowed object runs "
                "when unpickled is blocking. It was killed (SHARDC_SETUP_TIMEOUT sets the limit)") from None
        finally:
            try:
                w.chan.sock.settimeout(None)
            except OSError:
                pass

    def sel_register(self, w: Any) -> None:
        sel = getattr(self, "sel", None)
        if sel is not None:
            sel.register(w.chan.sock, selectors.EVENT_READ, w.slot)

    def sel_unregister(self, w: Any) -> None:
        sel = getattr(self, "sel", None)
        if sel is not None:
            try:
                sel.unregister(w.chan.sock)
            except (KeyError, ValueError, OSError):
                pass

    # -- scheduling ---------------------------------------------------------------------------
    def pending_count(self) -> int:
        return len(self.retry) + (self.num - self.next_fresh)

    def take_chunk(self, size: int) -> list[int]:
        ids: list[int] = []
        while self.retry and len(ids) < size:
            ids.append(self.retry.popleft())
        if len(ids) < size and self.next_fresh < self.num:
            k = min(size - len(ids), self.num - self.next_fresh)
            ids.extend(range(self.next_fresh, self.next_fresh + k))
            self.next_fresh += k
        return ids

    def is_huge(self, sid: int) -> bool:
        if self.kernel is None or not self.policy.get("max_huge_concurrency"):
            return False
        return self.kernel.classify(self.desc.shard(sid))[0] == "huge"

    def current_chunk_size(self, workers: int) -> int:
        size = self.chunk
        if self.autotune and self.ewma_shard_s is not None:
            target = float(self.autotune["target_chunk_seconds"])
            want = max(1, int(target / max(self.ewma_shard_s, 1e-7)))
            # Keep about 4 chunks per worker in what is left, for balance.
            cap = max(1, self.pending_count() // (4 * workers))
            want = min(want, cap, 1 << 16)
            if want != self.chunk:
                self.diag.autotune_step(self.chunk, want, self.ewma_shard_s)
                self.chunk = want
            size = self.chunk
        return size

    # -- results and failures --------------------------------------------------------------------
    def record_success(self, sid: int, value: Any) -> None:
        if self.state[sid] != 0:
            return  # a duplicate (a retried shard whose first run also reported)
        self.state[sid] = 1
        self.results[sid] = value
        self.completed += 1

    def record_failure(self, sid: int, err: dict[str, Any], charge: bool = True, worker: int | None = None) -> None:
        """An attempt of ``sid`` failed; retry it or fail it for good."""
        if self.state[sid] != 0:
            return
        if charge:
            self.attempts[sid] += 1
        hist = self.history.setdefault(sid, [])
        hist.append(f"attempt {int(self.attempts[sid])}: {err['type'].rsplit('.', 1)[-1]}: {err['message']}")
        if err.get("deterministic") or self.attempts[sid] > self.max_retries:
            exc = raise_from_record(err) if err.get("exc") is not None or err.get("traceback") else None
            fail = ShardFailure(sid, int(self.attempts[sid]), err["type"], err["message"],
                                err.get("traceback", ""), exc, hist)
            self.failures[sid] = fail
            self.results[sid] = FailedShard(fail)
            self.state[sid] = 2
            self.n_failed += 1
            self.diag.attempt_failed(sid, worker, int(self.attempts[sid]), err, final=True)
        else:
            self.retries_total += 1
            self.retry.append(sid)
            self.diag.attempt_failed(sid, worker, int(self.attempts[sid]), err, final=False)

    def crash_record(self, w: Any, sid: int, code: int | None, reason: str | None) -> dict[str, Any]:
        label = signal_label(code) if code is not None else "unknown status"
        if reason == "timeout":
            exc: BaseException = ShardTimeoutError(
                f"shard {sid} ran longer than timeout={self.timeout:g}s; worker {w.slot} (pid {w.pid}) was killed")
        elif reason == "no progress":
            exc = ShardTimeoutError(
                f"shard {sid} finished, but worker {w.slot} (pid {w.pid}) then made no progress for "
                f"timeout={self.timeout:g}s outside any shard while reporting it (does pickling its "
                "return value or its exception block?); the worker was killed")
        elif reason and reason.startswith("memory"):
            exc = WorkerMemoryError(f"shard {sid}: worker {w.slot} (pid {w.pid}) was killed: "
                                    f"{reason.split(':', 1)[1].strip()}")
        else:
            exc = WorkerCrashedError(f"worker {w.slot} (pid {w.pid}) died with {label} while running shard {sid}",
                                     exitcode=code, pid=w.pid)
        return {"type": f"shardc.errors.{type(exc).__name__}", "message": str(exc), "traceback": "",
                "exc": pickle.dumps(exc), "deterministic": False, "shard": sid}

    # -- the loop ---------------------------------------------------------------------------------
    def execute(self) -> None:
        pool = self.pool
        assert pool is not None
        for w in pool.ensure_alive():
            self.diag.event("death", w, f"worker died while idle ({signal_label(w.exitcode)})"
                            if w.exitcode is not None else "worker died while idle", code=w.exitcode)
        if self.inherit_tokens:
            t0 = time.perf_counter()
            names = [n for n, v in self.diag.borrow.items() if v["how"] == "inherited"]
            fresh = pool.refork(frozenset(self.inherit_tokens),
                                f"fork after borrowed input(s) {names} existed, to inherit them")
            self.diag.refork_seconds = time.perf_counter() - t0
            self.diag.reforked = len(fresh)
        self.ws = {w.slot: _WState() for w in pool.workers}
        self.diag.start(pool)
        self.bar = Progress(self.num, f"shard_map[{self.mode}]", self.progress)
        self.setup_all()
        try:
            if self.mode == "shm_queue":
                from .dispatch_queue import run_queue
                run_queue(self)
            else:
                self.run_rpc()
        finally:
            self.diag.finish(pool, segments=self.segments)
            self.bar.update(self.completed + self.n_failed, self.n_failed, self.retries_total)
            self.bar.close()
            for w in pool.workers:
                if w.alive:
                    try:
                        w.chan.send(("end",))
                    except OSError:
                        pass

    def depth(self) -> int:
        if "prefetch" in self.opts:
            return int(self.opts["prefetch"])
        # One chunk running and one waiting is enough for long shards; tiny
        # ones need more queued so a worker never waits for the master's next
        # message and replies cover many shards: hold ~2 ms of work (at most
        # 64 chunks), which costs nothing in balance at the end of the run.
        s = self.ewma_shard_s
        if s is None:
            return 2
        per_chunk = max(s * self.chunk, 1e-6) + 10e-6  # + worker overhead per chunk
        return max(2, min(64, int(0.002 / per_chunk)))

    def fill(self, w: Any) -> None:
        st = self.ws[w.slot]
        if st.pending_recycle is not None or not w.alive:
            return
        size = self.current_chunk_size(len(self.ws))
        cap = self.policy.get("max_huge_concurrency")
        batch: list[Any] = []
        try:
            self._fill_into(w, st, size, cap, batch)
        finally:
            if batch:
                try:
                    n = w.chan.send_many(batch)
                    self.diag.dispatched(n, len(batch))
                except OSError:
                    pass  # the worker died: its EOF is seen by the loop, which requeues

    def _fill_into(self, w: Any, st: _WState, size: int, cap: Any, batch: list[Any]) -> None:
        if not st.inflight:
            st.last_msg = time.monotonic()  # its no-progress clock starts with this dispatch
        while len(st.inflight) < size * self.depth() and self.pending_count():
            ids = self.take_chunk(size)
            if cap:
                huge = [s for s in ids if self.is_huge(s)]
                if huge and self.huge_inflight + 1 > cap:
                    # Put them back (front) and wait for a huge chunk to finish.
                    for s in reversed(ids):
                        self.retry.appendleft(s)
                    self.diag.throttle(w.slot, len(huge))
                    return
                if huge:
                    self.huge_inflight += 1
                    self.huge_ids.update(huge)
            for s in ids:
                st.inflight[s] = None
            batch.append(("run", self.call_id, ids))

    def finished(self) -> bool:
        return self.completed + self.n_failed >= self.num

    def on_results(self, w: Any, results: list[tuple]) -> None:
        st = self.ws[w.slot]
        diag = self.diag
        inflight = st.inflight
        huge = self.huge_ids
        if any(r[1] == OK_PICKLED for r in results):
            results = [(r[0], OK, pickle.loads(r[2]), *r[3:]) if r[1] == OK_PICKLED else r for r in results]
        if self.diagnostics:  # before the outcomes: attempts are those of the finished run
            diag.batch_done(w.slot, results, self.attempts)
        for sid, ok, value, _t0, _t1, events, _dmem in results:
            inflight.pop(sid, None)
            if huge and sid in huge:
                huge.discard(sid)
                self.huge_inflight = max(0, self.huge_inflight - 1)
            if events:
                diag.cow_events(sid, events)
                if any(e.get("lost") for e in events):
                    st.retiring = True  # it exits (RETIRE_EXIT) after this report
            if ok == OK:
                self.record_success(sid, value)
            else:
                self.record_failure(sid, value, worker=w.slot)
        dt = sum(r[4] - r[3] for r in results) * 1e-9 / len(results)
        self.ewma_shard_s = dt if self.ewma_shard_s is None else 0.8 * self.ewma_shard_s + 0.2 * dt
        st.since_sample += len(results)
        st.last_msg = time.monotonic()

    def check_memory(self, w: Any, force: bool = False) -> None:
        """Sample ``w`` at a shard boundary: statm every time (~8 us), a
        precise sample every ``health_check_interval`` shards or whenever
        anonymous memory moved; decide on recycling from the precise one."""
        pool = self.pool
        st = self.ws[w.slot]
        if force:
            m = pool.sample(w)
        else:
            # statm every time; smaps_rollup (up to ~9 ms with a 1 GiB input
            # mapped: it walks the page tables) only when anonymous memory
            # moved by 8 MiB, or every health_check_interval shards if the last
            # precise sample is over 0.5 s old.
            due = st.since_sample >= self.health_check_interval
            if due:
                st.since_sample = 0
            m = pool.sample_cheap(w, max_age=0.5 if due else float("inf"))
        if m is None:
            return
        self.diag.mem_sample(w, m, anon=pool.footprint(m, w))
        verdict = pool.memory_verdict(w, self.mem_cap, self.drift, self.profile)
        if verdict is not None and st.pending_recycle is None:
            kind, reason = verdict
            # The cap is enforced at the next safe point, always; drift
            # recycling keeps a minimum interval so it cannot thrash.
            if kind == "drift" and time.monotonic() - w.last_recycle < pool.min_recycle_interval:
                if not st.deferred:
                    self.diag.event("defer_recycle", w, reason + " (min recycle interval)")
                    st.deferred = True
                return
            st.pending_recycle = reason

    def maybe_recycle(self, w: Any) -> Any:
        st = self.ws[w.slot]
        if st.pending_recycle is None or st.inflight:
            return w
        reason = st.pending_recycle
        log.info("recycling worker %d (pid %d): %s", w.slot, w.pid, reason)
        self.diag.event("recycle", w, reason)
        return self.replace(w, reason, "recycle")

    def replace(self, w: Any, reason: str, kind: str) -> Any:
        self.sel_unregister(w)
        nw = self.pool.replace(w, reason, kind)
        self.ws[w.slot] = _WState()
        self.diag.worker_started(nw)
        self.sel_register(nw)
        if not self.finished():
            nw = self.setup_worker(nw)
        return nw

    def on_death(self, w: Any, reason: str | None = None, code: int | None = None, running: Any = False) -> Any:
        """``w`` died (or was killed for ``reason``): requeue, charge, restart.
        ``running``: the shard to charge, if the caller knows (else read from the status row)."""
        pool = self.pool
        row = pool.status.read(w.slot)
        if running is False:
            running = pool.status.running(w.slot, self.call_id)
        if code is None:
            code = pool._reap(w, wait=2.0)
        st = self.ws[w.slot]
        lost = list(st.inflight)
        label = signal_label(code) if code is not None else "?"
        if running is not None and running in st.inflight:
            log.warning("worker %d (pid %d) %s while running shard %d; %d other shard(s) requeued",
                        w.slot, w.pid, "was killed: " + reason if reason else f"died with {label}",
                        running, len(lost) - 1)
        retired = code == RETIRE_EXIT and reason is None and st.retiring
        if retired:
            reason = ("retired itself: a shard wrote more of a borrowed input inherited at fork "
                      "than the page guards can restore")
            self.diag.event("recycle", w, reason)
        else:
            self.diag.event("death", w, reason or f"died with {label}", code=code, shard=running)
        for sid in reversed(lost):
            if sid in self.huge_ids:
                self.huge_ids.discard(sid)
                self.huge_inflight = max(0, self.huge_inflight - 1)
            if sid == running or self.state[sid] != 0:
                continue
            if self.donemap.get(sid) == 1:
                # It finished (and returned None) before the worker died with
                # its report: complete, not run again.
                self.record_success(sid, None)
            else:
                self.retry.appendleft(sid)
        if running is not None and running in st.inflight:
            self.record_failure(running, self.crash_record(w, running, code, reason), worker=w.slot)
        if reason == "no progress":
            # Stuck outside any shard: charge the shard whose value it was
            # pickling (ST_SENDING), or, if it was stuck elsewhere, every
            # finished shard whose value was in transit, so that a result that
            # cannot be sent fails after its retries instead of looping.
            sending = row.sending - 1
            suspects = [sending] if sending in st.inflight else [
                sid for sid in lost if self.donemap.get(sid) == 2]
            for sid in suspects:
                if self.state[sid] == 0:
                    try:
                        self.retry.remove(sid)
                    except ValueError:
                        pass
                    self.record_failure(sid, self.crash_record(w, sid, code, reason), worker=w.slot)
        st.inflight.clear()
        if self.on_requeue is not None:
            self.on_requeue()  # let survivors start on the requeued shards now
        return self.replace(w, reason or f"worker died with {label}", "recycle" if retired else "restart")

    def watchdog(self, on_death: Callable[..., Any] | None = None) -> None:
        """Timeouts and memory of running shards (both dispatch modes).

        Reads the status table for which shard runs since when; takes a cheap
        statm sample of every running worker (so a shard that allocates and
        frees within itself still shows in peak memory), and a precise one
        before killing a worker for holding over 2x ``mem_cap``.
        """
        pool = self.pool
        died = on_death or self.on_death
        now = time.monotonic_ns()
        for w in list(pool.workers):
            if not w.alive:
                continue
            row = pool.status.read(w.slot)
            if row.state != STATE_RUNNING:
                # Holding shards, running none, silent for `timeout` seconds:
                # stuck in shardc's own code (e.g. pickling a result that
                # blocks).  shm_queue workers hold no shards outside a block.
                st = self.ws.get(w.slot)
                if (self.mode == "rpc_chunked" and st is not None and st.inflight
                        and time.monotonic() - st.last_msg > self.timeout):
                    pool.kill(w)
                    died(w, reason="no progress", code=w.exitcode)
                continue
            if (now - row.start_ns) * 1e-9 > self.timeout:
                pool.kill(w)
                died(w, reason="timeout", code=w.exitcode)
                continue
            fast = ll.proc_mem_fast(w.pid)
            if fast is None:
                continue
            fast = pool.calibrated(w, fast)
            if self.diagnostics:
                self.diag.mem_sample(w, fast, anon=pool.footprint(fast, w))
            if self.mem_cap is not None and fast["anon"] > 2 * self.mem_cap:
                m = pool.sample(w)  # confirm with the precise number before killing
                if m is not None and pool.footprint(m, w) > 2 * self.mem_cap:
                    self.diag.mem_sample(w, m, anon=pool.footprint(m, w))
                    why = (f"memory: {fmt_bytes(pool.footprint(m, w))} > 2x mem_cap "
                           f"{fmt_bytes(self.mem_cap)} inside a shard")
                    pool.kill(w)
                    died(w, reason=why, code=w.exitcode)

    def run_rpc(self) -> None:
        pool = self.pool
        self.sel = sel = selectors.DefaultSelector()
        for w in pool.workers:
            sel.register(w.chan.sock, selectors.EVENT_READ, w.slot)
        try:
            for w in pool.workers:
                self.fill(w)
            tick = 0.05 if self.timeout > 0.2 else self.timeout / 4
            next_tick = time.monotonic() + tick
            while not self.finished():
                events = sel.select(timeout=max(0.0, next_tick - time.monotonic()))
                for key, _ in events:
                    w = pool.workers[key.data]
                    if key.fileobj is not w.chan.sock:
                        continue  # a replaced worker's stale event
                    before = w.chan.bytes_received
                    try:
                        msgs = w.chan.recv_ready()
                    except (ChannelClosed, ConnectionError):
                        nw = self.on_death(w)
                        # Hand the requeued shards out now (idle survivors
                        # first), not at the next tick.
                        for other in pool.workers:
                            if other is not nw:
                                self.fill(other)
                        self.fill(nw)
                        continue
                    self.diag.bytes_results += w.chan.bytes_received - before
                    for msg, _fds in msgs:
                        if msg[0] == "results" and msg[1] == self.call_id:
                            self.on_results(w, msg[2])
                    if w.alive:
                        self.check_memory(w)
                    w = self.maybe_recycle(w)
                    self.fill(w)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + tick
                    self.watchdog()
                    self.diag.tick()
                    self.bar.update(self.completed + self.n_failed, self.n_failed, self.retries_total)
                    for w in list(pool.workers):
                        if not w.alive:
                            self.on_death(w)
                        w = self.maybe_recycle(pool.workers[w.slot])
                        self.fill(w)
            # Results of chunks that were requeued after a death and also
            # finished elsewhere are dropped by record_success.
        finally:
            sel.close()
            self.sel = None

    # -- the result --------------------------------------------------------------------------------
    def result(self) -> ShardResult:
        pool_stats = {"workers": self.pool.size if self.pool else 0,
                      "status": [w.info() for w in self.pool.workers] if self.pool else [],
                      "events": list(self.pool.events) if self.pool else []}
        self.diag.completed = self.completed
        self.diag.failed = self.n_failed
        return ShardResult(self.results, dict(sorted(self.failures.items())), self.diag, pool_stats, self.desc)


def _array_desc(arr: np.ndarray, seg: Segment) -> dict[str, Any]:
    base = seg.mapping().addr
    return {"kind": "array", "segs": [seg.key], "dtype": arr.dtype, "shape": arr.shape,
            "strides": arr.strides, "offset": arr.ctypes.data - base}
