"""The worker: what runs in each forked child of a shardc pool.

Life of a worker::

    fork() ── after_fork(): PDEATHSIG + parent check, SIGINT ignored,
       │      BLAS/OpenMP limited to 1 thread, RNGs reseeded, packages and
       │      init_expr run
       ▼
    loop: recv message from the master (the socket is also the lifeline:
       │  EOF = master gone = exit)
       ├─ "call"   set up a call: unpickle fun once, map borrowed inputs
       │           (MAP_PRIVATE, read-only, guarded per cow) and out buffers
       │           (MAP_SHARED) from fds sent with the message; cache them
       ├─ "run"    run a chunk of shard ids; results go back in one message
       ├─ "queue"  shm_queue mode: pop blocks of ids from the shared ring until
       │           it is closed; nothing gathered, progress in shared status
       ├─ "end"    drop the call's state
       ├─ "forget" close segments the master closed
       └─ "exit"   leave (recycling, pool stop)

The worker never returns into the caller's frames: it ends with os._exit.
Per-shard progress (current shard id and its start time) is written into a
shared status array the master reads; that is how the master attributes a
crash or a hang to the exact shard that was running, and how it sees
progress in shm_queue mode without any message per shard.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import signal
import sys
import time
import traceback
from collections import deque
from typing import Any

import cloudpickle
import numpy as np
import numpy.random  # noqa: F401 - NumPy imports it lazily: once here, not in every forked worker (~10 ms)

from . import _lowlevel as ll
from . import inherit
from ._channel import Channel, ChannelClosed
from .protocol import ERR, OK, OK_PICKLED, RETIRE_EXIT, error_record as _error_record, raise_from_record  # noqa: F401
from .segment import Segment
from .status import DoneMap, StatusTable
from .share import array_extent, view_array

# Return values that pickle instantly and cannot run user code while pickled.
_TRIVIAL = (type(None), bool, int, float, complex, str, bytes)


class _Unpickler(pickle.Unpickler):
    """Resolves shardc objects captured by ``fun`` (sent by reference)."""

    def __init__(self, data: bytes, worker: "Worker") -> None:
        super().__init__(io.BytesIO(data))
        self.worker = worker

    def persistent_load(self, pid: Any) -> Any:
        tag, desc = pid
        if tag == "buffer":
            return self.worker.out_array(desc)
        if tag == "shared":
            return self.worker.borrowed_object(desc, desc.get("label", "captured"))
        raise pickle.UnpicklingError(f"unknown persistent id {tag!r}")


class CallState:
    """What a worker holds for the duration of one shard_map call."""

    def __init__(self) -> None:
        self.call_id = -1
        self.fun: Any = None
        self.kwargs: dict[str, Any] = {}
        self.desc: Any = None
        self.entropy: int | None = None
        self.seeded = False
        self.cow = "deny"
        self.guard_regions: list[int] = []
        self.diagnostics = True
        self.kernel = None
        self.donemap: Any = None
        self.inherited: list[np.ndarray] = []  # arrays inherited at fork, by owner of the memory


class Worker:
    def __init__(self, slot: int, chan: Channel, status: StatusTable) -> None:
        self.slot = slot
        self.chan = chan
        self.row = status.row(slot)
        self.segments: dict[str, Segment] = {}
        self.shared_maps: dict[str, ll.Mapping] = {}
        self.private_maps: dict[str, ll.Mapping] = {}
        self.call = CallState()
        self.guard: Any = None
        self.pid = os.getpid()
        self.ewma_ns = -1  # running mean of shard wall time, for adaptive measuring
        self.tainted: list[str] = []  # inherited inputs this process can no longer restore
        self.heap_keep = 0  # heap reuse: freed bytes kept for the next shard (0: glibc defaults)
        self.heap_ref: tuple[int, int, int] = (0, 0, 0)  # (anon, heap used, heap free) at the last trim
        self.heap_arenas = (0, 0)  # (allocator's system bytes, program break) when reuse was turned on
        self.heap_refused = False  # thread arenas grew under reuse: never again in this process

    # -- segments ----------------------------------------------------------------
    def adopt(self, infos: list[dict[str, Any]], fds: list[int]) -> None:
        for info, fd in zip(infos, fds):
            old = self.segments.pop(info["key"], None)
            if old is not None:
                old.close()
            self.segments[info["key"]] = Segment.adopt(fd, info["size"], info["backing"], info["name"],
                                                       info["key"])

    def forget(self, keys: list[str]) -> None:
        for k in keys:
            seg = self.segments.pop(k, None)
            self.shared_maps.pop(k, None)
            self.private_maps.pop(k, None)
            if seg is not None:
                seg.close()

    def _shared_map(self, key: str) -> ll.Mapping:
        m = self.shared_maps.get(key)
        if m is None:
            m = self.segments[key].map(writable=True)
            self.shared_maps[key] = m
        return m

    def _private_map(self, key: str) -> ll.Mapping:
        m = self.private_maps.get(key)
        if m is None:
            # Read-only private mapping: a write can only ever reach a private
            # copy-on-write page, and with guards on it faults first.
            m = self.segments[key].map(writable=False, private=True)
            self.private_maps[key] = m
        return m

    def out_array(self, d: dict[str, Any]) -> np.ndarray:
        m = self._shared_map(d["segs"][0])
        return view_array(m, d["dtype"], d["shape"], d["strides"], d["offset"], writeable=True)

    def borrowed_object(self, d: dict[str, Any], name: str) -> Any:
        if d["kind"] == "inherited":
            arr = inherit.lookup(d["token"])
            root = inherit.root_of(arr)
            view = arr.view()  # the same memory; fun gets an object of its own
            # (The master inherits only into pools with page guards.)
            self.call.guard_regions.append(self.guard.protect_inherited(name, view, root, self.call.cow))
            if not any(r is root for r in self.call.inherited):
                self.call.inherited.append(root)
            return view
        if d["kind"] == "array":
            m = self._private_map(d["segs"][0])
            arr = view_array(m, d["dtype"], d["shape"], d["strides"], d["offset"], writeable=True)
            self._protect(name, m, d["segs"][0], arr)
            return arr
        bufs = []
        for i, n in d["buffers"]:
            key = d["segs"][i]
            m = self._private_map(key)
            self._protect(name, m, key, None)
            bufs.append(memoryview(m.buffer())[:n])
        return pickle.loads(d["payload"], buffers=bufs)

    def _protect(self, name: str, m: ll.Mapping, key: str, arr: np.ndarray | None) -> None:
        if self.guard is None:
            return
        kw = {}
        if arr is not None:
            kw = {"itemsize": arr.itemsize, "shape": arr.shape, "strides": arr.strides,
                  "offset0": arr.ctypes.data - m.addr}
        self.call.guard_regions.append(self.guard.protect(name, m.addr, m.size, self.call.cow, primed=m.primed,
                                                          **kw))
        m.primed = True

    # -- calls ---------------------------------------------------------------------
    def setup_call(self, msg: dict[str, Any]) -> None:
        self.end_call()
        self.ewma_ns = -1  # a new fun: learn its shard time again (first shard measured)
        c = self.call
        c.call_id = msg["call_id"]
        c.cow = msg["cow"]
        c.entropy = msg["entropy"]
        c.seeded = msg["seeded"]
        c.diagnostics = msg["diagnostics"]
        c.desc = msg["desc"]
        self.set_heap_keep(0 if self.heap_refused else int(msg.get("heap_keep", 0)))
        kwargs: dict[str, Any] = {}
        for name, desc in msg["borrow"].items():
            kwargs[name] = self.borrowed_object(desc, name)
        for name, desc in msg["out"].items():
            kwargs[name] = self.out_array(desc)
        c.kwargs = kwargs
        c.donemap = DoneMap.attach(self.out_array(msg["donemap"]))
        c.fun = _Unpickler(msg["fun"], self).load()

    def end_call(self) -> None:
        c = self.call
        if self.guard is not None:
            for rid in c.guard_regions:
                try:
                    self.guard.unprotect(rid)
                except Exception:
                    pass
        # Give back the pages of inputs inherited at fork (shared with the
        # master, or private copies of written ones): idle workers must not
        # pin memory the master may free.  The range stays reserved and
        # inaccessible, so a stray reference faults instead of reading zeros.
        for root in c.inherited:
            lo, span = array_extent(root)
            a, b = inherit.interior(lo, lo + span, ll.PAGE_SIZE)
            if b > a:
                ll.seg_discard(a, b - a)
        self.call = CallState()
        if self.heap_keep:  # an idle worker keeps no freed memory
            self.heap_check()  # (turns reuse off for good if thread arenas grew)
            if self.heap_keep and not self._heap_trimmed():
                self._refuse_heap_reuse()

    # -- heap reuse (csrc/proc.c) ------------------------------------------------------
    def _thread_arena_growth(self, st: dict[str, int]) -> int:
        """Growth of the allocator's arenas since reuse was turned on, beyond the
        growth of the main heap (the program break): thread arenas."""
        arena0, brk0 = self.heap_arenas
        return (st["arena"] - arena0) - (st["brk"] - brk0)

    def set_heap_keep(self, keep: int) -> None:
        if keep == self.heap_keep:
            return
        self.heap_keep = keep if ll.heap_reuse(keep) else 0
        self.row.set_heap_kept(0)
        if self.heap_keep:
            st = ll.heap_stats()
            if st is None or not self._heap_trimmed():
                self._refuse_heap_reuse()
                return
            self.heap_arenas = (st["arena"], st["brk"])

    def _refuse_heap_reuse(self) -> None:
        """glibc's defaults for the rest of this process."""
        self.heap_refused = True
        self.heap_keep = 0
        self.row.set_heap_kept(0)
        ll.heap_reuse(0)

    def _own_anon(self) -> int | None:
        try:
            m = ll.proc_mem_fast(self.pid)
        except OSError:  # e.g. EMFILE: a shard that leaks file descriptors
            return None
        return None if m is None else m["anon"]

    def _heap_trimmed(self) -> bool:
        """Trim, and take the reference point: nothing freed is resident now."""
        ll.heap_trim()
        st, anon = ll.heap_stats(), self._own_anon()
        if st is None or anon is None:
            return False
        self.heap_ref = (anon, st["used"], st["free"])
        self.row.set_heap_kept(0)
        return True

    def heap_check(self, anon: int | None = None) -> None:
        """After a shard (or block) long enough to amortize it (~20 us): with heap
        reuse on, bound the freed memory the worker holds and publish an
        estimate of it for the master (kept memory is not drift).

        The estimate (a lower bound) is the growth of anonymous memory since
        the last trim not explained by growth of the memory in use, capped by
        the allocator's free bytes.  Trimmed holes still count as free although
        they are not resident (only they can make it too high, by at most their
        size); memory in use but never touched can make it too low, so the
        growth of free bytes since the trim bounds it from above.  Past either
        bound, or once thread arenas grow (their freed tops cannot be trimmed
        from here), the worker trims or stops keeping memory.  ``anon``: this
        process's anonymous memory if the caller just read it."""
        if not self.heap_keep:
            return
        st = ll.heap_stats()
        if anon is None:
            anon = self._own_anon()
        if st is None or anon is None:
            self._refuse_heap_reuse()
            return
        if self._thread_arena_growth(st) > 8 * 1024**2:
            self._refuse_heap_reuse()
            return
        anon0, used0, free0 = self.heap_ref
        resident = (anon - anon0) - (st["used"] - used0)
        if resident > self.heap_keep or st["free"] - free0 > self.heap_keep:
            if not self._heap_trimmed():
                self._refuse_heap_reuse()
            return
        self.row.set_heap_kept(max(0, min(resident, st["free"])))

    def _seed_legacy(self, sid: int) -> None:
        """Seed ``random`` and ``np.random`` from (seed, shard id), for legacy code."""
        state = np.random.SeedSequence(self.call.entropy, spawn_key=(sid, 1)).generate_state(2)
        np.random.seed(int(state[0]))
        random.seed(int(state[1]))

    def run_shard(self, sid: int) -> tuple:
        c = self.call
        shard = c.desc.shard(sid, (c.entropy, sid))  # type: ignore[union-attr]
        if c.seeded:
            self._seed_legacy(sid)
        row = self.row
        # Per-shard memory delta (anonymous memory, statm: ~8 us a read)
        # only where shards are long enough for that to be noise.
        long = self.ewma_ns < 0 or self.ewma_ns > 500_000
        measure = c.diagnostics and long
        m0 = ll.proc_mem_fast(self.pid)["anon"] if measure else 0
        t0 = row.shard_begin(sid)
        mark = 0
        try:
            if self.guard is not None and c.guard_regions:
                with self.guard.shard_scope(sid) as scope:
                    value = c.fun(shard, **c.kwargs)
                events = scope.events
            else:
                value = c.fun(shard, **c.kwargs)
                events = None
            ok, payload = OK, value
            mark = 1 if value is None else 2
        except BaseException as exc:  # noqa: BLE001 - everything is reported
            raised = exc
            if isinstance(exc, (SystemExit, KeyboardInterrupt)) and not isinstance(exc, Exception):
                exc = RuntimeError(f"shard {sid} raised {type(exc).__name__}({exc})")
            events = getattr(exc, "cow_events", None)
            ok, payload = ERR, _error_record(exc, sid)
            release_traceback(raised)
            release_traceback(exc)
            del raised
        t1 = row.shard_end(c.donemap, sid, mark)
        self.ewma_ns = (t1 - t0) if self.ewma_ns < 0 else (self.ewma_ns * 7 + (t1 - t0)) // 8
        m1 = ll.proc_mem_fast(self.pid)["anon"] if measure else None
        dmem = m1 - m0 if m1 is not None else None
        if long:
            self.heap_check(m1)
        return (sid, ok, payload, t0, t1, events, dmem)

    def run_chunk(self, ids: list[int]) -> list[tuple]:
        out = []
        for sid in ids:
            r = self.run_shard(sid)
            out.append(r)
            if r[5] and self.check_tainted():  # only a shard that wrote an input can taint
                break  # the rest of the chunk goes back to the master with this worker's exit
        return out

    def check_tainted(self) -> bool:
        """True once a shard wrote an inherited input beyond restoring (the
        worker must run no further shard; it exits with RETIRE_EXIT)."""
        if self.guard is not None:
            self.tainted += self.guard.take_lost()
        return bool(self.tainted)

    def retire(self) -> None:
        print(f"shardc worker {self.slot} (pid {self.pid}): retiring: a shard wrote more of inherited "
              f"input(s) {sorted(set(self.tainted))} than can be restored", file=sys.stderr)
        sys.stderr.flush()
        os._exit(RETIRE_EXIT)

    def send_results(self, call_id: int, results: list[tuple]) -> None:
        """Send a batch of outcomes.  Non-trivial return values are pickled one
        by one first, with ``ST_SENDING`` naming the shard: a value whose
        pickling fails fails only its shard, and one whose pickling blocks is
        the only shard the master charges when it kills this worker."""
        row = self.row
        out = []
        for r in results:
            if r[1] == OK and type(r[2]) not in _TRIVIAL:
                row.set_sending(r[0])
                try:
                    out.append((r[0], OK_PICKLED, pickle.dumps(r[2], protocol=5), *r[3:]))
                except Exception as exc:  # noqa: BLE001 - reported as that shard's failure
                    err = TypeError(f"the return value of shard {r[0]} cannot be pickled to send it "
                                    f"back: {exc}; return plain data or write into an out= buffer")
                    out.append((r[0], ERR, _error_record(err, r[0], deterministic=True), *r[3:]))
            else:
                out.append(r)
        row.set_sending(None)
        self.chan.send(("results", call_id, out))

    # -- main loop ------------------------------------------------------------------
    def loop(self) -> None:
        chan = self.chan
        pending: deque[tuple[Any, list[int]]] = deque()
        while True:
            if not pending:
                pending.append(chan.recv())
            msg, fds = pending.popleft()
            kind = msg[0]
            if kind == "run":
                call_id, ids = msg[1], msg[2]
                results = self.run_chunk(ids)
                # Chunks the master sent ahead are run before replying only
                # while they are short, so tiny shards cost one message per
                # few chunks, and long ones still report promptly.
                t_first = time.monotonic()
                more = chan.poll_nonblocking()
                pending.extend(more)
                while (pending and pending[0][0][0] == "run" and time.monotonic() - t_first < 0.002
                       and not self.tainted):
                    nxt, _ = pending.popleft()
                    results.extend(self.run_chunk(nxt[2]))
                    pending.extend(chan.poll_nonblocking())
                self.send_results(call_id, results)
                del results  # return values must not live on in an idle worker
                if self.tainted:
                    self.retire()
            elif kind == "call":
                try:
                    self.adopt(msg[1].get("segments", []), fds)
                    self.setup_call(msg[1])
                    chan.send(("ready", msg[1]["call_id"], None))
                except BaseException as exc:  # noqa: BLE001
                    chan.send(("ready", msg[1]["call_id"], _error_record(exc, None)))
            elif kind == "queue":
                from .dispatch_queue import worker_queue_loop
                worker_queue_loop(self, msg[1], fds)
            elif kind == "end":
                self.end_call()
            elif kind == "forget":
                self.forget(msg[1])
            elif kind == "ping":
                chan.send(("pong", msg[1], None))
            elif kind == "exit":
                return



