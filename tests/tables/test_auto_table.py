"""``dispatch_opts={"auto_table": True}``: shards' frames written to parts by the workers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from _frames import expected, frame

import shardc
from shardc.errors import InvalidArgumentError, ShardMapError
from shardc.tables import TableHandle, open_table

pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")
pl = pytest.importorskip("polars")
duckdb = pytest.importorskip("duckdb")
ds = pytest.importorskip("pyarrow.dataset")

pytestmark = pytest.mark.timeout(60)

N = 23


def run(pool, fun=frame, n=N, chunk_size=1, **opts):
    return shardc.shard_map(
        n,
        fun,
        seed=3,
        pool=pool,
        chunk_size=chunk_size,
        progress=False,
        dispatch_opts={"auto_table": True, **opts},
        on_failure="collect",
    )


def _as_arrow(shard):
    return pa.Table.from_pandas(frame(shard), preserve_index=False)


def _as_batch(shard):
    return pa.RecordBatch.from_pandas(frame(shard), preserve_index=False)


def _as_polars(shard):
    return pl.from_pandas(frame(shard))


@pytest.mark.parametrize("fun", [frame, _as_arrow, _as_batch, _as_polars], ids=["pandas", "arrow", "batch", "polars"])
def test_each_return_type_gives_the_concatenated_rows_in_shard_order(pool2, fun):
    """pandas, pyarrow Table/RecordBatch and polars frames: rows equal pd.concat of the frames, in shard order."""
    r = run(pool2, fun, auto_table_materialize="never")
    h = r.table
    assert isinstance(h, TableHandle) and h.num_rows == N * 50
    got = h.to_pandas()
    pd.testing.assert_frame_equal(got, expected(N, 3), check_dtype=False)
    assert r.results == [50] * N  # what each shard kept: its row count
    assert len(h.files) < N  # parts hold many shards
    h.close()


@pytest.mark.parametrize(
    "mode,fmt,ext",
    [
        ("row_groups", "auto", "arrow"),
        ("row_groups", "parquet", "parquet"),
        ("partitioned", "auto", "parquet"),
        ("partitioned", "arrow", "arrow"),
        ("partitioned", "native", "parquet"),
        ("row_groups", "rds", "arrow"),
    ],
)
def test_modes_and_formats(pool2, tmp_path, mode, fmt, ext):
    """Each mode/format writes parts of the resolved format; reads back equal, through every reader."""
    path = tmp_path / "out" if mode == "partitioned" else None
    opts = {"auto_table_mode": mode, "auto_table_format": fmt, "auto_table_materialize": "never"}
    if path is not None:
        opts["auto_table_path"] = str(path)
    h = run(pool2, **opts).table
    want = expected(N, 3)
    assert all(f.endswith("." + ext) for f in h.files)
    pd.testing.assert_frame_equal(h.to_pandas(), want, check_dtype=False)
    pd.testing.assert_frame_equal(h.to_polars().to_pandas(), want, check_dtype=False)
    scanned = h.dataset().to_table().to_pandas().sort_values("i", ignore_index=True)
    pd.testing.assert_frame_equal(scanned, want, check_dtype=False)
    assert sum(t.num_rows for t in h.iter_parts()) == N * 50
    if mode == "partitioned":
        h.close()  # not owned: the dataset stays
        man = json.loads((path / "_manifest.json").read_text())
        assert man["rows"] == N * 50 and sorted(s[0] for p in man["parts"] for s in p["shards"]) == list(range(N))
        assert not [e for e in os.listdir(path) if e.startswith(".tmp")]
        d = ds.dataset(str(path), format="ipc" if ext == "arrow" else "parquet")  # the directory, as any reader sees it
        assert d.count_rows() == N * 50
        if ext == "parquet":
            con = duckdb.connect()
            got = con.execute(f"select count(*), sum(i) from read_parquet('{path}/*.parquet')").fetchone()
            assert got == (N * 50, int(want.i.sum()))
            lazy = pl.scan_parquet(str(path / "*.parquet")).select(pl.col("x").sum()).collect()
            assert lazy.item() == pytest.approx(want.x.sum())
        assert open_table(path).to_pandas().equals(h.to_pandas())


def _owned() -> set[str]:
    """The temporary table directories in this user's folder of SHARDC_TMPDIR."""
    folder = shardc.tmpdirs.owned_root()
    return {e for e in os.listdir(folder) if e.startswith("shardc-table.")} if os.path.isdir(folder) else set()


