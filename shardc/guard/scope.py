"""The per-shard scope: collect and restore written regions, raise deny errors at the end of a shard."""

from __future__ import annotations

import errno
from types import TracebackType
from typing import Any

from .. import _lowlevel as _ll
from ..errors import BorrowedInputWriteError
from .events import _deny_error, _efault_error, _event
from .regions import _check_edges
from .state import _new_stats, _state


class ShardScope:
    """One shard's guard scope (see the module docstring).

    Attributes:
        shard_id: the shard's id, used in messages.
        events: filled on exit, one dict per input written in this shard:
            ``input``, ``shard``, ``mode``, ``pages``, ``bytes`` (page granularity),
            ``first_offset`` (byte offset from element [0, ...]), ``first_index``,
            ``faults``, ``exact`` (False when ``pages`` is a lower bound).
    """

    def __init__(self, shard_id: Any) -> None:
        self.shard_id = shard_id
        self.events: list[dict[str, Any]] = []
        self._raised = False

    def __enter__(self) -> ShardScope:
        if _state.current is not None:
            raise RuntimeError("shard scopes do not nest")
        # Writes made outside any shard (e.g. by the worker loop) are dropped
        # now, so this shard starts from pristine data.
        for rid in _ll.guard_dirty():
            if not _ll.guard_restore(rid):
                inp = _state.inputs.get(rid)
                _state.lost.append(inp.name if inp else f"region {rid}")
        if _state.edges:
            _check_edges(None)
        _ll.guard_take_notify()
        _state.current = self
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> bool:
        _state.current = None
        _ll.guard_take_notify()
        violation = None
        failure: BaseException | None = None
        for rid in _ll.guard_dirty():
            inp = _state.inputs.get(rid)
            try:
                if inp is not None:
                    event = _event(rid, _ll.guard_collect(rid), self.shard_id)
                    self.events.append(event)
                    self._count(event)
                    if inp.mode == "deny" and violation is None:
                        violation = event
                if not _ll.guard_restore(rid, inp.name if inp else None):
                    # A snapshot region written on more pages than could be
                    # saved: this process's copy stays changed (see take_lost).
                    name = inp.name if inp else f"region {rid}"
                    _state.lost.append(name)
                    if inp is not None:
                        self.events[-1]["lost"] = True
            except OSError as exc:  # keep restoring the others; report the first failure
                failure = failure or exc
        if _state.edges:
            for event in _check_edges(self.shard_id):
                self.events.append(event)
                self._count(event)
                if event["mode"] == "deny" and violation is None:
                    violation = event
        if failure is not None:
            raise self._with_events(failure)
        if violation is not None:
            if isinstance(ev, BorrowedInputWriteError) and ev.shard_id == self.shard_id:
                self._with_events(ev)
                return False  # the prompt error is propagating already
            raise self._with_events(_deny_error(self.shard_id, violation))
        if isinstance(ev, OSError) and ev.errno == errno.EFAULT and _state.inputs:
            raise self._with_events(_efault_error(self.shard_id, ev, tb)) from ev
        if ev is not None:
            self._with_events(ev)
        return False

    def _with_events(self, exc: BaseException) -> BaseException:
        """Attach this shard's events as ``exc.cow_events`` (where the type allows it)."""
        try:
            exc.cow_events = self.events  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass
        return exc

    @staticmethod
    def _count(event: dict[str, Any]) -> None:
        st = _state.stats.setdefault(event["input"], _new_stats(event["mode"]))
        st["shards_written"] += 1
        st["pages"] += event["pages"]
        st["bytes"] += event["bytes"]
        st["faults"] += event["faults"]
        st["violations"] += event["mode"] == "deny"


def shard_scope(shard_id: Any) -> ShardScope:
    """Context manager running one shard under the guards; see :class:`ShardScope`."""
    return ShardScope(shard_id)
