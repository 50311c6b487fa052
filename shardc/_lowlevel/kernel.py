"""Native kernels (csrc/kernel.c, csrc/kern_stats.c): the kernel ABI's
structs, the runner that calls a kernel for a run of shards without the GIL,
finding a function pointer's library again in another process, and the
built-in column-statistics kernel."""

from __future__ import annotations

import errno as _errno
import sys
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError
from .core import _check, ffi, lib

KERNEL_ABI: int = lib.SHARDC_KERNEL_ABI
KERNEL_MAX_DIMS: int = lib.SHARDC_KERNEL_MAX_DIMS
KRUN_GUARDED: int = lib.SHARDC_KRUN_GUARDED
KRUN_DONE: int = lib.SHARDC_KRUN_DONE
KRUN_FAILED: int = lib.SHARDC_KRUN_FAILED
KRUN_COW: int = lib.SHARDC_KRUN_COW
SHARDS_CONTIGUOUS: int = lib.SHARDC_SHARDS_CONTIGUOUS
SHARDS_STRIDED: int = lib.SHARDC_SHARDS_STRIDED
SHARDS_TILES: int = lib.SHARDC_SHARDS_TILES
COLSTATS_ROW_BLOCKS: int = lib.SHARDC_COLSTATS_ROW_BLOCKS
COLSTATS_COL_BLOCKS: int = lib.SHARDC_COLSTATS_COL_BLOCKS
COLSTATS_ROWS: int = lib.SHARDC_COLSTATS_ROWS

_DTYPES = {
    "f8": lib.SHARDC_DT_F64,
    "f4": lib.SHARDC_DT_F32,
    "i8": lib.SHARDC_DT_I64,
    "i4": lib.SHARDC_DT_I32,
    "i2": lib.SHARDC_DT_I16,
    "i1": lib.SHARDC_DT_I8,
    "u8": lib.SHARDC_DT_U64,
    "u4": lib.SHARDC_DT_U32,
    "u2": lib.SHARDC_DT_U16,
    "u1": lib.SHARDC_DT_U8,
    "b1": lib.SHARDC_DT_BOOL,
}
STATS_DTYPES = frozenset(_DTYPES)  # what shardc_colstats_block reads ("f8", "i4", ...)

# Built-in kernels: their addresses in this module (valid in every forked
# worker: the module is loaded before the pool forks).
BUILTIN = {"shardc_kern_colstats": ffi.cast("shardc_kernel_fn", ffi.addressof(lib, "shardc_kern_colstats"))}


def dtype_code(dt: np.dtype) -> int:
    """The ``SHARDC_DT_*`` code of a NumPy dtype (``SHARDC_DT_OTHER`` if none fits)."""
    if dt.byteorder not in ("=", "|") and dt.byteorder != {"little": "<", "big": ">"}[sys.byteorder]:
        return int(lib.SHARDC_DT_OTHER)
    return int(_DTYPES.get(f"{dt.kind}{dt.itemsize}", lib.SHARDC_DT_OTHER))


def fill_array(dst: Any, arr: np.ndarray, readonly: bool = False) -> None:
    """Describe ``arr`` (pointer, shape, strides, dtype) in a ``shardc_array_t``
    (``readonly``: a borrowed input, writable or not in this process)."""
    if arr.ndim > KERNEL_MAX_DIMS:
        raise InvalidArgumentError(
            f"native kernels take arrays of at most {KERNEL_MAX_DIMS} dimensions, got {arr.ndim}"
        )
    dst.data = ffi.cast("void *", arr.__array_interface__["data"][0])
    dst.ndim = arr.ndim
    dst.dtype = dtype_code(arr.dtype)
    dst.itemsize = arr.itemsize
    dst.writable = 1 if arr.flags.writeable and not readonly else 0
    dst.kind = arr.dtype.kind.encode()
    for i, (n, s) in enumerate(zip(arr.shape, arr.strides, strict=True)):
        dst.shape[i] = n
        dst.strides[i] = s


class KernelArgs:
    """A ``shardc_kernel_args_t`` over NumPy arrays; keeps them alive.

    Attributes:
        ptr: the ``const shardc_kernel_args_t *`` a kernel gets.
    """

    def __init__(
        self,
        arrays: list[np.ndarray],
        nshards: int,
        strategy: int,
        n: int = 0,
        block: int = 0,
        tiles: tuple[int, int, int, int] = (0, 0, 0, 0),
        iparams: tuple[int, ...] = (),
        readonly: frozenset[int] = frozenset(),
    ) -> None:
        if len(iparams) > 8:
            raise InvalidArgumentError(f"a native kernel takes at most 8 integer parameters, got {len(iparams)}")
        self.arrays = list(arrays)
        self._arr = ffi.new("shardc_array_t[]", max(1, len(arrays)))
        for i, a in enumerate(arrays):
            fill_array(self._arr[i], a, i in readonly)
        p = ffi.new("shardc_kernel_args_t *")
        p.abi = KERNEL_ABI
        p.narrays = len(arrays)
        p.arrays = self._arr
        p.nshards = nshards
        p.strategy = strategy
        p.n = n
        p.block = block
        for i, v in enumerate(tiles):
            p.tiles[i] = v
        for i, v in enumerate(iparams):
            p.iparams[i] = v
        self.ptr = p


