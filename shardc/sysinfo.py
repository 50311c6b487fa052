"""Facts about this machine and its processes (a leaf module)."""

from __future__ import annotations

import errno
import os
import sys
import threading

#: Linux's /proc: the only platform whose process files shardc reads (macOS
#: has none; its paths never try, rather than reading and failing).
HAS_PROCFS = sys.platform.startswith("linux")

# Open /proc/PID/<file> descriptors, read again with pread: opening a /proc
# path costs ~4x the read itself (~12 vs ~3 us on the CI VMs), and the master
# reads its workers' statm and stat files on every call.  A descriptor names
# the process it was opened for, not its pid: once that process is reaped a
# read fails with ESRCH, and a new process with the same pid is opened afresh.
_MAX_OPEN = 64  # descriptors kept (the oldest is closed first)
_open: dict[tuple[int, str], int] = {}
_lock = threading.Lock()  # (the reads run without the GIL: no close may race one)


def _forget_all() -> None:
    """A forked child: the descriptors name the parent's view; close them."""
    global _lock
    _lock = threading.Lock()
    for fd in _open.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _open.clear()


os.register_at_fork(after_in_child=_forget_all)


def _drop(key: tuple[int, str]) -> None:
    fd = _open.pop(key, None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def proc_read(pid: int, name: str, size: int = 4096) -> bytes | None:
    """The contents of ``/proc/PID/NAME`` (Linux; at most ``size`` bytes), None
    if the process is gone (or on a platform without /proc).

    Raises:
        OSError: the file exists but cannot be read (e.g. EMFILE, EACCES).
    """
    if not HAS_PROCFS:
        return None
    key = (pid, name)
    with _lock:
        for _attempt in range(2):
            fd = _open.get(key)
            fresh = fd is None
            if fd is None:
                try:
                    fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
                except (FileNotFoundError, ProcessLookupError):
                    return None
                if len(_open) >= _MAX_OPEN:
                    _drop(next(iter(_open)))
                _open[key] = fd
            try:
                return os.pread(fd, size, 0)
            except OSError as exc:
                _drop(key)
                if exc.errno != errno.ESRCH:
                    raise
                if fresh:
                    return None  # gone
                # The process the descriptor named is gone; the pid may be a new one's: open again.
        return None


def is_zombie(pid: int) -> bool:
    """True if ``pid`` has exited but is not reaped (Linux /proc; False elsewhere)."""
    try:
        stat = proc_read(pid, "stat")
    except OSError:
        return False
    if stat is None:
        return False
    at = stat.rfind(b")") + 2
    return stat[at : at + 1] in (b"Z", b"X")
