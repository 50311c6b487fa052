"""Public-API tests of ``shard_map`` (rpc_chunked mode): calling contract,
validation before any worker starts, results and failures, seeds, kernels,
pools.  Crashes, hangs and memory supervision are in test_supervision.py."""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from _engine_helpers import assert_no_stray_children, children, drain, fd_targets, no_stray_children, pool2, pool_pids  # noqa: F401 (fixtures)

import shardc
from shardc.errors import RemoteTraceback

pytestmark = pytest.mark.timeout(60)


# -- functions run in workers (module level: pickled by reference) ------------------------------


def ident(shard):
    return shard.id


def shard_info(shard):
    return (shard.id, shard.start, shard.stop, shard.len, shard.indices().tolist(), os.getpid())


def col_sums(shard, X, out):
    out[shard.idx] = X[:, shard.idx].sum(axis=0)
    return float(X[:, shard.idx].sum())


def read_x(shard, X):
    return X[:, shard.idx].copy()


def takes_kwargs(shard, **kw):
    return sorted(kw)


def returns_none_or_raises(shard):
    if shard.id == 1:
        raise ValueError(f"bad shard {shard.id}")
    return None


def draws(shard):
    return (
        shard.rng.integers(0, 2**62, size=4).tolist(),
        np.random.randint(0, 2**31, size=2).tolist(),
        random.random(),
    )


def draws_flaky(shard, marker):
    """Like ``draws``, but shard 3 raises on its first attempt (marker file)."""
    out = draws(shard)
    if shard.id == 3 and not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError("first attempt of shard 3 fails")
    return out


def worker_env(shard):
    return (os.environ.get("SHARDC_TEST_INIT"), "json" in sys.modules, "colorsys" in sys.modules)


def init_callable():
    os.environ["SHARDC_TEST_INIT"] = "callable"


# -- calling contract ---------------------------------------------------------------------------


def test_int_n_runs_one_shard_per_item_in_order(pool2):
    """shard_map(N, fun) gives N single-item shards, results in shard order."""
    r = shardc.shard_map(7, shard_info, progress=False)
    assert [x[:5] for x in r.results] == [(i, i, i + 1, 1, [i]) for i in range(7)]
    assert {x[5] for x in r.results} <= pool_pids(pool2)
    assert len(r) == 7 and r.succeeded and r.failures == {}


def test_descriptors_from_shards_and_shards_list(pool2):
    """Descriptors from shards()/shards_list() reach fun intact, in order."""
    r = shardc.shard_map(shardc.shards(10, block_size=3), shard_info, progress=False)
    assert [x[:5] for x in r.results] == [
        (0, 0, 3, 3, [0, 1, 2]),
        (1, 3, 6, 3, [3, 4, 5]),
        (2, 6, 9, 3, [6, 7, 8]),
        (3, 9, 10, 1, [9]),
    ]
    r = shardc.shard_map(shardc.shards_list([[5, 1], [0], [2, 3, 4]]), shard_info, progress=False)
    assert [(x[0], x[3], x[4]) for x in r.results] == [(0, 2, [5, 1]), (1, 1, [0]), (2, 3, [2, 3, 4])]


def test_borrow_and_out_by_name(pool2):
    """fun(shard, **borrow, **out): borrowed arrays read right, out writes visible after."""
    X = np.arange(60, dtype=np.float64).reshape(6, 10)
    out = shardc.buffer(np.float64, (10,))
    r = shardc.shard_map(shardc.shards(10, block_size=3), col_sums, borrow={"X": X}, out={"out": out}, progress=False)
    np.testing.assert_array_equal(np.asarray(out), X.sum(axis=0))
    assert r.results == [float(X[:, s].sum()) for s in (slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10))]
    assert r.diagnostics.out == {"out": 80}


def test_kwargs_fun_accepts_any_names(pool2):
    """A fun with **kwargs accepts any borrow/out names."""
    out = shardc.buffer(np.int8, (3,))
    r = shardc.shard_map(2, takes_kwargs, borrow={"b": 1, "a": np.ones(2)}, out={"o": out}, progress=False)
    assert r.results == [["a", "b", "o"], ["a", "b", "o"]]


