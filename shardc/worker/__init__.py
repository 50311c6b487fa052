"""The worker: what runs in each forked child of a shardc pool.

Modules (nothing here imports the master side: ``map``, ``pool``,
``dispatch_queue``):

* :mod:`~shardc.worker.loop` -- after-fork setup, the message loop, a call's
  setup and teardown, segments (``worker_entry``, ``after_fork``);
* :mod:`~shardc.worker.executor` -- the one shard executor, used by both
  dispatch modes (``ShardExecutor.run_ids`` for rpc_chunked,
  ``ShardExecutor.run_block`` for shm_queue);
* :mod:`~shardc.worker.rpc` -- the rpc_chunked side: RUN chunks ->
  executor -> RESULTS, and chunks handed back behind a long one (RETURNED);
* :mod:`~shardc.worker.queue_loop` -- the shm_queue loop (ring blocks ->
  executor) and the ring's item format;
* :mod:`~shardc.worker.heap` -- heap reuse policy (C part: ``csrc/heap.c``).

This package re-exports what the master side uses.
"""

from __future__ import annotations

from .executor import release_traceback
from .loop import _threadpool_controller, after_fork, worker_entry

__all__ = ["_threadpool_controller", "after_fork", "release_traceback", "worker_entry"]
