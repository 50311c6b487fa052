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
caller's ``__main__``: for them (``main_by_value``) a function or class that
``__main__`` defines goes by value, cloudpickled once per object
(:func:`main_ref`) and unpickled once per worker (:func:`load_main`), so a
task of a ``__main__`` function costs about what a plain pickle does.
"""

from __future__ import annotations

import collections
import copyreg
import hashlib
import io
import pickle
import types
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
        # id -> (array, descriptor): arrays the workers inherited at fork (shardc.inherit), by reference
        self.inherited: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}

    def inherit(self, arr: np.ndarray, token: int) -> None:
        """``arr`` (held as ``token`` when the workers were forked) goes by token."""
        self.inherited[id(arr)] = (arr, {"kind": "inherited", "token": token, "label": "task argument"})

    def inherited_desc(self, obj: Any) -> dict[str, Any] | None:
        hit = self.inherited.get(id(obj))
        return hit[1] if hit is not None and hit[0] is obj else None

    def wants(self, obj: Any) -> bool:
        if self.inherited and self.inherited_desc(obj) is not None:
            return True
        return (
            type(obj) in (np.ndarray, np.memmap)
            and obj.nbytes >= self.max_nbytes
            and not obj.dtype.hasobject
            and obj.nbytes > 0
        )

    def share(self, arr: np.ndarray) -> Shared:
        """``arr``'s sealed shared copy, from the share cache: reused only once
        the cache proved ``arr`` unchanged since it was made (kernel write
        tracking, or a compare), at every task that sends it: a task sees the
        array as it was when the task was pickled, never an older copy."""
        sh, _how, _s = default_cache.get(arr, "auto")
        return sh


def _make_pickler(base: type) -> type:
    class _Sharing(base):
        def __init__(self, file: Any, sharer: ArgSharer) -> None:
            super().__init__(file, protocol=5)
            self.sharer = sharer
            self.segments: dict[str, Any] = {}
            self.shared: dict[int, dict[str, Any]] = {}
            self.seen: dict[int, dict[str, Any]] = {}  # id(array) -> its reference, in this pickle

        def persistent_id(self, obj: Any) -> Any:
            if not self.sharer.wants(obj):
                return None
            d = self.seen.get(id(obj))  # (the objects pickled live while this pickle is made)
            if d is None:
                d = self.seen[id(obj)] = self._reference(obj)
            return ("shared", d)

        def _reference(self, obj: Any) -> dict[str, Any]:
            """What a worker needs to find ``obj`` (inherited, or its shared copy)."""
            d = self.sharer.inherited_desc(obj)
            if d is not None:
                self.shared[id(obj)] = d
                return d
            sh = self.sharer.share(obj)
            for s in sh.segments:
                self.segments[s.key] = s
            d = self.shared.get(id(sh))
            if d is None:
                d = self.shared[id(sh)] = {**sh.descriptor(), "label": "task argument"}
            return d

    return _Sharing


_PlainSharing = _make_pickler(pickle.Pickler)
_CloudSharing = _make_pickler(cloudpickle.CloudPickler)

# __main__ functions and classes by value, pickled once each (see main_ref).
_main_refs: dict[int, tuple[Any, _MainRef]] = {}  # id -> (weakref, its reference)
_loaded: dict[bytes, Any] = {}  # in a worker: key -> the object, unpickled once
_LOADED_MAX = 512


class _MainRef:
    """Pickles as :func:`load_main` of ``(key, blob)``."""

    __slots__ = ("args", "mains")

    def __init__(self, args: tuple[bytes, bytes]) -> None:
        self.args = args
        self.mains = args[1].count(b"__main__")  # in the blob (dumps_task checks the rest)

    def __reduce__(self) -> Any:
        return load_main, self.args


def main_ref(obj: Any) -> _MainRef:
    """``obj`` (a function or class of ``__main__``) cloudpickled by value
    once while it lives (its globals as of then: what a worker forked at that
    moment would see), with a digest that workers cache the object by."""
    hit = _main_refs.get(id(obj))
    if hit is not None and hit[0]() is obj:
        return hit[1]
    blob = cloudpickle.dumps(obj, protocol=5)
    ref = _MainRef((hashlib.blake2b(blob, digest_size=16).digest(), blob))
    try:
        _main_refs[id(obj)] = (weakref.ref(obj), ref)
    except TypeError:
        pass
    return ref


def load_main(key: bytes, blob: bytes) -> Any:
    """A worker's copy of a ``__main__`` object sent by :func:`main_ref`."""
    obj = _loaded.get(key)
    if obj is None:
        if len(_loaded) >= _LOADED_MAX:
            _loaded.clear()
        obj = _loaded[key] = cloudpickle.loads(blob)
    return obj


def _by_value(obj: Any) -> Any:
    if isinstance(obj, (types.FunctionType, type)) and getattr(obj, "__module__", None) == "__main__":
        return load_main, main_ref(obj).args
    return NotImplemented


class _PlainMain(pickle.Pickler):
    def __init__(self, file: Any, sharer: Any = None) -> None:
        super().__init__(file, protocol=5)

    def reducer_override(self, obj: Any) -> Any:
        return _by_value(obj)


class _PlainSharingMain(_PlainSharing):  # type: ignore[misc,valid-type]
    def reducer_override(self, obj: Any) -> Any:
        return _by_value(obj)