def test_borrow_is_zero_copy_cached_and_recopied_on_mutation(pool2):
    """Borrowed arrays: copied once, then cached; recopied after a mutation; share() by reference."""
    X = np.arange(40, dtype=np.float64).reshape(4, 10)
    d = shardc.shards(10, block_size=5)
    r1 = shardc.shard_map(d, read_x, borrow={"X": X}, progress=False)
    assert r1.diagnostics.borrow["X"]["how"] == "copied"
    assert r1.diagnostics.borrow["X"]["bytes_copied"] == X.nbytes
    drain()
    r2 = shardc.shard_map(d, read_x, borrow={"X": X}, progress=False)
    assert r2.diagnostics.borrow["X"]["how"] == "cached"
    assert r2.diagnostics.borrow["X"]["bytes_copied"] == 0
    np.testing.assert_array_equal(np.hstack(r2.results), X)
    X[2, 7] = -1.0  # the caller mutates the array between calls
    drain()
    r3 = shardc.shard_map(d, read_x, borrow={"X": X}, progress=False)
    assert r3.diagnostics.borrow["X"]["how"] == "copied"
    assert np.hstack(r3.results)[2, 7] == -1.0
    np.testing.assert_array_equal(np.hstack(r3.results), X)
    S = shardc.share(X)
    drain()
    r4 = shardc.shard_map(d, read_x, borrow={"X": S}, progress=False)
    assert r4.diagnostics.borrow["X"]["how"] == "reference"
    assert r4.diagnostics.borrow["X"]["bytes_copied"] == 0
    np.testing.assert_array_equal(np.hstack(r4.results), X)
    S.close()


def test_borrow_dict_of_arrays_pickle5(pool2):
    """A dict of arrays is borrowed through pickle-5 with its big buffers out of band."""
    D = {"a": np.arange(100_000, dtype=np.float64), "b": np.full(3, 2.0), "name": "cfg"}

    def use(shard, D):
        return (float(D["a"][shard.id * 1000]), float(D["b"].sum()), D["name"])

    r = shardc.shard_map(3, use, borrow={"D": D}, progress=False)
    assert r.results == [(0.0, 6.0, "cfg"), (1000.0, 6.0, "cfg"), (2000.0, 6.0, "cfg")]
    assert r.diagnostics.borrow["D"]["kind"] != "array"


def test_fun_capturing_buffer_global_and_closure(pool2):
    """A fun capturing a shardc.buffer (as global or closure) writes into the caller's buffer."""
    # A script's fun lives in __main__, so cloudpickle sends it by value with
    # the globals it uses; build one like that (this module's own functions
    # are sent by reference and would see the worker's copy of the module).
    ns = {"__name__": "__main__"}
    exec("def write_global(shard):\n    GBUF[shard.id] = shard.id * 10 + 1\n", ns)
    ns["GBUF"] = gbuf = shardc.buffer(np.int64, (6,))
    shardc.shard_map(6, ns["write_global"], progress=False)
    np.testing.assert_array_equal(np.asarray(gbuf), [1, 11, 21, 31, 41, 51])
    gbuf.close()
    drain()
    B = shardc.buffer(np.float32, (1_000_000,))  # 4 MB

    def closure(shard):
        B[shard.id] = shard.id + 0.5

    r = shardc.shard_map(5, closure, progress=False)
    np.testing.assert_array_equal(np.asarray(B)[:6], [0.5, 1.5, 2.5, 3.5, 4.5, 0.0])
    assert r.diagnostics.bytes_setup < 100_000  # sent by reference, not its 4 MB by value


# -- validation: before any worker starts -------------------------------------------------------

_LOCK = threading.Lock()


def _unpicklable_fun():
    def f(shard):  # nested: cloudpickle sends it by value, with the globals it uses
        with _LOCK:
            return shard.id

    return f


def _unpicklable_closure():
    lk = threading.Lock()

    def f(shard):
        with lk:
            return shard.id

    return f


def _kwdefault_fun():
    def f(shard, *, lk=_LOCK):
        return shard.id

    return f


def two_args(shard, X):
    return shard.id


_BUF = None


def _buf():
    global _BUF
    if _BUF is None or _BUF.closed:
        _BUF = shardc.buffer(np.float64, (4,))
    return _BUF


