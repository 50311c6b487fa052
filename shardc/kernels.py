"""Kernel registry: named, reusable shard functions with a memory footprint.

``register_kernel(name, impl, footprint=...)`` makes ``shard_map(kernel=name)``
run ``impl`` exactly like ``fun``.  The footprint (bytes, or a function of the
shard returning bytes or ``{"class": ..., "bytes": ...}``) classifies each
shard as tiny (< 8 MB), medium (< 64 MB) or huge; ``scheduler_policy=
{"max_huge_concurrency": k}`` then keeps at most k huge chunks running at once.

Built-in kernels (registered at import):

* ``col_means(shard, X, out)``: ``out[shard.idx] = X[:, shard.idx].mean(0)``
* ``col_vars(shard, X, out)``: sample variance (``ddof=1``), one pass per
  column block in C (``csrc/kern_stats.c``); NaN for columns with < 2 rows,
  and NaN/inf propagate as in ``np.var``.  (Over a C-ordered matrix a column
  block is a strided read: ``shardc.col_means``/``col_vars`` pick row blocks
  instead and are several times faster.)
* ``crossprod_tile(tile, X, Y, Z)``: ``Z[tile] = X[:, xs].T @ Y[:, ys]`` for a
  2-D tile from :func:`tiles2d`, straight into the out buffer.

Shards a kernel needs.  ``descriptor=`` names the descriptor kind (its
``strategy``: "contiguous", "strided", "list", "tiles") a kernel's shards must
come from; ``shard_map``/``shard_reduce`` check it before any worker starts
(``crossprod_tile`` needs "tiles", from :func:`tiles2d`).

Reserved fields.  ``signature`` and ``supports_views`` are accepted for parity
with the R package ``shard``'s ``register_kernel`` and stored, but nothing in
shardc reads them yet: every kernel is called like ``fun`` (its parameters are
bound to ``borrow=``/``out=`` by name) and always receives views of shared
memory, never copies.  They are validated when registered (a string or None,
a bool) so that giving them a meaning later cannot break a registration that
works today.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _lowlevel as ll
from . import moments
from .errors import InvalidArgumentError
from .native import NativeKernel, native_ref
from .shards import Shard, ShardDescriptor

TINY = 8 * 1024**2
HUGE = 64 * 1024**2


@dataclass
class Kernel:
    """A registered kernel.

    Attributes:
        name: the registry key (``shard_map(kernel=name)``).
        impl: the function, called like ``fun``.
        signature: reserved (see the module docstring); a description of the
            arguments, e.g. ``"shard, X, out"``, or None.
        footprint: bytes, a dict, or a function of the shard (see :meth:`classify`).
        supports_views: reserved (see the module docstring); whether ``impl``
            accepts non-contiguous views.  Always True in practice today.
        description: one line for :func:`list_kernels` users.
        descriptor: None (any shards), or the descriptor kind(s) (``strategy``)
            its shards must come from, e.g. "tiles".
    """

    name: str
    impl: Callable[..., Any]
    signature: str | None = None
    footprint: Any = None
    supports_views: bool = True
    description: str | None = None
    descriptor: str | tuple[str, ...] | None = None

    def check_shards(self, desc: Any) -> None:
        """Raise before any worker starts if ``desc`` is not the kind of shards this kernel needs."""
        want = self.descriptor
        if want is None:
            return
        kinds = (want,) if isinstance(want, str) else want
        got = getattr(desc, "strategy", None)
        if got not in kinds:
            hint = " from tiles2d(n_x, n_y, block_x, block_y)" if "tiles" in kinds else ""
            raise InvalidArgumentError(
                f"kernel {self.name!r} needs shards of kind {' or '.join(map(repr, kinds))}{hint}, "
                f"got {got!r} shards ({desc!r})"
            )

    def classify(self, shard: Any) -> tuple[str, int | None]:
        """``(class, bytes)`` of one shard's footprint."""
        fp = self.footprint
        if fp is None:
            return "tiny", None
        if callable(fp):
            fp = fp(shard)
        if isinstance(fp, dict):
            cls = fp.get("class")
            nbytes = fp.get("bytes")
            if cls is None:
                if nbytes is None:
                    raise InvalidArgumentError(
                        f"kernel {self.name!r}: footprint of shard {getattr(shard, 'id', '?')} "
                        f"has neither 'class' nor 'bytes': {fp!r}"
                    )
                cls = classify_bytes(int(nbytes))
            if cls not in ("tiny", "medium", "huge"):
                raise InvalidArgumentError(f"kernel {self.name!r}: footprint class {cls!r} is not tiny/medium/huge")
            return cls, nbytes
        return classify_bytes(int(fp)), int(fp)


def classify_bytes(n: int) -> str:
    return "tiny" if n < TINY else ("medium" if n < HUGE else "huge")


