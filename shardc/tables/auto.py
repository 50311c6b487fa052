"""``dispatch_opts={"auto_table": True}``: shards' frames go to part files, not back over sockets.

::

    master (AutoTable)                                 worker (AutoTableSink, a ValueSink)
    ──────────────────                                 ───────────────────────────────────
    Call.sink = AutoTable(opts)  ── CALL: spec ──────>  spec.open(): PartWriter in the directory
                                                        fun(shard) -> frame -> put(sid, frame):
                                                          to Arrow, check the schema, one row group
                                                          in the open part (.tmp-*); returns its rows
                                                        end of the chunk(s): commit(): close, fsync
                                                          (partitioned), records
    committed(slot, records) <── RESULTS + records ──  (the outcomes: sid -> rows)
      row_groups: rename .tmp-* -> part-<seq>.<ext>
      partitioned: flush (batched): new manifest
        (temporary name, fsync), rename the parts,
        rename the manifest, fsync the directory
    finish(): remove parts of dead workers, write _manifest.json
      (complete, with the failed shards), a TableHandle,
      or a pyarrow Table (materialize)

A shard counts as done only once its part is committed: the done mark of a
shard that returned a frame says "value to gather" (2), so a worker that dies
before reporting has its shards rerun and its temporary parts are never
renamed (``finish`` removes them).  So each successful shard's rows are in
exactly one part, a failed shard's in none (a frame is converted and checked
before any of it is written), and no partial part is ever visible.

In ``partitioned`` mode the manifest describes the dataset as it stands
while the call runs: committed parts are published with a manifest that
lists them (``"complete": false``, ``done_shards`` so far), at most once per
50x the last flush's time so that it costs ~2% at most; the end writes it
with ``"complete": true`` and the failed shards.  A master killed mid-run
leaves a directory whose manifest lists exactly the ``part-*`` files in it
(see ``AutoTable._flush`` for the window of a few renames), each shard's rows
in at most one of them, and hidden ``.tmp-*`` files that nothing reads.

Parts hold many shards: one part per worker per reported batch of chunks (and
a new one past 256 MiB).  Left at ``chunk_size=1``, ``shard_map`` gives
auto_table calls chunks of ``ceil(N / (8 * workers))`` shards
(:func:`default_chunk`): about 8 parts per worker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

from .. import tmpdirs
from ..errors import InvalidArgumentError, TableSchemaError
from .convert import conform, to_table
from .handle import MANIFEST, TableHandle, materialized_table
from .options import require_pyarrow
from .parts import EXT, PartWriter

log = logging.getLogger("shardc")
FLUSH_FACTOR = 50  # persistent runs: the manifest is flushed at most once per 50x its last flush's time


def default_chunk(num_shards: int, workers: int) -> int:
    """Chunk size for an auto_table call left at ``chunk_size=1``: ~8 parts per worker."""
    return max(1, -(-num_shards // (8 * max(1, workers))))


class AutoTableSpec:
    """What a worker needs to open its sink (picklable, sent in CALL)."""

    def __init__(self, directory: str, fmt: str, schema: Any, fsync: bool) -> None:
        self.directory = directory
        self.fmt = fmt
        self.schema = schema
        self.fsync = fsync

    def open(self, slot: int, call_id: int) -> AutoTableSink:
        return AutoTableSink(self, f"w{slot}-{os.getpid()}-c{call_id}")


class AutoTableSink:
    """The worker's side (a :class:`shardc.worker.executor.ValueSink`)."""

    def __init__(self, spec: AutoTableSpec, tag: str) -> None:
        from ..worker.loop import limit_arrow

        require_pyarrow("auto_table")
        limit_arrow()  # pyarrow may be loaded only now: cap it as after fork
        self.schema = spec.schema
        self.writer = PartWriter(spec.directory, spec.fmt, tag, spec.fsync)

    def put(self, sid: int, value: Any) -> Any:
        if value is None:
            return None
        t = to_table(value, sid)  # a value that is not a frame: TableSchemaError naming its type
        if self.schema is not None:
            t = conform(t, self.schema, sid, "auto_table_schema")
        elif self.writer.schema is not None and t.num_rows:
            try:  # the earlier frames' types where they cast safely (int into float, ...)
                t = conform(t, self.writer.schema, sid, "the earlier frames")
            except TableSchemaError:  # else a new part with this frame's schema; reads unify them
                self.writer.roll(t.schema)
        return self.writer.put(sid, t)

    def commit(self) -> Any:
        return self.writer.commit()

    def abort(self) -> None:
        self.writer.abort()


