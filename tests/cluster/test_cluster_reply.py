"""A macro-shard's reply (shardc.cluster.reply) and the core hook it rests on (values_pickled):
values stay their workers' pickles through the agent and are unpickled once, in the caller."""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import pytest

import shardc
from shardc.call import values_pickled
from shardc.cluster import Cluster, reply
from shardc.cluster.base import _Run
from shardc.protocol import PickledValue


def _listy(shard: Any) -> Any:
    if shard.id % 3 == 0:
        return None
    if shard.id % 3 == 1:
        return list(range(shard.start, shard.stop))  # pickled one by one by its worker
    return np.full(3, shard.id, dtype=np.int32)


def test_values_pickled_keeps_the_workers_pickles_only_inside() -> None:
    """Under values_pickled() a call's non-trivial values are the workers' pickles (PickledValue)
    that load to what a plain call returns; outside, and in a later call, values are values."""
    d = shardc.shards(3000, block_size=100)
    plain = shardc.shard_map(d, _listy, workers=2, dispatch_mode="rpc_chunked")
    with values_pickled():
        kept = shardc.shard_map(d, _listy, workers=2, dispatch_mode="rpc_chunked")
    again = shardc.shard_map(d, _listy, workers=2, dispatch_mode="rpc_chunked")
    assert any(type(v) is PickledValue for v in kept.results)
    assert not any(type(v) is PickledValue for v in plain.results + again.results)
    loaded = [v.load() if type(v) is PickledValue else v for v in kept.results]
    for a, b, c in zip(plain.results, loaded, again.results, strict=True):
        assert type(a) is type(b) is type(c)
        assert (a == b).all() if isinstance(a, np.ndarray) else a == b == c


def _body(values: list[Any], pickled: list[int]) -> dict[str, Any]:
    return {
        "values": values,
        "pickled": pickled,
        "failures": {},
        "runs": {},
        "seconds": 0.5,
        "workers": 2,
        "worker_pids": [1, 2],
        "retries": 0,
        "events": [],
        "worker_peak_uss": 0,
        "agent_peak_rss": 0,
    }


@pytest.mark.parametrize("big", [False, True], ids=["inline", "memfd"])
def test_reply_blobs_travel_out_of_band_and_arrays_stay_in_the_body(big: bool) -> None:
    """The workers' pickles go after the body as they are (the body's pickle stays small); a
    NumPy value stays in the body and comes back a writable array of its own; a big reply
    round-trips through a memfd view."""
    n = 100_000 if big else 10
    vals = [list(range(n)), {"a": n}]
    values: list[Any] = [PickledValue(pickle.dumps(v, protocol=5)) for v in vals] + [np.arange(5.0), None]
    pieces = reply.pack(_body(values, [0, 1]), values, [0, 1])
    head_and_body = memoryview(pieces[0]).nbytes + memoryview(pieces[1]).nbytes
    assert head_and_body < 1000 + 8 * 5  # the blobs are not in it
    if big:
        assert reply.size(pieces) > reply.INLINE_MAX
        fd, nbytes = reply.to_memfd(pieces)
        payload: Any = reply.from_memfd(fd, nbytes)
        with pytest.raises(OSError):
            os.fstat(fd)  # closed by from_memfd
    else:
        payload = reply.to_bytes(pieces)
    body = reply.unpack(payload)
    got = [body["values"][k].load() for k in body["pickled"]]
    assert got == vals
    arr = body["values"][2]
    assert np.array_equal(arr, np.arange(5.0)) and arr.flags.writeable


def test_a_value_the_caller_cannot_unpickle_fails_its_shard_by_name() -> None:
    """The caller unpickles the workers' pickles: one that does not load here fails only its
    own shard (global id, named), the others are kept."""
    good = PickledValue(pickle.dumps([1, 2], protocol=5))
    bad = PickledValue(b"\x80\x05not a pickle")
    values: list[Any] = [good, bad, 7]
    payload = reply.to_bytes(reply.pack(_body(values, [0, 1]), values, [0, 1]))
    run = _Run(None, Cluster("ray"), 13, 1, {})  # type: ignore[arg-type]
    rep = {"payload": payload, "node": "n1", "agent_pid": 9, "input_bytes": 0, "engine_rss": 0}
    run._merge(0, 10, 13, 1, rep)
    assert run.results[10] == [1, 2] and run.results[12] == 7
    f = run.failures[11]
    assert f.shard_id == 11 and "cannot be unpickled in the caller" in f.message
    assert run.per_node["n1"]["bytes_replies"] == len(payload)


def test_a_reply_whose_values_are_all_none_carries_none_and_failures_still_land() -> None:
    """All values None (out-buffer shards): the reply carries no list, the caller's results stay
    None in shard order and a failure still lands on its global id."""
    from shardc.result import FailedShard, ShardFailure

    body = _body(None, [])  # type: ignore[arg-type]
    body["failures"] = {21: ShardFailure(21, 2, "builtins.ValueError", "bad")}
    payload = reply.to_bytes(reply.pack(body, None, []))
    assert len(payload) < 2000
    run = _Run(None, Cluster("ray"), 30, 1, {})  # type: ignore[arg-type]
    run.results[19] = "sentinel"
    rep = {"payload": payload, "node": "n1", "agent_pid": 9, "input_bytes": 0, "engine_rss": 0}
    run._merge(0, 20, 30, 1, rep)
    assert run.results[19] == "sentinel" and run.results[20] is None
    assert isinstance(run.results[21], FailedShard) and run.failures[21].message == "bad"
