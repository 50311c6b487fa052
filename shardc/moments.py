"""Column moments as mergeable partials, and their merges (plain NumPy).

A partial (what ``csrc/kern_stats.c`` writes per block) is a float64 array
of shape ``(5, ncols)``, or ``(k, 5, ncols)`` for k of them:

====  =======  ===============================================================
row   name     meaning
====  =======  ===============================================================
0     count    rows in the block
1     sum      sum of the column over the block
2     shift    the column's first value in the block (0 if not finite)
3     mean     mean of the column over the block, minus ``shift``
4     m2       sum of squared deviations from the block's mean
====  =======  ===============================================================

:func:`merge` combines two partials with Chan et al.'s update (exact in
the order it is applied); :func:`merge_tree` folds any number of them in a
fixed pairwise tree over their index, so the result depends only on the
block decomposition, never on the number of workers or the order in which
blocks finished.  Both are usable as the ``combine`` of a streaming
reduction (``shard_reduce``), with :func:`identity` as its ``init``.

The mean is kept relative to a shift near the data: with columns around
1e6 a mean is only known to ulp(1e6) = 1.2e-10, and the Chan update squares
the difference of two block means (about 1e-2 here), which lost ~1e-10 of
relative accuracy in the variance without the shift (measured).  Moving a
mean from one shift to another costs one subtraction of two data values
(exact when they are within a factor of 2 of each other).

NaN and inf follow NumPy: :func:`means` is ``sum / count``; a NaN or an inf
in a column makes its ``m2`` NaN, so :func:`variances` is NaN there, as
``np.var`` is.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidArgumentError

ROWS = 5
COUNT, SUM, SHIFT, MEAN, M2 = range(ROWS)


def identity(ncols: int) -> np.ndarray:
    """The partial of no rows (the identity of :func:`merge`)."""
    return np.zeros((ROWS, ncols))


def merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The partial of the rows of ``a`` followed by those of ``b`` (arrays of
    shape ``(..., 5, ncols)``; a new array, the inputs are not changed)."""
    na, nb = a[..., COUNT, :], b[..., COUNT, :]
    n = na + nb
    out = np.empty(np.broadcast_shapes(a.shape, b.shape))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        empty_a = na == 0
        shift = np.where(empty_a, b[..., SHIFT, :], a[..., SHIFT, :])
        ma = np.where(empty_a, 0.0, a[..., MEAN, :])
        # b's mean moved to the common shift (b - shift is exact for close values).
        mb = (b[..., SHIFT, :] - shift) + b[..., MEAN, :]
        delta = mb - ma
        safe = np.where(n == 0, 1.0, n)
        fb = nb / safe
        out[..., MEAN, :] = np.where(nb == 0, ma, ma + delta * fb)
        cross = np.where((na == 0) | (nb == 0), 0.0, delta * delta * (na * fb))
        out[..., M2, :] = a[..., M2, :] + b[..., M2, :] + cross
    out[..., COUNT, :] = n
    out[..., SUM, :] = a[..., SUM, :] + b[..., SUM, :]
    out[..., SHIFT, :] = shift
    return out


def merge_tree(parts: np.ndarray) -> np.ndarray:
    """Fold ``parts`` (shape ``(k, 5, ncols)``, in block order) in a fixed
    pairwise tree: (0,1), (2,3), ... then the pairs of those, an odd last one
    carried up as is.  Returns one partial of shape ``(5, ncols)``."""
    parts = np.asarray(parts, dtype=np.float64)
    if parts.ndim != 3 or parts.shape[1] != ROWS:
        raise InvalidArgumentError(f"partials must have shape (k, {ROWS}, ncols), got {parts.shape}")
    if parts.shape[0] == 0:
        return identity(parts.shape[2])
    while parts.shape[0] > 1:
        k = parts.shape[0]
        paired = merge(parts[0 : k - 1 : 2], parts[1:k:2])
        parts = np.concatenate([paired, parts[k - 1 :]]) if k % 2 else paired
    return parts[0].copy()


def sums(p: np.ndarray) -> np.ndarray:
    """Column sums of a merged partial."""
    return p[SUM].copy()


def means(p: np.ndarray) -> np.ndarray:
    """Column means (NumPy's ``sum / count``: NaN for no rows)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return p[SUM] / p[COUNT]


def variances(p: np.ndarray, ddof: int = 1) -> np.ndarray:
    """Column variances ``m2 / max(count - ddof, 0)``, as ``np.var(ddof=)``
    (NaN or inf where there are not more rows than ``ddof``)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return p[M2] / np.maximum(p[COUNT] - ddof, 0)
