"""Fuzzing the public API with hypothesis: random and hostile arguments to
``shards``, ``shards_list``, ``tiles2d``, ``buffer``, ``buffer_open``,
``share``, ``shard_map`` and the reports.  Every call either works or raises
a ``ShardcError`` subclass whose message names the bad argument; never a
crash, a hang, a leaked segment, or a worker started for invalid input.

Bounded for CI (the whole file well under 40 s); ``SHARDC_FUZZ_EXAMPLES=N``
(or ``bench/fuzz.py``) runs N examples per property instead."""

from __future__ import annotations

import math
import os
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
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
