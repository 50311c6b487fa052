"""shardc's exceptions: one flat hierarchy under :class:`ShardcError`.

Domain errors also inherit the builtin that fits, so ``except ValueError``
keeps working for callers who do not know shardc.  OS failures stay
``OSError`` subclasses (with ``errno`` set).  Errors that happened in a worker
carry the worker's traceback as ``__cause__`` (a :class:`RemoteTraceback`).

=============================  ===========================================
class                          raised when
=============================  ===========================================
ShardcError                    base of everything below
ShardSpecError                 bad ``shards()``/``shards_list()`` input
InvalidArgumentError           a bad argument or ``SHARDC_*`` value
InvalidTypeError               an argument of a type shardc cannot use
ShardIndexError                a shard index out of range (an IndexError)
BindingError                   ``fun``'s signature does not accept an input
UnpicklableFunctionError       ``fun`` (or what it captured) cannot be sent
ClosedError                    use of a closed buffer, segment or pool
UsageError                     an API used where it cannot work (wrong
                               thread, nested scopes)
NativeModuleError              the native module is missing or stale (an
                               ImportError, raised by ``import shardc``)
MissingDependencyError         an optional package a feature needs is not
                               installed (an ImportError; e.g. matplotlib)
TableSchemaError               a shard's frame does not match the table's
                               schema (a TypeError; never retried)
ShardcOSError                  an OS call failed (an OSError, ``errno``
                               set): processes, memory sampling, heap
SegmentError                   ... on a shared-memory segment
QueueError                     ... on the task ring (a SegmentError: the
                               ring lives in one)
GuardError                     ... in the page guards (mprotect, region
                               table)
QueueClosedError               pop/push on a closed, drained task ring
BorrowedInputWriteError        a worker wrote into a borrowed input (deny)
NativeKernelError              a native (C) kernel returned a non-zero
                               status for a shard
WorkerSetupError               a worker failed to start, or to set up a
                               call (load ``fun``, map the inputs)
WorkerCrashedError             a worker died (signal or exit) in a shard
                               (also a BrokenProcessPool, for Executor users)
ExecutorBrokenError            an Executor's engine stopped for good
ShardTimeoutError              a shard ran past ``timeout``
CallSetupTimeoutError          a worker hung while setting up a call
WorkerMemoryError              a worker was killed for exceeding mem_cap
ShardMapError                  shard_map finished with failed shards
ReduceError                    shard_reduce finished with failed groups (a
                               ShardMapError)
ClusterError                   a ``cluster=`` run could not go on: a node
                               agent refused (version/build mismatch), the
                               scheduler was lost, out buffers could not
                               be merged (two nodes wrote the same bytes
                               differently)
=============================  ===========================================

Which class a failed C call raises is decided by the primitive it came from
(``shardc._lowlevel._check``): ``seg.c`` -> :class:`SegmentError`, ``queue.c``
-> :class:`QueueError`, ``guard.c`` -> :class:`GuardError`, ``proc.c`` (process
setup, memory sampling, heap policy) -> :class:`ShardcOSError`.
"""

from __future__ import annotations

import errno
import signal
from concurrent.futures.process import BrokenProcessPool  # ~7 ms at import: see WorkerCrashedError
from typing import Any, ClassVar


class ShardcError(Exception):
    """Base class of every error raised by shardc."""


class ShardSpecError(ShardcError, ValueError):
    """Invalid shard specification (n, block_size, strategy, index lists)."""


class InvalidArgumentError(ShardcError, ValueError):
    """An argument (or a ``SHARDC_*`` variable) has a value shardc cannot use; the message names it."""


class InvalidTypeError(ShardcError, TypeError):
    """An argument has a type shardc cannot use (e.g. a dtype holding Python objects)."""


class ShardIndexError(ShardcError, IndexError):
    """A shard index is out of range for its descriptor."""


class BindingError(ShardcError, TypeError):
    """``fun`` cannot accept the borrowed inputs / out buffers by name."""


class UnpicklableFunctionError(ShardcError, TypeError):
    """``fun`` or something it captures cannot be pickled for the workers."""


class ClosedError(ShardcError, ValueError):
    """An operation on a buffer, segment or pool that was already closed."""


