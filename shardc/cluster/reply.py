"""A macro-shard's reply, from the node's agent to the caller, in one flat buffer.

The body (values, failures, out-buffer runs, stats) is pickled once, in the
agent.  Return values the agent's workers pickled stay their pickles
(:class:`shardc.protocol.PickledValue`): they travel out of band, after the
body, as the workers made them, and the caller unpickles each once.  Layout::

    u64 length of the body's pickle, u32 number of blobs, u64 length of each blob,
    the body's pickle, blob 0, blob 1, ...

A big reply is written into a memfd whose descriptor goes to the node's
engine worker with the ``DONE`` message (:mod:`.node` maps it read-only and
hands the engine a NumPy view: Ray copies it into its object store, Dask
sends it as a frame, with no pickling in between); a small one travels in
the message itself.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
from typing import Any

import numpy as np

_HEAD = struct.Struct("<QI")
_LEN = struct.Struct("<Q")
INLINE_MAX = 64 << 10  # replies up to this size travel in the DONE message itself
_IOV = 512  # buffers per writev (IOV_MAX is 1024 on Linux and macOS)


def pack(body: dict[str, Any], values: list[Any] | None, pickled: list[int]) -> list[Any]:
    """The reply's pieces (bytes-like, in order); ``values[k]`` for ``k`` in ``pickled``
    are PickledValues, whose blobs go after the body as they are."""
    blobs = {id(values[k].blob): values[k].blob for k in pickled} if values is not None else {}
    out: list[Any] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if id(raw.obj) in blobs:
            out.append(raw)
            return False  # out of band: after the body
        return True  # anything else (a NumPy value, ...) stays in the body's pickle

    main = pickle.dumps(body, protocol=5, buffer_callback=out_of_band)
    head = _HEAD.pack(len(main), len(out)) + b"".join(_LEN.pack(b.nbytes) for b in out)
    return [head, main, *out]


def size(pieces: list[Any]) -> int:
    return sum(memoryview(p).nbytes for p in pieces)


def to_bytes(pieces: list[Any]) -> bytes:
    return b"".join(pieces)


def to_memfd(pieces: list[Any]) -> tuple[int, int]:
    """A memfd holding the pieces one after another: (fd, bytes)."""
    n = size(pieces)
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("shardc-cluster-reply", os.MFD_CLOEXEC)
    else:  # pragma: no cover - macOS: an unlinked temporary file
        import tempfile

        with tempfile.TemporaryFile() as tmp:
            fd = os.dup(tmp.fileno())
    try:
        # write(2), not stores through a mapping: the kernel fills the fresh pages without a
        # page fault each (10 MB: 7 ms against 12 ms here).
        views = [v for v in (memoryview(p).cast("B") for p in pieces) if v.nbytes]
        while views:
            group = views[:_IOV]
            done = os.writev(fd, group)
            views = views[_IOV:]
            for i, v in enumerate(group):  # a short write: what is left of the group goes first
                if done < v.nbytes:
                    views[:0] = [v[done:], *group[i + 1 :]]
                    break
                done -= v.nbytes
    except BaseException:
        os.close(fd)
        raise
    return fd, n


def from_memfd(fd: int, n: int) -> np.ndarray:
    """The reply in memfd ``fd`` (closed here) as read-only bytes, mapped (no copy)."""
    try:
        mm = mmap.mmap(fd, n, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype=np.uint8)


def unpack(payload: Any) -> dict[str, Any]:
    """The body of a reply; its PickledValues view the blobs in ``payload`` (load them
    before ``payload`` goes)."""
    mv = memoryview(payload).cast("B")
    n_main, n_blobs = _HEAD.unpack_from(mv, 0)
    at = _HEAD.size
    lens = [_LEN.unpack_from(mv, at + 8 * i)[0] for i in range(n_blobs)]
    at += 8 * n_blobs
    main = mv[at : at + n_main]
    at += n_main
    bufs = []
    for n in lens:
        bufs.append(mv[at : at + n])
        at += n
    body: dict[str, Any] = pickle.loads(main, buffers=bufs)
    return body
