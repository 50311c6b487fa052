"""The engine side of a node: runs inside a Dask (or Ray) worker process.

A macro-shard task calls :func:`run_macro`.  The first one of a caller
session on this worker process starts the node's agent
(:mod:`shardc.cluster.agent`) as a new process with ``subprocess``
(fork+exec at once: safe in a process with threads); it stays in
:data:`_agents` for the session's later calls.  The first task of each call
hands the agent the call (``JOB``) and the inputs it does not hold yet (by
content key), then every task sends its macro-shard.  Inputs go to the agent
once per session: each new borrowed array (and non-zero out buffer) is
copied from the engine's copy into a memfd whose descriptor the agent maps,
so a node holds the engine's copy plus one shared segment (about 2x the
input) and nothing is pickled per task.

Several tasks on one worker process (a worker with several threads) take
turns on its agent: the agent runs one macro-shard at a time on the whole
node.  If the agent dies, the task fails with a
:class:`~shardc.errors.ClusterError` (the caller reruns the macro-shard) and
the next task starts a fresh agent, which gets every input again from the
engine's copy.  A call's state on the agent ends with the next call's ``JOB``;
:func:`close_session` stops the agent.
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import _lowlevel as ll
from .._channel import Channel, ChannelClosed
from ..errors import ClusterError
from .reply import from_memfd as reply_view


class AgentRefusedError(ClusterError):
    """A node's agent refused the call: its shardc version or build differs from the
    caller's, or ``fun`` or an input cannot be loaded there (rerunning would not help)."""


_agents: dict[str, AgentHandle] = {}  # caller session -> its agent in this process
_lock = threading.Lock()

STOP_WAIT = 10.0  # seconds an agent gets to stop its pool before it is killed


def _memfd(name: str, data: np.ndarray) -> int:
    """A memfd holding ``data``'s bytes (``data`` is contiguous)."""
    n = data.nbytes
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(f"shardc-cluster-{name}", os.MFD_CLOEXEC)
    else:  # pragma: no cover - macOS: an unlinked file in the temp dir
        import tempfile

        with tempfile.TemporaryFile() as tmp:
            fd = os.dup(tmp.fileno())
    if n:
        os.ftruncate(fd, n)
        with mmap.mmap(fd, n) as mm:  # one copy from the engine's array into the segment
            mm[:] = data.view(np.uint8).data
    return fd


class AgentHandle:
    """This worker process's agent for one caller session (kept across its calls).

    ``keys`` are the content keys of the inputs the agent holds, ``jobs`` the
    calls it has set up and not yet ended.  All use is under ``lock``.
    """

    def __init__(self, session: str, node: str, idle: float) -> None:
        self.session = session
        self.node = node
        self.lock = threading.Lock()
        self.keys: set[str] = set()
        self.jobs: set[str] = set()
        self.pid = 0
        parent, child = socket.socketpair()
        root = str(Path(__file__).resolve().parent.parent.parent)  # the shardc this process runs
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardc.cluster.agent", str(child.fileno()), str(idle)],
            pass_fds=(child.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.chan = Channel(parent)

    def ensure_job(self, job_id: str, job: dict[str, Any], inputs: list[np.ndarray]) -> int:
        """Set up call ``job_id`` on the agent (once); returns the input bytes copied to it.

        Only inputs whose content key the agent does not hold are copied (from
        the engine's copy into a memfd); the JOB message also lists every key
        the caller still holds, and the agent drops the rest.
        """
        if job_id in self.jobs:
            return 0
        new: list[tuple[str, int]] = []
        fds: list[int] = []
        try:
            for spec, arr in zip(job["inputs"], inputs, strict=True):
                key = spec["key"]
                if key in self.keys or any(k == key for k, _ in new):
                    continue
                fds.append(_memfd(key[:12], arr))
                new.append((key, int(arr.nbytes)))
            self.chan.send(("JOB", job_id, job, new, job["keep"], job["agent_idle_timeout"]), fds)
        finally:
            for fd in fds:
                os.close(fd)
        reply = self._recv("setting up the call")
        if reply[0] == "REFUSED":
            raise AgentRefusedError(f"node {self.node}: {reply[1]}")
        self.pid = reply[1]["pid"]
        keep = set(job["keep"])
        self.keys = {k for k in self.keys if k in keep} | {k for k, _ in new}
        self.jobs = {job_id}  # the agent ended the earlier calls on this JOB
        return sum(n for _, n in new)

    def _recv(self, what: str) -> Any:
        return self._recv_fds(what)[0]

    def _recv_fds(self, what: str) -> tuple[Any, list[int]]:
        try:
            return self.chan.recv()
        except (ChannelClosed, OSError):
            code = self.proc.poll()
            if code is None:
                try:
                    code = self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    code = None
            raise ClusterError(
                f"the shardc agent on node {self.node} (pid {self.proc.pid}) died while {what} "
                f"(exit code {code}); the macro-shard is rerun"
            ) from None

    def run(self, job_id: str, mid: int, lo: int, hi: int) -> Any:
        """Run a macro-shard; returns the agent's reply payload as it packed it
        (:mod:`.reply`): bytes, or a big one as a read-only view of its memfd."""
        self.chan.send(("RUN", job_id, mid, lo, hi))
        reply, fds = self._recv_fds(f"running shards {lo}..{hi - 1}")
        if reply[0] == "DONE_FD":
            return reply_view(fds[0], reply[2])
        for fd in fds:
            os.close(fd)
        if reply[0] == "ERROR":
            raise ClusterError(f"node {self.node}: macro-shard {lo}..{hi - 1} failed in the agent: {reply[2]}")
        return reply[2]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            self.chan.send(("STOP",))
        except OSError:
            pass
        try:
            self.proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_WAIT)
        self.chan.close()


def run_macro(
    session: str, job_id: str, job: dict[str, Any], inputs: list[np.ndarray], mid: int, lo: int, hi: int, node: str
) -> dict[str, Any]:
    """Run shards lo..hi-1 of call ``job_id`` on this node's agent of ``session`` (started if needed)."""
    t0 = time.perf_counter()
    with _lock:
        h = _agents.get(session)
        if h is not None and not h.alive():
            _agents.pop(session, None)
            h.chan.close()
            h = None
        if h is None:
            h = AgentHandle(session, node, float(job["agent_idle_timeout"]))
            _agents[session] = h
    with h.lock:
        try:
            copied = h.ensure_job(job_id, job, inputs)
            payload = h.run(job_id, mid, lo, hi)
        except ClusterError:
            with _lock:
                if _agents.get(session) is h:
                    _agents.pop(session)
            h.close()
            raise
    return {
        "node": node,
        "agent_pid": h.pid,
        "payload": payload,
        "input_bytes": copied,
        "engine_rss": ll.own_rss(),
        "seconds": time.perf_counter() - t0,
    }


def close_session(session: str) -> bool:
    """Stop this process's agent of ``session`` (True if there was one)."""
    with _lock:
        h = _agents.pop(session, None)
    if h is None:
        return False
    with h.lock:
        h.close()
    return True


def live_agents() -> list[int]:
    """Pids of this process's live agents (tests, diagnostics)."""
    with _lock:
        return [h.proc.pid for h in _agents.values() if h.alive()]
