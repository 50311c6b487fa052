"""Shared-memory segments: the Python side of ``csrc/seg.c``.

A :class:`Segment` is a file descriptor of shared memory plus the mappings
made of it.  Backings (``backing=``, or the ``SHARDC_BACKING`` environment
variable when ``"auto"``):

========  ================================================================
memfd     Linux default.  Anonymous: nothing appears in /dev/shm, so a
          SIGKILLed master leaks nothing.  Can be sealed read-only.
shm       POSIX shm_open (the macOS default), unlinked at once unless the
          segment is *named* (``name=``, for ``buffer_open`` from another
          process); the creator owns the unlink.
file      A file in ``SHARDC_TMPDIR`` (default: the temp dir), unlinked at
          once unless named: for machines whose /dev/shm is tiny.
========  ================================================================

``"auto"`` tries memfd, then shm, then file, and logs why it fell back (e.g.
the segment does not fit in /dev/shm).  Portable mode (``SHARDC_PORTABLE=1``)
has no memfd, as on macOS: shm is the default there.  Every live segment of this process is
in a registry, so :func:`live_segments` (and ``segment_report()``) can list
them, and so :func:`find_address` can tell whether an array's memory already
lives in a shardc segment (then it is passed by reference, never copied).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import logging
import os
import re
import secrets
import sys
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

from . import _lowlevel as ll
from . import config, tmpdirs
from .errors import ClosedError, InvalidArgumentError, SegmentError

log = logging.getLogger("shardc")

BACKINGS = ("auto", "memfd", "shm", "file")
_CODES = {"memfd": ll.BACKING_MEMFD, "shm": ll.BACKING_SHM, "file": ll.BACKING_FILE}
_counter = itertools.count()
_TOKEN = secrets.token_hex(3)

# Live segments of this process, by key; and their primary mappings, sorted by
# address, for find_address().
_registry: weakref.WeakValueDictionary[str, Segment] = weakref.WeakValueDictionary()
_ranges: list[tuple[int, int, str]] = []  # (addr, end, key), sorted
# Called with a segment's key when it is closed explicitly (the pools use it
# to tell workers to let go of their mappings at once).
_close_hooks: list[Any] = []
_lock = threading.Lock()
# Keys of segments finalized since _lock was last taken: their ranges are
# dropped by the next holder (_registry_locked).  A finalizer must not take
# _lock itself: the cyclic GC can run it inside any allocation, including one
# made while this same thread holds _lock (Segment.__init__ inserting into
# _registry), and the lock is not reentrant: the worker hung there for good.
_dead_keys: deque[str] = deque()


# Set while this thread holds _lock: an explicit close() that the cyclic GC
# runs inside the locked section (a weakref callback closing a cached copy,
# seen deadlocking a test) must not take _lock again either.
_holder = threading.local()


@contextlib.contextmanager
def _registry_locked() -> Iterator[None]:
    """Hold _lock, with the ranges of segments finalized meanwhile dropped."""
    with _lock:
        _holder.held = True
        try:
            if _dead_keys:
                dead = set()
                while _dead_keys:
                    dead.add(_dead_keys.popleft())
                _ranges[:] = [r for r in _ranges if r[2] not in dead]
            yield
        finally:
            _holder.held = False


def default_backing() -> str:
    return config.get_str("SHARDC_BACKING")


def _tmpdir() -> str:
    return config.get_str("SHARDC_TMPDIR")


def _shm_free_bytes() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def backing_available(backing: str) -> bool:
    """Whether segments can use ``backing`` here.  Portable mode
    (``SHARDC_PORTABLE=1``) has no memfd, as on macOS."""
    if backing == "memfd" and config.get_bool("SHARDC_PORTABLE"):
        return False
    return bool(ll.seg_backing_supported(_CODES[backing]))


def _candidates(backing: str, size: int, named: bool) -> list[str]:
    if backing not in BACKINGS:
        raise InvalidArgumentError(f"backing={backing!r} is not supported; use one of {', '.join(BACKINGS)}")
    if backing != "auto":
        if not backing_available(backing):
            portable = config.get_bool("SHARDC_PORTABLE")
            where = "in portable mode (SHARDC_PORTABLE=1)" if portable else f"on {sys.platform}"
            raise InvalidArgumentError(f"backing={backing!r} is not available {where}")
        if backing == "memfd" and named:
            raise InvalidArgumentError(
                "a memfd segment cannot be named; use backing='shm' or 'file' "
                "for segments that other processes open by name"
            )
        return [backing]
    order = ["shm", "file"] if named else ["memfd", "shm", "file"]
    return [b for b in order if backing_available(b)]


class Segment:
    """A shared-memory segment (fd + size + backing), owned by its creator.

    Use :meth:`create` or :meth:`open`; :meth:`close` is idempotent and the
    creator of a named segment unlinks it.  ``map()`` returns a
    :class:`shardc._lowlevel.Mapping` that stays valid while referenced.
    """

    def __init__(self, fd: int, size: int, backing: str, name: str, key: str, owner: bool, persistent: bool) -> None:
        self.fd = fd
        self.size = size
        self.backing = backing
        self.name = name
        self.key = key
        self.owner = owner
        self.persistent = persistent
        self.sealed = False
        self._mapping: ll.Mapping | None = None
        self._mapping_flags = 0
        self._closed = False
        self._pid = os.getpid()
        with _registry_locked():
            _registry[key] = self
        self._finalizer = weakref.finalize(self, _finalize, fd, backing, name, owner and persistent, key, self._pid)

    # -- construction -------------------------------------------------------
    @classmethod
    def create(cls, size: int, backing: str = "auto", name: str | None = None, label: str = "buf") -> Segment:
        """Create a segment of ``size`` bytes (zero-filled).

        Args:
            size: bytes (>= 0).
            backing: "auto", "memfd", "shm" or "file".
            name: make the segment *named* (persistent until the owner closes
                it), so another process can open it.  For shm a name like
                "mydata" becomes "/mydata"; for file it is a path.
            label: a short tag used in anonymous segment names (debugging).

        Raises:
            InvalidArgumentError: bad size or backing.
            SegmentError: the OS refused (message names segment and hint);
                ENOSPC up front if backing="shm" cannot fit in /dev/shm.
        """
        if not isinstance(size, int) or size < 0:
            raise InvalidArgumentError(f"segment size must be a non-negative int, got {size!r}")
        named = name is not None
        if not isinstance(backing, str):
            # Before any == on it: an array would answer elementwise.
            raise InvalidArgumentError(f"backing={backing!r} is not supported; use one of {', '.join(BACKINGS)}")
        if backing == "auto":
            backing = default_backing()
            if backing == "memfd" and named:
                backing = "auto"  # SHARDC_BACKING is a default; a name needs shm or file
        errors: list[str] = []
        key = f"{os.getpid()}.{_TOKEN}.{next(_counter)}"
        for b in _candidates(backing, size, named):
            path = _segment_path(b, name, key, label)
            if b == "shm":
                free = _shm_free_bytes()
                if free is not None and size > free and backing != "auto":
                    # tmpfs would accept the ftruncate and SIGBUS on first touch.
                    raise SegmentError(
                        errno.ENOSPC,
                        f"create failed for segment {path!r}: "
                        f"{size} bytes do not fit in /dev/shm ({free} bytes free) "
                        "(hint: use backing='file' or set SHARDC_BACKING=file)",
                    )
                if free is not None and size > free:
                    errors.append(f"shm: {size} bytes do not fit in /dev/shm ({free} free)")
                    log.info("segment of %d bytes does not fit in /dev/shm (%d bytes free); falling back", size, free)
                    continue
            try:
                try:
                    fd = ll.seg_create(_CODES[b], path, size, named)
                except SegmentError as exc:
                    if exc.errno == errno.ENOENT and b == "file":
                        # The generic ENOENT hint ("unlinked by its owner?") is about opening.
                        where = "SHARDC_TMPDIR" if name is None else "name="
                        raise SegmentError(
                            errno.ENOENT,
                            f"create failed for segment {path!r}: directory "
                            f"{os.path.dirname(path)!r} does not exist (hint: point "
                            f"{where} at an existing directory)",
                        ) from None
                    raise
            except SegmentError as exc:
                if backing != "auto":
                    raise
                errors.append(f"{b}: {exc}")
                log.warning("creating a %s segment of %d bytes failed (%s); trying the next backing", b, size, exc)
                continue
            if errors:
                log.warning("segment %s uses backing %r after: %s", path, b, "; ".join(errors))
            if named:
                _manifest_add(b, path)
            return cls(fd, size, b, path, key, owner=True, persistent=named)
        raise SegmentError(
            errno.ENOSPC, f"could not create a segment of {size} bytes with any backing: " + "; ".join(errors)
        )

    @classmethod
    def open(cls, name: str, backing: str = "shm", writable: bool = True) -> Segment:
        """Open a named segment created by another process (not the owner)."""
        if not isinstance(backing, str) or backing not in ("shm", "file"):
            raise InvalidArgumentError(f"only 'shm' and 'file' segments can be opened by name, got backing={backing!r}")
        path = _segment_path(backing, name, "", "")
        fd, size = ll.seg_open(_CODES[backing], path, writable)
        key = f"open.{os.getpid()}.{_TOKEN}.{next(_counter)}"
        return cls(fd, size, backing, path, key, owner=False, persistent=True)

    @classmethod
    def adopt(cls, fd: int, size: int, backing: str, name: str, key: str) -> Segment:
        """Wrap an fd received from the master (workers): not the owner."""
        return cls(fd, size, backing, name, key, owner=False, persistent=False)

    # -- use ---------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"segment {self.name!r} is closed")

    def map(self, writable: bool = True, private: bool = False, populate: bool = False) -> ll.Mapping:
        """Map the whole segment; a new mapping each call (see :meth:`mapping`)."""
        self._check_open()
        flags = (ll.MAP_WRITE if writable else 0) | (ll.MAP_PRIVATE if private else 0)
        flags |= ll.MAP_POPULATE if populate else 0
        return ll.map_segment(self.fd, 0, self.size, flags, self.name)

    def mapping(self, writable: bool = True) -> ll.Mapping:
        """The segment's primary shared mapping (created once, registered for
        :func:`find_address`)."""
        self._check_open()
        if self._mapping is None:
            self._mapping = self.map(writable=writable)
            self._mapping_flags = int(writable)
            with _registry_locked():
                bisect.insort(_ranges, (self._mapping.addr, self._mapping.addr + self.size, self.key))
        return self._mapping

    def seal(self) -> bool:
        """Seal against writes and resizing (memfd); False if unsupported."""
        self._check_open()
        if self.backing != "memfd":
            # Only memfds are created sealable: a tmpfs (shm) fd carries
            # F_SEAL_SEAL from birth, so F_ADD_SEALS fails with EPERM there.
            return False
        self.sealed = ll.seg_seal(self.fd, self.name)
        return self.sealed

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the fd (and unlink a named segment this process owns).

        Idempotent.  Arrays already built on a mapping stay valid: the memory
        is released when the last of them is gone.
        """
        if self._closed:
            return
        self._closed = True
        if self._mapping is not None:
            if getattr(_holder, "held", False):
                _dead_keys.append(self.key)  # inside this thread's locked section: the next holder drops it
            else:
                with _registry_locked():
                    try:
                        _ranges.remove((self._mapping.addr, self._mapping.addr + self.size, self.key))
                    except ValueError:
                        pass
            self._mapping = None
        self._finalizer()
        for hook in _close_hooks:
            hook(self.key)

    def info(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "backing": self.backing,
            "size": self.size,
            "owner": self.owner,
            "named": self.persistent,
            "sealed": self.sealed,
            "closed": self._closed,
        }

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"<shardc.Segment {self.name!r} {self.backing} {self.size} bytes {state}>"


