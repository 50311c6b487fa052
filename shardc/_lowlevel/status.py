"""Status rows and the done map (csrc/status.c): the ordered cross-process run state."""

from __future__ import annotations

import errno as _errno

from ..errors import (
    InvalidArgumentError,
)
from .core import _check, ffi, lib

# --------------------------------------------------------------------------
# status table and done map (csrc/status.c)
# --------------------------------------------------------------------------
#
# The table is addressed by a ``void *`` to its shared memory, a worker's row
# by an opaque, process-local ``shardc_status_writer_t *`` (:func:`status_writer`)
# that also holds the current done map, a done map by a ``uint8_t *`` and its
# length.  The per-shard calls are exported as the
# C functions themselves (``status_begin`` ...), so the hot path is exactly
# one cffi call: they return the time they stamped (ns, >= 0) or ``-EINVAL``,
# which the caller hands to :func:`status_fail`.

STATUS_IDLE: int = lib.SHARDC_STATUS_IDLE
STATUS_RUNNING: int = lib.SHARDC_STATUS_RUNNING
STATUS_MAX_ROWS: int = lib.SHARDC_STATUS_MAX_ROWS
NULL = ffi.NULL

# Hot path: the C functions, called directly (see above).
status_begin = lib.shardc_status_begin
status_end = lib.shardc_status_end
status_next = lib.shardc_status_next
status_run_next = lib.shardc_status_run_next
status_block_begin = lib.shardc_status_block_begin
status_block_end = lib.shardc_status_block_end
status_exit_requested = lib.shardc_status_exit_requested
status_done_get = lib.shardc_status_done_get
status_done_count = lib.shardc_status_done_count
status_now_ns = lib.shardc_status_now_ns


def status_fail(rc: int, op: str, sid: int | None = None, n: int | None = None) -> None:
    """Raise for a failed status call (``rc < 0``)."""
    if rc == -_errno.EINVAL and sid is not None:
        raise InvalidArgumentError(
            f"status {op}: shard id {sid} is outside the done map ({n} shards) or its mark is not a byte"
        )
    _check(rc, f"status {op}")


def status_bytes(nrows: int) -> int:
    """Bytes a status table of ``nrows`` rows needs."""
    n = int(lib.shardc_status_bytes(nrows))
    if n == 0:
        raise InvalidArgumentError(f"status table: rows must be in [1, {STATUS_MAX_ROWS}], got {nrows}")
    return n


def status_init(mem: object, size: int, nrows: int) -> None:
    _check(lib.shardc_status_init(mem, size, nrows), "status table init")


def status_writer(mem: object, slot: int) -> tuple[object, object]:
    """A writer of row ``slot``: ``(owner, ptr)``; keep ``owner`` alive while using
    ``ptr`` (the ``shardc_status_writer_t *`` the per-shard calls take)."""
    owner = ffi.new("uint64_t[]", (int(lib.shardc_status_writer_size()) + 7) // 8)
    ptr = ffi.cast("shardc_status_writer_t *", owner)
    if lib.shardc_status_writer_init(ptr, mem, slot) < 0:
        raise InvalidArgumentError(f"status table: no row {slot} (or not an initialized table)")
    return owner, ptr


def status_writer_set_done(w: object, done: object, n: int) -> None:
    """Marks of ``w``'s calls go to ``done`` (a ``uint8_t[]`` of ``n`` bytes; NULL, 0: none)."""
    _check(lib.shardc_status_writer_set_done(w, done, n), "status writer set_done")


_STATUS_FIELDS = (
    "state",
    "current",
    "start_ns",
    "done",
    "call",
    "block0",
    "blockn",
    "exit_req",
    "pid",
    "sending",
    "heap_kept",
    "run_n",
)


def status_read(mem: object, slot: int) -> tuple[int, ...]:
    """A consistent snapshot of row ``slot``, in :data:`_STATUS_FIELDS` order."""
    s = ffi.new("shardc_status_snap_t *")
    _check(lib.shardc_status_read(mem, slot, s), f"status read (row {slot})")
    return (
        s.state,
        s.current,
        s.start_ns,
        s.done,
        s.call,
        s.block0,
        s.blockn,
        s.exit_req,
        s.pid,
        s.sending,
        s.heap_kept,
        s.run_n,
    )


def status_reset(mem: object, slot: int) -> None:
    _check(lib.shardc_status_reset(mem, slot), f"status reset (row {slot})")


def status_set_call(mem: object, slot: int, call_id: int) -> None:
    _check(lib.shardc_status_set_call(mem, slot, call_id), f"status set_call (row {slot})")


def status_clear_calls(mem: object) -> None:
    _check(lib.shardc_status_clear_calls(mem), "status clear_calls")


def status_request_exit(mem: object, slot: int) -> None:
    _check(lib.shardc_status_request_exit(mem, slot), f"status request_exit (row {slot})")


def status_take_done(mem: object, slot: int) -> int:
    return _check(lib.shardc_status_take_done(mem, slot), f"status take_done (row {slot})")


def status_done_total(mem: object) -> int:
    return _check(lib.shardc_status_done_total(mem), "status done_total")


def status_pid(mem: object, slot: int) -> int:
    return _check(lib.shardc_status_pid(mem, slot), f"status pid (row {slot})")


def status_heap_kept(mem: object, slot: int) -> int:
    return _check(lib.shardc_status_heap_kept(mem, slot), f"status heap_kept (row {slot})")


def status_set_idle(row: object) -> None:
    _check(lib.shardc_status_set_idle(row), "status set_idle")


def status_set_sending(row: object, value: int) -> None:
    _check(lib.shardc_status_set_sending(row, value), "status set_sending")


def status_set_heap_kept(row: object, nbytes: int) -> None:
    _check(lib.shardc_status_set_heap_kept(row, nbytes), "status set_heap_kept")


def status_set_pid(row: object, pid: int) -> None:
    _check(lib.shardc_status_set_pid(row, pid), "status set_pid")


def status_done_mark(done: object, n: int, sid: int, mark: int) -> None:
    rc = lib.shardc_status_done_mark(done, n, sid, mark)
    if rc < 0:
        status_fail(rc, "done mark", sid, n)


def status_bytes_ptr(arr: object) -> object:
    """A ``uint8_t[]`` over a (shared) byte array; it keeps the array alive."""
    return ffi.from_buffer("uint8_t[]", arr)


def status_mem_ptr(arr: object) -> object:
    """A ``char[]`` over a status table's memory (passed as its ``void *``); it keeps the array alive."""
    return ffi.from_buffer(arr, require_writable=True)
