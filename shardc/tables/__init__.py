"""Tables on Apache Arrow / Parquet: ``auto_table``, table buffers, sinks and streams.

Needs pyarrow (``pip install 'shardc[tables]'``); importing this package does
not import it, and a feature used without it raises
:class:`shardc.errors.MissingDependencyError` naming the extra.

* :mod:`~shardc.tables.auto`: ``shard_map(..., dispatch_opts={"auto_table": True})``
  (options: :mod:`~shardc.tables.options`; parts: :mod:`~shardc.tables.parts`;
  the result: :class:`~shardc.tables.handle.TableHandle`).
* :mod:`~shardc.tables.explicit`: ``schema``, ``table_buffer``, ``row_layout``,
  ``table_write``, ``table_sink``, ``table_finalize``, ``iterate_row_groups``.
* :mod:`~shardc.tables.stream`: ``stream_*`` helpers with bounded memory.
"""

from __future__ import annotations

from .explicit import (
    RowLayout,
    TableBuffer,
    TableSink,
    factor,
    iterate_row_groups,
    row_layout,
    schema,
    table_buffer,
    table_finalize,
    table_sink,
    table_write,
)
from .handle import TableHandle, open_table
from .stream import (
    stream_count,
    stream_filter,
    stream_group_count,
    stream_group_sum,
    stream_map,
    stream_reduce,
    stream_sum,
    stream_top_k,
)

__all__ = [
    "RowLayout",
    "TableBuffer",
    "TableHandle",
    "TableSink",
    "factor",
    "iterate_row_groups",
    "open_table",
    "row_layout",
    "schema",
    "stream_count",
    "stream_filter",
    "stream_group_count",
    "stream_group_sum",
    "stream_map",
    "stream_reduce",
    "stream_sum",
    "stream_top_k",
    "table_buffer",
    "table_finalize",
    "table_sink",
    "table_write",
]
