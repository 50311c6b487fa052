"""One call's parameters, and the handshake that sets the call up in a worker.

:class:`Call` is what every part of the engine reads about the call being
run (validated values only).  :class:`CallSetup` sends it to workers: one
``CALL`` message per worker with the fds of every segment the worker does not
hold yet (``SCM_RIGHTS``), then waits for ``READY``, bounded by
``SHARDC_SETUP_TIMEOUT``.  Workers unpickle ``fun`` and map the inputs in
parallel: all messages go out before the first reply is read.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from . import config
from ._channel import ChannelClosed
from .diagnostics import Diagnostics
from .errors import CallSetupTimeoutError, WorkerSetupError
from .inputs import InputPlan, array_desc
from .protocol import CALL, FORGET, READY, raise_from_record
from .segment import live_segment
from .status import DoneMap
from .values import close_fds

_call_ids = count(1)
_values_pickled: ContextVar[bool] = ContextVar("shardc_values_pickled", default=False)


@contextmanager
def values_pickled() -> Iterator[None]:
    """Calls started inside keep the return values their workers pickled as
    :class:`~shardc.protocol.PickledValue` (rpc_chunked): for a front end that
    forwards the values to another process as they are (the cluster's node agent)."""
    token = _values_pickled.set(True)
    try:
        yield
    finally:
        _values_pickled.reset(token)


def next_call_id() -> int:
    return next(_call_ids)


class WorkerGone(Exception):
    """Internal: the worker died before it answered (the caller replaces it)."""


@dataclass
class Call:
    """A validated ``shard_map`` call (see ``shard_map``'s arguments)."""

    desc: Any  # ShardDescriptor
    mode: str
    opts: dict[str, Any]
    cow: str
    profile: str
    mem_cap: int | None
    drift: float | None
    seed: int | None
    diagnostics: bool
    timeout: float
    max_retries: int
    health_check_interval: int
    heap_keep: int
    call_id: int = field(default_factory=next_call_id)
    entropy: int = 0
    fun_blob: bytes = b""
    plan: InputPlan | None = None
    donemap: DoneMap | None = None
    # An open call (shardc.stream): fed tasks while it runs.  ``wake`` has
    # fileno() and drain(); it is readable when tasks were fed or the feed closed.
    wake: Any = None
    # A front end's per-call value sink (rpc_chunked): ``value_sink.spec`` travels in
    # CALL and opens a ValueSink in each worker (shardc.worker.executor);
    # ``value_sink.committed(slot, record)`` gets each commit record, with the
    # outcomes it covers, before they are recorded.
    value_sink: Any = None
    # Values pickled by their worker stay pickled (PickledValue): see values_pickled().
    keep_pickled: bool = field(default_factory=_values_pickled.get)


class CallSetup:
    """Sends ``call`` to workers and waits until they are ready."""

    def __init__(self, call: Call, diag: Diagnostics) -> None:
        self.call = call
        self.diag = diag
        self.limit = config.get_float("SHARDC_SETUP_TIMEOUT")
        self._payloads: dict[tuple[str, ...], bytes] = {}  # CALL pickled, by the new segments it names

    def message(self, w: Any) -> tuple[dict[str, Any], list[int]]:
        c = self.call
        plan, dm = c.plan, c.donemap
        assert plan is not None and dm is not None
        new = [k for k in plan.segments if k not in w.known]
        segs = plan.segments
        infos = [{"key": k, "size": segs[k].size, "backing": segs[k].backing, "name": segs[k].name} for k in new]
        fds = [segs[k].fd for k in new]
        msg = {
            "call_id": c.call_id,
            "cow": c.cow,
            "entropy": c.entropy,
            "donemap": {**array_desc(dm.array, dm.segment), "dtype": "|u1"},  # (a str unpickles in ~1/3 the time)
            "seeded": c.seed is not None,
            "diagnostics": c.diagnostics,
            "desc": c.desc,
            "borrow": plan.borrow,
            "out": plan.out,
            "fun": c.fun_blob,
            "segments": infos,
            "heap_keep": c.heap_keep,
            "value_sink": c.value_sink.spec if c.value_sink is not None else None,
        }
        return msg, fds

    def send(self, w: Any) -> None:
        """Send the call to ``w`` (raises OSError if it is dead)."""
        w.call_ended = False
        # Segments the worker holds that this process has closed since: let go.
        stale = [k for k in w.known if live_segment(k) is None]
        if stale:
            w.chan.send((FORGET, stale))
            w.known.difference_update(stale)
        segs = self.call.plan.segments if self.call.plan is not None else {}
        # One pickle for every worker that needs the same segments (usually none new).
        new = tuple(k for k in segs if k not in w.known)
        payload = self._payloads.get(new)
        if payload is None:
            msg, _fds = self.message(w)
            payload = self._payloads[new] = pickle.dumps((CALL, msg), protocol=5)
        self.diag.bytes_setup += w.chan.send_bytes(payload, [segs[k].fd for k in new])
        w.known.update(segs)

    def await_ready(self, w: Any, kill: Any) -> None:
        """Wait (bounded: SHARDC_SETUP_TIMEOUT, default 120 s) for ``w`` to
        load fun and map the inputs.

        Raises:
            WorkerGone: it died first (the caller replaces it).
            CallSetupTimeoutError: it did not answer in time: it is stuck in
                code shardc cannot interrupt (e.g. unpickling a borrowed
                object that blocks); ``kill(w)`` was called, and the call
                fails, not retried.
            WorkerSetupError: it answered with an error (fun or an input
                failed to load there).
        """
        limit = self.limit
        try:
            w.chan.sock.settimeout(limit)
            while True:
                reply, fds = w.chan.recv()
                if reply[0] == READY and reply[1] == self.call.call_id:
                    break
                close_fds(fds)  # a stale message's big values (e.g. of a call aborted in the master)
        except TimeoutError:
            raise self.overdue(w, kill) from None
        except (ChannelClosed, ConnectionError, OSError) as exc:
            raise WorkerGone(str(exc)) from None
        finally:
            try:
                w.chan.sock.settimeout(None)
            except OSError:
                pass
        self.answered(w, reply)

    def answered(self, w: Any, reply: tuple[Any, ...]) -> None:
        """``w``'s READY ``reply`` to this call (raises WorkerSetupError for an error)."""
        if reply[2] is not None:
            cause = raise_from_record(reply[2])
            raise WorkerSetupError(f"worker {w.slot} could not set up the call: {reply[2]['message']}") from cause
        w.call_id = self.call.call_id

    def overdue(self, w: Any, kill: Any) -> CallSetupTimeoutError:
        """``w`` did not answer the setup in time: kill it; the error to raise."""
        limit = self.limit
        kill(w)
        self.diag.event("death", w, f"killed: no answer to the call setup within {limit:g} s", code=w.exitcode)
        return CallSetupTimeoutError(
            f"worker {w.slot} (pid {w.pid}) did not finish setting up the call within {limit:g} s "
            "(loading fun and mapping borrowed inputs); something fun or a borrowed object runs "
            "when unpickled is blocking. It was killed (SHARDC_SETUP_TIMEOUT sets the limit)"
        )
