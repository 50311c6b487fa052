"""What ``shard_map`` returns: :class:`ShardResult` and failure records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import ShardcError


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

    def to_dict(self) -> dict[str, Any]:
        return {"shard_id": self.shard_id, "attempts": self.attempts, "error_type": self.error_type,
                "message": self.message, "traceback": self.traceback, "history": list(self.history)}

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
        pool_stats: the pool's state after the run.
    """

    def __init__(self, results: list[Any], failures: dict[int, ShardFailure], diagnostics: Any,
                 pool_stats: dict[str, Any], shards: Any) -> None:
        self.results = results
        self.failures = failures
        self.diagnostics = diagnostics
        self.pool_stats = pool_stats
        self.shards = shards

    @property
    def succeeded(self) -> bool:
        """True when no shard failed."""
        return not self.failures

    def values(self) -> list[Any]:
        """The results; raises if any shard failed (use ``results`` to see partial output)."""
        if self.failures:
            first = min(self.failures)
            raise ShardcError(f"{len(self.failures)} shard(s) failed (first: shard {first}: "
                              f"{self.failures[first].message}); see .failures")
        return self.results

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: Any) -> Any:
        return self.results[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.results)

    def report(self, level: str = "summary") -> Any:
        from .diagnostics import report
        return report(self, level=level)

    def plot(self, path: Any = None, **kwargs: Any) -> Any:
        """Draw the run's timeline (see :func:`shardc.diagnostics.plot_timeline`)."""
        from .diagnostics import plot_timeline
        return plot_timeline(self, path=path, **kwargs)

    def __repr__(self) -> str:
        d = self.diagnostics
        wall = getattr(d, "wall_seconds", None) if d is not None else None
        extra = f" in {wall:.3f}s" if wall is not None else ""
        return (f"<ShardResult {len(self.results)} shards, {len(self.failures)} failed{extra}>")
