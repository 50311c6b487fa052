"""The worker package: the one shard executor (in-process, no fork), the
behaviours both dispatch modes share through it (end to end), and the
package's import boundaries."""

from __future__ import annotations

import ast
import os
import random
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _engine_helpers import RecordingChan, no_stray_children, pool2  # noqa: F401 (fixtures)

import shardc
from shardc.protocol import ERR, FRAME, OK, QDONE, QFAIL, RESULTS, RUN
from shardc.queue import TaskRing
from shardc.status import STATE_IDLE, DoneMap, StatusTable
from shardc.worker.executor import LONG_NS, RunStats, ShardExecutor
from shardc.worker.heap import HeapPolicy
from shardc.worker.loop import Worker
from shardc.worker.queue_loop import encode, run_queue_call

pytestmark = pytest.mark.timeout(120)

N = 8


class Harness:
    """An executor bound to ``fun`` over N shards, with its status row and done map."""

    def __init__(
        self, fun: Any, seeded: bool = False, diagnostics: bool = True, executor: type[ShardExecutor] = ShardExecutor
    ) -> None:
        self.table = StatusTable(1)
        self.row = self.table.row(0)
        self.done = DoneMap(N)
        self.ex = executor(self.row, None, HeapPolicy(self.row, os.getpid()))  # heap reuse stays off
        c = self.ex.call
        c.fun, c.kwargs, c.desc = fun, {}, shardc.shards(N, block_size=1)
        c.entropy, c.seeded, c.diagnostics, c.donemap = 1234, seeded, diagnostics, self.done
        self.ex.begin_call()
        self.failed: list[tuple] = []
        self.cow: list[Any] = []

    def block(self, start: int, stop: int) -> Any:
        return RunStats(*self.ex.run_block(start, stop, self.failed.append, lambda sid, ev: self.cow.append((sid, ev))))

    def marks(self) -> list[int]:
        return [self.done.get(i) for i in range(N)]

    def close(self) -> None:
        self.done.close()
        self.table.close()


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(fun: Any, **kw: Any) -> Harness:
        made.append(Harness(fun, **kw))
        return made[-1]

    yield make
    for h in made:
        h.close()


def odd_value(shard: Any) -> int | None:
    return shard.id if shard.id % 2 else None


def fails_on_3(shard: Any) -> None:
    if shard.id == 3:
        raise ValueError("three")


def test_rpc_outcomes_and_done_marks(harness):
    """run_ids: one Outcome-shaped tuple per shard in order; done mark 1 for None, 2 for a value to gather; row idle after."""
    h = harness(odd_value)
    out = h.ex.run_ids([5, 0, 1])
    assert [(o[0], o[1], o[2]) for o in out] == [(5, OK, 5), (0, OK, None), (1, OK, 1)]
    assert all(o[3] <= o[4] for o in out) and out[0][4] <= out[1][3]
    assert h.marks() == [1, 2, 0, 0, 0, 2, 0, 0]
    row = h.table.read(0)
    assert row.state == STATE_IDLE and row.done == 0  # rpc counts nothing in the row


def test_queue_block_marks_every_finished_shard_1(harness):
    """run_block: done mark 1 whatever fun returned (nothing is gathered); returned values counted; done counted in the row."""
    h = harness(odd_value)
    st = h.block(2, 8)
    assert (st.ran, st.ok, st.returned) == (6, 6, 3) and st.t0 <= st.t1
    assert h.marks() == [0, 0, 1, 1, 1, 1, 1, 1]
    row = h.table.read(0)
    assert row.state == STATE_IDLE and row.done == 6 and (row.block0, row.blockn) == (2, 6)
    assert h.failed == [] and h.cow == []


@pytest.mark.parametrize("where", ["middle", "last"])
def test_queue_block_failure_is_reported_and_the_block_goes_on(harness, where):
    """A failing shard goes to on_fail as an ERR record and gets no done mark; the other shards of the block still run and count."""
    h = harness(fails_on_3)
    st = h.block(0, 6 if where == "middle" else 4)
    n = 6 if where == "middle" else 4
    assert (st.ran, st.ok) == (n, n - 1)
    assert [f[0] for f in h.failed] == [3] and h.failed[0][1] == ERR
    rec = h.failed[0][2]
    assert (rec["type"], rec["message"], rec["shard"]) == ("builtins.ValueError", "three", 3)
    assert h.marks()[:n] == [1, 1, 1, 0] + [1] * (n - 4)
    assert h.table.read(0).done == n - 1 and h.table.read(0).state == STATE_IDLE


