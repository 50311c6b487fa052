"""Tests of shardc.queue.TaskRing (the shared-memory task ring): semantics,
close/timeouts, attach across fork, crash repair under SIGKILL, and a
hypothesis state machine against a deque + per-consumer claims model."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shardc import _lowlevel as ll
from shardc.errors import InvalidArgumentError, QueueClosedError, SegmentError
from shardc.queue import MAX_CLAIM, TaskRing


@pytest.fixture
def ring():
    """A small ring, released after the test."""
    r = TaskRing.create(capacity=16, max_consumers=4)
    yield r
    r.release()


def shared_array(n: int, dtype: str) -> tuple[np.ndarray, ll.Mapping]:
    """A zeroed array in a MAP_SHARED memfd segment: forked children's writes reach us."""
    nbytes = max(n * np.dtype(dtype).itemsize, 8)
    fd = ll.seg_create(ll.BACKING_MEMFD, "test-shared", nbytes, False)
    m = ll.map_segment(fd, 0, nbytes, ll.MAP_WRITE)
    os.close(fd)
    return np.frombuffer(m.buffer(), dtype=dtype, count=n), m


def test_fifo_batches_and_stats(ring: TaskRing) -> None:
    """Items come out in push order, in batches, and stats count them."""
    assert ring.push(np.arange(10, dtype=np.uint64)) == 10
    assert ring.push([10, 11, 12]) == 3
    got = [ring.pop(0, 4, timeout=0), ring.pop(1, 100, timeout=0)]
    assert got[0].tolist() == [0, 1, 2, 3]
    assert got[1].tolist() == list(range(4, 13))
    assert got[0].dtype == np.uint64
    st = ring.stats()
    assert (st["pushed"], st["popped"], st["size"], st["capacity"]) == (13, 13, 0, 16)
    ring.push([1, 2])
    assert ring.size() == 2
    assert ring.consumer_info(1)["claimed"] == 9


def test_pop_into_preallocated(ring: TaskRing) -> None:
    """pop_into fills a caller's array and returns the count (0 on timeout)."""
    out = np.zeros(8, dtype=np.uint64)
    ring.push([5, 6, 7])
    assert ring.pop_into(0, out, timeout=0) == 3
    assert out[:3].tolist() == [5, 6, 7]
    assert ring.pop_into(0, out, 2, timeout=0) == 0
    with pytest.raises(InvalidArgumentError):
        ring.pop_into(0, np.zeros(4, dtype=np.float64), timeout=0)


def test_full_and_empty_timeouts(ring: TaskRing) -> None:
    """A full ring pushes partially then times out with 0; an empty pop times out empty."""
    assert ring.push(range(20), timeout=0) == 16
    t0 = time.monotonic()
    assert ring.push([1], timeout=0.05) == 0
    assert time.monotonic() - t0 >= 0.05
    ring.pop(0, 16, timeout=0)
    t0 = time.monotonic()
    assert ring.pop(0, 4, timeout=0.05).size == 0
    assert 0.05 <= time.monotonic() - t0 < 2


def test_close_drain_then_raise(ring: TaskRing) -> None:
    """After close, pushes raise, pops drain the rest and then raise QueueClosedError."""
    ring.push([1, 2, 3])
    ring.close()
    ring.close()  # idempotent
    with pytest.raises(QueueClosedError):
        ring.push([4])
    assert ring.pop(0, 2).tolist() == [1, 2]
    assert ring.pop(0, 2).tolist() == [3]
    with pytest.raises(QueueClosedError, match="closed and drained"):
        ring.pop(0, 2)
    assert ring.stats()["closed"] == 1


