"""The only module that imports ``shardc._native`` (the cffi extension).

Everything native goes through here: thin wrappers that call one C function,
and one choke point, :func:`_check`, that turns the C layer's ``-errno``
return codes into Python exceptions with the operation, the object's name and
a targeted hint where the OS limit is a known one.

The module also checks the build stamp at import: a native module compiled
from other C sources than the ones beside this package (an editable install
whose ``csrc/`` changed) refuses to load with a message saying how to rebuild.
"""

from __future__ import annotations

import errno as _errno
import os
from pathlib import Path

from . import _stamp
from ._version import __version__
from .errors import SegmentError, ShardcError

try:
    from ._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    _src = Path(__file__).resolve().parent.parent / "csrc"
    if _src.is_dir():
        _why = (f"this is shardc's source tree ({_src.parent}), which has no compiled module: "
                "build it here with `pip install -e .`, or run from another directory to use an "
                "installed shardc")
    else:
        _why = "reinstall shardc (`pip install --force-reinstall shardc`)"
    raise ImportError(f"shardc's native module (shardc._native) is missing or failed to load: {exc}; "
                      f"{_why}") from exc


def _check_stamp() -> None:
    built = ffi.string(lib.shardc_build_stamp()).decode()
    if not built.startswith(__version__ + "+"):
        raise ImportError(
            f"stale shardc native module: it was built for shardc {built.split('+')[0]}, "
            f"but the Python package is {__version__}. Rebuild with `pip install -e .`."
        )
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    if (csrc / "ffi_build.py").is_file() and os.environ.get("SHARDC_SKIP_STAMP_CHECK") != "1":
        expected = _stamp.compute_stamp(csrc, __version__)
        if expected != built:
            raise ImportError(
                f"stale shardc native module: built from C sources {built}, but {csrc} now "
                f"hashes to {expected}. Rebuild with `pip install -e .` "
                "(set SHARDC_SKIP_STAMP_CHECK=1 to load it anyway)."
            )


_check_stamp()

PAGE_SIZE: int = int(lib.shardc_page_size())

# Hints for errno values whose usual cause is a known OS limit.
_HINTS = {
    _errno.ENOSPC: "the backing filesystem is full; on a small /dev/shm (e.g. a container's "
                   "64 MiB) use backing='file' or set SHARDC_BACKING=file",
    _errno.ENOMEM: "out of memory or out of memory mappings; if many pages were write-protected "
                   "separately, raise vm.max_map_count (sysctl -w vm.max_map_count=262144)",
    _errno.EMFILE: "too many open files in this process; raise the limit with `ulimit -n`",
    _errno.ENFILE: "too many open files system-wide",
    _errno.EACCES: "permission denied; named segments are created with mode 0600 by their owner",
    _errno.EEXIST: "a segment with this name already exists; pick another name or unlink it",
    _errno.ENOENT: "no segment with this name exists (was it unlinked by its owner?)",
}


def _check(rc: int, op: str, name: str | None = None) -> int:
    """Return ``rc`` if it is >= 0, else raise the matching exception.

    Args:
        rc: return value of a C function (``>= 0`` success, ``-errno`` failure).
        op: the operation, for the message ("mmap", "ftruncate", ...).
        name: the object the operation was on (segment name), if any.

    Raises:
        SegmentError: an ``OSError`` subclass with ``errno`` set.
    """
    if rc >= 0:
        return rc
    code = -rc
    msg = f"{op} failed" + (f" for segment {name!r}" if name else "") + f": {os.strerror(code)}"
    hint = _HINTS.get(code)
    if hint:
        msg += f" (hint: {hint})"
    raise SegmentError(code, msg)


# --------------------------------------------------------------------------
# segments (csrc/seg.c)
# --------------------------------------------------------------------------

