"""Streaming over a table's parts with bounded memory.

``x`` is a :class:`TableHandle`, a dataset directory (opened with its
manifest), or a ``pyarrow.dataset.Dataset``.  Every helper reads record
batches from a ``pyarrow.dataset`` scan (``to_batches``: a few batches in
flight, only the columns it needs, never the whole table), so memory is
bounded by a batch, not the data.  Where pyarrow does the work better than a
Python loop, it does:

===================  =================================================================
helper               how
===================  =================================================================
stream_count         the manifest's row count (no scan); a Dataset: ``count_rows``
stream_sum           ``pyarrow.compute.sum`` per batch (C), summed in Python
stream_top_k         ``pyarrow.compute.select_k_unstable`` per batch, the k best of the
                     candidates kept (k rows held, never more)
stream_group_sum /   the hash aggregation of ``Table.group_by(...).aggregate`` per batch,
stream_group_count   partial results merged by a second group_by (groups held, not rows)
stream_filter        the predicate, a ``pyarrow.compute.Expression``, is pushed into the
                     dataset scan (Parquet statistics skip row groups); a callable gets
                     each batch as a Table and returns a mask; the kept rows stream to a
                     new partitioned Parquet dataset (``pyarrow.dataset.write_dataset``)
stream_map /         plain Python over batches: ``f`` is the caller's
stream_reduce
===================  =================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import InvalidArgumentError, InvalidTypeError
from .handle import TableHandle, open_table
from .options import require_pyarrow

BATCH_ROWS = 1 << 17  # rows per scanned batch (bounded memory)


def _dataset(x: Any) -> Any:
    require_pyarrow("stream helpers")
    import pyarrow.dataset as ds

    if isinstance(x, ds.Dataset):
        return x
    if isinstance(x, TableHandle):
        return x.dataset()
    if isinstance(x, (str, os.PathLike)):
        return open_table(x).dataset()
    raise InvalidTypeError(f"expected a TableHandle, a dataset directory or a pyarrow Dataset, got {type(x).__name__}")


def _batches(x: Any, columns: list[str] | None = None, filter: Any = None) -> Iterator[Any]:  # noqa: A002
    d = _dataset(x)
    if columns is not None:
        missing = [c for c in columns if c not in d.schema.names]
        if missing:
            raise InvalidArgumentError(f"no column(s) {missing} in the table; it has {d.schema.names}")
    yield from d.to_batches(
        columns=columns, filter=filter, batch_size=BATCH_ROWS, batch_readahead=2, fragment_readahead=1
    )


def _check_numeric(x: Any, col: str) -> None:
    pa = require_pyarrow("stream helpers")
    t = _dataset(x).schema.field(col).type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise InvalidTypeError(f"column {col!r} is {t}; this helper needs a numeric column")


def stream_count(x: Any) -> int:
    """Rows in the table."""
    if isinstance(x, TableHandle):
        return x.num_rows
    if isinstance(x, (str, os.PathLike)):
        return open_table(x).num_rows
    return int(_dataset(x).count_rows())


def stream_sum(x: Any, col: str, na_rm: bool = True) -> Any:
    """The sum of a numeric column (None when ``na_rm=False`` and a value is null or NaN)."""
    pa = require_pyarrow("stream_sum")
    import pyarrow.compute as pc

    _check_numeric(x, col)
    total: Any = 0
    for b in _batches(x, [col]):
        a = b.column(0)
        floats = pa.types.is_floating(a.type)
        if not na_rm and (a.null_count or (floats and pc.any(pc.is_nan(a)).as_py())):
            return None
        if floats:  # NaN is skipped like null (pandas' skipna)
            a = pc.filter(a, pc.invert(pc.is_nan(a)))
        v = pc.sum(a, skip_nulls=True).as_py()
        total += v if v is not None else 0
    return total


def stream_top_k(x: Any, col: str, k: int = 10, decreasing: bool = True, columns: list[str] | None = None) -> Any:
    """The ``k`` rows with the largest (``decreasing``) or smallest values of
    ``col`` (nulls and NaN dropped), as a ``pyarrow.Table`` sorted by ``col``."""
    pa = require_pyarrow("stream_top_k")
    import pyarrow.compute as pc

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"stream_top_k k must be an int >= 1, got {k!r}")
    _check_numeric(x, col)
    order = "descending" if decreasing else "ascending"
    if columns is not None and col not in columns:
        columns = [*columns, col]
    best = None
    for b in _batches(x, columns):
        t = pa.Table.from_batches([b])
        c = t.column(col)
        keep = pc.is_valid(c)
        if pa.types.is_floating(c.type):
            keep = pc.and_(keep, pc.invert(pc.is_nan(c)))
        t = t.filter(keep)
        cand = t if best is None else pa.concat_tables([best, t])
        idx = pc.select_k_unstable(cand, k=min(k, cand.num_rows), sort_keys=[(col, order)]) if cand.num_rows else []
        best = cand.take(idx)
    if best is None:
        return _dataset(x).schema.empty_table()
    return best.sort_by([(col, order)])


def _group_agg(x: Any, group: str, value: str | None, how: str) -> Any:
    pa = require_pyarrow("stream_group_*")
    cols = [group] if value is None else [group, value]
    partial = []
    name = f"{value}_{how}" if value is not None else "count"
    for b in _batches(x, cols):
        t = pa.Table.from_batches([b])
        if pa.types.is_dictionary(t.schema.field(group).type):
            t = t.set_column(0, group, t.column(group).cast(t.schema.field(group).type.value_type))
        if value is None:
            agg = t.group_by(group).aggregate([([], "count_all")]).rename_columns([group, "count"])
        else:
            agg = t.group_by(group).aggregate([(value, how)]).rename_columns([group, name])
        partial.append(agg)
    if not partial:
        return pa.table({group: pa.array([]), name: pa.array([], pa.int64())})
    merged = pa.concat_tables(partial, promote_options="permissive")
    out = merged.group_by(group).aggregate([(name, "sum")]).rename_columns([group, name])
    return out.sort_by(group)


def stream_group_sum(x: Any, group: str, value: str) -> Any:
    """Per value of ``group``: the sum of ``value`` (nulls skipped), as a Table sorted by group."""
    _check_numeric(x, value)
    return _group_agg(x, group, value, "sum")


def stream_group_count(x: Any, group: str) -> Any:
    """Per value of ``group``: its row count, as a Table sorted by group."""
    return _group_agg(x, group, None, "count")


def stream_filter(x: Any, predicate: Any, path: Any = None) -> TableHandle:
    """The rows where ``predicate`` holds, streamed into a new partitioned
    Parquet dataset at ``path`` (a temporary directory owned by the handle
    when None).  ``predicate``: a ``pyarrow.compute.Expression`` (pushed into
    the scan) or ``f(table) -> boolean mask``."""
    pa = require_pyarrow("stream_filter")
    import pyarrow.compute as pc

    from .explicit import table_finalize, table_sink, table_write

    expr = isinstance(predicate, pc.Expression)
    if not expr and not callable(predicate):
        raise InvalidTypeError("stream_filter predicate must be a pyarrow.compute Expression or a callable")
    sink = table_sink(None, "partitioned" if path is not None else "row_groups", path, "parquet")
    n = 0
    for b in _batches(x, None, predicate if expr else None):
        t = pa.Table.from_batches([b])
        if not expr:
            t = t.filter(predicate(t))
        if t.num_rows:
            table_write(sink, n, t)
            n += 1
    return table_finalize(sink, materialize="never")


def stream_map(x: Any, f: Callable[[Any], Any], columns: list[str] | None = None) -> list[Any]:
    """``[f(batch as a pyarrow Table) for each scanned batch]``."""
    pa = require_pyarrow("stream_map")
    return [f(pa.Table.from_batches([b])) for b in _batches(x, columns)]


def stream_reduce(
    x: Any,
    f: Callable[..., Any],
    init: Any,
    combine: Callable[[Any, Any], Any] | None = None,
    columns: list[str] | None = None,
) -> Any:
    """Fold the batches: ``acc = f(acc, batch)``; with ``combine``,
    ``acc = combine(acc, f(batch))``.  Returns ``acc`` (``init`` if no rows)."""
    pa = require_pyarrow("stream_reduce")
    acc = init
    for b in _batches(x, columns):
        t = pa.Table.from_batches([b])
        acc = combine(acc, f(t)) if combine is not None else f(acc, t)
    return acc
