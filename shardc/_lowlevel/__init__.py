"""The only package that imports ``shardc._native`` (the cffi extension).

Everything native goes through here: thin wrappers that each call one C
function, grouped by primitive (``seg``, ``proc``, ``queue``, ``status``,
``guard``, one module per ``csrc/*.c``), and one choke point,
:func:`core._check`, that turns the C layer's ``-errno`` return codes into
the exception class of the primitive they came from, with the operation, the
object's name and a targeted hint where the OS limit is a known one.
``core`` also checks the build stamp at import: a native module compiled from
other C sources than the ones beside this package refuses to load, saying
how to rebuild.  Callers use the flat namespace: ``from shardc import
_lowlevel as ll; ll.seg_map(...)``.
"""

from __future__ import annotations

from .core import (  # noqa: F401
    PAGE_SIZE,
    _check,
    ffi,
    lib,
)
from .guard import (  # noqa: F401
    GUARD_MAX_REGIONS,
    GUARD_MODE_NAMES,
    GUARD_MODES,
    GUARD_PRIMED,
    GUARD_SNAPSHOT,
    guard_add,
    guard_collect,
    guard_counters,
    guard_dirty,
    guard_install,
    guard_lookup,
    guard_remove,
    guard_restore,
    guard_set_limits,
    guard_take_notify,
    guard_uninstall,
)
from .proc import (  # noqa: F401
    heap_reuse,
    heap_stats,
    heap_trim,
    mem_sampler,
    proc_after_fork,
    proc_mem,
    proc_mem_fast,
    proc_set_affinity,
)
from .queue import (  # noqa: F401
    QUEUE_ANY_PID,
    QUEUE_EINTR,
    QUEUE_MAX_CAPACITY,
    QUEUE_MAX_CLAIM,
    QUEUE_MAX_CONSUMERS,
    QUEUE_STATES,
    queue_bytes,
    queue_check,
    queue_close,
    queue_consumer,
    queue_done,
    queue_heartbeat,
    queue_init,
    queue_pop,
    queue_push,
    queue_register,
    queue_repair,
    queue_set_spin,
    queue_stats,
)
from .seg import (  # noqa: F401
    ADVICE,
    BACKING_FILE,
    BACKING_MEMFD,
    BACKING_SHM,
    MAP_POPULATE,
    MAP_PRIVATE,
    MAP_WRITE,
    Mapping,
    map_segment,
    mem_equal,
    seg_advise,
    seg_backing_supported,
    seg_close_fd,
    seg_create,
    seg_discard,
    seg_fill,
    seg_is_sealed,
    seg_map,
    seg_open,
    seg_populate,
    seg_protect,
    seg_seal,
    seg_size,
    seg_unlink,
    seg_unmap,
)
from .status import (  # noqa: F401
    NULL,
    STATUS_IDLE,
    STATUS_MAX_ROWS,
    STATUS_RUNNING,
    status_begin,
    status_block_begin,
    status_block_end,
    status_bytes,
    status_bytes_ptr,
    status_clear_calls,
    status_done_count,
    status_done_get,
    status_done_mark,
    status_done_total,
    status_end,
    status_exit_requested,
    status_fail,
    status_heap_kept,
    status_init,
    status_mem_ptr,
    status_next,
    status_now_ns,
    status_pid,
    status_read,
    status_request_exit,
    status_reset,
    status_set_call,
    status_set_heap_kept,
    status_set_idle,
    status_set_pid,
    status_set_sending,
    status_take_done,
    status_writer,
    status_writer_set_done,
)
