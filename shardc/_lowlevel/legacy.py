"""The legacy generators' fingerprint (csrc/legacy.c), for lazy seeding.

:func:`legacy_watch` finds where the two legacy global generators keep
their Mersenne Twister state (NumPy's ``MT19937`` behind ``np.random``, from
its own ``ctypes.state_address``; CPython's ``random.Random`` object, by
matching its memory against ``getstate()``), checks the layout against
what each reports, and starts watching; it returns the C function that says
whether either state changed since its last call.  Anything unexpected
(another bit generator, another layout, another interpreter) returns None
and the caller seeds eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .core import ffi, lib

_MT_N = 624


def _numpy_state(bitgen: Any) -> tuple[int, int] | None:
    """(key address, pos address) of an ``MT19937``, if its memory is what its state says."""
    try:
        st = bitgen.state
        if st.get("bit_generator") != "MT19937":
            return None
        key, pos = list(st["state"]["key"]), int(st["state"]["pos"])
        addr = int(bitgen.ctypes.state_address)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    p = ffi.cast("uint32_t *", addr)
    if list(ffi.unpack(p, _MT_N)) != key or ffi.cast("int *", p + _MT_N)[0] != pos:
        return None
    return addr, addr + 4 * _MT_N


def _python_state(rnd: Any) -> tuple[int, int] | None:
    """(key address, index address) of a ``random.Random``: CPython keeps
    ``int index; uint32_t state[624]`` after the object header; found by
    matching the words against ``getstate()`` inside the base type's size."""
    import _random

    try:
        version, words, _gauss = rnd.getstate()
        base = _random.Random.__basicsize__
    except (AttributeError, TypeError, ValueError):
        return None
    if version != 3 or len(words) != _MT_N + 1 or not isinstance(rnd, _random.Random):
        return None
    want = [words[_MT_N], *words[:_MT_N]]
    p = ffi.cast("uint32_t *", id(rnd))
    span = (base - 4 * len(want)) // 4  # word offsets that keep the read inside the object
    if span < 2:
        return None
    have = list(ffi.unpack(p, span + len(want)))
    for off in range(2, span + 1):  # past the refcount and the type pointer
        if have[off : off + len(want)] == want:
            addr = id(rnd) + 4 * off
            return addr + 4, addr
    return None


def legacy_watch(np_bitgen: Any, py_random: Any) -> Callable[[], int] | None:
    """Watch both generators' states (the caller keeps the two objects alive);
    returns ``changed()`` (1 if either state changed since its last call,
    taking the fingerprint again), or None where either layout is not the
    one checked for."""
    n, p = _numpy_state(np_bitgen), _python_state(py_random)
    if n is None or p is None:
        return None
    lib.shardc_legacy_watch(n[0], n[1], p[0], p[1])
    changed: Callable[[], int] = lib.shardc_legacy_changed
    return changed