class UsageError(ShardcError, RuntimeError):
    """An API was used where it cannot work: outside the main thread, or nested
    where nesting is not supported."""


class NativeModuleError(ShardcError, ImportError):
    """``shardc._native`` is missing, or was built from other C sources than the
    package's; the message says how to rebuild."""


# Hints for errno values whose usual cause is a known OS limit.  Which ones
# apply depends on the primitive: ENOSPC from a segment means a full
# filesystem, from the page guards a full region table.
_COMMON_HINTS = {
    errno.ENOMEM: "out of memory or out of memory mappings; if many pages were write-protected "
    "separately, raise vm.max_map_count (sysctl -w vm.max_map_count=262144)",
    errno.EMFILE: "too many open files in this process; raise the limit with `ulimit -n`",
    errno.ENFILE: "too many open files system-wide",
}


class MissingDependencyError(ShardcError, ImportError):
    """An optional package a feature needs (e.g. matplotlib for plots) is not
    installed; the message says what to install."""


class TableSchemaError(ShardcError, TypeError):
    """A frame a shard produced does not match the table's schema (the
    message names the shard, the column and the mismatch); never retried."""


class ShardcOSError(ShardcError, OSError):
    """An OS call made by shardc's C layer failed.

    ``errno`` is set; the message names the operation (and the object, where
    there is one) and a hint where the usual cause is a known OS limit.  Raised
    as is for process setup, memory sampling and the heap policy (``proc.c``);
    the subclasses below say which other primitive failed.

    Class attributes (read by ``shardc._lowlevel._check`` to build messages):
        subject: what an object name is in a message ("segment 'x'").
        hints: errno -> hint for this primitive.
    """

    subject: ClassVar[str] = ""
    hints: ClassVar[dict[int, str]] = _COMMON_HINTS


class SegmentError(ShardcOSError):
    """An OS call on a shared-memory segment failed (``seg.c``).

    ``errno`` is set; the message names the segment and the operation, and a
    hint where one applies (e.g. ENOSPC on /dev/shm).
    """

    subject = "segment"
    hints = {
        **_COMMON_HINTS,
        errno.ENOSPC: "the backing filesystem is full; on a small /dev/shm (e.g. a container's "
        "64 MiB) use backing='file' or set SHARDC_BACKING=file",
        errno.EACCES: "permission denied; named segments are created with mode 0600 by their owner",
        errno.EEXIST: "a segment with this name already exists; pick another name or unlink it",
        errno.ENOENT: "no segment with this name exists (was it unlinked by its owner?)",
    }


class QueueError(SegmentError):
    """A task-ring operation failed (``queue.c``): a bad consumer, a full claim
    record (ENOBUFS), repair of a live consumer or register over claims (EBUSY).

    It is a :class:`SegmentError` because the ring is a protocol over one
    shared segment, and code written before the ring had its own class
    catches ``SegmentError``.  A closed ring is :class:`QueueClosedError`.
    """

    subject = "task ring"
    hints = _COMMON_HINTS  # not the segment's: ENOENT/ENOSPC mean other things here


class GuardError(ShardcOSError):
    """A page-guard operation failed (``guard.c``): mprotect/mmap on a borrowed
    input (ENOMEM: see the ``vm.max_map_count`` hint), a full region table
    (ENOSPC), an overlapping region (EEXIST), or the signal handlers."""

    subject = "borrowed input"
    hints = {
        **_COMMON_HINTS,
        errno.ENOSPC: "the page-guard region table is full (shardc._lowlevel.GUARD_MAX_REGIONS "
        "borrowed inputs per process); borrow fewer, larger inputs",
        errno.EEXIST: "the range overlaps a borrowed input that is already protected",
    }


class QueueClosedError(ShardcError, EOFError):
    """The task ring was closed and holds no more items."""


class BorrowedInputWriteError(ShardcError):
    """A shard wrote into a borrowed input under ``cow="deny"``.

    Attributes:
        input_name: name of the borrowed input (the key in ``borrow=``).
        shard_id: id of the shard that wrote, or None if unknown.
        offset: byte offset of the first written byte within the input.
        index: element index (tuple) of that byte, or None.
    """

    def __init__(
        self,
        message: str,
        input_name: str | None = None,
        shard_id: int | None = None,
        offset: int | None = None,
        index: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(message)
        self.input_name = input_name
        self.shard_id = shard_id
        self.offset = offset
        self.index = index

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.input_name, self.shard_id, self.offset, self.index))


