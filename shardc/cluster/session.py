"""Agents and inputs kept across calls: one session per client / Ray runtime.

The first ``shard_map(..., cluster=engine)`` of a process on ``engine`` opens
a *session*: a backend (:mod:`.dask`, :mod:`.ray`) whose node agents and
whose inputs on the nodes outlive the call.  Later calls on the same engine
reuse it, one call at a time (a second thread's call waits for the first):

* **Agents** stay up between calls, each with its local pool, so a second
  call pays neither the agent start nor the pool fork.  They stop when the
  session closes (:func:`close`, the engine's client closing -- noticed at the
  next call --, the Python process exiting), when their engine worker dies,
  or after ``agent_idle_timeout`` seconds without work.
* **Inputs** are cached by *content*: each input's key is the SHA-256 of its
  bytes (hashed in parallel chunks, ~1 GiB/s per core here) and its size.
  An array given as a sealed ``shardc.share(X)`` copy is hashed once; a plain
  array of >= 1 MiB goes, as in a local call, through the share cache's sealed
  copy (made once while the array lives, checked with one ``memcmp`` per
  call, ~10x faster than hashing), so its key too is hashed once per change.  An
  input whose key the session holds is not sent again (0 bytes moved); an
  input that changed in any byte has another key and is sent anew, so a
  changed array is never served stale.  The session keeps the inputs of the
  current call, plus earlier ones up to ``input_cache_bytes`` (least recently
  used dropped first); each call tells the agents which keys are still held,
  and they drop the rest.

* **Shard times**: the seconds per shard each job's last call measured, by
  :func:`.base.job_signature` (fun by value, descriptor, local options; the
  last 64 jobs), so a repeated call's first macro-shards are sized at once
  instead of being small probes.  A hint only: results never depend on it.

The keys and the cache policy are in :mod:`.keys`.  Nothing here imports
Dask or Ray; :func:`session_for` imports the one asked for.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any

from ..errors import InvalidArgumentError, MissingDependencyError
from .options import Cluster

log = logging.getLogger("shardc")

_sessions: dict[Any, Any] = {}  # engine identity -> its backend (the session)
_lock = threading.Lock()


def _identity(engine: Any) -> tuple[str, Any]:
    if type(engine).__module__.split(".")[0] == "distributed" and type(engine).__name__ == "Client":
        return "dask", id(engine)
    if isinstance(engine, str) and engine == "ray":
        try:
            import ray
        except ImportError:
            raise MissingDependencyError("cluster='ray' needs Ray: pip install 'shardc[ray]'") from None
        if not ray.is_initialized():
            raise InvalidArgumentError("cluster='ray' runs on the connected Ray runtime: call ray.init(...) first")
        ctx = ray.get_runtime_context()
        return "ray", (ctx.get_job_id(), ctx.gcs_address)
    raise InvalidArgumentError(
        f"cluster= must be a dask.distributed.Client, 'ray', or shardc.cluster.Cluster(...), got {engine!r}"
    )


def session_for(cluster: Any) -> tuple[Any, Cluster]:
    """The session (backend) for ``cluster=`` (a Client, "ray" or a Cluster), opened if needed."""
    opts = cluster if isinstance(cluster, Cluster) else Cluster(cluster)
    kind, ident = _identity(opts.engine)
    with _lock:
        gone = [k for k, s in _sessions.items() if k != (kind, ident) and not s.usable(None)]
        stale = [_sessions.pop(k) for k in gone]  # a closed client, a Ray runtime shut down
        b = _sessions.get((kind, ident))
        if b is not None and not b.usable(opts.engine):
            stale.append(_sessions.pop((kind, ident)))
            b = None
        if b is None:
            if kind == "dask":
                from .dask import DaskBackend

                b = DaskBackend(opts.engine)
            else:
                from .ray import RayBackend

                b = RayBackend()
            _sessions[(kind, ident)] = b
    for old in stale:
        _close_quietly(old)
    return b, opts


def close(engine: Any = None) -> int:
    """Stop the agents and drop the cached inputs of ``engine``'s session (every session
    if None): ``shardc.cluster.close(client)``.  Returns how many sessions were closed."""
    with _lock:
        if engine is None:
            found = list(_sessions.items())
        else:
            ident = _identity(engine.engine if isinstance(engine, Cluster) else engine)
            found = [(ident, _sessions[ident])] if ident in _sessions else []
        for k, _ in found:
            _sessions.pop(k)
    for _, b in found:
        _close_quietly(b)
    return len(found)


def _close_quietly(b: Any, wait: float = 30.0) -> None:
    # A call still running (a daemon thread at exit) keeps its lock: close anyway after ``wait``.
    got = b.call_lock.acquire(timeout=wait)
    try:
        b.close()
    except Exception as exc:  # noqa: BLE001 - agents also exit with their worker, or when idle
        log.warning("shardc cluster: closing a %s session failed (%s); its agents exit when idle", b.name, exc)
    finally:
        if got:
            b.call_lock.release()


atexit.register(close)  # registered after Dask's/Ray's own atexit hooks: runs before them
