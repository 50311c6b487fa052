"""Big return values through shared memory instead of the socket.

A shard (or a reduction's group) that returns a large NumPy array would
otherwise be pickled into the ``RESULTS`` message and copied through the
worker's socket (a 512 MiB Gram matrix: ~0.5 s of socket copies and twice its
size in buffers on both sides).  Instead the worker copies it once into a
fresh anonymous segment, sends the segment's fd with the message
(``SCM_RIGHTS``) and closes its own; the master maps the segment and the
array it gets is a view of it (writable, private to the master: no other
process holds the fd).  Used by every front end that gathers values
(``shard_map`` rpc_chunked, ``shard_reduce``).

Only plain arrays of at least :data:`BIG_VALUE_BYTES` without Python objects
take this path; everything else is pickled as before.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from . import _lowlevel as ll
from .segment import Segment
from .share import view_array

BIG_VALUE_BYTES = 1 << 20


def is_big_array(value: Any) -> bool:
    """True for a plain ndarray worth sending through a segment."""
    return type(value) is np.ndarray and value.nbytes >= BIG_VALUE_BYTES and not value.dtype.hasobject


def pack(value: np.ndarray) -> tuple[Segment, tuple[np.dtype, tuple[int, ...], str]]:
    """Copy ``value`` into a new segment; returns it (the caller sends its fd,
    then closes it) and the spec :func:`unpack` rebuilds the array from."""
    order: Literal["C", "F"] = "F" if value.flags.f_contiguous and not value.flags.c_contiguous else "C"
    seg = Segment.create(value.nbytes, label="value")
    try:
        m = seg.map(writable=True)
        dst = np.ndarray(value.shape, dtype=value.dtype, buffer=m.buffer(), order=order)
        ll.seg_populate(m.addr, value.nbytes, True)
        np.copyto(dst, value, casting="no")
        del dst, m
    except BaseException:
        seg.close()
        raise
    return seg, (value.dtype, value.shape, order)


def unpack(fd: int, spec: tuple[np.dtype, tuple[int, ...], str]) -> np.ndarray:
    """The array a worker packed into the segment behind ``fd`` (which this closes)."""
    dtype, shape, order = spec
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    try:
        m = ll.map_segment(fd, 0, nbytes, ll.MAP_WRITE, "value")
    finally:
        ll.seg_close_fd(fd)
    return view_array(m, np.dtype(dtype), shape, _strides(shape, np.dtype(dtype).itemsize, order), 0, writeable=True)


def _strides(shape: tuple[int, ...], itemsize: int, order: str) -> tuple[int, ...]:
    out = [0] * len(shape)
    step = itemsize
    dims = range(len(shape) - 1, -1, -1) if order == "C" else range(len(shape))
    for i in dims:
        out[i] = step
        step *= max(shape[i], 1)
    return tuple(out)


def close_fds(fds: list[int]) -> None:
    """Close fds that came with a message nobody will read (a stale call's results)."""
    for fd in fds:
        try:
            ll.seg_close_fd(fd)
        except OSError:
            pass
