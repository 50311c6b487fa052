"""The fork server's loop (see :mod:`shardc.forkserver` for the protocol).

One thread, one loop: wait on the control socket (from the master) and on a
self-pipe that SIGCHLD writes to; fork a worker per ``spawn`` request; reap
children and report each exit.  At EOF or ``stop``: SIGKILL the children
still alive, reap them, leave.  It runs in two kinds of process: an exec'ed
interpreter (``python -m shardc.forkserver FD``) and a *zygote*, a fork of
the master made while the master had no other thread (``ForkServer(...,
fork_from=...)``); the loop is the same.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import select
import signal
import socket
import sys
import traceback
from typing import Any

from .._channel import Channel, ChannelClosed
from ..status import StatusTable
from ..worker import _threadpool_controller, worker_entry
from .wire import EXITED, READY, SPAWN, SPAWN_FAILED, SPAWNED, STOP


def _preload(req: dict[str, Any]) -> None:
    """Import the modules the master has loaded (best effort: a worker that
    needs one imports it itself, and reports its error)."""
    sys.path[:] = req["sys_path"]
    for name in req.get("modules", ()):
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except BaseException:  # noqa: BLE001, S110 - SystemExit from a script-like module, ...
                pass


def _reap(chan: Channel, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        try:
            chan.send((EXITED, pid, os.waitstatus_to_exitcode(status)))
        except OSError:
            pass  # the master is gone: the loop sees EOF next


def _child(req: dict[str, Any], fds: list[int], ctrl: socket.socket, close: list[int], server_pid: int) -> None:
    """In the forked worker: become the master's worker; never returns."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        ctrl.close()
        for fd in close:
            os.close(fd)
        os.environ.clear()
        os.environ.update(req["env"])
        multiprocessing.current_process().authkey = req["authkey"]
        sys.path[:] = req["sys_path"]
        if req["cwd"] is not None:
            try:
                os.chdir(req["cwd"])
            except OSError:
                pass
        status = StatusTable.attach(req["status"], fds[1])
        sock = socket.socket(fileno=fds[0])
    except BaseException:  # noqa: BLE001 - printed; the master sees EOF before HELLO
        traceback.print_exc()
        os._exit(71)
    worker_entry(
        req["slot"],
        sock,
        status,
        server_pid,
        req["packages"],
        req["init_expr"],
        req["init_blob"],
        req["cow_guard"],
        signal.SIGKILL,
    )


def serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    chan = Channel(sock)
    msg, _ = chan.recv()
    init = msg[1]
    sys.path[:] = init["sys_path"]
    for mod in init["packages"]:  # best effort: a worker reports its own import error
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001, S110
            pass
    _threadpool_controller()  # inspected once here, not in every worker
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    me = os.getpid()
    children: set[int] = set()
    chan.send((READY, me))
    running = True
    while running:
        # Messages read with the INIT (a STOP right behind it, from a pool stopped before this
        # zygote ran) are handled before waiting: the socket has nothing more to wake it.
        ready = [fd] if chan.pending() else select.select([fd, wake_r], [], [])[0]
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        _reap(chan, children)
        if fd not in ready:
            continue
        try:
            msgs = chan.poll_nonblocking() if chan.pending() else chan.recv_ready()
        except (ChannelClosed, OSError):
            break
        for msg, fds in msgs:
            if msg[0] == STOP:
                running = False
                break
            if msg[0] != SPAWN:
                continue
            _preload(msg[1])
            try:
                pid = os.fork()
            except OSError as exc:
                for f in fds:
                    os.close(f)
                chan.send((SPAWN_FAILED, exc.errno or 0, str(exc)))
                continue
            if pid == 0:
                _child(msg[1], fds, sock, [wake_r, wake_w], me)
            children.add(pid)
            for f in fds:
                os.close(f)
            chan.send((SPAWNED, pid))
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in list(children):
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    os._exit(0)
