"""``shard_map(..., cluster=...)``: the caller's side of a cluster run.

::

    shard_map(shards, fun, ..., cluster=client)       (validated in map.py)
      │ run_on_cluster: the client's session (.session: agents and inputs kept
      │   across calls, one call at a time), the job (fun by value, the descriptor,
      │   the local options, version + build stamp), inputs as contiguous arrays,
      │   each with its content key -> Backend.put: the keys the session does not
      │   hold are sent once to every node (Dask scatter broadcast / Ray object store)
      ▼
    driver loop (this module)                         one per call
      │ MacroPlanner: macro-shards lo..hi-1, sized to take ~macro_seconds
      │   (first ones small, to learn the shard time, unless the session ran the
      │   same job before: .shard_seconds), handed out dynamically:
      │   at most inflight_per_node per node outstanding, the engine picks the node
      │ Backend.submit -> node.run_macro (in the engine's worker) -> the node's agent
      │ each reply: values into results (shard order), failures (global ids),
      │   out runs merged (OutMerger: conflicts fail loudly), timings
      │ a task that failed (agent died, worker lost): rerun, up to max_attempts;
      │   the engine itself reruns tasks of a lost worker elsewhere
      │ the scheduler unreachable for scheduler_timeout s: ClusterError
      ▼
    ShardResult (diagnostics.cluster: nodes -> workers, memory, bytes, macro-shards)

A backend (:mod:`.dask`, :mod:`.ray`) is a session and only moves things:
put the job and new inputs on every node, submit a macro-shard, wait for
any, fetch one, say whether the scheduler is reachable, list nodes, end a
call, stop the agents.  Nothing
here imports Dask or Ray; :func:`backend_for` imports the one asked for.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import deque
from typing import Any, Protocol

import numpy as np

from .. import _lowlevel as ll
from .._version import __version__
from ..buffer import Buffer
from ..diagnostics import Diagnostics
from ..errors import ClusterError, InvalidArgumentError, ShardMapError, UnpicklableFunctionError
from ..kernels import get_kernel
from ..result import FailedShard, ShardFailure, ShardResult
from ..share import Shared, default_cache
from .keys import SEALED_MIN_BYTES, InputCache, content_key, is_sealed
from .node import AgentRefusedError
from .options import Cluster
from .outs import OutMerger
from .reply import unpack as unpack_reply
from .session import session_for

log = logging.getLogger("shardc")


class Backend(Protocol):
    """What a cluster engine does for a session's calls (see the module docstring)."""

    name: str
    opts: Cluster
    call_lock: Any  # one call at a time per session
    cache: InputCache  # the content keys the session holds on the nodes
    shard_seconds: dict[str, float]  # job signature -> seconds per shard its last call measured

    def usable(self, engine: Any) -> bool: ...
    def nodes(self) -> dict[str, dict[str, Any]]: ...
    def put(self, job_id: str, job: dict[str, Any], inputs: list[np.ndarray], drop: list[str]) -> int: ...
    def submit(self, mid: int, lo: int, hi: int, attempt: int) -> Any: ...
    def wait(self, handles: list[Any], timeout: float) -> list[Any]: ...
    def fetch(self, handle: Any) -> dict[str, Any]: ...
    def alive(self) -> bool: ...
    def starts(self) -> list[dict[str, Any]]: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


