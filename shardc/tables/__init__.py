"""Tables on Apache Arrow / Parquet: ``auto_table``, table buffers, sinks and streams.

Needs pyarrow (``pip install 'shardc[tables]'``); importing this package does
not import it, and a feature used without it raises
:class:`shardc.errors.MissingDependencyError` naming the extra.

* :mod:`~shardc.tables.auto`: ``shard_map(..., dispatch_opts={"auto_table": True})``
  (options: :mod:`~shardc.tables.options`), parts: :mod:`~shardc.tables.parts`,
  the result: :class:`~shardc.tables.handle.TableHandle`.
"""

from __future__ import annotations

from .handle import TableHandle, open_table

__all__ = ["TableHandle", "open_table"]