def _segment_path(backing: str, name: str | None, key: str, label: str) -> str:
    if backing == "memfd":
        return f"shardc.{label}.{key}"
    if backing == "shm":
        if name is not None:
            return name if name.startswith("/") else "/" + name
        # macOS limits shm names to 31 characters.
        return f"/shardc.{key}"[:31]
    if name is not None:
        return os.path.abspath(name)
    return os.path.join(_tmpdir(), f"shardc.{label}.{key}")


def _finalize(fd: int, backing: str, name: str, unlink: bool, key: str, pid: int) -> None:
    # Forget the primary mapping's address range: once the segment is gone
    # the range may be unmapped and reused by a new segment, and a stale
    # entry at the same address would hide the live one from find_address.
    _dead_keys.append(key)  # (deque.append: atomic, no lock; see _dead_keys)
    if os.getpid() != pid:
        return  # a forked child's copy: the fd is the parent's business
    try:
        ll.seg_close_fd(fd)
    except OSError:
        pass
    if unlink:
        try:
            ll.seg_unlink(_CODES[backing], name)
        except OSError:
            pass
        _manifest_remove(backing, name)


# -- cleaning up after dead masters ---------------------------------------------------------
#
# memfd segments vanish with their last fd, and anonymous shm/file segments
# are unlinked right after creation, so a SIGKILLed master normally leaves
# nothing.  Two things can remain: an anonymous shm/file segment whose master
# died in the microseconds between create and unlink, and *named* segments
# (buffer(name=...)), which outlive their creator by design while it lives
# but have no owner once it died.  Named segments are listed in a per-process
# owner file; janitor() removes what dead masters left behind.