class NativeKernelError(ShardcError, RuntimeError):
    """A native kernel (``register_kernel(name, native=...)``) returned a
    non-zero status for a shard.

    Attributes:
        kernel: the kernel's name.
        shard_id: the shard it failed.
        code: the kernel's return value.
    """

    def __init__(self, message: str, kernel: str | None = None, shard_id: int | None = None, code: int = 0) -> None:
        super().__init__(message)
        self.kernel = kernel
        self.shard_id = shard_id
        self.code = code

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.kernel, self.shard_id, self.code))


def signal_label(code: int) -> str:
    """``-9`` -> ``"SIGKILL(-9)"``; ``3`` -> ``"exit(3)"``."""
    if code < 0:
        try:
            return f"{signal.Signals(-code).name}({code})"
        except ValueError:
            return f"signal({code})"
    return f"exit({code})"


class WorkerSetupError(ShardcError, RuntimeError):
    """A worker failed to start (its ``packages=``/``init_expr=`` failed, or it
    died on the way), or failed to set up a call: unpickling ``fun``, mapping
    the borrowed inputs and out buffers.  The worker's error is the message,
    and its traceback the ``__cause__`` where it sent one."""


class WorkerCrashedError(ShardcError, BrokenProcessPool):
    """The worker running a shard (or an Executor task) died.

    A ``RuntimeError``, and a :class:`concurrent.futures.process.BrokenProcessPool`:
    code written for ``ProcessPoolExecutor`` catches a worker death as
    ``BrokenProcessPool``, and keeps doing so on :class:`shardc.Executor`
    (whose pool, unlike the standard one, stays usable: only the task that
    was running fails, after its retries).

    Attributes:
        exitcode: negative signal number or positive exit status.
        pid: the dead worker's pid.
    """

    def __init__(self, message: str, exitcode: int | None = None, pid: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.pid = pid

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.exitcode, self.pid))


class ExecutorBrokenError(ShardcError, BrokenProcessPool):
    """A :class:`shardc.Executor` can run nothing more: its engine stopped on
    an error it cannot recover from (e.g. workers that die while starting,
    every time).  Pending futures fail with it; ``submit`` raises it."""


class ShardTimeoutError(ShardcError, TimeoutError):
    """A shard ran longer than ``timeout`` seconds; its worker was killed."""


class CallSetupTimeoutError(ShardcError, TimeoutError):
    """A worker did not finish setting up a call (loading ``fun``, mapping the
    inputs) within ``SHARDC_SETUP_TIMEOUT`` seconds; it was killed."""


class WorkerMemoryError(ShardcError, MemoryError):
    """A worker was killed mid-shard for exceeding its memory cap."""


class ShardMapError(ShardcError, RuntimeError):
    """``shard_map`` finished but some shards failed permanently.

    Attributes:
        result: the full :class:`~shardc.ShardResult` (successful results,
            failure records, diagnostics).
    """

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


class ReduceError(ShardMapError):
    """``shard_reduce`` finished but some groups failed (or ``combine`` raised
    on the master); ``result`` is the :class:`~shardc.ReduceResult`."""


class ClusterError(ShardcError, RuntimeError):
    """A ``shard_map(..., cluster=...)`` run could not go on (see the message:
    it names the node, the buffer and offset, or the scheduler)."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


__all__ = [
    "ShardcError",
    "ShardSpecError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "ShardIndexError",
    "BindingError",
    "UnpicklableFunctionError",
    "ClosedError",
    "UsageError",
    "NativeModuleError",
    "MissingDependencyError",
    "ShardcOSError",
    "SegmentError",
    "QueueError",
    "GuardError",
    "QueueClosedError",
    "BorrowedInputWriteError",
    "WorkerSetupError",
    "WorkerCrashedError",
    "ExecutorBrokenError",
    "ShardTimeoutError",
    "CallSetupTimeoutError",
    "WorkerMemoryError",
    "ShardMapError",
    "ReduceError",
    "ClusterError",
    "RemoteTraceback",
    "signal_label",
    "NativeKernelError",
]
