"""A worker's life: after-fork setup, the message loop, a call's setup and
teardown, and the segments it maps.

::

    fork() ── after_fork(): PDEATHSIG (or, without one, a thread that watches
       │      the master's exit) + parent check, SIGINT ignored,
       │      BLAS/OpenMP limited to 1 thread, RNGs reseeded, packages and
       │      init_expr run
       ▼
    loop: recv a message from the master (the socket is also the lifeline:
       │  EOF = master gone = exit)
       ├─ CALL    set up a call: unpickle fun once, map borrowed inputs
       │          (MAP_PRIVATE, read-only, guarded per cow) and out buffers
       │          (MAP_SHARED) from fds sent; cache them -> READY (none if its work follows)
       ├─ RUN     rpc_chunked: worker.rpc.run_chunks (ShardExecutor.run_ids per
       │          chunk) -> RESULTS (and RETURNED: queued chunks behind a long one)
       ├─ QUEUE   shm_queue: queue_loop.run_queue_call (ShardExecutor.run_block
       │          per block) until the ring closes -> QDONE
       ├─ END     drop the call's state (one sent with a small call's work is void
       │          once the worker handed chunks of that call back)
       ├─ FORGET  close segments the master closed
       └─ EXIT    leave (recycling, pool stop)

The worker never returns into the caller's frames: it ends with os._exit.
Shards run only in :mod:`shardc.worker.executor`; this module decides when.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import random
import select
import signal
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, NoReturn

import cloudpickle
import numpy as np
import numpy.random  # NumPy imports it lazily: once here, not in every forked worker (~10 ms)

from .. import _lowlevel as ll
from .. import config, inherit
from .. import guard as _guard
from .._channel import Channel, ChannelClosed
from ..protocol import (
    CALL,
    END,
    EXIT,
    FORGET,
    HELLO,
    QUEUE,
    READY,
    RUN,
    RUN_CAREFUL,
    error_record,
    fun_key,
    work_call,
)
from ..segment import Segment
from ..share import array_extent, view_array
from ..status import DoneMap, StatusTable
from .executor import ShardExecutor
from .heap import END_SLACK, HeapPolicy, quiet_thread
from .queue_loop import run_queue_call
from .rpc import run_chunks

# A worker this long without a message after a call's END is idle: it runs the
# heap's end-of-call check then (see Worker.end_call).
IDLE_HEAP_S = 0.002
FUN_TIMES = 8


def _shared_key(d: dict[str, Any]) -> tuple[Any, ...]:
    if d["kind"] == "inherited":  # an open call's task argument inherited at fork
        return ("inherited", d["token"])
    return (tuple(d["segs"]), d["offset"], d["shape"], d["strides"], str(d["dtype"]))


class _Unpickler(pickle.Unpickler):
    """Resolves shardc objects captured by ``fun`` (sent by reference)."""

    def __init__(self, data: bytes, worker: Worker, memo: dict[Any, Any] | None = None) -> None:
        super().__init__(io.BytesIO(data))
        self.worker = worker
        self.shared_memo = memo  # shared objects already mapped this call (tasks of an open call)

    def persistent_load(self, pid: Any) -> Any:
        tag, desc = pid
        if tag == "buffer":
            return self.worker.out_array(desc)
        if tag == "shared":
            if self.shared_memo is None:
                return self.worker.borrowed_object(desc, desc.get("label", "captured"))
            key = _shared_key(desc)
            obj = self.shared_memo.get(key)
            if obj is None:
                obj = self.shared_memo[key] = self.worker.borrowed_object(desc, desc.get("label", "argument"))
            return obj
        raise pickle.UnpicklingError(f"unknown persistent id {tag!r}")


class Worker:
    """The state of one worker process: its channel, segments and mappings,
    and the executor that runs its call's shards."""

    def __init__(self, slot: int, chan: Channel, status: StatusTable, guard: Any) -> None:
        self.slot = slot
        self.chan = chan
        self.row = status.row(slot)
        self.pid = os.getpid()
        self.guard = guard  # the shardc.guard module, or None without page guards
        self.segments: dict[str, Segment] = {}
        self.shared_maps: dict[str, ll.Mapping] = {}
        self.private_maps: dict[str, ll.Mapping] = {}
        self.heap = HeapPolicy(self.row, self.pid)
        self.heap_idle = False  # a call ended: its heap check waits for the worker to be idle (loop)
        self.returned_call = 0  # the last call it handed chunks of back (rpc.give_back)
        self.ex = ShardExecutor(self.row, guard, self.heap)
        self.task_objects: dict[Any, Any] = {}  # see load_task
        self.last_fun = fun_key(None)  # (protocol.fun_key) of the last call's fun
        self.fun_times: dict[tuple[int, int], int] = {}  # such keys -> shard time (ns), the last FUN_TIMES
        self._dm: tuple[tuple[Any, ...], Any, DoneMap] | None = None  # the last done map (see _donemap)

    # -- segments ----------------------------------------------------------------
    def adopt(self, infos: list[dict[str, Any]], fds: list[int]) -> None:
        for info, fd in zip(infos, fds, strict=True):
            old = self.segments.pop(info["key"], None)
            if old is not None:
                old.close()
            self.segments[info["key"]] = Segment.adopt(fd, info["size"], info["backing"], info["name"], info["key"])

    def _donemap(self, d: dict[str, Any]) -> DoneMap:
        """The call's done map: the last call's handle when it is the same region of the same
        mapping (the pool keeps one map for its small calls), else a new one."""
        key = (d["segs"][0], d["offset"], d["shape"])
        held = self._dm
        if held is None or held[0] != key or self.shared_maps.get(key[0]) is not held[1]:
            arr = self.out_array(d)
            held = self._dm = (key, self.shared_maps[key[0]], DoneMap.attach(arr))
        return held[2]

    def forget(self, keys: list[str]) -> None:
        if self._dm is not None and self._dm[0][0] in keys:
            self._dm = None  # (its mapping goes: not kept alive by the handle)
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
        c = self.ex.call
        if d["kind"] == "inherited":
            arr = inherit.lookup(d["token"])
            root = inherit.root_of(arr)
            view = arr.view()  # the same memory; fun gets an object of its own
            # (The master inherits only into pools with page guards.)
            c.guard_regions.append(self.guard.protect_inherited(name, view, root, c.cow))
            if not any(r is root for r in c.inherited):
                c.inherited.append(root)
            return view
        if d["kind"] == "array":
            m = self._private_map(d["segs"][0])
            arr = view_array(m, d["dtype"], d["shape"], d["strides"], d["offset"], writeable=True)
            self._protect(name, m, arr)
            return arr
        bufs = []
        for i, n in d["buffers"]:
            m = self._private_map(d["segs"][i])
            self._protect(name, m, None)
            bufs.append(memoryview(m.buffer())[:n])
        return pickle.loads(d["payload"], buffers=bufs)

    def _protect(self, name: str, m: ll.Mapping, arr: np.ndarray | None) -> None:
        if self.guard is None:
            return
        kw = {}
        if arr is not None:
            kw = {
                "itemsize": arr.itemsize,
                "shape": arr.shape,
                "strides": arr.strides,
                "offset0": arr.ctypes.data - m.addr,
            }
        c = self.ex.call
        c.guard_regions.append(self.guard.protect(name, m.addr, m.size, c.cow, primed=m.primed, **kw))
        m.primed = True

    # -- calls ---------------------------------------------------------------------
    def setup_call(self, msg: dict[str, Any]) -> None:
        self.end_call()
        c = self.ex.call
        c.call_id = msg["call_id"]
        c.cow = msg["cow"]
        c.entropy = msg["entropy"]
        c.seeded = msg["seeded"]
        c.diagnostics = msg["diagnostics"]
        c.desc = msg["desc"]
        self.heap.set_keep(int(msg.get("heap_keep", 0)))
        self.heap_idle = False  # (the last call's check: this one goes on with its heap)
        kwargs: dict[str, Any] = {}
        for name, desc in msg["borrow"].items():
            kwargs[name] = self.borrowed_object(desc, name)
        for name, desc in msg["out"].items():
            kwargs[name] = self.out_array(desc)
        c.kwargs = kwargs
        c.borrowed = frozenset(msg["borrow"])
        c.donemap = self._donemap(msg["donemap"])
        c.fun = _Unpickler(msg["fun"], self).load()
        if msg.get("value_sink") is not None:  # a front end's value sink (ShardExecutor's ValueSink)
            c.value_sink = msg["value_sink"].open(self.slot, c.call_id)
        # The shard time of each of the last few funs (by pickle), so calls alternating between
        # functions keep their guesses (a guess of the shard time rides on the key, nothing more).
        times = self.fun_times
        if self.ex.ewma_ns >= 0:
            times.pop(self.last_fun, None)
            times[self.last_fun] = self.ex.ewma_ns
            if len(times) > FUN_TIMES:
                del times[next(iter(times))]
        key = fun_key(msg["fun"])
        self.ex.begin_call(times.get(key, -1))
        self.last_fun = key

    def end_call(self) -> None:
        self.task_objects.clear()
        c = self.ex.end_call()
        if c.value_sink is not None:
            try:
                c.value_sink.abort()
            except Exception:  # noqa: BLE001, S110 - best effort: the master removes what is left
                pass
        if self.guard is not None:
            for rid in c.guard_regions:
                try:
                    self.guard.unprotect(rid)
                except Exception:  # noqa: BLE001, S110 - best effort: the next call re-protects
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
        # The heap's end-of-call check (an idle worker keeps no freed memory):
        # now if the call's last check found memory worth giving back, else
        # once the worker is idle for IDLE_HEAP_S (loop).  It costs ~30 us, on
        # the next call's critical path when small calls come in a row, which
        # go on with the heap as shards within one call do (kept <= keep).
        if self.heap.kept > END_SLACK:
            self.heap.end_call()
        else:
            self.heap_idle = True

    # -- rpc_chunked (shardc.worker.rpc) ------------------------------------------------------
    def chunk_ids(self, msg: tuple, fds: list[int]) -> list[int]:
        """A RUN message's ids; per-id data riding with them (an open call's tasks) goes to the
        call's descriptor first (:meth:`load_task` unpickles it; segments sent along adopted)."""
        if len(msg) > 3:
            if len(msg) > 4:
                self.adopt(msg[4], fds)
                self.map_shared(msg[5])
            self.ex.call.desc.feed(msg[2], msg[3], self.load_task)
        return msg[2]

    def map_shared(self, descs: list[dict[str, Any]]) -> None:
        """Map (and guard, per the call's cow policy) the arrays an open call's tasks refer to, before
        they run, once per call; the executor binds the guard scope again when the first ones appear."""
        fresh = False
        for d in descs:
            key = _shared_key(d)
            if key not in self.task_objects:
                self.task_objects[key] = self.borrowed_object(d, d.get("label", "task argument"))
                fresh = True
        if fresh:
            self.ex.begin_call()

    def load_task(self, blob: bytes) -> Any:
        """Unpickle an open call's task (arrays in segments mapped read-only per the cow policy, once)."""
        return _Unpickler(blob, self, self.task_objects).load()

    def run_chunks(self, msg: tuple, pending: deque[tuple[Any, list[int]]], fds: list[int] | None = None) -> None:
        """Run a RUN message's chunk and the short ones queued behind it (:func:`.rpc.run_chunks`)."""
        run_chunks(self, msg, pending, fds)

    # -- main loop ------------------------------------------------------------------
    def loop(self) -> None:
        chan = self.chan
        pending: deque[tuple[Any, list[int]]] = deque()
        broken = 0  # a call whose setup failed: work sent right behind its CALL is dropped
        while True:
            if not pending:
                if self.heap_idle:
                    self.heap_idle = False
                    if not chan.wait(IDLE_HEAP_S):
                        self.heap.end_call()
                pending.append(chan.recv())
            msg, fds = pending.popleft()
            kind = msg[0]
            if kind in (RUN, RUN_CAREFUL):
                if msg[1] != broken:
                    self.run_chunks(msg, pending, fds)
            elif kind == CALL:
                cid = msg[1]["call_id"]
                try:
                    self.adopt(msg[1].get("segments", []), fds)
                    self.setup_call(msg[1])
                    pending.extend(chan.poll_nonblocking())  # its work here already: that answers
                    if not (pending and work_call(pending[0][0]) == cid):
                        chan.send((READY, cid, None))
                except BaseException as exc:  # noqa: BLE001 - reported to the master
                    broken = cid
                    chan.send((READY, cid, error_record(exc, None)))
            elif kind == QUEUE and msg[1]["call_id"] != broken:
                run_queue_call(self.slot, chan, self.row, self.ex, msg[1], fds)
            elif kind == END:
                if len(msg) == 1 or msg[1] != self.returned_call:
                    self.end_call()
            elif kind == FORGET:
                self.forget(msg[1])
            elif kind == EXIT:
                return