def exits(shard: Any) -> int:
    if shard.id == 1:
        sys.exit(3)
    if shard.id == 2:
        raise KeyboardInterrupt("stop")
    return shard.id


@pytest.mark.parametrize("mode", ["rpc", "queue"])
def test_system_exit_and_keyboard_interrupt_fail_only_their_shard(harness, mode):
    """SystemExit / KeyboardInterrupt from fun become a RuntimeError record naming the shard (cause kept), in both modes."""
    h = harness(exits)
    if mode == "rpc":
        out = h.ex.run_ids([0, 1, 2, 3])
        errs = [o for o in out if o[1] == ERR]
        assert [o[0] for o in out if o[1] == OK] == [0, 3]
    else:
        st = h.block(0, 4)
        errs = h.failed
        assert (st.ran, st.ok) == (4, 2)
    assert [e[0] for e in errs] == [1, 2]
    r1, r2 = errs[0][2], errs[1][2]
    assert (r1["type"], r1["message"]) == ("builtins.RuntimeError", "shard 1 raised SystemExit(3)")
    assert (r2["type"], r2["message"]) == ("builtins.RuntimeError", "shard 2 raised KeyboardInterrupt(stop)")
    assert "SystemExit: 3" in r1["traceback"] and "sys.exit(3)" in r1["traceback"]


def sleeps(shard: Any) -> None:
    time.sleep(2 * LONG_NS * 1e-9)


def quick(shard: Any) -> None:
    return None


def test_memory_delta_per_shard_in_rpc_and_per_block_in_queue(harness):
    """Long shards get a memory delta: per shard in rpc outcomes, per block in the queue; short shards none."""
    h = harness(sleeps)
    out = h.ex.run_ids([0, 1])
    assert all(isinstance(o[6], int) for o in out)
    assert isinstance(h.block(2, 4).mem_delta, int)
    s = harness(quick)
    s.ex.run_ids([0, 1, 2])  # learns that shards are short
    # short shards with consecutive ids travel as one frame, which has no memory delta
    assert [(o[0], o[1], o[2], o[6]) for o in s.ex.run_ids([3, 4])] == [(3, FRAME, [None, None], None)]
    assert s.block(5, 8).mem_delta is None
    s2 = harness(quick)
    s2.ex.run_ids([0, 1, 2])
    assert [o[6] for o in s2.ex.run_ids([4, 3])] == [None, None]  # not consecutive: per-shard outcomes


def test_memory_delta_off_without_diagnostics(harness):
    """diagnostics=False: no memory reading for the outcome, even for long shards."""
    h = harness(sleeps, diagnostics=False)
    assert [o[6] for o in h.ex.run_ids([0, 1])] == [None, None]
    assert h.block(2, 4).mem_delta is None


def draws(shard: Any) -> tuple[float, float, float]:
    return (random.random(), float(np.random.random()), float(shard.rng.random()))


def test_seeding_is_the_same_in_both_modes(harness):
    """With a seed, random/np.random/shard.rng give a shard the same draws from run_ids and run_block."""
    h = harness(draws, seeded=True)
    rpc = {o[0]: o[2] for o in h.ex.run_ids([2, 3])}
    got: list[Any] = []
    h.ex.call.fun = lambda shard: got.append((shard.id, draws(shard)))
    h.ex.begin_call()
    h.block(2, 4)
    assert dict(got) == rpc and rpc[2] != rpc[3]


def test_queue_loop_runs_ring_blocks_and_reports(harness):
    """run_queue_call: every block of a closed ring runs; QFAIL per failure, then QDONE with block timings, memory deltas of long blocks and the dropped-value count."""
    h = harness(lambda shard: fails_on_3(shard) or odd_value(shard))
    h.ex.ewma_ns = 2 * LONG_NS  # long shards: memory measured per block
    ring = TaskRing.create(capacity=16, max_consumers=1)
    ring.push(np.asarray([encode(0, 3), encode(3, 5)], dtype=np.uint64), timeout=0)
    ring.close()
    chan = RecordingChan()
    msg = {"call_id": 7, "nbytes": ring.nbytes, "claim_batch": 2}
    run_queue_call(0, chan, h.row, h.ex, msg, [os.dup(ring.fd), os.dup(h.done.segment.fd)])
    ring.release()
    assert [m[0] for m in chan.sent] == [QFAIL, QDONE] and chan.sent[0][2][0] == 3
    done = chan.sent[-1][2]
    assert [b[:2] for b in done["blocks"]] == [(0, 3), (3, 5)]
    assert [m[:2] for m in done["mem"]] == [(0, 3), (3, 5)] and all(isinstance(m[2], int) for m in done["mem"])
    assert (done["returned"], done["unfinished"], done["exiting"], done["retire"]) == (3, [], False, False)
    assert h.marks() == [1, 1, 1, 0, 1, 1, 1, 1] and h.table.read(0).done == 7


