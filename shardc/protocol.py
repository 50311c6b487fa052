"""The master <-> worker protocol: message tags, the shard outcome, error records.

A leaf module (imports nothing of shardc but errors): both sides and every
dispatcher use these names, so a message's shape is written down once.

Messages (tuples; the first item is the tag):

master -> worker
    ``(CALL, msg)`` + fds          set up a call (fun, inputs, out buffers)
    ``(RUN, call_id, ids)``        rpc: run a chunk of shard ids (a list, or a range of fresh ids)
    ``(RUN, call_id, ids, data)``  ... with per-id data (an open call's tasks, see
                                   ``shardc.stream``): ``desc.feed(ids, data, load)`` first
    ``(RUN, call_id, ids, data, segments, shared)`` + fds   ... and arrays the data refers
                                   to: ``shared`` descriptors, in ``segments`` (sent as fds)
                                   or in segments the worker holds; mapped before the chunk
    ``(RUN_CAREFUL, ...)``         as any RUN, but the worker runs these ids alone with
                                   per-shard status: they were in a speculative run of a
                                   worker that was lost (``StatusRow.run_call``)
    ``(QUEUE, msg)`` + fds         shm_queue: pop blocks from the ring until it closes
    ``(END,)``                     drop the call's state
    ``(END, call_id)``             the same, sent with a small call's work; void once the
                                   worker handed chunks of that call back (RETURNED)
    ``(FORGET, keys)``             close segments the master closed
    ``(EXIT,)``                    leave

worker -> master
    ``(HELLO, pid, None)``         started
    ``(READY, call_id, err)``      the call is set up (err: an error record or None)
    ``(RESULTS, call_id, [Outcome])`` (+ fds)   rpc: a chunk's outcomes (fds: big
                                   array values, ``shardc.values``); runs of OK shards
                                   may come as frames (``FRAME``)
    ``(RETURNED, call_id, ids)``   rpc: ids of chunks queued behind a long shard that the
                                   worker hands back unrun (sent before that shard's
                                   RESULTS): the master dispatches them again, to any worker
    ``(QFAIL, call_id, Outcome)``  shm_queue: a failed shard
    ``(QCOW, call_id, (sid, events))``  shm_queue: writes into borrowed inputs
    ``(QDONE, call_id, dict)``     shm_queue: the worker left the ring
    ``(QIDLE, call_id, None)``     shm_queue: the ring was empty when it looked (once, before it parks)
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any, NamedTuple

from . import errors
from .errors import BindingError, BorrowedInputWriteError, RemoteTraceback, ShardcError, TableSchemaError

CALL, RUN, QUEUE, END, FORGET, EXIT = "call", "run", "queue", "end", "forget", "exit"
RUN_CAREFUL = "run_careful"  # a RUN whose ids must run one shard at a time (no speculative run)
HELLO, READY, RESULTS, QFAIL, QCOW, QDONE, QIDLE = "hello", "ready", "results", "qfail", "qcow", "qdone", "qidle"
RETURNED = "returned"  # rpc: queued chunks a worker hands back unrun (their shards are long)

OK, ERR, OK_PICKLED = 0, 1, 2  # OK_PICKLED: the value travels as its own pickle (bytes)
OK_SEGMENT = 3  # a big array in a segment whose fd rides with the message: value = (fd index, spec)
# A frame in a RESULTS list: consecutive shards that all succeeded, laid out
# as an Outcome whose ``sid`` is the first id, ``value`` the list of their
# values (ids sid .. sid + len - 1), ``t0``/``t1`` the start of the first and
# the end of the last, no events, no memory delta.  Sent instead of one
# Outcome per shard when shards are short (~0.4 us a shard of tuples, pickling
# and the master's per-shard loop); failures stay Outcomes.
FRAME = 4

# Exit status of a worker that retires by itself: a shard wrote more of an
# input inherited over fork than the guards could save, so this process's
# copy of it can no longer be restored (the master forks a fresh worker).
RETIRE_EXIT = 75

# Exceptions that will fail the same way on every attempt: never retried.
DETERMINISTIC: tuple[type[BaseException], ...] = (BorrowedInputWriteError, BindingError, TableSchemaError)


class PickledValue:
    """A shard's return value still in the pickle its worker made (a call run under
    :func:`shardc.call.values_pickled`): a front end that forwards values to another
    process (the cluster's node agent) sends these bytes on as they are, without
    unpickling and pickling them again; :meth:`load` gives the value."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def load(self) -> Any:
        return pickle.loads(self.blob)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[Any]]:
        # Protocol 5: the blob as a PickleBuffer, which a pickler with a buffer_callback
        # can send out of band (shardc.cluster.reply); in band it is plain bytes.
        return (PickledValue, (pickle.PickleBuffer(self.blob) if protocol >= 5 else self.blob,))


class Outcome(NamedTuple):
    """What one attempt of one shard produced (sent back to the master)."""

    sid: int
    ok: int  # OK, ERR, OK_PICKLED, OK_SEGMENT or FRAME
    value: Any  # the return value (OK), its pickle (OK_PICKLED) or an error record (ERR)
    t0: int  # monotonic ns at start
    t1: int  # monotonic ns at end
    events: list[dict[str, Any]] | None  # cow events (writes into borrowed inputs)
    mem_delta: int | None  # anonymous-memory growth over the shard, if measured


def fun_key(blob: bytes | None) -> tuple[int, int]:
    """The identity of a CALL's ``fun`` pickle, by which master and workers keep
    what they learned of a function's shards across calls (a guess, nothing more)."""
    return (len(blob), hash(blob)) if blob is not None else (0, 0)


def work_call(msg: tuple[Any, ...]) -> int | None:
    """The call a RUN or QUEUE message is work of (None for any other message).
    A worker whose call's work is already behind its CALL skips READY: the
    master takes that work's first message (or status row) as the answer
    (``Supervisor.setup_all(pipeline=True)``)."""
    return msg[1] if msg[0] in (RUN, RUN_CAREFUL) else msg[1]["call_id"] if msg[0] == QUEUE else None


def error_record(exc: BaseException, sid: int | None, deterministic: bool | None = None) -> dict[str, Any]:
    """A picklable description of ``exc`` (type, message, traceback, the exception if it pickles)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    blob: bytes | None
    try:
        blob = pickle.dumps(exc, protocol=5)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 - unpicklable exception: send text only
        blob = None
    det = isinstance(exc, DETERMINISTIC) if deterministic is None else deterministic
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": tb,
        "exc": blob,
        "deterministic": det,
        "shard": sid,
    }


def raise_from_record(rec: dict[str, Any]) -> BaseException:
    """Rebuild a worker's exception with its traceback as ``__cause__``."""
    exc: BaseException | None = None
    if rec.get("exc") is not None:
        try:
            exc = pickle.loads(rec["exc"])
        except Exception:  # noqa: BLE001
            exc = None
    if exc is None:
        # Not rebuilt (its class is missing here, its pickle failed): one of
        # ours keeps its type, anything else becomes a ShardcError naming it.
        mod, _, name = str(rec.get("type", "")).rpartition(".")
        cls = getattr(errors, name, None) if mod == "shardc.errors" else None
        if isinstance(cls, type) and issubclass(cls, ShardcError):
            try:
                exc = cls(rec["message"])
            except Exception:  # noqa: BLE001 - an __init__ that wants more: the generic form
                exc = None
        if exc is None:
            exc = ShardcError(f"{rec['type']}: {rec['message']}")
    exc.__cause__ = RemoteTraceback(rec["traceback"])
    return exc
