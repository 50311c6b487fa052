"""The fork server: where a pool gets its workers while the caller has other threads.

``fork()`` copies only the calling thread.  A lock that another thread held
at that moment (in ``logging``, in a C library's allocator or thread pool,
in an I/O layer) stays held forever in the child, so a worker forked from a
threaded program (a web app, an asyncio program with executors, a Jupyter
kernel, a joblib caller, shardc's own Executor engine) can deadlock on its
first use of it.  A pool whose workers come from the fork server avoids
that: the server is a fresh, single-threaded interpreter started by
``exec`` (``python -m shardc.forkserver``: ``subprocess`` forks and execs
without running Python code in between, which is safe in a threaded
process) that imports shardc and NumPy once and then forks one worker per
request.  The pattern is multiprocessing's forkserver.

::

    master (any thread)                      server (one thread)          worker
    socketpair() ── SPAWN {slot, env, sys.path, cwd, init}
                    + fds [worker's end, status table] ─> fork() ───────> worker_entry():
    <── SPAWNED pid                                                       the same loop as
    worker's socket: HELLO, CALL, RUN, ... (direct, as for a forked worker) a forked worker
    <── EXIT pid, code  (the server reaps its children: SIGCHLD)

The worker then runs exactly the worker loop of a forked worker
(:func:`shardc.worker.worker_entry`); it does not know how it was started.
What a forked worker inherits, a served one is sent: its end of the socket
and the pool's status table as fds (``SCM_RIGHTS``), the caller's
environment, ``sys.path`` and working directory with each request.  Borrowed
inputs take the copy path (a segment; no fork inheritance), and functions
and objects defined in ``__main__`` travel by value (cloudpickle): the
server's ``__main__`` is not the caller's.

Death: the master cannot ``waitpid`` a grandchild.  It sees a worker's death
as its socket's EOF, as for every worker, and the exit status comes from the
server, which reaps its children and reports ``(EXIT, pid, code)``.  Workers
have PDEATHSIG set to the server (they die with it); the server leaves when
its control socket reaches EOF (the master died or stopped the pool),
killing the workers still alive.  A server that died is replaced at the next
spawn (logged, and recorded in the pool's events).
"""

from __future__ import annotations

import errno
import gc
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

from .. import config, inherit
from .._channel import Channel, ChannelClosed
from ..errors import InvalidArgumentError, ShardcOSError, WorkerSetupError
from ..handle import WorkerHandle
from ..sysinfo import is_zombie
from .wire import EXITED, READY, SPAWN, SPAWN_FAILED, STOP

log = logging.getLogger("shardc")

FORK_MODES = ("auto", "fork", "server")
START_TIMEOUT = 60.0  # seconds for the server to import shardc and answer

_servers: weakref.WeakSet[ForkServer] = weakref.WeakSet()


def resolve_mode(fork_mode: Any) -> str:
    """The pool's ``fork_mode`` argument, checked; ``auto`` becomes ``server``
    or ``fork`` when ``SHARDC_FORK_SERVER`` is set."""
    if fork_mode not in FORK_MODES:
        raise InvalidArgumentError(
            f"fork_mode must be one of {', '.join(FORK_MODES)}, got {fork_mode!r} "
            "(auto: a fork server while the caller has other threads, else fork)"
        )
    if fork_mode == "auto" and config.is_set("SHARDC_FORK_SERVER"):
        return "server" if config.get_bool("SHARDC_FORK_SERVER") else "fork"
    return str(fork_mode)


def other_threads() -> list[str]:
    """Names of the threads of this process other than the calling one."""
    me = threading.current_thread()
    return [t.name for t in threading.enumerate() if t is not me]


def use_server(fork_mode: str) -> bool:
    """Whether a pool of (resolved) ``fork_mode`` starts its next worker from
    the fork server: "auto" does while other threads are alive, unless an
    input is being inherited at fork (``shardc.inherit``: it needs a fork of
    this process; the call that holds it chose that path with no threads)."""
    if fork_mode != "auto":
        return fork_mode == "server"
    return bool(other_threads()) and not inherit.held_tokens()