BACKING_MEMFD = lib.SHARDC_BACKING_MEMFD
BACKING_SHM = lib.SHARDC_BACKING_SHM
BACKING_FILE = lib.SHARDC_BACKING_FILE
MAP_WRITE = lib.SHARDC_MAP_WRITE
MAP_PRIVATE = lib.SHARDC_MAP_PRIVATE
MAP_POPULATE = lib.SHARDC_MAP_POPULATE
ADVICE = {
    "normal": lib.SHARDC_ADV_NORMAL,
    "sequential": lib.SHARDC_ADV_SEQUENTIAL,
    "random": lib.SHARDC_ADV_RANDOM,
    "willneed": lib.SHARDC_ADV_WILLNEED,
    "dontneed": lib.SHARDC_ADV_DONTNEED,
    "hugepage": lib.SHARDC_ADV_HUGEPAGE,
}


def seg_backing_supported(backing: int) -> bool:
    return bool(lib.shardc_seg_backing_supported(backing))


def seg_create(backing: int, name: str, size: int, persist: bool) -> int:
    """Create a segment and return its fd."""
    fd = ffi.new("int *")
    _check(lib.shardc_seg_create(backing, name.encode(), size, int(persist), fd), "create", name)
    return fd[0]


def seg_open(backing: int, name: str, writable: bool) -> tuple[int, int]:
    """Open an existing named segment; return ``(fd, size)``."""
    fd = ffi.new("int *")
    size = ffi.new("uint64_t *")
    _check(lib.shardc_seg_open(backing, name.encode(), int(writable), fd, size), "open", name)
    return fd[0], int(size[0])


def seg_unlink(backing: int, name: str) -> None:
    _check(lib.shardc_seg_unlink(backing, name.encode()), "unlink", name)


def seg_seal(fd: int, name: str | None = None) -> bool:
    """Seal against writes/resizes; False where the backing has no seals."""
    rc = lib.shardc_seg_seal(fd)
    if rc == -_errno.ENOTSUP:
        return False
    _check(rc, "seal", name)
    return True


def seg_is_sealed(fd: int) -> bool:
    return bool(_check(lib.shardc_seg_is_sealed(fd), "get seals"))


def seg_size(fd: int) -> int:
    size = ffi.new("uint64_t *")
    _check(lib.shardc_seg_size(fd, size), "fstat")
    return int(size[0])


def seg_close_fd(fd: int) -> None:
    _check(lib.shardc_seg_close_fd(fd), "close")


def seg_map(fd: int, offset: int, size: int, flags: int, name: str | None = None) -> int:
    """Map ``size`` bytes of the segment; return the address as an int."""
    addr = ffi.new("void **")
    _check(lib.shardc_seg_map(fd, offset, size, flags, addr), "mmap", name)
    return int(ffi.cast("uintptr_t", addr[0]))


def seg_unmap(addr: int, size: int) -> None:
    _check(lib.shardc_seg_unmap(ffi.cast("void *", addr), size), "munmap")


def seg_protect(addr: int, size: int, writable: bool, name: str | None = None) -> None:
    _check(lib.shardc_seg_protect(ffi.cast("void *", addr), size, int(writable)), "mprotect", name)


def seg_discard(addr: int, size: int, name: str | None = None) -> None:
    """Free the pages of a page-aligned range and leave it PROT_NONE (see seg.h)."""
    _check(lib.shardc_seg_discard(ffi.cast("void *", addr), size), "discard pages", name)


def seg_advise(addr: int, size: int, advice: str, name: str | None = None) -> None:
    _check(lib.shardc_seg_advise(ffi.cast("void *", addr), size, ADVICE[advice]), f"madvise({advice})", name)


def seg_populate(addr: int, size: int, write: bool, name: str | None = None) -> None:
    _check(lib.shardc_seg_populate(ffi.cast("void *", addr), size, int(write)), "populate", name)


def seg_fill(addr: int, size: int, pattern: bytes) -> None:
    _check(lib.shardc_seg_fill(ffi.cast("void *", addr), size, pattern, len(pattern)), "fill")


def mem_equal(a: int, b: int, n: int) -> bool:
    return bool(lib.shardc_mem_equal(ffi.cast("void *", a), ffi.cast("void *", b), n))


