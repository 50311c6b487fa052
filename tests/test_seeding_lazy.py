"""Lazy legacy seeding (shardc/worker/seeding.py): with ``seed=``, shards get
``random`` and ``np.random`` seeded only when they use them, and every
outcome equals eager seeding (``seed_legacy`` before each shard), whatever
the function does with the legacy generators: always, sometimes, never,
reseeding them, failing after a draw; in every mode and in ``shard_reduce``.
A shard found drawing unseeded runs again (once per function and worker)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from _engine_helpers import pool2  # noqa: F401 (fixture)

import shardc
from shardc import _lowlevel as ll
from shardc.worker.seeding import seed_legacy

pytestmark = pytest.mark.timeout(120)

N = 600
SEED = 11


def reference(fun: Any, n: int = N, seed: int = SEED, **kw: Any) -> list[Any]:
    """Eager seeding, in this process: seed_legacy before each shard, then fun."""
    d = shardc.shards(n, block_size=1)
    out = []
    for i in range(n):
        seed_legacy(seed, i)
        try:
            out.append(fun(d.shard(i, seed), **kw))
        except ValueError as exc:
            out.append(("failed", str(exc)))
    return out


def outcomes(r: Any) -> list[Any]:
    res = list(r.results)
    for sid, f in r.failures.items():
        res[sid] = ("failed", f.message.split(": ", 1)[-1] if hasattr(f, "message") else str(f))
    return res


def always(shard: Any) -> tuple[float, float, float]:
    return (float(np.random.random()), random.random(), float(shard.rng.random()))


def sometimes(shard: Any, count: Any = None) -> Any:
    """Draws from shard.rng first (a rerun must start it afresh), from the legacy ones on a few ids."""
    if count is not None:
        count[shard.id] += 1
    x = float(shard.rng.random())
    if shard.id % 97 == 50:
        return (x, float(np.random.standard_normal()), random.gauss(0.0, 1.0))
    return x


def never(shard: Any, count: Any) -> float:
    count[shard.id] += 1
    return float(shard.rng.random())


def reseeds(shard: Any) -> Any:
    if shard.id % 40 == 7:
        np.random.seed(shard.id)
        random.seed(shard.id)
        return (float(np.random.random()), random.random())
    return shard.id


def np_always_py_sometimes(shard: Any) -> Any:
    """np.random on every shard (seeded eagerly after the first), random on a few (watched)."""
    x = float(np.random.random())
    if shard.id % 61 == 30:
        return (x, random.random())
    return x


def fails_after_a_draw(shard: Any) -> Any:
    if shard.id % 50 == 25 and np.random.random() < 0.5:
        raise ValueError(f"unlucky {shard.id}")
    return shard.id


def test_watch_sees_draws_and_refuses_other_layouts():
    """The fingerprint sees a draw from either generator (bit 0 np.random, bit 1 random) and a reseed;
    another bit generator (or object) is refused."""
    changed = ll.legacy_watch(np.random.mtrand._rand._bit_generator, random._inst)
    assert changed is not None
    changed()
    assert changed() == 0
    np.random.random()
    assert changed() == 1 and changed() == 0
    random.random()
    assert changed() == 2
    random.seed(5)
    np.random.seed(5)
    assert changed() == 3
    assert ll.legacy_watch(np.random.PCG64(1), random._inst) is None
    assert ll.legacy_watch(np.random.mtrand._rand._bit_generator, object()) is None


@pytest.mark.parametrize(
    "fun", [always, sometimes, np_always_py_sometimes, reseeds, fails_after_a_draw], ids=lambda f: f.__name__
)
@pytest.mark.parametrize(
    "opts",
    [{}, {"chunk_size": 1, "autotune": False}, {"chunk_size": 37}],
    ids=["defaults", "chunk1", "chunk37"],
)
def test_outcomes_equal_eager_seeding(pool2, fun, opts):  # noqa: F811
    """Every shard's value (or failure) is the one eager seeding gives, in every rpc form."""
    r = shardc.shard_map(N, fun, seed=SEED, on_failure="collect", max_retries=0, progress=False, **opts)
    assert outcomes(r) == reference(fun)