_registry: dict[str, Kernel] = {}
DESCRIPTOR_KINDS = ("contiguous", "strided", "list", "tiles")


def register_kernel(
    name: str,
    impl: Callable[..., Any] | None = None,
    signature: str | None = None,
    footprint: Any = None,
    supports_views: bool = True,
    description: str | None = None,
    descriptor: str | tuple[str, ...] | None = None,
    *,
    native: Any = None,
    iparams: tuple[int, ...] = (),
) -> Kernel:
    """Register ``impl`` under ``name`` (replacing an earlier one) and return it.

    Args:
        name: the registry key.
        impl: the function, called like ``fun`` (or None with ``native=``).
        signature: reserved for Python kernels: a string describing the
            arguments, or None.  For a native kernel, the names of the arrays
            in the order the C function gets them (``"X, out"``); default:
            borrow= then out=, in the caller's order.
        native: a compiled kernel with the ABI of ``csrc/kernel.h`` (see
            :mod:`shardc.native` for the accepted forms); the workers run it
            in C without the GIL, one call per shard.
        iparams: up to 8 integers the native kernel gets in ``a->iparams``.
        footprint: bytes per shard, ``{"class": ..., "bytes": ...}``, or a
            function of the shard returning either.
        supports_views: reserved: must be a bool.
        description: one line describing the kernel.
        descriptor: None, or the descriptor kind(s) its shards must come from
            ("contiguous", "strided", "list", "tiles"); checked by
            ``shard_map``/``shard_reduce`` before any worker starts.

    Raises:
        InvalidArgumentError: empty name, non-callable impl, bad footprint, or a
            reserved field of the wrong type.
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"kernel name must be a non-empty string, got {name!r}")
    if native is not None:
        if impl is not None:
            raise InvalidArgumentError(f"kernel {name!r}: give impl= or native=, not both")
        if signature is not None and not isinstance(signature, str):
            raise InvalidArgumentError(
                f"kernel {name!r}: signature must be a string such as 'X, out', got {signature!r}"
            )
        order = tuple(n.strip() for n in signature.split(",")) if signature else None
        if order is not None and not all(n.isidentifier() for n in order):
            raise InvalidArgumentError(f"kernel {name!r}: signature {signature!r} must be names separated by commas")
        impl = NativeKernel(name, native_ref(name, native), order, tuple(iparams))
    if not callable(impl):
        raise InvalidArgumentError(f"kernel {name!r}: impl must be callable, got {type(impl).__name__}")
    if signature is not None and not isinstance(signature, str):
        raise InvalidArgumentError(f"kernel {name!r}: signature (reserved) must be a string or None, got {signature!r}")
    if not isinstance(supports_views, bool):
        raise InvalidArgumentError(
            f"kernel {name!r}: supports_views (reserved) must be True or False, got {supports_views!r}"
        )
    if isinstance(footprint, dict):
        _check_footprint_dict(name, footprint)
    elif footprint is not None and not callable(footprint) and not _is_byte_count(footprint):
        raise InvalidArgumentError(
            f"kernel {name!r}: footprint must be bytes (>= 0), a dict or a function of the shard, got {footprint!r}"
        )
    kinds = (descriptor,) if isinstance(descriptor, str) else descriptor
    if kinds is not None and (
        not isinstance(kinds, tuple) or not kinds or not all(k in DESCRIPTOR_KINDS for k in kinds)
    ):
        raise InvalidArgumentError(
            f"kernel {name!r}: descriptor must be None or one or more of {DESCRIPTOR_KINDS}, got {descriptor!r}"
        )
    k = Kernel(name, impl, signature, footprint, supports_views, description, descriptor)
    _registry[name] = k
    return k


def _is_byte_count(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v) and float(v) >= 0


def _check_footprint_dict(name: str, fp: dict[str, Any]) -> None:
    """A dict footprint is checked when registered, not mid-run when a shard is classified."""
    unknown = set(fp) - {"class", "bytes"}
    cls, nbytes = fp.get("class"), fp.get("bytes")
    if unknown or (cls is None and nbytes is None):
        raise InvalidArgumentError(
            f"kernel {name!r}: a footprint dict has 'class' (tiny/medium/huge) and/or 'bytes', got {fp!r}"
        )
    if cls is not None and cls not in ("tiny", "medium", "huge"):
        raise InvalidArgumentError(f"kernel {name!r}: footprint class {cls!r} is not tiny/medium/huge")
    if nbytes is not None and not _is_byte_count(nbytes):
        raise InvalidArgumentError(f"kernel {name!r}: footprint bytes must be a number >= 0, got {nbytes!r}")


def list_kernels() -> list[str]:
    """Names of the registered kernels."""
    return sorted(_registry)


def get_kernel(name: str) -> Kernel:
    if not isinstance(name, str):
        raise InvalidArgumentError(f"kernel must be the name of a registered kernel (a str), got {name!r}")
    try:
        return _registry[name]
    except KeyError:
        raise InvalidArgumentError(
            f"kernel {name!r} is not registered; known kernels: {', '.join(list_kernels())}"
        ) from None


# -- built-in kernels -------------------------------------------------------------


def _block_moments(shard: Shard, X: np.ndarray) -> np.ndarray:
    """Moments (``shardc.moments`` layout) of the columns ``shard.idx`` of
    ``X``, one pass in C without the GIL (``csrc/kern_stats.c``)."""
    idx = shard.idx
    if isinstance(idx, slice) and (idx.step or 1) == 1:
        c0, c1 = idx.start or 0, idx.stop
    else:
        X, c0, c1 = X[:, idx], 0, len(shard)
    part = np.empty((moments.ROWS, c1 - c0))
    ll.colstats_block(X, 0, X.shape[0], c0, c1, part)
    return part


def col_means(shard: Shard, X: np.ndarray, out: np.ndarray) -> None:
    """Column means of ``X[:, shard.idx]`` into ``out[shard.idx]`` (NaN for 0 rows)."""
    out[shard.idx] = moments.means(_block_moments(shard, X))


def col_vars(shard: Shard, X: np.ndarray, out: np.ndarray) -> None:
    """Sample variances (ddof=1) of ``X[:, shard.idx]`` into ``out[shard.idx]``.

    One pass per column block (shifted sums per chunk, Chan merges:
    ``csrc/kern_stats.c``), accumulated in float64 for any input type;
    columns with fewer than 2 rows give NaN, and non-finite values propagate
    (inf -> NaN, as in ``np.var``).
    """
    if X.shape[0] < 2:
        out[shard.idx] = np.nan
        return
    out[shard.idx] = moments.variances(_block_moments(shard, X), 1)


class Tile:
    """A 2-D tile: rows ``x_start:x_stop`` of Z (columns of X), columns ``y_start:y_stop``."""

    __slots__ = ("id", "x_start", "x_stop", "y_start", "y_stop", "len", "_seedseq", "_rng")

    def __init__(self, id: int, xs: int, xe: int, ys: int, ye: int) -> None:
        self.id, self.x_start, self.x_stop, self.y_start, self.y_stop = id, xs, xe, ys, ye
        self.len = (xe - xs) * (ye - ys)
        self._seedseq = None
        self._rng = None

    @property
    def x_len(self) -> int:
        return self.x_stop - self.x_start

    @property
    def y_len(self) -> int:
        return self.y_stop - self.y_start

    def __repr__(self) -> str:
        return f"Tile(id={self.id}, x={self.x_start}:{self.x_stop}, y={self.y_start}:{self.y_stop})"


class TileDescriptor(ShardDescriptor):
    """Tiles of an ``n_x`` x ``n_y`` output, ``block_x`` x ``block_y`` each."""

    def __init__(self, n_x: int, n_y: int, block_x: int, block_y: int) -> None:
        self.n_x, self.n_y, self.block_x, self.block_y = n_x, n_y, block_x, block_y
        self.tx = math.ceil(n_x / block_x)
        self.ty = math.ceil(n_y / block_y)
        super().__init__(n_x * n_y, None, "tiles", self.tx * self.ty)

    def shard(self, k: int, seedseq: Any = None) -> Any:
        i, j = divmod(k, self.ty)
        xs, ys = i * self.block_x, j * self.block_y
        t = Tile(k, xs, min(xs + self.block_x, self.n_x), ys, min(ys + self.block_y, self.n_y))
        t._seedseq = seedseq
        return t

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "strategy": "tiles",
            "num_shards": self.num_shards,
            "n_x": self.n_x,
            "n_y": self.n_y,
            "block_x": self.block_x,
            "block_y": self.block_y,
        }


def tiles2d(n_x: int, n_y: int, block_x: int, block_y: int) -> TileDescriptor:
    """2-D tiles covering an ``n_x`` x ``n_y`` output (e.g. for ``crossprod_tile``)."""
    for name, v in (("n_x", n_x), ("n_y", n_y), ("block_x", block_x), ("block_y", block_y)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {v!r}")
    return TileDescriptor(int(n_x), int(n_y), int(block_x), int(block_y))


def crossprod_tile(tile: Tile, X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> None:
    """``Z[xs, ys] = X[:, xs].T @ Y[:, ys]`` written straight into the out buffer."""
    xs = slice(tile.x_start, tile.x_stop)
    ys = slice(tile.y_start, tile.y_stop)
    np.matmul(X[:, xs].T, Y[:, ys], out=Z[xs, ys])


register_kernel("col_means", col_means, description="column means of a column block into out")
register_kernel("col_vars", col_vars, description="sample variances (ddof=1) of a column block into out")
register_kernel(
    "crossprod_tile", crossprod_tile, description="X[:, xs].T @ Y[:, ys] into Z, per 2-D tile", descriptor="tiles"
)
