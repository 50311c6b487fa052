"""Explicit table outputs: schemas, fixed-row table buffers, row layouts, sinks.

* :func:`schema` ``(**columns)``: a ``pyarrow.Schema`` from pyarrow types;
  :func:`factor` ``(levels)`` declares a factor (R's ``factor_col``): int32
  codes + a dictionary of levels (kept in the field's metadata).
* :func:`table_buffer` ``(schema, nrow)``: one shardc shared buffer per
  column (fixed-width types only: numbers, bool, temporal, factor codes), so
  shards write their rows in place, lock-free, into disjoint row ranges
  (:func:`row_layout`).  Strings have no fixed width: use a sink.
  Buffers have no validity bitmap: no nulls (NaN in floats is fine).
* :func:`table_sink` ``(schema, mode, path, format)``: variable-size output;
  each :func:`table_write` ``(sink, shard_id, frame)`` writes that shard's
  part atomically (temporary name, then rename to ``part-<sid>``), so a
  retried shard replaces its earlier attempt: one copy per shard.
* :func:`table_finalize` gives a table: a buffer's columns as a
  ``pyarrow.Table``; a sink's parts as a :class:`TableHandle` (manifest
  written) or a materialized Table.
* :func:`iterate_row_groups`: one table per shard (row group), part by part.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .. import tmpdirs
from ..buffer import Buffer, buffer
from ..errors import InvalidArgumentError, InvalidTypeError, TableSchemaError
from ..shards import ShardDescriptor
from ..units import parse_bytes
from .convert import conform, to_table
from .handle import MANIFEST, TableHandle, materialized_table
from .options import DEFAULT_MAX_BYTES, FORMATS, MATERIALIZE, MODES, require_pyarrow, resolve_format
from .parts import EXT, dictionary_columns, read_part

LEVELS_KEY = b"shardc.levels"


class factor:  # noqa: N801 - reads as a type, like pa.int32()
    """A factor column for :func:`schema`: int32 codes into ``levels``."""

    def __init__(self, levels: Any) -> None:
        lv = [str(v) for v in levels]
        if len(set(lv)) != len(lv) or not lv:
            raise InvalidArgumentError(f"factor levels must be distinct and not empty, got {list(levels)!r}")
        self.levels = lv


def schema(**columns: Any) -> Any:
    """A ``pyarrow.Schema``: ``schema(x=pa.float64(), n=pa.int32(), g=factor(["a", "b"]))``."""
    pa = require_pyarrow("schema()")
    if not columns:
        raise InvalidArgumentError("schema() needs at least one column, e.g. schema(x=pa.float64())")
    fields = []
    for name, t in columns.items():
        if isinstance(t, factor):
            fields.append(
                pa.field(name, pa.dictionary(pa.int32(), pa.string()), metadata={LEVELS_KEY: json.dumps(t.levels)})
            )
        elif isinstance(t, pa.DataType):
            fields.append(pa.field(name, t))
        else:
            raise InvalidTypeError(
                f"schema column {name!r}: expected a pyarrow type (pa.int32(), pa.float64(), pa.string(), ...) "
                f"or shardc.tables.factor(levels), got {t!r}"
            )
    return pa.schema(fields)


def levels_of(field: Any) -> list[str] | None:
    """The levels of a factor field, None for other fields."""
    md = field.metadata or {}
    return json.loads(md[LEVELS_KEY]) if LEVELS_KEY in md else None


def _numpy_dtype(pa: Any, field: Any) -> np.dtype:
    t = field.type
    if pa.types.is_dictionary(t):
        if levels_of(field) is None:
            raise InvalidTypeError(
                f"table_buffer column {field.name!r}: a dictionary column needs its levels: use factor()"
            )
        return np.dtype(np.int32)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_nested(t):
        raise InvalidTypeError(
            f"table_buffer column {field.name!r} is {t}, which has no fixed width; write variable-size "
            "columns with table_sink(schema) instead (one part per shard)"
        )
    try:
        return np.dtype(t.to_pandas_dtype())
    except (NotImplementedError, TypeError) as exc:
        raise InvalidTypeError(f"table_buffer column {field.name!r}: type {t} is not supported: {exc}") from None


class TableBuffer:
    """Fixed-row columnar shared output (see :func:`table_buffer`).

    Attributes:
        schema: the ``pyarrow.Schema``.
        nrow: rows.
        columns: name -> :class:`shardc.Buffer` (a NumPy array inside workers).
    """

    def __init__(self, schema: Any, nrow: int, columns: dict[str, Any]) -> None:
        self.schema = schema
        self.nrow = nrow
        self.columns = columns

    def to_arrow(self, copy: bool = True) -> Any:
        """The rows as a ``pyarrow.Table`` (``copy=False``: over the shared memory)."""
        pa = require_pyarrow("TableBuffer.to_arrow")
        arrays = []
        for f in self.schema:
            a = np.asarray(self.columns[f.name])
            if copy:
                a = a.copy()
            lv = levels_of(f)
            if lv is not None:
                arrays.append(pa.DictionaryArray.from_arrays(pa.array(a, pa.int32()), pa.array(lv, pa.string())))
            else:
                arrays.append(pa.array(a, f.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def close(self) -> None:
        for b in self.columns.values():
            if isinstance(b, Buffer):
                b.close()

    def __enter__(self) -> TableBuffer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def table_buffer(schema: Any, nrow: int, backing: str = "auto") -> TableBuffer:
    """A :class:`TableBuffer` of ``nrow`` rows: one shared buffer per column, zero-filled."""
    pa = require_pyarrow("table_buffer()")
    if not isinstance(schema, pa.Schema):
        raise InvalidTypeError(
            f"table_buffer needs a pyarrow.Schema (shardc.tables.schema(...)), got {type(schema).__name__}"
        )
    if isinstance(nrow, bool) or not isinstance(nrow, (int, np.integer)) or nrow < 0:
        raise InvalidArgumentError(f"table_buffer nrow must be an integer >= 0, got {nrow!r}")
    dtypes = {f.name: _numpy_dtype(pa, f) for f in schema}
    return TableBuffer(schema, int(nrow), {k: buffer(dt, int(nrow), backing=backing) for k, dt in dtypes.items()})


class RowLayout:
    """Each shard's rows in a table buffer: ``layout[sid]`` is a ``slice``, or None for a zero-row shard."""

    def __init__(self, starts: np.ndarray) -> None:
        self.starts = starts  # prefix sums, len = shards + 1
        self.nrow = int(starts[-1])

    def __getitem__(self, sid: int) -> slice | None:
        a, b = int(self.starts[sid]), int(self.starts[sid + 1])
        return slice(a, b) if b > a else None

    def __len__(self) -> int:
        return len(self.starts) - 1