VALIDATION = [
    (
        "unknown-borrow-name",
        lambda: dict(fun=two_args, borrow={"X": 1, "Y": 2}),
        shardc.BindingError,
        r"has no parameter 'Y'",
    ),
    (
        "unknown-out-name",
        lambda: dict(fun=two_args, borrow={"X": 1}, out={"Z": _buf()}),
        shardc.BindingError,
        r"has no parameter 'Z'",
    ),
    ("missing-required", lambda: dict(fun=two_args), shardc.BindingError, r"requires an argument 'X'"),
    (
        "kernel-unknown-name",
        lambda: dict(kernel="col_means", borrow={"Y": np.ones((2, 4))}, out={"out": _buf()}),
        shardc.BindingError,
        r"kernel 'col_means' has no parameter 'Y'",
    ),
    (
        "fun-and-kernel",
        lambda: dict(fun=ident, kernel="col_means"),
        shardc.InvalidArgumentError,
        r"either fun= or kernel=, not both",
    ),
    ("neither", lambda: dict(), shardc.InvalidArgumentError, r"give the function to run"),
    (
        "unknown-kernel",
        lambda: dict(kernel="no_such_kernel"),
        shardc.InvalidArgumentError,
        r"kernel 'no_such_kernel' is not registered; known kernels: .*col_means",
    ),
    (
        "unpicklable",
        lambda: dict(fun=_unpicklable_fun()),
        shardc.UnpicklableFunctionError,
        r"global '_LOCK' of type lock",
    ),
    (
        "unpicklable-closure",
        lambda: dict(fun=_unpicklable_closure()),
        shardc.UnpicklableFunctionError,
        r"closure variable 'lk' of type lock",
    ),
    (
        "unpicklable-default",
        lambda: dict(fun=lambda shard, lk=_LOCK: 1),
        shardc.UnpicklableFunctionError,
        r"default of argument 'lk' of type lock",
    ),
    (
        "unpicklable-kwdefault",
        lambda: dict(fun=_kwdefault_fun()),
        shardc.UnpicklableFunctionError,
        r"default of argument 'lk' of type lock",
    ),
    ("mem_cap", lambda: dict(fun=ident, mem_cap="2XB"), shardc.InvalidArgumentError, r"mem_cap='2XB' is not a size"),
    ("cow", lambda: dict(fun=ident, cow="copy"), shardc.InvalidArgumentError, r"cow='copy' is not supported"),
    (
        "profile",
        lambda: dict(fun=ident, profile="fast"),
        shardc.InvalidArgumentError,
        r"profile='fast' is not supported",
    ),
    (
        "dispatch_mode",
        lambda: dict(fun=ident, dispatch_mode="threads"),
        shardc.InvalidArgumentError,
        r"dispatch_mode='threads' is not supported",
    ),
    ("workers-0", lambda: dict(fun=ident, workers=0), shardc.InvalidArgumentError, r"workers must be >= 1, got 0"),
    ("workers-neg", lambda: dict(fun=ident, workers=-2), shardc.InvalidArgumentError, r"workers must be >= 1"),
    ("workers-float", lambda: dict(fun=ident, workers=1.5), shardc.InvalidArgumentError, r"workers must be an integer"),
    (
        "chunk_size-0",
        lambda: dict(fun=ident, chunk_size=0),
        shardc.InvalidArgumentError,
        r"chunk_size must be >= 1, got 0",
    ),
    (
        "chunk_size-str",
        lambda: dict(fun=ident, chunk_size="big"),
        shardc.InvalidArgumentError,
        r"chunk_size must be an integer",
    ),
    ("timeout-0", lambda: dict(fun=ident, timeout=0), shardc.InvalidArgumentError, r"timeout must be a positive"),
    ("timeout-str", lambda: dict(fun=ident, timeout="5"), shardc.InvalidArgumentError, r"timeout must be a positive"),
    (
        "timeout-nan",
        lambda: dict(fun=ident, timeout=float("nan")),
        shardc.InvalidArgumentError,
        r"timeout must be a positive",
    ),
    (
        "max_retries",
        lambda: dict(fun=ident, max_retries=-1),
        shardc.InvalidArgumentError,
        r"max_retries must be >= 0, got -1",
    ),
    ("seed-neg", lambda: dict(fun=ident, seed=-1), shardc.InvalidArgumentError, r"seed must be None or a non-negative"),
    (
        "seed-float",
        lambda: dict(fun=ident, seed=1.5),
        shardc.InvalidArgumentError,
        r"seed must be None or a non-negative",
    ),
    (
        "out-plain-ndarray",
        lambda: dict(fun=two_args, borrow={"X": 1}, out={"o": np.zeros(3)}),
        shardc.InvalidArgumentError,
        r"out\['o'\] must be a shardc.buffer",
    ),
    (
        "both-borrow-and-out",
        lambda: dict(fun=two_args, borrow={"X": 1}, out={"X": _buf()}),
        shardc.InvalidArgumentError,
        r"names \['X'\] appear in both borrow= and out=",
    ),
    (
        "dispatch_opts",
        lambda: dict(fun=ident, dispatch_opts={"block_size": 4}),
        shardc.InvalidArgumentError,
        r"dispatch_opts keys \['block_size'\] do not apply to dispatch_mode='rpc_chunked'",
    ),
    (
        "dispatch_opts-type",
        lambda: dict(fun=ident, dispatch_opts=["prefetch"]),
        shardc.InvalidArgumentError,
        r"dispatch_opts must be a dict",
    ),
    (
        "autotune-str",
        lambda: dict(fun=ident, autotune="sometimes"),
        shardc.InvalidArgumentError,
        r"autotune must be None, True, False",
    ),
    (
        "autotune-keys",
        lambda: dict(fun=ident, autotune={"rounds": 3}),
        shardc.InvalidArgumentError,
        r"autotune has unknown keys \['rounds'\]",
    ),
    (
        "autotune-mode",
        lambda: dict(fun=ident, autotune={"mode": "offline"}),
        shardc.InvalidArgumentError,
        r"autotune mode 'offline' is not supported",
    ),
    (
        "scheduler_policy",
        lambda: dict(fun=ident, scheduler_policy={"max_huge": 1}),
        shardc.InvalidArgumentError,
        r"scheduler_policy has unknown keys \['max_huge'\]",
    ),
    (
        "on_failure",
        lambda: dict(fun=ident, on_failure="ignore"),
        shardc.InvalidArgumentError,
        r"on_failure='ignore' is not supported",
    ),
]


