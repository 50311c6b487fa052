"""shardc.status on its C accessors (csrc/status.c): each state change and the
snapshot it leaves, the done map, argument errors, the clock, and across a
real fork: a worker process writes while the master reads consistent
snapshots, and a writer SIGKILLed mid-stream leaves a consistent row."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from shardc.errors import InvalidArgumentError
from shardc.status import STATE_IDLE, STATE_RUNNING, DoneMap, RowSnapshot, StatusTable


@pytest.fixture
def table():  # type: ignore[no-untyped-def]
    t = StatusTable(3)
    yield t
    t.close()


def test_state_changes_and_snapshots(table: StatusTable) -> None:
    """begin/end/next/block calls return their time stamp and leave the row
    the master reads: RUNNING with the current shard's own start time."""
    done = DoneMap(10)
    row = table.row(1)
    row.set_pid(1234)
    assert table.pid(1) == 1234 and table.pid(0) == 0
    before = time.monotonic_ns()
    t0 = row.shard_begin(4)
    assert before <= t0 <= time.monotonic_ns()  # the clock of time.monotonic_ns()
    r = table.read(1)
    assert isinstance(r, RowSnapshot)
    assert (r.state, r.current, r.start_ns) == (STATE_RUNNING, 4, t0)
    assert table.running(1) == 4 and table.running(0) is None
    t1 = row.shard_end(done, 4, 2)
    assert t1 >= t0
    assert table.read(1).state == STATE_IDLE and done.get(4) == 2
    assert table.running(1) is None

    t0 = row.block_begin(5, 3)
    r = table.read(1)
    assert (r.state, r.current, r.start_ns, r.block0, r.blockn) == (STATE_RUNNING, 5, t0, 5, 3)
    t1 = row.shard_next(done, 5, 1, 6)
    r = table.read(1)
    assert (r.state, r.current, r.start_ns) == (STATE_RUNNING, 6, t1) and done.get(5) == 1
    row.shard_next(done, 6, 0, 7)  # 6 failed: no mark
    row.block_end(done, 7, 1, 2)
    r = table.read(1)
    assert (r.state, r.current, r.done) == (STATE_IDLE, 7, 2)
    assert [done.get(i) for i in range(10)] == [0, 0, 0, 0, 2, 1, 0, 1, 0, 0]
    assert done.count() == 3
    assert table.done_total() == 2
    assert table.take_done(1) == 2 and table.take_done(1) == 0

    row.shard_begin(8)
    row.set_idle()
    assert table.read(1).state == STATE_IDLE
    row.shard_end(None, 9, 1)  # no map: nothing marked
    assert done.get(9) == 0
    done.close()


def test_master_and_single_fields(table: StatusTable) -> None:
    """call ids, exit request, sending, heap kept, reset."""
    row = table.row(2)
    table.set_call(2, 17)
    table.set_call(0, 18)
    assert table.read(2).call == 17
    table.row(2).shard_begin(3)
    assert table.running(2, 17) == 3 and table.running(2, 99) is None
    table.clear_calls()
    assert table.read(0).call == 0 and table.running(2, 99) == 3  # call 0: any call
    assert not row.exit_requested()
    table.request_exit(2)
    assert row.exit_requested() and table.read(2).exit_req == 1
    row.set_sending(41)
    assert table.read(2).sending == 42
    row.set_sending(None)
    assert table.read(2).sending == 0
    row.set_heap_kept(1 << 30)
    assert table.heap_kept(2) == 1 << 30 and table.read(2).heap_kept == 1 << 30
    table.reset(2)
    assert table.read(2) == RowSnapshot(*([0] * 12))
    assert not row.exit_requested()
    t = row.shard_begin(5)  # the writer carries on after a reset
    assert table.read(2)[:3] == (STATE_RUNNING, 5, t)


def test_bad_arguments(table: StatusTable) -> None:
    """A shard id outside the done map is an error (nothing is written), so is
    a slot outside the table."""
    done = DoneMap(4)
    row = table.row(0)
    row.shard_begin(3)
    for call in (
        lambda: row.shard_end(done, 4, 1),
        lambda: row.shard_end(done, -1, 1),
        lambda: row.shard_next(done, 9, 1, 10),
        lambda: row.block_end(done, 4, 1, 1),
    ):
        with pytest.raises(InvalidArgumentError, match="outside the done map"):
            call()
    assert table.read(0)[:2] == (STATE_RUNNING, 3) and done.count() == 0
    with pytest.raises(InvalidArgumentError):
        done.get(4)
    with pytest.raises(InvalidArgumentError):
        table.row(3)
    with pytest.raises(OSError):
        table.read(3)
    with pytest.raises(InvalidArgumentError):
        StatusTable(0)
    done.close()