class _CountingExecutor(ShardExecutor):
    """Counts run_ids calls."""

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.runs: list[list[int]] = []

    def run_ids(self, ids: list[int], out: list | None = None, careful: bool = False) -> list:
        self.runs.append(list(ids))
        return super().run_ids(ids, out, careful)


@pytest.mark.parametrize("shards", ["short", "long"])
def test_rpc_chunks_queued_behind_run_in_one_call_when_short(harness, shards):
    """Worker.run_chunks: RUN chunks already queued run in one executor call when shards are known to be short, one call each when long (and only within ~2 ms); one RESULTS, in order."""
    h = harness(odd_value if shards == "short" else sleeps, executor=_CountingExecutor)
    chan = RecordingChan()
    w = Worker(0, chan, h.table, None)
    w.ex = h.ex
    pending = deque(((RUN, 1, [i]), []) for i in range(1, 6))
    w.run_chunks((RUN, 1, [0]), pending)
    ran = [sid for r in h.ex.runs for sid in r]
    if shards == "short":
        assert h.ex.runs == [[0], [1, 2, 3, 4, 5]] and not pending
    else:
        assert all(len(r) == 1 for r in h.ex.runs) and 1 <= len(ran) <= 4 and len(pending) == 6 - len(ran)
    assert [m[0] for m in chan.sent] == [RESULTS]
    sent = [i for o in chan.sent[0][2] for i in (range(o[0], o[0] + len(o[2])) if o[1] == FRAME else [o[0]])]
    assert sent == ran == list(range(len(ran)))


def sys_exits(shard: Any, out: Any = None) -> int:
    if shard.id == 2:
        sys.exit(0)
    if out is not None:
        out[shard.id] = 1
    return shard.id


@pytest.mark.parametrize("mode", ["rpc_chunked", "shm_queue"])
def test_sys_exit_in_fun_fails_that_shard_in_both_modes(pool2, mode):
    """shard_map: sys.exit() in fun is a failure of that shard (RuntimeError), never a SystemExit in the caller."""
    out = shardc.buffer(np.int64, (5,), init=0)
    kw: dict[str, Any] = {"out": {"out": out}, "dispatch_mode": mode} if mode == "shm_queue" else {}
    r = shardc.shard_map(5, sys_exits, max_retries=0, on_failure="collect", progress=False, **kw)
    assert list(r.failures) == [2]
    f = r.failures[2]
    assert (f.error_type, f.message) == ("builtins.RuntimeError", "shard 2 raised SystemExit(0)")
    if mode == "shm_queue":
        assert out.array.tolist() == [1, 1, 0, 1, 1]
    else:
        assert r.results[:2] == [0, 1] and r.results[3:] == [3, 4]
    out.close()


def _module_graph() -> dict[str, set[str]]:
    """shardc's modules -> the shardc modules each imports, at any depth of its source (functions included)."""
    root = Path(shardc.__file__).parent
    files = {}
    for p in root.rglob("*.py"):
        name = ".".join(("shardc", *p.relative_to(root).with_suffix("").parts))
        files[name.removesuffix(".__init__")] = p
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                parts = pkg.split(".")
                base = (
                    ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                    if node.level
                    else (node.module or "")
                )
                # "from .. import x" needs the module x, not the whole package
                deps.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[mod] = {d for d in deps if d in files}
    return graph


def test_worker_package_never_imports_the_master_side():
    """Nothing shardc/worker imports, directly or through other modules (imports inside functions too), is map, pool, dispatch_queue or the package root."""
    graph = _module_graph()
    start = [m for m in graph if m.startswith("shardc.worker")]
    assert sorted(start) == [
        "shardc.worker",
        "shardc.worker.executor",
        "shardc.worker.heap",
        "shardc.worker.loop",
        "shardc.worker.native",
        "shardc.worker.queue_loop",
        "shardc.worker.records",
        "shardc.worker.rpc",
        "shardc.worker.seeding",
        "shardc.worker.spec",
    ]
    seen: set[str] = set()
    todo = list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    assert seen & {"shardc", "shardc.map", "shardc.pool", "shardc.dispatch_queue"} == set()
    assert "shardc.worker" not in set().union(*(graph[m] for m in start))  # no cycle through the package