@pytest.mark.parametrize("kwargs,exc,msg", [v[1:] for v in VALIDATION], ids=[v[0] for v in VALIDATION])
def test_validation_error_before_any_worker_starts(kwargs, exc, msg):
    """Each bad argument raises its error naming the culprit, with no pool and no child created."""
    shardc.pool_stop()
    kw = kwargs()
    before = children()
    with pytest.raises(exc, match=msg):
        shardc.shard_map(4, progress=False, **kw)
    assert shardc.pool_get() is None
    assert children() - before == set()


def test_bad_shards_argument_rejected_before_workers():
    """shards= must be an int or a descriptor."""
    shardc.pool_stop()
    with pytest.raises(shardc.InvalidArgumentError, match=r"shards must be an int N or a descriptor"):
        shardc.shard_map([1, 2, 3], ident, progress=False)
    with pytest.raises(shardc.ShardSpecError):
        shardc.shard_map(-3, ident, progress=False)
    assert shardc.pool_get() is None


# -- results and failures -----------------------------------------------------------------------


def test_failed_shard_is_distinguishable_from_none(pool2):
    """A failed shard is a FailedShard in results, a None return stays None."""
    r = shardc.shard_map(3, returns_none_or_raises, max_retries=1, on_failure="collect", progress=False)
    assert r.results[0] is None and r.results[2] is None
    assert isinstance(r.results[1], shardc.FailedShard) and not r.results[1]
    assert not r.succeeded and list(r.failures) == [1]
    f = r.failures[1]
    assert r.results[1].failure is f
    assert (f.shard_id, f.attempts, f.error_type, f.message) == (1, 2, "builtins.ValueError", "bad shard 1")
    assert f.history == ["attempt 1: ValueError: bad shard 1", "attempt 2: ValueError: bad shard 1"]
    assert "in returns_none_or_raises" in f.traceback and 'raise ValueError(f"bad shard {shard.id}")' in f.traceback
    assert isinstance(f.exception, ValueError) and str(f.exception) == "bad shard 1"
    assert isinstance(f.exception.__cause__, RemoteTraceback)
    assert f.exception.__cause__.tb == f.traceback
    with pytest.raises(shardc.ShardcError, match=r"1 shard\(s\) failed"):
        r.values()


def test_on_failure_raise_carries_the_result(pool2):
    """Default on_failure='raise' raises ShardMapError with .result holding everything."""
    with pytest.raises(shardc.ShardMapError) as ei:
        shardc.shard_map(3, returns_none_or_raises, max_retries=0, progress=False)
    err = ei.value
    assert str(err).startswith("1 of 3 shards failed; first: shard 1 after 1 attempt(s): ValueError: bad shard 1")
    res = err.result
    assert isinstance(res, shardc.ShardResult) and not res.succeeded
    assert res.results[0] is None and isinstance(res.results[1], shardc.FailedShard)
    assert res.failures[1].attempts == 1
    assert isinstance(err.__cause__, ValueError) and isinstance(err.__cause__.__cause__, RemoteTraceback)


def mostly_ok(shard):
    if shard.id % 3 == 0:
        raise ValueError(f"shard {shard.id}")
    return shard.id


def test_diagnostics_off_still_reports_failures_and_retries(pool2):
    """diagnostics=False keeps results, failures and retry counts exact."""
    r = shardc.shard_map(10, mostly_ok, diagnostics=False, max_retries=1, on_failure="collect", progress=False)
    assert list(r.failures) == [0, 3, 6, 9] and all(f.attempts == 2 for f in r.failures.values())
    assert [x for i, x in enumerate(r.results) if i % 3] == [i for i in range(10) if i % 3]
    assert r.diagnostics.retries == 4


def test_many_tiny_shards_in_order_with_auto_chunks(pool2):
    """20k tiny shards with chunk_size='auto' come back complete and in order."""
    r = shardc.shard_map(20_000, ident, chunk_size="auto", progress=False)
    assert r.results == list(range(20_000)) and r.diagnostics.completed == 20_000
    assert r.diagnostics.autotune, "chunk size was never tuned"


# -- seeds --------------------------------------------------------------------------------------