def release_traceback(exc: BaseException) -> None:
    """Drop the frames of a recorded shard exception and of its chain.

    Their locals hold fun's arguments (views of mapped inputs and out
    buffers) and the loop's own state (a call's task ring): whatever still
    holds the exception, e.g. a reference cycle through a frame, would keep
    those mapped until the cyclic GC ran.  Measured before this: three
    mappings left behind per call with a failed shard."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]


_CONTROLLER: Any = None


def _threadpool_controller() -> Any:
    """threadpoolctl's controller, built once per master (None without threadpoolctl)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
            _CONTROLLER = ThreadpoolController()
        except Exception:  # noqa: BLE001
            _CONTROLLER = False
    return _CONTROLLER or None


def _stop_openblas_threads(ctl: Any) -> None:
    """Stop the thread pool that OpenBLAS (pthreads build) starts in a forked child.

    OpenBLAS shuts its threads down before every fork and restarts them lazily;
    ``openblas_set_num_threads`` (called by ``ctl.limit`` above) is such a restart,
    and each new thread busy-waits for work for ~0.1 s (``THREAD_TIMEOUT``, 2^28
    cycles).  On a full machine that spin takes ~0.1 s of CPU per worker start
    from the kernels (measured: the first shard after a fork ran 40 ms slower).
    With the thread count at 1, OpenBLAS never needs its pool again, so shut it
    down; a later ``threadpool_limits`` raise restarts it as usual."""
    for lc in getattr(ctl, "lib_controllers", ()):
        if getattr(lc, "internal_api", None) != "openblas" or getattr(lc, "threading_layer", None) != "pthreads":
            continue
        try:
            lc.dynlib.blas_thread_shutdown_()
        except (AttributeError, OSError):  # an OpenBLAS without the symbol: keep its pool
            pass


