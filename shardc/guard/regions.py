"""Installing the fault handler and protecting/unprotecting regions (borrowed and inherited inputs)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any

from .. import _lowlevel as _ll
from .. import inherit as _inherit
from ..errors import InvalidArgumentError
from .events import _element_index, _on_notify
from .state import (
    MODES,
    _byte_bounds,
    _default_signal,
    _Edge,
    _env_int,
    _Input,
    _new_stats,
    _state,
)


def install(signum: int | None = None, *, notify: str = "interrupt") -> None:
    """Install the fault handlers in this process (idempotent; call in each worker).

    Chains to the SIGSEGV/SIGBUS handlers present now (faulthandler: enable it
    first), gives the process an alternate signal stack if it has none, and
    registers the Python handler that raises deny errors.

    Args:
        signum: signal used to notify Python; default ``SHARDC_GUARD_SIGNAL`` or SIGUSR2.
        notify: ``"interrupt"`` (PyErr_SetInterruptEx, default) or ``"signal"`` (raise()).

    Raises:
        InvalidArgumentError: bad ``notify`` or signal; RuntimeError outside the main thread.
    """
    if notify not in ("interrupt", "signal"):
        raise InvalidArgumentError(f"notify must be 'interrupt' or 'signal', not {notify!r}")
    signum = _default_signal() if signum is None else int(signum)
    if signum in (signal.SIGSEGV, signal.SIGBUS, signal.SIGINT):
        raise InvalidArgumentError(f"cannot notify on {signal.Signals(signum).name}")
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("shardc.guard.install() must run in the main thread")
    if _state.pid == os.getpid() and _state.signum == signum and _state.notify == notify:
        return
    if _state.signum is not None and _state.signum != signum:
        signal.signal(_state.signum, _state.prev_handler or signal.SIG_DFL)
        _state.prev_handler = None
    prev = signal.signal(signum, _on_notify)
    if prev is not _on_notify:  # after fork the inherited handler is already ours
        _state.prev_handler = prev
    _ll.guard_set_limits(_env_int("SHARDC_GUARD_PAGES_PER_REGION", 256),
                         _env_int("SHARDC_GUARD_PAGES_TOTAL", 8192))
    _ll.guard_install(signum, raise_signal=(notify == "signal"))
    _state.pid = os.getpid()
    _state.signum = signum
    _state.notify = notify
    _state.seen_notified = _ll.guard_counters()["notified"]


def uninstall() -> None:
    """Remove every protection and restore the previous signal handlers."""
    for rid in list(_state.inputs):
        while rid in _state.inputs:
            unprotect(rid)
    _ll.guard_uninstall()
    if _state.signum is not None:
        signal.signal(_state.signum, _state.prev_handler or signal.SIG_DFL)
    _state.pid = _state.signum = _state.prev_handler = None


def _mapping_is_private(addr: int) -> bool | None:
    """From /proc/self/maps: True/False for the mapping holding addr, None if unknown."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, perms = line.split(None, 2)[:2]
                lo, hi = (int(x, 16) for x in span.split("-"))
                if lo <= addr < hi:
                    return perms[3] == "p"
    except OSError:
        return None
    return False


def protect(name: str, addr: int, nbytes: int, mode: str = "deny", *, itemsize: int = 1,
            shape: tuple[int, ...] | None = None, strides: tuple[int, ...] | None = None,
            offset0: int = 0, snapshot: bool = False, primed: bool = False) -> int:
    """Guard a borrowed input's mapping and return its region id.

    Args:
        name: the input's name (the key in ``borrow=``), used in messages.
        addr: start of the mapping (page aligned; ``MAP_PRIVATE``).
        nbytes: size of the mapping in bytes.
        mode: ``"deny"``, ``"audit"`` or ``"allow"``.
        itemsize, shape, strides: the array's layout, to turn a byte offset into
            an element index (``shape=None``: a flat array of ``itemsize`` items).
        offset0: byte offset of element ``[0, ...]`` from ``addr``.
        snapshot: the range is anonymous memory inherited over fork, not a
            segment mapping: written pages are saved first and copied back
            after the shard (see ``csrc/guard.c``).
        primed: this mapping was guarded before (and not remapped since): skip
            the one-time priming, which walks every page table entry of the
            mapping twice.

    Returns:
        the region id for :func:`unprotect`; ``-1`` for an empty input (nothing to guard).

    Raises:
        InvalidArgumentError: bad mode, shared mapping, misaligned address.
        SegmentError: mprotect failed (e.g. too many mappings: see the hint).
    """
    if mode not in MODES:
        raise InvalidArgumentError(f"cow must be one of {MODES}, not {mode!r}")
    if nbytes == 0:
        return -1
    if addr % _ll.PAGE_SIZE:
        raise InvalidArgumentError(f"borrowed input {name!r}: mapping address {addr:#x} is not page aligned")
    if sys.platform.startswith("linux") and _mapping_is_private(addr) is False:
        raise InvalidArgumentError(
            f"borrowed input {name!r} at {addr:#x} is not a MAP_PRIVATE mapping; page guards "
            "would let writes reach shared memory")
    if _state.pid != os.getpid():
        install()
    def view(rid: int) -> _Input:
        return _Input(rid, name, addr, nbytes, mode, int(itemsize),
                      None if shape is None else tuple(int(n) for n in shape),
                      None if strides is None else tuple(int(s) for s in strides), int(offset0))

    _state.stats.setdefault(name, _new_stats(mode))["mode"] = mode
    for inp in _state.inputs.values():
        if inp.addr == addr and inp.nbytes == nbytes:
            # The same mapping again (two views of one shared buffer, or two
            # out-of-band buffers of one pickled object): share the region;
            # each protect() is one reference, each input keeps its layout.
            _state.views[inp.rid].append(view(inp.rid))
            return inp.rid
    flags = _ll.GUARD_SNAPSHOT if snapshot else _ll.GUARD_PRIMED if primed else 0
    rid = _ll.guard_add(addr, nbytes, _ll.GUARD_MODES[mode] | flags, name)
    _state.inputs[rid] = view(rid)
    _state.views[rid] = [_state.inputs[rid]]
    return rid


