"""The guard's per-process state and the per-shard scope (see ``shardc.guard``).

``guard`` installs the handler and protects regions; this module holds the
state both share, turns what the C handler recorded into events and named
errors, and runs each shard inside a :class:`ShardScope`.
"""

from __future__ import annotations

import errno
import os
from types import FrameType, TracebackType
from typing import Any, Literal

from . import _lowlevel as _ll
from . import guard_edges as _edges
from . import guard_locate as _locate
from .errors import BorrowedInputWriteError, UsageError
from .guard_edges import EdgeTable
from .guard_locate import Input as _Input
from .guard_locate import deny_error as _deny_error
from .guard_locate import element_index as _element_index

# Frames in these files are the guard's own machinery (see _in_guard_code).
# Frames of the guard modules and of the native wrappers are shardc's own code.
_LL_DIR = os.path.dirname(os.path.abspath(_ll.__file__))
_OWN_FILES = {
    os.path.abspath(f)
    for f in (__file__, _locate.__file__, _edges.__file__, os.path.join(os.path.dirname(__file__), "guard.py"))
} | {os.path.join(_LL_DIR, f) for f in os.listdir(_LL_DIR) if f.endswith(".py")}


class _State:
    """Per-process guard state (a forked child inherits and then re-installs)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.signum: int | None = None
        self.notify = "interrupt"
        self.prev_handler: Any = None
        self.inputs: dict[int, _Input] = {}  # region id -> the first input protected there
        self.views: dict[int, list[_Input]] = {}  # region id -> every input sharing the mapping
        self.current: ShardScope | None = None
        self.seen_notified = 0
        self.stats: dict[str, dict[str, Any]] = {}
        # Inherited inputs (shardc.inherit): the bytes of the partial pages at
        # their ends, which no page guard can cover, checked after each shard.
        self.edges = EdgeTable()
        self.next_handle = -2
        self.lost: list[str] = []  # inputs written beyond what can be restored


_state = _State()


def _new_stats(mode: str) -> dict[str, Any]:
    return {"mode": mode, "shards_written": 0, "pages": 0, "bytes": 0, "faults": 0, "violations": 0, "kernel_writes": 0}


def cow_stats() -> dict[str, dict[str, Any]]:
    """Cumulative counters per input name in this process.

    Each value: ``mode``, ``shards_written`` (scopes that wrote it), ``pages``
    and ``bytes`` written (private pages), ``faults``, ``violations`` (deny
    writes), ``kernel_writes`` (EFAULTs attributed to it).
    """
    return {k: dict(v) for k, v in _state.stats.items()}


def _view_at(rid: int, offset: int) -> _Input:
    """The input of region ``rid`` whose elements hold byte ``offset`` (else the first one)."""
    views = _state.views[rid]
    for v in views:
        lo, hi = v.extent()
        if lo <= offset < hi:
            return v
    return views[0]


def _event(rid: int, info: dict[str, int], shard_id: Any) -> dict[str, Any]:
    """One shard's event for region ``rid``, named after the input holding the first written byte."""
    inp = _view_at(rid, info["first_offset"])
    rel = info["first_offset"] - inp.offset0
    return {
        "input": inp.name,
        "shard": shard_id,
        "mode": inp.mode,
        "pages": info["pages"],
        "bytes": info["pages"] * _ll.PAGE_SIZE,
        "first_offset": rel,
        "first_index": _element_index(inp, rel),
        "faults": info["faults"],
        "exact": bool(info["exact"]),
    }


def _efault_error(shard_id: Any, exc: OSError, tb: TracebackType | None) -> BorrowedInputWriteError:
    """The named error for an ``OSError(EFAULT)`` from a system call given a borrowed input."""
    cands = _locate.efault_candidates(tb, _state.views, _ll.guard_lookup)
    for inp in cands:
        _state.stats.setdefault(inp.name, _new_stats(inp.mode))["kernel_writes"] += 1
    return _locate.efault_error(shard_id, exc, cands)


def _pending_deny(shard_id: Any) -> BorrowedInputWriteError | None:
    """The deny error for the first written deny region, without restoring anything."""
    for rid in _ll.guard_dirty():
        inp = _state.inputs.get(rid)
        if inp is not None and inp.mode == "deny":
            return _deny_error(shard_id, _event(rid, _ll.guard_collect(rid), shard_id))
    return None


def _in_guard_code(frame: FrameType | None) -> bool:
    while frame is not None:
        if os.path.abspath(frame.f_code.co_filename) in _OWN_FILES:
            return True
        frame = frame.f_back
    return False


def _on_notify(signum: int, frame: FrameType | None) -> None:
    """Python handler of the notify signal: raise the deny error in the shard."""
    notified = _ll.guard_counters()["notified"]
    ours = notified != _state.seen_notified
    _state.seen_notified = notified
    if not ours:
        # A real signal from somebody else: give it to whoever had it before.
        if callable(_state.prev_handler):
            _state.prev_handler(signum, frame)
        return
    scope = _state.current
    if scope is None or scope._raised or _in_guard_code(frame):
        return  # outside a shard, or inside the scope machinery: scope exit reports it
    err = _pending_deny(scope.shard_id)
    if err is not None:
        scope._raised = True
        raise err


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
            raise UsageError("shard scopes do not nest")
        # Writes made outside any shard (e.g. by the worker loop) are dropped
        # now, so this shard starts from pristine data.
        for rid in _ll.guard_dirty():
            if not _ll.guard_restore(rid):
                inp = _state.inputs.get(rid)
                _state.lost.append(inp.name if inp else f"region {rid}")
        if _state.edges:
            _state.edges.check(None)
        _ll.guard_take_notify()
        _state.current = self
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
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
            for event in _state.edges.check(self.shard_id):
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
