"""Registering the "shardc" joblib backend without importing joblib.

``import shardc`` calls :func:`install`: if ``joblib.parallel`` is already
imported the backend is registered at once; otherwise a one-shot import hook
(a ``sys.meta_path`` finder that looks at nothing but that one name)
registers it right after joblib loads it.  joblib has no entry point for
backends; :func:`register_joblib` registers explicitly.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

log = logging.getLogger("shardc")

_TARGET = "joblib.parallel"


def register_joblib() -> None:
    """Register shardc's joblib backend: ``joblib.parallel_config(backend="shardc")``.

    Raises:
        MissingDependencyError: joblib is not installed.
    """
    from .joblib_backend import register_joblib as _register

    _register()


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _TARGET:
            return None
        _remove()
        spec = importlib.util.find_spec(name)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            try:
                register_joblib()
            except Exception as exc:  # noqa: BLE001 - never break the user's import of joblib
                log.warning("shardc: could not register the joblib backend: %s", exc)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_hook = _Hook()


def _remove() -> None:
    try:
        sys.meta_path.remove(_hook)
    except ValueError:
        pass


def install() -> None:
    """Register now if joblib is loaded, else when it is."""
    if _TARGET in sys.modules:
        try:
            register_joblib()
        except Exception as exc:  # noqa: BLE001 - an old joblib: say so, keep shardc importable
            log.warning("shardc: could not register the joblib backend: %s", exc)
        return
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