def test_seeded_draws_identical_across_workers_and_chunking(pool2, tmp_path):
    """seed=s: shard.rng, np.random and random draws do not depend on workers, chunking or retries."""
    d = shardc.shards(12, block_size=1)
    base = shardc.shard_map(d, draws, seed=1234, workers=2, chunk_size=1, progress=False).results
    assert len({str(x) for x in base}) == 12
    runs = {
        "chunk7": dict(shards=d, chunk_size=7),
        "auto": dict(shards=d, chunk_size="auto"),
        "int-N": dict(shards=12),
    }
    for name, kw in runs.items():
        drain()
        got = shardc.shard_map(kw.pop("shards"), draws, seed=1234, progress=False, **kw).results
        assert got == base, name
    drain()
    one = shardc.shard_map(d, draws, seed=1234, workers=1, progress=False).results
    assert one == base
    marker = str(tmp_path / "retried")
    drain()
    r = shardc.shard_map(d, draws_flaky, borrow={"marker": marker}, seed=1234, workers=2, progress=False)
    assert os.path.exists(marker) and r.diagnostics.retries == 1
    assert r.results == base
    drain()
    other = shardc.shard_map(d, draws, seed=1235, progress=False).results
    assert all(a != b for a, b in zip(other, base))


def test_callers_rng_state_untouched(pool2):
    """A seeded run leaves the caller's np.random and random states as they were."""
    np.random.seed(99)
    random.seed(99)
    np_state = np.random.get_state()
    py_state = random.getstate()
    shardc.shard_map(4, draws, seed=7, progress=False)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert random.getstate() == py_state


def test_unseeded_shards_get_distinct_streams(pool2):
    """Without a seed every shard draws a different stream, across workers too."""
    r = shardc.shard_map(shardc.shards(20, block_size=1), draws, progress=False)
    assert len({str(x[0]) for x in r.results}) == 20
    assert len({str(x[1]) for x in r.results}) == 20
    assert len({x[2] for x in r.results}) == 20
    drain()
    r2 = shardc.shard_map(shardc.shards(20, block_size=1), draws, progress=False)
    assert {str(x[0]) for x in r.results}.isdisjoint({str(x[0]) for x in r2.results})


# -- kernels ------------------------------------------------------------------------------------


def scale_kernel(shard, X, out):
    out[shard.idx] = X[shard.idx] * 2


def test_register_and_run_kernel(pool2):
    """register_kernel adds a name to list_kernels and shard_map(kernel=...) runs it."""
    k = shardc.register_kernel("test_scale2", scale_kernel, footprint=1024, description="x2")
    assert k.name == "test_scale2"
    names = shardc.list_kernels()
    assert {"col_means", "col_vars", "crossprod_tile", "test_scale2"} <= set(names) and names == sorted(names)
    X = np.arange(9.0)
    out = shardc.buffer(np.float64, (9,))
    shardc.shard_map(
        shardc.shards(9, block_size=4), kernel="test_scale2", borrow={"X": X}, out={"out": out}, progress=False
    )
    np.testing.assert_array_equal(np.asarray(out), X * 2)
    with pytest.raises(shardc.InvalidArgumentError, match=r"impl must be callable"):
        shardc.register_kernel("bad", 3)
    with pytest.raises(shardc.InvalidArgumentError, match=r"footprint must be bytes"):
        shardc.register_kernel("bad", scale_kernel, footprint=-1)


def test_col_means_and_col_vars_match_numpy(pool2):
    """col_means and col_vars (ddof=1) match NumPy, with NaN, inf and constant columns."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 13)) * 1e3 + 5
    X[4, 2] = np.nan
    X[7, 5] = np.inf
    X[:, 9] = 3.0
    d = shardc.shards(13, block_size=4)
    means = shardc.buffer(np.float64, (13,))
    var = shardc.buffer(np.float64, (13,))
    shardc.shard_map(d, kernel="col_means", borrow={"X": X}, out={"out": means}, progress=False)
    drain()
    shardc.shard_map(d, kernel="col_vars", borrow={"X": X}, out={"out": var}, progress=False)
    with np.errstate(invalid="ignore"):
        ref_var = np.var(X, axis=0, ddof=1)
        ref_mean = X.mean(axis=0)
    np.testing.assert_allclose(np.asarray(means), ref_mean, rtol=1e-12, equal_nan=True)
    got = np.asarray(var)
    np.testing.assert_allclose(got, ref_var, rtol=1e-10, equal_nan=True)
    assert np.isnan(got[2]) and np.isnan(got[5]) and got[9] == 0.0
    one = np.arange(6.0).reshape(1, 6)
    v1 = shardc.buffer(np.float64, (6,), init=7.0)
    drain()
    shardc.shard_map(
        shardc.shards(6, block_size=4), kernel="col_vars", borrow={"X": one}, out={"out": v1}, progress=False
    )
    assert np.isnan(np.asarray(v1)).all()


def test_crossprod_tile_matches_matmul(pool2):
    """crossprod_tile over tiles2d (ragged edges) fills Z = X.T @ Y."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 11))
    Y = rng.normal(size=(30, 7))
    Z = shardc.buffer(np.float64, (11, 7), init=np.nan)
    tiles = shardc.tiles2d(11, 7, 4, 3)
    assert tiles.num_shards == 9
    shardc.shard_map(tiles, kernel="crossprod_tile", borrow={"X": X, "Y": Y}, out={"Z": Z}, progress=False)
    np.testing.assert_allclose(np.asarray(Z), X.T @ Y, rtol=1e-12, atol=1e-12)


