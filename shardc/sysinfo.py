"""Facts about this machine and its processes (a leaf module)."""

from __future__ import annotations

import os
import sys

#: Linux's /proc: the only platform whose process files shardc reads (macOS
#: has none; its paths never try, rather than reading and failing).
HAS_PROCFS = sys.platform.startswith("linux")


def is_zombie(pid: int) -> bool:
    """True if ``pid`` has exited but is not reaped (Linux /proc; False elsewhere)."""
    if not HAS_PROCFS:
        return False
    try:  # os-level calls: open() adds an fstat, an ioctl and a seek (asked per worker per call)
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return False
    try:
        stat = os.read(fd, 4096)
    except OSError:
        return False
    finally:
        os.close(fd)
    at = stat.rfind(b")") + 2
    return stat[at : at + 1] in (b"Z", b"X")


class ProcState:
    """:func:`is_zombie` for one process, through a descriptor of its
    ``/proc/PID/stat`` kept open (a ``pread`` per question, ~1 us, where an
    open, read and close cost ~8 us: asked per worker at every call's start).
    The descriptor belongs to that process, not its pid: once it is reaped a
    read fails (a reused pid is never read), and the answer is False, as
    :func:`is_zombie` answers for a process that is gone."""

    __slots__ = ("fd", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = -1

    def zombie(self) -> bool:
        if not HAS_PROCFS:
            return False
        if self.fd < 0:
            try:
                self.fd = os.open(f"/proc/{self.pid}/stat", os.O_RDONLY)
            except OSError:
                return False
        try:
            stat = os.pread(self.fd, 4096, 0)
        except OSError:
            self.close()
            return False
        at = stat.rfind(b")") + 2
        return stat[at : at + 1] in (b"Z", b"X")

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()
