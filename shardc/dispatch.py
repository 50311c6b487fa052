"""The dispatcher interface: how a call's shards travel to workers.

A dispatcher owns its transport (per-worker sockets carrying chunks of ids in
``dispatch_rpc``, a shared-memory ring of blocks in ``dispatch_queue``) and
nothing else: the scheduler (``shardc.scheduler``) decides what runs next
and what a failure costs; the supervisor (``shardc.supervisor``) runs the one
event loop, watches time and memory, handles every death and is the one
place that replaces a worker.  The supervisor drives a dispatcher through
the operations below; a new front end (reductions, tables, an Executor, a
cluster agent) reuses scheduler + supervisor + a dispatcher unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple

from .status import RowSnapshot


class Loss(NamedTuple):
    """What a dead worker held, as its dispatcher sees it."""

    requeue: list[int]  # run again, free of charge (in this order, first)
    charge: list[int]  # charge an attempt: running (or stuck reporting) when it died
    completed: list[int]  # finished (done map) but never reported: success, value None


class Dispatcher(ABC):
    """One transport for one call (see the module docstring)."""

    #: longest wait for worker messages before the loop looks at its own state again
    poll_interval: float = 0.05

    @abstractmethod
    def start(self) -> None:
        """Hand out the first work (every worker has the call set up)."""

    @abstractmethod
    def on_messages(self, w: Any, msgs: list[tuple[Any, list[int]]]) -> None:
        """Messages from ``w`` (results, failures, reports)."""

    @abstractmethod
    def after_poll(self) -> None:
        """After each wait: top up work, re-tune."""

    def on_tick(self) -> None:  # noqa: B027 - optional hook
        """Every ~50 ms, after the watchdog."""

    @abstractmethod
    def finished(self) -> bool:
        """Every shard is done or failed for good."""

    @abstractmethod
    def lost(self, w: Any, reason: str | None) -> Loss:
        """``w`` is dead and reaped: what it held, to requeue and to charge."""

    @abstractmethod
    def stalled(self, w: Any, row: RowSnapshot, now: float) -> bool:
        """``w`` holds work, runs no shard, and shows no progress for ``timeout``."""

    @abstractmethod
    def attach(self, w: Any) -> None:
        """A replacement worker (the call is set up in it) joins the transport."""

    @abstractmethod
    def recycle(self, w: Any) -> None:
        """``w`` must be replaced at its next safe point (memory verdict)."""

    def requeued(self) -> None:  # noqa: B027 - optional hook
        """Work was added (shards requeued after a death, or tasks fed to an
        open call, see ``shardc.stream``): let workers start on it now."""

    def quiet(self) -> bool:
        """After :meth:`drain`: no worker holds work of this call any more
        (none can still mark its done map or be inside its ring), so the
        pool's next call may send work right behind its setup."""
        return False

    @abstractmethod
    def drain(self) -> None:
        """The work is done: collect the workers' last reports; release the transport."""
