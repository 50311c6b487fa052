"""What ``shard_map`` returns: :class:`ShardResult` and failure records.

A result is plain data: the values, the failure records, the run's
:class:`~shardc.diagnostics.Diagnostics` (itself plain) and a snapshot of
the pool's state as dicts and lists.  It holds no reference to the pool,
its workers, ``fun`` or anything ``fun`` captured, so keeping a result
keeps none of them alive, and ``pickle.dumps(result)`` works: save it, or
send it to another process and read its reports there.  A failure whose
exception object does not pickle (or would not unpickle) travels without
it, keeping its type, message and traceback text.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .diagnostics import plot_timeline, report
from .errors import RemoteTraceback, ShardMapError


def _plain(obj: Any) -> Any:
    """A copy of ``obj`` made of dicts, lists, str, int, float, bool and None
    (NumPy scalars become Python numbers; anything else its repr)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int)) else repr(k)): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v) for v in obj]
    return repr(obj)


def _exception_blob(exc: BaseException | None) -> bytes | None:
    """``exc`` pickled, if it pickles and unpickles here; else None."""
    if exc is None:
        return None
    try:
        blob = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 - any failure means: travel without the object
        return None
    return blob


@dataclass
class ShardFailure:
    """A shard that failed permanently.

    Attributes:
        shard_id: the shard's id.
        attempts: how many times it ran (1 + retries).
        error_type: qualified name of the last exception
            (e.g. ``shardc.errors.WorkerCrashedError``).
        message: its message.
        traceback: the worker's formatted traceback ("" for crashes).
        exception: the exception object, with the remote traceback as
            ``__cause__`` (None if it could not be rebuilt).
        history: one short line per attempt.
    """

    shard_id: int
    attempts: int
    error_type: str
    message: str
    traceback: str = ""
    exception: BaseException | None = None
    history: list[str] = field(default_factory=list)

    def __getstate__(self) -> dict[str, Any]:
        # The exception travels as its own pickle so that one that cannot be
        # rebuilt on the other side (its class is missing there, or its
        # __init__ wants other arguments) drops only itself, not the result.
        state = dict(self.__dict__)
        state["exception"] = _exception_blob(self.exception)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        blob = state.get("exception")
        exc = None
        if blob is not None:
            try:
                exc = pickle.loads(blob)
            except Exception:  # noqa: BLE001 - keep type, message and traceback text
                exc = None
        if exc is not None and exc.__cause__ is None and state.get("traceback"):
            exc.__cause__ = RemoteTraceback(state["traceback"])  # pickle drops __cause__: put it back
        self.__dict__.update(state)
        self.exception = exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "attempts": self.attempts,
            "error_type": self.error_type,
            "message": self.message,
            "traceback": self.traceback,
            "history": list(self.history),
        }

    def __repr__(self) -> str:
        return f"<ShardFailure shard={self.shard_id} attempts={self.attempts} {self.error_type}: {self.message}>"


class FailedShard:
    """Placeholder in ``results`` for a failed shard (never confused with None)."""

    __slots__ = ("failure",)

    def __init__(self, failure: ShardFailure) -> None:
        self.failure = failure

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<FailedShard {self.failure.shard_id}: {self.failure.error_type.rsplit('.', 1)[-1]}>"


class ShardResult:
    """The outcome of a ``shard_map`` call.

    Attributes:
        results: one entry per shard, in shard order: the value ``fun``
            returned (None in ``shm_queue`` mode, which gathers nothing), or a
            :class:`FailedShard` for a shard that failed permanently.
        failures: shard id -> :class:`ShardFailure`.
        diagnostics: what the run measured (see ``shardc.diagnostics``).
        pool_stats: the pool's state after the run, as plain dicts and lists
            (a copy: the result keeps no reference to the pool).
        shards: the shard descriptor of the call.
        table: with ``dispatch_opts={"auto_table": True}``, the rows the
            shards returned: a ``shardc.tables.TableHandle``, or a
            ``pyarrow.Table`` when materialized (None otherwise).
    """

    def __init__(
        self,
        results: list[Any] | int,
        failures: dict[int, ShardFailure],
        diagnostics: Any,
        pool_stats: dict[str, Any],
        shards: Any,
    ) -> None:
        # An int n stands for n Nones, made into the list when first read
        # (an shm_queue call of 20M shards gathers nothing: no 160 MB list).
        self._results = results
        self.failures = failures
        self.diagnostics = diagnostics
        self._pool_stats = pool_stats  # made plain when first read (the pool's events: its whole life)
        self._plain_stats = False
        self.shards = shards
        self.table: Any = None

    @property
    def results(self) -> list[Any]:
        if isinstance(self._results, int):
            self._results = [None] * self._results
        return self._results

    @results.setter
    def results(self, value: list[Any]) -> None:
        self._results = value

    @property
    def pool_stats(self) -> dict[str, Any]:
        if not self._plain_stats:
            self._pool_stats, self._plain_stats = _plain(self._pool_stats), True
        return self._pool_stats

    @property
    def succeeded(self) -> bool:
        """True when no shard failed."""
        return not self.failures

    def values(self) -> list[Any]:
        """The results; raises if any shard failed (use ``results`` to see partial output)."""
        if self.failures:
            first = min(self.failures)
            raise ShardMapError(
                f"{len(self.failures)} shard(s) failed (first: shard {first}: "
                f"{self.failures[first].message}); see .failures",
                self,
            )
        return self.results

    def __len__(self) -> int:
        return self._results if isinstance(self._results, int) else len(self._results)

    def __getitem__(self, i: Any) -> Any:
        return self.results[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.results)

    def report(self, level: str = "summary") -> Any:
        """The run's report (see :func:`shardc.diagnostics.report`)."""
        return report(self, level=level)

    def plot(self, path: Any = None, **kwargs: Any) -> Any:
        """Draw the run's timeline (see :func:`shardc.diagnostics.plot_timeline`)."""
        return plot_timeline(self, path=path, **kwargs)

    def __repr__(self) -> str:
        d = self.diagnostics
        wall = getattr(d, "wall_seconds", None) if d is not None else None
        extra = f" in {wall:.3f}s" if wall is not None else ""
        return f"<ShardResult {len(self)} shards, {len(self.failures)} failed{extra}>"
