"""Frames to Arrow: what a shard may return, and the schema checks.

A shard's frame becomes one ``pyarrow.Table`` (one row group of its part):

* pandas ``DataFrame``: as ``pa.Table.from_pandas(preserve_index=False)``
  gives it (:func:`_from_pandas`), as ``pd.concat(ignore_index=True)`` would
  number the rows; without the pandas metadata (it differs from shard to
  shard);
* ``pyarrow.Table`` / ``RecordBatch``: as is;
* polars ``DataFrame``: ``.to_arrow()``;
* anything with ``__arrow_c_stream__`` (the Arrow PyCapsule interface).

String types are kept as the frame has them (pandas 3's default ``str``
dtype and polars hand out ``large_string``, pandas 2's object strings and
most pyarrow code ``string``): a cast from one to the other copies the
offsets (~60 us of a worker's CPU per 10,000-row string column), and
neither the worker nor the reader should pay it when all frames agree.  Only
the view types (``string_view``, ``binary_view``) become ``large_string`` /
``large_binary``, which every reader (DuckDB, older pyarrow, Spark) takes.
Frames of one part whose string types differ are cast to the part's (the
first frame's) type; parts that differ are unified on reading
(``large_string``), as ``pd.concat`` would keep one string dtype.
With a schema, columns are matched by name (order follows the schema),
values cast safely; a missing/extra column or a failed cast is a
:class:`shardc.errors.TableSchemaError` naming the shard, the column and
the mismatch.  Without one, the first frame of a part fixes the part's
schema and later frames are cast to it the same way.
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import TableSchemaError
from .options import require_pyarrow


def is_frame(value: Any) -> bool:
    """Whether ``value`` is a frame this package turns into rows."""
    mod = type(value).__module__.split(".", 1)[0]
    if mod in ("pandas", "polars", "pyarrow"):
        return type(value).__name__ in ("DataFrame", "Table", "RecordBatch")
    return hasattr(value, "__arrow_c_stream__")


def _normal_type(pa: Any, t: Any) -> Any:
    if getattr(pa.types, "is_string_view", lambda _t: False)(t):
        return pa.large_string()
    if getattr(pa.types, "is_binary_view", lambda _t: False)(t):
        return pa.large_binary()
    if pa.types.is_dictionary(t):
        return pa.dictionary(t.index_type, _normal_type(pa, t.value_type), t.ordered)
    return t


def _from_pandas(pa: Any, df: Any) -> Any:
    """``pa.Table.from_pandas(df, preserve_index=False)`` without its pandas
    metadata and per-column inspection (~0.3-0.5 ms a frame, as much as
    converting 10,000 rows): each column goes through :func:`_column`, i.e.
    ``pa.array(column, from_pandas=True)`` (the call ``from_pandas`` makes per
    column) or, where that gives the same array, a zero-copy wrap of its NumPy
    values or its Arrow array, with view types normalised per column; a test
    compares the result with ``from_pandas`` over the dtypes pandas has.  The
    columns' values are taken from the frame's block manager when it has one
    (``_mgr.iget_values``: ~0.5 us a column; ``df.items()`` builds a Series per
    column, ~9 us, a third of the whole conversion of a 10,000-row frame).
    Frames whose column names are not distinct strings, and columns that do
    not convert (the error message of ``from_pandas`` names the column), take
    ``from_pandas``."""
    names = list(df.columns)
    if all(type(n) is str for n in names) and len(set(names)) == len(names):
        iget = getattr(getattr(df, "_mgr", None), "iget_values", None)
        try:
            return pa.Table.from_arrays([_column(pa, df, i, iget) for i in range(len(names))], names=names)
        except (pa.ArrowException, TypeError, ValueError):
            pass
    return pa.Table.from_pandas(df, preserve_index=False)


def _column(pa: Any, df: Any, i: int, iget: Any) -> Any:
    """Column ``i`` of ``df`` as Arrow.  NumPy ints, bools and NaN-free floats
    are wrapped as they are (no copy, ~2 us); ``from_pandas=True``'s scan
    (NaN -> null) costs ~45 us for 10,000 floats, so floats go that way only
    when they hold a NaN.  A pandas extension array with ``__arrow_array__``
    (Arrow-backed strings, the default ``str`` dtype of pandas 3, nullable
    ints, ``*[pyarrow]``) gives its Arrow array, which is what
    ``pa.array(series)`` returns for it (no copy).  Everything else:
    ``pa.array(col, from_pandas=True)``."""
    import numpy as np

    values = iget(i) if iget is not None else None
    if isinstance(values, np.ndarray):
        dt = values.dtype
        if dt.kind in "iub" or (dt.kind == "f" and dt.itemsize in (4, 8) and not np.isnan(values).any()):
            return pa.array(values)
    elif values is not None and type(values).__module__.startswith("pandas.") and hasattr(values, "__arrow_array__"):
        arr = values.__arrow_array__()
        return _normalised(pa, arr)
    return _normalised(pa, pa.array(df.iloc[:, i], from_pandas=True))


def _normalised(pa: Any, arr: Any) -> Any:
    normal = _normal_type(pa, arr.type)
    return arr if normal == arr.type else arr.cast(normal)  # one column: cheaper than casting the table


def to_table(value: Any, sid: int) -> Any:
    """``value`` (a frame) as a ``pyarrow.Table`` (view types normalised, see the module docstring)."""
    pa = require_pyarrow("auto_table")
    tname = type(value).__name__
    mod = type(value).__module__.split(".", 1)[0]
    if mod == "pyarrow" and tname == "Table":
        t = value
    elif mod == "pyarrow" and tname == "RecordBatch":
        t = pa.Table.from_batches([value])
    elif mod == "pandas" and tname == "DataFrame":
        t = _from_pandas(pa, value)
    elif mod == "polars" and tname == "DataFrame":
        t = value.to_arrow()
    elif hasattr(value, "__arrow_c_stream__"):
        t = pa.table(value)
    else:
        raise TableSchemaError(
            f"shard {sid} returned {type(value).__module__}.{tname}; with auto_table a shard returns a "
            "pandas or polars DataFrame, a pyarrow Table or RecordBatch, or None (no rows)"
        )
    if t.schema.metadata:
        t = t.replace_schema_metadata(None)
    fields = t.schema
    if any(_normal_type(pa, f.type) != f.type for f in fields):
        t = t.cast(pa.schema([f.with_type(_normal_type(pa, f.type)) for f in fields]))
    return t


def conform(t: Any, schema: Any, sid: int, what: str) -> Any:
    """``t`` with ``schema``'s columns (in its order) and types, or
    TableSchemaError naming shard ``sid``, the column and the mismatch
    (``what`` says where the schema comes from)."""
    if t.schema.equals(schema):
        return t
    names = t.column_names
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise TableSchemaError(f"shard {sid}: duplicate column name(s) {dup}")
    missing = [n for n in schema.names if n not in names]
    extra = [n for n in names if n not in schema.names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"column(s) {missing} missing")
        if extra:
            parts.append(f"unexpected column(s) {extra}")
        raise TableSchemaError(f"shard {sid}: its frame does not match {what}: " + "; ".join(parts))
    cols = []
    for f in schema:
        col = t.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type, safe=True)
            except Exception as exc:  # noqa: BLE001 - any cast failure is this column's mismatch
                raise TableSchemaError(
                    f"shard {sid}: column {f.name!r} is {col.type}, {what} says {f.type}, and it does not "
                    f"cast safely: {exc}"
                ) from None
        if not f.nullable and col.null_count:
            raise TableSchemaError(f"shard {sid}: column {f.name!r} has {col.null_count} null(s); {what} says not null")
        cols.append(col)
    return require_pyarrow("auto_table").Table.from_arrays(cols, schema=schema)


def polars_loaded() -> bool:
    return "polars" in sys.modules
