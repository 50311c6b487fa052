"""rpc_chunked in a worker: running the RUN chunks the master sent, and reporting them.

::

    RUN chunk ──> ShardExecutor.run_ids ──> (chunks queued behind it, while short) ──> one RESULTS
                         │
                         └─ long (over COALESCE_S): chunks queued behind it beyond the next
                            one go back to the master unrun (RETURNED), for any worker to take

The master hands a small call out whole in its first round (``RpcDispatcher.start``):
every worker gets its share of the ids before anyone knows how long a shard
is.  Tiny shards then cost one RESULTS per worker; long ones would leave the
share fixed, and a worker that drew the long shards would run them all while
the others idle.  So a worker whose chunk ran long hands back what is queued
behind the next chunk (never a chunk it started: nothing it returns has run or
will run here), and the master dispatches it again, as at any other time.
"""

from __future__ import annotations

import pickle
import time
from collections import deque
from typing import Any

from ..protocol import ERR, FRAME, OK, OK_PICKLED, OK_SEGMENT, RESULTS, RETURNED, RUN, RUN_CAREFUL, error_record
from ..segment import Segment
from ..values import is_big_array
from ..values import pack as pack_value
from .executor import open_frames
from .records import plain_dumps

# Return values that pickle instantly and cannot run user code while pickled.
_TRIVIAL = (type(None), bool, int, float, complex, str, bytes)

# Chunks the master sent ahead are run before replying only while they are
# short (this long since the first), so tiny shards cost one message per few
# chunks, and long ones still report promptly.  Chunks already queued that the
# running mean says fit in the time left run in one executor call.  A chunk
# that alone ran longer than this hands back the chunks queued behind the next
# one (see the module docstring).
COALESCE_S = 0.002


def send_results(w: Any, call_id: int, results: list[tuple], commit: Any = None) -> None:
    """Send a batch of outcomes from worker ``w``.  Non-trivial return values are pickled one by
    one first, with ``ST_SENDING`` naming the shard: a value whose pickling fails fails only its
    shard, and one whose pickling blocks is the only shard the master charges when it kills
    this worker."""
    msg: tuple[Any, ...]
    if all(r[1] == FRAME for r in results):  # the tiny-shard path: frames of plain values, one pickle
        msg = (RESULTS, call_id, results) if commit is None else (RESULTS, call_id, results, commit)
        payload = plain_dumps(msg)
        if payload is not None:
            w.chan.send_bytes(payload)
            return
    row = w.row
    out = []
    segs: list[Segment] = []  # big arrays travel in segments (shardc.values), their fds with the message
    if any(r[1] == FRAME for r in results):
        results = open_frames(results, _TRIVIAL)
    for r in results:
        if r[1] == FRAME:
            out.append(r)
        elif r[1] == OK and type(r[2]) not in _TRIVIAL:
            row.set_sending(r[0])
            try:
                if is_big_array(r[2]):
                    try:
                        seg, spec = pack_value(r[2])
                        segs.append(seg)
                        out.append((r[0], OK_SEGMENT, (len(segs) - 1, spec), *r[3:]))
                        continue
                    except OSError:
                        pass  # no room for a segment: pickle it as before
                out.append((r[0], OK_PICKLED, pickle.dumps(r[2], protocol=5), *r[3:]))
            except Exception as exc:  # noqa: BLE001 - reported as that shard's failure
                err = TypeError(
                    f"the return value of shard {r[0]} cannot be pickled to send it "
                    f"back: {exc}; return plain data or write into an out= buffer"
                )
                out.append((r[0], ERR, error_record(err, r[0], deterministic=True), *r[3:]))
        else:
            out.append(r)
    row.set_sending(None)
    try:
        msg = (RESULTS, call_id, out) if commit is None else (RESULTS, call_id, out, commit)
        w.chan.send(msg, [seg.fd for seg in segs])
    finally:
        for seg in segs:
            seg.close()


def give_back(w: Any, call_id: int, pending: deque[tuple[Any, list[int]]]) -> None:
    """Hand back to the master the plain RUN chunks of ``call_id`` queued in
    ``pending`` behind the next one (one ``RETURNED`` message; none if there
    are none).  Chunks with per-task data (an open call's) stay: their data
    was sent once."""
    kept: list[tuple[Any, list[int]]] = []
    ids: list[int] = []
    seen = False
    for item in pending:
        m = item[0]
        if m[0] == RUN and m[1] == call_id and len(m) == 3:
            if seen:
                ids.extend(m[2])
                continue
            seen = True
        kept.append(item)
    if ids:
        pending.clear()
        pending.extend(kept)
        w.returned_call = call_id  # the master sends more: an END sent with the work is void
        w.chan.send((RETURNED, call_id, ids))


def _merge(w: Any, ids: Any, pending: deque[tuple[Any, list[int]]], fit: float) -> Any:
    """``ids`` and the RUN chunks queued next in ``pending`` while all of them
    together stay within ``fit`` shards (taken out of ``pending``)."""
    if pending and pending[0][0][0] == RUN and len(ids) + len(pending[0][0][2]) <= fit:
        ids = list(ids)
        while pending and pending[0][0][0] == RUN and len(ids) + len(pending[0][0][2]) <= fit:
            ids += w.chunk_ids(*pending.popleft())
    return ids


def run_chunks(w: Any, msg: tuple, pending: deque[tuple[Any, list[int]]], fds: list[int] | None = None) -> None:
    """Run a RUN message's chunk on worker ``w``, and the RUN messages queued
    behind it while they are short; send all their outcomes in one RESULTS.
    A chunk that ran long hands back the chunks queued behind the next one.
    When the shard time is already known (the same ``fun`` as the last call),
    the queued chunks that fit run in the same executor call as the first."""
    chan, ex = w.chan, w.ex
    call_id = msg[1]
    careful = msg[0] == RUN_CAREFUL  # run alone, one shard at a time (see ShardExecutor.run_ids)
    t_start = time.monotonic()
    ids = w.chunk_ids(msg, fds or [])
    if not careful and ex.ewma_ns > 0 and not ex.tainted:
        ids = _merge(w, ids, pending, COALESCE_S * 1e9 / ex.ewma_ns)
    results = ex.run_ids(ids, careful=careful)
    t_first = time.monotonic()
    pending.extend(chan.poll_nonblocking())
    if t_first - t_start > COALESCE_S and len(pending) > 1 and not ex.tainted:
        give_back(w, call_id, pending)
    while not careful and pending and pending[0][0][0] == RUN and not ex.tainted:
        left = COALESCE_S - (time.monotonic() - t_first)
        if left <= 0:
            break
        # Shards known to be short: the chunks queued behind this one that
        # fit in the time left run in the same executor call (chunks of one
        # tiny shard would otherwise pay the call's setup once per shard).
        ids = w.chunk_ids(*pending.popleft())
        ids = _merge(w, ids, pending, left * 1e9 / ex.ewma_ns if ex.ewma_ns > 0 else 0)
        ex.run_ids(ids, results)
        pending.extend(chan.poll_nonblocking())
    send_results(w, call_id, results, ex.commit_sink(results))
    del results  # return values must not live on in an idle worker
    if ex.tainted:
        ex.retire()
