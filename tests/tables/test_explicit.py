"""Explicit table outputs: schema, table_buffer + row_layout filled by shards, table_sink, table_finalize."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import shardc
from shardc.errors import InvalidArgumentError, InvalidTypeError, MissingDependencyError, TableSchemaError
from shardc.tables import (
    TableHandle,
    factor,
    iterate_row_groups,
    row_layout,
    schema,
    table_buffer,
    table_finalize,
    table_sink,
    table_write,
)

pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")

pytestmark = pytest.mark.timeout(60)


def _schema():
    return schema(x=pa.float64(), n=pa.int32(), flag=pa.bool_(), g=factor(["lo", "mid", "hi"]))


def _rows(k: int, m: int) -> pd.DataFrame:
    """Shard k's m rows (deterministic), the same serially and in a worker."""
    r = np.random.default_rng(k)
    return pd.DataFrame(
        {
            "x": r.random(m),
            "n": np.arange(m, dtype=np.int32) + k,
            "flag": (np.arange(m) % 2).astype(bool),
            "g": pd.Categorical(np.array(["lo", "mid", "hi"])[np.arange(m) % 3]),
        }
    )


def test_table_buffer_filled_by_many_shards_equals_a_serial_fill(pool2):
    """Shards write disjoint row_layout ranges in parallel; the table equals a serial fill."""
    sch = _schema()
    nshards = 40
    layout = row_layout(nshards, lambda k: (k * 7) % 11)  # ragged, some zero-row shards
    assert layout[0] is None and layout[1] == slice(0, 7)
    tb = table_buffer(sch, layout.nrow)
    serial = table_buffer(sch, layout.nrow)

    def fill(shard):
        where = layout[shard.id]
        table_write(tb, where, _rows(shard.id, 0 if where is None else where.stop - where.start))

    r = shardc.shard_map(nshards, fill, pool=pool2, progress=False)
    assert r.succeeded
    for k in range(nshards):
        w = layout[k]
        table_write(serial, w, _rows(k, 0 if w is None else w.stop - w.start))
    got, want = table_finalize(tb, materialize="always"), table_finalize(serial, materialize="always")
    assert got.equals(want) and got.num_rows == layout.nrow
    assert got.column("g").to_pylist()[:3] == ["lo", "mid", "hi"]
    tb.close()
    serial.close()


def test_table_buffer_rejects_strings_and_bad_writes():
    """Strings point to table_sink; missing columns, bad casts, unknown levels and wrong lengths are named."""
    with pytest.raises(InvalidTypeError, match="table_sink"):
        table_buffer(schema(s=pa.string()), 10)
    tb = table_buffer(_schema(), 4)
    good = _rows(0, 2)
    with pytest.raises(TableSchemaError, match=r"missing \['flag'\]"):
        table_write(tb, slice(0, 2), good.drop(columns="flag"))
    with pytest.raises(InvalidArgumentError, match="2 rows of data for 3"):
        table_write(tb, slice(0, 3), good)
    bad = good.assign(g=["lo", "weird"])
    with pytest.raises(TableSchemaError, match="weird"):
        table_write(tb, [0, 1], bad)
    with pytest.raises(TableSchemaError, match="'n'"):
        table_write(tb, slice(0, 2), good.assign(n=[1.5, 2.0]))
    assert table_write(tb, np.array([3, 2]), good.assign(g=[2, 0])) == 2
    assert table_finalize(tb).column("g").to_pylist()[2:] == ["lo", "hi"]
    tb.close()
    with pytest.raises(InvalidTypeError, match="pyarrow type"):
        schema(x="float64")


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
def test_table_sink_one_part_per_shard_retries_replace(pool2, tmp_path, fmt):
    """Shards write variable-size parts with strings; a retried shard's part replaces its first attempt."""
    sink = table_sink(schema(s=pa.string(), v=pa.int64()), "partitioned", tmp_path / "ds", fmt)
    marker = tmp_path / "once"

    def f(shard):
        m = shard.id % 4
        table_write(sink, shard.id, pd.DataFrame({"s": [f"r{shard.id}-{i}" for i in range(m)], "v": [shard.id] * m}))
        if shard.id == 5 and not marker.exists():
            marker.touch()
            raise RuntimeError("fail after writing")

    r = shardc.shard_map(12, f, pool=pool2, progress=False, max_retries=1)
    assert r.succeeded and r.diagnostics.retries >= 1
    h = table_finalize(sink)
    assert isinstance(h, TableHandle)
    df = h.to_pandas()
    assert list(df.v) == [k for k in range(12) for _ in range(k % 4)]
    assert sorted(h.manifest["empty_shards"]) == [0, 4, 8]
    groups = list(iterate_row_groups(h))
    assert len(groups) == 9 and sum(g.num_rows for g in groups) == len(df)


def test_table_sink_failed_shards_are_removed_and_temporary_sink_goes_with_its_handle(pool2):
    """table_finalize(failed=...) drops failed shards' parts; a temporary sink is removed when materialized."""
    sink = table_sink()

    def f(shard):
        table_write(sink, shard.id, pd.DataFrame({"a": [shard.id]}))
        if shard.id == 2:
            raise ValueError("no")

    r = shardc.shard_map(4, f, pool=pool2, progress=False, on_failure="collect", max_retries=0)
    t = table_finalize(sink, materialize="always", failed=r.failures)
    assert t.column("a").to_pylist() == [0, 1, 3]
    assert not os.path.exists(sink.path)
    with pytest.raises(InvalidArgumentError, match="path="):
        table_sink(mode="partitioned")


def test_without_pyarrow_import_works_and_features_name_the_extra():
    """import shardc (and shardc.tables) needs no pyarrow; using a table feature names the extra."""
    code = (
        "import sys; sys.modules['pyarrow'] = None\n"
        "import shardc, shardc.tables\n"
        "from shardc.errors import MissingDependencyError\n"
        "for f in (lambda: shardc.tables.schema(x=1), lambda: shardc.shard_map(2, len, dispatch_opts={'auto_table': True})):\n"
        "    try:\n        f()\n    except MissingDependencyError as e:\n        print('MDE', e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("MDE")]
    assert len(lines) == 2 and all("shardc[tables]" in ln for ln in lines), p.stdout + p.stderr
    assert issubclass(MissingDependencyError, ImportError)
