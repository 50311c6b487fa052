"""File-backed borrowed inputs: an ``np.memmap`` is mapped by the workers from its file, not
copied into a segment (``copy_report`` shows 0 bytes copied), views and offsets included, and
the cow guards still apply to it."""

from __future__ import annotations

import operator
import os

import numpy as np
import pytest
from _engine_helpers import assert_no_stray_children

import shardc
from shardc.share import file_reference

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pool():
    p = shardc.Pool(2)
    yield p
    p.stop()
    assert_no_stray_children()


@pytest.fixture
def matrix(tmp_path):
    X = np.random.default_rng(1).random((2000, 16))
    path = tmp_path / "x.f64"
    X.tofile(path)
    return X, path


def test_memmap_is_mapped_from_its_file_not_copied(pool, matrix):
    """A read-only memmap reaches the workers by file reference: 0 bytes copied, the right sums."""
    X, path = matrix
    mm = np.memmap(path, dtype=np.float64, mode="r", shape=X.shape)
    r = shardc.shard_reduce(
        shardc.shards(2000, block_size=100), map=lambda s, X: X[s.idx].sum(0), combine=operator.add,
        init=np.zeros(16), borrow={"X": mm}, pool=pool, progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(r.value, X.sum(0), rtol=1e-13)
    b = r.diagnostics.borrow["X"]
    assert b["how"] == "file" and b["bytes_copied"] == 0 and b["bytes"] == X.nbytes
    rep = shardc.copy_report(r)
    assert rep.data["borrow_bytes_copied"] == 0 and "file (0 copied" in str(rep)


def test_memmap_offset_and_strided_view(pool, matrix):
    """A memmap at a file offset, then sliced with steps and negative strides: workers see the same elements."""
    X, path = matrix
    mm = np.memmap(path, dtype=np.float64, mode="r", offset=16 * 8 * 7, shape=(1993, 16))
    view = mm[3::5, 14:1:-3]
    ref = file_reference(view)
    assert ref is not None and ref.how == "file"
    ref.close()
    r = shardc.shard_map(
        shardc.shards(view.shape[0], block_size=50), lambda s, V: V[s.idx].copy(), borrow={"V": view}, pool=pool,
        progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(np.concatenate(r.results), X[7:][3::5, 14:1:-3])
    assert r.diagnostics.borrow["V"]["how"] == "file"


def test_write_into_file_input_is_denied_and_file_unchanged(pool, matrix):
    """cow='deny' guards a file-backed input too: the write fails naming it, the file keeps its bytes."""
    X, path = matrix
    mm = np.memmap(path, dtype=np.float64, mode="r", shape=X.shape)

    def scribble(s, X):
        X[s.id, 0] = -1.0
        return 0

    with pytest.raises(shardc.ReduceError) as info:
        shardc.shard_reduce(4, scribble, operator.add, 0, borrow={"X": mm}, pool=pool, progress=False)
    f = next(iter(info.value.result.failures.values()))
    assert f.error_type == "shardc.errors.BorrowedInputWriteError" and "'X'" in f.message
    np.testing.assert_array_equal(np.fromfile(path, dtype=np.float64).reshape(X.shape), X)


def test_copy_on_write_memmap_with_private_changes_is_copied(pool, matrix):
    """A mode 'c' memmap may differ from its file: it is copied, and workers see the caller's values."""
    X, path = matrix
    mm = np.memmap(path, dtype=np.float64, mode="c", shape=X.shape)
    mm[0, 0] = 1234.5
    assert file_reference(mm) is None
    r = shardc.shard_map(1, lambda s, X: float(X[0, 0]), borrow={"X": mm}, pool=pool, progress=False)
    assert r.results == [1234.5] and r.diagnostics.borrow["X"]["how"] in ("copied", "cached")


def test_file_bigger_than_mem_cap_streams_without_kills(pool, tmp_path):
    """A 96 MiB file reduced by workers capped at 32 MB: its pages are the file's, not the
    workers' own memory, so nobody is killed or recycled and nothing is copied."""
    path = tmp_path / "big.f64"
    rows, cols = 12288, 1024
    mm = np.memmap(path, dtype=np.float64, mode="w+", shape=(rows, cols))
    mm[:] = np.arange(rows, dtype=np.float64)[:, None]
    mm.flush()
    ro = np.memmap(path, dtype=np.float64, mode="r", shape=(rows, cols))
    r = shardc.shard_reduce(
        shardc.shards(rows, block_size=512), map=lambda s, X: X[s.idx].sum(0), combine=operator.add,
        init=np.zeros(cols), borrow={"X": ro}, mem_cap="32MB", pool=pool, progress=False,
    )  # fmt: skip
    assert (r.value == rows * (rows - 1) / 2).all()
    assert r.diagnostics.borrow["X"]["bytes_copied"] == 0
    assert not [e for e in r.diagnostics.events if e["event"] in ("death", "recycle")], r.diagnostics.events


def test_memmap_whose_path_was_replaced_gives_the_callers_values(pool, matrix):
    """The file at the memmap's path was replaced (os.replace) after it was mapped: workers must see
    what the caller's array shows (the old file), not the new file now at that path."""
    X, path = matrix
    mm = np.memmap(path, dtype=np.float64, mode="r", shape=X.shape)
    np.full(X.shape, 7.0).tofile(str(path) + ".new")
    os.replace(str(path) + ".new", path)
    r = shardc.shard_reduce(
        shardc.shards(2000, block_size=100), map=lambda s, X: X[s.idx].sum(0), combine=operator.add,
        init=np.zeros(16), borrow={"X": mm}, pool=pool, progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(r.value, X.sum(0), rtol=1e-13)
    assert r.diagnostics.borrow["X"]["how"] != "file"


def test_memmap_whose_file_was_truncated_is_refused_by_name(pool, matrix):
    """The memmap's file was truncated below the array's end: a clear error naming the input before
    any worker starts, not a SIGBUS of the master copying it or of every worker reading it."""
    X, path = matrix
    for mode in ("r", "c"):
        mm = np.memmap(path, dtype=np.float64, mode=mode, shape=X.shape)
        os.truncate(path, 8 * 100)
        pids = [w.pid for w in pool.workers]
        with pytest.raises(shardc.InvalidArgumentError, match=r"borrow\['X'\].*truncated to 800 bytes"):
            shardc.shard_reduce(4, lambda s, X: 0, operator.add, 0, borrow={"X": mm}, pool=pool, progress=False)
        assert [w.pid for w in pool.workers] == pids
        del mm
        X.tofile(path)
