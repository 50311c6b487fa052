"""Part files: many shards' rows in one file, one row group per shard.

Writer (in a worker, :class:`PartWriter`)::

    put(sid, table)  ─> appends one row group to the open part ``.tmp-w<slot>-<pid>-<n>.<ext>``
                        (a new part once the open one passes PART_TARGET_BYTES)
    commit()         ─> closes the open part, fsyncs every part written since the last
                        commit when the output is persistent, and returns one record per
                        part: temporary name, shards [(sid, rows, arrow bytes)], rows,
                        file bytes, schema
    abort()          ─> removes what was not committed

Temporary names start with ``.``, which ``pyarrow.dataset`` (and Spark,
DuckDB's globs of ``*.parquet``) skip: a part becomes visible only when the
master renames it to ``part-<seq>.<ext>`` on receiving its record
(:class:`shardc.tables.auto.AutoTable`), i.e. after the shards it holds were
reported done.  Shards with no rows (None, an empty frame) are recorded with
0 rows and no row group.

Readers: :func:`read_part` gives a part as one table (memory-mapped, no copy,
for Arrow IPC files); :func:`shard_slices` cuts it into the shards' rows.
"""

from __future__ import annotations

import os
from typing import Any

from .options import require_pyarrow

PART_TARGET_BYTES = 256 * 1024**2  # a part is closed (still uncommitted) past this size
EXT = {"arrow": "arrow", "parquet": "parquet"}
WRITE_BUFFER = 1 << 20  # Arrow IPC parts are written through a buffer this large


class _OpenPart:
    __slots__ = ("file", "name", "rows", "schema", "shards", "writer")

    def __init__(self, name: str, schema: Any, fmt: str, path: str, first: Any) -> None:
        pa = require_pyarrow("table parts")
        self.name = name
        self.schema = schema
        self.shards: list[list[int]] = []
        self.rows = 0
        if fmt == "arrow":
            # Through a 1 MiB buffer: the IPC writer's many unaligned writes (a
            # body buffer each) become few page-aligned ones; writing a
            # 10,000-row frame (560 KB) into the page cache then takes ~20% less.
            self.file = pa.BufferedOutputStream(pa.OSFile(path, "wb"), WRITE_BUFFER)
            self.writer = pa.ipc.new_file(self.file, schema)
        else:
            import pyarrow.parquet as pq

            self.file = None
            self.writer = pq.ParquetWriter(path, schema, use_dictionary=dictionary_columns(pa, first))


class PartWriter:
    """Appends shards' tables to part files in ``directory`` (see the module docstring).

    Args:
        directory: where the parts go.
        fmt: "arrow" (IPC file) or "parquet".
        tag: makes the temporary names unique (worker slot and pid).
        fsync: fsync each part before its commit returns (persistent outputs).
        target_bytes: close the open part once it is this large.
    """

    def __init__(self, directory: str, fmt: str, tag: str, fsync: bool, target_bytes: int = PART_TARGET_BYTES) -> None:
        self.directory = directory
        self.fmt = fmt
        self.tag = tag
        self.fsync = fsync
        self.target = target_bytes
        self.schema: Any = None  # fixed by the first non-empty table (or given)
        self.open: _OpenPart | None = None
        self.closed: list[dict[str, Any]] = []  # parts written since the last commit, closed
        self.empty: list[list[int]] = []  # shards with no rows since the last commit
        self.seq = 0

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def put(self, sid: int, table: Any) -> int:
        """Append ``table`` (already conformed to ``self.schema`` if set) as
        shard ``sid``'s row group; returns its row count."""
        n = table.num_rows
        if n == 0:
            self.empty.append([sid, 0, 0])
            return 0
        if self.schema is None:
            self.schema = table.schema
        if self.open is None:
            self.seq += 1
            name = f".tmp-{self.tag}-{self.seq}.{EXT[self.fmt]}"
            self.open = _OpenPart(name, self.schema, self.fmt, self._path(name), table)
        part = self.open
        if self.fmt == "arrow":
            batches = table.combine_chunks().to_batches()
            for b in batches:
                part.writer.write_batch(b)
        else:
            part.writer.write_table(table, row_group_size=n)
        part.shards.append([sid, n, int(table.nbytes)])
        part.rows += n
        size = part.file.tell() if self.fmt == "arrow" else sum(s[2] for s in part.shards)  # parquet: Arrow bytes
        if size >= self.target:
            self._close()
        return n

    def roll(self, schema: Any) -> None:
        """Close the open part: the next ones have ``schema``."""
        self._close()
        self.schema = schema

    def _close(self) -> None:
        part, self.open = self.open, None
        if part is None:
            return
        part.writer.close()
        if part.file is not None:
            part.file.close()
        path = self._path(part.name)
        if self.fsync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.closed.append(
            {
                "tmp": part.name,
                "shards": part.shards,
                "rows": part.rows,
                "bytes": os.stat(path).st_size,
                "schema": part.schema.serialize().to_pybytes(),
            }
        )

    def commit(self) -> list[dict[str, Any]] | None:
        """Close the open part; return the records of everything since the last commit."""
        self._close()
        recs, self.closed = self.closed, []
        if self.empty:
            recs.append({"tmp": None, "shards": self.empty, "rows": 0, "bytes": 0, "schema": None})
            self.empty = []
        return recs or None

    def abort(self) -> None:
        """Remove the parts not committed."""
        part, self.open = self.open, None
        names = [r["tmp"] for r in self.closed if r["tmp"]]
        if part is not None:
            try:
                part.writer.close()
                if part.file is not None:
                    part.file.close()
            except Exception:  # noqa: BLE001, S110 - it is removed below anyway
                pass
            names.append(part.name)
        self.closed, self.empty = [], []
        for name in names:
            try:
                os.unlink(self._path(name))
            except OSError:
                pass


def dictionary_columns(pa: Any, first: Any) -> Any:
    """The columns a Parquet part dictionary-encodes, judged on its first
    frame: dictionary-typed columns and those whose first 10,000 values hold
    at most half as many distinct ones.  pyarrow's default (every column)
    costs 2-3x the write time on high-cardinality data (random floats, ids,
    free text) and makes those files larger; a low-cardinality column still
    gets its dictionary.  With a nested column: True (pyarrow's default)."""
    import pyarrow.compute as pc

    if any(pa.types.is_nested(f.type) for f in first.schema):
        return True
    sample = first.slice(0, 10_000)
    n = sample.num_rows
    return [
        f.name
        for f, col in zip(first.schema, sample.columns, strict=True)
        if pa.types.is_dictionary(f.type) or pc.count_distinct(col, mode="all").as_py() <= n // 2
    ]


def read_part(path: str, fmt: str, mmap: bool = True) -> Any:
    """The whole part as one ``pyarrow.Table`` (Arrow IPC: memory-mapped
    when ``mmap``, so no byte is copied until used)."""
    pa = require_pyarrow("table parts")
    if fmt == "arrow":
        src = pa.memory_map(path, "r") if mmap else pa.OSFile(path, "rb")
        with src:
            return pa.ipc.open_file(src).read_all()
    import pyarrow.parquet as pq

    return pq.read_table(path, memory_map=mmap)


def shard_slices(table: Any, shards: list[list[int]]) -> list[tuple[int, Any]]:
    """``(sid, rows of that shard)`` for each non-empty shard of a part, in
    the part's order (zero-copy slices)."""
    out = []
    off = 0
    for sid, n, _nb in shards:
        if n:
            out.append((sid, table.slice(off, n)))
            off += n
    return out