_ANON_SHM = re.compile(r"^shardc\.(\d+)\.[0-9a-f]+\.\d+$")
_ANON_FILE = re.compile(r"^shardc\.\w+\.(\d+)\.[0-9a-f]+\.\d+$")
_janitor_ran = False


def _owners_dir() -> str:
    return os.path.join(_tmpdir(), f"shardc-owners-{os.getuid()}")


def _owner_file() -> str:
    return os.path.join(_owners_dir(), f"{os.getpid()}.{_TOKEN}")


def _manifest_add(backing: str, path: str) -> None:
    try:
        os.makedirs(_owners_dir(), mode=0o700, exist_ok=True)
        with open(_owner_file(), "a") as f:
            f.write(f"{backing}\t{path}\n")
    except OSError as exc:
        log.warning("could not record named segment %s for cleanup after a crash: %s", path, exc)


def _manifest_remove(backing: str, path: str) -> None:
    fname = _owner_file()
    try:
        with open(fname) as f:
            lines = [ln for ln in f if ln.rstrip("\n") != f"{backing}\t{path}"]
        if lines:
            with open(fname, "w") as f:
                f.writelines(lines)
        else:
            os.unlink(fname)
            try:
                os.rmdir(_owners_dir())  # only succeeds when no other process has an owner file
            except OSError:
                pass
    except OSError:
        pass