def test_legacy_learns_each_generator_on_its_own():
    """Legacy, driven as a loop drives it (in process): the probe shard finds np.random
    drawn, so np.random is seeded before every shard and random is watched; a run where
    random is drawn too is found (drawn()) and redo() seeds both; what a function drew
    from is remembered for its next call; a function that draws nothing costs nothing
    (fn is the function itself)."""
    from shardc.worker import seeding

    def run(lg: Any, ids: range) -> list[Any]:
        d = shardc.shards(10_000, block_size=1)
        while True:
            out = [lg.fn(d.shard(i, SEED)) for i in ids]
            if not lg.drawn():
                return out
            lg.redo()

    def np_first(shard: Any) -> Any:  # its own code object: nothing remembered yet
        return np_always_py_sometimes(shard)

    lg = seeding.Legacy(SEED, np_first)
    lg.loop_start(np_first)
    assert lg.probing
    assert run(lg, range(0, 20)) == reference(np_always_py_sometimes, 20)
    assert (lg.eager, lg.probing) == (seeding.NP, False)
    assert run(lg, range(20, 40)) == reference(np_always_py_sometimes, 40)[20:]  # id 30 draws from random
    assert lg.eager == seeding.BOTH
    again = seeding.Legacy(SEED, np_first)
    assert (again.eager, again.probing) == (seeding.BOTH, False)

    def quiet(shard: Any) -> int:
        return shard.id

    lg = seeding.Legacy(SEED, quiet)
    lg.loop_start(quiet)
    run(lg, range(0, 5))
    assert (lg.eager, lg.probing) == (0, False) and lg.loop_start(quiet) is quiet


def counted(shard: Any, count: Any) -> Any:
    """sometimes(), counting runs (a function of its own: workers remember functions that draw)."""
    count[shard.id] += 1
    return sometimes(shard)


def doubled_runs(count: np.ndarray) -> list[list[int]]:
    """The runs of consecutive ids that ran twice."""
    ids = np.flatnonzero(count == 2).tolist()
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def test_a_run_found_drawing_runs_twice_once_per_worker():
    """Lazy: a function that draws on a few ids runs each shard once, but for the
    first run of shards in which a worker meets a draw unseeded, which runs twice
    (once per function and worker: that worker seeds every shard of its later
    calls); a function that never draws runs every shard once."""
    n = 6000
    count = shardc.buffer(np.int64, n)
    want = reference(sometimes, n)
    try:
        with shardc.Pool(2) as pool:
            runs: list[list[int]] = []
            for _ in range(4):
                count.array[:] = 0
                r = pool.shard_map(n, counted, out={"count": count}, seed=SEED, progress=False)
                assert r.results == want
                assert set(count.array.tolist()) <= {1, 2}
                runs += doubled_runs(count.array)
            assert 1 <= len(runs) <= 2, runs  # one per worker, over the four calls
            assert all(any(i % 97 == 50 for i in run) for run in runs), runs
            count.array[:] = 0
            r = pool.shard_map(n, never, out={"count": count}, seed=SEED, progress=False)
            assert (count.array == 1).all() and r.results == reference(never, n, count=np.zeros(n, np.int64))
    finally:
        count.close()


def put(shard: Any, out: Any) -> int:
    v = sometimes(shard)
    out[shard.id] = v if isinstance(v, float) else v[1]
    return 1  # dropped by shm_queue, and counted: once per shard, reruns included


def test_shm_queue_and_reduce_equal_eager_seeding(pool2):  # noqa: F811
    """shm_queue writing into out= and shard_reduce's fold give the eager outcomes too."""
    want = [v if isinstance(v, float) else v[1] for v in reference(sometimes, 6000)]
    out = shardc.buffer(np.float64, 6000)
    try:
        n = len(want)
        r = shardc.shard_map(n, put, out={"out": out}, seed=SEED, dispatch_mode="shm_queue", progress=False)
        assert out.array.tolist() == want and r.diagnostics.returned_ignored == n
    finally:
        out.close()
    r = shardc.shard_reduce(
        N,
        lambda s: [sometimes(s)],
        combine=lambda a, b: a + b,
        init=[],
        seed=SEED,
        progress=False,
    )
    assert r.value == reference(sometimes)