class Mapping:
    """A mapped region whose lifetime is tied to Python references.

    ``cdata`` is a cffi pointer created with ``ffi.gc``: the region is unmapped
    when the last reference to it goes away.  :meth:`buffer` returns a buffer
    object that references ``cdata``, so NumPy arrays built on it keep the
    mapping alive even after the owning object was closed: a closed buffer's
    outstanding views never dangle.
    """

    __slots__ = ("cdata", "addr", "size", "primed")

    def __init__(self, addr: int, size: int) -> None:
        raw = ffi.cast("char *", addr)
        self.addr = addr
        self.size = size
        self.primed = False  # page guards set up on it once (see GUARD_PRIMED)
        self.cdata = ffi.gc(raw, lambda p, n=size: lib.shardc_seg_unmap(p, n), size=size)

    def buffer(self) -> object:
        """A writable buffer over the whole region that keeps the mapping alive."""
        return ffi.buffer(self.cdata, self.size)


def map_segment(fd: int, offset: int, size: int, flags: int, name: str | None = None) -> Mapping:
    """Map and return a :class:`Mapping` that unmaps itself when unreferenced."""
    return Mapping(seg_map(fd, offset, size, flags, name), size)


# --------------------------------------------------------------------------
# processes (csrc/proc.c)
# --------------------------------------------------------------------------


def proc_after_fork(expected_parent: int, death_signal: int) -> int:
    """Arm PDEATHSIG in a fresh child; returns -ESRCH if the parent already died."""
    return int(lib.shardc_proc_after_fork(expected_parent, death_signal))


def _read_mem(fn: object, pid: int, what: str) -> dict[str, int] | None:
    m = ffi.new("shardc_mem_t *")
    rc = fn(pid, m)  # type: ignore[operator]
    if rc == -_errno.ESRCH or rc == -_errno.ENOENT:
        return None
    _check(rc, f"read memory ({what}) of pid {pid}")
    return {"rss": int(m.rss), "pss": int(m.pss), "uss": int(m.uss), "swap": int(m.swap),
            "anon": int(m.anon), "pss_anon": int(m.pss_anon), "precise": int(m.precise)}


def proc_mem(pid: int) -> dict[str, int] | None:
    """Memory of ``pid`` in bytes from smaps_rollup (~0.3 ms): rss, pss, uss, swap,
    anon, pss_anon, precise; None if the process is gone."""
    return _read_mem(lib.shardc_proc_mem, pid, "smaps_rollup")


def proc_mem_fast(pid: int) -> dict[str, int] | None:
    """Cheap estimate from /proc/PID/statm (~8 us; precise=0, pss/uss/anon = RssAnon);
    None if the process is gone."""
    return _read_mem(lib.shardc_proc_mem_fast, pid, "statm")


def proc_set_affinity(pid: int, cpus: list[int]) -> None:
    arr = ffi.new("int[]", list(cpus))
    _check(lib.shardc_proc_set_affinity(pid, arr, len(cpus)), "sched_setaffinity")


# --------------------------------------------------------------------------
# heap policy (csrc/heap.c)
# --------------------------------------------------------------------------


def heap_reuse(keep: int) -> bool:
    """This process's heap policy (csrc/heap.c): ``keep > 0`` serves big
    allocations from the heap and keeps up to ``keep`` freed bytes at its top
    for reuse; ``0`` restores glibc's defaults.  False where unsupported (not
    glibc >= 2.33, or an allocator that refuses ``mallopt``)."""
    return lib.shardc_heap_reuse(max(0, int(keep))) == 0


def heap_stats() -> dict[str, int] | None:
    """The allocator's totals: ``free``, ``used``, ``arena`` (bytes taken from the
    system) and ``brk`` (the program break); None where unknown."""
    h = ffi.new("shardc_heap_t *")
    if lib.shardc_heap_stats(h) < 0:
        return None
    return {"free": h.free, "used": h.used, "arena": h.arena, "brk": h.brk}


def heap_trim() -> None:
    """Give the allocator's free memory back to the kernel (``malloc_trim(0)``)."""
    lib.shardc_heap_trim()


# --------------------------------------------------------------------------
# task ring (csrc/queue.c) -- wrappers go below this line
# --------------------------------------------------------------------------
#
# The ring is addressed by a ``void *`` to its (mapped) memory; its layout is
# private to queue.c.  push/pop keep the C semantics so the hot path stays
# one C call: they return a count, ``0`` on timeout, ``QUEUE_EINTR`` when a
# signal handler must run (the caller retries), and raise on the rest.