def kernel_fn(addr: int) -> Any:
    """A ``shardc_kernel_fn`` pointer at ``addr``."""
    return ffi.cast("shardc_kernel_fn", addr)


def fn_address(fn: Any) -> int:
    """The address of a cffi function pointer."""
    return int(ffi.cast("uintptr_t", fn))


def new_krun() -> Any:
    return ffi.new("shardc_krun_t *")


def kernel_run(
    fn: Any, args: KernelArgs, writer: Any, b0: int, bn: int, start: int, stop: int, flags: int, res: Any
) -> int:
    """Run shards ``start .. stop-1`` (inside ring block ``b0, bn``) through
    ``fn`` without the GIL; a ``KRUN_*`` code, details in ``res``."""
    rc = lib.shardc_kernel_run(fn, args.ptr, writer, b0, bn, start, stop, flags, res)
    if rc < 0:
        raise InvalidArgumentError(
            f"native kernel run of shards {start}..{stop - 1} (block {b0}+{bn}): bad arguments "
            "(a shard id outside the done map, or an empty range)"
        )
    return rc


def kernel_call(fn: Any, args: KernelArgs, start: int, stop: int) -> int:
    """``fn(args, start, stop)`` once, without the GIL; the kernel's return value."""
    return int(lib.shardc_kernel_call(fn, args.ptr, start, stop))


def kernel_locate(addr: int) -> tuple[str, str, int] | None:
    """``(library path, symbol or "", offset from its load address)`` of the
    function at ``addr``, or None if no loaded shared object holds it."""
    path = ffi.new("char[]", 4096)
    sym = ffi.new("char[]", 512)
    off = ffi.new("uint64_t *")
    rc = lib.shardc_kernel_locate(ffi.cast("void *", addr), path, 4096, sym, 512, off)
    if rc == -_errno.ENOENT:
        return None
    _check(rc, "locate native kernel")
    return ffi.string(path).decode(), ffi.string(sym).decode(), int(off[0])


def kernel_resolve(path: str, sym: str, offset: int = 0) -> tuple[int, str]:
    """``(address, "")`` of ``sym`` (or, for ``sym == ""``, of load address +
    ``offset``) in the shared object ``path``, or ``(0, error message)``."""
    err = ffi.new("char[]", 1024)
    p = lib.shardc_kernel_resolve(path.encode(), sym.encode(), offset, err, 1024)
    if p == ffi.NULL:
        return 0, ffi.string(err).decode(errors="replace")
    return int(ffi.cast("uintptr_t", p)), ""


def colstats_block(x: np.ndarray, r0: int, r1: int, c0: int, c1: int, out: np.ndarray) -> None:
    """Moments (count, sum, shift, mean - shift, M2) of ``x[r0:r1, c0:c1]``
    per column into ``out`` (float64, shape ``(5, >= c1 - c0)``, unit column
    stride), without the GIL."""
    desc = ffi.new("shardc_array_t *")
    fill_array(desc, x)
    if out.dtype != np.float64 or out.ndim != 2 or out.shape[0] != COLSTATS_ROWS or out.strides[1] != 8:
        raise InvalidArgumentError("colstats_block: out must be float64 of shape (5, ncols) with unit column stride")
    ptr = ffi.cast("double *", out.__array_interface__["data"][0])
    rc = lib.shardc_colstats_block(desc, r0, r1, c0, c1, ptr, out.strides[0] // 8)
    if rc == -_errno.EINVAL:
        raise InvalidArgumentError(
            f"colstats_block: x must be 2-D of a numeric dtype (got {x.dtype}, ndim {x.ndim}) and "
            f"rows {r0}:{r1}, columns {c0}:{c1} inside its shape {x.shape}"
        )
    _check(rc, "colstats_block")


def moments_tree(parts: np.ndarray) -> None:
    """Merge ``parts`` (C-contiguous float64, shape ``(k, 5, ncols)``) in
    place in shardc.moments' fixed pairwise tree; the result is ``parts[0]``."""
    if parts.dtype != np.float64 or parts.ndim != 3 or parts.shape[1] != COLSTATS_ROWS or not parts.flags.c_contiguous:
        raise InvalidArgumentError(f"moments_tree: parts must be C-contiguous float64 (k, 5, ncols), got {parts.shape}")
    ptr = ffi.cast("double *", parts.__array_interface__["data"][0])
    _check(lib.shardc_moments_tree(ptr, parts.shape[0], parts.shape[2]), "moments_tree")


def kernel_header() -> str:
    """The text of csrc/kernel.h compiled into the module."""
    return str(ffi.string(lib.shardc_kernel_header()).decode())
