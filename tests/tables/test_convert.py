"""Frames to Arrow: the pandas fast path gives what ``pa.Table.from_pandas`` gives."""

from __future__ import annotations

import numpy as np
import pytest

from shardc.errors import TableSchemaError
from shardc.tables.convert import _from_pandas, _normal_type, to_table

pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")

FRAMES = {
    "floats with NaN, nullable ints, strings with None": lambda: pd.DataFrame(
        {"x": [1.0, np.nan, 3.0], "o": ["a", None, "c"], "i": pd.array([1, None, 3], dtype="Int64")}
    ),
    "categorical": lambda: pd.DataFrame({"c": pd.Categorical(["a", "b", "a"])}),
    "datetimes, tz-aware and naive, timedeltas": lambda: pd.DataFrame(
        {
            "t": pd.date_range("2020", periods=3, tz="Europe/Paris"),
            "u": pd.date_range("2020", periods=3),
            "d": pd.to_timedelta([1, 2, 3], unit="s"),
        }
    ),
    "bools, nullable bools": lambda: pd.DataFrame({"b": [True, False, True], "nb": pd.array([True, None, False])}),
    "object strings and bytes": lambda: pd.DataFrame(
        {"o": np.array(["a", "bb", None], dtype=object), "by": [b"x", b"y", None]}
    ),
    "a non-default index (dropped)": lambda: pd.DataFrame({"x": [1, 2, 3]}, index=[5, 6, 7]),
    "lists": lambda: pd.DataFrame({"l": [[1, 2], [3], None]}),
    "small ints and float32": lambda: pd.DataFrame(
        {"u": np.array([1, 2, 3], dtype=np.uint8), "f": np.array([1, np.nan, 2], dtype=np.float32)}
    ),
    "numpy ints, uints, bools, NaN-free floats with inf and -0.0": lambda: pd.DataFrame(
        {
            "i": np.array([-(2**62), 0, 5]),
            "u": np.array([2**64 - 1, 0, 1], dtype=np.uint64),
            "b": np.array([True, False, True]),
            "f": [np.inf, -0.0, -np.inf],
            "g": np.array([1.5, 2.5, 3.5], dtype=np.float32),
        }
    ),
    "columns of one 2-D block (strided views)": lambda: pd.DataFrame(
        np.arange(12.0).reshape(4, 3)[::2], columns=["p", "q", "r"]
    ),
    "float16 (from_pandas path)": lambda: pd.DataFrame({"h": np.array([1, 2], dtype=np.float16)}),
    "pyarrow-backed dtypes": lambda: pd.DataFrame({"a": pd.array([1, None, 3], dtype="int64[pyarrow]")}),
    "string dtypes: default str, python-stored, string[pyarrow], large_string[pyarrow]": lambda: pd.DataFrame(
        {
            "d": ["a", None, "ccc"],
            "p": pd.array(["a", None, "c"], dtype=pd.StringDtype("python")),
            "q": pd.array(["a", None, "c"], dtype="string[pyarrow]"),
            "l": pd.array(["x", None, "y"], dtype=pd.ArrowDtype(pa.large_string())),
            "v": pd.array(["x", None, "y"], dtype=pd.ArrowDtype(pa.string_view())),
        }
    ),
    "empty": lambda: pd.DataFrame({"x": pd.Series([], dtype=float), "s": pd.Series([], dtype=str)}),
    "non-string column names (from_pandas path)": lambda: pd.DataFrame({0: [1.0], 1: ["a"]}),
}


@pytest.mark.parametrize("name", list(FRAMES))
def test_the_pandas_fast_path_equals_from_pandas(name):
    df = FRAMES[name]()
    want = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    want = want.cast(pa.schema([f.with_type(_normal_type(pa, f.type)) for f in want.schema]))  # views as large types
    got = to_table(df, 0)
    assert got.equals(want), (got.schema, want.schema)


def test_a_column_that_does_not_convert_fails_naming_the_shard_and_type():
    """Mixed objects: the fast path gives way to from_pandas, whose error names the column."""
    df = pd.DataFrame({"ok": [1, 2], "bad": [1, "x"]})
    with pytest.raises((pa.ArrowException, TypeError, ValueError), match="bad"):
        to_table(df, 4)
    with pytest.raises(TableSchemaError, match="shard 7 returned builtins.dict"):
        to_table({"a": [1]}, 7)


def test_duplicate_column_names_take_from_pandas():
    df = pd.DataFrame([[1, 2]], columns=["a", "a"])
    with pytest.raises(ValueError, match="[Dd]uplicate"):
        _from_pandas(pa, df)


def test_parquet_parts_dictionary_encode_only_low_cardinality_columns(tmp_path):
    """A part judges its columns on its first frame: repeated values get a dictionary, distinct ones do not;
    the rows read back unchanged either way."""
    import pyarrow.parquet as pq

    from shardc.tables.parts import PartWriter, dictionary_columns

    rng = np.random.default_rng(0)
    first = pa.table(
        {
            "g": pa.array(["lo", "hi", "mid"] * 2000),
            "x": pa.array(rng.random(6000)),
            "id": pa.array(rng.permutation(6000)),
            "c": pa.array(["a", "b"] * 3000).dictionary_encode(),
        }
    )
    assert dictionary_columns(pa, first) == ["g", "c"]
    assert dictionary_columns(pa, pa.table({"l": [[1], [2]]})) is True  # nested: pyarrow's default
    w = PartWriter(str(tmp_path), "parquet", "t", fsync=False)
    w.put(0, first)
    w.put(1, first.slice(0, 100))
    (rec,) = w.commit()
    path = tmp_path / rec["tmp"]
    rg = pq.ParquetFile(path).metadata.row_group(0)
    has_dict = {rg.column(i).path_in_schema: rg.column(i).has_dictionary_page for i in range(rg.num_columns)}
    assert has_dict == {"g": True, "x": False, "id": False, "c": True}
    assert pq.read_table(path).equals(pa.concat_tables([first, first.slice(0, 100)]))