@pytest.mark.parametrize("mat", ["always", "auto"])
def test_materialize_gives_a_table_and_removes_temporary_parts(pool2, mat):
    """materialize always / auto (small): a pyarrow Table in memory; no temporary directory is left."""
    before = _owned()
    r = run(pool2, auto_table_materialize=mat)
    assert isinstance(r.table, pa.Table)
    pd.testing.assert_frame_equal(r.table.to_pandas(), expected(N, 3), check_dtype=False)
    assert _owned() == before
    cp = shardc.copy_report(r).data
    assert cp["table_rows"] == N * 50 and cp["table_parts"] >= 1 and cp["table_bytes_materialized"] == r.table.nbytes


def test_auto_above_max_bytes_keeps_a_handle_and_close_removes_it(pool2):
    """materialize='auto' over auto_table_max_bytes: a handle; close() removes its temporary directory."""
    r = run(pool2, auto_table_materialize="auto", auto_table_max_bytes=1000)
    h = r.table
    assert isinstance(h, TableHandle) and os.path.isdir(h.path)
    h.close()
    assert not os.path.exists(h.path)
    with pytest.raises(shardc.errors.ClosedError):
        h.to_arrow()


def test_a_handle_dropped_removes_its_directory_and_row_groups_with_path_stays(pool2, tmp_path):
    """row_groups: the temporary directory goes with the collected handle; with auto_table_path it stays."""
    h = run(pool2, auto_table_materialize="never").table
    path = h.path
    del h
    import gc

    gc.collect()
    assert not os.path.exists(path)
    h2 = run(pool2, auto_table_materialize="never", auto_table_path=str(tmp_path / "keep")).table
    h2.close()
    assert os.path.exists(tmp_path / "keep" / "_manifest.json")


def test_schema_mismatch_fails_naming_shard_column_and_types(pool2):
    """auto_table_schema: a frame whose column does not cast fails its shard, not retried, naming all three."""
    schema = pa.schema([("x", pa.float64()), ("i", pa.int64()), ("s", pa.int32())])
    r = run(pool2, auto_table_schema=schema, auto_table_materialize="never")
    assert sorted(r.failures) == list(range(N))
    f = r.failures[0]
    assert f.attempts == 1 and "TableSchemaError" in f.error_type
    assert "shard 0" in f.message and "'s'" in f.message and "int32" in f.message and "string" in f.message
    assert r.table.num_rows == 0 and r.table.failed_shards == list(range(N))
    missing = pa.schema([("x", pa.float64()), ("i", pa.int64()), ("s", pa.string()), ("z", pa.int8())])
    r = run(pool2, n=2, auto_table_schema=missing)
    assert "['z'] missing" in r.failures[1].message and "shard 1" in r.failures[1].message


def test_a_matching_schema_casts_and_orders_columns(pool2):
    """Frames are cast safely and reordered to auto_table_schema."""
    schema = pa.schema([("s", pa.string()), ("i", pa.int64()), ("x", pa.float32())])
    t = run(pool2, auto_table_schema=schema, auto_table_materialize="always").table
    assert t.schema.equals(schema)
    assert t.num_rows == N * 50


def _mixed(shard):
    if shard.id % 5 == 0:
        return None
    if shard.id % 5 == 1:
        return frame(shard).iloc[:0]
    if shard.id == 7:
        raise ValueError("shard 7 fails")
    return frame(shard)


