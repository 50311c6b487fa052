"""A shard's outcome records in a worker: the error of a failed shard (and
the frames its traceback holds), and frames opened back into per-shard
outcomes (see :data:`shardc.protocol.FRAME`)."""

from __future__ import annotations

import io
import pickle
import traceback
from typing import Any

from ..protocol import FRAME, OK, error_record


def open_frames(results: list[Any], trivial: tuple[type, ...]) -> list[Any]:
    """``results`` with each frame holding a value whose type is not in ``trivial`` opened into
    one outcome per shard (times spread evenly), so such values are pickled one by one."""
    out: list[Any] = []
    for r in results:
        if r[1] != FRAME or set(map(type, r[2])).issubset(trivial):
            out.append(r)
            continue
        sid, _, vals, t0, t1 = r[:5]
        step = (t1 - t0) // max(len(vals), 1)
        out += [(sid + k, OK, v, t0 + k * step, t0 + (k + 1) * step, None, None) for k, v in enumerate(vals)]
    return out


class _NotPlain(Exception):
    pass


class _PlainPickler(pickle.Pickler):
    """Pickles only plain data: CPython's pickler calls ``reducer_override``
    for every object except None, bools and exact ints, floats, strs,
    bytes, tuples, lists, dicts, sets and frozensets, so any other object
    raises here instead of running its own (possibly failing or blocking)
    reduction."""

    def reducer_override(self, obj: Any) -> Any:
        raise _NotPlain


def plain_dumps(obj: Any) -> bytes | None:
    """``pickle.dumps(obj, protocol=5)`` if ``obj`` is plain data throughout
    (see :class:`_PlainPickler`), else None.  A frame of plain values can go
    out as one pickle without opening it per shard (:func:`open_frames`),
    and the check costs nothing per value: ``set(map(type, values))`` cost
    more than pickling them (~40 vs ~30 ns a value)."""
    buf = io.BytesIO()
    try:
        _PlainPickler(buf, protocol=5).dump(obj)
    except _NotPlain:
        return None
    return buf.getvalue()


def release_traceback(exc: BaseException) -> None:
    """Drop the frames of a recorded shard exception and of its chain.

    Their locals hold fun's arguments (views of mapped inputs and out
    buffers) and the loop's own state (a call's task ring): whatever still
    holds the exception, e.g. a reference cycle through a frame, would keep
    those mapped until the cyclic GC ran.  Measured before this: three
    mappings left behind per call with a failed shard."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]


def shard_error(exc: BaseException, sid: int) -> BaseException:
    """The exception reported for shard ``sid``: ``exc`` itself, or for a
    BaseException that is not an Exception (SystemExit, KeyboardInterrupt, ...)
    a RuntimeError naming it, with ``exc`` as its cause."""
    if isinstance(exc, Exception):
        return exc
    err = RuntimeError(f"shard {sid} raised {type(exc).__name__}({exc})")
    err.__cause__ = exc
    return err


def failure_record(exc: BaseException, sid: int) -> dict[str, Any]:
    """The error record of shard ``sid`` that raised ``exc`` (:func:`shard_error`
    names a non-Exception), with the exception's frames dropped
    (:func:`release_traceback`): what every shard loop reports for a failure."""
    err = shard_error(exc, sid)
    rec = error_record(err, sid)
    release_traceback(err)
    return rec
