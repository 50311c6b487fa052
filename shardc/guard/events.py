"""Turning recorded faults into events and errors: element indexes, deny errors, EFAULT attribution, the notify handler."""

from __future__ import annotations

import os
from types import FrameType, TracebackType
from typing import Any

from .. import _lowlevel as _ll
from ..errors import BorrowedInputWriteError
from .state import _byte_bounds, _Input, _new_stats, _state

# Frames of this package and of _lowlevel are guard code (no deny error raised inside them).
_OWN_FILES = {os.path.join(os.path.dirname(os.path.abspath(__file__)), f)
              for f in os.listdir(os.path.dirname(os.path.abspath(__file__))) if f.endswith(".py")}
_OWN_FILES.add(os.path.abspath(_ll.__file__))


def _element_index(inp: _Input, rel: int) -> tuple[int, ...] | None:
    """Index of the element holding byte ``rel`` (relative to element [0, ...]), or None."""
    itemsize = max(inp.itemsize, 1)
    if inp.shape is None:
        if rel < 0 or rel >= inp.nbytes - inp.offset0:
            return None
        return (rel // itemsize,)
    shape = inp.shape
    strides = inp.strides
    if strides is None:  # C order
        strides, acc = [], itemsize
        for n in reversed(shape):
            strides.insert(0, acc)
            acc *= max(n, 1)
    if any(n == 0 for n in shape):
        return None
    # Measure from the lowest-addressed element; a negative stride flips its axis.
    low, dims = 0, []
    for n, s in zip(shape, strides):
        if s < 0:
            low += (n - 1) * s
        dims.append((n, abs(s), s < 0))
    rem = rel - low
    if rem < 0:
        return None
    index = [0] * len(shape)
    for k in sorted(range(len(shape)), key=lambda k: -dims[k][1]):
        n, s, flipped = dims[k]
        i = 0 if s == 0 else min(rem // s, n - 1)
        rem -= i * s
        index[k] = n - 1 - i if flipped else i
    return tuple(index) if rem < itemsize else None


def _format_index(index: tuple[int, ...] | None) -> str:
    if index is None:
        return "not inside any element"
    return "element [" + ", ".join(str(i) for i in index) + "]"


def _deny_error(shard_id: Any, ev: dict[str, Any]) -> BorrowedInputWriteError:
    msg = (f"shard {shard_id} wrote to borrowed input {ev['input']!r} at byte {ev['first_offset']} "
           f"({_format_index(ev['first_index'])}); cow='deny' forbids writes to borrowed inputs")
    return BorrowedInputWriteError(msg, ev["input"], shard_id, ev["first_offset"], ev["first_index"])


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
    return {"input": inp.name, "shard": shard_id, "mode": inp.mode, "pages": info["pages"],
            "bytes": info["pages"] * _ll.PAGE_SIZE, "first_offset": rel,
            "first_index": _element_index(inp, rel), "faults": info["faults"],
            "exact": bool(info["exact"])}


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


def _buffer_span(obj: Any) -> tuple[int, int] | None:
    """(lo, hi) address range of an ndarray/memoryview/bytearray, or None."""
    try:
        import numpy as np

        if isinstance(obj, (memoryview, bytearray)):
            obj = np.asarray(obj)  # shares the memory: only its address is needed
        if isinstance(obj, np.ndarray):
            lo, hi = _byte_bounds(obj)
            return int(lo), int(hi)
    except Exception:  # noqa: BLE001 - best effort: exotic buffers are simply not candidates
        return None
    return None


def _efault_candidates(tb: TracebackType | None) -> list[_Input]:
    """Inputs a failed system call may have been given, innermost frame first."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        found: dict[int, _Input] = {}
        for value in list(frame.f_locals.values()):
            items = value if isinstance(value, (list, tuple)) and len(value) < 64 else [value]
            for item in items:
                span = _buffer_span(item)
                if span is None:
                    continue
                for rid in _ll.guard_lookup(span[0], max(span[1] - span[0], 1)):
                    for v in _state.views.get(rid, ()):
                        lo, hi = v.extent()
                        if span[0] < v.addr + hi and v.addr + lo < span[1]:
                            found[id(v)] = v
        if found:
            return list(found.values())
    return [v for views in _state.views.values() for v in views]


def _efault_error(shard_id: Any, exc: OSError, tb: TracebackType | None) -> BorrowedInputWriteError:
    cands = _efault_candidates(tb)
    for inp in cands:
        _state.stats.setdefault(inp.name, _new_stats(inp.mode))["kernel_writes"] += 1
    if len(cands) == 1:
        what, name, mode = f"borrowed input {cands[0].name!r}", cands[0].name, cands[0].mode
    else:
        names = ", ".join(repr(c.name) for c in cands)
        what, name, mode = f"one of the borrowed inputs {names} (could not tell which)", None, None
    why = ("cow='deny' forbids writes to borrowed inputs" if mode == "deny" else
           "the kernel cannot write into borrowed inputs under any cow mode (they are read-only "
           "mappings); read into a private copy (e.g. X.copy()) instead")
    msg = (f"shard {shard_id} passed {what} to a system call that writes into it "
           f"(readinto/readv/recv_into: {exc.strerror or 'EFAULT'}); {why}")
    return BorrowedInputWriteError(msg, name, shard_id, None, None)
