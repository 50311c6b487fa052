"""Test-only fault injection: a chosen native call fails with ``-errno`` on its Nth call.

Machine-wide limits (a full ``/dev/shm``, ``ulimit -n``, ``vm.max_map_count``)
are a poor way to test what shardc does when the OS says no: they hit every
process and are hard to aim.  :func:`inject` aims instead: the wrappers of
this package call the native module through their module global ``lib``;
while a fault is armed that global is a proxy that, on the ``nth`` call of
the named C function, returns ``-errno`` *without calling C* (so nothing was
created that the caller could leak), and otherwise calls through.  Disarmed
(after :func:`clear`, or once every armed fault fired), the wrappers hold the
real module again and pay nothing.  A worker forked while a fault is armed
inherits it.

Not for production use: nothing in shardc calls it.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable
from typing import Any

from ..errors import InvalidArgumentError
from . import core, guard, proc, queue, seg, status

_WRAPPERS = (seg, queue, status, guard, proc, core)


class _Fault:
    __slots__ = ("err", "nth", "times", "calls", "fired")

    def __init__(self, err: int, nth: int, times: int) -> None:
        self.err, self.nth, self.times, self.calls, self.fired = err, nth, times, 0, 0


class _FaultyLib:
    """Forwards to the native ``lib``; armed functions fail on schedule."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._armed: dict[str, _Fault] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._real, name)
        fault = self._armed.get(name)
        if fault is None or not callable(attr):
            return attr

        def call(*args: Any) -> Any:
            fault.calls += 1
            if fault.calls >= fault.nth and fault.fired < fault.times:
                fault.fired += 1
                return -fault.err
            return attr(*args)

        return call


_proxy: _FaultyLib | None = None


def inject(function: str, err: int | str, nth: int = 1, times: int = 1) -> None:
    """Make C function ``function`` (e.g. ``"shardc_seg_create"``) return
    ``-err`` on its ``nth`` call from now, and on the ``times - 1`` calls after.

    Args:
        function: the C function's name, as in the cdef.
        err: an errno number or name ("ENOSPC", "EMFILE", "ENOMEM", "EINTR").
        nth: which call fails first (1 = the next one).
        times: how many consecutive calls fail.
    """
    global _proxy
    code = getattr(_errno, err) if isinstance(err, str) else int(err)
    if not callable(getattr(core.lib, function, None)):
        raise InvalidArgumentError(f"no native function {function!r}")
    if nth < 1 or times < 1:
        raise InvalidArgumentError("nth and times must be >= 1")
    if _proxy is None:
        _proxy = _FaultyLib(core.lib)
        for mod in _WRAPPERS:
            mod.lib = _proxy  # type: ignore[attr-defined]
    _proxy._armed[function] = _Fault(code, nth, times)


def fired(function: str) -> int:
    """How many injected failures of ``function`` have fired."""
    f = _proxy._armed.get(function) if _proxy is not None else None
    return f.fired if f is not None else 0


def clear() -> None:
    """Disarm every fault: the wrappers call the native module directly again."""
    global _proxy
    if _proxy is None:
        return
    real = _proxy._real
    for mod in _WRAPPERS:
        mod.lib = real  # type: ignore[attr-defined]
    _proxy = None


def armed(function: str, err: int | str, nth: int = 1, times: int = 1) -> Callable[[], None]:
    """:func:`inject`, returning :func:`clear` (for ``try/finally`` or ``addfinalizer``)."""
    inject(function, err, nth, times)
    return clear