_CONTROLLER: Any = None


def _threadpool_controller() -> Any:
    """threadpoolctl's controller, built once per master (None without threadpoolctl)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController  # optional dependency

            _CONTROLLER = ThreadpoolController()
        except Exception:  # noqa: BLE001 - no threadpoolctl, or it failed: no limits
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


def limit_arrow() -> None:
    """Cap pyarrow in this worker, as BLAS is, if pyarrow is loaded: one CPU
    and one IO thread (the pool is the parallelism), and the system allocator
    as its default memory pool, so that memory it frees goes back to libc and
    the heap policy sees it, instead of being retained by jemalloc/mimalloc
    arenas that would read as drift (a recycle).  Arrow re-creates its thread
    pools in a forked child (its at-fork handlers), so a master that used
    pyarrow's threads forks safe workers.  Called after fork and by front ends
    that load pyarrow in a worker (the tables' sinks)."""
    pa = sys.modules.get("pyarrow")
    if pa is None:
        return
    try:
        pa.set_cpu_count(1)
        pa.set_io_thread_count(1)
        pa.set_memory_pool(pa.system_memory_pool())
    except Exception:  # noqa: BLE001, S110 - best effort, like the BLAS limit
        pass


def _watch_parent(parent_pid: int) -> None:
    """Exit when the master is gone, for a worker without a parent-death signal
    (its socket's EOF misses a worker polling the task ring or in a long
    shard): a daemon thread waits for a kqueue ``NOTE_EXIT`` event on macOS,
    else polls ``getppid()`` (orphans are re-parented) every 0.2 s."""

    def watch() -> None:
        if sys.platform == "darwin":
            try:
                kq = select.kqueue()
                ev = select.kevent(
                    parent_pid, filter=select.KQ_FILTER_PROC, flags=select.KQ_EV_ADD, fflags=select.KQ_NOTE_EXIT
                )
                kq.control([ev], 0)
                while os.getppid() == parent_pid:
                    kq.control(None, 1, 1.0)  # the 1 s bound re-checks a death before the ADD
            except OSError:
                pass  # no such process already, or no kqueue support: poll below
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(0)  # the master went away: nothing left to do (as on EOF)

    t = threading.Thread(target=watch, name="shardc-parent-watch", daemon=True)
    t.start()
    quiet_thread(t.ident)  # (its wake-ups every 0.2 s do not turn heap reuse off)


def after_fork(parent_pid: int, packages: list[str], init_expr: Any, death_signal: int = signal.SIGKILL) -> None:
    """Make a freshly forked child a well-behaved worker (``death_signal``:
    PDEATHSIG, 0 for none: the pool's choice for this fork).  Portable mode
    (``SHARDC_PORTABLE=1``) arms none, as on macOS: the worker learns of the
    master's death from its socket's EOF."""
    if config.get_bool("SHARDC_PORTABLE"):
        death_signal = 0
    if ll.proc_after_fork(parent_pid, death_signal) < 0:
        os._exit(70)  # the master died before we armed PDEATHSIG
    if death_signal == 0:
        _watch_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _batch_policy()
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
        except Exception:  # noqa: BLE001, S110 - best effort
            pass
        _stop_openblas_threads(ctl)
    limit_arrow()
    for mod in packages:
        __import__(mod)
    if init_expr is not None:
        if callable(init_expr):
            init_expr()
        else:
            exec(compile(init_expr, "<init_expr>", "exec"), {"__name__": "__shardc_init__"})  # noqa: S102 - the user's init code
    gc.freeze()  # what it holds now (the master's objects, imports) is out of its GC: not walked, pages not touched


def _batch_policy() -> None:
    """SCHED_BATCH (Linux; ``SHARDC_WORKER_SCHED``): a worker woken by the
    master's send does not preempt it.  Under SCHED_OTHER the first worker
    handed a small call's work ran at once on the master's CPU, the master
    resumed (to send the next worker its work) only when that worker blocked,
    and the workers ran one after the other: ~50 us more per 10-shard call on
    2 cores.  The CPU share is that of SCHED_OTHER at the same nice value; the
    policy is inherited by a shard's threads and child processes."""
    if config.get_str("SHARDC_WORKER_SCHED") != "batch" or not hasattr(os, "SCHED_BATCH"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:  # refused (a seccomp profile): the default policy
        pass


def worker_entry(
    slot: int,
    sock: Any,
    status: StatusTable,
    parent_pid: int,
    packages: list[str],
    init_expr: Any,
    init_blob: bytes | None,
    guard_wanted: bool,
    death_signal: int = signal.SIGKILL,
) -> NoReturn:
    """Entry point in the child after fork; never returns."""
    code = 0
    try:
        os.environ["SHARDC_WORKER"] = str(slot)
        status.row(slot).set_pid(os.getpid())
        if init_blob is not None:
            init_expr = cloudpickle.loads(init_blob)
        after_fork(parent_pid, packages, init_expr, death_signal)
        guard = None
        if guard_wanted:
            _guard.install()
            guard = _guard
        w = Worker(slot, Channel(sock), status, guard)
        w.chan.send((HELLO, os.getpid(), None))
        w.loop()
    except ChannelClosed:
        code = 0  # the master went away: nothing left to do
    except BaseException:  # noqa: BLE001 - printed, then exit 71
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001, S110 - stderr closed: nothing left to tell
            pass
        code = 71
    finally:
        os._exit(code)
