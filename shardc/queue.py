"""The task ring: a bounded MPMC queue of 64-bit items in shared memory.

``shm_queue`` dispatch uses it: the master pushes blocks of shard ids, the
forked workers pop them, run them, and call :meth:`TaskRing.done`.  The ring
lives in one shardc segment (memfd by default), mapped ``MAP_SHARED`` in the
master and in every worker; its layout and algorithm are documented at the
top of ``csrc/queue.c``.  In short::

    master                     shared segment                      worker k
    push(ids) ───────────────> cells: Vyukov seq + item  ─────────> pop(k, 64)
       ^                       records[k]: pid, claimed items,      run shards
       │  repair(k) <───────── state, heartbeat                 <── done(k)
       └── requeue what a dead worker had claimed but not done

*Waiting.* A pop on an empty ring (a push on a full one) spins for a short,
bounded time (``spin`` seconds, 10 us by default), then parks on a shared
futex; wakers only issue the wake syscall when someone sleeps.  Every wait
has a timeout; :meth:`TaskRing.close` wakes all of them.  cffi releases the
GIL around the C call, so a parked pop does not block the master's threads.

*Claims and repair.* Items a worker popped stay "claimed" in its record until
it calls :meth:`~TaskRing.done`.  If the worker dies (SIGKILL included, at any
instruction), the master reaps it and calls :meth:`~TaskRing.repair`, which
releases anything the dead worker still held in the ring and returns its
claimed-but-unfinished items for requeueing.  A worker calls
:meth:`~TaskRing.register` with its pid first.  Repair takes the master's
word that the worker is dead (it has reaped it) and never probes the pid:
once reaped, a pid can belong to an unrelated new process.  It only refuses
a record registered to the calling process itself, or, given the reaped pid,
to another process (a successor that already took the slot over).

*Close.* After :meth:`~TaskRing.close`, pushes raise :class:`QueueClosedError`
and pops return what is left, then raise :class:`QueueClosedError`.
``close()`` ends the ring for everybody; :meth:`~TaskRing.release` only
releases this process's mapping and fd.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _lowlevel as ll
from . import config
from .errors import ClosedError, InvalidArgumentError, QueueClosedError, UsageError

__all__ = ["TaskRing", "MAX_CLAIM"]

#: Most items one consumer may hold claimed (popped, not yet done()).
MAX_CLAIM: int = ll.QUEUE_MAX_CLAIM

_BACKINGS = {"memfd": ll.BACKING_MEMFD, "shm": ll.BACKING_SHM, "file": ll.BACKING_FILE}


def _timeout_ns(timeout: float | None) -> int:
    if timeout is None:
        return -1
    if timeout < 0:
        raise InvalidArgumentError(f"timeout must be >= 0 or None, got {timeout!r}")
    return int(timeout * 1e9)


class TaskRing:
    """A task ring in a shared segment; see the module docstring.

    Create it in the master with :meth:`create`; a forked worker can use the
    inherited object directly, and any process that received ``fd`` (fork or
    ``SCM_RIGHTS``) can :meth:`attach` with ``(fd, nbytes)``.
    """

    def __init__(self, fd: int, nbytes: int, owner: bool, init: tuple[int, int] | None = None) -> None:
        self._map: ll.Mapping | None = None
        self._fd = fd
        self._nbytes = nbytes
        self._owner = owner
        mapping = ll.map_segment(fd, 0, nbytes, ll.MAP_WRITE, "task ring")
        mem = ll.ffi.cast("void *", mapping.addr)
        if init is not None:
            ll.queue_init(mem, nbytes, init[0], init[1])
        else:
            ll.queue_check(mem, nbytes)
        self._map = mapping
        self._mem = mem
        # Preallocated output buffers: pop/repair fill them through a cffi
        # pointer, so the hot path allocates only the returned copy.
        self._out = np.empty(MAX_CLAIM, dtype=np.uint64)
        self._out_ptr = ll.ffi.from_buffer("uint64_t[]", self._out)
        self._pid = os.getpid()
        st = ll.queue_stats(self._mem)
        self._capacity = st["capacity"]
        self._max_consumers = st["max_consumers"]

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, capacity: int = 1024, max_consumers: int = 8, backing: str = "memfd") -> TaskRing:
        """Create a segment holding a fresh ring.

        Args:
            capacity: number of cells, a power of two.
            max_consumers: number of consumer records (worker slots).
            backing: ``"memfd"`` (``"shm"`` where there is no memfd), ``"shm"``
                or ``"file"`` (see ``shardc.segment``).

        Raises:
            InvalidArgumentError: bad capacity, consumer count or backing.
            SegmentError: the segment could not be created or mapped.
        """
        if backing not in _BACKINGS:
            raise InvalidArgumentError(f"backing must be one of {', '.join(_BACKINGS)}, got {backing!r}")
        if backing == "memfd" and (
            not ll.seg_backing_supported(ll.BACKING_MEMFD) or config.get_bool("SHARDC_PORTABLE")
        ):
            backing = "shm"  # macOS (and portable mode): no memfd; an unlinked POSIX shm object instead
        nbytes = ll.queue_bytes(capacity, max_consumers)
        if backing == "shm":
            name = f"/shardc-q-{os.getpid()}-{id(object()) & 0xFFFFFF:x}"
        elif backing == "file":
            name = os.path.join(config.get_str("SHARDC_TMPDIR"), f"shardc-q-{os.getpid()}-{time.monotonic_ns():x}")
        else:
            name = "shardc-taskring"
        fd = ll.seg_create(_BACKINGS[backing], name, nbytes, False)
        try:
            return cls(fd, nbytes, owner=True, init=(capacity, max_consumers))
        except BaseException:
            ll.seg_close_fd(fd)
            raise

    @classmethod
    def attach(cls, fd: int, nbytes: int) -> TaskRing:
        """Map an existing ring from an fd received by fork or ``SCM_RIGHTS``.

        The fd is duplicated: the caller keeps ownership of the one it passed.
        """
        own = os.dup(fd)
        try:
            return cls(own, nbytes, owner=False)
        except BaseException:
            os.close(own)
            raise

    @property
    def fd(self) -> int:
        """The segment's file descriptor (pass it with ``nbytes`` to :meth:`attach`)."""
        return self._fd

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_consumers(self) -> int:
        return self._max_consumers

    @property
    def released(self) -> bool:
        return self._map is None

    def _check(self) -> Any:
        if self._map is None:
            raise ClosedError("task ring: used after release()")
        return self._mem

    def close(self) -> None:
        """Close the ring for every process: wake all waiters; further pushes
        raise, pops drain what is left and then raise. Idempotent."""
        ll.queue_close(self._check())

    def reset(self) -> None:
        """Lay a fresh ring (empty, open, no records) over this one's memory,
        with the same capacity and consumers: the creator reuses it for a new
        round of work without a new segment, and processes that mapped it keep
        their mapping.

        Only while no other process is inside the ring (pushing, popping or
        holding claims): whatever they held is forgotten.  shardc's master
        resets the pool's ring once every worker has left the previous call.

        Raises:
            UsageError: called in a process that did not create the ring.
        """
        mem = self._check()
        if not self._owner or os.getpid() != self._pid:
            raise UsageError("task ring: only the process that created it may reset it")
        ll.queue_init(mem, self._nbytes, self._capacity, self._max_consumers)

    def release(self) -> None:
        """Unmap the ring and close the fd in this process. Idempotent."""
        if self._map is None:
            return
        self._map = None  # unmapped by the Mapping's finalizer
        self._mem = None
        self._out_ptr = None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> TaskRing:
        return self

    def __exit__(self, *exc: object) -> None:
        # The creator ends the ring for everybody; an attached process only
        # lets go of its own view.  A forked child never closes its parent's.
        if self._map is not None and self._owner and os.getpid() == self._pid:
            self.close()
        self.release()

    def __del__(self) -> None:  # last net: never close the ring from here
        try:
            if getattr(self, "_map", None) is not None:
                self.release()
        except Exception:
            pass

    def __repr__(self) -> str:
        if self._map is None:
            return "<TaskRing released>"
        st = self.stats()
        return (
            f"<TaskRing capacity={st['capacity']} size={st['size']} consumers="
            f"{st['max_consumers']}{' closed' if st['closed'] else ''}>"
        )

    # ------------------------------------------------------------ producer

    def push(self, items: Iterable[int] | np.ndarray, timeout: float | None = None) -> int:
        """Push items (waiting for space while the ring is full).

        Args:
            items: a uint64 NumPy array or any iterable of ints in [0, 2**64).
            timeout: seconds to wait for space in total; None waits forever, 0
                pushes only what fits now.

        Returns:
            The number of items pushed: ``len(items)`` unless the time ran out
            (then possibly fewer, 0 if none fitted).

        Raises:
            QueueClosedError: the ring was closed before anything was pushed.
        """
        mem = self._check()
        arr = items if isinstance(items, np.ndarray) else np.fromiter(items, dtype=np.uint64)
        if arr.dtype != np.uint64 or not arr.flags.c_contiguous:
            if arr.size and (arr.dtype.kind not in "ui" or (arr.dtype.kind == "i" and arr.min() < 0)):
                raise InvalidArgumentError("task ring items must be non-negative integers")
            arr = np.ascontiguousarray(arr, dtype=np.uint64)
        n = int(arr.size)
        if n == 0:
            return 0
        tns = _timeout_ns(timeout)
        deadline = time.monotonic_ns() + tns if tns >= 0 else -1
        ptr = ll.ffi.from_buffer("uint64_t[]", arr)
        done = 0
        while True:
            try:
                rc = ll.queue_push(mem, ptr + done, n - done, tns)
            except QueueClosedError:
                if done:  # closed part-way: report what did go in
                    return done
                raise
            if rc != ll.QUEUE_EINTR:
                if rc > 0:
                    done += rc
                if rc == 0 or done == n:
                    return done
            # Interrupted by a signal (handlers have run) or partially done
            # while time is left: continue with the remaining time.
            if deadline >= 0:
                tns = max(0, deadline - time.monotonic_ns())

    # ------------------------------------------------------------ consumer

    def pop(self, consumer: int, max_items: int = MAX_CLAIM, timeout: float | None = None) -> np.ndarray:
        """Claim up to ``max_items`` items as consumer ``consumer``.

        Waits (spin, then park) until at least one item is there.  The items
        stay claimed by ``consumer`` until :meth:`done`.

        Returns:
            A new uint64 array with 1..max_items items, or an empty one when
            ``timeout`` (seconds; None = forever) ran out.

        Raises:
            QueueClosedError: the ring is closed and drained.
        """
        n = self.pop_into(consumer, self._out, max_items, timeout)
        return self._out[:n].copy()

    def pop_into(
        self, consumer: int, out: np.ndarray, max_items: int | None = None, timeout: float | None = None
    ) -> int:
        """Like :meth:`pop`, but fill ``out`` (a contiguous uint64 array) and
        return the count (0 on timeout).  The allocation-free hot path."""
        mem = self._check()
        if out is self._out:
            ptr = self._out_ptr
        else:
            if out.dtype != np.uint64 or not out.flags.c_contiguous:
                raise InvalidArgumentError("pop_into needs a C-contiguous uint64 array")
            ptr = ll.ffi.from_buffer("uint64_t[]", out, require_writable=True)
        cap = len(out)
        k = cap if max_items is None else min(max_items, cap)
        if k <= 0:
            raise InvalidArgumentError(f"max_items must be >= 1, got {max_items!r}")
        tns = _timeout_ns(timeout)
        rc = ll.queue_pop(mem, consumer, ptr, k, tns)
        if rc != ll.QUEUE_EINTR:
            return rc
        deadline = time.monotonic_ns() + tns if tns >= 0 else -1
        while rc == ll.QUEUE_EINTR:  # signal handlers ran (and did not raise)
            if deadline >= 0:
                tns = max(0, deadline - time.monotonic_ns())
            rc = ll.queue_pop(mem, consumer, ptr, k, tns)
        return rc

    def done(self, consumer: int) -> None:
        """Mark everything ``consumer`` popped as finished (no longer claimed)."""
        ll.queue_done(self._check(), consumer)

    def heartbeat(self, consumer: int) -> None:
        """Bump ``consumer``'s heartbeat (pop and done bump it too)."""
        ll.queue_heartbeat(self._check(), consumer)

    def register(self, consumer: int, pid: int | None = None) -> None:
        """Record the process that uses ``consumer`` (default: this one).

        Call it in the worker before its first pop, so that :meth:`repair`,
        given the pid the master reaped, can tell that worker's record from
        one a successor has registered since.

        Raises:
            SegmentError: (EBUSY) the record still holds another process's
                claims: repair it first.
        """
        ll.queue_register(self._check(), consumer, os.getpid() if pid is None else pid)

    # ------------------------------------------------------------ master

    def repair(self, consumer: int, pid: int | None = None) -> np.ndarray:
        """Recover the record of a consumer whose process is dead and reaped.

        Releases whatever the dead process still held in the ring and returns
        the items it had claimed but not finished (call :meth:`push` to
        requeue them).  Idempotent: a second call returns an empty array.

        Call it only after reaping the consumer's process (``waitpid``): its
        liveness is not probed, since the pid may be reused as soon as it is
        reaped.

        Args:
            consumer: the record (worker slot).
            pid: the pid the caller reaped; the record must be registered to
                it (or to nobody).  None: whoever registered it is gone.

        Raises:
            SegmentError: (EBUSY) the record is registered to this process, or
                to another process than ``pid``.
        """
        reaped = ll.QUEUE_ANY_PID if pid is None else int(pid)
        n = ll.queue_repair(self._check(), consumer, reaped, self._out_ptr, MAX_CLAIM)
        return self._out[:n].copy()

    def set_spin(self, seconds: float) -> None:
        """Set how long waits spin before parking, for every process using the
        ring (default 10 us; 0 parks at once).  Waking a parked process costs
        tens of microseconds, handing off to a spinning one under one."""
        ll.queue_set_spin(self._check(), int(seconds * 1e9))

    def size(self) -> int:
        """Items waiting in the ring (pushed, not yet popped)."""
        return self.stats()["size"]

    def stats(self) -> dict[str, int]:
        """capacity, max_consumers, pushed, popped, size, closed, parks, wakes,
        repaired, spin_ns."""
        return ll.queue_stats(self._check())

    def consumer_info(self, consumer: int) -> dict[str, object]:
        """pid, state, claimed, sleeping, heartbeat of one consumer record."""
        return ll.queue_consumer(self._check(), consumer)
