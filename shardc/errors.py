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
InvalidArgumentError           a bad argument value (sizes, modes, ...)
BindingError                   ``fun``'s signature does not accept an input
UnpicklableFunctionError       ``fun`` (or what it captured) cannot be sent
ClosedError                    use of a closed buffer, segment or pool
SegmentError                   an OS call on a segment failed (an OSError)
QueueClosedError               pop/push on a closed, drained task ring
BorrowedInputWriteError        a worker wrote into a borrowed input (deny)
WorkerCrashedError             a worker died (signal or exit) in a shard
ShardTimeoutError              a shard ran past ``timeout``
CallSetupTimeoutError          a worker hung while setting up a call
WorkerMemoryError              a worker was killed for exceeding mem_cap
ShardMapError                  shard_map finished with failed shards
=============================  ===========================================
"""

from __future__ import annotations

import signal
from typing import Any


class ShardcError(Exception):
    """Base class of every error raised by shardc."""


class ShardSpecError(ShardcError, ValueError):
    """Invalid shard specification (n, block_size, strategy, index lists)."""


class InvalidArgumentError(ShardcError, ValueError):
    """An argument has a value shardc cannot use; the message names it."""


class BindingError(ShardcError, TypeError):
    """``fun`` cannot accept the borrowed inputs / out buffers by name."""


class UnpicklableFunctionError(ShardcError, TypeError):
    """``fun`` or something it captures cannot be pickled for the workers."""


class ClosedError(ShardcError, ValueError):
    """An operation on a buffer, segment or pool that was already closed."""


class SegmentError(ShardcError, OSError):
    """An OS call on a shared-memory segment failed.

    ``errno`` is set; the message names the segment and the operation, and a
    hint where one applies (e.g. ENOSPC on /dev/shm).
    """


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

    def __init__(self, message: str, input_name: str | None = None, shard_id: int | None = None,
                 offset: int | None = None, index: tuple[int, ...] | None = None) -> None:
        super().__init__(message)
        self.input_name = input_name
        self.shard_id = shard_id
        self.offset = offset
        self.index = index

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.input_name, self.shard_id, self.offset, self.index))


def signal_label(code: int) -> str:
    """``-9`` -> ``"SIGKILL(-9)"``; ``3`` -> ``"exit(3)"``."""
    if code < 0:
        try:
            return f"{signal.Signals(-code).name}({code})"
        except ValueError:
            return f"signal({code})"
    return f"exit({code})"


class WorkerCrashedError(ShardcError, RuntimeError):
    """The worker running a shard died.

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


class ShardTimeoutError(ShardcError, TimeoutError):
    """A shard ran longer than ``timeout`` seconds; its worker was killed."""


class CallSetupTimeoutError(ShardcError, TimeoutError):
    """A worker did not finish setting up a call (loading ``fun``, mapping the
    inputs) within ``SHARDC_SETUP_TIMEOUT`` seconds; it was killed."""


class WorkerSetupError(ShardcError, RuntimeError):
    """A worker could not start, or could not set up a call (e.g. ``fun``
    failed to unpickle there, or a borrowed object failed to load); the
    worker's exception is the ``__cause__``."""


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


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


__all__ = [
    "ShardcError", "ShardSpecError", "InvalidArgumentError", "BindingError",
    "UnpicklableFunctionError", "ClosedError", "SegmentError", "QueueClosedError",
    "BorrowedInputWriteError", "WorkerCrashedError", "ShardTimeoutError", "CallSetupTimeoutError",
    "WorkerMemoryError", "WorkerSetupError", "ShardMapError", "RemoteTraceback", "signal_label",
]