def row_layout(shards: Any, rows_per_shard: int | Callable[[Any], int]) -> RowLayout:
    """Prefix sums of rows per shard (an int, or ``f(shard)``) for disjoint, lock-free writes."""
    desc = shards if isinstance(shards, ShardDescriptor) else None
    n = len(desc) if desc is not None else shards
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidArgumentError(f"row_layout shards must be a shard descriptor or an int >= 0, got {shards!r}")
    if callable(rows_per_shard):
        counts = [rows_per_shard(desc.shard(k) if desc is not None else k) for k in range(int(n))]
    else:
        counts = [rows_per_shard] * int(n)
    for k, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
            raise InvalidArgumentError(f"row_layout: rows for shard {k} must be an integer >= 0, got {c!r}")
    return RowLayout(np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]))


def _rows(rows: Any, nrow: int) -> Any:
    if isinstance(rows, slice):
        a, b, step = rows.indices(nrow)
        if step != 1:
            raise InvalidArgumentError("table_write rows must be a contiguous slice (step 1)")
        return slice(a, b), b - a
    idx = np.asarray(rows)
    if idx.ndim == 0:
        idx = idx.reshape(1)
    if idx.dtype.kind not in "iu":
        raise InvalidArgumentError(f"table_write rows must be a slice or integer indices, got dtype {idx.dtype}")
    if len(idx) and (idx.min() < 0 or idx.max() >= nrow):
        raise InvalidArgumentError(f"table_write rows out of range 0..{nrow - 1}")
    return idx, len(idx)


def _codes(pa: Any, col: Any, field: Any, lv: list[str]) -> np.ndarray:
    import pyarrow.compute as pc

    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_integer(col.type):
        codes = np.asarray(col.to_numpy(zero_copy_only=False))
        if len(codes) and (codes.min() < 0 or codes.max() >= len(lv)):
            raise TableSchemaError(f"column {field.name!r}: factor codes outside 0..{len(lv) - 1}")
        return codes.astype(np.int32)
    codes_arr = pc.index_in(col.cast(pa.string()), value_set=pa.array(lv, pa.string()))
    if codes_arr.null_count:
        bad = pc.filter(col, pc.is_null(codes_arr)).unique().to_pylist()[:5]
        raise TableSchemaError(f"column {field.name!r}: value(s) {bad} are not among the factor levels {lv}")
    return np.asarray(codes_arr.to_numpy(zero_copy_only=False), dtype=np.int32)


