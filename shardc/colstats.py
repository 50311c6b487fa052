"""Column statistics and cross products of big matrices, in parallel, in one
pass over memory: ``col_sums``, ``col_means``, ``col_vars``, ``shard_crossprod``.

Why not ``shard_map`` over column blocks?  A column block of a C-ordered
matrix is a strided read: every row of the block touches a different cache
line run, and NumPy's ``X[:, idx].mean(0)`` makes temporaries; two workers
doing that were slower than one ``X.mean(0)``.  Here the decomposition is
picked from the memory layout:

* rows adjacent in memory (C order, or a view whose row stride is the larger
  one): **row blocks** of ~16 MiB, each worker streams whole rows and writes
  a partial (count, sum, shift, mean, M2 per column; ``shardc.moments``) into
  a shared ``(nblocks, 5, ncols)`` buffer; the master merges the partials in
  a fixed pairwise tree over block ids (Chan et al.), so the result is the
  same for any number of workers;
* columns adjacent (Fortran order): **column blocks**, each column streamed
  on its own, written straight into its slot of a ``(1, 5, ncols)`` buffer.

The kernel is the built-in native one (``csrc/kern_stats.c``, the ABI of
``csrc/kernel.h``), run by the workers in C without the GIL.  The block size
depends only on the shape, never on the worker count.  Accumulation is in
float64 for every input type (float32 and integer inputs included); NaN and
inf propagate as in NumPy.  Results are float64 arrays.

``shard_crossprod(X, Y=None)`` is ``X.T @ Y`` by 2-D tiles of the output,
one BLAS call per tile (workers run BLAS with one thread), written into a
shared output buffer.  With ``Y=None`` only the tiles on and above the
diagonal are computed (a diagonal tile is ``A.T @ A``, which NumPy hands to
``syrk``) and mirrored, half the work of the general product.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _lowlevel as ll
from . import config, moments
from .buffer import Buffer, buffer
from .errors import InvalidArgumentError, InvalidTypeError
from .kernels import register_kernel, tiles2d
from .map import shard_map
from .pool import pool_get
from .shards import shards
from .share import Shared

BLOCK_BYTES = 16 * 1024**2  # bytes of X per block (fixed: results must not depend on workers)

register_kernel(
    "col_moments_rows",
    native="shardc_kern_colstats",
    signature="X, P",
    iparams=(ll.COLSTATS_ROW_BLOCKS,),
    description="native: per row block of X, column count/sum/shift/mean/M2 into P[block]",
)
register_kernel(
    "col_moments_cols",
    native="shardc_kern_colstats",
    signature="X, P",
    iparams=(ll.COLSTATS_COL_BLOCKS,),
    description="native: per column block of X, column count/sum/shift/mean/M2 into P[0][:, cols]",
)


def _matrix(X: Any, what: str) -> np.ndarray:
    # A shardc buffer or a share()d array: its ndarray view lies in a segment,
    # which shard_map passes to the workers by reference.
    arr = X.array if isinstance(X, (Buffer, Shared)) and getattr(X, "kind", "array") == "array" else X
    if not isinstance(arr, np.ndarray):
        raise InvalidTypeError(
            f"{what}: X must be a 2-D NumPy array (or a shardc buffer or shared array), got {type(X).__name__}"
        )
    if arr.ndim != 2:
        raise InvalidArgumentError(f"{what}: X must be 2-D (rows x columns), got shape {arr.shape}")
    return arr


def rows_adjacent(X: np.ndarray) -> bool:
    """True when a row's elements are closer in memory than a column's
    (C order or a view of it): the layout that row blocks read in order."""
    if X.shape[0] <= 1:
        return True
    if X.shape[1] <= 1:
        return False
    return abs(X.strides[1]) <= abs(X.strides[0])


def col_moments(X: Any, *, workers: int | None = None, pool: Any = None, what: str = "col_moments") -> np.ndarray:
    """The merged partial of every column of ``X`` (``shardc.moments``
    layout, shape ``(5, ncols)``), computed by the workers in one pass."""
    X = _matrix(X, what)
    if f"{X.dtype.kind}{X.dtype.itemsize}" not in ll.STATS_DTYPES or not X.dtype.isnative:
        raise InvalidTypeError(
            f"{what}: X must hold native-endian numbers (float64/32, signed or unsigned integers, bool); "
            f"got dtype {X.dtype}; convert with X.astype(np.float64)"
        )
    nrows, ncols = X.shape
    if nrows == 0 or ncols == 0:
        return moments.identity(ncols)
    if rows_adjacent(X):
        per = max(1, BLOCK_BYTES // (ncols * X.itemsize))
        nparts, units, kernel = math.ceil(nrows / per), nrows, "col_moments_rows"
    else:
        per = max(1, BLOCK_BYTES // (nrows * X.itemsize))
        nparts, units, kernel = 1, ncols, "col_moments_cols"
    P = buffer(np.float64, (nparts, moments.ROWS, ncols))
    try:
        shard_map(
            shards(units, block_size=per),
            kernel=kernel,
            borrow={"X": X},
            out={"P": P},
            workers=workers,
            pool=pool,
            dispatch_mode="shm_queue",
            diagnostics=False,
        )
        parts = P.array
        if nparts > 1:
            ll.moments_tree(parts)  # moments.merge_tree's tree and bits, in C (~20x faster)
        return parts[0].copy()
    finally:
        P.close()


def col_sums(X: Any, *, workers: int | None = None, pool: Any = None) -> np.ndarray:
    """Column sums of a 2-D array (float64, accumulated in float64).

    Args:
        X: 2-D array of numbers (any layout; a shardc buffer or an array
            already in shared memory is not copied).
        workers, pool: as in ``shard_map``.

    Raises:
        InvalidArgumentError / InvalidTypeError: X is not a 2-D numeric array.
    """
    return moments.sums(col_moments(X, workers=workers, pool=pool, what="col_sums"))


def col_means(X: Any, *, workers: int | None = None, pool: Any = None) -> np.ndarray:
    """Column means (``X.mean(axis=0)`` in float64; NaN for 0 rows). See :func:`col_sums`."""
    return moments.means(col_moments(X, workers=workers, pool=pool, what="col_means"))


def col_vars(X: Any, ddof: int = 1, *, workers: int | None = None, pool: Any = None) -> np.ndarray:
    """Column variances (``X.var(axis=0, ddof=ddof)`` in float64). See :func:`col_sums`."""
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise InvalidArgumentError(f"col_vars: ddof must be an integer >= 0, got {ddof!r}")
    return moments.variances(col_moments(X, workers=workers, pool=pool, what="col_vars"), int(ddof))


def col_stats(X: Any, ddof: int = 1, *, workers: int | None = None, pool: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Column means and variances from one pass: ``(col_means(X), col_vars(X, ddof))``."""
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise InvalidArgumentError(f"col_stats: ddof must be an integer >= 0, got {ddof!r}")
    p = col_moments(X, workers=workers, pool=pool, what="col_stats")
    return moments.means(p), moments.variances(p, int(ddof))


