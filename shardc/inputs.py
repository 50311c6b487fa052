"""The input planner: one pass that decides how each input reaches the workers.

For every borrowed input (``borrow=``), out buffer (``out=``) and object that
``fun`` captures, :class:`InputPlan` decides its fate once, before any worker
is told about the call:

============================  ==================================================
input                         fate (``how`` in ``copy_report``)
============================  ==================================================
``Shared`` / ``Buffer``       by reference: its segment is sent, nothing copied
plain array in private memory inherited: workers are (re)forked after it exists
(big, pool with page guards)  and see it copy-on-write, read-only (``inherit``)
``np.memmap`` of a file       by file reference: workers map the file itself
(mode r, r+, w+)              (read-only, private, guarded), nothing copied
other plain array / memmap    a sealed copy, cached while the caller keeps it
any other object              pickled (protocol 5), buffers out-of-band in segments
============================  ==================================================

The plan carries what the dispatchers and the call setup need: a descriptor
per input for the worker, the segments whose fds every worker must hold, the
inheritance tokens the pool must re-fork for, and what to release when the
call ends.  Nothing here talks to workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import inherit
from .buffer import Buffer
from .errors import InvalidArgumentError
from .segment import Segment, find_address
from .share import Shared, array_extent, default_cache, file_reference, share
from .validate import capture_label

# What a borrowed input cost, for the diagnostics: (name, how, bytes, bytes copied, seconds, kind).
BorrowRecord = tuple[str, str, int, int, float, str]


def array_desc(arr: np.ndarray, seg: Segment) -> dict[str, Any]:
    """A worker's descriptor of ``arr``, which lives in ``seg``."""
    base = seg.mapping().addr
    return {
        "kind": "array",
        "segs": [seg.key],
        "dtype": arr.dtype,
        "shape": arr.shape,
        "strides": arr.strides,
        "offset": arr.ctypes.data - base,
    }


class InputPlan:
    """How one call's inputs reach its workers (see the module docstring).

    Args:
        target: the function the workers run (names captured arrays in reports).
        allow_inherit: False for a pool without page guards (inheritance relies
            on them to keep every shard's view pristine): copies instead.  Or
            a function saying so, called only once an input could be inherited.
    """

    def __init__(self, target: Callable[..., Any], allow_inherit: bool | Callable[[], bool]) -> None:
        self.target = target
        self.allow_inherit = allow_inherit
        self.borrow: dict[str, dict[str, Any]] = {}  # name -> worker descriptor
        self.out: dict[str, dict[str, Any]] = {}
        self.segments: dict[str, Segment] = {}  # every segment a worker must hold, by key
        self.inherit_tokens: list[int] = []  # arrays workers inherit at fork (shardc.inherit)
        self.borrow_records: list[BorrowRecord] = []
        self.out_records: list[tuple[str, int, Segment]] = []
        self._temporaries: list[Shared] = []
        self._captured: dict[int, tuple[Any, tuple[str, dict[str, Any]]]] = {}

    # -- planning ---------------------------------------------------------------------
    def add_segment(self, seg: Segment) -> None:
        self.segments[seg.key] = seg

    def capture(self, obj: Any) -> Any:
        """``persistent_id`` hook for pickling ``fun``: a Buffer/Shared it
        captures goes by reference; so does a big plain array workers can
        inherit at fork.  Returns None (pickle it by value) otherwise."""
        key = id(obj)
        if key not in self._captured:
            if isinstance(obj, np.ndarray):
                if not self._inheritable(obj):
                    return None
                label = capture_label(self.target, obj)
                desc = self._inherit(label, obj, time.perf_counter())
                self._captured[key] = (obj, ("shared", {**desc, "label": label}))
            elif isinstance(obj, Buffer):
                if obj.closed:
                    raise InvalidArgumentError("fun captures a closed shardc buffer")
                self.add_segment(obj.segment)
                self._captured[key] = (obj, ("buffer", array_desc(obj.array, obj.segment)))
            else:
                d = obj.descriptor()
                d["label"] = "captured shared input"
                for s in obj.segments:
                    self.add_segment(s)
                self._captured[key] = (obj, ("shared", d))
        return self._captured[key][1]

    def _inheritable(self, obj: Any) -> bool:
        """A big array in private memory that workers can inherit at fork."""
        if not (type(obj) is np.ndarray and find_address(*array_extent(obj)) is None and inherit.eligible(obj)):
            return False
        if callable(self.allow_inherit):  # asked only when an input could be inherited (it lists threads)
            self.allow_inherit = bool(self.allow_inherit())
        return self.allow_inherit

    def _inherit(self, name: str, obj: np.ndarray, t0: float) -> dict[str, Any]:
        token = inherit.hold(obj)
        self.inherit_tokens.append(token)
        self.borrow_records.append((name, "inherited", obj.nbytes, 0, time.perf_counter() - t0, "array"))
        return {"kind": "inherited", "token": token}

    def add_out(self, out: dict[str, Any]) -> None:
        for name, obj in out.items():
            arr = obj.array if isinstance(obj, Buffer) else obj
            hit = find_address(*array_extent(arr))
            if hit is None:  # validate.check_out let it through: a bug, not the caller's
                raise InvalidArgumentError(f"out[{name!r}] is not in a shardc buffer")
            seg = hit[0]
            self.add_segment(seg)
            self.out[name] = array_desc(arr, seg)
            self.out_records.append((name, arr.nbytes, seg))

    def add_borrow(self, borrow: dict[str, Any]) -> None:
        for name, obj in borrow.items():
            t0 = time.perf_counter()
            if isinstance(obj, Shared):
                sh, how = obj, "reference"
            elif isinstance(obj, Buffer):
                sh, how = share(obj), "reference"
            elif self._inheritable(obj):
                self.borrow[name] = self._inherit(name, obj, t0)
                continue
            elif isinstance(obj, np.memmap) and (ref := file_reference(obj, f"borrow[{name!r}]")) is not None:
                sh, how = ref, "file"  # the file is the shared memory: map it, copy nothing
                self._temporaries.append(sh)
            elif (type(obj) is np.ndarray or isinstance(obj, np.memmap)) and not obj.dtype.hasobject:
                # Plain arrays (and memmaps) are shared as raw bytes; subclasses
                # with state of their own (masked arrays, ...) go through pickle.
                sh, how, _ = default_cache.get(obj, "auto")
            else:
                sh = share(obj)
                how = sh.how
                self._temporaries.append(sh)
            for s in sh.segments:
                self.add_segment(s)
            self.borrow[name] = sh.descriptor()
            copied = sh.nbytes if how in ("copied", "pickled") else 0
            self.borrow_records.append((name, how, sh.nbytes, copied, time.perf_counter() - t0, sh.kind))

    def inherited_names(self) -> list[str]:
        return [r[0] for r in self.borrow_records if r[1] == "inherited"]

    # -- the end of the call --------------------------------------------------------------
    def release(self) -> bool:
        """Let go of what the call held; True if workers inherited arrays
        (the pool then measures them without those again)."""
        for token in self.inherit_tokens:
            inherit.release(token)
        for sh in self._temporaries:
            sh.close()
        self._temporaries.clear()
        self._captured.clear()
        held = bool(self.inherit_tokens)
        self.inherit_tokens = []
        return held