from .errors import InvalidArgumentError as _InvalidArgumentError  # noqa: E402
from .errors import QueueClosedError as _QueueClosedError  # noqa: E402

QUEUE_MAX_CLAIM: int = lib.SHARDC_QUEUE_MAX_CLAIM
QUEUE_MAX_CONSUMERS: int = lib.SHARDC_QUEUE_MAX_CONSUMERS
QUEUE_MAX_CAPACITY: int = lib.SHARDC_QUEUE_MAX_CAPACITY
QUEUE_STATES = {lib.SHARDC_QUEUE_IDLE: "idle", lib.SHARDC_QUEUE_CLAIMING: "claiming",
                lib.SHARDC_QUEUE_OWNED: "owned"}
QUEUE_EINTR = -_errno.EINTR
_Q_ETIMEDOUT = -_errno.ETIMEDOUT
_Q_EPIPE = -_errno.EPIPE
_Q_ENOBUFS = -_errno.ENOBUFS


def _qcheck(rc: int, op: str, consumer: int | None = None) -> int:
    """Ring-specific codes first (closed, claim record full), then :func:`_check`."""
    if rc >= 0:
        return rc
    if rc == _Q_EPIPE:
        raise _QueueClosedError(f"task ring {op}: the ring is closed"
                                + (" and drained" if op == "pop" else ""))
    if rc == _Q_ENOBUFS and consumer is not None:
        raise SegmentError(_errno.ENOBUFS, f"task ring {op} for consumer {consumer}: it holds "
                           f"{QUEUE_MAX_CLAIM} claimed items (the maximum); call done() first")
    return _check(rc, f"task ring {op}" + (f" (consumer {consumer})" if consumer is not None else ""))


def queue_bytes(capacity: int, max_consumers: int) -> int:
    """Bytes a ring of ``capacity`` cells (a power of two) and ``max_consumers`` needs."""
    n = int(lib.shardc_queue_bytes(capacity, max_consumers))
    if n == 0:
        raise _InvalidArgumentError(
            f"task ring: capacity must be a power of two in [2, {QUEUE_MAX_CAPACITY}] and "
            f"max_consumers in [1, {QUEUE_MAX_CONSUMERS}]; got capacity={capacity}, "
            f"max_consumers={max_consumers}")
    return n


def queue_init(mem: object, size: int, capacity: int, max_consumers: int) -> None:
    _qcheck(lib.shardc_queue_init(mem, size, capacity, max_consumers), "init")


def queue_check(mem: object, size: int) -> None:
    """Raise unless ``mem`` holds an initialized ring that fits in ``size`` bytes."""
    rc = lib.shardc_queue_check(mem, size)
    if rc == -_errno.EINVAL:
        raise _InvalidArgumentError("task ring attach: the segment holds no initialized task ring")
    _qcheck(rc, "attach")


def queue_push(mem: object, items: object, n: int, timeout_ns: int) -> int:
    """Push ``n`` items from a ``uint64_t *``; count pushed, 0 on timeout, or QUEUE_EINTR."""
    rc = lib.shardc_queue_push(mem, items, n, timeout_ns)
    if rc >= 0 or rc == QUEUE_EINTR:
        return rc
    if rc == _Q_ETIMEDOUT:
        return 0
    return _qcheck(rc, "push")


def queue_pop(mem: object, consumer: int, out: object, max_items: int, timeout_ns: int) -> int:
    """Claim up to ``max_items`` into ``out``; count, 0 on timeout, or QUEUE_EINTR."""
    rc = lib.shardc_queue_pop(mem, consumer, out, max_items, timeout_ns)
    if rc > 0 or rc == QUEUE_EINTR:
        return rc
    if rc == _Q_ETIMEDOUT:
        return 0
    return _qcheck(rc, "pop", consumer)


def queue_done(mem: object, consumer: int) -> None:
    _qcheck(lib.shardc_queue_done(mem, consumer), "done", consumer)


