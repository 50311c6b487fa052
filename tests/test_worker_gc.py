"""Workers freeze what they inherit out of their cyclic GC (``gc.freeze()`` after
fork): a full collection in a worker neither walks nor copies the master's
objects, so a worker whose shards make the GC run stays small."""

from __future__ import annotations

import gc
from typing import Any

import psutil
import pytest

import shardc

pytestmark = pytest.mark.timeout(120)


def collects(shard: Any) -> int:
    return gc.collect()  # a full collection, as allocating shards trigger now and then


def test_a_full_collection_in_a_worker_copies_none_of_the_masters_objects():
    junk = [{"a": i, "b": [i]} for i in range(400_000)]  # ~70 MB of the master's objects
    with shardc.Pool(2) as pool:
        pool.shard_map(2, collects, progress=False)  # each worker collects once
        uss = [psutil.Process(w.pid).memory_full_info().uss for w in pool.workers]
    assert len(junk) == 400_000
    # Without the freeze a collection writes every inherited object's GC header,
    # copying its page: ~50 MB per worker here.
    assert max(uss) < 25 << 20, [u >> 20 for u in uss]
