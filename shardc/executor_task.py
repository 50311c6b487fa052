"""The task side of :class:`shardc.Executor`: the open call's function,
run in a worker (:func:`run_task`), and the exception a failed task's future
gets (:func:`task_error`)."""

from __future__ import annotations

from typing import Any

from .errors import ShardcError, WorkerCrashedError, WorkerMemoryError
from .result import ShardFailure

# task kinds: fn(*args, **kwargs), [fn(*a) for a in args], [fn(a) for a in args] (map over one iterable)
_CALL, _CHUNK, _CHUNK1 = 0, 1, 2


def run_task(task: Any, **borrow: Any) -> Any:
    """The open call's function, in a worker: unpickle one task and run it."""
    if task is None:
        raise ShardcError("shardc internal error: a task arrived without its data")
    kind, fn, args, kwargs = task.load()
    try:
        if kind == _CHUNK1:
            if borrow:
                return [fn(a, **borrow) for a in args]
            return [fn(a) for a in args]
        if kind == _CHUNK:
            kw = {**borrow, **kwargs} if kwargs else borrow
            if kw:
                return [fn(*a, **kw) for a in args]
            return [fn(*a) for a in args]
        if borrow:
            kwargs = {**borrow, **kwargs}
        return fn(*args, **kwargs)
    except Exception:
        raise
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: the future raises it, as with ProcessPoolExecutor
        raise TaskBaseException(exc) from exc


class TaskBaseException(ShardcError):
    """Carries a ``BaseException`` that is not an ``Exception`` (``SystemExit``,
    ``KeyboardInterrupt``) raised by a task from the worker (where the shard
    executor would turn it into a ``RuntimeError``) to the task's future,
    which gets the original."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"task raised {type(original).__name__}({original})")
        self.original = original

    def __reduce__(self) -> Any:
        return (type(self), (self.original,))


def task_error(name: str, fail: ShardFailure) -> BaseException:
    """The exception a failed task's future gets."""
    exc = fail.exception
    if isinstance(exc, TaskBaseException):
        orig = exc.original
        orig.__cause__ = exc.__cause__  # the worker's traceback
        return orig
    kind = fail.error_type.rsplit(".", 1)[-1]
    if kind in ("WorkerCrashedError", "WorkerMemoryError"):
        # The supervisor's record names the slot ("shard 17"): name the task.
        # (Decided by the record's type name, not by the rebuilt exception.)
        msg = (
            f"task {name}: its worker died on each of {fail.attempts} attempt(s) "
            f"(max_retries={fail.attempts - 1}); last: {fail.message}"
        )
        if kind == "WorkerCrashedError":
            return WorkerCrashedError(msg, exitcode=getattr(exc, "exitcode", None), pid=getattr(exc, "pid", None))
        err = WorkerMemoryError(msg)
        err.__cause__ = exc
        return err
    if exc is None:
        return ShardcError(f"task {name} failed: {fail.error_type}: {fail.message}")
    return exc