def test_empty_frames_none_and_a_failed_shard(pool2):
    """Empty frames and None add no rows; a failed shard has none and is listed in the manifest."""
    r = run(pool2, _mixed, auto_table_materialize="never")
    h = r.table
    assert list(r.failures) == [7] and h.failed_shards == [7]
    keep = [k for k in range(N) if k % 5 not in (0, 1) and k != 7]
    want = expected(N, 3)
    want = want[(want.i // 50).isin(keep)].reset_index(drop=True)
    pd.testing.assert_frame_equal(h.to_pandas(), want, check_dtype=False)
    assert sorted(h.manifest["empty_shards"]) == [k for k in range(N) if k % 5 == 1]  # None: no entry
    h.close()


def test_strings_and_nulls_round_trip(pool2):
    """Nulls in string, float and nullable-int columns survive, as pandas/polars see them."""

    def f(shard):
        return pd.DataFrame(
            {
                "s": pd.array(["a", None, "ccc"], dtype="string"),
                "x": [1.5, np.nan, None],
                "k": pd.array([1, None, shard.id], dtype="Int64"),
                "cat": pd.Categorical(["u", "v", "u"]),
            }
        )

    t = run(pool2, f, n=4, auto_table_materialize="always").table
    assert t.column("s").null_count == 4 and t.column("k").null_count == 4 and t.column("x").null_count == 8
    assert pa.types.is_dictionary(t.schema.field("cat").type)
    df = t.to_pandas()
    assert list(df["k"].dropna()) == [1, 0, 1, 1, 1, 2, 1, 3]


def test_a_value_that_is_not_a_frame_fails_its_shard(pool2):
    """A shard returning a list fails, naming what it returned and what to return."""
    r = run(pool2, lambda s: [1, 2], n=2)
    assert "returned builtins.list" in r.failures[0].message and r.failures[0].attempts == 1


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"auto_table": "yes"}, "True or False"),
        ({"auto_table": True, "auto_table_mode": "bogus"}, "auto_table_mode"),
        ({"auto_table": True, "auto_table_format": "csv"}, "auto_table_format"),
        ({"auto_table": True, "auto_table_materialize": "sometimes"}, "auto_table_materialize"),
        ({"auto_table": True, "auto_table_max_bytes": "lots"}, "auto_table_max_bytes"),
        ({"auto_table": True, "auto_table_schema": {"x": "f8"}}, "pyarrow.Schema"),
        ({"auto_table": True, "auto_table_mode": "partitioned"}, "auto_table_path"),
        ({"auto_table_mode": "partitioned"}, "only apply with"),
        ({"auto_table": True, "auto_table_bogus": 1}, "auto_table_bogus"),
    ],
)
def test_bad_options_fail_before_any_worker_starts(opts, match, monkeypatch):
    """Every auto_table option is checked before a pool exists."""
    monkeypatch.setattr(shardc.pool, "pool_create", lambda *a, **k: pytest.fail("a pool was started"))
    with pytest.raises(InvalidArgumentError, match=match):
        shardc.shard_map(2, frame, dispatch_opts=opts)


def test_auto_table_requires_out_empty_and_a_new_path(tmp_path):
    """out= with auto_table, and a non-empty auto_table_path, are errors naming the fix."""
    b = shardc.buffer("f8", 4)
    with pytest.raises(InvalidArgumentError, match="requires out= to be empty"):
        shardc.shard_map(2, lambda s, o: None, out={"o": b}, dispatch_opts={"auto_table": True})
    b.close()
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(InvalidArgumentError, match="not empty"):
        shardc.shard_map(2, frame, dispatch_opts={"auto_table": True, "auto_table_path": str(tmp_path)})
    with pytest.raises(InvalidArgumentError, match="auto_table"):
        shardc.shard_map(2, frame, dispatch_mode="shm_queue", dispatch_opts={"auto_table": True})
    with pytest.raises(InvalidArgumentError, match="shard_map option"):
        shardc.shard_reduce(2, lambda s: 1, combine=lambda a, b: a + b, init=0, dispatch_opts={"auto_table": True})