def queue_heartbeat(mem: object, consumer: int) -> None:
    _qcheck(lib.shardc_queue_heartbeat(mem, consumer), "heartbeat", consumer)


def queue_register(mem: object, consumer: int, pid: int) -> None:
    rc = lib.shardc_queue_register(mem, consumer, pid)
    if rc == -_errno.EBUSY:
        raise SegmentError(_errno.EBUSY, f"task ring register: consumer {consumer} still holds "
                           "claimed items; repair() it first")
    _qcheck(rc, "register", consumer)


def queue_repair(mem: object, consumer: int, out: object, max_items: int) -> int:
    """Hand back a dead consumer's unfinished items into ``out``; returns the count."""
    rc = lib.shardc_queue_repair(mem, consumer, out, max_items)
    if rc == -_errno.EBUSY:
        raise SegmentError(_errno.EBUSY, f"task ring repair: consumer {consumer}'s process is "
                           "still alive (or not yet reaped); kill and wait for it first")
    return _qcheck(rc, "repair", consumer)


def queue_close(mem: object) -> None:
    _qcheck(lib.shardc_queue_close(mem), "close")


def queue_set_spin(mem: object, spin_ns: int) -> None:
    _qcheck(lib.shardc_queue_set_spin(mem, spin_ns), "set_spin")


_QUEUE_STATS_FIELDS = ("capacity", "max_consumers", "pushed", "popped", "size", "closed",
                       "parks", "wakes", "repaired", "spin_ns")


def queue_stats(mem: object) -> dict[str, int]:
    st = ffi.new("shardc_queue_stats_t *")
    _qcheck(lib.shardc_queue_stats(mem, st), "stats")
    return {f: int(getattr(st, f)) for f in _QUEUE_STATS_FIELDS}


def queue_consumer(mem: object, consumer: int) -> dict[str, object]:
    """A consumer record: pid, state (idle/claiming/owned), claimed, sleeping, heartbeat."""
    ci = ffi.new("shardc_queue_consumer_t *")
    _qcheck(lib.shardc_queue_consumer(mem, consumer, ci), "consumer info", consumer)
    return {"pid": int(ci.pid), "state": QUEUE_STATES.get(int(ci.state), str(ci.state)),
            "claimed": int(ci.claimed), "sleeping": bool(ci.sleeping),
            "heartbeat": int(ci.heartbeat)}


# (queue section end)

# --------------------------------------------------------------------------
# page guards (csrc/guard.c) -- wrappers go below this line
# --------------------------------------------------------------------------

GUARD_MODES = {
    "deny": lib.SHARDC_GUARD_DENY,
    "audit": lib.SHARDC_GUARD_AUDIT,
    "allow": lib.SHARDC_GUARD_ALLOW,
}
GUARD_MODE_NAMES = {v: k for k, v in GUARD_MODES.items()}
GUARD_MAX_REGIONS: int = lib.SHARDC_GUARD_MAX_REGIONS
# OR'ed into a mode for guard_add: the range is memory inherited over fork()
# (anonymous, copy-on-write), saved page by page and copied back on restore.
GUARD_SNAPSHOT: int = lib.SHARDC_GUARD_SNAPSHOT
GUARD_PRIMED: int = lib.SHARDC_GUARD_PRIMED


def guard_install(signum: int, raise_signal: bool = False) -> None:
    """Install the SIGSEGV/SIGBUS handlers (chaining to the current ones).

    Deny faults are announced on ``signum``: by ``PyErr_SetInterruptEx``
    (default) or, with ``raise_signal``, by ``raise(signum)`` in the handler.
    """
    if raise_signal:
        notify, flags = ffi.NULL, lib.SHARDC_GUARD_NOTIFY_RAISE
    else:
        notify, flags = ffi.addressof(lib, "shardc_guard_python_notify"), lib.SHARDC_GUARD_NOTIFY_CALL
    _check(lib.shardc_guard_install(notify, signum, flags), "install page-guard signal handlers")


def guard_uninstall() -> None:
    _check(lib.shardc_guard_uninstall(), "uninstall page-guard signal handlers")


def guard_set_limits(per_region: int, total: int) -> None:
    """Pages tracked one by one per region / in all regions before a region goes whole-writable."""
    _check(lib.shardc_guard_set_limits(per_region, total), "set page-guard limits")