def test_eager_setting_seeds_every_shard(monkeypatch):
    """SHARDC_LEGACY_SEEDING=eager (read by workers when they start): no shard runs twice, same outcomes."""
    monkeypatch.setenv("SHARDC_LEGACY_SEEDING", "eager")
    count = shardc.buffer(np.int64, N)
    try:
        with shardc.Pool(2) as pool:
            r = pool.shard_map(N, sometimes, out={"count": count}, seed=SEED, progress=False)
        assert r.results == reference(sometimes) and (count.array == 1).all()
    finally:
        count.close()


# -- shard.rng's seed from C (shardc/seedseq.py) -------------------------------------------


@pytest.mark.parametrize(
    "entropy,sid", [(0, 0), (1, 0), (12345, 7), (2**32, 2**32 - 1), ((1 << 127) + 99, (1 << 40) + 3), (2**64, 10**6)]
)
def test_shard_rng_is_numpys_stream(entropy, sid):
    """shard_rng(e, id) draws what Generator(PCG64(SeedSequence(e, spawn_key=(id,)))) draws,
    and its seed sequence acts as that SeedSequence (attributes, spawn, generate_state, pickling)."""
    import pickle

    from shardc.seedseq import ShardSeed, shard_rng

    want = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy, spawn_key=(sid,))))
    got = shard_rng(entropy, sid)
    assert isinstance(got.bit_generator.seed_seq, ShardSeed)
    assert got.bit_generator.state == want.bit_generator.state
    assert got.integers(0, 2**62, 5).tolist() == want.integers(0, 2**62, 5).tolist()
    ss, rs = got.bit_generator.seed_seq, want.bit_generator.seed_seq
    assert (ss.entropy, ss.spawn_key, ss.pool.tolist()) == (rs.entropy, rs.spawn_key, rs.pool.tolist())
    first = ss.generate_state(4, np.uint64)
    shard_rng(entropy + 1, sid + 1)  # another generator made meanwhile must not change it
    assert first.tolist() == rs.generate_state(4, np.uint64).tolist() == ss.generate_state(4, np.uint64).tolist()
    assert [c.random() for c in got.spawn(2)] == [c.random() for c in want.spawn(2)]
    back = pickle.loads(pickle.dumps(got))
    assert back.random() == got.random()


def test_shard_rng_in_workers_equals_numpy(pool2):  # noqa: F811
    """shard.rng inside shard_map (seeded) draws NumPy's stream for (entropy, shard id)."""
    r = shardc.shard_map(300, lambda s: float(s.rng.random()), seed=SEED, progress=False)
    d = shardc.shards(300, block_size=1)
    assert r.results == [float(d.shard(i, SEED).rng.random()) for i in range(300)]
    assert r.results[5] == float(
        np.random.Generator(np.random.PCG64(np.random.SeedSequence(SEED, spawn_key=(5,)))).random()
    )


class CrashOnce:
    """sometimes(), but the worker dies (os._exit) the first time it reaches ``at``."""

    def __init__(self, at: int, marker: str) -> None:
        self.at, self.marker = at, marker

    def __call__(self, shard: Any) -> Any:
        import os

        if shard.id == self.at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(3)
        return sometimes(shard)


@pytest.mark.parametrize("at", [10, 147, 3000])
def test_a_worker_death_inside_a_lazy_run_keeps_eager_outcomes(pool2, tmp_path, at):  # noqa: F811
    """A worker killed inside a run (before, at or after a drawing shard): the run is redone
    elsewhere and every outcome still equals eager seeding."""
    n = 6000
    r = shardc.shard_map(n, CrashOnce(at, str(tmp_path / "died")), seed=SEED, max_retries=2, progress=False)
    assert (tmp_path / "died").exists() and not r.failures
    assert r.results == reference(sometimes, n)
