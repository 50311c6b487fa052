"""A worker killed by the master while its own event waits in the same
``select`` batch (a send to it failed while another worker's messages were
handled: ``Pool.kill`` closes its socket) is a death like any other, not an
``OSError: [Errno 9] Bad file descriptor`` out of ``shard_map`` (seen once in
CI's chaos run: the receive on the closed socket)."""

from __future__ import annotations

import selectors
import time

import numpy as np
import pytest
from _engine_helpers import no_stray_children  # noqa: F401 (fixture)

import shardc
from shardc.dispatch_rpc import RpcDispatcher

pytestmark = pytest.mark.timeout(60)


class SlowSelector(selectors.DefaultSelector):
    """Waits a little before each select, so every worker's reply is in one batch."""

    def select(self, timeout=None):
        time.sleep(0.01)
        return super().select(timeout)


def slow(shard, out):
    time.sleep(0.004)
    out[shard.id] = shard.id + 1


def test_a_worker_killed_while_its_event_is_in_the_batch_is_a_death(monkeypatch):
    orig = RpcDispatcher.on_messages
    killed: list[int] = []
    batches: list[int] = []
    orig_select = SlowSelector.select

    def select(self, timeout=None):
        got = orig_select(self, timeout)
        batches.append(sum(1 for key, _ in got if key.data is not None))
        return got

    def on_messages(self, w, msgs):
        others = [o for o in self.pool.workers if o is not w and o.alive]
        if not killed and others and batches and batches[-1] == len(self.pool.workers):
            killed.append(others[0].pid)
            self.pool.kill(others[0])  # what a failed send to it does
        return orig(self, w, msgs)

    monkeypatch.setattr(RpcDispatcher, "on_messages", on_messages)
    monkeypatch.setattr(SlowSelector, "select", select)
    out = shardc.buffer(np.int64, (200,), init=0)
    try:
        with shardc.Pool(2) as pool:
            pool.selector = SlowSelector()
            r = pool.shard_map(200, slow, out={"out": out}, chunk_size=1, autotune=False, max_retries=3, progress=False)
            assert killed, "no batch held both workers' replies"
            assert r.succeeded, r
            assert out.array.tolist() == list(range(1, 201))
            assert killed[0] not in [w.pid for w in pool.workers]
            assert any(e["event"] == "death" for e in r.diagnostics.events), r.diagnostics.events
            r2 = pool.shard_map(10, slow, out={"out": out}, progress=False)  # the pool goes on
            assert r2.succeeded
    finally:
        out.close()
