"""Page guards (csrc/guard.c): the fault handler's region table, collect and restore."""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable

from .core import _gcheck, ffi, lib

_native = lib  # the module itself: ffi.addressof needs it, not faults.py's stand-in

# --------------------------------------------------------------------------
# page guards (csrc/guard.c)
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
        notify, flags = ffi.addressof(_native, "shardc_guard_python_notify"), lib.SHARDC_GUARD_NOTIFY_CALL
    _gcheck(lib.shardc_guard_install(notify, signum, flags), "install page-guard signal handlers")


def guard_uninstall() -> None:
    _gcheck(lib.shardc_guard_uninstall(), "uninstall page-guard signal handlers")


def guard_set_limits(per_region: int, total: int) -> None:
    """Pages tracked one by one per region / in all regions before a region goes whole-writable."""
    _gcheck(lib.shardc_guard_set_limits(per_region, total), "set page-guard limits")


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
    _gcheck(lib.shardc_guard_add(ffi.cast("void *", addr), size, mode, rid), "page-guard protect", name)
    return int(rid[0])


def guard_remove(rid: int, name: str | None = None) -> None:
    """Restore region ``rid`` (unless its data is lost) and forget it; a snapshot range is left writable."""
    _gcheck(lib.shardc_guard_remove(rid), "page-guard unprotect", name)


def guard_collect(rid: int) -> dict[str, int]:
    """What region ``rid`` saw since its last restore (pages, first_offset, faults, ...).

    ``mode`` is the plain policy (without ``GUARD_SNAPSHOT``); ``snapshot`` is 1
    for a snapshot region, and ``lost`` is 1 when it was written past its save
    slots, so :func:`guard_restore` cannot bring its data back.
    """
    info = ffi.new("shardc_guard_info_t *")
    _gcheck(lib.shardc_guard_collect(rid, info), "collect page-guard events")
    return {
        "pages": int(info.pages),
        "first_offset": int(info.first_offset),
        "faults": int(info.faults),
        "written": int(info.written),
        "overflow": int(info.overflow),
        "exact": int(info.exact),
        "mode": int(info.mode),
        "snapshot": int(info.snapshot),
        "lost": int(info.lost),
    }


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
    _gcheck(rc, "page-guard restore", name)
    return True


def _guard_ids(fn: Callable[..., int], *args: object) -> list[int]:
    ids = ffi.new("int[]", GUARD_MAX_REGIONS)
    n = _gcheck(fn(*args, ids, GUARD_MAX_REGIONS), "list page-guard regions")
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
    _gcheck(lib.shardc_guard_counters(c), "read page-guard counters")
    return {
        "faults": int(c.faults),
        "chained": int(c.chained),
        "overflows": int(c.overflows),
        "notified": int(c.notified),
        "tracked": int(c.tracked),
        "leaked_saves": int(c.leaked_saves),
    }
