"""Helpers shared by the public-API engine tests (test_map.py, test_supervision.py).

Kept out of conftest.py (owned by others): each test file imports what it needs
and defines its own autouse fixture with :func:`assert_no_stray_children`.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import time
from typing import Any

import psutil
import pytest

import shardc


def pool_pids(pool: Any = None) -> set[int]:
    """Pids of the live workers of ``pool`` (default: the default pool), and
    of its fork server if it has one (shardc.forkserver)."""
    p = pool if pool is not None else shardc.pool_get()
    if p is None or p.closed:
        return set()
    server = {p._server.pid} if p._server is not None and not p._server.dead else set()
    return {w.pid for w in p.workers} | server


def fd_targets(pid: int) -> list[str]:
    """What the open fds of process ``pid`` point at. A worker may open and close a file
    (a /proc read) while we list its fds: an fd that vanishes between listdir and readlink
    is skipped."""
    fd_dir = f"/proc/{pid}/fd"
    out = []
    for fd in os.listdir(fd_dir):
        try:
            out.append(os.readlink(f"{fd_dir}/{fd}"))
        except OSError:
            continue
    return out


def _resource_tracker(c: psutil.Process) -> bool:
    """multiprocessing's (or loky's) resource tracker: one per process that used
    them (the peer tests of tests/adapters), alive until the interpreter exits."""
    try:
        return any("resource_tracker import main" in a for a in c.cmdline())
    except psutil.Error:
        return False


def children() -> set[int]:
    """Pids of every live descendant of this process (zombies included), but
    not a peer library's resource tracker (see _resource_tracker)."""
    return {c.pid for c in psutil.Process().children(recursive=True) if not _resource_tracker(c)}


def assert_no_stray_children(allowed: set[int] | None = None, deadline_s: float = 3.0) -> None:
    """Every descendant of this process must be a live worker of the default pool.

    Waits (bounded by ``deadline_s``) for processes that are already on their
    way out, then fails naming the strays.
    """
    end = time.monotonic() + deadline_s
    while True:
        ok = pool_pids() | (allowed or set())
        stray = children() - ok
        if not stray or time.monotonic() > end:
            break
        psutil.wait_procs([psutil.Process(p) for p in stray if psutil.pid_exists(p)], timeout=0.05)
    info = []
    for pid in stray:
        try:
            pr = psutil.Process(pid)
            info.append(f"{pid} ({pr.status()}, {' '.join(pr.cmdline())[:60]!r})")
        except psutil.Error:
            info.append(str(pid))
    assert not stray, f"stray child processes left behind: {info}"


def _unread_bytes(sock: Any) -> int:
    """Bytes this end sent that the peer has not read yet (SIOCOUTQ on AF_UNIX)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def drain(pool: Any = None, timeout: float = 5.0) -> None:
    """Wait until every worker of ``pool`` has read all the master sent it.

    Works around an engine race (see test_map.py::test_new_segment_right_after_end):
    when a worker reads the previous call's "end" together with the next
    "call", the fds of "call" are attached to "end" and setup fails with a
    KeyError.  Tests that are not about that race call this between calls.
    """
    p = pool if pool is not None else shardc.pool_get()
    if p is None or p.closed:
        return
    end = time.monotonic() + timeout
    for w in p.workers:
        while w.alive and time.monotonic() < end:
            try:
                if _unread_bytes(w.chan.sock) == 0:
                    break
            except OSError:
                break
            time.sleep(0.0005)


# -- fixtures shared by the engine test files (imported there by name) --------------------


@pytest.fixture(autouse=True)
def no_stray_children():
    """After each test only the default pool's live workers may remain."""
    yield
    drain()
    assert_no_stray_children()


@pytest.fixture
def pool2():
    """A default pool of 2 workers (created fresh if the current one differs)."""
    p = shardc.pool_get()
    if p is None or p.size != 2 or p.packages or p.init_expr is not None:
        p = shardc.pool_create(2)
    drain(p)
    return p


class RecordingChan:
    """A worker's channel in unit tests: records what it sends (``send`` and the
    pre-pickled ``send_bytes`` path, unpickled), and has nothing to receive."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, msg: Any, fds: Any = None) -> int:
        self.sent.append(msg)
        return 0

    def send_bytes(self, payload: bytes, fds: Any = None) -> int:
        import pickle

        self.sent.append(pickle.loads(payload))  # noqa: S301 - our own worker's bytes
        return 0

    def poll_nonblocking(self) -> list[Any]:
        return []
