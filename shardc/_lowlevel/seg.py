"""Segments (csrc/seg.c): create, seal, map, protect, advise; one ``Mapping`` per mapped range."""

from __future__ import annotations

import errno as _errno
from typing import Any

from .core import _check, ffi, lib

# --------------------------------------------------------------------------
# segments (csrc/seg.c)
# --------------------------------------------------------------------------

BACKING_MEMFD = lib.SHARDC_BACKING_MEMFD
BACKING_SHM = lib.SHARDC_BACKING_SHM
BACKING_FILE = lib.SHARDC_BACKING_FILE
MAP_WRITE = lib.SHARDC_MAP_WRITE
MAP_PRIVATE = lib.SHARDC_MAP_PRIVATE
MAP_POPULATE = lib.SHARDC_MAP_POPULATE
ADVICE = {
    "normal": lib.SHARDC_ADV_NORMAL,
    "sequential": lib.SHARDC_ADV_SEQUENTIAL,
    "random": lib.SHARDC_ADV_RANDOM,
    "willneed": lib.SHARDC_ADV_WILLNEED,
    "dontneed": lib.SHARDC_ADV_DONTNEED,
    "hugepage": lib.SHARDC_ADV_HUGEPAGE,
}


def seg_backing_supported(backing: int) -> bool:
    return bool(lib.shardc_seg_backing_supported(backing))


def seg_create(backing: int, name: str, size: int, persist: bool) -> int:
    """Create a segment and return its fd."""
    fd = ffi.new("int *")
    _check(lib.shardc_seg_create(backing, name.encode(), size, int(persist), fd), "create", name)
    return fd[0]


def seg_open(backing: int, name: str, writable: bool) -> tuple[int, int]:
    """Open an existing named segment; return ``(fd, size)``."""
    fd = ffi.new("int *")
    size = ffi.new("uint64_t *")
    _check(lib.shardc_seg_open(backing, name.encode(), int(writable), fd, size), "open", name)
    return fd[0], int(size[0])


def seg_unlink(backing: int, name: str) -> None:
    _check(lib.shardc_seg_unlink(backing, name.encode()), "unlink", name)


def seg_seal(fd: int, name: str | None = None) -> bool:
    """Seal against writes/resizes; False where the backing has no seals."""
    rc = lib.shardc_seg_seal(fd)
    if rc == -_errno.ENOTSUP:
        return False
    _check(rc, "seal", name)
    return True


def seg_is_sealed(fd: int) -> bool:
    return bool(_check(lib.shardc_seg_is_sealed(fd), "get seals"))


def seg_size(fd: int) -> int:
    size = ffi.new("uint64_t *")
    _check(lib.shardc_seg_size(fd, size), "fstat")
    return int(size[0])


def seg_close_fd(fd: int) -> None:
    _check(lib.shardc_seg_close_fd(fd), "close")


def seg_map(fd: int, offset: int, size: int, flags: int, name: str | None = None) -> int:
    """Map ``size`` bytes of the segment; return the address as an int."""
    addr = ffi.new("void **")
    _check(lib.shardc_seg_map(fd, offset, size, flags, addr), "mmap", name)
    return int(ffi.cast("uintptr_t", addr[0]))


def seg_unmap(addr: int, size: int) -> None:
    _check(lib.shardc_seg_unmap(ffi.cast("void *", addr), size), "munmap")


def seg_protect(addr: int, size: int, writable: bool, name: str | None = None) -> None:
    _check(lib.shardc_seg_protect(ffi.cast("void *", addr), size, int(writable)), "mprotect", name)


def seg_discard(addr: int, size: int, name: str | None = None) -> None:
    """Free the pages of a page-aligned range and leave it PROT_NONE (see seg.h)."""
    _check(lib.shardc_seg_discard(ffi.cast("void *", addr), size), "discard pages", name)


def seg_advise(addr: int, size: int, advice: str, name: str | None = None) -> None:
    _check(lib.shardc_seg_advise(ffi.cast("void *", addr), size, ADVICE[advice]), f"madvise({advice})", name)


def seg_populate(addr: int, size: int, write: bool, name: str | None = None) -> None:
    _check(lib.shardc_seg_populate(ffi.cast("void *", addr), size, int(write)), "populate", name)


def seg_fill(addr: int, size: int, pattern: bytes) -> None:
    _check(lib.shardc_seg_fill(ffi.cast("void *", addr), size, pattern, len(pattern)), "fill")


def mem_equal(a: int, b: int, n: int) -> bool:
    return bool(lib.shardc_mem_equal(ffi.cast("void *", a), ffi.cast("void *", b), n))


class Mapping:
    """A mapped region whose lifetime is tied to Python references.

    ``cdata`` is a cffi pointer created with ``ffi.gc``: the region is unmapped
    when the last reference to it goes away.  :meth:`buffer` returns a buffer
    object that references ``cdata``, so NumPy arrays built on it keep the
    mapping alive even after the owning object was closed: a closed buffer's
    outstanding views never dangle.
    """

    __slots__ = ("cdata", "addr", "size", "primed")

    def __init__(self, addr: int, size: int) -> None:
        raw = ffi.cast("char *", addr)
        self.addr = addr
        self.size = size
        self.primed = False  # page guards set up on it once (see GUARD_PRIMED)
        self.cdata = ffi.gc(raw, lambda p, n=size: lib.shardc_seg_unmap(p, n), size=size)

    def buffer(self) -> Any:
        """A writable cffi buffer over the whole region that keeps the mapping alive."""
        return ffi.buffer(self.cdata, self.size)


def map_segment(fd: int, offset: int, size: int, flags: int, name: str | None = None) -> Mapping:
    """Map and return a :class:`Mapping` that unmaps itself when unreferenced."""
    return Mapping(seg_map(fd, offset, size, flags, name), size)