def test_raise_mode_still_raises_and_leaves_no_temporary_directory(pool2):
    """on_failure='raise': ShardMapError; the call's temporary parts do not outlive it."""
    before = _owned()
    with pytest.raises(ShardMapError):
        shardc.shard_map(3, lambda s: 1 / 0, pool=pool2, progress=False, dispatch_opts={"auto_table": True})
    assert _owned() == before


def _drifting(shard):
    k = shard.id
    if k % 3 == 0:
        return pd.DataFrame({"a": [k, k + 1], "b": [None, None]})  # ints; b all null
    if k % 3 == 1:
        return pd.DataFrame({"a": [k + 0.5], "b": ["t"], "c": [1.0]})  # floats, strings, an extra column
    return pd.DataFrame({"b": ["u", None], "a": [k, k]})  # another column order


def test_frames_whose_types_drift_stack_like_pd_concat(pool2):
    """Without a schema, frames with other types/columns start a new part; the read unifies as pd.concat does."""
    r = run(pool2, _drifting, n=12, chunk_size=12, auto_table_materialize="never")
    h = r.table
    assert r.succeeded and len(h.files) > 1
    got = h.to_pandas()
    want = pd.concat([_drifting(shardc.shards(12, block_size=1).shard(k)) for k in range(12)], ignore_index=True)
    assert list(got.a) == list(want.a.astype(float))
    assert [None if pd.isna(v) else v for v in got.b] == [None if pd.isna(v) else v for v in want.b]
    assert got.c.isna().sum() == want.c.isna().sum()
    import pickle

    h2 = pickle.loads(pickle.dumps(r))  # a result (and its handle) pickles; the copy owns nothing
    assert h2.table.num_rows == h.num_rows
    h.close()
    assert pickle.loads(pickle.dumps(h2.table)).manifest == h2.table.manifest


def _string_types(shard):
    """pandas 3's large_string frames, pyarrow string tables and polars frames (string_view or large_string)."""
    df = frame(shard)
    k = shard.id % 3
    if k == 0:
        return df
    if k == 1:
        return pa.Table.from_pandas(df, preserve_index=False).cast(
            pa.schema([("x", pa.float64()), ("i", pa.int64()), ("s", pa.string())])
        )
    return pl.from_pandas(df)


@pytest.mark.parametrize("chunk_size", [1, N], ids=["parts-differ", "one-part-mixed"])
def test_string_types_are_kept_and_mixed_ones_unify(pool2, chunk_size):
    """Frames keep their string type (no offsets copied); frames of one part are cast to the part's type, parts
    of both types unify to large_string; every reader gets the concatenated rows."""
    h = run(pool2, _string_types, chunk_size=chunk_size, auto_table_materialize="never").table
    types = {pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(p["schema"]))).field("s").type for p in h.manifest["parts"]}
    assert types <= {pa.string(), pa.large_string()}
    if chunk_size == N:
        assert len(types) == 1  # one worker's part: every frame cast to its first frame's type
    assert h.schema.field("s").type == (pa.large_string() if len(types) > 1 else types.pop())
    want = expected(N, 3)
    pd.testing.assert_frame_equal(h.to_pandas(), want, check_dtype=False)
    assert h.to_polars().get_column("s").to_list() == [None if pd.isna(v) else v for v in want.s]
    con = duckdb.connect()
    con.register("t", h.dataset().to_table())
    assert con.execute("select count(*), count(s) from t").fetchone() == (len(want), int(want.s.notna().sum()))
    h.close()


def test_pandas_string_columns_reach_the_part_without_a_copy(tmp_path):
    """pandas 3's Arrow-backed str column is written as its own large_string array: no cast in the worker."""
    from shardc.tables.convert import to_table

    df = pd.DataFrame({"s": pd.array(["a", None, "ccc"], dtype=pd.StringDtype("pyarrow")), "x": [1.0, 2.0, 3.0]})
    t = to_table(df, 0)
    src = df["s"].array.__arrow_array__()
    assert t.schema.field("s").type == src.type
    assert t.column("s").chunk(0).buffers()[1].address == src.chunk(0).buffers()[1].address
    assert t.column("x").chunk(0).buffers()[1].address == df["x"].to_numpy().ctypes.data