class AutoTable:
    """The master's side of one auto_table call (``Call.sink``).

    Args:
        opts: the checked dispatch_opts (see :mod:`shardc.tables.options`).
        num_shards: shards in the call.
        diag: the call's Diagnostics (its ``tables`` counters are filled).
    """

    def __init__(self, opts: dict[str, Any], num_shards: int, diag: Any) -> None:
        self.mode = opts["auto_table_mode"]
        self.fmt = opts["auto_table_format"]
        self.materialize = opts["auto_table_materialize"]
        self.max_bytes = opts["auto_table_max_bytes"]
        self.schema = opts["auto_table_schema"]
        self.num_shards = num_shards
        self.diag = diag
        path = opts["auto_table_path"]
        self.owned = path is None  # a temporary directory: removed with its handle
        if path is None:
            self.directory = tmpdirs.owned_tempdir("table")
        else:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise InvalidArgumentError(
                    f"dispatch_opts['auto_table_path']={path!r}: cannot create it: {exc}"
                ) from exc
            self.directory = path
        self.persistent = self.mode == "partitioned"
        self.spec = AutoTableSpec(self.directory, self.fmt, self.schema, fsync=self.persistent)
        self.parts: list[dict[str, Any]] = []  # visible (renamed), in the manifest
        self.pending: list[tuple[str, dict[str, Any]]] = []  # committed, still under their temporary names
        self.next_flush = 0.0  # persistent: when the next commit may flush the manifest
        self.empty: list[int] = []
        self.seen: set[int] = set()
        self.counters = {"table_parts": 0, "table_rows": 0, "table_bytes_written": 0, "table_bytes_materialized": 0}
        diag.tables = self.counters

    def committed(self, slot: int, records: Any) -> None:
        """A worker committed ``records`` (see PartWriter.commit): make them visible."""
        for rec in records or ():
            sids = [s[0] for s in rec["shards"]]
            if self.seen.intersection(sids):  # a rerun of shards already committed: keep the first copy
                if rec["tmp"]:
                    self._unlink(rec["tmp"])
                continue
            self.seen.update(sids)
            if rec["tmp"] is None:
                self.empty += sids
                continue
            name = f"part-{len(self.parts) + len(self.pending):06d}.{EXT[self.fmt]}"
            part = {"file": name, "worker": slot, **{k: rec[k] for k in ("shards", "rows", "bytes")}}
            self.pending.append((rec["tmp"], {**part, "schema": rec["schema"]}))
            c = self.counters
            c["table_parts"] += 1
            c["table_rows"] += rec["rows"]
            c["table_bytes_written"] += rec["bytes"]
        if not self.persistent:
            self._publish()  # temporary parts: renamed at once, the manifest comes at the end
        elif self.pending and time.monotonic() >= self.next_flush:
            self._flush(complete=False, failed=[])

    def _publish(self) -> None:
        """Rename the pending parts to their final names."""
        for tmp, part in self.pending:
            os.rename(os.path.join(self.directory, tmp), os.path.join(self.directory, part["file"]))
            self.parts.append(part)
        self.pending = []

    def _manifest(self, complete: bool, failed: list[int]) -> dict[str, Any]:
        parts = self.parts + [p for _, p in self.pending]
        return {
            "version": 1,
            "complete": complete,
            "format": self.fmt,
            "mode": self.mode,
            "num_shards": self.num_shards,
            "done_shards": len(self.seen),
            "failed_shards": sorted(failed),
            "empty_shards": sorted(self.empty),
            "schema": self.schema.serialize().to_pybytes().hex() if self.schema is not None else None,
            "parts": [{**p, "schema": p["schema"].hex()} for p in parts],
            "rows": sum(p["rows"] for p in parts),
            "bytes": sum(p["bytes"] for p in parts),
            "arrow_bytes": sum(s[2] for p in parts for s in p["shards"]),
        }

    def _flush(self, complete: bool, failed: list[int]) -> dict[str, Any]:
        """Make the pending parts visible together with a manifest that lists them.

        The new manifest is written and (persistent) fsynced under a
        temporary name first; then the parts are renamed and the manifest
        after them, with no system call but renames in between, so a reader
        (or a master killed at any point) sees the old manifest with the old
        parts or the new one with the new parts, except in that window of a
        few renames, where the complete ``._manifest.json.tmp`` lists them.
        The directory is fsynced once, after both.  In a persistent run the
        next flush waits ``FLUSH_FACTOR`` times as long as this one took,
        so flushing costs at most ~1/FLUSH_FACTOR of the run.
        """
        t0 = time.monotonic()
        manifest = self._manifest(complete, failed)
        tmp = os.path.join(self.directory, "." + MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f)
            if self.persistent:
                f.flush()
                os.fsync(f.fileno())
        self._publish()
        os.rename(tmp, os.path.join(self.directory, MANIFEST))
        if self.persistent:
            _fsync_dir(self.directory)
        now = time.monotonic()
        self.next_flush = now + FLUSH_FACTOR * (now - t0)
        return manifest

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, name))
        except OSError:
            pass

    def _remove_leftovers(self) -> None:
        """Remove the temporary parts that were never committed (their workers died)."""
        accepted = {tmp for tmp, _ in self.pending}
        for e in os.listdir(self.directory):
            if e.startswith(".tmp-") and e not in accepted:
                self._unlink(e)

    def finish(self, failed: list[int]) -> Any:
        """The call ended: remove what dead workers left, write the manifest,
        return a :class:`TableHandle` or (materialized) a ``pyarrow.Table``."""
        self._remove_leftovers()
        pa = require_pyarrow("auto_table")
        manifest = self._flush(complete=True, failed=failed)
        handle = TableHandle(self.directory, owned=self.owned, manifest=manifest)
        mat = self.materialize
        if mat == "always" or (mat == "auto" and manifest["arrow_bytes"] <= self.max_bytes):
            table = materialized_table(handle, pa)
            self.counters["table_bytes_materialized"] = int(table.nbytes)
            if self.owned:
                handle.close()
            return table
        return handle

    def discard(self) -> None:
        """The call failed before it finished: remove a temporary directory;
        a persistent one keeps what was committed, in an incomplete manifest."""
        if self.owned:
            shutil.rmtree(self.directory, ignore_errors=True)
        elif self.persistent:
            try:
                self._remove_leftovers()
                self._flush(complete=False, failed=[])
            except OSError as exc:
                log.warning("auto_table: no manifest for %s after the failed call: %s", self.directory, exc)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
