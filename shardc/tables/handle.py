"""A table on disk: :class:`TableHandle` over a directory of parts and its manifest.

``_manifest.json`` (written last, by rename) lists the parts in commit order,
each with its shards ``[sid, rows, arrow bytes]`` in row order, its rows, file
bytes and schema (Arrow IPC serialized, hex), plus the failed and empty
shards.  Reading in shard order cuts each part into its shards' rows
(zero-copy slices) and sorts them by shard id, so the rows come out as
``pd.concat`` of the shards' frames would give them, whichever worker ran
which shard.  Parts whose schemas differ (workers inferred types from
different frames, e.g. int64 and float64 for a column with nulls) are cast to
their unified schema (``pa.unify_schemas(promote_options="permissive")``).

A handle made by ``auto_table`` in ``row_groups`` mode owns its temporary
directory: ``close()`` (or the handle's collection, or the process's exit)
removes it.  A pickled handle, or one opened with :func:`open_table`, owns
nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from collections.abc import Iterator
from typing import Any

from ..errors import ClosedError, TableSchemaError
from .options import require_pyarrow
from .parts import read_part, shard_slices

MANIFEST = "_manifest.json"


def _schema(pa: Any, hexed: str | None) -> Any:
    return None if hexed is None else pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(hexed)))


class TableHandle:
    """The output of an ``auto_table`` call or a finalized sink (see the module docstring).

    Attributes:
        path: the directory.
        manifest: the parsed ``_manifest.json``.
    """

    def __init__(self, path: str, owned: bool = False, manifest: dict[str, Any] | None = None) -> None:
        self.path = os.fspath(path)
        if manifest is None:
            with open(os.path.join(self.path, MANIFEST)) as f:
                manifest = json.load(f)
        self.manifest: dict[str, Any] = manifest
        self.fmt: str = self.manifest["format"]
        self._closed = False
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True) if owned else None

    # -- what it holds -------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def nbytes(self) -> int:
        """The rows' size in memory as Arrow (the estimate ``materialize="auto"`` uses)."""
        return int(self.manifest["arrow_bytes"])

    @property
    def files(self) -> list[str]:
        """The part files, in commit order."""
        return [os.path.join(self.path, p["file"]) for p in self.manifest["parts"]]

    @property
    def failed_shards(self) -> list[int]:
        return list(self.manifest["failed_shards"])

    @property
    def schema(self) -> Any:
        """The unified schema of the parts (the given schema, if any)."""
        pa = require_pyarrow("TableHandle")
        given = _schema(pa, self.manifest.get("schema"))
        if given is not None:
            return given
        schemas = [_schema(pa, p["schema"]) for p in self.manifest["parts"]]
        if not schemas:
            return pa.schema([])
        try:
            return pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise TableSchemaError(
                f"the parts of {self.path!r} have schemas that do not unify ({exc}); give the frames one "
                "schema (auto_table_schema) or read the parts one by one (iter_parts(unify=False))"
            ) from None

    @property
    def owns_files(self) -> bool:
        """Whether this handle removes its directory on close (a temporary one)."""
        return self._finalizer is not None

    def _check(self) -> None:
        if self._closed:
            raise ClosedError(f"the table handle of {self.path!r} is closed (its temporary files are removed)")

    # -- reading ----------------------------------------------------------------------------------
    def iter_parts(self, mmap: bool = True, unify: bool = True) -> Iterator[Any]:
        """One ``pyarrow.Table`` per part, in commit order (bounded memory:
        one part at a time; rows inside a part in the order they were
        written), with the unified schema (``unify``: as ``pd.concat`` does,
        types promoted, a column a part lacks is null there)."""
        self._check()
        pa = require_pyarrow("TableHandle")
        schema = self.schema if unify else None
        for p in self.manifest["parts"]:
            t = read_part(os.path.join(self.path, p["file"]), self.fmt, mmap)
            yield t if schema is None or t.schema.equals(schema) else _align(pa, t, schema)

    def shard_tables(self, mmap: bool = True) -> list[tuple[int, Any]]:
        """``(sid, table)`` for every shard with rows, in shard order."""
        pieces: list[tuple[int, Any]] = []
        for p, t in zip(self.manifest["parts"], self.iter_parts(mmap), strict=True):
            pieces += shard_slices(t, p["shards"])
        pieces.sort(key=lambda x: x[0])
        return pieces

    def to_arrow(self) -> Any:
        """All rows as one ``pyarrow.Table``, in shard order (Arrow IPC parts
        are memory-mapped: no copy; a chunk per shard)."""
        pa = require_pyarrow("TableHandle.to_arrow")
        pieces = self.shard_tables()
        if not pieces:
            return self.schema.empty_table()
        return pa.concat_tables([t for _, t in pieces])

    def to_pandas(self, **kwargs: Any) -> Any:
        """All rows as a pandas DataFrame (``to_arrow().to_pandas(**kwargs)``)."""
        return self.to_arrow().to_pandas(**kwargs)

    def to_polars(self) -> Any:
        """All rows as a polars DataFrame."""
        try:
            import polars as pl
        except ImportError as exc:
            from ..errors import MissingDependencyError

            raise MissingDependencyError("TableHandle.to_polars needs polars: pip install polars") from exc
        return pl.from_arrow(self.to_arrow())

    def dataset(self) -> Any:
        """The parts as a ``pyarrow.dataset.Dataset`` (scans in part order,
        not shard order; filters and projections are pushed down)."""
        self._check()
        import pyarrow.dataset as ds

        return ds.dataset(self.files, schema=self.schema, format="ipc" if self.fmt == "arrow" else "parquet")

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the directory if this handle owns it (idempotent; a handle
        that owns nothing stays usable)."""
        if self._finalizer is not None:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> TableHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __reduce__(self) -> Any:  # a copy owns nothing (and unpickles even where the files are gone)
        return (TableHandle, (self.path, False, self.manifest))

    def __repr__(self) -> str:
        return (
            f"<TableHandle {self.path!r} {self.fmt}: {self.num_rows} rows in "
            f"{len(self.manifest['parts'])} part(s), {len(self.failed_shards)} failed shard(s)>"
        )


def _align(pa: Any, t: Any, schema: Any) -> Any:
    """``t`` with ``schema``'s columns: cast, or all null where ``t`` has none."""
    cols = []
    for f in schema:
        if f.name in t.column_names:
            c = t.column(f.name)
            cols.append(c if c.type == f.type else c.cast(f.type))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def open_table(path: Any) -> TableHandle:
    """Open a directory written by ``auto_table_mode="partitioned"`` or a sink (owns nothing)."""
    return TableHandle(os.fspath(path), owned=False)


def materialized_table(handle: TableHandle, pa: Any) -> Any:
    """All rows of ``handle`` in memory, in shard order.

    The Arrow IPC parts of a temporary directory that ``handle`` owns are
    memory-mapped, not read: nobody else writes them, and a mapping outlives
    the removal of its file (the caller closes the handle next), so the rows
    are in memory (page cache) without a copy.  Parts in a user's directory
    are read (copied): those files may change or go."""
    pieces = handle.shard_tables(mmap=handle.owns_files)
    if not pieces:
        return handle.schema.empty_table()
    return pa.concat_tables([t for _, t in pieces])
