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

``shard_crossprod(X, Y=None)`` is ``X.T @ Y``, one BLAS call per task
(workers run BLAS with one thread), in one of two decompositions:

* **row blocks** (tall matrices, the default when the partials are small):
  ``X.T @ Y = sum_b Xb.T @ Yb`` over G blocks of consecutive rows; each
  worker writes its block's full-width product (``syrk`` for ``X.T @ X``)
  into slot b of a shared ``(G, p, q)`` buffer, and the master adds the
  slots in a fixed pairwise tree (in place: slot i += slot i + s for
  s = 1, 2, 4, ...).  G depends on the shape only, never on the worker
  count, so the result is bit-identical for any number of workers and
  across retries.  Chosen when ``G * p * q * itemsize`` is at most 1/4 of
  the inputs' bytes and 256 MiB (blocks of at least 16 x max(p, q) rows);
* **tiles** of the output (wide matrices): one BLAS call per tile, written
  into a shared output buffer.  With ``Y=None`` only the tiles on and above
  the diagonal are computed (a diagonal tile is ``A.T @ A``, which NumPy
  hands to ``syrk``) and mirrored, half the work of the general product.
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


def crossprod_rows_sym(shard: Any, X: np.ndarray, P: np.ndarray) -> None:
    """Row block ``b = shard.id`` of ``X.T @ X``: ``P[b] = Xb.T @ Xb`` (NumPy's syrk path)."""
    A = X[shard.idx]
    np.matmul(A.T, A, out=P[shard.id])


def crossprod_rows(shard: Any, X: np.ndarray, Y: np.ndarray, P: np.ndarray) -> None:
    """Row block ``b = shard.id`` of ``X.T @ Y``: ``P[b] = Xb.T @ Yb`` (one gemm)."""
    rows = shard.idx
    np.matmul(X[rows].T, Y[rows], out=P[shard.id])


register_kernel(
    "crossprod_sym_tile", crossprod_sym_tile, description="X.T @ X tile on/above the diagonal, mirrored, into Z"
)
register_kernel(
    "crossprod_rows_sym",
    crossprod_rows_sym,
    description="X.T @ X of the row block shard.idx into P[shard.id] (partials summed by the caller)",
)
register_kernel(
    "crossprod_rows",
    crossprod_rows,
    description="X.T @ Y of the row block shard.idx into P[shard.id] (partials summed by the caller)",
)

ROW_PARTS = 16  # row blocks of a crossprod: this many (balance), data permitting
ROW_PART_BYTES = 64 * 1024**2  # ... or one per this many input bytes if more (room for more workers)
ROW_MIN_ROWS = 256  # rows per block at least (a BLAS call on fewer rows runs below its peak)
# ... and at least this many times the output's side: a block's fixed costs
# (NumPy mirrors syrk's triangle, p x p of strided copies; the partial's pages
# are faulted in) are O(p * q), its BLAS work O(rows * p * q).  Measured at
# p = 1024 (single thread, loaded box): 16 blocks of 8192 rows took 10% more
# CPU than one syrk, 8 blocks of 16384 rows 2% more.  On 2 workers (131072 x
# 1024, quiet, 7 interleaved rounds): 8 blocks 0.548x one syrk's wall, 4 blocks
# 0.531x, 2 blocks 0.539x; 32 keeps the fixed costs near 1% and still gives 4
# blocks to a 1 GiB input (more for taller ones).
ROW_MIN_RATIO = 32
PARTIALS_MAX = 256 * 1024**2  # the (G, p, q) partials: at most this many bytes ...
PARTIALS_SHARE = 4  # ... and at most 1/4 of the inputs' bytes; else tiles


