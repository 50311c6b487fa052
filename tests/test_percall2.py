"""The per-call path, second round (issue 18; docs/percall2.md).

* A small rpc call goes out whole in the first round (``RpcDispatcher.start``):
  one message and one report per worker; a worker whose chunk ran long hands
  back the chunks queued behind its next one (``RETURNED``), unrun, so long
  shards stay balanced.
* ``fun``'s pickle is reused while everything cloudpickle pickles by value is
  provably the same (``shardc.funpickle``): every kind of change is seen.
* A worker skips the end-of-call trim only when nothing worth one was freed.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import types
from collections import deque
from typing import Any

import numpy as np
import pytest
from _engine_helpers import RecordingChan

import shardc
from shardc import _lowlevel as ll
from shardc import dispatch_rpc
from shardc import funpickle as fp
from shardc.protocol import FRAME, RESULTS, RETURNED, RUN
from shardc.status import DoneMap, StatusTable
from shardc.worker import rpc as wrpc
from shardc.worker.executor import ShardExecutor
from shardc.worker.heap import END_SLACK, HeapPolicy
from shardc.worker.loop import Worker

pytestmark = pytest.mark.timeout(120)


def _ident(shard: Any) -> int:
    return int(shard.id)


def _first_slow(shard: Any) -> int:
    time.sleep(1.0 if shard.id == 0 else 0.02)
    return int(shard.id)


# -- the first round ---------------------------------------------------------------------------


def _pending_after_start(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the scheduler's pending count right after each rpc call's first round."""
    seen: list[int] = []
    orig = dispatch_rpc.RpcDispatcher.start

    def spy(self: Any) -> None:
        orig(self)
        seen.append(self.sched.pending_count())

    monkeypatch.setattr(dispatch_rpc.RpcDispatcher, "start", spy)
    return seen


def test_small_call_goes_out_whole_in_the_first_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to SMALL_CALL_CHUNKS chunks per worker are all sent with the setup (chunk_size 1 or more); a bigger call starts with two chunks per worker; results are exact either way."""
    seen = _pending_after_start(monkeypatch)
    with shardc.Pool(2) as pool:
        small = dispatch_rpc.SMALL_CALL_CHUNKS * 2
        for n, kw in ((10, {}), (small, {"autotune": False}), (3 * small, {"chunk_size": 3, "autotune": False})):
            r = shardc.shard_map(n, _ident, pool=pool, progress=False, **kw)
            assert r.results == list(range(n))
        assert seen == [0, 0, 0]
        r = shardc.shard_map(small + 1, _ident, pool=pool, progress=False, autotune=False)
        assert r.results == list(range(small + 1))
        assert seen[-1] == small + 1 - 4  # two one-shard chunks per worker, the rest after the first reports


def test_a_long_shard_does_not_keep_the_shards_queued_behind_it() -> None:
    """Shard 0 runs 1 s and shares a worker's first round with 1..4: that worker hands 2..4 back unrun, and the other worker, idle by then, takes 2 and 3 at once; every shard runs once."""
    with shardc.Pool(2) as pool:
        r = shardc.shard_map(10, _first_slow, pool=pool, progress=False)
    assert r.results == list(range(10)) and not r.failures
    who = r.diagnostics.shard_worker
    assert who[2] != who[0] and who[3] != who[0], list(who)
    assert list(r.diagnostics.shard_attempts) == [1] * 10


def _sleeps(shard: Any) -> int:
    time.sleep(2 * wrpc.COALESCE_S)
    return int(shard.id)