def test_footprint_classification():
    """Footprints classify as tiny (<8 MB), medium (<64 MB) or huge."""
    k = shardc.register_kernel("test_fp", scale_kernel, footprint=lambda s: s.len * 2**20)
    d = shardc.shards_list([[0] * 1, list(range(8)), list(range(63)), list(range(64))])
    assert [k.classify(s) for s in d] == [
        ("tiny", 2**20),
        ("medium", 8 * 2**20),
        ("medium", 63 * 2**20),
        ("huge", 64 * 2**20),
    ]
    k2 = shardc.register_kernel("test_fp2", scale_kernel, footprint={"class": "huge"})
    assert k2.classify(d[0]) == ("huge", None)
    assert shardc.register_kernel("test_fp3", scale_kernel).classify(d[0]) == ("tiny", None)
    assert shardc.register_kernel("test_fp4", scale_kernel, footprint={"bytes": 9 * 2**20}).classify(d[0]) == (
        "medium",
        9 * 2**20,
    )


@pytest.mark.parametrize(
    "fp,msg",
    [
        ({"class": "enormous"}, r"footprint class 'enormous' is not tiny/medium/huge"),
        ({}, r"a footprint dict has 'class'"),
        ({"bytes": -5}, r"footprint bytes must be a number >= 0"),
        (float("nan"), r"footprint must be bytes"),
        (-1, r"footprint must be bytes"),
    ],
    ids=["bad-class", "empty-dict", "negative-bytes", "nan", "negative"],
)
def test_register_kernel_rejects_bad_footprints(fp, msg):
    """A bad footprint is rejected when the kernel is registered, not mid-run."""
    with pytest.raises(shardc.InvalidArgumentError, match=msg):
        shardc.register_kernel("test_badfp", scale_kernel, footprint=fp)
    assert "test_badfp" not in shardc.list_kernels()


def huge_kernel(shard, out):
    time.sleep(0.02)
    out[shard.id] = shard.id + 1


def test_max_huge_concurrency_throttles_and_completes(pool2):
    """max_huge_concurrency=1 throttles huge shards (no two overlap) and completes every shard."""
    shardc.register_kernel("test_huge", huge_kernel, footprint=128 * 2**20)
    out = shardc.buffer(np.int64, (8,))
    r = shardc.shard_map(
        shardc.shards(8, block_size=1),
        kernel="test_huge",
        out={"out": out},
        scheduler_policy={"max_huge_concurrency": 1},
        progress=False,
    )
    np.testing.assert_array_equal(np.asarray(out), np.arange(1, 9))
    d = r.diagnostics
    assert d.throttles > 0 and r.succeeded and d.completed == 8
    spans = sorted(zip(d.shard_t0.tolist(), d.shard_t1.tolist()))
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:])), "two huge shards ran at once"


# -- pools --------------------------------------------------------------------------------------


def test_pool_context_manager_reuses_workers():
    """Pool(2).shard_map reuses the same worker pids across calls; stop ends them."""
    with shardc.Pool(2) as pool:
        pids = {w.pid for w in pool.workers}
        r1 = pool.shard_map(6, shard_info, progress=False)
        drain(pool)
        r2 = pool.shard_map(6, shard_info, progress=False)
        assert {x[5] for x in r1.results} | {x[5] for x in r2.results} <= pids
        assert {w.pid for w in pool.workers} == pids and len(pids) == 2
        with pytest.raises(shardc.InvalidArgumentError, match=r"workers=3 conflicts"):
            pool.shard_map(2, ident, workers=3, progress=False)
    assert pool.closed
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=3)
    assert not alive
    with pytest.raises(shardc.ClosedError):
        pool.shard_map(2, ident, progress=False)