def close_in_child() -> None:
    """In a child forked directly from the master: drop the servers' control
    sockets (a server must see EOF when the master dies, not when its last
    directly forked worker exits)."""
    for srv in list(_servers):
        srv.chan.close()


class ForkServer:
    """The master's handle on one fork server process (one per pool)."""

    def __init__(self, packages: list[str], fork_from: Callable[[], None] | None = None) -> None:
        """Start a server: an exec'ed interpreter, or with ``fork_from`` a
        *zygote*, a fork of this process (call it only while this process
        has no other thread); ``fork_from`` runs first in the zygote and
        closes what it must not keep (the master's ends of worker sockets)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        t0 = time.perf_counter()
        self.zygote = fork_from is not None
        if fork_from is not None:
            self.proc: Any = _Forked(_fork_zygote(ours, theirs, fork_from))
            theirs.close()
        else:
            try:
                self.proc = _exec_server(theirs)
            except BaseException:
                ours.close()
                raise
        self.chan = Channel(ours)
        self.lock = threading.RLock()
        self.pids: set[int] = set()  # workers it forked for us and not reported gone
        self.exits: dict[int, int] = {}  # pid -> exit code, reported, not yet collected
        self.dead = False
        # module names the server has (a zygote: those of this process when it forked)
        self.sent_modules: set[str] = set(sys.modules) if self.zygote else set()
        self.pid = self.proc.pid
        _servers.add(self)
        self.t0 = t0
        self.ready = False
        self.start_seconds = 0.0
        try:
            self.chan.send((READY, {"sys_path": list(sys.path), "packages": list(packages)}))
        except OSError as exc:
            self._failed(exc)
        if not self.zygote:  # a zygote's answer is awaited at its first spawn: it has little to do
            self._await_ready()

    def _await_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while not self.ready:
                self._note(self._recv_one(deadline, START_TIMEOUT))
        except (OSError, ChannelClosed) as exc:
            self._failed(exc)
        log.debug(
            "fork server (%s) pid %d started in %.1f ms",
            "zygote" if self.zygote else "exec",
            self.pid,
            self.start_seconds * 1e3,
        )

    def _failed(self, exc: BaseException) -> NoReturn:
        self.close(timeout=1.0)
        raise WorkerSetupError(
            f"the shardc fork server (pid {self.pid}) did not start ({type(exc).__name__}: {exc}); "
            "its error is on stderr; fork_mode='fork' or SHARDC_FORK_SERVER=0 fork workers directly"
        ) from None

    # -- messages ---------------------------------------------------------------------
    def _note(self, msg: tuple) -> tuple | None:
        """Record an exit report; returns any other message."""
        if msg[0] == EXITED:
            self.exits[msg[1]] = msg[2]
            return None
        if msg[0] == READY:  # (a zygote's may come with any read)
            self.ready = True
            self.start_seconds = time.perf_counter() - self.t0
            return None
        return msg

    def _recv_one(self, deadline: float, timeout: float) -> tuple:
        """The next message, by ``deadline`` (a monotonic time, ``timeout`` s from the start)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise ShardcOSError(errno.ETIMEDOUT, f"no answer from the fork server within {timeout:g} s")
        self.chan.sock.settimeout(left)
        try:
            msg, _fds = self.chan.recv()
        finally:
            self.chan.sock.settimeout(None)
        return msg

    def _recv(self, timeout: float) -> tuple:
        """The next message that is not an exit report."""
        deadline = time.monotonic() + timeout
        while True:
            other = self._note(self._recv_one(deadline, timeout))
            if other is not None:
                return other

    def _drain(self) -> None:
        """Take the exit reports already sent; notice the server's death."""
        try:
            for msg, _fds in self.chan.poll_nonblocking():
                self._note(msg)
        except OSError:
            pass
        if not self.dead and self.proc.poll() is not None:
            self.dead = True
            for msg, _fds in self._leftovers():
                self._note(msg)

    def _leftovers(self) -> list[tuple[Any, list[int]]]:
        try:
            return self.chan.poll_nonblocking()
        except OSError:
            return []

    def alive(self) -> bool:
        with self.lock:
            self._drain()
            return not self.dead

    # -- workers ----------------------------------------------------------------------
    def spawn(self, request: dict[str, Any], fds: list[int]) -> int:
        """Fork a worker for ``request`` (see ``shardc.forkserver.__main__``),
        handing it ``fds``; returns its pid."""
        with self.lock:
            if not self.ready:
                self._await_ready()
            mods = _importable(self.sent_modules)
            req = {**request, "env": dict(os.environ), "sys_path": list(sys.path), "cwd": _cwd(), "modules": mods}
            # A forked worker has the caller's multiprocessing authkey (Manager proxies need it).
            req["authkey"] = bytes(multiprocessing.current_process().authkey)
            try:
                self.chan.send((SPAWN, req), fds)
                msg = self._recv(START_TIMEOUT)
            except (OSError, ChannelClosed) as exc:
                self._drain()
                raise ShardcOSError(
                    0, f"the shardc fork server (pid {self.pid}) did not fork a worker: {type(exc).__name__}: {exc}"
                ) from None
            if msg[0] == SPAWN_FAILED:
                raise ShardcOSError(msg[1], f"the fork server could not fork a worker: {msg[2]}")
            pid = int(msg[1])
            self.sent_modules.update(mods)
            self.pids.add(pid)
            return pid

    def poll_exit(self, pid: int) -> int | None:
        """``pid``'s exit code once it is gone, None while it runs.

        Raises:
            ChildProcessError: ``pid`` is not (any more) a worker of this server.
        """
        with self.lock:
            if pid not in self.exits:
                if pid not in self.pids:
                    raise ChildProcessError(pid)  # as os.waitpid does: Pool._poll_exit's protocol
                self._drain()
            if pid in self.exits:
                self.pids.discard(pid)
                return self.exits.pop(pid)
            if self.dead and not _running(pid):
                # The server died before reporting: its workers got SIGKILL (PDEATHSIG).
                self.pids.discard(pid)
                return -signal.SIGKILL
            return None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the server (it kills the workers still alive); idempotent."""
        with self.lock:
            _servers.discard(self)
            if self.proc.poll() is None:
                try:
                    self.chan.send((STOP,))
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5.0)
            self.dead = True
            self.chan.close()


def _exec_server(theirs: socket.socket) -> subprocess.Popen[bytes]:
    """``python -m shardc.forkserver FD``, with ``theirs`` as FD."""
    env = dict(os.environ)
    # The server must import this very shardc: a source tree (not an
    # installed package, which it finds anyway) goes first on its path.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.basename(root) not in ("site-packages", "dist-packages"):
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    try:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "shardc.forkserver", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except OSError as exc:
        raise ShardcOSError(exc.errno or 0, f"start the shardc fork server: {exc}") from None
    finally:
        theirs.close()


def _fork_zygote(ours: socket.socket, theirs: socket.socket, closer: Callable[[], None]) -> int:
    """Fork this (single-threaded) process into a fork server; returns its pid."""
    try:
        pid = os.fork()
    except OSError as exc:
        ours.close()
        theirs.close()
        raise ShardcOSError(exc.errno or 0, f"fork the shardc zygote: {exc.strerror or exc}") from None
    if pid != 0:
        return pid
    try:  # the zygote: never returns
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the master's business
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler of the caller's
        ours.close()
        closer()
        close_in_child()
        # A full collection would write the header of every object inherited
        # from the master: a private copy of each of their pages (as in workers).
        gc.freeze()
        from .server import serve

        serve(theirs.detach())
    except BaseException:  # noqa: BLE001 - printed; the master sees EOF before READY
        traceback.print_exc()
    finally:
        os._exit(70)
    return 0  # unreachable


class _Forked:
    """The master's handle on the zygote, its own child: what
    :class:`subprocess.Popen` offers the exec'ed server (poll, wait, kill)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone
                self.returncode = -signal.SIGKILL
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"shardc zygote {self.pid}", timeout or 0.0)
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _importable(skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The modules this process has imported from files, in import order,
    but those in ``skip`` (looked at first: a module's ``__spec__`` can be
    slow to get): the server imports them before it forks, so a served
    worker starts with what a forked one would have (no import time in its
    first task, and no memory growth that would read as drift and recycle it)."""
    out = []
    for name, mod in list(sys.modules.items()):
        if name in skip:
            continue
        spec = getattr(mod, "__spec__", None)
        if spec is None or "__main__" in name or name.startswith("shardc.forkserver"):
            continue
        if spec.origin in (None, "built-in", "frozen") and not spec.submodule_search_locations:
            continue
        out.append(name)
    return out


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:  # deleted
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # reused by another user's process: ours is gone
        return False
    return not is_zombie(pid)


def ensure(server: ForkServer | None, packages: list[str], events: list[dict[str, Any]]) -> ForkServer:
    """``server`` if it runs, else a new one (a dead one is logged and
    recorded in ``events``, the pool's event list)."""
    if server is not None and server.alive():
        return server
    if server is not None:
        code = server.proc.returncode
        log.warning("the shardc fork server (pid %d) died (exit code %s); starting a new one", server.pid, code)
        server.close(timeout=0.5)
    new = ForkServer(packages)
    if server is not None:
        events.append(
            {
                "t": time.time(),
                "event": "forkserver_restart",
                "worker": -1,
                "old_pid": server.pid,
                "new_pid": new.pid,
                "reason": f"the fork server died (exit code {server.proc.returncode})",
            }
        )
    return new


def warn_threads(size: int) -> None:
    """Warn that ``size`` workers are forked directly while other threads run."""
    threads = other_threads()
    if threads:
        log.warning(
            "forking %d workers while %d other thread(s) run in this process (%s): a "
            "thread holding a lock at fork time can deadlock a worker; create the pool "
            "(shardc.pool_create) before starting threads, or use fork_mode='auto' or 'server'",
            size,
            len(threads),
            ", ".join(threads[:5]),
        )


def zygote_for(pool: Any, closer: Callable[[], None]) -> ForkServer | None:
    """A zygote for ``pool`` (just started, its workers forked directly), or
    None: when ``fork_mode`` is "auto", ``SHARDC_ZYGOTE`` allows it and this
    process has no other thread (else forking it would not be safe).

    Later workers of the pool (replacements, recycles) come from it while
    this process has other threads (an Executor's engine, ``Pool.map``'s
    stream, the caller's own): a fork of a process that already has every
    module the caller had at pool start, so such a start costs a fork, not
    an interpreter importing those modules (seconds in a process that has
    loaded pandas, pyarrow, dask or ray).  Its memory is shared with this
    process until either writes a page.  It failing to start is logged, not
    raised: the exec'ed server remains.  ``closer`` runs in the zygote first
    (it closes the master's ends of the worker sockets)."""
    if pool.fork_mode != "auto" or not config.get_bool("SHARDC_ZYGOTE") or other_threads():
        return None
    if any(w.server is not None for w in pool.workers):
        return None

    try:
        return ForkServer(pool.packages, fork_from=closer)
    except (WorkerSetupError, ShardcOSError) as exc:
        log.warning("no zygote for this pool (%s): later workers started while threads run use the fork server", exc)
        return None


def spawn_for(pool: Any, slot: int) -> Any:
    """Have ``pool``'s fork server (started or restarted here) fork a worker
    into ``slot``; returns its :class:`~shardc.handle.WorkerHandle`."""
    srv = pool._server = ensure(pool._server, pool.packages, pool.events)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pool.status.reset(slot)
    info, status_fd = pool.status.share_spec()
    request = {
        "slot": slot,
        "status": info,
        "packages": pool.packages,
        "init_expr": None if pool._init_blob else pool.init_expr,
        "init_blob": pool._init_blob,
        "cow_guard": pool.cow_guard,
    }
    try:
        pid = srv.spawn(request, [theirs.fileno(), status_fd])
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    w = WorkerHandle(slot, pid, Channel(ours))
    w.server = srv
    return w
