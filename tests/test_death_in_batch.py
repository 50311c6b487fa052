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
from shardc.supervisor import Supervisor

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
    orig_receive = Supervisor.receive
    orig_select = SlowSelector.select
    killed: list[int] = []
    batch: list[int] = []  # the slots of the last select's events, in the order they are handled
    received: dict[int, list[bool]] = {}  # pid -> whether each receive saw it dead

    def select(self, timeout=None):
        got = orig_select(self, timeout)
        batch[:] = [key.data for key, _ in got if key.data is not None]
        return got

    def receive(self, w):
        msgs = orig_receive(self, w)
        received.setdefault(w.pid, []).append(msgs is None)
        return msgs

    def on_messages(self, w, msgs):
        # The first event of a batch of both workers: kill the other, whose event comes next.
        if not killed and len(batch) == 2 and batch[0] == w.slot:
            other = self.pool.workers[batch[1]]
            killed.append(other.pid)
            self.pool.kill(other)  # what a failed send to it does
        return orig(self, w, msgs)

    monkeypatch.setattr(RpcDispatcher, "on_messages", on_messages)
    monkeypatch.setattr(Supervisor, "receive", receive)
    monkeypatch.setattr(SlowSelector, "select", select)
    out = shardc.buffer(np.int64, (200,), init=0)
    try:
        with shardc.Pool(2) as pool:
            pool.selector = SlowSelector()
            r = pool.shard_map(200, slow, out={"out": out}, chunk_size=1, autotune=False, max_retries=3, progress=False)
            assert killed, "no batch held both workers' replies"
            assert received[killed[0]][-1] is True  # its event was handled after the kill: a death
            assert r.succeeded, r
            assert out.array.tolist() == list(range(1, 201))
            assert killed[0] not in [w.pid for w in pool.workers]
            assert any(e["event"] == "death" for e in r.diagnostics.events), r.diagnostics.events
            r2 = pool.shard_map(10, slow, out={"out": out}, progress=False)  # the pool goes on
            assert r2.succeeded
    finally:
        out.close()