@pytest.mark.timeout(20)
def test_close_wakes_blocked_pop_and_push() -> None:
    """close() wakes a pop parked forever on an empty ring and a push parked on a full one."""
    r = TaskRing.create(capacity=2, max_consumers=2)
    r.set_spin(0)
    errors: list[BaseException] = []

    def pop() -> None:
        try:
            r.pop(0, 1)
        except BaseException as exc:  # noqa: BLE001 - collected for the assert
            errors.append(exc)

    t = threading.Thread(target=pop)
    t.start()
    time.sleep(0.05)
    r.close()
    t.join(5)
    assert not t.is_alive() and isinstance(errors[0], QueueClosedError)

    r2 = TaskRing.create(capacity=2, max_consumers=1)
    r2.push([1, 2])
    t = threading.Thread(target=lambda: errors.append(pytest.raises(QueueClosedError, r2.push, [3])))
    t.start()
    time.sleep(0.05)
    r2.close()
    t.join(5)
    assert not t.is_alive() and len(errors) == 2

    # Closed part-way through a blocking push: it reports what went in.
    r3 = TaskRing.create(capacity=2, max_consumers=1)
    counts: list[int] = []
    t = threading.Thread(target=lambda: counts.append(r3.push([1, 2, 3, 4])))
    t.start()
    time.sleep(0.05)
    r3.close()
    t.join(5)
    assert not t.is_alive() and counts == [2]
    r3.release()
    r.release()
    r2.release()


@pytest.mark.parametrize("backing", ["memfd", "shm", "file"])
def test_backings_and_attach(backing: str) -> None:
    """Every backing holds a ring that another mapping (attach by fd) shares."""
    with TaskRing.create(8, 2, backing=backing) as r:
        other = TaskRing.attach(r.fd, r.nbytes)
        r.push([42])
        assert other.pop(1, 1, timeout=0).tolist() == [42]
        assert r.consumer_info(1)["claimed"] == 1
        other.release()
        other.release()
        with pytest.raises(Exception):
            other.pop(1, 1)
    assert r.released


def test_bad_arguments() -> None:
    """Bad sizes, backings, items and a non-ring segment raise clear errors."""
    with pytest.raises(InvalidArgumentError, match="power of two"):
        TaskRing.create(capacity=12)
    with pytest.raises(InvalidArgumentError, match="max_consumers"):
        TaskRing.create(capacity=8, max_consumers=0)
    with pytest.raises(InvalidArgumentError, match="backing"):
        TaskRing.create(capacity=8, backing="nope")
    fd = ll.seg_create(ll.BACKING_MEMFD, "not-a-ring", 8192, False)
    try:
        with pytest.raises(InvalidArgumentError, match="no initialized task ring"):
            TaskRing.attach(fd, 8192)
    finally:
        os.close(fd)
    with TaskRing.create(8, 1) as r:
        with pytest.raises(InvalidArgumentError):
            r.push(np.array([-1, 2]))
        with pytest.raises(SegmentError):
            r.pop(5, 1, timeout=0)


@pytest.mark.timeout(20)
def test_consumer_record_heartbeat_and_sleeping(ring: TaskRing) -> None:
    """The record shows heartbeats (pop/done/heartbeat) and a parked consumer."""
    ring.set_spin(0)
    hb = ring.consumer_info(2)["heartbeat"]
    ring.pop(2, 1, timeout=0)
    ring.done(2)
    ring.heartbeat(2)
    assert ring.consumer_info(2)["heartbeat"] == hb + 3
    t = threading.Thread(target=lambda: ring.pop(3, 1, timeout=5))
    t.start()
    deadline = time.monotonic() + 5
    while not ring.consumer_info(3)["sleeping"]:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    ring.push([9])
    t.join(5)
    assert not t.is_alive()
    info = ring.consumer_info(3)
    assert (info["sleeping"], info["claimed"], info["state"]) == (False, 1, "idle")
    assert ring.stats()["wakes"] >= 1


def test_claim_record_limit_and_done() -> None:
    """A consumer holds at most MAX_CLAIM items; done() frees the record."""
    with TaskRing.create(1024, 1) as r:
        r.push(np.arange(1024, dtype=np.uint64))
        total = 0
        while total < MAX_CLAIM:
            total += r.pop(0, 100, timeout=0).size
        assert total == MAX_CLAIM
        with pytest.raises(SegmentError, match="done"):
            r.pop(0, 1, timeout=0)
        r.done(0)
        assert r.pop(0, 1, timeout=0).tolist() == [MAX_CLAIM]


def test_register_and_repair_rules() -> None:
    """repair refuses a live process; register refuses a record holding claims."""
    with TaskRing.create(16, 2) as r:
        r.push(range(8))
        r.register(0)
        assert r.consumer_info(0)["pid"] == os.getpid()
        assert r.pop(0, 3, timeout=0).tolist() == [0, 1, 2]
        with pytest.raises(SegmentError, match="alive") as ei:
            r.repair(0)
        assert ei.value.errno == errno.EBUSY
        with pytest.raises(SegmentError, match="repair"):
            r.register(0, 0)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                r.register(1)
                r.pop(1, 2, timeout=0)
                os.kill(os.getpid(), signal.SIGKILL)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status)
        assert r.repair(1).tolist() == [3, 4]
        assert r.repair(1).size == 0
        assert r.stats()["repaired"] == 2


