"""Facts about this machine and its processes (a leaf module)."""

from __future__ import annotations


def is_zombie(pid: int) -> bool:
    """True if ``pid`` has exited but is not reaped (Linux /proc; False elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")
