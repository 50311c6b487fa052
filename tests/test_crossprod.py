"""shard_crossprod's two decompositions (issue 13): row blocks (full-width
syrk/gemm per block of consecutive rows, partials summed in a fixed
pairwise tree) for tall matrices, output tiles for wide ones.  Results
against NumPy's BLAS (normal data: within 1e-13 relative, Frobenius norm;
float32 within 1e-5 of the float64 product), bit-identical for 1 and 2
workers and across a retried block, Y given, float32, odd and empty shapes,
and the choice between the decompositions (a function of the shape only)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from _engine_helpers import drain, no_stray_children, pool2  # noqa: F401 (fixtures)

import shardc
from shardc import colstats, kernels
from shardc.errors import InvalidArgumentError


def rel(z: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(z, dtype=np.float64) - ref) / max(np.linalg.norm(ref), 1e-300))


def normal(shape: tuple[int, int], seed: int = 0, dtype: type = np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_row_blocks_are_chosen_by_shape_only():
    """Tall inputs get row blocks (>= 2, G x p x q bytes <= 1/4 of the inputs, <= 256 MiB); wide ones tiles (0)."""
    n, p = 131072, 1024
    rows = colstats.row_blocks(n, p, p, 8, n * p * 8)
    g = -(-n // rows)
    assert g >= 2 and g * p * p * 8 <= min(n * p * 8 // 4, 256 * 1024**2)
    assert colstats.row_blocks(1024, 1024, 1024, 8, 1024 * 1024 * 8) == 0  # square: partials as big as X
    assert colstats.row_blocks(300, 40, 40, 8, 300 * 40 * 8) == 0  # too few rows for two blocks of 256
    assert colstats.row_blocks(300, 40, 40, 8, 300 * 40 * 8, force=True) == 300  # forced: one block
    assert colstats.row_blocks(n, p, p, 8, n * p * 8) == colstats.ROW_MIN_RATIO * p == 32 * p  # fixed costs ~1%
    # Huge p x q: the 256 MiB cap on the partials applies even when X is huge.
    assert colstats.row_blocks(10**7, 8192, 8192, 8, 10**7 * 8192 * 8) == 0


def test_tree_sum_is_a_fixed_pairwise_tree():
    """tree_sum adds slot i + s into slot i for s = 1, 2, 4, ...: equal bit for bit to that tree done by hand."""
    rng = np.random.default_rng(1)
    for g in (1, 2, 5, 8, 13):
        P = rng.standard_normal((g, 7, 300)) * 10.0 ** rng.integers(-8, 8, size=(g, 1, 1))
        parts = [P[i].copy() for i in range(g)]
        s = 1
        while s < g:
            for i in range(0, g - s, 2 * s):
                parts[i] = parts[i] + parts[i + s]
            s *= 2
        assert np.array_equal(colstats.tree_sum(P.copy()), parts[0])


@pytest.mark.parametrize("method", ["rows", "tiles", "auto"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_both_decompositions_match_blas(pool2, method, dtype):
    """X.T @ X and X.T @ Y by row blocks and by tiles: within 1e-13 (float32: 1e-5 of the float64 product)."""
    X = normal((6001, 150), 2, dtype)
    Y = normal((6001, 33), 3, dtype)
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    tol = 1e-13 if dtype is np.float64 else 1e-5
    for Yarg, ref in ((None, X64.T @ X64), (Y, X64.T @ Y64)):
        Z = shardc.shard_crossprod(X, Yarg, pool=pool2, method=method)
        assert Z.dtype == dtype and Z.shape == ref.shape
        assert rel(Z, ref) <= tol, (method, rel(Z, ref))
    Z = shardc.shard_crossprod(X, pool=pool2, method=method)
    assert np.array_equal(Z, Z.T)


def test_auto_picks_rows_for_tall_and_tiles_for_wide(pool2, monkeypatch):
    """method='auto' runs the row-block kernel on a tall matrix and the tile kernel on a wide one."""
    seen: list[str] = []
    real = shardc.shard_map

    def spy(*a, **kw):
        seen.append(kw["kernel"])
        return real(*a, **kw)

    monkeypatch.setattr(colstats, "shard_map", spy)
    tall = normal((20000, 64))
    wide = normal((200, 300))
    assert rel(shardc.shard_crossprod(tall, pool=pool2), tall.T @ tall) <= 1e-13
    assert rel(shardc.shard_crossprod(wide, pool=pool2), wide.T @ wide) <= 1e-13
    assert rel(shardc.shard_crossprod(tall, tall[:, :5], pool=pool2), tall.T @ tall[:, :5]) <= 1e-13
    assert seen == ["crossprod_rows_sym", "crossprod_sym_tile", "crossprod_rows"]


def test_rows_are_bit_identical_for_one_and_two_workers(pool2):
    """Row blocks: the same partials and the same tree for any worker count, so the same bits."""
    X = shardc.buffer(np.float64, (40009, 96))
    X.array[:] = normal((40009, 96), 4)
    Y = normal((40009, 17), 5)
    z2, y2 = shardc.shard_crossprod(X, pool=pool2), shardc.shard_crossprod(X, Y, pool=pool2)
    drain(pool2)
    with shardc.Pool(1) as p1:
        z1, y1 = shardc.shard_crossprod(X, pool=p1), shardc.shard_crossprod(X, Y, pool=p1)
    assert np.array_equal(z1, z2) and np.array_equal(y1, y2)
    assert rel(z2, X.array.T @ X.array) <= 1e-13 and rel(y2, X.array.T @ Y) <= 1e-13
    X.close()


def test_a_block_killed_mid_run_is_rerun_and_the_bits_do_not_change(pool2, tmp_path, monkeypatch):
    """SIGKILL in the worker computing row block 2 (first attempt): the block reruns, the result is bit-identical."""
    X = normal((12000, 40), 6)
    clean = shardc.shard_crossprod(X, pool=pool2, method="rows")
    marker = str(tmp_path / "killed")

    def killer(shard, X, P):
        if shard.id == 2 and not os.path.exists(marker):
            Path(marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        colstats.crossprod_rows_sym(shard, X, P)

    monkeypatch.setitem(kernels._registry, "crossprod_rows_sym", kernels.Kernel("crossprod_rows_sym", killer))
    again = shardc.shard_crossprod(X, pool=pool2, method="rows")
    assert os.path.exists(marker)
    assert np.array_equal(clean, again)


@pytest.mark.parametrize("method", ["rows", "tiles"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (2, 3), (257, 5), (513, 2), (1000, 1)])
def test_odd_shapes(pool2, method, shape):
    """One row, one column, a last block shorter than the others: equal to X.T @ X and X.T @ Y."""
    X = normal(shape, 7)
    Y = normal((shape[0], 3), 8)
    assert rel(shardc.shard_crossprod(X, pool=pool2, method=method), X.T @ X) <= 1e-13
    assert rel(shardc.shard_crossprod(X, Y, pool=pool2, method=method), X.T @ Y) <= 1e-13


def test_views_and_mixed_dtypes(pool2):
    """Fortran order, strided views and float32 X with float64 Y (result float64) by row blocks."""
    base = normal((9000, 60), 9)
    for X in (np.asfortranarray(base), base[::2], base[:, 1::3]):
        assert rel(shardc.shard_crossprod(X, pool=pool2, method="rows"), X.T @ X) <= 1e-13
    X32 = base.astype(np.float32)
    Z = shardc.shard_crossprod(X32, base[:, :4], pool=pool2, method="rows")
    assert Z.dtype == np.float64
    assert rel(Z, X32.astype(np.float64).T @ base[:, :4]) <= 1e-13


def test_empty_inputs_need_no_workers():
    """0 rows give a zero p x q product, 0 columns an empty one, without starting workers."""
    assert np.array_equal(shardc.shard_crossprod(np.zeros((0, 3))), np.zeros((3, 3)))
    assert shardc.shard_crossprod(np.zeros((5, 0)), np.zeros((5, 2)), method="rows").shape == (0, 2)
    assert shardc.shard_crossprod(np.zeros((0, 2), dtype=np.float32)).dtype == np.float32


def test_bad_method_fails_before_any_worker_starts():
    """An unknown method, or tile= with method='rows', raises naming the argument."""
    with pytest.raises(InvalidArgumentError, match="method must be"):
        shardc.shard_crossprod(np.zeros((3, 2)), method="blocks")
    with pytest.raises(InvalidArgumentError, match="tile= applies to method='tiles'"):
        shardc.shard_crossprod(np.zeros((3, 2)), method="rows", tile=2)
