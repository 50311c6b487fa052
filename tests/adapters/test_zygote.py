"""The zygote (``shardc.forkserver.zygote_for``): a fork server copied from the
master at pool start, which starts the pool's later workers while the master
has other threads (an Executor's engine, ``Pool.map``'s stream, the caller's)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import shardc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def other_thread():
    """Call it to start another thread in this process (kept until the test
    ends): from then on, the pool must not fork this process."""
    stop = threading.Event()
    threads = []

    def start() -> None:
        t = threading.Thread(target=stop.wait, name="test-other-thread", daemon=True)
        t.start()
        threads.append(t)

    yield start
    stop.set()
    for t in threads:
        t.join(5)


def fd_targets(pid: int) -> set[str]:
    """What process ``pid``'s open fds point at."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # closed meanwhile
            continue
    return out


def _children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True)}


def _gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    """The pids of ``pids`` still running (not zombies) after up to ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        left = set()
        for p in pids:
            try:
                if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                    left.add(p)
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_a_worker_replaced_while_threads_run_comes_from_the_zygote(tmp_path, monkeypatch, other_thread):
    monkeypatch.delenv("SHARDC_FORK_SERVER", raising=False)
    with shardc.Pool(2) as pool:
        z = pool._server
        assert z is not None and z.zygote and z.alive()
        assert psutil.Process(z.pid).ppid() == os.getpid()  # a fork of this process, not an exec'ed interpreter
        assert psutil.Process(z.pid).cmdline() == psutil.Process().cmdline()
        assert all(w.server is None for w in pool.workers)  # the first workers: forked directly
        other_thread()
        # A module this process imports after the pool started: the zygote imports it before it forks.
        (tmp_path / "zyg_late_mod.py").write_text("VALUE = 7\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        import zyg_late_mod  # noqa: F401

        victims = {w.pid for w in pool.workers}
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        psutil.wait_procs([psutil.Process(p) for p in victims], timeout=10)
        r = pool.shard_map(4, lambda s: "zyg_late_mod" in sys.modules, progress=False)
        assert r.succeeded and r.results == [True] * 4
        assert all(w.pid not in victims and w.server is z for w in pool.workers)
        assert all(psutil.Process(w.pid).ppid() == z.pid for w in pool.workers)
        assert any(e["event"] == "restart" for e in pool.events)
        assert not [e for e in pool.events if e["event"] == "forkserver_restart"]
    # the zygote and every worker are gone with the pool
    assert not _gone({z.pid, *(w.pid for w in pool.workers)})


def test_the_zygote_holds_no_end_of_a_worker_socket():
    """Else a worker would not see EOF when the master dies."""
    with shardc.Pool(2) as pool:
        z = pool._server
        assert z is not None and z.zygote
        z._await_ready()  # (its READY, sent once it closed them, is read at first use otherwise)
        ours = {f"socket:[{os.fstat(w.chan.sock.fileno()).st_ino}]" for w in pool.workers}
        assert not ours & fd_targets(z.pid)
        # ... and no served worker holds the zygote's control socket (the zygote sees EOF when we go)
        ctrl = f"socket:[{os.fstat(z.chan.sock.fileno()).st_ino}]"
        assert all(ctrl not in fd_targets(w.pid) for w in pool.workers)


@pytest.mark.timeout(60)
def test_sigint_leaves_the_zygote_alone(other_thread):
    with shardc.Pool(1) as pool:
        z = pool._server
        other_thread()
        os.kill(z.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group: the master's business
        time.sleep(0.2)
        assert z.alive()
        pool.replace(pool.workers[0], "test", "restart")
        assert pool.workers[0].server is z
        assert pool.shard_map(3, lambda s: s.id, progress=False).results == [0, 1, 2]


@pytest.mark.evidence  # an exec'ed server: seconds in a process that imported the whole test suite
@pytest.mark.timeout(60)
def test_a_dead_zygote_is_replaced_by_the_exec_server(other_thread):
    with shardc.Pool(1) as pool:
        z = pool._server
        other_thread()
        os.kill(z.pid, signal.SIGKILL)
        z.proc.wait(10)
        pool.replace(pool.workers[0], "test", "restart")
        srv = pool._server
        assert srv is not z and not srv.zygote and pool.workers[0].server is srv
        assert pool.shard_map(3, lambda s: s.id + 1, progress=False).results == [1, 2, 3]
        assert [e for e in pool.events if e["event"] == "forkserver_restart"]


@pytest.mark.evidence  # an exec'ed server, as above
@pytest.mark.timeout(60)
def test_no_zygote_for_a_pool_started_while_threads_run(other_thread):
    other_thread()
    with shardc.Pool(1) as pool:  # its workers come from the exec'ed server from the start
        assert pool._server is not None and not pool._server.zygote
        assert pool.workers[0].server is pool._server


def test_no_zygote_with_the_setting_off_or_an_explicit_fork_mode(monkeypatch):
    before = _children()
    monkeypatch.setenv("SHARDC_ZYGOTE", "0")
    with shardc.Pool(1) as pool:
        assert pool._server is None
        assert _children() - before == {pool.workers[0].pid}
    monkeypatch.delenv("SHARDC_ZYGOTE")
    with shardc.Pool(1, fork_mode="fork") as pool:
        assert pool._server is None
    with shardc.Pool(1) as pool:
        assert pool._server is not None and pool._server.zygote
        assert _children() - before == {pool.workers[0].pid, pool._server.pid}
    assert not _gone(_children() - before)


# The master SIGKILLed: its zygote sees its control socket's EOF and leaves,
# killing the workers it forked; the workers it forked directly die with it.
KILLED_MASTER = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import shardc
    pool = shardc.Pool(2)
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
    os.kill(pool.workers[0].pid, signal.SIGKILL)
    time.sleep(0.2)
    assert pool.shard_map(4, lambda s: s.id, progress=False).results == [0, 1, 2, 3]
    assert any(w.server is pool._server for w in pool.workers), "no worker from the zygote"
    print(" ".join(str(p) for p in [pool._server.pid, *(w.pid for w in pool.workers)]), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.evidence
@pytest.mark.timeout(90)
def test_a_killed_master_takes_its_zygote_and_workers_along():
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("SHARDC_ZYGOTE", None)
    env.pop("SHARDC_FORK_SERVER", None)
    out = subprocess.run([sys.executable, "-c", KILLED_MASTER], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    pids = {int(p) for p in out.stdout.split()}
    assert len(pids) == 3
    assert not _gone(pids), f"left running after the master was killed: {_gone(pids, 0)}"


@pytest.mark.timeout(60)
def test_a_stop_read_together_with_the_init_stops_the_server():
    """A pool stopped before its zygote first ran: INIT and STOP reach the server in one read.
    The STOP left over from that read must be handled, not wait for more bytes (it used to sit
    in the channel while the server slept in select, and the pool's close waited out its 5 s)."""
    from shardc._channel import Channel
    from shardc.forkserver.wire import READY, STOP

    ours, theirs = socket.socketpair()
    chan = Channel(ours)
    chan.cork()  # both frames in one write: the server's first read takes both
    chan.send((READY, {"sys_path": list(sys.path), "packages": []}))
    chan.send((STOP,))
    chan.uncork()
    code = "import sys; from shardc.forkserver.server import serve; serve(int(sys.argv[1]))"
    proc = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())], pass_fds=[theirs.fileno()], cwd=REPO)
    theirs.close()
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the server did not act on a STOP that arrived with its INIT")
    assert rc == 0
    msg, _ = chan.recv()
    assert msg[0] == READY
    chan.close()