def row_blocks(n: int, p: int, q: int, itemsize: int, in_bytes: int, force: bool = False) -> int:
    """Rows per block for the row-block crossprod of an ``n x p`` by ``n x q``
    product, or 0 when tiles are the better decomposition.

    A function of the shapes and item size only (never of the workers), so
    the partials and their summation tree, hence the bits of the result, are
    the same for any worker count.  ``force``: row blocks even when the
    partials are big next to the inputs (never 0 then).
    """
    min_rows = max(ROW_MIN_ROWS, ROW_MIN_RATIO * max(p, q))
    want = min(max(ROW_PARTS, math.ceil(in_bytes / ROW_PART_BYTES)), math.ceil(n / min_rows))
    fit = min(in_bytes // PARTIALS_SHARE, PARTIALS_MAX) // max(1, p * q * itemsize)
    g = want if force else min(want, fit)
    if g < 2 and not force:
        return 0
    return math.ceil(n / max(1, g))


def tree_sum(P: np.ndarray) -> np.ndarray:
    """``P.sum(0)`` in a fixed pairwise tree, in place: ``P[i] += P[i + s]``
    for s = 1, 2, 4, ... (i a multiple of 2s); returns ``P[0]``.  Each add
    runs over rows of ~1 MiB at a time, so both operands stay in cache."""
    g = P.shape[0]
    flat = P.reshape(g, -1)
    step = max(1, (1024**2 // P.itemsize))
    for c0 in range(0, flat.shape[1], step):
        blk = flat[:, c0 : c0 + step]
        s = 1
        while s < g:
            for i in range(0, g - s, 2 * s):
                np.add(blk[i], blk[i + s], out=blk[i])
            s *= 2
    return P[0]


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
    X: Any,
    Y: Any = None,
    *,
    workers: int | None = None,
    pool: Any = None,
    tile: int | None = None,
    method: str = "auto",
) -> np.ndarray:
    """``X.T @ Y`` (``X.T @ X`` when Y is None), one BLAS call per task.

    Args:
        X: 2-D float array (n x p); Y: 2-D float array (n x q) or None.
        tile: the side of an output tile (columns of X and of Y) for the
            tiles decomposition (implies ``method="tiles"`` under "auto");
            default: a grid of 2 x 2 tiles for up to 2 workers, finer for more.
        method: "auto" (row blocks when their partials are small next to
            the inputs, see :func:`row_blocks`; tiles otherwise), "rows" or
            "tiles".  Row blocks: bit-identical for any worker count; tiles:
            for any worker count up to 2 (the grid follows the workers).

    Returns:
        The p x q product as a new array (float64, or float32 when both are).

    Raises:
        InvalidArgumentError / InvalidTypeError: not 2-D float arrays, the
            row counts differ, or a bad ``tile``/``method``.
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
    if method not in ("auto", "rows", "tiles"):
        raise InvalidArgumentError(f"shard_crossprod: method must be 'auto', 'rows' or 'tiles', got {method!r}")
    if method == "rows" and tile is not None:
        raise InvalidArgumentError("shard_crossprod: tile= applies to method='tiles'; leave it out with method='rows'")
    n, p = X.shape
    q = p if Yv is None else Yv.shape[1]
    dt = np.result_type(X.dtype, X.dtype if Yv is None else Yv.dtype)
    if p == 0 or q == 0 or n == 0:
        return np.zeros((p, q), dtype=dt)
    rows = 0
    if method == "rows" or (method == "auto" and tile is None):
        in_bytes = X.nbytes + (0 if Yv is None else Yv.nbytes)
        rows = row_blocks(n, p, q, dt.itemsize, in_bytes, force=method == "rows")
    if rows:
        return _crossprod_rows(X, Yv, dt, rows, workers, pool)
    if tile is None:
        g = _grid(workers, pool)
        tile = max(1, math.ceil(max(p, q) / g))
    return _crossprod_tiles(X, Yv, dt, tile, workers, pool)


def _crossprod_rows(X: np.ndarray, Yv: np.ndarray | None, dt: Any, rows: int, workers: Any, pool: Any) -> np.ndarray:
    """Row blocks of ``rows`` rows, partials into a shared ``(G, p, q)`` buffer, summed by :func:`tree_sum`."""
    desc = shards(X.shape[0], block_size=rows)
    q = X.shape[1] if Yv is None else Yv.shape[1]
    P = buffer(dt, (desc.num_shards, X.shape[1], q))
    try:
        shard_map(
            desc,
            kernel="crossprod_rows_sym" if Yv is None else "crossprod_rows",
            borrow={"X": X} if Yv is None else {"X": X, "Y": Yv},
            out={"P": P},
            workers=workers,
            pool=pool,
            diagnostics=False,
            dispatch_opts={"prefetch": 1},
        )
        return np.array(tree_sum(P.array))
    finally:
        P.close()


def _crossprod_tiles(X: np.ndarray, Yv: np.ndarray | None, dt: Any, tile: int, workers: Any, pool: Any) -> np.ndarray:
    """2-D tiles of the output, one BLAS call per tile, straight into a shared ``(p, q)`` buffer."""
    p = X.shape[1]
    q = p if Yv is None else Yv.shape[1]
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
