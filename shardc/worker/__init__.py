"""The worker: what runs in each forked child of a shardc pool.

Modules (nothing here imports the master side: ``map``, ``pool``,
``dispatch_queue``):

* :mod:`~shardc.worker.loop` -- after-fork setup, the message loop, a call's
  setup and teardown, segments (``worker_entry``, ``after_fork``);
* :mod:`~shardc.worker.executor` -- the one shard executor, used by both
  dispatch modes (``ShardExecutor.run_ids`` for rpc_chunked,
  ``ShardExecutor.run_block`` for shm_queue);
* :mod:`~shardc.worker.queue_loop` -- the shm_queue loop (ring blocks ->
  executor) and the ring's item format;
* :mod:`~shardc.worker.heap` -- heap reuse policy (C part: ``csrc/heap.c``).

This package re-exports what the master side uses.  ``_death_signal`` is the
one setting: the pool sets it just before each fork.
"""

from __future__ import annotations

import signal
from typing import Any, NoReturn

from ..status import StatusTable
from . import loop as _loop
from .executor import release_traceback
from .loop import _threadpool_controller, after_fork

__all__ = ["_death_signal", "_threadpool_controller", "after_fork", "release_traceback", "worker_entry"]

# Set by the pool just before fork.  Linux sends PDEATHSIG when the *thread*
# that forked the worker exits, not the process: a pool used from a
# short-lived thread (a re-fork for an inherited input, a replacement) would
# lose its workers with that thread.  So workers forked from another thread
# than the main one rely on their socket (EOF = master gone) instead (0).
_death_signal: int = signal.SIGKILL


def worker_entry(
    slot: int,
    sock: Any,
    status: StatusTable,
    parent_pid: int,
    packages: list[str],
    init_expr: Any,
    init_blob: bytes | None,
    guard_wanted: bool,
) -> NoReturn:
    """Entry point in the child after fork (see :func:`shardc.worker.loop.worker_entry`);
    never returns.  Passes on the death signal the pool chose for this fork."""
    _loop.worker_entry(slot, sock, status, parent_pid, packages, init_expr, init_blob, guard_wanted, _death_signal)