def _write_buffer(tb: TableBuffer, rows: Any, data: Any) -> int:
    pa = require_pyarrow("table_write()")
    where, n = _rows(rows, tb.nrow)
    t = to_table(data if not isinstance(data, dict) else pa.table(data), -1)
    if t.num_rows != n:
        raise InvalidArgumentError(f"table_write: {t.num_rows} rows of data for {n} target rows")
    names = set(t.column_names)
    missing, extra = sorted(set(tb.schema.names) - names), sorted(names - set(tb.schema.names))
    if missing or extra:
        raise TableSchemaError(
            f"table_write: columns missing {missing}, unexpected {extra} (schema: {tb.schema.names})"
        )
    for f in tb.schema:
        col = t.column(f.name).combine_chunks()
        lv = levels_of(f)
        if lv is not None:
            vals = _codes(pa, col, f, lv)
        else:
            if col.null_count:
                raise TableSchemaError(
                    f"table_write column {f.name!r}: {col.null_count} null(s); a table buffer holds none"
                )
            try:
                col = col.cast(f.type, safe=True)
            except Exception as exc:  # noqa: BLE001 - a failed cast is this column's mismatch
                raise TableSchemaError(
                    f"table_write column {f.name!r}: {col.type} does not cast to {f.type}: {exc}"
                ) from None
            vals = col.to_numpy(zero_copy_only=False)
        np.asarray(tb.columns[f.name])[where] = vals
    return n


class TableSink:
    """Variable-size output: one part file per shard in ``path`` (see :func:`table_sink`)."""

    def __init__(self, schema: Any, mode: str, path: str, fmt: str, owned: bool) -> None:
        self.schema = schema
        self.mode = mode
        self.path = path
        self.fmt = fmt
        self._owner = os.getpid() if owned else None

    def __reduce__(self) -> Any:  # a copy (a worker's) owns nothing
        return (TableSink, (self.schema, self.mode, self.path, self.fmt, False))

    def write(self, sid: int, data: Any) -> int:
        if isinstance(sid, bool) or not isinstance(sid, (int, np.integer)) or sid < 0:
            raise InvalidArgumentError(f"table_write to a sink needs the shard id (an int >= 0), got {sid!r}")
        t = to_table(data, int(sid))
        if self.schema is not None:
            t = conform(t, self.schema, int(sid), "the sink's schema")
        name = f"part-{int(sid):06d}.{EXT[self.fmt]}"
        tmp = os.path.join(self.path, f".tmp-{name}.{os.getpid()}")
        pa = require_pyarrow("table_write()")
        if self.fmt == "arrow":
            with pa.OSFile(tmp, "wb") as f, pa.ipc.new_file(f, t.schema) as w:
                w.write_table(t)
        else:
            import pyarrow.parquet as pq

            pq.write_table(t, tmp, row_group_size=max(1, t.num_rows), use_dictionary=dictionary_columns(pa, t))
        if self.mode == "partitioned":
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, os.path.join(self.path, name))  # a retry of the shard replaces its earlier part
        return t.num_rows


def table_sink(schema: Any = None, mode: str = "row_groups", path: Any = None, format: str = "auto") -> TableSink:  # noqa: A002
    """A sink for variable-size outputs (strings, ragged rows): ``table_write(sink, shard.id, frame)``
    in a shard; ``table_finalize(sink)`` afterwards.  ``mode="partitioned"`` needs ``path`` and
    fsyncs each part; "row_groups" without a path uses a temporary directory owned by this process."""
    pa = require_pyarrow("table_sink()")
    if schema is not None and not isinstance(schema, pa.Schema):
        raise InvalidTypeError(f"table_sink schema must be a pyarrow.Schema or None, got {type(schema).__name__}")
    if mode not in MODES:
        raise InvalidArgumentError(f"table_sink mode={mode!r}; use one of {MODES}")
    if format not in FORMATS:
        raise InvalidArgumentError(f"table_sink format={format!r}; use one of {FORMATS}")
    fmt = resolve_format(format, mode)
    if path is None:
        if mode == "partitioned":
            raise InvalidArgumentError("table_sink(mode='partitioned') writes a persistent dataset: give path=")
        return TableSink(schema, mode, tmpdirs.owned_tempdir("table"), fmt, owned=True)
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    return TableSink(schema, mode, path, fmt, owned=False)