def protect_array(name: str, array: Any, mode: str = "deny", *, base_addr: int | None = None,
                  nbytes: int | None = None) -> int:
    """:func:`protect` for a NumPy array that lives in a private mapping.

    Args:
        array: the array the shard will see.
        base_addr: start of the mapping; default: the array's lowest byte rounded down to a page.
        nbytes: size of the mapping; default: up to the array's highest byte.
    """
    lo, hi = _byte_bounds(array)
    data = array.__array_interface__["data"][0]
    base = lo - lo % _ll.PAGE_SIZE if base_addr is None else base_addr
    size = hi - base if nbytes is None else nbytes
    return protect(name, base, size, mode, itemsize=array.itemsize, shape=array.shape,
                   strides=array.strides, offset0=data - base)


def protect_inherited(name: str, array: Any, root: Any, mode: str = "deny") -> int:
    """Guard an array inherited over fork (``shardc.inherit``); returns a handle
    for :func:`unprotect`.

    ``root`` is the array that owns the memory (``array`` or a base of it):
    the whole pages inside its bytes become a snapshot region; the bytes of
    the partial pages at its two ends (other objects may live on those
    pages, so they cannot be write-protected) are saved now, compared after
    every shard and put back, so a write there is reported (when the shard
    ends rather than at once) and undone like any other.
    """
    if mode not in MODES:
        raise InvalidArgumentError(f"cow must be one of {MODES}, not {mode!r}")
    lo, hi = _byte_bounds(root)
    if hi <= lo:
        return -1
    if _state.pid != os.getpid():
        install()
    page = _ll.PAGE_SIZE
    a, b = _inherit.interior(lo, hi, page)
    data = array.__array_interface__["data"][0]
    layout = {"itemsize": array.itemsize, "shape": tuple(int(n) for n in array.shape),
              "strides": tuple(int(s) for s in array.strides)}
    if b > a:
        handle = protect(name, a, b - a, mode, offset0=data - a, snapshot=True, **layout)
        spans = [(lo, a), (b, hi)]
    else:
        handle = _state.next_handle
        _state.next_handle -= 1
        spans = [(lo, hi)]
    keys = []
    for s0, s1 in spans:
        if s1 <= s0:
            continue
        view = _Input(-1, name, s0, s1 - s0, mode, int(layout["itemsize"]), layout["shape"],
                      layout["strides"], data - s0)
        edge = _state.edges.get((s0, s1))
        if edge is None:
            edge = _state.edges[(s0, s1)] = _Edge(s0, ctypes.string_at(s0, s1 - s0), [])
        edge.views.append(view)
        keys.append((s0, s1))
    _state.handle_edges.setdefault(handle, []).extend(keys)
    return handle


def _check_edges(shard_id: Any) -> list[dict[str, Any]]:
    """Events for inherited-input edge bytes changed since they were saved; put them back."""
    events = []
    for (s0, s1), edge in _state.edges.items():
        now = ctypes.string_at(s0, s1 - s0)
        if now == edge.saved:
            continue
        first = next(i for i in range(len(now)) if now[i] != edge.saved[i])
        ctypes.memmove(s0, edge.saved, len(edge.saved))
        inp = edge.views[0]
        for v in edge.views:
            vlo, vhi = v.extent()
            if vlo <= first < vhi:
                inp = v
                break
        rel = first - inp.offset0
        events.append({"input": inp.name, "shard": shard_id, "mode": inp.mode, "pages": 1,
                       "bytes": s1 - s0, "first_offset": rel, "first_index": _element_index(inp, rel),
                       "faults": 0, "exact": True})
    return events


def take_lost() -> list[str]:
    """Inputs (inherited over fork) written beyond what can be restored since
    the last call: the process must not run another shard on them."""
    lost, _state.lost = _state.lost, []
    return lost


def unprotect(region_id: int) -> None:
    """Drop private pages and forget the region (call before unmapping it)."""
    for key in _state.handle_edges.pop(region_id, ()):
        edge = _state.edges.get(key)
        if edge is not None:
            edge.views.pop()
            if not edge.views:
                del _state.edges[key]
    if region_id < 0:
        return
    inp = _state.inputs.get(region_id)
    if inp is not None:
        views = _state.views[region_id]
        views.pop()
        if views:
            return
        del _state.inputs[region_id], _state.views[region_id]
    _ll.guard_remove(region_id, inp.name if inp else None)


def cow_stats() -> dict[str, dict[str, Any]]:
    """Cumulative counters per input name in this process.

    Each value: ``mode``, ``shards_written`` (scopes that wrote it), ``pages``
    and ``bytes`` written (private pages), ``faults``, ``violations`` (deny
    writes), ``kernel_writes`` (EFAULTs attributed to it).
    """
    return {k: dict(v) for k, v in _state.stats.items()}
