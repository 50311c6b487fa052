"""Facts about this machine and its processes (a leaf module)."""

from __future__ import annotations

import sys

#: Linux's /proc: the only platform whose process files shardc reads (macOS
#: has none; its paths never try, rather than reading and failing).
HAS_PROCFS = sys.platform.startswith("linux")


def is_zombie(pid: int) -> bool:
    """True if ``pid`` has exited but is not reaped (Linux /proc; False elsewhere)."""
    if not HAS_PROCFS:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")