def test_module_level_pool_functions():
    """pool_create/get/status/health_check/stop manage the default pool."""
    shardc.pool_stop()
    assert shardc.pool_get() is None and shardc.pool_status() == []
    with pytest.raises(shardc.ClosedError):
        shardc.pool_health_check()
    p = shardc.pool_create(2)
    assert shardc.pool_get() is p and p.size == 2
    st = shardc.pool_status()
    assert [s["worker"] for s in st] == [0, 1] and {s["pid"] for s in st} == {w.pid for w in p.workers}
    assert all(s["state"] == "idle" and s["rss"] > 0 and s["restarts"] == 0 for s in st)
    hc = shardc.pool_health_check()
    assert hc["workers"] == 2 and [a["action"] for a in hc["actions"]] == ["none", "none"]
    r = shardc.shard_map(4, shard_info, workers=None, progress=False)
    assert shardc.pool_get() is p and {x[5] for x in r.results} <= pool_pids(p)
    pids = pool_pids(p)
    shardc.pool_stop()
    assert shardc.pool_get() is None and p.closed
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_packages_and_init_expr_run_in_each_worker():
    """packages= and init_expr (callable and code string) run in every worker."""
    shardc.pool_stop()
    sys.modules.pop("colorsys", None)
    assert os.environ.get("SHARDC_TEST_INIT") is None
    r = shardc.shard_map(
        shardc.shards(6, block_size=1),
        worker_env,
        workers=2,
        packages=["json", "colorsys"],
        init_expr=init_callable,
        progress=False,
    )
    assert r.results == [("callable", True, True)] * 6
    assert "colorsys" not in sys.modules and os.environ.get("SHARDC_TEST_INIT") is None
    code = "import os\nos.environ['SHARDC_TEST_INIT'] = 'string'"
    drain()
    r = shardc.shard_map(shardc.shards(6, block_size=1), worker_env, workers=2, init_expr=code, progress=False)
    assert r.results == [("string", "json" in sys.modules, False)] * 6
    shardc.pool_stop()
    with pytest.raises(shardc.InvalidArgumentError, match=r"init_expr is not valid Python"):
        shardc.Pool(2, init_expr="def (")


def test_pool_starts_fast():
    """A 2-worker pool starts in well under a second."""
    t0 = time.perf_counter()
    with shardc.Pool(2) as pool:
        dt = time.perf_counter() - t0
        print(f"\n2-worker pool started in {dt * 1e3:.1f} ms (pool says {pool.start_seconds * 1e3:.1f} ms)")
        assert pool.shard_map(2, ident, progress=False).results == [0, 1]
    assert dt < 0.5


