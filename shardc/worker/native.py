"""The worker's loop for a native kernel (``shardc.native``): whole runs of
shard ids go to the C runner (``csrc/kernel.c``), which calls the kernel once
per shard without the GIL and writes the status row itself.

::

    shm_queue    queue_loop ─> ex.run_block(start, stop) ─> NativeRunner.run_block
    rpc_chunked  loop       ─> ex.run_ids(ids)          ─> NativeRunner.run_ids (runs of consecutive ids)
                                 │
                                 └─> ll.kernel_run(fn, args, row, block, pos, stop)   (no GIL)
                                       stops at a shard that failed (-> NativeKernelError record)
                                       or wrote a borrowed input (guards on: -> cow events, deny error)
                                       and the loop resumes after it

The same supervision as Python shards: the row names the running shard, so a
crash inside the kernel is charged to it (the master reads the row); each
shard's done mark is stored as it finishes.  With page guards on, each run
of shards is one guard scope: the C runner stops right after the first shard
whose run moved the guard's fault counter, and that scope's events (and,
under ``deny``, its error) are that shard's, exactly as for a Python shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _lowlevel as ll
from ..errors import BorrowedInputWriteError, InvalidArgumentError, InvalidTypeError
from ..native import NativeKernel, kernel_error
from ..protocol import ERR, OK, error_record

# The executor's types (shardc.worker.executor imports this module, so they are restated here).
Events = list[dict[str, Any]]
OutcomeTuple = tuple[int, int, Any, int, int, "Events | None", "int | None"]
RunTuple = tuple[int, int, int, int, int, "int | None"]
OnFail = Callable[[OutcomeTuple], None]
OnCow = Callable[[int, Events], None]


def native_runner(ex: Any) -> NativeRunner | None:
    """The runner for the executor's current call if its fun is a native kernel, else None."""
    fun = ex.call.fun
    return NativeRunner(ex, fun) if isinstance(fun, NativeKernel) else None


def _geometry(desc: Any) -> dict[str, Any]:
    strategy = getattr(desc, "strategy", None)
    if strategy == "contiguous":
        return {"strategy": ll.SHARDS_CONTIGUOUS, "n": desc.n, "block": desc.block_size}
    if strategy == "strided":
        return {"strategy": ll.SHARDS_STRIDED, "n": desc.n, "block": 0}
    if strategy == "tiles":
        return {
            "strategy": ll.SHARDS_TILES,
            "n": desc.n,
            "block": 0,
            "tiles": (desc.n_x, desc.n_y, desc.block_x, desc.block_y),
        }
    raise InvalidArgumentError(
        f"native kernels run over shards(n, ...) (contiguous or strided) or tiles2d(...); got {strategy!r} shards"
    )


