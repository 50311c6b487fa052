"""Fuzzing the public API with hypothesis: random and hostile arguments to
``shards``, ``shards_list``, ``tiles2d``, ``buffer``, ``buffer_open``,
``share``, ``shard_map``, ``shard_reduce`` and the reports.  Every call either works or raises
a ``ShardcError`` subclass whose message names the bad argument; never a
crash, a hang, a leaked segment, or a worker started for invalid input.

Bounded for CI (the whole file well under 40 s); ``SHARDC_FUZZ_EXAMPLES=N``
(or ``bench/fuzz.py``) runs N examples per property instead."""

from __future__ import annotations

import math
import os
import threading
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import shardc
from shardc.errors import ShardcError, ShardMapError
from shardc.shards import parse_count

pytestmark = pytest.mark.timeout(120 if not os.environ.get("SHARDC_FUZZ_EXAMPLES") else 7200)

EXAMPLES = int(os.environ.get("SHARDC_FUZZ_EXAMPLES", "0")) or None
FAST = settings(
    max_examples=EXAMPLES or 600,
    deadline=None,
    derandomize=EXAMPLES is None,  # CI: the same examples every run
    suppress_health_check=list(HealthCheck),
    database=None,
)
SLOW = settings(FAST, max_examples=EXAMPLES or 200)

# Values no argument of the API expects, and edge values of the right type.
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.tuples(st.integers(-3, 5), st.integers(-3, 5)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(
        [
            object(),
            np.int64(-1),
            np.float32("nan"),
            np.array([1, 2]),
            np.array([[1]]),
            complex(1, 1),
            "10K",
            "1e3",
            " 3B",
            "auto",
            "-1",
            "0",
            float("inf"),
            2**63,
            -(2**63),
            [],
            {},
            (),
            slice(1),
            ...,
            b"\0",
        ]
    ),
)


def check_error(exc: BaseException, *names: str) -> None:
    """``exc`` is a ShardcError whose message names one of ``names``."""
    assert isinstance(exc, ShardcError), f"{type(exc).__name__} (not a ShardcError): {exc}"
    msg = str(exc)
    assert any(n in msg for n in names), f"message does not name {names}: {msg!r}"


