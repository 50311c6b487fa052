"""Borrowed inputs: ``shardc.share(obj)`` puts an object in shared memory once.

Three paths, cheapest first:

1. **By reference.**  An array whose memory already lies in a shardc segment
   (a :class:`Shared` array, a :class:`~shardc.Buffer`, or any view of
   them, strides and offset included) costs nothing: workers map the same
   segment.
2. **One copy.**  Any other NumPy array is copied once into a segment that
   is then *sealed* (memfd: the kernel refuses writable shared mappings from
   then on), keeping its memory order (C, or F for Fortran arrays; other
   layouts are made C-contiguous).  ``shard_map`` caches that copy per array
   while the caller keeps the array alive, and before reusing it checks that
   the caller did not change the array in between: one ``memcmp``, or, where
   the kernel tracks writes to the array's pages (:mod:`shardc.pagetrack`),
   a compare of only the pages it does not vouch for.
3. **Pickle protocol 5.**  Anything else (dicts of arrays, DataFrames, ...)
   is pickled with out-of-band buffers; every buffer of at least 64 KiB goes
   into a segment, so the big parts of the object are zero-copy in workers.

Workers map every borrowed segment ``MAP_PRIVATE`` and read-only; see
``shardc.guard`` for what happens on a write (the ``cow`` policy).
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import threading
import time
import weakref
from typing import Any, Literal

import numpy as np

from . import _lowlevel as ll
from .buffer import Buffer, array_protocol
from .errors import ClosedError, InvalidArgumentError, InvalidTypeError
from .pagetrack import Tracker, release, track
from .segment import Segment, find_address
from .sysinfo import HAS_PROCFS

log = logging.getLogger("shardc")

MIN_OOB_BYTES = 64 * 1024


def array_extent(arr: np.ndarray) -> tuple[int, int]:
    """``(lowest address, bytes spanned)`` of an array's elements."""
    if arr.size == 0:
        return arr.ctypes.data, 0
    low = high = arr.ctypes.data
    for n, s in zip(arr.shape, arr.strides, strict=True):
        if s < 0:
            low += (n - 1) * s
        else:
            high += (n - 1) * s
    return low, high - low + arr.itemsize


