"""Typed shared output arrays: ``shardc.buffer()`` and ``buffer_open()``.

A :class:`Buffer` is a NumPy array whose memory is a shared segment, mapped
``MAP_SHARED``: a forked worker that writes ``out[i] = v`` writes straight
into the caller's array, with no result to pickle back.  In the caller it
behaves as an ndarray (indexing, slicing, fancy indexing, ufuncs, arithmetic,
``np.asarray(buf)`` without a copy).

Lifetime: :meth:`Buffer.close` (or the context manager) releases the
segment.  Afterwards the Buffer itself raises :class:`~shardc.errors.ClosedError`
on use, while NumPy views taken earlier stay valid (they keep the mapping
alive) -- never a crash, never garbage.

Costs: ``init=None`` or ``0`` costs nothing (fresh shared pages read as
zero and are allocated on first touch); any other ``init`` fills the buffer
once, at memcpy speed.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import _lowlevel as ll
from .errors import ClosedError, InvalidArgumentError, InvalidTypeError
from .segment import Segment


def check_dtype(dtype: Any, arg: str = "dtype") -> np.dtype:
    """Validate a fixed-size, object-free dtype (shared memory holds raw bytes)."""
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError, KeyError) as exc:
        # NumPy's parser of dtype strings raises any of these ("0:" ValueError,
        # "01" SyntaxError from its literal evaluation of shapes).
        raise InvalidTypeError(f"{arg}={dtype!r} is not a NumPy dtype: {exc}") from None
    if dt.hasobject:
        raise InvalidTypeError(
            f"{arg}={dt} holds Python objects, which cannot live in shared memory; "
            "use a fixed-size dtype (numbers, bool, fixed-width strings, structs)"
        )
    if dt.itemsize == 0:
        raise InvalidTypeError(f"{arg}={dt} has no size; give a width (e.g. 'S16' or 'U8')")
    return dt


def check_shape(shape: Any, arg: str = "shape") -> tuple[int, ...]:
    """Validate a shape: an int or a sequence of non-negative ints."""
    if isinstance(shape, (numbers.Integral, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, (str, bytes, dict)):
        # Iterable, but not a shape: "" would be () (a 0-d buffer), a dict its keys.
        raise InvalidTypeError(f"{arg} must be an int or a tuple of ints, got {shape!r}")
    try:
        dims = tuple(shape)
    except TypeError:
        raise InvalidTypeError(f"{arg} must be an int or a tuple of ints, got {shape!r}") from None
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (numbers.Integral, np.integer)):
            raise InvalidTypeError(f"{arg} must contain ints, got {d!r} in {shape!r}")
        if d < 0:
            raise InvalidArgumentError(f"{arg} must not be negative, got {d} in {tuple(dims)!r}")
        out.append(operator.index(d))
    return tuple(out)


def array_protocol(arr: np.ndarray, dtype: Any, copy: Any, what: str) -> np.ndarray:
    """``__array__`` for objects that hold an ndarray over shared memory:
    the array itself (no copy) unless a copy or another dtype is asked for."""
    if copy:
        return np.array(arr, dtype=dtype, copy=True)
    if dtype is not None and np.dtype(dtype) != arr.dtype:
        if copy is False:
            raise InvalidArgumentError(f"cannot convert {what} to another dtype without a copy")
        return arr.astype(dtype)
    return arr


class Buffer(np.lib.mixins.NDArrayOperatorsMixin):
    """A shared, typed, n-dimensional output array (see module docstring).

    Attributes:
        segment: the underlying :class:`~shardc.segment.Segment`.
        path: the segment name for ``buffer_open`` (named buffers), else None.
    """

    __array_priority__ = 20.0

    def __init__(
        self, segment: Segment, dtype: np.dtype, shape: tuple[int, ...], readonly: bool = False, offset: int = 0
    ) -> None:
        self.segment = segment
        self._dtype = dtype
        self._shape = shape
        mapping = segment.mapping(writable=not readonly)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        raw: Any = mapping.buffer()
        if readonly:
            # Read-only at the buffer level: flags.writeable cannot be turned
            # back on over a PROT_READ mapping (that would SIGSEGV on store).
            raw = memoryview(raw).toreadonly()
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
        self._array: np.ndarray | None = arr
        self.path = segment.name if segment.persistent else None

    # -- the array ----------------------------------------------------------
    @property
    def array(self) -> np.ndarray:
        """The NumPy view of the buffer (no copy)."""
        if self._array is None:
            raise ClosedError("this shardc buffer is closed; create a new one with shardc.buffer()")
        return self._array

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return array_protocol(self.array, dtype, copy, "a shardc buffer")

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        inputs = tuple(x.array if isinstance(x, Buffer) else x for x in inputs)
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(x.array if isinstance(x, Buffer) else x for x in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out is None:
            return result
        # Hand back the Buffers given as out=, so ``buf += 1`` (which rebinds
        # ``buf`` to this return value) keeps ``buf`` a Buffer.
        if isinstance(result, tuple):
            return tuple(o if isinstance(o, Buffer) and r is o.array else r for o, r in zip(out, result, strict=False))
        return out[0] if isinstance(out[0], Buffer) and result is out[0].array else result

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        def unwrap(x: Any) -> Any:
            if isinstance(x, Buffer):
                return x.array
            if isinstance(x, (list, tuple)):
                return type(x)(unwrap(y) for y in x)
            return x

        result = func(*unwrap(args), **{k: unwrap(v) for k, v in kwargs.items()})
        out = kwargs.get("out")
        if isinstance(out, Buffer) and result is out._array:
            return out  # np.cumsum(x, out=buf) is buf, as for ndarrays
        return result

    def __getitem__(self, key: Any) -> Any:
        return self.array[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.array[key] = value

    def __len__(self) -> int:
        return len(self.array)

    # Conversions are looked up on the type, not through __getattr__.
    def __bool__(self) -> bool:
        return bool(self.array)

    def __float__(self) -> float:
        return float(self.array)

    def __int__(self) -> int:
        return int(self.array)

    def __complex__(self) -> complex:
        return complex(self.array)

    def __index__(self) -> int:
        return operator.index(self.array)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.array)

    def __getattr__(self, name: str) -> Any:
        # Array attributes and methods (sum, mean, T, reshape, ...) delegate.
        if name.startswith("__") or name in ("_array", "segment", "_dtype", "_shape"):
            raise AttributeError(name)  # the attribute protocol's own signal, not a shardc failure
        return getattr(self.array, name)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def size(self) -> int:
        return self.array.size

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    # -- lifetime ------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._array is None

    def close(self) -> None:
        """Release the buffer (idempotent); earlier NumPy views stay valid."""
        if self._array is None:
            return
        self._array = None
        self.segment.close()

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        raise InvalidTypeError(
            "a shardc.Buffer is not pickled by value; pass it to shard_map as out={...} or "
            "borrow={...} (or let fun capture it: shard_map sends it by reference), or pickle "
            "np.asarray(buf) to copy the data"
        )

    def info(self) -> dict[str, Any]:
        return {
            "dtype": str(self._dtype),
            "shape": self._shape,
            "nbytes": self.nbytes if not self.closed else 0,
            **self.segment.info(),
        }

    def __repr__(self) -> str:
        if self.closed:
            return f"<shardc.Buffer closed dtype={self._dtype} shape={self._shape}>"
        return f"<shardc.Buffer {self.segment.backing} dtype={self._dtype} shape={self._shape}>\n{self.array!r}"


def buffer(dtype: Any, shape: Any, init: Any = None, backing: str = "auto", name: str | None = None) -> Buffer:
    """Create a shared output buffer.

    Args:
        dtype: any fixed-size NumPy dtype (float, int, bool, complex,
            structured, fixed-width strings).
        shape: an int or a tuple of non-negative ints.
        init: None or 0 (free: fresh pages are zero), a scalar to fill with,
            or an array broadcastable to ``shape``.
        backing: "auto", "memfd", "shm" or "file" (see :mod:`shardc.segment`).
        name: make the buffer *named* so ``buffer_open(name, ...)`` can attach
            it from another process; the creator unlinks it on close.

    Returns:
        A :class:`Buffer`.

    Raises:
        InvalidTypeError: object or zero-size dtype, non-integer shape (a TypeError).
        InvalidArgumentError: negative shape, unknown backing, bad init.
    """
    dt = check_dtype(dtype)
    shp = check_shape(shape)
    nbytes = _nbytes(dt, shp)
    seg = Segment.create(nbytes, backing=backing, name=name, label="out")
    try:
        buf = Buffer(seg, dt, shp)
        _apply_init(buf, init)
    except BaseException:
        seg.close()
        raise
    return buf


def _nbytes(dt: np.dtype, shp: tuple[int, ...]) -> int:
    # Python ints: np.prod(int64) would wrap around for absurd shapes.
    nbytes = math.prod(shp) * dt.itemsize
    if nbytes > sys.maxsize:
        raise InvalidArgumentError(
            f"shape={shp!r} of dtype {dt} needs {nbytes} bytes, more than this platform can address"
        )
    return nbytes


def _apply_init(buf: Buffer, init: Any) -> None:
    if init is None:
        return
    arr = buf.array
    # A tuple is one record of a structured dtype, not a sequence to broadcast.
    scalar = np.ndim(init) == 0 or (buf.dtype.names is not None and isinstance(init, tuple))
    try:
        if scalar:
            src = np.asarray(init) if not isinstance(init, tuple) else None
            if src is not None and (
                (src.dtype.kind in "fc" and buf.dtype.kind in "biu")
                or (src.dtype.kind == "c" and buf.dtype.kind == "f")
            ):
                # As for array inits: no silent 1.5 -> 1 or complex -> real.
                raise InvalidTypeError(f"a {src.dtype} value would be truncated to {buf.dtype}")
            value = np.array(init, dtype=buf.dtype)
            if not value.tobytes().strip(b"\0"):
                return  # all-zero bytes: fresh pages already hold this
            ll.seg_fill(buf.segment.mapping().addr, arr.nbytes, value.tobytes())
        else:
            src = init
            if not isinstance(init, np.ndarray) and buf.dtype.kind not in "biufc":
                # Records, strings, dates from Python lists: parse with the
                # target dtype (numbers keep the same_kind check).
                src = np.asarray(init, dtype=buf.dtype)
            np.copyto(arr, np.asarray(src), casting="same_kind")
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgumentError(
            f"init={init!r} cannot fill a buffer of dtype {buf.dtype} and shape {buf.shape}: {exc}"
        ) from None


def buffer_open(path: str, dtype: Any, shape: Any, backing: str = "shm", readonly: bool = False) -> Buffer:
    """Attach a named buffer created by another process with ``buffer(name=...)``.

    Raises:
        SegmentError: no such segment (ENOENT) or no permission.
        InvalidArgumentError: the segment is smaller than ``dtype``/``shape`` need.
    """
    dt = check_dtype(dtype)
    shp = check_shape(shape)
    need = _nbytes(dt, shp)
    seg = Segment.open(path, backing=backing, writable=not readonly)
    if seg.size < need:
        seg.close()
        raise InvalidArgumentError(
            f"segment {path!r} holds {seg.size} bytes, but dtype {dt} and shape {shp} need {need}"
        )
    return Buffer(seg, dt, shp, readonly=readonly)