def table_write(target: Any, rows_or_shard_id: Any, data: Any) -> int:
    """Write ``data`` (a pandas/polars frame, pyarrow Table, or dict of columns):
    into a :class:`TableBuffer` at ``rows`` (a slice, e.g. ``layout[shard.id]``, or
    indices), columns matched strictly and cast safely; or into a :class:`TableSink`
    as shard ``rows_or_shard_id``'s part.  Returns the rows written."""
    if isinstance(target, TableBuffer):
        if rows_or_shard_id is None:
            return 0  # a zero-row shard of a row layout
        return _write_buffer(target, rows_or_shard_id, data)
    if isinstance(target, TableSink):
        return target.write(rows_or_shard_id, data)
    raise InvalidTypeError(f"table_write target must be a table_buffer or table_sink, got {type(target).__name__}")


_PART = re.compile(r"^part-(\d+)\.(arrow|parquet)$")


def table_finalize(
    target: Any, materialize: str = "never", max_bytes: Any = DEFAULT_MAX_BYTES, failed: Any = ()
) -> Any:
    """Finish an explicit output.  A :class:`TableBuffer` gives a ``pyarrow.Table``
    (a copy; ``materialize="never"``: over the shared buffers, valid while they
    are open).  A :class:`TableSink` gets its manifest (shards in ``failed``, e.g.
    ``result.failures``, have their parts removed) and gives a
    :class:`TableHandle`, or a Table when materialized ("always", or "auto" up to
    ``max_bytes``)."""
    if materialize not in MATERIALIZE:
        raise InvalidArgumentError(f"materialize={materialize!r}; use one of {MATERIALIZE}")
    limit = parse_bytes(max_bytes, "max_bytes") or 2**62
    if isinstance(target, TableBuffer):
        return target.to_arrow(copy=materialize != "never")
    if not isinstance(target, TableSink):
        raise InvalidTypeError(f"table_finalize needs a table_buffer or table_sink, got {type(target).__name__}")
    pa = require_pyarrow("table_finalize()")
    failed_ids = sorted(int(s) for s in failed)
    parts, empty = [], []
    for e in sorted(os.listdir(target.path)):
        m = _PART.match(e)
        full = os.path.join(target.path, e)
        if e.startswith(".tmp-"):
            os.unlink(full)  # an attempt that died before its rename
            continue
        if m is None:
            continue
        sid = int(m.group(1))
        if sid in failed_ids:
            os.unlink(full)
            continue
        t = read_part(full, target.fmt)
        if t.num_rows == 0:
            empty.append(sid)
        parts.append(
            {
                "file": e,
                "worker": -1,
                "shards": [[sid, t.num_rows, int(t.nbytes)]],
                "rows": t.num_rows,
                "bytes": os.stat(full).st_size,
                "schema": t.schema.serialize().to_pybytes().hex(),
            }
        )
    man = {
        "version": 1,
        "format": target.fmt,
        "mode": target.mode,
        "num_shards": None,
        "failed_shards": failed_ids,
        "empty_shards": empty,
        "schema": target.schema.serialize().to_pybytes().hex() if target.schema is not None else None,
        "parts": parts,
        "rows": sum(p["rows"] for p in parts),
        "bytes": sum(p["bytes"] for p in parts),
        "arrow_bytes": sum(p["shards"][0][2] for p in parts),
    }
    tmp = os.path.join(target.path, "." + MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(man, f)
    os.replace(tmp, os.path.join(target.path, MANIFEST))
    handle = TableHandle(target.path, owned=target._owner == os.getpid())
    if materialize == "always" or (materialize == "auto" and man["arrow_bytes"] <= limit):
        table = materialized_table(handle, pa)
        handle.close()
        return table
    return handle


def iterate_row_groups(x: Any, as_pandas: bool = False) -> Iterator[Any]:
    """One table (or pandas DataFrame) per shard's row group, part by part
    (commit order; bounded memory: one part at a time).  ``x``: a
    :class:`TableHandle` or a dataset directory."""
    from .parts import shard_slices

    h = x if isinstance(x, TableHandle) else TableHandle(os.fspath(x))
    for p, t in zip(h.manifest["parts"], h.iter_parts(), strict=True):
        for _sid, piece in shard_slices(t, p["shards"]):
            yield piece.to_pandas() if as_pandas else piece