def test_repair_takes_the_reaped_pid_not_a_probe() -> None:
    """repair trusts the pid the caller reaped: it repairs a record whose pid
    is alive again (reused by another process), and refuses a record that
    another process than the reaped one registered."""
    with TaskRing.create(16, 2) as r:
        r.push(range(6))
        live = os.fork()
        if live == 0:  # pragma: no cover - child: the process reusing the pid
            time.sleep(30)
            os._exit(0)
        try:
            dead = os.fork()
            if dead == 0:  # pragma: no cover - child: registers the live pid as its own
                code = 1
                try:
                    r.register(1, live)
                    code = 0 if r.pop(1, 2, timeout=0).tolist() == [0, 1] else 2
                finally:
                    os._exit(code)
            _, status = os.waitpid(dead, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            os.kill(live, 0)  # the registered pid is alive
            with pytest.raises(SegmentError, match="another process than the reaped pid") as ei:
                r.repair(1, dead)  # registered to `live`, not to the pid we reaped
            assert ei.value.errno == errno.EBUSY
            assert r.consumer_info(1)["claimed"] == 2
            assert r.repair(1, live).tolist() == [0, 1]  # the caller's word, no probe
            assert r.consumer_info(1)["pid"] == 0
        finally:
            os.kill(live, signal.SIGKILL)
            os.waitpid(live, 0)


def _worker(ring: TaskRing, c: int, state: np.ndarray, errors: np.ndarray) -> None:
    """Worker loop for the kill test: claim (must be QUEUED), work, mark DONE, done()."""
    ring.register(c)
    while True:
        try:
            ids = ring.pop(c, 1 + c * 7, timeout=5)
        except QueueClosedError:
            return
        if ids.size == 0:
            errors[1] += 1  # a 5 s stall: the ring got stuck
            continue
        for i in ids:
            if state[i] != 0:
                errors[0] += 1  # delivered while claimed or done: a duplicate
            state[i] = 2 + c
        time.sleep(0.0001 * (c + 1))  # "work", so kills land while items are claimed
        state[ids] = 1
        ring.done(c)


@pytest.mark.timeout(60)
def test_fork_stress_sigkill_repair() -> None:
    """Workers SIGKILLed at random are repaired and their unfinished items
    requeued: every item ends DONE exactly once and none is claimed twice."""
    n_items, n_workers = 20000, 3
    ring = TaskRing.create(capacity=256, max_consumers=n_workers)
    state, m1 = shared_array(n_items, "uint8")  # 0 queued, 1 done, 2+c claimed by c
    errors, m2 = shared_array(2, "int64")
    rng = np.random.default_rng(7)

    def spawn(c: int) -> int:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                _worker(ring, c, state, errors)
                code = 0
            finally:
                os._exit(code)
        return pid

    pids = [spawn(c) for c in range(n_workers)]
    pending = deque(np.arange(n_items, dtype=np.uint64).reshape(-1, 50))
    kills = requeued = 0
    next_kill = time.monotonic() + 0.01
    deadline = time.monotonic() + 40
    while True:
        assert time.monotonic() < deadline, "stress test made no progress"
        if pending:
            block = pending[0]
            k = ring.push(block, timeout=0.002)
            if k == len(block):
                pending.popleft()
            else:
                pending[0] = block[k:]
        if time.monotonic() >= next_kill and kills < 40:
            c = int(rng.integers(n_workers))
            os.kill(pids[c], signal.SIGKILL)
            os.waitpid(pids[c], 0)
            back = ring.repair(c, pids[c])
            for i in back:
                assert state[i] in (0, 1, 2 + c)
            back = back[state[back] != 1]  # DONE before done(): already delivered
            state[back] = 0
            if back.size:
                pending.append(back)
            requeued += back.size
            kills += 1
            pids[c] = spawn(c)
            next_kill = time.monotonic() + float(rng.uniform(0.002, 0.02))
        if not pending:
            infos = [ring.consumer_info(c) for c in range(n_workers)]
            if ring.stats()["size"] == 0 and all(i["claimed"] == 0 and i["state"] == "idle" for i in infos):
                break
            time.sleep(0.001)
    ring.close()
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert errors.tolist() == [0, 0]
    assert np.all(state == 1), np.flatnonzero(state != 1)[:10]
    assert kills > 0
    print(f"{kills} kills, {requeued} items requeued")
    ring.release()
    del m1, m2


@pytest.mark.timeout(30)
def test_fork_ping_pong_parked_no_lost_wakeups() -> None:
    """Many park/wake hand-offs between two processes never lose a wake-up."""
    a, b = TaskRing.create(2, 1), TaskRing.create(2, 1)
    a.set_spin(0)
    b.set_spin(0)
    rounds = 2000
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            for i in range(rounds):
                x = a.pop(0, 1, timeout=5)
                a.done(0)
                assert x.tolist() == [i]
                b.push(x, timeout=5)
            code = 0
        finally:
            os._exit(code)
    for i in range(rounds):
        assert a.push([i], timeout=5) == 1
        assert b.pop(0, 1, timeout=5).tolist() == [i]
        b.done(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert b.stats()["parks"] > 0
    a.release()
    b.release()


class RingModel(RuleBasedStateMachine):
    """The ring against a model: a deque of queued items and per-consumer claims."""

    CAP = 8
    NC = 3

    def __init__(self) -> None:
        super().__init__()
        self.ring = TaskRing.create(self.CAP, self.NC)
        self.queue: deque[int] = deque()
        self.claims: dict[int, list[int]] = {c: [] for c in range(self.NC)}
        self.registered = [False] * self.NC
        self.closed = False
        self.next_id = 0

    @rule(n=st.integers(1, 12))
    def push(self, n: int) -> None:
        """push(timeout=0) pushes what fits, or raises once closed."""
        items = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        if self.closed:
            with pytest.raises(QueueClosedError):
                self.ring.push(items, timeout=0)
            return
        got = self.ring.push(items, timeout=0)
        assert got == min(n, self.CAP - len(self.queue))
        self.queue.extend(items[:got])

    @rule(c=st.integers(0, NC - 1), k=st.integers(1, 10))
    def pop(self, c: int, k: int) -> None:
        """pop(timeout=0) returns the oldest items, empty, or raises once closed and drained."""
        if not self.queue and self.closed:
            with pytest.raises(QueueClosedError):
                self.ring.pop(c, k, timeout=0)
            return
        got = self.ring.pop(c, k, timeout=0).tolist()
        want = [self.queue.popleft() for _ in range(min(k, len(self.queue)))]
        assert got == want
        self.claims[c].extend(want)

    @rule(c=st.integers(0, NC - 1))
    def done(self, c: int) -> None:
        """done() forgets the consumer's claims."""
        self.ring.done(c)
        self.claims[c] = []

    @rule(c=st.integers(0, NC - 1))
    def repair_and_requeue(self, c: int) -> None:
        """repair() returns exactly the claims (EBUSY if registered to us); requeue them."""
        if self.registered[c]:
            with pytest.raises(SegmentError):
                self.ring.repair(c)
            return
        back = self.ring.repair(c).tolist()
        assert back == self.claims[c]
        self.claims[c] = []
        if back and not self.closed and len(back) <= self.CAP - len(self.queue):
            assert self.ring.push(back, timeout=0) == len(back)
            self.queue.extend(back)

    @rule(c=st.integers(0, NC - 1), me=st.booleans())
    def register(self, c: int, me: bool) -> None:
        """register() takes a clean record (pid 0 = unknown) and refuses one with claims."""
        if self.claims[c]:
            with pytest.raises(SegmentError):
                self.ring.register(c, os.getpid() if me else 0)
            return
        self.ring.register(c, os.getpid() if me else 0)
        self.registered[c] = me

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        """close() is final."""
        self.ring.close()
        self.closed = True

    @invariant()
    def counts_match(self) -> None:
        """Ring size and each record's claim count match the model."""
        stats = self.ring.stats()
        assert stats["size"] == len(self.queue)
        assert stats["closed"] == int(self.closed)
        for c in range(self.NC):
            assert self.ring.consumer_info(c)["claimed"] == len(self.claims[c])

    def teardown(self) -> None:
        self.ring.release()


TestRingModel = RingModel.TestCase
TestRingModel.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
