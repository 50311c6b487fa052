"""Pickling an open call's tasks (``shardc.Executor``, the joblib backend),
with big NumPy arguments shared zero-copy instead of pickled.

A task is ``(kind, fn, args, kwargs)``, pickled in the caller's thread at
``submit``: plain :mod:`pickle` when it can (fast), else cloudpickle
(lambdas, closures, functions defined in ``__main__``).  With ``max_nbytes``
set, every plain array argument of at least that many bytes (at any depth,
e.g. inside joblib's batches) is placed once in a sealed shardc segment
(``shardc.share.default_cache``: an array already in a shardc segment goes by
reference, one seen before and unchanged reuses its copy) and pickled as a
reference; the segment travels to each worker once, as an fd, and the worker
maps it read-only under the executor's ``cow`` policy (``Worker.load_task``),
once per call however many tasks use it.  This is joblib's ``max_nbytes``
rule, with shared memory in place of memmapped files.

Workers started by the fork server (``shardc.forkserver``) do not share the
caller's ``__main__``: for them (``main_by_value``) a pickle that names
``__main__`` is redone with cloudpickle, which sends what ``__main__``
defines by value.
"""

from __future__ import annotations

import io
import pickle
import weakref
from typing import Any

import cloudpickle
import numpy as np

from .share import Shared, default_cache


class ArgSharer:
    """Arrays of ``max_nbytes`` or more -> references to their shared copies
    (kept while the array lives and this sharer is in use)."""

    def __init__(self, max_nbytes: int) -> None:
        self.max_nbytes = max_nbytes
        self._seen: dict[int, tuple[Any, Shared]] = {}  # id -> (weakref, shared): verified once

    def wants(self, obj: Any) -> bool:
        return (
            type(obj) in (np.ndarray, np.memmap)
            and obj.nbytes >= self.max_nbytes
            and not obj.dtype.hasobject
            and obj.nbytes > 0
        )

    def share(self, arr: np.ndarray) -> Shared:
        hit = self._seen.get(id(arr))
        if hit is not None and hit[0]() is arr and not hit[1].closed:
            return hit[1]
        sh, _how, _s = default_cache.get(arr, "auto")
        try:
            self._seen[id(arr)] = (weakref.ref(arr), sh)
        except TypeError:
            pass
        return sh


def _make_pickler(base: type) -> type:
    class _Sharing(base):
        def __init__(self, file: Any, sharer: ArgSharer) -> None:
            super().__init__(file, protocol=5)
            self.sharer = sharer
            self.segments: dict[str, Any] = {}
            self.shared: dict[int, dict[str, Any]] = {}

        def persistent_id(self, obj: Any) -> Any:
            if not self.sharer.wants(obj):
                return None
            sh = self.sharer.share(obj)
            for s in sh.segments:
                self.segments[s.key] = s
            d = self.shared.get(id(sh))
            if d is None:
                d = self.shared[id(sh)] = {**sh.descriptor(), "label": "task argument"}
            return ("shared", d)

    return _Sharing


_PlainSharing = _make_pickler(pickle.Pickler)
_CloudSharing = _make_pickler(cloudpickle.CloudPickler)


def dumps_task(
    task: tuple[Any, ...], sharer: ArgSharer | None, main_by_value: bool = False
) -> tuple[bytes, tuple[Any, Any] | None]:
    """``(pickle of task, refs)``: refs is None, or ``(segments, shared
    descriptors)`` of the arrays shared by reference (``StreamScheduler.feed``)."""
    if sharer is None:
        try:
            blob = pickle.dumps(task, protocol=5)
            if not (main_by_value and b"__main__" in blob):
                return blob, None
        except Exception:  # noqa: BLE001, S110 - cloudpickle is the general path
            pass
        return cloudpickle.dumps(task, protocol=5), None
    buf = io.BytesIO()
    p = _PlainSharing(buf, sharer)
    try:
        p.dump(task)
        if main_by_value and b"__main__" in buf.getvalue():
            raise pickle.PicklingError("names __main__")
    except Exception:  # noqa: BLE001 - cloudpickle is the general path
        buf = io.BytesIO()
        p = _CloudSharing(buf, sharer)
        p.dump(task)
    if not p.shared:
        return buf.getvalue(), None
    return buf.getvalue(), (tuple(p.segments.values()), tuple(p.shared.values()))
