"""Built-in single-pass column statistics and cross products
(shardc.col_sums/col_means/col_vars/col_stats/shard_crossprod, the native
kernel csrc/kern_stats.c, the merges in shardc.moments): every layout
against NumPy, the accuracy targets of issue 13 (uniform [0,1) data and
columns shifted by 1e6: float64 within 1e-12 norm-wise of NumPy's float64,
float32 within 1e-6 of NumPy's float64 on the same data, crossprod within
1e-13), NaN/inf propagation, tiny shapes, bit-identical results for any
worker count, and errors raised before any worker starts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from _engine_helpers import drain, no_stray_children, pool2  # noqa: F401 (fixtures)

import shardc
from shardc import _lowlevel as ll
from shardc import colstats, moments
from shardc.errors import InvalidArgumentError, InvalidTypeError


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """Norm-wise relative difference over the finite entries (NaNs must match)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert (np.isnan(a) == np.isnan(b)).all(), (a, b)
    fa, fb = np.where(np.isnan(a), 0, a), np.where(np.isnan(b), 0, b)
    assert (np.isinf(fa) == np.isinf(fb)).all() and (fa[np.isinf(fa)] == fb[np.isinf(fb)]).all()
    fa, fb = np.where(np.isinf(fa), 0, fa), np.where(np.isinf(fb), 0, fb)
    return float(np.linalg.norm(fa - fb) / max(np.linalg.norm(fb), 1e-300))


def numpy_ref(X: np.ndarray, ddof: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X64 = X.astype(np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Degrees of freedom <= 0": NaN, as expected
        return X64.sum(0), X64.mean(0), X64.var(0, ddof=ddof)


def data(shape: tuple[int, int], shift: bool = True, seed: int = 0) -> np.ndarray:
    """Uniform [0, 1), every other column shifted by 1e6 (the issue's test data)."""
    X = np.random.default_rng(seed).random(shape)
    if shift:
        X[:, ::2] += 1e6
    return X


def layouts(X: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "C": X,
        "F": np.asfortranarray(X),
        "rows-view": X[::3],
        "cols-view": X[:, 1::2],
        "both-view": np.asfortranarray(X)[1::2, ::3],
        "transposed": np.ascontiguousarray(X.T).T,
    }


@pytest.mark.parametrize("layout", ["C", "F", "rows-view", "cols-view", "both-view", "transposed"])
def test_float64_layouts_match_numpy(pool2, layout):
    """Sums, means, variances of every layout within 1e-12 of NumPy's float64 (shifted columns too)."""
    X = layouts(data((3001, 57)))[layout]
    s_ref, m_ref, v_ref = numpy_ref(X)
    assert rel(shardc.col_sums(X, pool=pool2), s_ref) <= 1e-12
    m, v = shardc.col_stats(X, pool=pool2)
    assert rel(m, m_ref) <= 1e-12 and rel(v, v_ref) <= 1e-12
    assert rel(shardc.col_vars(X, ddof=0, pool=pool2), X.var(0)) <= 1e-12


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64, np.uint8, np.int16, np.bool_])
def test_other_dtypes_accumulate_in_float64(pool2, dtype):
    """float32 within 1e-6 of NumPy float64 on the same data; integers and bools exactly as float64 data."""
    X = data((2000, 33), shift=dtype is np.float32)
    if dtype is np.bool_:
        X = X > 0.5
    elif dtype is not np.float32:
        X = (X * 200).astype(dtype)
    else:
        X = X.astype(np.float32)
    _, m_ref, v_ref = numpy_ref(X)
    m, v = shardc.col_stats(X, pool=pool2)
    assert m.dtype == np.float64 and v.dtype == np.float64
    tol = 1e-6 if dtype is np.float32 else 1e-12
    assert rel(m, m_ref) <= tol and rel(v, v_ref) <= tol


@pytest.mark.parametrize("order", ["C", "F"])
def test_nan_and_inf_propagate_like_numpy(pool2, order):
    """A NaN makes mean and variance NaN; an inf makes the mean inf and the variance NaN (as NumPy)."""
    X = data((5000, 6), shift=False)
    X[4000, 0] = np.nan
    X[10, 1] = np.inf
    X[0, 2] = -np.inf  # the block's first value: no shift taken from it
    X[7, 3], X[4999, 3] = np.inf, -np.inf  # inf - inf: mean NaN
    X = np.asarray(X, order=order)
    s_ref, m_ref, v_ref = numpy_ref(X)
    m, v = shardc.col_stats(X, pool=pool2)
    assert rel(shardc.col_sums(X, pool=pool2), s_ref) <= 1e-12
    assert rel(m, m_ref) <= 1e-12 and rel(v, v_ref) <= 1e-12
    assert np.isnan(v[:4]).all() and np.isfinite(v[4:]).all()


@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (1, 1), (2, 3), (70000, 1), (1, 70000)])
def test_tiny_and_degenerate_shapes(pool2, shape):
    """1-row, 1-column and one-element matrices in both orders (1 row: variance NaN, as NumPy)."""
    for X in (data(shape), np.asfortranarray(data(shape))):
        s_ref, m_ref, v_ref = numpy_ref(X)
        assert rel(shardc.col_sums(X, pool=pool2), s_ref) <= 1e-12
        m, v = shardc.col_stats(X, pool=pool2)
        assert rel(m, m_ref) <= 1e-12 and rel(v, v_ref) <= 1e-12