def guard_add(addr: int, size: int, mode: int, name: str | None = None) -> int:
    """Write-protect ``[addr, addr+size)`` and return its region id.

    Args:
        addr: page-aligned start of a MAP_PRIVATE mapping, or, with
            ``GUARD_SNAPSHOT`` in ``mode``, of memory inherited over fork().
        size: length in bytes (rounded up to whole pages).
        mode: a ``GUARD_MODES`` value, optionally ``| GUARD_SNAPSHOT`` or
            ``| GUARD_PRIMED`` (the same mapping was guarded before: skip priming).
        name: the input's name, for error messages.

    Returns:
        The region id.

    Raises:
        OSError: invalid arguments, the region table is full, or mprotect/mmap failed.
    """
    rid = ffi.new("int *")
    _check(lib.shardc_guard_add(ffi.cast("void *", addr), size, mode, rid), "protect borrowed input", name)
    return int(rid[0])


def guard_remove(rid: int, name: str | None = None) -> None:
    """Restore region ``rid`` (unless its data is lost) and forget it; a snapshot range is left writable."""
    _check(lib.shardc_guard_remove(rid), "unprotect borrowed input", name)


def guard_collect(rid: int) -> dict[str, int]:
    """What region ``rid`` saw since its last restore (pages, first_offset, faults, ...).

    ``mode`` is the plain policy (without ``GUARD_SNAPSHOT``); ``snapshot`` is 1
    for a snapshot region, and ``lost`` is 1 when it was written past its save
    slots, so :func:`guard_restore` cannot bring its data back.
    """
    info = ffi.new("shardc_guard_info_t *")
    _check(lib.shardc_guard_collect(rid, info), "collect page-guard events")
    return {"pages": int(info.pages), "first_offset": int(info.first_offset),
            "faults": int(info.faults), "written": int(info.written),
            "overflow": int(info.overflow), "exact": int(info.exact), "mode": int(info.mode),
            "snapshot": int(info.snapshot), "lost": int(info.lost)}


def guard_restore(rid: int, name: str | None = None) -> bool:
    """Bring the region's written pages back to pristine data and write-protect them again.

    Returns:
        True when restored (or nothing was written); False when the region is a
        snapshot region whose data is lost (``guard_collect(rid)["lost"]``): the
        process must be retired, and :func:`guard_remove` still succeeds.

    Raises:
        OSError: madvise/mprotect failed.
    """
    rc = lib.shardc_guard_restore(rid)
    if rc == -_errno.ENOTRECOVERABLE:
        return False
    _check(rc, "restore borrowed input", name)
    return True


def _guard_ids(fn, *args) -> list[int]:  # type: ignore[no-untyped-def]
    ids = ffi.new("int[]", GUARD_MAX_REGIONS)
    n = _check(fn(*args, ids, GUARD_MAX_REGIONS), "list page-guard regions")
    return [int(ids[i]) for i in range(min(n, GUARD_MAX_REGIONS))]


def guard_dirty() -> list[int]:
    """Ids of regions written since their last restore."""
    if lib.shardc_guard_dirty(ffi.NULL, 0) == 0:  # the common, read-only case: no allocation
        return []
    return _guard_ids(lib.shardc_guard_dirty)


def guard_lookup(addr: int, size: int) -> list[int]:
    """Ids of regions overlapping ``[addr, addr+size)``."""
    return _guard_ids(lib.shardc_guard_lookup, ffi.cast("void *", addr), size)


def guard_take_notify() -> bool:
    """True (once) if a deny region was written since the last call."""
    return bool(lib.shardc_guard_take_notify())


def guard_counters() -> dict[str, int]:
    c = ffi.new("shardc_guard_counters_t *")
    _check(lib.shardc_guard_counters(c), "read page-guard counters")
    return {"faults": int(c.faults), "chained": int(c.chained), "overflows": int(c.overflows),
            "notified": int(c.notified), "tracked": int(c.tracked)}


# (guard section end)

__all__ = ["ffi", "PAGE_SIZE", "ShardcError"]
