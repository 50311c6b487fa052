"""The node agent: ``python -m shardc.cluster.agent FD IDLE``, one per node and caller session.

Started by :mod:`shardc.cluster.node` inside a Dask/Ray worker process as a
*new* process (never a fork of that worker: its threads make ``fork()``
unsafe), the agent is single-threaded when its own pool forks.  It serves
every call of its caller's session (:mod:`.session`), one macro-shard at a
time, on one local pool that lives as long as it does.  It talks to its
starter over the unix socket ``FD`` (:class:`shardc._channel.Channel`
frames, file descriptors by ``SCM_RIGHTS``)::

    starter                                           agent
      JOB job_id {fun, desc, inputs, outs, ...}
          new inputs [(key, bytes)] + their memfds,
          keep [every key the caller holds]  ->   check version + build stamp,
                                                  map the new inputs, drop keys not kept
                                           <- READY {pid} | REFUSED "why"
      RUN job_id (macro id, lo, hi)        ->   shard_map(window lo..hi, ...) on the local pool
                                           <- DONE reply | DONE_FD nbytes + a memfd holding it
                                              (.reply: values, failures, out runs, stats)
      (the next JOB, or END job_id)        ->   the call is over: its out buffers become spares
      STOP (or EOF: the starter died)      ->   stop the pool, exit
      (nothing for IDLE seconds)           ->   exit

Borrowed inputs arrive as memfds the starter filled from the engine's copy,
once per content key: the agent maps each one read-only and passes the array
as ``borrow=``, where it is found in a live segment and goes to the pool by
reference (zero-copy).  Out buffers are local ``shardc.buffer``s per call,
started from the caller's bytes; after each macro-shard
:func:`shardc.cluster.outs.take_diff` says what its shards wrote.  An ended
call's out buffers (and snapshots) are kept for the next call of the same
dtype and shape (``Agent.spare``, up to :data:`SPARE_BYTES`), refilled from
that call's start bytes.  Return values stay the pickles the workers made
(``shardc.call.values_pickled``): the reply carries them as they are and the
caller unpickles each once.  Every shard
runs with all of shardc's local supervision (retries, timeouts, mem_cap, cow
guards; a write to a borrowed input never reaches the shared segment, so the
cached bytes stay the caller's).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
import time
from typing import Any

import numpy as np

from .. import _lowlevel as ll
from .._channel import Channel, ChannelClosed
from .._version import __version__
from ..buffer import Buffer, buffer
from ..call import values_pickled
from ..diagnostics.lanes import worker_spans
from ..kernels import _registry
from ..map import shard_map
from ..pool import pool_stop
from ..protocol import PickledValue
from ..segment import Segment
from ..shards import ShardDescriptor
from .outs import byte_view, rollback, take_diff
from .reply import INLINE_MAX
from .reply import pack as reply_pack
from .reply import size as reply_size
from .reply import to_bytes as reply_bytes
from .reply import to_memfd as reply_memfd
from .window import WindowDescriptor

log = logging.getLogger("shardc")

SPARE_BYTES = 256 << 20  # bytes an agent keeps between calls in spare out buffers and their snapshots (Agent.spare)


def check_versions(job: dict[str, Any]) -> str | None:
    """None if the caller's shardc version and build stamp are this agent's, else why not."""
    mine = (__version__, ll.build_stamp())
    theirs = (job.get("version"), job.get("stamp"))
    if mine == theirs:
        return None
    return (
        f"the shardc agent on {socket.gethostname()} (pid {os.getpid()}, {sys.executable}) runs shardc "
        f"{mine[0]} built {mine[1]}, but the caller runs shardc {theirs[0]} built {theirs[1]}; install the "
        "same shardc build on every node (a different native module could disagree on shared layouts)"
    )


def _map_segment(key: str, nbytes: int, fd: int) -> tuple[Segment | None, np.ndarray]:
    """The memfd ``fd`` of ``nbytes`` mapped read-only, as flat bytes (zero-copy)."""
    if nbytes == 0:  # nothing to map (an mmap of 0 bytes is refused)
        os.close(fd)
        return None, np.zeros(0, dtype=np.uint8)
    seg = Segment.adopt(fd, nbytes, "memfd", f"cluster-{key[:12]}", f"cluster.{os.getpid()}.{key}")
    raw = np.frombuffer(seg.mapping(writable=False).buffer(), dtype=np.uint8, count=nbytes)
    return seg, raw


def _view(spec: dict[str, Any], raw: np.ndarray) -> Any:
    """The borrowed input ``spec`` over its cached bytes ``raw`` (read-only; arrays zero-copy)."""
    if spec.get("kind") == "object":
        return pickle.loads(raw.data)
    if spec["nbytes"] == 0:
        arr = np.empty(spec["shape"], dtype=spec["dtype"])
    else:
        arr = raw.view(spec["dtype"]).reshape(spec["shape"], order=spec.get("order", "C"))
    arr.flags.writeable = False
    return arr


class Agent:
    """A node's agent: the inputs it holds (by content key) and the calls it serves.

    One agent serves every call of its caller's session on this node, one
    macro-shard at a time, on one local pool that lives as long as the agent.
    ``inputs`` maps a content key to the mapped segment holding those bytes;
    each JOB says which keys the caller still holds (the others are dropped)
    and brings memfds for the keys this agent lacks.
    """

    def __init__(self) -> None:
        self.inputs: dict[str, tuple[Segment | None, np.ndarray]] = {}
        self.jobs: dict[str, Job] = {}
        self.peak_rss = 0
        # Out buffers of ended calls (with their snapshots), one per dtype and shape, for
        # the next call's: no new segment to fault in, map in every worker and unmap
        # after (a repeated call of 2M tiny shards spent ~40 ms on its 16 MB buffer).
        self.spare: dict[tuple[np.dtype, tuple[int, ...]], tuple[Buffer, np.ndarray]] = {}

    def take_spare(self, dtype: Any, shape: Any) -> tuple[Buffer, np.ndarray] | None:
        return self.spare.pop((np.dtype(dtype), tuple(shape)), None)

    def give_spare(self, buf: Buffer, snap: np.ndarray) -> None:
        key = (buf.array.dtype, tuple(buf.array.shape))
        kept = sum(b.array.nbytes + s.nbytes for b, s in self.spare.values())
        if key in self.spare or kept + buf.array.nbytes + snap.nbytes > SPARE_BYTES:
            buf.close()
        else:
            self.spare[key] = (buf, snap)

    def add_job(
        self, job_id: str, job: dict[str, Any], new: list[tuple[str, int]], keep: list[str], fds: list[int]
    ) -> None:
        """Take the new inputs (their fds, in order), drop the keys the caller let go, set up the call."""
        for (key, nbytes), fd in zip(new, fds, strict=True):
            old = self.inputs.pop(key, None)
            if old is not None and old[0] is not None:
                old[0].close()
            self.inputs[key] = _map_segment(key, nbytes, fd)
        wanted = set(keep)
        for key in [k for k in self.inputs if k not in wanted]:
            seg = self.inputs.pop(key)[0]
            if seg is not None:
                seg.close()
        # A session runs one call at a time: a new call ends the earlier ones here (their
        # out buffers become this call's spares), so a call's end costs no round trip.
        for old_id in list(self.jobs):
            self.end_job(old_id)
        self.jobs[job_id] = Job(job, {k: v[1] for k, v in self.inputs.items()}, self)

    def end_job(self, job_id: str) -> None:
        j = self.jobs.pop(job_id, None)
        if j is not None:
            j.close(self)

    def close(self) -> None:
        for j in self.jobs.values():
            j.close(None)
        self.jobs.clear()
        for buf, _ in self.spare.values():
            buf.close()
        self.spare.clear()
        pool_stop()
        for seg, _ in self.inputs.values():
            if seg is not None:
                seg.close()
        self.inputs.clear()


class Job:
    """One call's state on a node (see the module docstring)."""

    def __init__(self, job: dict[str, Any], raw: dict[str, np.ndarray], agent: Agent) -> None:
        self.job = job
        self.desc: ShardDescriptor = job["desc"]
        self.fun = pickle.loads(job["fun"]) if job["fun"] is not None else None
        self.kernel = job["kernel_name"]
        if job["kernel"] is not None:
            _registry[job["kernel_name"]] = pickle.loads(job["kernel"])
        self.local = dict(job["local"])
        self.borrow = {s["name"]: _view(s, raw[s["key"]]) for s in job["borrow"]}
        self.out: dict[str, Any] = {}
        self.snap: dict[str, np.ndarray] = {}
        for s in job["out"]:
            spare = agent.take_spare(s["dtype"], s["shape"])
            buf = buffer(s["dtype"], s["shape"]) if spare is None else spare[0]
            if s["init"]:
                buf.array[...] = _view({**s, "kind": "array", "order": "C"}, raw[s["key"]])
            elif spare is not None:
                byte_view(buf.array)[:] = 0  # as a fresh buffer starts
            self.out[s["name"]] = buf
            if spare is None:
                self.snap[s["name"]] = byte_view(buf.array).copy()
            else:
                self.snap[s["name"]] = spare[1]
                np.copyto(spare[1], byte_view(buf.array))
        self.tuned: int | None = None  # the chunk/block size the first macro-shards' autotune settled on

    def _options(self) -> dict[str, Any]:
        """The local options; once autotune settled, its size, fixed: every macro-shard
        is a call of its own, and would otherwise tune again from probe blocks."""
        opts = dict(self.local)
        if self.tuned is None or not opts.get("autotune"):
            return opts
        opts["autotune"] = False
        if opts["dispatch_mode"] == "shm_queue":
            opts["dispatch_opts"] = {**(opts.get("dispatch_opts") or {}), "block_size": self.tuned}
        else:
            opts["chunk_size"] = self.tuned
        return opts

    def run(self, lo: int, hi: int, agent: Agent) -> dict[str, Any]:
        """Run shards lo..hi-1 on the local pool; what they returned and wrote."""
        t0 = time.perf_counter()
        kw: dict[str, Any] = {"kernel": self.kernel} if self.kernel is not None else {}
        try:
            # Values stay in the pickles their workers made (PickledValue): forwarded to
            # the caller as they are, unpickled once, there (not here and pickled again).
            with values_pickled():
                res = shard_map(
                    WindowDescriptor(self.desc, lo, hi),
                    self.fun,
                    borrow=self.borrow,
                    out={n: b for n, b in self.out.items()},
                    on_failure="collect",
                    progress=False,
                    **kw,
                    **self._options(),
                )
        except BaseException:
            for name, buf in self.out.items():
                rollback(byte_view(buf.array), self.snap[name])
            raise
        wall = time.perf_counter() - t0
        runs = {name: take_diff(byte_view(buf.array), self.snap[name]) for name, buf in self.out.items()}
        failures = {}
        for k, f in res.failures.items():
            f.shard_id = lo + k
            failures[lo + k] = f
        # The values; None when every one is None (nothing to send: 2M Nones cost ~40 ms
        # of pickling here and there).  shm_queue gathers none (not even made into a list).
        values: list[Any] | None = None
        pickled: list[int] = []
        if res.diagnostics.mode != "shm_queue":
            values = list(res.results)
            for k in res.failures:  # the failures travel (with global ids) on their own
                values[k] = None
            if values.count(None) == len(values):
                values = None
            elif PickledValue in set(map(type, values)):  # C-speed looks first: most are None or plain
                # Still their workers' pickles: the caller loads them.
                pickled = [k for k, v in enumerate(values) if type(v) is PickledValue]
        d = res.diagnostics
        if self.tuned is None and d.autotune:
            # The size autotune settled on while shards were plentiful: its last
            # steps shrink the chunks to balance the call's tail (down to 1), a
            # size that would send every later macro-shard's shards one by one.
            self.tuned = max(int(e["chunk_to"]) for e in d.autotune)
        mem = d.worker_memory()
        agent.peak_rss = max(agent.peak_rss, ll.own_rss())
        return {
            "values": values,
            "pickled": pickled,
            "failures": failures,
            "runs": runs,
            "seconds": wall,
            "workers": res.pool_stats.get("workers"),
            "worker_pids": sorted({p for s in res.pool_stats.get("status", []) for p in [s.get("pid")] if p}),
            "lanes": worker_spans(d),
            "retries": d.retries,
            "events": [f"{e['event']}: worker {e['worker']}: {e['reason']}" for e in d.events],
            "worker_peak_uss": sum(r["peak_uss"] for r in mem.values()),
            "agent_peak_rss": agent.peak_rss,
        }

    def close(self, agent: Agent | None) -> None:
        """The call is over: its out buffers go to ``agent``'s spares (closed if None)."""
        for name, buf in self.out.items():
            if agent is None:
                buf.close()
            else:
                agent.give_spare(buf, self.snap[name])
        self.out.clear()
        self.snap.clear()