def call(fn: Any, names: tuple[str, ...], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``: its result, or None after checking the error it raised."""
    try:
        return fn(*args, **kwargs)
    except ShardcError as exc:
        check_error(exc, *names)
    except Exception as exc:  # noqa: BLE001 - any other type is the finding
        raise AssertionError(f"{fn.__name__}{args!r}{kwargs!r} raised {type(exc).__name__}: {exc}") from exc
    return None


# -- shard descriptors ---------------------------------------------------------------------------

SHARDS_ARGS = [
    "n",
    "block_size",
    "workers",
    "strategy",
    "min_shards_per_worker",
    "max_shards_per_worker",
    "scratch_bytes_per_item",
    "scratch_budget",
]


@FAST
@given(arg=st.sampled_from(SHARDS_ARGS), value=HOSTILE, n=st.integers(1, 10**6))
def test_shards_hostile(arg: str, value: Any, n: int) -> None:
    """shards() with one hostile argument: a descriptor, or a ShardcError naming that argument."""
    kwargs: dict[str, Any] = {"n": n, "workers": 2}
    kwargs[arg] = value
    d = call(shardc.shards, (arg,), **kwargs)
    if d is not None:
        assert d.num_shards >= 1
        last = d.shard(d.num_shards - 1)
        assert last.stop <= d.n


@FAST
@given(
    idxs=st.one_of(HOSTILE, st.lists(HOSTILE, max_size=4), st.lists(st.lists(st.integers(-(2**64), 2**64)), max_size=3))
)
def test_shards_list_hostile(idxs: Any) -> None:
    """shards_list() with hostile index lists: a descriptor, or a ShardcError naming idxs."""
    d = call(shardc.shards_list, ("idxs",), idxs)
    if d is not None:
        assert d.num_shards == len(idxs)


@FAST
@given(which=st.integers(0, 3), value=HOSTILE)
def test_tiles2d_hostile(which: int, value: Any) -> None:
    """tiles2d() with one hostile dimension: tiles, or a ShardcError naming it."""
    args: list[Any] = [5, 7, 2, 3]
    args[which] = value
    d = call(shardc.tiles2d, (["n_x", "n_y", "block_x", "block_y"][which],), *args)
    if d is not None:
        assert d.num_shards == math.ceil(d.n_x / d.block_x) * math.ceil(d.n_y / d.block_y)


# -- buffers and shared inputs ---------------------------------------------------------------------

DTYPES = st.one_of(
    HOSTILE, st.sampled_from(["f8", "int8", "u2", "c16", "?", "U3", "S0", "O", "V0", "i4,f8", "M8[s]", np.float32])
)


def _not_huge(v: Any) -> bool:
    """Leave out numbers that are valid sizes too big to fill (a 2**40-item buffer is
    addressable: creating and filling it would exhaust this machine, not test shardc)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return True
    return not (1024 < abs(float(v)) < 2**62) or v != v


def _not_huge_dtype(d: Any) -> bool:
    """Leave out valid dtypes with gigantic items ('U9999999999'): filling one
    is a real MemoryError of this machine, not a bug of shardc."""
    try:
        return np.dtype(d).itemsize <= 1 << 16
    except Exception:  # noqa: BLE001 - not a dtype at all: keep it, shardc must reject it
        return True


SHAPES = st.one_of(
    HOSTILE.filter(_not_huge),
    st.tuples(st.integers(-2, 4), st.integers(-2, 4)),
    st.integers(-1, 64),
    st.sampled_from([(2**31, 2**31, 4), 2**70, (2**62, 4), (3, -1)]),
)


def segments() -> str:
    return str(shardc.segment_report())


@SLOW
@given(
    dtype=DTYPES.filter(_not_huge_dtype),
    shape=SHAPES,
    init=HOSTILE,
    backing=st.one_of(HOSTILE, st.sampled_from(["auto", "memfd", "shm", "file"])),
)
def test_buffer_hostile(dtype: Any, shape: Any, init: Any, backing: Any) -> None:
    """buffer() with hostile dtype/shape/init/backing: a buffer, or a ShardcError naming an argument; no segment leaks."""
    before = segments()
    b = call(shardc.buffer, ("dtype", "shape", "init", "backing"), dtype, shape, init=init, backing=backing)
    if b is not None:
        want = (int(shape),) if np.ndim(shape) == 0 else tuple(int(x) for x in np.asarray(shape).ravel())
        assert b.array.shape == want
        b.close()
        b.close()  # idempotent
    assert segments() == before


@SLOW
@given(
    path=st.one_of(HOSTILE, st.text(max_size=40)), dtype=DTYPES.filter(_not_huge_dtype), shape=SHAPES, backing=HOSTILE
)
def test_buffer_open_hostile(path: Any, dtype: Any, shape: Any, backing: Any) -> None:
    """buffer_open() of hostile or missing names: a ShardcError naming an argument; nothing leaks."""
    before = segments()
    b = call(
        shardc.buffer_open,
        ("path", "dtype", "shape", "backing", "segment", "name"),
        path,
        dtype,
        shape,
        backing=backing,
    )
    if b is not None:
        b.close()
    assert segments() == before


def test_buffer_open_roundtrip_sizes() -> None:
    """buffer_open() of a real named buffer: too-big shapes are refused by name, fitting ones attach."""
    name = f"shardc-fuzz-{uuid.uuid4().hex[:8]}"
    b = shardc.buffer("f8", 16, init=1.5, backing="shm", name=name)
    try:
        with pytest.raises(ShardcError, match="shape|holds"):
            shardc.buffer_open(name, "f8", 17)
        o = shardc.buffer_open(name, "f8", (4, 4))
        assert float(o.array.sum()) == 24.0
        o.close()
    finally:
        b.close()


@SLOW
@given(
    obj=st.one_of(HOSTILE, st.builds(lambda s: np.zeros(s), st.integers(0, 5))),
    backing=st.one_of(st.just("auto"), HOSTILE),
)
def test_share_hostile(obj: Any, backing: Any) -> None:
    """share() of hostile objects and backings: a handle, or a ShardcError naming obj/backing."""
    h = call(shardc.share, ("obj", "backing", "pickl", "share"), obj, backing=backing)
    if h is not None and hasattr(h, "close"):
        h.close()


# -- shard_map: invalid arguments never start a worker ----------------------------------------------

MAP_ARGS = [
    "dispatch_mode",
    "chunk_size",
    "workers",
    "mem_cap",
    "recycle",
    "cow",
    "seed",
    "timeout",
    "max_retries",
    "health_check_interval",
    "on_failure",
    "progress",
    "profile",
    "autotune",
    "scheduler_policy",
    "dispatch_opts",
    "packages",
    "borrow",
    "out",
    "kernel",
]


def ident(shard: Any, **kw: Any) -> int:
    return int(shard.id)


@pytest.fixture(scope="module")
def pool1():
    """One small default pool for the shard_map properties."""
    shardc.pool_stop()
    p = shardc.pool_create(1)
    yield p
    shardc.pool_stop(p)


@SLOW
@given(arg=st.sampled_from(MAP_ARGS), value=HOSTILE)
def test_shard_map_hostile(pool1: Any, arg: str, value: Any) -> None:
    """shard_map() with one hostile keyword: a result, or a ShardcError naming it, with no worker started and no segment leaked."""
    if arg == "workers" and isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        value = -1  # a valid size would legitimately start a new pool
    if arg == "timeout" and isinstance(value, (int, float)) and 0 < value < 5:
        value = -value  # a valid tiny timeout kills every worker: legitimate, and slow
    if arg == "mem_cap" and isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 2**30:
        value = -value  # likewise a tiny memory cap
    pids = [w.pid for w in pool1.workers]
    before = segments()
    kwargs: dict[str, Any] = {"progress": False, "timeout": 30}
    kwargs[arg] = value
    try:
        r = shardc.shard_map(3, None if arg == "kernel" else ident, **kwargs)
    except ShardMapError:
        pass  # valid arguments, shards failed (e.g. a packages list that does not import)
    except ShardcError as exc:
        check_error(exc, arg)
        assert [w.pid for w in pool1.workers] == pids, "a worker was (re)started for invalid input"
    except Exception as exc:  # noqa: BLE001 - any other type is the finding
        raise AssertionError(f"shard_map({arg}={value!r}) raised {type(exc).__name__}: {exc}") from exc
    else:
        assert sorted(x for x in r.results if x is not None) in ([0, 1, 2], [])
    assert segments() == before


@SLOW
@given(shards=st.one_of(HOSTILE, st.integers(-5, 5)))
def test_shard_map_hostile_shards(pool1: Any, shards: Any) -> None:
    """shard_map() with hostile shards: a result, or a ShardcError naming shards, with no worker started."""
    if isinstance(shards, (int, np.integer, str)) and not isinstance(shards, bool):
        try:
            if parse_count(shards, "shards") > 50:
                shards = -1  # a valid huge count would run it (3B shards): not this test's point
        except ShardcError:
            pass
    pids = [w.pid for w in pool1.workers]
    r = call(shardc.shard_map, ("shards",), shards, ident, progress=False, timeout=30)
    if r is None:
        assert [w.pid for w in pool1.workers] == pids


REPORTS = ["report", "mem_report", "copy_report", "cow_report", "task_report", "recommendations"]


@FAST
@given(which=st.sampled_from(REPORTS), value=HOSTILE)
def test_reports_hostile(which: str, value: Any) -> None:
    """Reports of something that is not a ShardResult: a ShardcError naming result, never an AttributeError."""
    call(getattr(shardc, which), ("result", "ShardResult"), value)


def test_reports_of_real_result(pool1: Any) -> None:
    """Every report renders for a real result, and report() rejects unknown levels by name."""
    r = shardc.shard_map(4, ident, progress=False)
    for which in REPORTS:
        assert str(getattr(shardc, which)(r))
    with pytest.raises(ShardcError, match="level"):
        shardc.report(r, level="nonsense")
    assert str(shardc.segment_report())


# -- shard_reduce: hostile arguments, and the value of a fixed tree ----------------------------------

REDUCE_ARGS = [
    "map",
    "combine",
    "init",
    "group_size",
    "borrow",
    "out",
    "on_failure",
    "kernel",
    "dispatch_mode",
    "dispatch_opts",
    "chunk_size",
    "workers",
    "mem_cap",
    "recycle",
    "cow",
    "seed",
    "timeout",
    "max_retries",
    "health_check_interval",
    "progress",
    "profile",
    "packages",
]


_LOCK = threading.Lock()


def _capturing_a_lock() -> Any:
    lock = threading.Lock()

    def fn(*a: Any) -> Any:  # a closure: pickled by value, with its lock
        return (lock, a[-1])[1]

    return fn


_UNPICKLABLE = _capturing_a_lock()


def _one_arg(a: Any) -> Any:
    return a


def _kw_only(a: Any, *, b: Any) -> Any:
    return a


# Callables of the wrong shape, and values that are callable but not functions of (acc, value).
HOSTILE_FN = st.one_of(
    HOSTILE,
    st.sampled_from([_one_arg, _kw_only, int, print, dict, np.add, lambda *a: a[0], lambda a, b, c: a, "operator.add"]),
    st.sampled_from([_LOCK, _UNPICKLABLE]),  # unpicklable: named before any worker starts
)


def _add(a: Any, b: Any) -> Any:
    return a + b


def _reduce_kwargs(arg: str, value: Any) -> dict[str, Any]:
    if arg == "workers" and isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        value = -1  # a valid size would legitimately start a new pool
    if arg == "timeout" and isinstance(value, (int, float)) and 0 < value < 5:
        value = -value  # a valid tiny timeout kills every worker: legitimate, and slow
    if arg == "mem_cap" and isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 2**30:
        value = -value
    if arg == "group_size" and isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 64:
        value = 64  # valid: one group for these 3 shards (huge sizes are clamped the same way)
    kwargs: dict[str, Any] = {"map": ident, "combine": _add, "init": 0, "progress": False, "timeout": 30}
    kwargs["max_retries"] = 0  # a hostile init fails every group: once is enough
    if arg == "kernel":
        kwargs["map"] = None
    kwargs[arg] = value
    return kwargs


@SLOW
@given(arg=st.sampled_from(REDUCE_ARGS), value=HOSTILE_FN)
@example(arg="map", value=_UNPICKLABLE)
@example(arg="combine", value=_UNPICKLABLE)
@example(arg="init", value=_LOCK)
@example(arg="group_size", value=True)
@example(arg="kernel", value="crossprod_tile")
def test_shard_reduce_hostile(pool1: Any, arg: str, value: Any) -> None:
    """shard_reduce() with one hostile argument: a value, a ReduceError (valid arguments, groups
    failed), or a ShardcError naming the argument with no worker started; never another exception
    (shard_reduce's own keywords are checked by Python: no TypeError here), no segment leaked."""
    pids = [w.pid for w in pool1.workers]
    before = segments()
    kwargs = _reduce_kwargs(arg, value)
    try:
        r = shardc.shard_reduce(3, **kwargs)
    except shardc.ReduceError as exc:
        res = exc.result
        assert res.missing and len(res.failures) == len(res.missing), (res.failures, res.missing)
        assert all(any(a <= sid < b for a, b in res.missing) for sid in res.failures)
    except ShardMapError as exc:
        raise AssertionError(f"shard_reduce raised a ShardMapError that is not a ReduceError: {exc}") from exc
    except ShardcError as exc:
        check_error(exc, arg)
        assert [w.pid for w in pool1.workers] == pids, "a worker was (re)started for invalid input"
    except Exception as exc:  # noqa: BLE001 - any other type is the finding
        raise AssertionError(f"shard_reduce({arg}={value!r}) raised {type(exc).__name__}: {exc}") from exc
    else:
        assert isinstance(r, shardc.ReduceResult) and not r.missing and not r.failures
        if kwargs["map"] is ident and kwargs["combine"] is _add and type(kwargs["init"]) is int:
            assert r.value == kwargs["init"] * r.diagnostics.reduce["groups"] + 3  # init once per group
    assert segments() == before


@SLOW
@given(shards=st.one_of(HOSTILE, st.integers(-5, 5)))
def test_shard_reduce_hostile_shards(pool1: Any, shards: Any) -> None:
    """shard_reduce() with hostile shards: a value, or a ShardcError naming shards, with no worker started."""
    if isinstance(shards, (int, np.integer, str)) and not isinstance(shards, bool):
        try:
            if parse_count(shards, "shards") > 50:
                shards = -1  # a valid huge count would run it
        except ShardcError:
            pass
    pids = [w.pid for w in pool1.workers]
    r = call(shardc.shard_reduce, ("shards",), shards, ident, _add, 0, progress=False, timeout=30)
    if r is None:
        assert [w.pid for w in pool1.workers] == pids
    else:
        n = r.shards.num_shards
        assert r.value == n * (n - 1) // 2 and not r.missing


_MOD = (1 << 61) - 1


def _mix(a: int, b: int) -> int:
    """Deterministic and NOT associative or commutative: the value pins the exact tree and order."""
    return (a * 1_000_003 + b + 7) % _MOD


def _serial_fixed_tree(n: int, gsize: int, init: int, value_of: Any) -> int:
    """The documented tree, serially: groups of gsize ids folded from init in id order, then
    pairs of group partials by index, level by level (a node without a right sibling moves up)."""
    level = []
    for start in range(0, n, gsize):
        acc = init
        for sid in range(start, min(start + gsize, n)):
            acc = _mix(acc, value_of(sid))
        level.append(acc)
    while len(level) > 1:
        level = [_mix(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
    return level[0]


def _shard_value(sid: int) -> int:
    return (sid * sid * 2654435761 + 12345) % 1_000_000_007


class _FlakyOnce:
    """map raising on the first attempt of some shards (a marker file per shard): their groups
    rerun whole.  Its value is a fixed function of the id, or of ``shard.rng`` when seeded."""

    def __init__(self, flaky: frozenset[int], tmp: str, seeded: bool) -> None:
        self.flaky, self.tmp, self.seeded = flaky, tmp, seeded

    def __call__(self, shard: Any) -> int:
        sid = int(shard.id)
        if sid in self.flaky:
            marker = os.path.join(self.tmp, str(sid))
            if not os.path.exists(marker):
                open(marker, "w").close()
                raise RuntimeError(f"first attempt of shard {sid} fails")
        return _rng_value(shard) if self.seeded else _shard_value(sid)


def _rng_value(shard: Any) -> int:
    return int(shard.rng.integers(1 << 40))


@pytest.fixture(scope="module")
def pool2():
    """A second pool, of 2 workers, for bit-identity across worker counts."""
    p = shardc.Pool(2)
    yield p
    p.stop()


@settings(FAST, max_examples=EXAMPLES or 120)
@given(
    n=st.integers(1, 400),
    group_size=st.one_of(st.just("auto"), st.integers(1, 450)),
    chunk_size=st.one_of(st.just("auto"), st.integers(1, 5)),
    mode=st.sampled_from(["rpc_chunked", "shm_queue"]),
    init=st.integers(0, 10**6),
    flaky=st.sets(st.integers(0, 399), max_size=3),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    two=st.booleans(),
)
def test_shard_reduce_is_the_serial_fixed_tree(
    pool1: Any,
    pool2: Any,
    tmp_path_factory: Any,
    n: int,
    group_size: Any,
    chunk_size: Any,
    mode: str,
    init: int,
    flaky: set[int],
    seed: int | None,
    two: bool,
) -> None:
    """For random sizes, group sizes, chunk sizes, modes, 1 or 2 workers, seeds and retried groups, the
    value equals a serial fold in the documented fixed tree, exactly (integers; the combine is neither
    associative nor commutative, so any other order or tree shape, or a group counted twice, gives
    another value); seeded, each shard's ``shard.rng`` is shard_map's for the same id."""
    tmp = str(tmp_path_factory.mktemp("flaky"))
    flaky_ids = frozenset(s for s in flaky if s < n)
    pool = pool2 if two else pool1
    if seed is None:
        values = [_shard_value(sid) for sid in range(n)]
    else:
        values = shardc.shard_map(n, _rng_value, seed=seed, pool=pool, progress=False).results
    before = segments()
    r = shardc.shard_reduce(
        n, _FlakyOnce(flaky_ids, tmp, seed is not None), _mix, init, group_size=group_size, chunk_size=chunk_size,
        dispatch_mode=mode, max_retries=3, seed=seed, pool=pool, progress=False, timeout=30,
    )  # fmt: skip
    gsize = shardc.reduction.auto_group_size(n) if group_size == "auto" else min(group_size, n)
    assert r.value == _serial_fixed_tree(n, gsize, init, values.__getitem__)
    red = r.diagnostics.reduce
    assert red["group_size"] == gsize and red["groups"] == math.ceil(n / gsize)
    assert red["partials"] == red["groups"] and red["fold_steps"] == n and not r.missing
    assert r.diagnostics.retries == len(flaky_ids)  # each flaky shard failed its group's attempt once
    assert segments() == before


@settings(FAST, max_examples=EXAMPLES or 30)
@given(
    rows=st.integers(1, 700),
    cols=st.sampled_from([1, 3, 255, 256, 300]),
    dtype=st.sampled_from(["i8", "u4", "i2"]),
    order=st.sampled_from(["C", "F"]),
    n=st.integers(1, 6),
)
def test_shard_reduce_array_partials_around_the_segment_threshold(
    pool1: Any, rows: int, cols: int, dtype: str, order: str, n: int
) -> None:
    """Integer array partials from tiny to a few MiB (across values.BIG_VALUE_BYTES: pickled or sent
    in a segment), C or F order: exact, the layout of a segment-returned partial kept, no fd or
    segment left behind in the master."""
    fds = len(os.listdir("/proc/self/fd"))
    before = segments()

    def block(shard: Any) -> Any:
        return np.full((rows, cols), int(shard.id) + 1, dtype=dtype, order=order)

    r = shardc.shard_reduce(
        n, block, np.add, np.zeros((rows, cols), dtype=dtype), group_size=1, progress=False, timeout=30
    )
    want = np.full((rows, cols), n * (n + 1) // 2, dtype=dtype)
    assert r.value.dtype == np.dtype(dtype) and r.value.shape == want.shape
    np.testing.assert_array_equal(r.value, want)
    del r
    assert len(os.listdir("/proc/self/fd")) == fds
    assert segments() == before


@settings(FAST, max_examples=EXAMPLES or 25)
@given(
    rows=st.integers(1, 300),
    cols=st.integers(1, 9),
    skip=st.integers(0, 40),
    dtype=st.sampled_from(["i8", "i2", "u1", ">i4"]),
    mode=st.sampled_from(["r", "r+", "c"]),
    r0=st.integers(-3, 3),
    rstep=st.sampled_from([1, 2, 3, -1, -2]),
    cstep=st.sampled_from([1, 2, -1]),
)
def test_shard_reduce_memmap_views_by_file(
    pool1: Any,
    tmp_path_factory: Any,
    rows: int,
    cols: int,
    skip: int,
    dtype: str,
    mode: str,
    r0: int,
    rstep: int,
    cstep: int,
) -> None:
    """A memmap at any file offset, sliced with any steps: workers see exactly the caller's elements
    (the exact integer sum of every row block), mapped from the file (r/r+) or copied (mode c),
    and nothing leaks."""
    path = tmp_path_factory.mktemp("mm") / "x.bin"
    itemsize = np.dtype(dtype).itemsize
    data = (np.arange((skip + rows) * cols) % 97).astype(dtype)
    data.tofile(path)
    mm = np.memmap(path, dtype=dtype, mode=mode, offset=skip * cols * itemsize, shape=(rows, cols))
    view = mm[r0::rstep, ::cstep]
    if view.shape[0] == 0:
        return
    want = int(np.asarray(view, dtype=np.int64).sum())
    before = segments()
    r = shardc.shard_reduce(
        shardc.shards(view.shape[0], block_size=7), lambda s, V: int(V[s.idx].astype(np.int64).sum()), _add, 0,
        borrow={"V": view}, pool=pool1, progress=False, timeout=30,
    )  # fmt: skip
    assert r.value == want
    assert (r.diagnostics.borrow["V"]["how"] == "file") == (mode != "c")
    del r, mm, view
    assert segments() == before