class _HasBig(Exception):
    """Raised by the probe of :func:`_without_big`: the task has an array to share."""


def _probe_table(base: Any, sharer: ArgSharer) -> Any:
    """A dispatch table: ``base`` plus NumPy's two array types, whose reducer
    raises :class:`_HasBig` for an array ``sharer`` wants (else the array
    pickles as usual).  Consulted only for arrays, unlike ``persistent_id``,
    which a Python pickler calls for every object (a joblib batch of 1,000
    tiny calls: ~1 ms instead of ~0.09 ms)."""

    def reduce_array(arr: Any) -> Any:
        if sharer.wants(arr):
            raise _HasBig
        return arr.__reduce_ex__(5)

    return collections.ChainMap({np.ndarray: reduce_array, np.memmap: reduce_array}, base)


class _CloudProbe(cloudpickle.CloudPickler):
    def __init__(self, file: Any, table: Any) -> None:
        self.dispatch_table = table  # read by the C pickler's __init__ (the class attribute hides its slot)
        super().__init__(file, protocol=5)


class _MainProbe(pickle.Pickler):
    """:func:`_without_big`'s probe when ``__main__`` goes by value:
    ``reducer_override`` (not called for the builtin containers and scalars)
    does both jobs."""

    def __init__(self, file: Any, sharer: ArgSharer) -> None:
        super().__init__(file, protocol=5)
        self.sharer = sharer

    def reducer_override(self, obj: Any) -> Any:
        if self.sharer.wants(obj):
            raise _HasBig
        return _by_value(obj)


def _without_big(task: tuple[Any, ...], sharer: ArgSharer, main_by_value: bool) -> bytes | None:
    """The task pickled as without a sharer (pickle, else cloudpickle) when
    it holds no array to share; None when it does (the sharing picklers then
    run: their per-object cost is small next to such an array's)."""
    buf = io.BytesIO()
    p: pickle.Pickler
    if main_by_value:
        p = _MainProbe(buf, sharer)
    else:
        p = pickle.Pickler(buf, protocol=5)
        p.dispatch_table = _probe_table(copyreg.dispatch_table, sharer)
    try:
        p.dump(task)
        return buf.getvalue()
    except _HasBig:
        return None
    except Exception:  # noqa: BLE001, S110 - cloudpickle is the general path
        pass
    buf = io.BytesIO()
    cp = _CloudProbe(buf, _probe_table(cloudpickle.CloudPickler.dispatch_table, sharer))
    try:
        cp.dump(task)
    except _HasBig:
        return None
    return buf.getvalue()


def dumps_task(
    task: tuple[Any, ...], sharer: ArgSharer | None, main_by_value: bool = False
) -> tuple[bytes, tuple[Any, Any] | None]:
    """``(pickle of task, refs)``: refs is None, or ``(segments, shared
    descriptors)`` of the arrays shared by reference (``StreamScheduler.feed``).
    ``main_by_value``: what ``__main__`` defines goes by value (workers from
    the fork server)."""
    if sharer is None and not main_by_value:
        try:
            return pickle.dumps(task, protocol=5), None
        except Exception:  # noqa: BLE001 - cloudpickle is the general path
            return cloudpickle.dumps(task, protocol=5), None
    buf = io.BytesIO()
    if sharer is None:
        fn = task[1]
        if getattr(fn, "__module__", None) != "__main__":
            try:  # the usual case, fastest: nothing of __main__ in the task (a plain pickle names it)
                blob = pickle.dumps(task, protocol=5)
                if b"__main__" not in blob:
                    return blob, None
            except Exception:  # noqa: BLE001, S110 - the general path below
                pass
        elif isinstance(fn, types.FunctionType):
            try:  # the usual case, fast: only the function is __main__'s
                ref = main_ref(fn)
                blob = pickle.dumps((task[0], ref, *task[2:]), protocol=5)
                if blob.count(b"__main__") == ref.mains:  # none in the arguments
                    return blob, None
            except Exception:  # noqa: BLE001, S110 - the general path below
                pass
        try:
            _PlainMain(buf).dump(task)
            return buf.getvalue(), None
        except Exception:  # noqa: BLE001 - cloudpickle is the general path
            try:
                return cloudpickle.dumps(task, protocol=5), None
            except Exception:  # noqa: BLE001 - by value failed (e.g. an unpicklable global):
                return pickle.dumps(task, protocol=5), None  # by reference, as for forked workers
    probed = _without_big(task, sharer, main_by_value)
    if probed is not None:
        return probed, None
    buf = io.BytesIO()
    p = (_PlainSharingMain if main_by_value else _PlainSharing)(buf, sharer)
    try:
        p.dump(task)
    except Exception:  # noqa: BLE001 - cloudpickle is the general path
        buf = io.BytesIO()
        p = _CloudSharing(buf, sharer)
        try:
            p.dump(task)
        except Exception:  # noqa: BLE001 - by value failed: by reference, as for forked workers
            if not main_by_value:
                raise
            buf = io.BytesIO()
            p = _PlainSharing(buf, sharer)
            p.dump(task)
    if not p.shared:
        return buf.getvalue(), None
    return buf.getvalue(), (tuple(p.segments.values()), tuple(p.shared.values()))
