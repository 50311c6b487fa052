"""Peer suites run against shardc: each module may list the peer tests it
expects to fail, with the reason, in ``XFAIL = {test name: reason}``; they
are marked ``xfail(strict=True)`` here, so a test that starts passing shows."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A peer module with KEEP_ONLY = name: keep only its cases parametrized with that backend.
    keep, dropped = [], []
    for item in items:
        only = getattr(getattr(item, "module", None), "KEEP_ONLY", None)
        (keep if only is None or _runs_backend(item, only) else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    for item in items:
        table = getattr(item.module, "XFAIL", None) if hasattr(item, "module") else None
        if not table:
            continue
        name = item.name.split("[", 1)[0]
        key = f"{item.cls.__name__}.{name}" if item.cls is not None else name
        reason = table.get(item.name, table.get(key, table.get(name)))
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


def _runs_backend(item: pytest.Item, name: str) -> bool:
    spec = getattr(item, "callspec", None)
    if spec is None:
        return False
    return any(v == name or type(v).__name__ == "ShardcBackend" for v in spec.params.values())


@pytest.fixture(autouse=True, scope="module")
def _stop_helper_processes():
    """After each module: stop what the peers keep alive on purpose (loky's
    reusable executor; their resource trackers live on, see
    tests/_engine_helpers.children) and
    the joblib backend's cached shardc pool, so the engine tests that follow
    (which check that no stray child process is left) start clean."""
    yield
    import sys

    backend = sys.modules.get("shardc.joblib_backend")
    if backend is not None and backend._cached is not None:
        backend._cached.stop()
        backend._cached = None
    if "joblib" in sys.modules:
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