class NativeRunner:
    """Runs the current call's shards through the C runner (see the module docstring)."""

    def __init__(self, ex: Any, kernel: NativeKernel) -> None:
        c = ex.call
        self.ex = ex
        self.kernel = kernel
        names = kernel.order if kernel.order is not None else tuple(c.kwargs)
        arrays = []
        for n in names:
            v = c.kwargs.get(n)
            if not isinstance(v, np.ndarray):
                raise InvalidTypeError(
                    f"native kernel {kernel.name!r}: {n!r} must be a NumPy array (borrow= or out=), "
                    f"got {type(v).__name__}"
                )
            arrays.append(v)
        ro = frozenset(i for i, n in enumerate(names) if n in c.borrowed)
        self.args = ll.KernelArgs(arrays, c.desc.num_shards, iparams=kernel.iparams, readonly=ro, **_geometry(c.desc))
        self.fn = ll.kernel_fn(kernel.address())
        self.guard = ex.guard if ex.guard is not None and c.guard_regions else None
        self.flags = ll.KRUN_GUARDED if self.guard is not None else 0
        self.res = ll.new_krun()

    # -- the two entry points (ShardExecutor.run_block / run_ids) ------------------------------
    def run_block(self, start: int, stop: int, on_fail: OnFail, on_cow: OnCow) -> RunTuple:
        """shm_queue: the block ``start .. stop-1``; fields of a RunStats."""
        ran, ok, t0, t1 = self._run(start, stop, on_fail, on_cow, None)
        return (ran, ok, 0, t0, t1, None)

    def run_ids(self, ids: list[int] | range, out: list[OutcomeTuple] | None = None) -> list[OutcomeTuple]:
        """rpc_chunked: one outcome per id run, for each run of consecutive ids."""
        if out is None:
            out = []
        i = 0
        while i < len(ids):
            j = i + 1
            while j < len(ids) and ids[j] == ids[j - 1] + 1:
                j += 1
            ran, _ok, _t0, _t1 = self._run(ids[i], ids[j - 1] + 1, out.append, None, out)
            if ran < j - i:
                break  # tainted: the rest is the master's
            i = j
        return out

    # -- the loop -------------------------------------------------------------------------------
    def _run(
        self, start: int, stop: int, on_fail: OnFail, on_cow: OnCow | None, gather: list[OutcomeTuple] | None
    ) -> tuple[int, int, int, int]:
        """Run ``start .. stop-1``; returns (ran, ok, t0, t1).  ``gather``
        (rpc) receives an outcome for every shard, successes included."""
        ex, res = self.ex, self.res
        row = ex.row
        _next, writer = row.next_call(ex.call.donemap)  # binds this call's done map to the writer
        pos = start
        ok = 0
        t_first = -1
        t1 = 0
        while pos < stop:
            events: Events | None = None
            err: BaseException | None = None
            if self.guard is None:
                rc = ll.kernel_run(self.fn, self.args, writer, start, stop - start, pos, stop, 0, res)
            else:
                rc, events, err = self._guarded(writer, start, stop, pos)
            if t_first < 0:
                t_first = res.t0
            t1 = res.t1
            n_ok = int(res.ran)
            if gather is not None and n_ok:
                t0 = int(res.t0)
                step = (t1 - t0) / max(n_ok, 1)
                gather.extend(
                    (sid, OK, None, t0 + int(k * step), t0 + int((k + 1) * step), None, None)
                    for k, sid in enumerate(range(pos, pos + n_ok))
                )
            ok += n_ok
            if rc == ll.KRUN_DONE:
                if events and on_cow is not None:
                    on_cow(stop - 1, events)
                pos = stop
            else:
                sid = int(res.sid)
                if rc == ll.KRUN_FAILED or err is not None:
                    exc = err if err is not None else kernel_error(self.kernel.name, sid, int(res.code))
                    on_fail((sid, ERR, error_record(exc, sid), t1, t1, events, None))
                else:  # a write into an audit/allow input: reported, the shard counts as done
                    ok += 1
                    t1 = row.block_end(ex.call.donemap, sid, 1, 1)
                    if gather is not None:
                        gather.append((sid, OK, None, t1, t1, events, None))
                    elif events and on_cow is not None:
                        on_cow(sid, events)
                pos = sid + 1
            if events and ex.check_tainted():
                break  # an inherited input written beyond restoring: the rest is the master's
        return pos - start, ok, t_first, t1

    def _guarded(self, writer: Any, start: int, stop: int, pos: int) -> tuple[int, Events | None, BaseException | None]:
        """One C run inside a guard scope; the scope's events (and deny
        error) are those of the shard the run stopped at."""
        res = self.res
        scope = self.guard.shard_scope(pos)  # type: ignore[union-attr]
        scope.__enter__()
        try:
            rc = ll.kernel_run(self.fn, self.args, writer, start, stop - start, pos, stop, self.flags, res)
        except BorrowedInputWriteError:
            # The deny notification, raised as the C call returned: res
            # (filled before) says which shard wrote; the scope reports it.
            rc = ll.KRUN_COW
        scope.shard_id = int(res.sid) if rc != ll.KRUN_DONE else stop - 1
        err: BaseException | None = None
        try:
            scope.__exit__(None, None, None)
        except BorrowedInputWriteError as exc:
            err = exc
        return rc, scope.events or None, err
