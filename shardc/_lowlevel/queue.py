"""The task ring (csrc/queue.c): the shared-memory MPMC ring with futex park/wake and crash repair."""

from __future__ import annotations

import errno as _errno
import os

from .. import config
from ..errors import (
    InvalidArgumentError,
    QueueClosedError,
    QueueError,
)
from .core import _check, ffi, lib

# --------------------------------------------------------------------------
# task ring (csrc/queue.c)
# --------------------------------------------------------------------------
#
# The ring is addressed by a ``void *`` to its (mapped) memory; its layout is
# private to queue.c.  push/pop keep the C semantics so the hot path stays
# one C call: they return a count, ``0`` on timeout, ``QUEUE_EINTR`` when a
# signal handler must run (the caller retries), and raise on the rest.

QUEUE_MAX_CLAIM: int = lib.SHARDC_QUEUE_MAX_CLAIM
QUEUE_MAX_CONSUMERS: int = lib.SHARDC_QUEUE_MAX_CONSUMERS
QUEUE_MAX_CAPACITY: int = lib.SHARDC_QUEUE_MAX_CAPACITY
QUEUE_STATES = {lib.SHARDC_QUEUE_IDLE: "idle", lib.SHARDC_QUEUE_CLAIMING: "claiming", lib.SHARDC_QUEUE_OWNED: "owned"}
QUEUE_EINTR = -_errno.EINTR
_Q_ETIMEDOUT = -_errno.ETIMEDOUT
_Q_EPIPE = -_errno.EPIPE
_Q_ENOBUFS = -_errno.ENOBUFS


def queue_set_portable_wait(on: bool) -> bool:
    """Park this process's ring waits with the polling wait (as where there
    is no futex or ulock) instead of the native one; workers forked later
    inherit the setting.  Wakes are still sent, so processes that disagree
    never miss one.  Returns the previous setting."""
    return bool(lib.shardc_queue_set_portable_wait(1 if on else 0))


# Portable mode (SHARDC_PORTABLE=1) takes the polling wait, as macOS before
# 14.4 without ulock would: one switch, no rebuild (csrc/sys.h).
queue_set_portable_wait(config.get_bool("SHARDC_PORTABLE"))


def _qcheck(rc: int, op: str, consumer: int | None = None) -> int:
    """Ring-specific codes first (closed, claim record full), then :func:`_check`."""
    if rc >= 0:
        return rc
    if rc == _Q_EPIPE:
        raise QueueClosedError(f"task ring {op}: the ring is closed" + (" and drained" if op == "pop" else ""))
    if rc == _Q_ENOBUFS and consumer is not None:
        raise QueueError(
            _errno.ENOBUFS,
            f"task ring {op} for consumer {consumer}: it holds "
            f"{QUEUE_MAX_CLAIM} claimed items (the maximum); call done() first",
        )
    return _check(rc, f"task ring {op}" + (f" (consumer {consumer})" if consumer is not None else ""), error=QueueError)


def queue_bytes(capacity: int, max_consumers: int) -> int:
    """Bytes a ring of ``capacity`` cells (a power of two) and ``max_consumers`` needs."""
    n = int(lib.shardc_queue_bytes(capacity, max_consumers))
    if n == 0:
        raise InvalidArgumentError(
            f"task ring: capacity must be a power of two in [2, {QUEUE_MAX_CAPACITY}] and "
            f"max_consumers in [1, {QUEUE_MAX_CONSUMERS}]; got capacity={capacity}, "
            f"max_consumers={max_consumers}"
        )
    return n


def queue_init(mem: object, size: int, capacity: int, max_consumers: int) -> None:
    _qcheck(lib.shardc_queue_init(mem, size, capacity, max_consumers), "init")


def queue_check(mem: object, size: int) -> None:
    """Raise unless ``mem`` holds an initialized ring that fits in ``size`` bytes."""
    rc = lib.shardc_queue_check(mem, size)
    if rc == -_errno.EINVAL:
        raise InvalidArgumentError("task ring attach: the segment holds no initialized task ring")
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
        raise QueueError(
            _errno.EBUSY, f"task ring register: consumer {consumer} still holds claimed items; repair() it first"
        )
    _qcheck(rc, "register", consumer)


QUEUE_ANY_PID: int = lib.SHARDC_QUEUE_ANY_PID


def queue_repair(mem: object, consumer: int, reaped_pid: int, out: object, max_items: int) -> int:
    """Hand back the unfinished items of a consumer whose process the caller
    reaped (``reaped_pid``, or ``QUEUE_ANY_PID``) into ``out``; returns the count."""
    rc = lib.shardc_queue_repair(mem, consumer, reaped_pid, out, max_items)
    if rc == -_errno.EBUSY:
        who = (
            "this process"
            if reaped_pid in (QUEUE_ANY_PID, os.getpid())
            else f"another process than the reaped pid {reaped_pid}"
        )
        raise QueueError(
            _errno.EBUSY,
            f"task ring repair: consumer {consumer} is registered to "
            f"{who}, which may be alive; repair only the record of a worker "
            "you killed and reaped",
        )
    return _qcheck(rc, "repair", consumer)


def queue_close(mem: object) -> None:
    _qcheck(lib.shardc_queue_close(mem), "close")


def queue_set_spin(mem: object, spin_ns: int) -> None:
    _qcheck(lib.shardc_queue_set_spin(mem, spin_ns), "set_spin")


_QUEUE_STATS_FIELDS = (
    "capacity",
    "max_consumers",
    "pushed",
    "popped",
    "size",
    "closed",
    "parks",
    "wakes",
    "repaired",
    "spin_ns",
)


def queue_stats(mem: object) -> dict[str, int]:
    st = ffi.new("shardc_queue_stats_t *")
    _qcheck(lib.shardc_queue_stats(mem, st), "stats")
    return {f: int(getattr(st, f)) for f in _QUEUE_STATS_FIELDS}


def queue_consumer(mem: object, consumer: int) -> dict[str, object]:
    """A consumer record: pid, state (idle/claiming/owned), claimed, sleeping, heartbeat."""
    ci = ffi.new("shardc_queue_consumer_t *")
    _qcheck(lib.shardc_queue_consumer(mem, consumer, ci), "consumer info", consumer)
    return {
        "pid": int(ci.pid),
        "state": QUEUE_STATES.get(int(ci.state), str(ci.state)),
        "claimed": int(ci.claimed),
        "sleeping": bool(ci.sleeping),
        "heartbeat": int(ci.heartbeat),
    }
