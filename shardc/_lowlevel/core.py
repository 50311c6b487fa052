"""The only module that imports ``shardc._native`` (the cffi extension).

Everything native goes through here: thin wrappers that call one C function,
and one choke point, :func:`_check`, that turns the C layer's ``-errno``
return codes into Python exceptions with the operation, the object's name and
a targeted hint where the OS limit is a known one.  The class says which
primitive failed: ``seg.c`` -> ``SegmentError``, ``queue.c`` -> ``QueueError``,
``guard.c`` -> ``GuardError``, ``proc.c`` -> ``ShardcOSError`` (all OSErrors).

The module also checks the build stamp at import: a native module compiled
from other C sources than the ones beside this package (an editable install
whose ``csrc/`` changed) refuses to load with a message saying how to rebuild.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import _stamp, config
from .._version import __version__
from ..errors import (
    GuardError,
    NativeModuleError,
    SegmentError,
    ShardcOSError,
)

try:
    from .._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    _src = Path(__file__).resolve().parent.parent.parent / "csrc"
    if _src.is_dir():
        _why = (
            f"this is shardc's source tree ({_src.parent}), which has no compiled module: "
            "build it here with `pip install -e .`, or run from another directory to use an "
            "installed shardc"
        )
    else:
        _why = "reinstall shardc (`pip install --force-reinstall shardc`)"
    raise NativeModuleError(
        f"shardc's native module (shardc._native) is missing or failed to load: {exc}; {_why}"
    ) from exc


def _check_stamp() -> None:
    built = ffi.string(lib.shardc_build_stamp()).decode()
    if not built.startswith(__version__ + "+"):
        raise NativeModuleError(
            f"stale shardc native module: it was built for shardc {built.split('+')[0]}, "
            f"but the Python package is {__version__}. Rebuild with `pip install -e .`."
        )
    csrc = Path(__file__).resolve().parent.parent.parent / "csrc"
    if (csrc / "ffi_build.py").is_file() and not config.get_bool("SHARDC_SKIP_STAMP_CHECK"):
        expected = _stamp.compute_stamp(csrc, __version__)
        if expected != built:
            raise NativeModuleError(
                f"stale shardc native module: built from C sources {built}, but {csrc} now "
                f"hashes to {expected}. Rebuild with `pip install -e .` "
                "(set SHARDC_SKIP_STAMP_CHECK=1 to load it anyway)."
            )


_check_stamp()


def build_stamp() -> str:
    """The stamp compiled into the native module (``"<version>+<hash>"``)."""
    return str(ffi.string(lib.shardc_build_stamp()).decode())


PAGE_SIZE: int = int(lib.shardc_page_size())


def _check(rc: int, op: str, name: str | None = None, error: type[ShardcOSError] = SegmentError) -> int:
    """Return ``rc`` if it is >= 0, else raise ``error`` for ``-rc``.

    Args:
        rc: return value of a C function (``>= 0`` success, ``-errno`` failure).
        op: the operation, for the message ("mmap", "ftruncate", ...).
        name: the object the operation was on (segment name, input name), if any.
        error: the class of the primitive the call belongs to (see the module
            docstring); its ``subject`` and ``hints`` shape the message.

    Raises:
        ShardcOSError: ``error``, an ``OSError`` subclass with ``errno`` set.
    """
    if rc >= 0:
        return rc
    code = -rc
    on = f" for {error.subject} {name!r}" if error.subject else f" for {name!r}"
    msg = f"{op} failed" + (on if name else "") + f": {os.strerror(code)}"
    hint = error.hints.get(code)
    if hint:
        msg += f" (hint: {hint})"
    raise error(code, msg)


def _gcheck(rc: int, op: str, name: str | None = None) -> int:
    """:func:`_check` for the page guards."""
    return _check(rc, op, name, GuardError)