def _refusal(exc: BaseException) -> str:
    return f"the shardc agent on {socket.gethostname()} could not set up the call: {type(exc).__name__}: {exc}"


def serve(chan: Channel, idle_timeout: float) -> int:
    """The agent's loop; returns the exit code."""
    agent = Agent()
    try:
        while True:
            chan.sock.settimeout(idle_timeout)
            try:
                msg, fds = chan.recv()
            except TimeoutError:
                log.warning("shardc agent %d: no work for %g s, its caller is gone: exiting", os.getpid(), idle_timeout)
                return 4
            except (ChannelClosed, ConnectionResetError):
                return 0  # the starter (the engine's worker) is gone (killed: a reset)
            chan.sock.settimeout(None)
            if msg[0] == "STOP":
                return 0
            if msg[0] == "END":
                agent.end_job(msg[1])
                continue
            if msg[0] == "JOB":
                _, job_id, job, new, keep, idle = msg
                why = check_versions(job)
                if why is not None:
                    for fd in fds:
                        os.close(fd)
                    chan.send(("REFUSED", why))
                    return 3  # another build: this process can serve no call of this caller
                try:
                    agent.add_job(job_id, job, new, keep, fds)
                except Exception as exc:  # noqa: BLE001 - fun or an input does not load here: the caller says why
                    chan.send(("REFUSED", _refusal(exc)))
                    continue
                idle_timeout = idle
                chan.send(("READY", {"pid": os.getpid(), "host": socket.gethostname()}))
                continue
            if msg[0] != "RUN":
                chan.send(("ERROR", -1, f"unknown message {msg[0]!r}"))
                continue
            _, job_id, mid, lo, hi = msg
            reply: tuple[Any, ...]
            fds = []
            try:
                # Packed here, once (.reply): the starter forwards the bytes as they are; a
                # big reply goes in a memfd the starter maps (no copy through this socket).
                body = agent.jobs[job_id].run(lo, hi, agent)
                pieces = reply_pack(body, body["values"], body["pickled"])
                if reply_size(pieces) <= INLINE_MAX:
                    reply = ("DONE", mid, reply_bytes(pieces))
                else:
                    fd, n = reply_memfd(pieces)
                    fds.append(fd)
                    reply = ("DONE_FD", mid, n)
                del body, pieces
            except Exception as exc:  # noqa: BLE001 - reported to the caller, which reruns the macro-shard
                reply = ("ERROR", mid, f"{type(exc).__name__}: {exc}")
            try:
                chan.send(reply, fds)
            except OSError:  # the starter (a killed engine worker) is gone: its task is rerun elsewhere
                return 0
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        agent.close()


def main(argv: list[str]) -> int:
    fd = int(argv[1])
    idle = float(argv[2]) if len(argv) > 2 else 600.0
    sock = socket.socket(fileno=fd)
    chan = Channel(sock)
    try:
        return serve(chan, idle)
    finally:
        chan.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