class MacroPlanner:
    """Cuts ``0..n-1`` into macro-shards of about ``target`` seconds, in order."""

    def __init__(self, n: int, nodes: int, target: float, workers: int = 1, per_shard: float | None = None) -> None:
        self.n = n
        self.nodes = max(1, nodes)
        self.target = target
        self.workers = max(1, workers)  # a macro-shard has at least this many shards (when left): the node's pool
        self.next_lo = 0
        # Seconds per shard, running mean; ``per_shard``: what an earlier call of the
        # same job measured (the session remembers it), so the first macro-shards are
        # sized at once instead of being small probes that leave the node waiting.
        self.per_shard: float | None = per_shard
        self.first = max(self.workers, min(n // (self.nodes * 64), 4096))

    def has_next(self) -> bool:
        return self.next_lo < self.n

    def take(self) -> tuple[int, int]:
        left = self.n - self.next_lo
        if self.per_shard is None:
            size = self.first
        else:
            want = self.target / max(self.per_shard, 1e-9)
            floor = 0.1 * self.target / max(self.per_shard, 1e-9)  # tail pieces still amortise the round trip
            # Two pieces per node of what is left, so the nodes' last macro-shards end
            # together; one node has nothing to balance: it takes up to ``want`` at once
            # (each macro-shard is a local call, with its set-up and out-buffer compare).
            parts = 2 * self.nodes if self.nodes > 1 else 1
            size = round(max(min(want, left / parts), floor, self.workers))
        if left - size < self.workers:
            size = left  # no remainder too small to keep the node's pool busy
        lo = self.next_lo
        self.next_lo = min(self.n, lo + size)
        return lo, self.next_lo

    def observe(self, count: int, seconds: float) -> None:
        per = seconds / max(1, count)
        self.per_shard = per if self.per_shard is None else 0.5 * self.per_shard + 0.5 * per


def job_signature(job: dict[str, Any]) -> str:
    """What makes two calls the same job for the planner: the function (or kernel) by
    value, the descriptor's shape and the local options (a hint only: results never
    depend on it)."""
    h = hashlib.sha1(job["fun"] or job["kernel"] or b"")
    d = job["desc"]
    h.update(
        repr((job["kernel_name"], d.n, d.block_size, d.strategy, d.num_shards, sorted(job["local"].items()))).encode()
    )
    return h.hexdigest()


def _input_array(name: str, obj: Any) -> tuple[dict[str, Any], np.ndarray, Any]:
    """The spec and contiguous bytes of one borrowed input, and the sealed copy
    holding them (None if the bytes can still change: their key is hashed per call)."""
    sealed = None
    if isinstance(obj, Buffer):
        obj = obj.array
    elif isinstance(obj, Shared):
        sealed = obj if obj.kind == "array" and is_sealed(obj) else None
        obj = obj.array if obj.kind == "array" else obj.get()
    elif type(obj) is np.ndarray and not obj.dtype.hasobject and obj.nbytes >= SEALED_MIN_BYTES:
        # As a local call does: the share cache's sealed copy of the array, reused
        # while the array lives and memcmp shows the same bytes; its key is hashed once.
        shared, how, _ = default_cache.get(obj, "auto")
        if how != "reference" and is_sealed(shared):
            sealed, obj = shared, shared.array
    if (type(obj) is np.ndarray or isinstance(obj, np.memmap)) and not obj.dtype.hasobject:
        order = "F" if obj.flags.f_contiguous and not obj.flags.c_contiguous else "C"
        data = np.asarray(obj).ravel(order="K" if obj.flags.forc else "C")
        if not obj.flags.forc:
            order = "C"
        spec = {"name": name, "kind": "array", "dtype": obj.dtype, "shape": obj.shape, "order": order}
        spec["nbytes"] = int(data.nbytes)
        return spec, data.view(np.uint8) if data.size else np.zeros(0, np.uint8), sealed
    try:
        import cloudpickle

        blob = cloudpickle.dumps(obj, protocol=5)
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgumentError(f"borrow[{name!r}] cannot be pickled to send it to the nodes: {exc}") from exc
    return {"name": name, "kind": "object", "nbytes": len(blob)}, np.frombuffer(blob, dtype=np.uint8), None


def build_job(
    desc: Any,
    fun: Any,
    kernel: str | None,
    borrow: dict[str, Any],
    out: dict[str, np.ndarray],
    local: dict[str, Any],
    opts: Cluster,
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The job every agent gets, and the input arrays (sent once per node)."""
    import cloudpickle

    try:
        fun_blob = cloudpickle.dumps(fun, protocol=5) if fun is not None else None
        kern_blob = cloudpickle.dumps(get_kernel(kernel), protocol=5) if kernel is not None else None
    except Exception as exc:  # noqa: BLE001
        raise UnpicklableFunctionError(
            f"fun {getattr(fun, '__qualname__', fun)!r} cannot be pickled by value to send it to the nodes: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    specs, inputs, bspecs, ospecs = [], [], [], []
    for name, obj in borrow.items():
        spec, data, sealed = _input_array(name, obj)
        spec["key"] = content_key(data, sealed)
        bspecs.append(spec)
        specs.append(spec)
        inputs.append(data)
    for name, arr in out.items():
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        init = bool(raw.any())  # an all-zero buffer is not sent: a fresh node buffer reads as zeros
        spec = {"name": name, "dtype": arr.dtype, "shape": arr.shape, "nbytes": int(arr.nbytes), "init": init}
        ospecs.append(spec)
        if init:
            spec["key"] = content_key(raw)
            specs.append(spec)
            inputs.append(raw)
    job = {
        "version": __version__,
        "stamp": ll.build_stamp(),
        "desc": desc,
        "fun": fun_blob,
        "kernel": kern_blob,
        "kernel_name": kernel,
        "local": local,
        "borrow": bspecs,
        "out": ospecs,
        "inputs": specs,  # each with its content "key": the agents cache inputs by it
        "keep": [],  # every key the session holds (set by run_on_cluster): the agents drop the others
        "agent_idle_timeout": opts.agent_idle_timeout,
    }
    return job, inputs


def run_on_cluster(
    cluster: Any,
    desc: Any,
    fun: Any,
    kernel: str | None,
    borrow: dict[str, Any],
    out: dict[str, Any],
    local: dict[str, Any],
    on_failure: str,
) -> ShardResult:
    """Run a validated ``shard_map`` call on ``cluster`` (see the module docstring)."""
    t_start = time.perf_counter()
    backend, opts = session_for(cluster)
    outs = {n: (b.array if isinstance(b, Buffer) else b) for n, b in out.items()}
    job, inputs = build_job(desc, fun, kernel, borrow, outs, local, opts)
    with backend.call_lock:
        run = _call(backend, opts, job, inputs, desc, outs)
    run.merger.finish()
    diag = Diagnostics(
        mode=local["dispatch_mode"], num_shards=desc.num_shards, cow=local["cow"], enabled=False, chunk_size=1
    )
    diag.t_start_ns = run.t_start_ns
    diag.t_end_ns = time.monotonic_ns()
    diag.wall_seconds = time.perf_counter() - t_start
    diag.completed = desc.num_shards - len(run.failures)
    diag.failed = len(run.failures)
    diag.retries = sum(r["retries"] for r in run.macros)
    diag.cluster = run.summary(run.nodes_at_start, backend)
    stats = {"workers": sum(n["workers"] for n in diag.cluster["nodes"].values()), "status": [], "events": []}
    result = ShardResult(run.results, dict(sorted(run.failures.items())), diag, stats, desc)
    if result.failures and on_failure == "raise":
        first = min(result.failures)
        f = result.failures[first]
        raise ShardMapError(
            f"{len(result.failures)} of {desc.num_shards} shards failed on the cluster; first: shard {first} "
            f"after {f.attempts} attempt(s): {f.error_type.rsplit('.', 1)[-1]}: {f.message} (the full result "
            "is in err.result; pass on_failure='collect' to get it returned)",
            result,
        ) from f.exception
    return result


def _call(backend: Any, opts: Cluster, job: dict[str, Any], inputs: list[np.ndarray], desc: Any, outs: Any) -> _Run:
    """One call on the session ``backend`` (its call lock held)."""
    backend.opts = opts
    # Workers of a cluster may be restarting (a nanny replacing a dead one):
    # wait for one, up to the scheduler timeout (at most 30 s), before failing.
    nodes = backend.nodes()
    deadline = time.monotonic() + min(30.0, opts.scheduler_timeout)
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = backend.nodes()
    if not nodes:
        raise ClusterError(
            f"the {backend.name} cluster has no workers (waited {min(30.0, opts.scheduler_timeout):g} s): "
            "start some, or run without cluster="
        )
    job_id = uuid.uuid4().hex[:12]
    keys = {s["key"]: int(a.nbytes) for s, a in zip(job["inputs"], inputs, strict=True)}
    new, drop = backend.cache.use(keys, opts.input_cache_bytes)
    job["keep"] = list(backend.cache.sizes)
    hints = backend.shard_seconds  # per job signature: the seconds per shard its last call measured
    sig = job_signature(job)
    run = _Run(backend, opts, desc.num_shards, len(nodes), outs, job["local"].get("workers"), hints.get(sig))
    run.nodes_at_start = nodes
    run.t_start_ns = time.monotonic_ns()
    run.cached_keys = len(keys) - len(new)
    try:
        run.bytes_inputs_per_node = backend.put(job_id, job, inputs, drop)
        run.loop()
    finally:
        backend.finish()
    if run.planner.per_shard is not None:
        hints.pop(sig, None)
        hints[sig] = run.planner.per_shard
        while len(hints) > 64:  # the oldest first
            hints.pop(next(iter(hints)))
    return run


class _Run:
    """The driver loop of one call and what it gathered."""

    def __init__(
        self,
        backend: Backend,
        opts: Cluster,
        n: int,
        n_nodes: int,
        outs: dict[str, np.ndarray],
        local_workers: Any = None,
        per_shard: float | None = None,
    ) -> None:
        self.backend = backend
        self.opts = opts
        self.n = n
        w = local_workers if isinstance(local_workers, int) else 1
        self.planner = MacroPlanner(n, n_nodes, opts.macro_seconds, w, per_shard)
        self.n_nodes = n_nodes
        self.results: list[Any] = [None] * n
        self.failures: dict[int, ShardFailure] = {}
        self.merger = OutMerger(outs)
        self.macros: list[dict[str, Any]] = []
        self.lost: list[dict[str, Any]] = []  # failed tries of macro-shards (rerun)
        self.bytes_inputs_per_node = 0
        self.cached_keys = 0  # inputs the nodes already held (not sent)
        self.nodes_at_start: dict[str, dict[str, Any]] = {}
        self.t_start_ns = 0
        self.bytes_replies = 0
        self.per_node: dict[str, dict[str, Any]] = {}
        self.t_start_wall = time.time()  # the picture's origin (start events and completions are wall clock)

    def loop(self) -> None:
        inflight: dict[Any, tuple[int, int, int, int]] = {}
        retry: deque[tuple[int, int, int, int]] = deque()
        mid = 0
        seen = counted = time.monotonic()
        while self.planner.has_next() or retry or inflight:
            limit = self.opts.inflight_per_node * max(1, self.n_nodes)
            while len(inflight) < limit and (retry or self.planner.has_next()):
                if retry:
                    m, lo, hi, attempt = retry.popleft()
                else:
                    (lo, hi), m, attempt = self.planner.take(), mid, 1
                    mid += 1
                inflight[self.backend.submit(m, lo, hi, attempt)] = (m, lo, hi, attempt)
            done = self.backend.wait(list(inflight), timeout=0.5)
            now = time.monotonic()
            if not self.backend.alive():
                if now - seen > self.opts.scheduler_timeout:
                    raise ClusterError(
                        f"the {self.backend.name} scheduler has been unreachable for {now - seen:.0f} s "
                        f"(scheduler_timeout={self.opts.scheduler_timeout:g} s) with {len(inflight)} "
                        "macro-shard(s) outstanding; the call is abandoned (its node agents exit when their "
                        "worker does, or after agent_idle_timeout)"
                    )
                time.sleep(0.1)
                continue  # nothing is fetched or sent while it is away
            seen = now
            for h in done:
                m, lo, hi, attempt = inflight.pop(h)
                try:
                    rep = self.backend.fetch(h)
                except AgentRefusedError:
                    raise  # a node with another shardc build: rerunning elsewhere would hide it
                except Exception as exc:  # noqa: BLE001 - the engine's own failure (lost worker, ...)
                    self._lost(m, lo, hi, attempt, exc, retry)
                    continue
                self._merge(m, lo, hi, attempt, rep)
            if now - counted > 2.0:  # the node count sets how many macro-shards are outstanding
                self.n_nodes = max(1, len(self.backend.nodes()) or self.n_nodes)
                counted = now

    def _lost(self, m: int, lo: int, hi: int, attempt: int, exc: BaseException, retry: deque[Any]) -> None:
        why = f"{type(exc).__name__}: {exc}"
        self.lost.append({"macro": m, "lo": lo, "hi": hi, "attempt": attempt, "error": why})
        if attempt < self.opts.max_attempts:
            log.warning("shardc cluster: macro-shard %d (shards %d..%d) is rerun: %s", m, lo, hi - 1, why)
            retry.append((m, lo, hi, attempt + 1))
            return
        for sid in range(lo, hi):
            msg = f"its macro-shard failed {attempt} times: {why}"
            f = ShardFailure(sid, attempt, "shardc.errors.ClusterError", msg)
            f.history = [e["error"] for e in self.lost if e["macro"] == m]
            self.failures[sid] = f
            self.results[sid] = FailedShard(f)

    def _merge(self, m: int, lo: int, hi: int, attempt: int, rep: dict[str, Any]) -> None:
        payload = rep["payload"]
        nbytes = memoryview(payload).nbytes
        self.bytes_replies += nbytes
        body = unpack_reply(payload)
        who = f"macro-shard {m} (shards {lo}..{hi - 1}) on node {rep['node']}"
        for name, runs in body["runs"].items():
            self.merger.apply(name, runs, who)
        values = body["values"]  # None: every value None (the results start so; a macro-shard merges once)
        for k in body["pickled"]:  # as its workers pickled them: loaded once, here
            try:
                values[k] = values[k].load()
            except Exception as exc:  # noqa: BLE001 - that shard's failure, named
                f = ShardFailure(
                    lo + k,
                    1,
                    f"{type(exc).__module__}.{type(exc).__qualname__}",
                    f"the return value of shard {lo + k} cannot be unpickled in the caller: {exc}; return "
                    "plain data, or make its type importable here",
                    exception=exc,
                )
                body["failures"][lo + k] = f
                values[k] = None
        if values is not None:
            self.results[lo:hi] = values
        for sid, f in body["failures"].items():
            self.failures[sid] = f
            self.results[sid] = FailedShard(f)
        self.planner.observe(hi - lo, body["seconds"])
        node = self.per_node.setdefault(
            rep["node"],
            {
                "macros": 0,
                "shards": 0,
                "busy_seconds": 0.0,
                "agents": set(),
                "worker_pids": set(),
                "workers": 0,
                "bytes_inputs": 0,
                "bytes_replies": 0,
                "engine_peak_rss": 0,
                "agent_peak_rss": 0,
                "workers_peak_uss": 0,
                "events": [],
            },
        )
        node["macros"] += 1
        node["shards"] += hi - lo
        node["busy_seconds"] += body["seconds"]
        node["agents"].add(rep["agent_pid"])
        node["worker_pids"].update(body["worker_pids"])
        node["workers"] = max(node["workers"], body["workers"] or 0)
        node["bytes_inputs"] += rep["input_bytes"]
        node["bytes_replies"] += nbytes
        node["engine_peak_rss"] = max(node["engine_peak_rss"], rep["engine_rss"])
        node["agent_peak_rss"] = max(node["agent_peak_rss"], body["agent_peak_rss"])
        node["workers_peak_uss"] = max(node["workers_peak_uss"], body["worker_peak_uss"])
        node["events"] += body["events"]
        self.macros.append(
            {
                "macro": m,
                "lo": lo,
                "hi": hi,
                "node": rep["node"],
                "attempt": attempt,
                "seconds": body["seconds"],
                "retries": body["retries"],
                "bytes_reply": nbytes,
                "t_done": time.time(),  # wall clock, comparable with the engine's start events
                "lanes": body.get("lanes", []),  # per worker of the node: diagnostics.lanes.worker_spans
            }
        )

    def summary(self, nodes_at_start: dict[str, dict[str, Any]], backend: Backend) -> dict[str, Any]:
        nodes = {}
        for name, rec in self.per_node.items():
            nodes[name] = {**rec, "agents": sorted(rec["agents"]), "worker_pids": sorted(rec["worker_pids"])}
        return {
            "backend": backend.name,
            "t_start_wall": self.t_start_wall,
            "nodes_at_start": sorted(nodes_at_start),
            "nodes": nodes,
            "macros": sorted(self.macros, key=lambda r: r["lo"]),
            "lost": self.lost,
            "starts": backend.starts(),
            "bytes_inputs_per_node": self.bytes_inputs_per_node,
            "inputs_cached": self.cached_keys,
            "bytes_replies": self.bytes_replies,
            "bytes_out_merged": self.merger.bytes_merged,
        }
