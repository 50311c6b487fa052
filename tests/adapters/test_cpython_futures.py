"""CPython's own executor tests (``test_concurrent_futures``) run against
:class:`shardc.Executor`: ``ExecutorTest`` + ``ProcessPoolExecutorTest``,
``WaitTests`` and ``AsCompletedTests``, with a mixin of ours in place of the
``ProcessPool*Mixin`` (shardc forks its workers; there is no ``mp_context``).

The peer file is read at test time from a path, never copied here: this
interpreter's stdlib ships without it, so ``tools/get_cpython_futures_tests.sh``
extracts it from Debian's ``libpython3.11-testsuite`` (3.11.2: the 3.11 line's
file, the same tests as 3.11.7's for these classes).  ``SHARDC_CPYTHON_FUTURES``
overrides the path.  Each expected failure is listed in ``XFAIL`` with why.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any

import pytest

import shardc

# A peer project's own suite: its own CI step (.ci/run), not the core run (-m peer_suite).
pytestmark = pytest.mark.peer_suite

DEFAULT = "/tmp/shardc-peer/cpython/usr/lib/python3.11/test/test_concurrent_futures.py"
PATH = Path(os.environ.get("SHARDC_CPYTHON_FUTURES", DEFAULT))

if sys.version_info[:2] != (3, 11):
    pytest.skip("the peer file is CPython 3.11's", allow_module_level=True)
if not PATH.exists():
    if os.environ.get("CI"):  # CI fetches it (.ci/run): a missing file there is a failure, not a skip
        raise FileNotFoundError(f"CPython's test_concurrent_futures.py is not at {PATH}")
    pytest.skip(
        f"CPython's test_concurrent_futures.py is not at {PATH}: run tools/get_cpython_futures_tests.sh",
        allow_module_level=True,
    )


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("cpython_test_concurrent_futures", PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its functions and classes pickle by reference (workers fork with it)
    spec.loader.exec_module(mod)
    return mod


peer = _load()

_DESIGN = "shardc retries a task whose worker died instead of breaking the executor (by design)"
_INTERNALS = "reads ProcessPoolExecutor internals (executor._processes), which shardc.Executor does not have"
XFAIL = {
    "test_traceback": (
        "the cause is shardc.errors.RemoteTraceback, not concurrent.futures.process._RemoteTraceback "
        "(same text; the test checks the exact private class)"
    ),
    "test_killed_child": _DESIGN + "; " + _INTERNALS,
    "test_saturation": _INTERNALS,
    "test_max_tasks_per_child": "no max_tasks_per_child argument (shardc recycles on memory, not on task count)",
    "test_max_tasks_per_child_defaults_to_spawn_context": "no max_tasks_per_child / _mp_context (shardc always forks)",
}


class ShardcMixin(peer.ExecutorMixin):  # type: ignore[misc,name-defined]
    """``ProcessPoolForkMixin``'s place: shardc.Executor, no ``ctx`` (so no ``mp_context=``)."""

    executor_type = shardc.Executor
    worker_count = 5  # the peer tests assume 4 or 5

    def get_context(self) -> Any:
        return mp.get_context("fork")  # for tests that build their own Manager/Semaphore


class TestShardcExecutor(ShardcMixin, peer.ProcessPoolExecutorTest, peer.BaseTestCase):  # type: ignore[misc,name-defined]
    pass


class TestShardcWait(ShardcMixin, peer.WaitTests, peer.BaseTestCase):  # type: ignore[misc,name-defined]
    pass


class TestShardcAsCompleted(ShardcMixin, peer.AsCompletedTests, peer.BaseTestCase):  # type: ignore[misc,name-defined]
    pass