class Shared:
    """A borrowed input in shared memory (see module docstring).

    Attributes:
        kind: "array" or "pickle".
        how: "reference" (already shared), "file" (a memmap's file, mapped
            by the workers), "copied" (copied once now) or "pickled"
            (protocol-5 payload + out-of-band segments).
        bytes_copied: bytes written into new segments to share this object.
        nbytes: size of the data (array bytes, or payload + buffers).
        segments: the segments it uses.
    """

    def __init__(
        self,
        kind: str,
        how: str,
        segments: list[Segment],
        *,
        dtype: np.dtype | None = None,
        shape: tuple[int, ...] = (),
        strides: tuple[int, ...] = (),
        offset: int = 0,
        payload: bytes = b"",
        buffers: list[tuple[int, int]] | None = None,
        bytes_copied: int = 0,
        owns: bool = True,
    ) -> None:
        self.kind = kind
        self.how = how
        self.segments = segments
        self.dtype = dtype
        self.shape = shape
        self.strides = strides
        self.offset = offset
        self.payload = payload
        self.buffers = buffers or []  # (segment index, nbytes) per out-of-band buffer
        self.bytes_copied = bytes_copied
        self._owns = owns
        self._closed = False
        self._array: np.ndarray | None = None
        if kind == "array":
            self.nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if dtype is not None else 0
        else:
            self.nbytes = len(payload) + sum(n for _, n in self.buffers)

    @property
    def array(self) -> np.ndarray:
        """A read-only NumPy view of a shared array (kind "array")."""
        if self._closed:
            raise ClosedError("this shared input is closed")
        if self.kind != "array":
            raise InvalidTypeError("this shared object is not an array; use .get()")
        if self._array is None:
            assert self.dtype is not None  # set for every kind "array"
            self._array = view_array(
                self.segments[0].mapping(writable=False),
                self.dtype,
                self.shape,
                self.strides,
                self.offset,
                writeable=False,
            )
        return self._array

    def get(self) -> Any:
        """The shared object as seen by this process (zero-copy where possible)."""
        if self.kind == "array":
            return self.array
        if self._closed:
            raise ClosedError("this shared input is closed")
        bufs = [memoryview(self.segments[i].mapping(writable=False).buffer())[:n].toreadonly() for i, n in self.buffers]
        return pickle.loads(self.payload, buffers=bufs)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        # np.array(shared) gives a private, writable copy; np.asarray the shared view.
        return array_protocol(self.array, dtype, copy, "a shared array")

    def descriptor(self) -> dict[str, Any]:
        """What a worker needs to rebuild the object (segments by key)."""
        return {
            "kind": self.kind,
            "segs": [s.key for s in self.segments],
            "dtype": self.dtype,
            "shape": self.shape,
            "strides": self.strides,
            "offset": self.offset,
            "payload": self.payload,
            "buffers": self.buffers,
        }

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release the segments this handle created (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._array = None
        if self._owns:
            for s in self.segments:
                s.close()

    def __enter__(self) -> Shared:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        what = f"{self.dtype} {self.shape}" if self.kind == "array" else f"{len(self.buffers)} buffers"
        return f"<shardc.Shared {self.kind} {what} {self.how} {self.nbytes} bytes>"


def view_array(
    mapping: ll.Mapping, dtype: np.dtype, shape: tuple[int, ...], strides: tuple[int, ...], offset: int, writeable: bool
) -> np.ndarray:
    """An ndarray over ``mapping`` (keeps the mapping alive)."""
    buf: Any = mapping.buffer()
    if not writeable:
        # A read-only buffer, so nobody can flip ``flags.writeable`` back on
        # and store into a PROT_READ page (SIGSEGV).
        # (via frombuffer: np.ndarray(buffer=memoryview) would take the
        # memoryview's writable exporter as its base).
        buf = np.frombuffer(memoryview(buf).toreadonly(), dtype=np.uint8)
    return np.ndarray(shape, dtype=dtype, buffer=buf, offset=offset, strides=strides)


def _by_reference(arr: np.ndarray) -> Shared | None:
    low, span = array_extent(arr)
    hit = find_address(low, span)
    if hit is None:
        return None
    seg, _ = hit
    base = seg.mapping().addr
    return Shared(
        "array",
        "reference",
        [seg],
        dtype=arr.dtype,
        shape=arr.shape,
        strides=arr.strides,
        offset=arr.ctypes.data - base,
        owns=False,
    )


PARALLEL_COPY_BYTES = 64 * 1024**2


def _parallel_copy(dst: np.ndarray, src: np.ndarray, addr: int, order: str) -> None:
    """Copy ``src`` into the fresh segment view ``dst``.

    Most of the cost of a big copy into new shared memory is the kernel
    allocating and zeroing pages (~2 us per 4 KiB page here), not memcpy.
    Both scale with cores: each thread pre-faults its slice of the segment in
    one ``MADV_POPULATE_WRITE`` call and copies it (NumPy and cffi release the
    GIL).  The threads are joined before returning, so none is alive when a
    pool forks later.
    """
    nbytes = dst.nbytes
    axis = 0 if order == "C" else dst.ndim - 1
    n = dst.shape[axis] if dst.ndim else 0
    threads = min(4, os.cpu_count() or 1, n)
    if nbytes < PARALLEL_COPY_BYTES or threads < 2:
        ll.seg_populate(addr, nbytes, True)
        np.copyto(dst, src, casting="no")
        return
    cuts = [n * k // threads for k in range(threads + 1)]
    row = nbytes // n  # bytes per index along the split axis (dst is contiguous)
    errors: list[BaseException] = []

    def part(k: int) -> None:
        try:
            lo, hi = cuts[k], cuts[k + 1]
            ll.seg_populate(addr + lo * row, (hi - lo) * row, True)
            sl = [slice(None)] * dst.ndim
            sl[axis] = slice(lo, hi)
            np.copyto(dst[tuple(sl)], src[tuple(sl)], casting="no")
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    workers = [threading.Thread(target=part, args=(k,), name=f"shardc-copy-{k}") for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]


def _copy_array(arr: np.ndarray, backing: str) -> Shared:
    order: Literal["C", "F"] = "F" if (arr.flags.f_contiguous and not arr.flags.c_contiguous) else "C"
    nbytes = arr.nbytes
    seg = Segment.create(nbytes, backing=backing, label="in")
    try:
        if nbytes:
            wmap = seg.map(writable=True)
            dst = np.ndarray(arr.shape, dtype=arr.dtype, buffer=wmap.buffer(), order=order)
            _parallel_copy(dst, arr, wmap.addr, order)
            strides = dst.strides
            del dst, wmap  # unmap the writable view before sealing
        else:
            strides = np.empty(arr.shape, dtype=arr.dtype, order=order).strides
        seg.seal()
    except BaseException:
        seg.close()
        raise
    return Shared(
        "array", "copied", [seg], dtype=arr.dtype, shape=arr.shape, strides=strides, offset=0, bytes_copied=nbytes
    )


def _pickle(obj: Any, backing: str) -> Shared:
    big: list[pickle.PickleBuffer] = []

    def keep_oob(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes >= MIN_OOB_BYTES:
            big.append(buf)
            return False  # out of band
        return True  # small: serialize in-band

    try:
        payload = pickle.dumps(obj, protocol=5, buffer_callback=keep_oob)
    except Exception as exc:
        raise InvalidArgumentError(f"cannot share {type(obj).__name__}: it is not picklable ({exc})") from exc
    segs: list[Segment] = []
    bufs: list[tuple[int, int]] = []
    copied = 0
    try:
        for b in big:
            raw = b.raw()
            seg = Segment.create(raw.nbytes, backing=backing, label="in")
            segs.append(seg)
            wmap = seg.map(writable=True)
            memoryview(wmap.buffer())[: raw.nbytes] = raw.cast("B")
            del wmap
            seg.seal()
            bufs.append((len(segs) - 1, raw.nbytes))
            copied += raw.nbytes
    except BaseException:
        for s in segs:
            s.close()
        raise
    return Shared("pickle", "pickled", segs, payload=payload, buffers=bufs, bytes_copied=copied)


def file_reference(arr: np.ndarray, name: str = "the memmap") -> Shared | None:
    """A file-backed array (``np.memmap``) by reference to its file: workers
    map the file itself (read-only, private, under the cow guards), nothing is
    copied.  None when ``arr`` is not a memmap sharing its file's pages (mode
    "c" keeps private changes the file does not have; a derived array may
    have no mapping) or when its path now names another file (replaced
    since it was mapped): it is then copied like any other array.

    The array must not change while a call runs (as for every borrowed
    input); a file changed by another process meanwhile shows in the workers.

    Raises:
        InvalidArgumentError: the file was truncated below the end of the
            array (reading it, even to copy it, would kill the process with
            SIGBUS).
    """
    mm = getattr(arr, "_mmap", None)
    path = getattr(arr, "filename", None)
    if not isinstance(arr, np.memmap) or mm is None or path is None:
        return None
    if arr.dtype.hasobject or arr.size == 0:
        return None
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data  # the start of numpy's mapping
        file_size = mm.size()  # of the file numpy mapped (its own fd), even if the path was replaced
    except (TypeError, ValueError, OSError):  # a closed mmap
        return None
    start = int(arr.offset) - int(arr.offset) % mmap.ALLOCATIONGRANULARITY  # its file offset (as numpy maps it)
    offset = start + (arr.ctypes.data - base)
    lo, span = array_extent(arr)
    end = lo - arr.ctypes.data + offset + span  # one past the array's last byte in the file
    if end > file_size:  # (truncation drops even a mode "c" memmap's private pages)
        raise InvalidArgumentError(
            f"{name}: the file {os.fspath(path)!r} behind this np.memmap was truncated to {file_size} bytes "
            f"but the array reaches byte {end}; reading it would crash with SIGBUS. Recreate the memmap "
            "from the file as it is now"
        )
    if getattr(arr, "mode", "c") == "c":
        return None
    try:
        seg = Segment.open(os.fspath(path), backing="file", writable=False)
    except OSError:  # the path was removed (or replaced by something unreadable): copy
        return None
    if lo - arr.ctypes.data + offset < 0 or end > seg.size or _mapped_file(base) != _file_id(seg.fd):
        seg.close()  # the path names another file now (replaced): copy what the array shows
        return None
    return Shared(
        "array", "file", [seg], dtype=arr.dtype, shape=arr.shape, strides=arr.strides, offset=offset, owns=True
    )


def _file_id(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def _mapped_file(addr: int) -> tuple[int, int, int] | None:
    """(device major, minor, inode) of the file mapped at ``addr``, from /proc/self/maps.

    None where there is no /proc (macOS): a memmap is then copied, since the
    file its path names now cannot be told from the one the array maps."""
    if not HAS_PROCFS:
        return None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                rng, _perm, _off, dev, ino = line.split(None, 5)[:5]
                lo, _, hi = rng.partition("-")
                if int(lo, 16) <= addr < int(hi, 16):
                    major, _, minor = dev.partition(":")
                    return int(major, 16), int(minor, 16), int(ino)
    except (OSError, ValueError):
        pass
    return None


def share(obj: Any, backing: str = "auto") -> Shared:
    """Put ``obj`` in shared memory once and return a :class:`Shared` handle.

    Args:
        obj: a NumPy array (any dtype without Python objects, any layout), a
            :class:`Shared` (returned as is), a :class:`~shardc.Buffer`, or
            any picklable object.
        backing: segment backing for new segments (see :mod:`shardc.segment`).

    Returns:
        A :class:`Shared`; ``.array`` (arrays) or ``.get()`` gives the data.
    """
    if isinstance(obj, Shared):
        if obj.closed:
            raise ClosedError("cannot share a closed Shared handle")
        return obj
    if isinstance(obj, Buffer):
        obj = obj.array
    # A masked array is more than its data: pickle it, or the mask is lost.
    if isinstance(obj, np.ndarray) and not obj.dtype.hasobject and not isinstance(obj, np.ma.MaskedArray):
        ref = _by_reference(obj)
        if ref is not None:
            return ref
        return _copy_array(obj, backing)
    return _pickle(obj, backing)


class ShareCache:
    """Per-array cache of copies made for ``borrow=`` (while the array lives).

    A cached copy is reused only after a check shows the caller's array still
    holds the same bytes, so mutating an array between calls is safe.  The
    check compares the bytes (one parallel ``memcmp``), or, where the kernel
    tracks writes to the array's pages (:mod:`shardc.pagetrack`), only the
    pages it does not vouch for.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Shared]] = {}
        self._trackers: dict[int, Tracker] = {}  # key -> the kernel's write tracking of its array
        # Reentrant: a weakref callback (-> _drop) can run inside a locked section.
        self._lock = threading.RLock()
        # One check-or-copy at a time: two threads checking one array would otherwise
        # race on its entry (and a look at a tracker consumes the kernel's record).
        self._get_lock = threading.Lock()
        self.bytes_compared = 0  # by the last check (diagnostics and tests)

    def get(self, arr: np.ndarray, backing: str) -> tuple[Shared, str, float]:
        """Return ``(shared, how, seconds)``; how is reference/cached/copied."""
        t0 = time.perf_counter()
        ref = _by_reference(arr)
        if ref is not None:
            return ref, "reference", time.perf_counter() - t0
        with self._get_lock:
            shared, how = self._get(arr, backing)
        return shared, how, time.perf_counter() - t0

    def _get(self, arr: np.ndarray, backing: str) -> tuple[Shared, str]:
        key = id(arr)
        with self._lock:
            entry = self._entries.get(key)
            tracker = self._trackers.get(key)
        changed = False  # the array changed since its copy: its next copy is not tracked
        if entry is not None:
            wr, shared = entry
            if wr() is arr and not shared.closed:
                if tracker is None:
                    # Untracked (it changed before, or could not be tracked): armed BEFORE
                    # the compare, so a write after it shows at the next check.
                    tracker = track(arr)
                    if self._same(arr, shared, None):
                        if tracker is not None:
                            with self._lock:  # (the get lock: nobody else replaced the entry)
                                self._trackers[key] = tracker
                        return shared, "cached"
                    release(tracker)
                elif self._same(arr, shared, tracker):
                    return shared, "cached"
                changed = True
            self._drop(key, shared)
        # An array that changes between calls is compared (a memcmp stops at the first
        # difference) rather than tracked (its writes would each take a fault); a new one
        # is armed BEFORE the copy: a write while it is copied shows at the next check.
        tracker = None if changed else track(arr)
        try:
            shared = _copy_array(arr, backing)
        except BaseException:
            release(tracker)
            raise
        try:
            wr = weakref.ref(arr, lambda _r: self._drop(key))
        except TypeError:
            release(tracker)
            return shared, "copied"
        with self._lock:
            self._entries[key] = (wr, shared)
            if tracker is not None:
                self._trackers[key] = tracker
        return shared, "copied"

    def _same(self, arr: np.ndarray, shared: Shared, tracker: Tracker | None) -> bool:
        """Whether ``arr`` still holds its copy's bytes (the kernel's record where tracked)."""
        eq_all = lambda: _same_bytes(arr, shared)  # noqa: E731
        got = None if tracker is None else tracker.check(arr, shared.array, _parallel_equal, eq_all)
        same, self.bytes_compared = got if got is not None else (eq_all(), arr.nbytes)
        return same

    def owns(self, shared: Shared) -> bool:
        with self._lock:
            return any(s is shared for _, s in self._entries.values())

    def _drop(self, key: int, shared: Shared | None = None) -> None:
        """Drop ``key``'s entry (only if it still holds ``shared``, when given)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (shared is not None and entry[1] is not shared):
                return
            del self._entries[key]
            tracker = self._trackers.pop(key, None)
        release(tracker)
        entry[1].close()

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)


def _same_bytes(arr: np.ndarray, shared: Shared) -> bool:
    if arr.shape != shared.shape or arr.dtype != shared.dtype:
        return False
    view = shared.array
    if arr.nbytes == 0:
        return True
    if (arr.flags.c_contiguous and view.flags.c_contiguous) or (arr.flags.f_contiguous and view.flags.f_contiguous):
        return _parallel_equal(arr.ctypes.data, view.ctypes.data, arr.nbytes)
    # Compare bytes, not values: -0.0 == 0.0 and NaN payloads would let a
    # mutated array reuse a stale copy.  A same-size void view works on any strides.
    raw = np.dtype((np.void, arr.dtype.itemsize))
    return bool((arr.view(raw) == view.view(raw)).all())


def _parallel_equal(a: int, b: int, nbytes: int) -> bool:
    """memcmp of two address ranges, in parallel slices for big ones (cffi
    releases the GIL; the threads are joined before returning)."""
    threads = min(4, os.cpu_count() or 1)
    if nbytes < PARALLEL_COPY_BYTES or threads < 2:
        return ll.mem_equal(a, b, nbytes)
    cuts = [nbytes * k // threads for k in range(threads + 1)]
    same = [False] * threads

    def part(k: int) -> None:
        same[k] = ll.mem_equal(a + cuts[k], b + cuts[k], cuts[k + 1] - cuts[k])

    workers = [threading.Thread(target=part, args=(k,), name=f"shardc-cmp-{k}") for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return all(same)


default_cache = ShareCache()