# Set by the pool just before fork.  Linux sends PDEATHSIG when the *thread*
# that forked the worker exits, not the process: a pool used from a
# short-lived thread (a re-fork for an inherited input, a replacement) would
# lose its workers with that thread.  So workers forked from another thread
# than the main one rely on their socket (EOF = master gone) instead.
_death_signal = signal.SIGKILL


def after_fork(parent_pid: int, packages: list[str], init_expr: Any) -> None:
    """Make a freshly forked child a well-behaved worker."""
    if ll.proc_after_fork(parent_pid, _death_signal) < 0:
        os._exit(70)  # the master died before we armed PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Fork copied the master's RNG states: give every worker its own.
    random.seed()
    np.random.seed(int.from_bytes(os.urandom(4), "little"))
    # One BLAS/OpenMP thread per worker: the pool is the parallelism.  The
    # controller was built in the master before fork (inspecting loaded
    # libraries costs ~20 ms); here it only calls set_num_threads (< 1 ms).
    ctl = _threadpool_controller()
    if ctl is not None:
        try:
            ctl.limit(limits=1)
        except Exception:  # noqa: BLE001 - best effort
            pass
        _stop_openblas_threads(ctl)
    for mod in packages:
        __import__(mod)
    if init_expr is not None:
        if callable(init_expr):
            init_expr()
        else:
            exec(compile(init_expr, "<init_expr>", "exec"), {"__name__": "__shardc_init__"})


def worker_entry(slot: int, sock: Any, status: StatusTable, parent_pid: int, packages: list[str],
                 init_expr: Any, init_blob: bytes | None, guard_wanted: bool) -> None:
    """Entry point in the child after fork; never returns."""
    code = 0
    try:
        os.environ["SHARDC_WORKER"] = str(slot)
        status.row(slot).set_pid(os.getpid())
        if init_blob is not None:
            init_expr = cloudpickle.loads(init_blob)
        after_fork(parent_pid, packages, init_expr)
        w = Worker(slot, Channel(sock), status)
        if guard_wanted:
            try:
                from . import guard
                guard.install()
                w.guard = guard
            except ImportError:
                w.guard = None
        w.chan.send(("hello", os.getpid(), None))
        w.loop()
    except ChannelClosed:
        code = 0  # the master went away: nothing left to do
    except BaseException:  # noqa: BLE001
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        code = 71
    finally:
        os._exit(code)