@pytest.mark.parametrize("long", [True, False])
def test_worker_hands_back_what_is_queued_behind_a_long_chunk(long: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_chunks: after a chunk longer than COALESCE_S the plain RUN chunks of the call queued behind the next one go back in one RETURNED (before the RESULTS), unrun; other messages stay queued in order; short chunks hand back nothing."""
    if not long:  # (a loaded machine must not make the short chunks look long)
        monkeypatch.setattr(wrpc, "COALESCE_S", 5.0)
    table = StatusTable(1)
    done = DoneMap(8)
    try:
        ex = ShardExecutor(table.row(0), None, HeapPolicy(table.row(0), os.getpid()))
        c = ex.call
        c.fun, c.kwargs, c.desc = (_sleeps if long else _ident), {}, shardc.shards(8, block_size=1)
        c.entropy, c.seeded, c.diagnostics, c.donemap = 5, False, True, done
        ex.begin_call()
        chan = RecordingChan()
        w = Worker(0, chan, table, None)  # type: ignore[arg-type]
        w.ex = ex
        other = (("forget", ["k"]), [])
        pending: deque[Any] = deque([((RUN, 1, [1]), []), ((RUN, 1, [2]), []), other, ((RUN, 1, range(3, 6)), [])])
        w.run_chunks((RUN, 1, [0]), pending)
        if long:
            assert [m[0] for m in chan.sent] == [RETURNED, RESULTS]
            assert chan.sent[0] == (RETURNED, 1, [2, 3, 4, 5])
            ran = [o[0] for o in chan.sent[1][2]]
            assert ran in ([0], [0, 1])  # the next chunk is kept (and run now if it fits in the window)
            assert [m for m, _ in pending] == ([(RUN, 1, [1])] if ran == [0] else []) + [other[0]]
            assert [done.get(i) for i in range(2, 6)] == [0, 0, 0, 0]
        else:
            assert [m[0] for m in chan.sent] == [RESULTS]
            out = chan.sent[0][2]
            ids = [i for o in out for i in (range(o[0], o[0] + len(o[2])) if o[1] == FRAME else [o[0]])]
            assert ids == [0, 1, 2]  # the forget message stops the coalescing
            assert [m for m, _ in pending] == [other[0], (RUN, 1, range(3, 6))]
    finally:
        done.close()
        table.close()


# -- fun's pickle -----------------------------------------------------------------------------


def _main_ns(src: str, **glob: Any) -> dict[str, Any]:
    """Functions defined as in a script (``__main__``: cloudpickle pickles them by value)."""
    ns: dict[str, Any] = {"__name__": "__main__", **glob}
    exec(compile(src, "<script>", "exec"), ns)  # noqa: S102 - test code
    return ns


def _run(blob: bytes, arg: Any = None) -> Any:
    return pickle.loads(blob)(arg)


def _never(obj: Any) -> Any:
    raise AssertionError(f"nothing is captured by reference here: {obj!r}")


SRC = """
import numpy as np
K = 3
def helper(x):
    return x + K
def f(x, d=10, *, kw=100):
    return helper(d) + kw + int(np.int64(0))
"""


def test_unchanged_function_reuses_its_pickle() -> None:
    """The same function with nothing changed gets the very same bytes back (and they work); the
    first pickle may not be kept (pickling can import a module: the fingerprint changed meanwhile)."""
    ns = _main_ns(SRC)
    fp.pickle_fun(ns["f"], _never)
    a = fp.pickle_fun(ns["f"], _never)
    b = fp.pickle_fun(ns["f"], _never)
    assert a is b and _run(a) == 113


def test_the_cache_hits_while_modules_are_registered_for_pickling_by_value() -> None:
    """cloudpickle's by-value registry is part of the fingerprint, compared item by item (a
    fresh tuple of it was never identical: with any module registered, e.g. by another library,
    the cache missed every call); registering one more module is a change."""
    import colorsys

    import cloudpickle

    ns = _main_ns(SRC)
    cloudpickle.register_pickle_by_value(colorsys)
    try:
        fp.pickle_fun(ns["f"], _never)
        a = fp.pickle_fun(ns["f"], _never)
        assert fp.pickle_fun(ns["f"], _never) is a
        import json

        cloudpickle.register_pickle_by_value(json)
        try:
            assert fp.pickle_fun(ns["f"], _never) is not a
        finally:
            cloudpickle.unregister_pickle_by_value(json)
    finally:
        cloudpickle.unregister_pickle_by_value(colorsys)


@pytest.mark.parametrize(
    "change",
    ["global", "helper_global", "helper_rebound", "default", "kwdefault", "code", "attribute", "new_global"],
)
def test_every_change_to_what_is_pickled_by_value_is_seen(change: str) -> None:
    """Rebinding a global (of fun or of a __main__ helper), the helper itself, a default, a keyword default, the code, a function attribute, or a global that did not exist: fun is pickled again and the new pickle runs the new version."""
    ns = _main_ns(SRC)
    f = ns["f"]
    fp.pickle_fun(f, _never)
    first = fp.pickle_fun(f, _never)
    assert fp.pickle_fun(f, _never) is first and _run(first) == 113  # cached: the change must undo that
    want = 113
    if change == "global":
        ns["K"] = 4
        want = 114
    elif change == "helper_global":
        ns["K"] = 1000  # (an int not cached by CPython: a new object)
        want = 1110
    elif change == "helper_rebound":
        ns["helper"] = _main_ns("def helper(x):\n    return -x\n")["helper"]
        want = 90
    elif change == "default":
        f.__defaults__ = (20,)
        want = 123
    elif change == "kwdefault":
        f.__kwdefaults__ = {"kw": 200}
        want = 213
    elif change == "code":
        f.__code__ = _main_ns("import numpy as np\ndef g(x, d=10, *, kw=100):\n    return d\n")["g"].__code__
        want = 10
    elif change == "attribute":
        f.marker = "seen"
    elif change == "new_global":
        ns["int"] = lambda v: 7  # shadows the builtin: a global the code names, absent before
        want = 120
    second = fp.pickle_fun(f, _never)
    assert second is not first
    g = pickle.loads(second)
    assert g(None) == want
    if change == "attribute":
        assert g.marker == "seen"


def test_a_newly_imported_submodule_is_seen() -> None:
    """A package's submodule that fun names as an attribute (``pkg.sub``) and that is imported after fun was pickled: cloudpickle records it with fun, so fun is pickled again; other imports change nothing."""
    pkg = types.ModuleType("shardc_test_pkg")
    pkg.__package__ = "shardc_test_pkg"
    pkg.__path__ = []
    sys.modules["shardc_test_pkg"] = pkg
    try:
        ns = _main_ns("def f(x):\n    return P.sub.VALUE\n", P=pkg)
        fp.pickle_fun(ns["f"], _never)
        first = fp.pickle_fun(ns["f"], _never)
        sys.modules["shardc_test_unrelated"] = types.ModuleType("shardc_test_unrelated")
        assert fp.pickle_fun(ns["f"], _never) is first
        sub = types.ModuleType("shardc_test_pkg.sub")
        sub.VALUE = 7  # type: ignore[attr-defined]
        sys.modules["shardc_test_pkg.sub"] = sub
        pkg.sub = sub  # type: ignore[attr-defined]
        second = fp.pickle_fun(ns["f"], _never)
        assert second is not first and b"shardc_test_pkg.sub" in second
    finally:
        for name in ("shardc_test_pkg", "shardc_test_pkg.sub", "shardc_test_unrelated"):
            sys.modules.pop(name, None)


