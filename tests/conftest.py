"""Shared test helpers: bounded fork helpers and a segment-leak check.

Every fork test goes through :class:`ForkedChild` (or :func:`fork_run`), which
waits on the child's pid with a deadline and SIGKILLs it on timeout, so no
test can hang on a stuck child.
"""

from __future__ import annotations

import gc
import multiprocessing.connection
import os
import select
import signal
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# A worker that never answers a call's setup makes the master wait this long
# (default 120 s, as long as pytest-timeout's limit): fail well before that,
# with shardc's own error, so a regression shows as a failure, not a hang.
os.environ.setdefault("SHARDC_SETUP_TIMEOUT", "45")


class ForkedChild:
    """A forked child running ``fn(conn)``; ``conn`` talks to the parent.

    The child reports ``("ok", value)`` or ``("err", traceback)`` and leaves
    with ``os._exit`` (no atexit handlers, no inherited buffers flushed).
    """

    def __init__(self, fn: Callable[[multiprocessing.connection.Connection], Any]) -> None:
        self.conn, child_conn = multiprocessing.Pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                self.conn.close()
                try:
                    child_conn.send(("ok", fn(child_conn)))
                    code = 0
                except BaseException:
                    child_conn.send(("err", traceback.format_exc()))
            finally:
                os._exit(code)
        child_conn.close()
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.exitcode: int | None = None

    def recv(self, timeout: float) -> Any:
        """The child's next message; AssertionError (child killed) on timeout or death."""
        if not self.conn.poll(timeout):
            self.kill()
            raise AssertionError(f"forked child {self.pid} sent nothing within {timeout} s (killed)")
        try:
            return self.conn.recv()
        except EOFError:
            code = self.join(timeout)
            raise AssertionError(f"forked child {self.pid} died without reporting (status {code})") from None

    def send(self, obj: Any) -> None:
        self.conn.send(obj)

    def join(self, timeout: float) -> int:
        """Wait for exit with a deadline; return the exit code (negative: signal)."""
        if self.exitcode is None:
            ready, _, _ = select.select([self.pidfd], [], [], timeout)
            if not ready:
                self.kill()
                raise AssertionError(f"forked child {self.pid} did not exit within {timeout} s (killed)")
            _, status = os.waitpid(self.pid, 0)
            self.exitcode = os.waitstatus_to_exitcode(status)
            self._cleanup()
        return self.exitcode

    def kill(self) -> None:
        if self.exitcode is None:
            os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            self.exitcode = os.waitstatus_to_exitcode(status)
            self._cleanup()

    def _cleanup(self) -> None:
        os.close(self.pidfd)
        self.conn.close()

    def result(self, timeout: float) -> Any:
        """The child's return value (raises with the child's traceback if it failed)."""
        status, value = self.recv(timeout)
        code = self.join(timeout)
        if status != "ok":
            raise AssertionError(f"forked child failed:\n{value}")
        assert code == 0, f"forked child exited with {code}"
        return value


def _fork_run(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run ``fn()`` in a forked child and return its (picklable) result.

    Raises AssertionError with the child's traceback if ``fn`` raised, or if the
    child did not finish within ``timeout`` seconds (it is then SIGKILLed).
    """
    return ForkedChild(lambda conn: fn()).result(timeout)


@pytest.fixture
def fork_run() -> Callable[..., Any]:
    """``fork_run(fn, timeout)``: run ``fn`` in a forked child, return its result."""
    return _fork_run


@pytest.fixture
def fork_child() -> Iterator[Callable[..., ForkedChild]]:
    """``fork_child(fn)`` starts a :class:`ForkedChild`; any left running is killed at teardown."""
    children: list[ForkedChild] = []

    def start(fn: Callable[[multiprocessing.connection.Connection], Any]) -> ForkedChild:
        children.append(ForkedChild(fn))
        return children[-1]

    yield start
    for child in children:
        child.kill()


@pytest.fixture
def no_segment_leak() -> Iterator[None]:
    """Fail the test if it leaves an open shardc segment behind."""
    from shardc import segment

    before = {s.key for s in segment.live_segments()}
    yield
    if any(s.key not in before for s in segment.live_segments()):
        gc.collect()  # only when needed: a full collection costs ~0.1 s
    leaked = [s for s in segment.live_segments() if s.key not in before]
    assert not leaked, f"test leaked segments: {leaked}"


# Test directories whose modules load big third-party libraries into this
# process (scikit-learn/SciPy, pyarrow/pandas/polars/DuckDB, Dask/Ray): they run
# after the engine's own tests.  Workers fork from this process, and a worker's
# memory (Pss_Anon) includes its share of the master's pages, so the engine's
# memory tests (mem_cap, recycling, inherited inputs) would otherwise measure
# whatever those libraries left in the master (seen: +60-100 MB per worker).
_HEAVY_DIRS = ("adapters", "tables", "cluster")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def heavy(item: pytest.Item) -> bool:
        parts = item.path.parts
        return len(parts) >= 2 and parts[-2] in _HEAVY_DIRS and parts[-3:-2] == ("tests",)

    items[:] = [i for i in items if not heavy(i)] + [i for i in items if heavy(i)]