def _pid_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def janitor() -> list[str]:
    """Remove shm/file segments and owned temporary directories
    (:mod:`shardc.tmpdirs`) left by dead shardc masters of this user.

    Runs once per process when the first pool starts (and can be called any
    time).  Returns the names removed; each is logged.
    """
    global _janitor_ran
    _janitor_ran = True
    removed: list[str] = []
    uid = os.getuid()
    places = [("/dev/shm", _ANON_SHM), (_tmpdir(), _ANON_FILE)]
    for folder, pattern in places:
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            m = pattern.match(entry)
            if not m or not _pid_dead(int(m.group(1))):
                continue
            full = os.path.join(folder, entry)
            try:
                if os.stat(full).st_uid != uid:
                    continue
                os.unlink(full)
                removed.append(full)
            except OSError:
                pass
    try:
        owners = os.listdir(_owners_dir())
    except OSError:
        owners = []
    for fname in owners:
        try:
            pid = int(fname.split(".", 1)[0])
        except ValueError:
            continue
        if not _pid_dead(pid):
            continue
        full = os.path.join(_owners_dir(), fname)
        try:
            with open(full) as f:
                for line in f:
                    backing, _, path = line.rstrip("\n").partition("\t")
                    if backing in ("shm", "file") and path:
                        try:
                            ll.seg_unlink(_CODES[backing], path)
                            removed.append(path)
                        except OSError:
                            pass
            os.unlink(full)
        except OSError:
            pass
    if owners:
        try:
            os.rmdir(_owners_dir())
        except OSError:
            pass
    removed += tmpdirs.sweep()  # temporary directories (e.g. tables' part files) of dead masters
    for name in removed:
        log.info("janitor: removed %s, left behind by a shardc process that died", name)
    return removed


def run_janitor_once() -> None:
    if not _janitor_ran:
        try:
            janitor()
        except Exception as exc:  # noqa: BLE001 - cleanup must never break a start
            log.debug("janitor failed: %s", exc)


def live_segments() -> list[Segment]:
    """Every open segment of this process."""
    return [s for s in list(_registry.values()) if not s.closed and s._pid == os.getpid()]


def live_segment(key: str) -> Segment | None:
    """The open segment with ``key`` in this process, or None (closed or collected)."""
    seg = _registry.get(key)
    return None if seg is None or seg.closed else seg


def find_address(addr: int, nbytes: int) -> tuple[Segment, int] | None:
    """If ``[addr, addr+nbytes)`` lies in a primary mapping of a live segment,
    return ``(segment, offset)``; else None."""
    with _registry_locked():
        i = bisect.bisect_right(_ranges, (addr, float("inf"), "")) - 1
        if i < 0:
            return None
        start, end, key = _ranges[i]
    if start <= addr and addr + nbytes <= end:
        seg = _registry.get(key)
        if seg is not None and not seg.closed:
            return seg, addr - start
    return None