def crossprod_sym_tile(tile: Any, X: np.ndarray, Z: np.ndarray) -> None:
    """Tile (i, j) of ``X.T @ X`` for i <= j, mirrored into (j, i); tiles below the diagonal do nothing."""
    if tile.x_start > tile.y_start:
        return
    xs = slice(tile.x_start, tile.x_stop)
    ys = slice(tile.y_start, tile.y_stop)
    if tile.x_start == tile.y_start:
        A = X[:, xs]
        np.matmul(A.T, A, out=Z[xs, ys])  # NumPy's syrk path: A.T @ A of one buffer
        return
    np.matmul(X[:, xs].T, X[:, ys], out=Z[xs, ys])
    Z[ys, xs] = Z[xs, ys].T


register_kernel(
    "crossprod_sym_tile", crossprod_sym_tile, description="X.T @ X tile on/above the diagonal, mirrored, into Z"
)


def _grid(workers: int | None, pool: Any) -> int:
    """Tiles per side of the output: 2 x 2 for up to 2 workers (X.T @ X: two
    half-cost diagonal tiles and one full one, 1 unit of work each for 2
    workers), more for more workers.  Big tiles keep each BLAS call efficient
    (measured: 256-wide tiles of a 1024-wide product used 30% more CPU than
    one syrk)."""
    w = workers or (pool.size if pool is not None else None)
    if w is None:
        cur = pool_get()
        w = cur.size if cur is not None else config.default_workers()
    return 2 if w <= 2 else math.ceil(math.sqrt(2 * w))


def shard_crossprod(
    X: Any, Y: Any = None, *, workers: int | None = None, pool: Any = None, tile: int | None = None
) -> np.ndarray:
    """``X.T @ Y`` (``X.T @ X`` when Y is None) by output tiles, one BLAS call per tile.

    Args:
        X: 2-D float array (n x p); Y: 2-D float array (n x q) or None.
        tile: the side of an output tile (columns of X and of Y); default:
            a grid of 2 x 2 tiles for up to 2 workers, finer for more.

    Returns:
        The p x q product as a new array (float64, or float32 when both are).

    Raises:
        InvalidArgumentError / InvalidTypeError: not 2-D float arrays, or the row counts differ.
    """
    X = _matrix(X, "shard_crossprod")
    Yv = None if Y is None else _matrix(Y, "shard_crossprod")
    for a in (X,) if Yv is None else (X, Yv):
        if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8):
            raise InvalidTypeError(f"shard_crossprod: X and Y must be float32/float64, got {a.dtype}")
    if Yv is not None and Yv.shape[0] != X.shape[0]:
        raise InvalidArgumentError(
            f"shard_crossprod: X and Y must have the same number of rows, got {X.shape[0]} and {Yv.shape[0]}"
        )
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1):
        raise InvalidArgumentError(f"shard_crossprod: tile must be a positive integer, got {tile!r}")
    p = X.shape[1]
    q = p if Yv is None else Yv.shape[1]
    if tile is None:
        g = _grid(workers, pool)
        tile = max(1, math.ceil(max(p, q) / g))
    dt = np.result_type(X.dtype, X.dtype if Yv is None else Yv.dtype)
    if p == 0 or q == 0 or X.shape[0] == 0:
        return np.zeros((p, q), dtype=dt)
    Z = buffer(dt, (p, q))
    # One tile at a time per worker (prefetch 1): the few tiles differ in cost
    # (for X.T @ X a diagonal tile is half an off-diagonal one and a tile below
    # the diagonal is free), so a worker holding two queued tiles from the
    # start left the other idle: 2 x 2 tiles on 2 workers ran at 0.74x of one
    # syrk instead of about 0.55x.
    try:
        desc = tiles2d(p, q, min(tile, p), min(tile, q))
        if Yv is None:
            shard_map(
                desc,
                kernel="crossprod_sym_tile",
                borrow={"X": X},
                out={"Z": Z},
                workers=workers,
                pool=pool,
                diagnostics=False,
                dispatch_opts={"prefetch": 1},
            )
        else:
            shard_map(
                desc,
                kernel="crossprod_tile",
                borrow={"X": X, "Y": Yv},
                out={"Z": Z},
                workers=workers,
                pool=pool,
                diagnostics=False,
                dispatch_opts={"prefetch": 1},
            )
        return np.array(Z.array)
    finally:
        Z.close()
