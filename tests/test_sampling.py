"""How often the master takes a precise (smaps_rollup) sample of a worker
during a call: after ``PRECISE_MAX_AGE``, and no more often than its learned
cost allows (``PRECISE_RUN_SHARE``): one costs ~25 ms for a worker that read a
1 GiB input, and the master dispatches nothing while it reads."""

from __future__ import annotations

import time

import pytest
from _engine_helpers import no_stray_children  # noqa: F401 (fixture)

import shardc
from shardc.memory import MemoryModel
from shardc.supervisor import PRECISE_MAX_AGE, PRECISE_MAX_WAIT, PRECISE_RUN_SHARE

# The 0.8 s call below must fit well inside what a 0.02 s cost puts off, from the head start.
assert min(PRECISE_MAX_WAIT, 0.02 / PRECISE_RUN_SHARE) - 2 * PRECISE_MAX_AGE > 2.0

pytestmark = pytest.mark.timeout(60)


def nap(shard):
    time.sleep(0.02)
    return shard.id


@pytest.mark.parametrize("cost", [0.0, 0.02])  # (0.02 / PRECISE_RUN_SHARE: 4 s)
def test_a_costly_precise_sample_is_taken_less_often(cost, monkeypatch):
    taken: list[int] = []
    orig = MemoryModel.sample

    def sample(self, w):
        taken.append(w.slot)
        m = orig(self, w)
        w.precise_cost = cost  # what it learned (a worker that maps a big input)
        return m

    with shardc.Pool(1, fork_mode="fork") as pool:  # (a zygote's worker could grow 8 MiB importing)
        w = pool.workers[0]
        w.precise_cost = cost
        w.precise_t = time.monotonic() - 2 * PRECISE_MAX_AGE  # due by age alone, not by its cost
        monkeypatch.setattr(MemoryModel, "sample", sample)
        r = pool.shard_map(40, nap, chunk_size=1, health_check_interval=1, progress=False)  # 0.8 s
    assert r.succeeded
    if cost:  # next one due after cost / PRECISE_RUN_SHARE = 4 s
        assert taken == [], taken
    else:
        assert len(taken) >= 1, taken