def test_done_map_count_and_attach() -> None:
    """count() is the number of non-zero bytes; attach() works on any uint8 view."""
    dm = DoneMap(1000)
    assert dm.num == 1000 and dm.array.dtype == np.uint8 and dm.segment is not None
    assert dm.count() == 0
    other = DoneMap.attach(dm.array)
    t = StatusTable(1)
    row = t.row(0)
    for sid in range(0, 1000, 7):
        row.shard_begin(sid)
        row.shard_end(other, sid, 1 + sid % 2)
    assert dm.count() == len(range(0, 1000, 7)) == int(np.count_nonzero(dm.array))
    assert dm.get(7) == 2 and dm.get(14) == 1 and dm.get(1) == 0
    empty = DoneMap(0)
    assert empty.count() == 0
    other.close()  # attached: closes nothing
    assert dm.get(7) == 2
    for x in (dm, empty, t):
        x.close()


def test_fork_worker_writes_master_reads(fork_child) -> None:  # type: ignore[no-untyped-def]
    """A forked worker writes its row and the done map; the master sees every
    step, and each RUNNING snapshot carries that shard's own start time."""
    table = StatusTable(2)
    done = DoneMap(20000)
    floor = DoneMap(8 * 20000)  # per shard: a time taken before its begin (int64 view)
    floors = floor.array.view(np.int64)

    def worker(conn):  # type: ignore[no-untyped-def]
        row = table.row(1)
        row.set_pid(os.getpid())
        dm = DoneMap.attach(done.array)
        last = 0
        for b in range(0, 20000, 50):
            t = time.monotonic_ns()
            while t <= last:
                t = time.monotonic_ns()
            floors[b] = t  # test bookkeeping only, read after the row says b runs
            last = row.block_begin(b, 50)
            for sid in range(b, b + 49):
                t = time.monotonic_ns()
                while t <= last:
                    t = time.monotonic_ns()
                floors[sid + 1] = t
                last = row.shard_next(dm, sid, 1, sid + 1)
            row.block_end(dm, b + 49, 1, 50)
        return table.read(1).done

    child = fork_child(worker)
    reads = 0
    while child.exitcode is None and not child.conn.poll(0):
        r = table.read(1)
        reads += 1
        if r.state == STATE_RUNNING:
            assert r.block0 <= r.current < r.block0 + r.blockn
            assert r.start_ns >= floors[r.current] > 0  # not an older shard's start
            nxt = floors[r.current + 1] if r.current + 1 < 20000 else 0
            assert nxt == 0 or r.start_ns < nxt  # not a newer shard's start
            if r.current > r.block0:
                assert done.get(r.current - 1) == 1  # the mark came before the move
        assert table.done_total() <= done.count()
    assert child.result(30) == 20000
    assert table.pid(1) == child.pid and done.count() == 20000 and table.done_total() == 20000
    print(f"{reads} snapshots read while the worker wrote")
    for x in (table, done, floor):
        x.close()


def test_sigkilled_writer_leaves_consistent_row(fork_child) -> None:  # type: ignore[no-untyped-def]
    """A worker SIGKILLed at random points leaves a row whose snapshot is
    complete: X inside its block, the shards before X in the block marked,
    none after it."""
    rng = np.random.default_rng(3)
    for _ in range(8):
        table = StatusTable(1)
        done = DoneMap(10**6)

        def worker(conn, table=table, done=done):  # type: ignore[no-untyped-def]
            row = table.row(0)
            dm = DoneMap.attach(done.array)
            conn.send("go")
            for b in range(0, 10**6, 100):
                row.block_begin(b, 100)
                for sid in range(b, b + 99):
                    row.shard_next(dm, sid, 1, sid + 1)
                row.block_end(dm, b + 99, 1, 100)

        child = fork_child(worker)
        assert child.recv(10) == "go"
        time.sleep(float(rng.uniform(0.001, 0.03)))
        os.kill(child.pid, signal.SIGKILL)
        assert child.join(10) == -signal.SIGKILL
        r = table.read(0)
        if r.state == STATE_RUNNING:
            assert r.block0 <= r.current < r.block0 + r.blockn
            assert all(done.get(s) == 1 for s in range(r.block0, r.current))
            # The current shard itself may be marked (killed between its mark
            # and the move to the next one: the master does not charge it);
            # nothing after it is.
            assert all(done.get(s) == 0 for s in range(r.current + 1, r.block0 + r.blockn))
        assert table.done_total() <= done.count()
        table.close()
        done.close()


def test_no_python_store_into_shared_status_memory() -> None:
    """status.py writes shared memory only through C (no array/memoryview stores)."""
    src = (Path(__file__).resolve().parent.parent / "shardc" / "status.py").read_text()
    assert "memoryview" not in src and "._a[" not in src and "_mv[" not in src