def blas_state(shard):
    from threadpoolctl import threadpool_info

    return (
        [(i["internal_api"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"],
        len(os.listdir("/proc/self/task")),
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_workers_run_blas_single_threaded_without_a_spinning_thread_pool():
    """Workers limit BLAS to one thread, and an OpenBLAS worker holds no BLAS thread.

    OpenBLAS restarts its thread pool (stopped before every fork) when its
    thread count is set, and each pool thread busy-waits ~0.1 s: the worker
    would be two threads, one burning a CPU the kernels need."""
    from threadpoolctl import threadpool_info

    if not any(i["internal_api"] == "openblas" and i.get("threading_layer") == "pthreads" for i in threadpool_info()):
        pytest.skip("NumPy is not linked to a pthreads OpenBLAS")
    with shardc.Pool(2) as pool:
        for w in pool.workers:
            assert len(os.listdir(f"/proc/{w.pid}/task")) == 1, "a fresh worker has an extra thread"
        r = pool.shard_map(2, blas_state, progress=False)
    for libs, threads in r.results:
        assert libs and all(n == 1 for _, n in libs), libs
        assert threads == 1


# -- engine regressions (bugs found and fixed) ------------------------------------------------------


def fail_first_and_count_maps(shard, X, out):
    if shard.id == 0:
        try:
            raise ValueError("shard 0 fails")
        except ValueError as exc:
            kept = exc  # a reference cycle: exc -> traceback -> this frame -> kept -> exc
            raise kept
    with open("/proc/self/maps") as f:
        out[shard.id] = sum(1 for _ in f) + 0 * X[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts mappings in /proc")
@pytest.mark.parametrize("mode", ["rpc_chunked", "shm_queue"])
def test_a_failed_shard_leaves_no_mapping_behind(mode):
    """The frames of a failed shard's traceback hold its arguments (mapped views)
    and, in shm_queue mode, the loop's task ring: a worker failing one shard per
    call used to keep 1-3 more mappings after every call."""
    X = shardc.share(np.arange(4096.0))
    out = shardc.buffer(np.float64, (6,), init=0.0)
    counts = []
    try:
        with shardc.Pool(1) as pool:
            for _ in range(5):
                r = pool.shard_map(
                    shardc.shards(6, block_size=1),
                    fail_first_and_count_maps,
                    borrow={"X": X},
                    out={"out": out},
                    dispatch_mode=mode,
                    on_failure="collect",
                    max_retries=0,
                    progress=False,
                )
                assert list(r.failures) == [0]
                counts.append(int(out.array[1:].max()))
        assert counts[4] <= counts[1], counts
    finally:
        out.close()
        X.close()


def test_new_segment_right_after_end():
    """A call that brings a new borrowed array right after another call still sets up every worker."""
    import signal

    with shardc.Pool(2) as pool:
        slow = pool.workers[0].pid
        stopped = pool.workers[1].pid

        def first(shard):
            # Worker 1 (shards 2, 3) finishes first and then stops itself while
            # blocked reading, so 'end' and the next 'call' wait in its socket.
            if os.getpid() == slow:
                time.sleep(0.3)
            elif shard.id == 3:
                threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGSTOP)).start()
            return shard.id

        assert pool.shard_map(shardc.shards(4, block_size=1), first, progress=False).results == [0, 1, 2, 3]
        t = threading.Timer(0.3, os.kill, (stopped, signal.SIGCONT))
        t.start()
        try:
            X = np.full(4, 5.0)
            r = pool.shard_map(4, read_first, borrow={"X": X}, progress=False)
        finally:
            t.join()
            os.kill(stopped, signal.SIGCONT)
        assert r.results == [5.0] * 4


def read_first(shard, X):
    return float(X[shard.id])


def _borrowed_fds(pid):
    return [t for t in fd_targets(pid) if "shardc.in." in t]


def test_workers_release_borrowed_copies_of_past_calls():
    """Copies of borrowed arrays that the caller dropped are released by the workers too."""
    import gc

    with shardc.Pool(2) as pool:
        for i in range(12):
            X = np.full(1000, float(i))
            drain(pool)
            assert pool.shard_map(2, read_first, borrow={"X": X}, progress=False).results == [float(i)] * 2
            del X
            gc.collect()
        drain(pool)
        held = {w.pid: len(_borrowed_fds(w.pid)) for w in pool.workers}
        assert max(held.values()) <= 2, f"borrowed-input segments still held by workers: {held}"


@pytest.mark.parametrize(
    "kw",
    [{"packages": ["no_such_module_xyz"]}, {"init_expr": "raise ValueError('nope')"}],
    ids=["packages", "init_expr"],
)
def test_worker_start_failure_names_packages_and_init_expr(kw):
    """A worker that cannot start (missing package, failing init_expr) gives an error pointing at them."""
    shardc.pool_stop()
    with pytest.raises(RuntimeError, match=r"failed to start .*check packages= and init_expr="):
        shardc.shard_map(2, ident, workers=2, progress=False, **kw)
    assert shardc.pool_get() is None


def test_closed_buffer_is_released_by_workers_at_once():
    """Closing an out buffer after a call makes idle workers unmap it right away (no next call needed)."""
    with shardc.Pool(2) as pool:
        buf = shardc.buffer(np.uint8, 64 << 20)

        def touch(s, out):
            out[s.id * (32 << 20) : (s.id + 1) * (32 << 20)] = 1  # each worker maps and dirties it

        pool.shard_map(2, touch, out={"out": buf}, progress=False)
        key = buf.segment.key
        pids = [w.pid for w in pool.workers]

        def mapped(pid):
            try:
                return any(f"shardc.out.{key}" in line for line in open(f"/proc/{pid}/maps"))
            except OSError:
                return False

        assert any(mapped(p) for p in pids)
        buf.close()
        deadline = time.monotonic() + 5
        while any(mapped(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(mapped(p) for p in pids)
        assert all(key not in w.known for w in pool.workers)


def test_profile_speed_picks_shm_queue_only_when_it_applies(pool2):
    """profile='speed' runs shard_map(N, out=...) in shm_queue; an explicit dispatch_mode, a
    descriptor or no out buffer keep rpc_chunked."""
    out = shardc.buffer(np.int64, 50)
    f = lambda s, out: out.__setitem__(s.id, s.id)  # noqa: E731
    modes = [
        shardc.shard_map(50, f, out={"out": out}, profile="speed", progress=False).diagnostics.mode,
        shardc.shard_map(
            50, f, out={"out": out}, profile="speed", dispatch_mode="rpc_chunked", progress=False
        ).diagnostics.mode,
        shardc.shard_map(
            shardc.shards(50, block_size=1), f, out={"out": out}, profile="speed", progress=False
        ).diagnostics.mode,
        shardc.shard_map(50, lambda s: s.id, profile="speed", progress=False).diagnostics.mode,
    ]
    assert modes == ["shm_queue", "rpc_chunked", "rpc_chunked", "rpc_chunked"]
    assert np.array_equal(out.array, np.arange(50))
    out.close()


def test_profile_memory_halves_the_drift_threshold():
    """profile='memory' recycles at half the drift that the default profile tolerates."""
    with shardc.Pool(1) as pool:
        w = pool.workers[0]
        w.baseline, w.cow_slack = 100 * 2**20, 0
        w.last_mem = {
            "rss": 0,
            "pss": 0,
            "uss": 0,
            "swap": 0,
            "anon": 0,
            "precise": 1,
            "pss_anon": 100 * 2**20 + 40 * 2**20,
        }  # grew 40 MiB = 0.4x the baseline
        assert pool.memory_verdict(w, None, 0.5, "default") is None
        kind, reason = pool.memory_verdict(w, None, 0.5, "memory")
        assert kind == "drift" and "recycle=0.25" in reason
        assert pool.memory_verdict(w, 130 * 2**20, None, "default")[0] == "cap"