def test_closure_cells_are_part_of_the_fingerprint() -> None:
    """A nonlocal rebinding the closure's cell makes a new pickle (and the new one returns the new value)."""
    ns = _main_ns("""
def make():
    n = 1
    def f(x):
        return n
    def bump():
        nonlocal n
        n += 1
    return f, bump
""")
    f, bump = ns["make"]()
    fp.pickle_fun(f, _never)
    a = fp.pickle_fun(f, _never)
    assert fp.pickle_fun(f, _never) is a and _run(a) == 1
    bump()
    b = fp.pickle_fun(f, _never)
    assert b is not a and _run(b) == 2


@pytest.mark.parametrize(
    "value", [[1, 2], {"a": 1}, {1, 2}, (1, [2]), np.arange(3), bytearray(b"x"), type("Local", (), {})]
)
def test_a_mutable_or_by_value_capture_is_never_cached(value: Any) -> None:
    """A function naming a mutable object (list, dict, set, a tuple holding one, an array, a bytearray) or a class defined in __main__ is pickled at every call, so a mutation in place is seen."""
    ns = _main_ns("def f(x):\n    return repr(V)\n", V=value)
    assert fp.fingerprint(ns["f"]) is None
    a = fp.pickle_fun(ns["f"], lambda obj: None)
    if isinstance(value, list):
        value.append(3)
        b = fp.pickle_fun(ns["f"], lambda obj: None)
        assert _run(b) == "[1, 2, 3]" and _run(a) == "[1, 2]"


def test_other_callables_are_not_cached() -> None:
    """partials, lambdas held by instances, builtins: pickled every time (no fingerprint)."""
    import functools

    assert fp.fingerprint(functools.partial(_ident)) is None
    assert fp.fingerprint(len) is None


def test_a_changed_global_reaches_the_workers_on_the_next_call() -> None:
    """End to end on a pool: a __main__-style function whose global changes between two calls returns the new values."""
    ns = _main_ns("def f(shard):\n    return shard.id * SCALE\n", SCALE=1)
    with shardc.Pool(2) as pool:
        assert shardc.shard_map(6, ns["f"], pool=pool, progress=False).results == list(range(6))
        assert shardc.shard_map(6, ns["f"], pool=pool, progress=False).results == list(range(6))
        ns["SCALE"] = 5
        assert shardc.shard_map(6, ns["f"], pool=pool, progress=False).results == [5 * i for i in range(6)]


# -- the worker's end of a call ---------------------------------------------------------------


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or ll.heap_stats() is None, reason="heap reuse needs glibc >= 2.33"
)
def test_end_of_call_trims_only_when_something_was_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """HeapPolicy.end_call: after a call that freed nothing worth it no trim (and the reference stays); after one that freed a touched 8 MiB temporary the trim runs; reuse is restored to glibc's defaults after."""
    table = StatusTable(1)
    try:
        h = HeapPolicy(table.row(0), os.getpid())
        trims: list[int] = []
        orig = HeapPolicy.trim

        def spy(self: HeapPolicy) -> bool:
            trims.append(1)
            return orig(self)

        h.set_keep(64 * 1024**2)
        if not h.keep:
            pytest.skip("heap reuse refused here")
        monkeypatch.setattr(HeapPolicy, "trim", spy)
        h.end_call()
        assert trims == []
        h.set_keep(64 * 1024**2)
        a = np.ones(8 * 1024**2 // 8)  # from the heap (reuse on), touched
        assert a.nbytes > END_SLACK
        del a
        h.end_call()
        assert trims == [1]
    finally:
        ll.heap_reuse(0)
        ll.heap_trim()
        table.close()