def test_empty_matrices_need_no_workers():
    """0 rows: sums 0, means and variances NaN; 0 columns: empty results (no call is made)."""
    X = np.zeros((0, 4))
    assert (shardc.col_sums(X) == 0).all() and np.isnan(shardc.col_means(X)).all()
    assert np.isnan(shardc.col_vars(X)).all()
    assert shardc.col_means(np.zeros((5, 0))).shape == (0,)


def test_big_c_matrix_uses_several_row_blocks_and_is_worker_independent(pool2, monkeypatch):
    """Row blocks (many partials, merged in a fixed tree) give bit-identical results for 1 and 2 workers."""
    monkeypatch.setattr(colstats, "BLOCK_BYTES", 64 * 1024)  # 64 KiB blocks: ~50 partials
    X = shardc.buffer(np.float64, (20011, 160))
    X.array[:] = data((20011, 160))
    m2, v2 = shardc.col_stats(X, pool=pool2)
    drain(pool2)
    with shardc.Pool(1) as p1:
        m1, v1 = shardc.col_stats(X, pool=p1)
    assert np.array_equal(m1, m2) and np.array_equal(v1, v2)
    _, m_ref, v_ref = numpy_ref(X.array)
    assert rel(m2, m_ref) <= 1e-12 and rel(v2, v_ref) <= 1e-12
    X.close()


def test_merges_are_usable_as_a_reduction_combine():
    """identity() is merge's identity; merge_tree over row splits equals the whole block's moments."""
    X = data((1000, 8))
    whole = np.empty((moments.ROWS, 8))
    ll.colstats_block(X, 0, 1000, 0, 8, whole)
    cuts = [0, 1, 250, 251, 700, 1000]
    parts = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        p = np.empty((moments.ROWS, 8))
        ll.colstats_block(X, a, b, 0, 8, p)
        parts.append(p)
    merged = moments.merge_tree(np.stack(parts))
    seq = moments.identity(8)
    for p in parts:
        seq = moments.merge(seq, p)
    for got in (merged, seq):
        assert rel(moments.means(got), X.mean(0)) <= 1e-14
        assert rel(moments.variances(got, 1), X.var(0, ddof=1)) <= 1e-13
    np.testing.assert_array_equal(moments.merge(moments.identity(8), whole), whole)
    for k in (1, 2, 5, 6, 7, 13):  # the C tree (used by col_stats) gives merge_tree's bits
        P = np.stack([parts[i % len(parts)] for i in range(k)])
        P[:, moments.SHIFT] += np.arange(k)[:, None]  # different shifts per partial
        want = moments.merge_tree(P)
        ll.moments_tree(P)
        np.testing.assert_array_equal(P[0], want)
    with pytest.raises(InvalidArgumentError, match="partials"):
        moments.merge_tree(np.zeros((3, 4)))


def test_registered_column_block_kernels_use_the_native_moments(pool2):
    """shard_map(kernel='col_means'/'col_vars') over column shards matches NumPy (views and fancy shards)."""
    X = data((500, 40))
    for desc in (shardc.shards(40, block_size=7), shardc.shards(40, block_size=7, strategy="strided")):
        for name, ref in (("col_means", X.mean(0)), ("col_vars", X.var(0, ddof=1))):
            out = shardc.buffer(np.float64, 40)
            shardc.shard_map(desc, kernel=name, borrow={"X": X}, out={"out": out}, pool=pool2)
            assert rel(out.array, ref) <= 1e-12
            out.close()
            drain(pool2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_crossprod_matches_blas(pool2, dtype):
    """X.T @ X (symmetric tiles, mirrored) and X.T @ Y by tiles within 1e-13 (float32: 1e-6)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((3000, 300)).astype(dtype)
    Y = rng.standard_normal((3000, 70)).astype(dtype)
    tol = 1e-13 if dtype is np.float64 else 1e-6
    for Z, ref in (
        (shardc.shard_crossprod(X, pool=pool2, tile=64), X.T @ X),
        (shardc.shard_crossprod(X, Y, pool=pool2, tile=64), X.T @ Y),
    ):
        assert Z.dtype == dtype
        assert np.linalg.norm(Z - ref) / np.linalg.norm(ref) <= tol
    Z = shardc.shard_crossprod(X, pool=pool2, tile=64)
    assert np.array_equal(Z, Z.T)


def test_bad_inputs_fail_before_any_worker_starts():
    """Wrong rank, dtype, ddof, row counts and tile size raise shardc errors naming the problem."""
    with pytest.raises(InvalidArgumentError, match="2-D"):
        shardc.col_means(np.zeros(5))
    with pytest.raises(InvalidTypeError, match="NumPy array"):
        shardc.col_sums([[1.0, 2.0]])
    with pytest.raises(InvalidTypeError, match="dtype complex128"):
        shardc.col_vars(np.zeros((3, 3), dtype=complex))
    with pytest.raises(InvalidTypeError, match="dtype >f8"):
        shardc.col_means(np.zeros((3, 3), dtype=">f8"))
    with pytest.raises(InvalidArgumentError, match="ddof"):
        shardc.col_vars(np.zeros((3, 3)), ddof=-1)
    with pytest.raises(InvalidArgumentError, match="same number of rows"):
        shardc.shard_crossprod(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(InvalidTypeError, match="float32/float64"):
        shardc.shard_crossprod(np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(InvalidArgumentError, match="tile"):
        shardc.shard_crossprod(np.zeros((3, 2)), tile=0)
