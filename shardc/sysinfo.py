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
