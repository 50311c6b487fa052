"""stream_* helpers equal pandas on the collected data."""

from __future__ import annotations

import numpy as np
import pytest

import shardc
from shardc import tables

pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")
pc = pytest.importorskip("pyarrow.compute")

pytestmark = pytest.mark.timeout(60)


def _frame(shard):
    r = shard.rng
    n = 200 + shard.id * 13
    v = r.normal(size=n)
    v[::17] = np.nan
    return pd.DataFrame(
        {"g": pd.Categorical(r.choice(["a", "b", "c", "d"], n)), "v": v, "k": r.integers(0, 1000, n), "s": ["x"] * n}
    )


@pytest.fixture(scope="module")
def handle(pool2):
    r = shardc.shard_map(
        17,
        _frame,
        seed=9,
        pool=pool2,
        progress=False,
        dispatch_opts={"auto_table": True, "auto_table_materialize": "never", "auto_table_format": "parquet"},
    )
    h = r.table
    yield h
    h.close()


def test_count_sum_topk(handle):
    """count, sum (NaN skipped, or None when kept) and top-k equal pandas."""
    df = handle.to_pandas()
    assert tables.stream_count(handle) == len(df) == tables.stream_count(handle.dataset())
    assert tables.stream_sum(handle, "v") == pytest.approx(df.v.sum())
    assert tables.stream_sum(handle, "v", na_rm=False) is None
    assert tables.stream_sum(handle, "k") == df.k.sum()
    top = tables.stream_top_k(handle, "v", k=7)
    assert top.column("v").to_pylist() == pytest.approx(sorted(df.v.dropna(), reverse=True)[:7])
    low = tables.stream_top_k(handle, "k", k=5, decreasing=False, columns=["g"])
    assert low.column_names == ["g", "k"]
    assert low.column("k").to_pylist() == sorted(df.k)[:5]
    with pytest.raises(shardc.errors.InvalidTypeError, match="numeric"):
        tables.stream_sum(handle, "s")


def test_group_sum_and_count(handle):
    """Grouped sums and counts equal pandas groupby."""
    df = handle.to_pandas()
    gs = tables.stream_group_sum(handle, "g", "k").to_pandas()
    want = df.groupby("g", observed=True).k.sum()
    assert list(gs.g) == list(want.index.astype(str)) and list(gs.k_sum) == list(want.values)
    gc = tables.stream_group_count(handle, "g").to_pandas()
    assert list(gc["count"]) == list(df.groupby("g", observed=True).size().values)


def test_filter_map_reduce(handle, tmp_path):
    """filter (an Expression pushed into the scan, or a callable) writes a new dataset; map/reduce fold batches."""
    df = handle.to_pandas()
    out = tables.stream_filter(handle, pc.field("k") > 900, path=tmp_path / "big")
    got = out.to_pandas().sort_values(["k", "v"], ignore_index=True)
    want = df[df.k > 900].sort_values(["k", "v"], ignore_index=True)
    pd.testing.assert_frame_equal(got[["k", "v"]], want[["k", "v"]], check_dtype=False)
    out2 = tables.stream_filter(handle, lambda t: pc.less(t.column("k"), 10))
    assert out2.num_rows == int((df.k < 10).sum())
    out2.close()
    sizes = tables.stream_map(handle, lambda t: t.num_rows, columns=["k"])
    assert sum(sizes) == len(df)
    mx = tables.stream_reduce(handle, lambda acc, t: max(acc, pc.max(t.column("k")).as_py()), -1, columns=["k"])
    assert mx == df.k.max()
    tot = tables.stream_reduce(handle, lambda t: t.num_rows, 0, combine=lambda a, b: a + b)
    assert tot == len(df)
    assert tables.stream_count(tmp_path / "big") == len(want)
