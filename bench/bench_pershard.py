"""Per-shard cost of a trivial shard, taken apart: where a worker's time goes.

Measures, in ONE process (no workers, no messages, nothing in parallel), the
nanoseconds per shard of each piece of the worker's per-shard path, on the
shards ``shard_map(N, fun)`` makes (one item each) and bench_tiny's trivial
``fun`` (``out[shard.id] = shard.id``, or ``return shard.id`` for rpc):

* ``loop``: an empty ``for`` over the ids (the floor every loop pays);
* ``bare_call``: ``f(shard)`` of a function that returns at once;
* ``fun_call``: ``fun(shard, **kwargs)`` with the out buffer as keyword (the
  user's shard itself); ``fun_call_args``: ``fun(shard, *args)``, as the
  executor calls it where that binds the same;
* ``shard_object``: building the shard (``desc.maker()``, as the executor
  does); ``shard_init``: the same through ``Shard.__init__`` (before);
* ``rng_first_use``: building ``shard.rng`` (paid only by shards that use it);
* ``status_next``: the done mark + status row update between two shards (one
  C call through ``StatusRow.shard_next``); ``status_next_raw``: the same C
  call without the Python method around it;
* ``outcome_tuple``: rpc only: the outcome tuple appended per shard;
* ``outcome_pickle``: rpc only: pickling outcomes into a RESULTS message;
* ``executor_block`` / ``executor_ids``: the whole executor loop per shard,
  ``ShardExecutor.run_block`` (shm_queue) and ``run_ids`` (rpc_chunked:
  speculative runs, values in frames); ``executor_ids_careful``: ``run_ids``
  with per-shard status (how ids lost in a speculative run are rerun);
* ``seed_legacy``: seeding ``random``/``np.random`` per shard (``seed=``
  only); ``seed_legacy_before``: the SeedSequence-per-shard way it replaced.

With ``--pool`` it also runs shm_queue and rpc_chunked (``chunk_size="auto"``)
calls of ``--n`` shards on 2 workers and reports the worker time per shard
(wall x workers / N), which adds what is not in the executor: popping blocks,
messages, the master.

Prints ``pershard.<piece>.ns<TAB>value<TAB>ns`` lines and a table.  Medians
over ``--rounds`` (5; 3 with ``--quick``).  Does not measure: shards that do
work (their own time dominates), guards (``cow`` with borrowed inputs), or
memory.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def shard_write(shard: Any, out: Any) -> None:
    out[shard.id] = shard.id


def shard_return(shard: Any) -> int:
    return shard.id


def nothing(shard: Any) -> None:
    return None


def per_shard_ns(fn: Any, n: int, rounds: int) -> float:
    """Median over ``rounds`` of ``fn(n)``'s wall time, per item, in ns."""
    fn(min(n, 1000))  # warm
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn(n)
        times.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(times)


def in_process(n: int, rounds: int) -> dict[str, float]:
    """Each piece of the per-shard path, ns per shard (see the module docstring)."""
    from shardc import _lowlevel as ll
    from shardc.protocol import OK
    from shardc.status import DoneMap, StatusTable
    from shardc.validate import resolve_shards
    from shardc.worker.executor import ShardExecutor, seed_legacy
    from shardc.worker.heap import HeapPolicy

    desc, _ = resolve_shards(n)
    out = np.zeros(n, dtype=np.int64)
    kwargs = {"out": out}
    entropy = np.random.SeedSequence(None).entropy
    table = StatusTable(1)
    row = table.row(0)
    done = DoneMap(n)
    shard0 = desc.shard(0, entropy)
    make = desc.maker()  # what the executor uses
    make_init = desc.shard  # through Shard.__init__
    res: dict[str, float] = {}

    def loop(k: int) -> None:
        for _sid in range(k):
            pass

    def bare(k: int) -> None:
        f, s = nothing, shard0
        for _sid in range(k):
            f(s)

    def fun_call(k: int) -> None:
        f, s, kw = shard_write, shard0, kwargs
        for _sid in range(k):
            f(s, **kw)

    def fun_call_args(k: int) -> None:
        f, s, a = shard_write, shard0, (out,)
        for _sid in range(k):
            f(s, *a)

    def shard_object(k: int) -> None:
        m, e = make, entropy
        for sid in range(k):
            m(sid, e)

    def shard_init(k: int) -> None:
        m, e = make_init, entropy
        for sid in range(k):
            m(sid, e)

    def rng_first(k: int) -> None:
        m, e = make, entropy
        for sid in range(k):
            m(sid, e).rng  # noqa: B018 - the property builds the generator

    def status_next(k: int) -> None:
        nxt, d = row.shard_next, done
        for sid in range(k - 1):
            nxt(d, sid, 1, sid + 1)

    def status_next_raw(k: int) -> None:
        row.shard_next(done, 0, 1, 0)  # binds the done map
        f, p = ll.status_next, row._p
        for sid in range(k - 1):
            f(p, sid, 1, sid + 1)

    def outcome_tuple(k: int) -> None:
        acc: list[Any] = []
        app = acc.append
        for sid in range(k):
            app((sid, OK, sid, 0, 0, None, None))

    outcomes = [(sid, OK, sid, 1_000_000_000 + sid, 1_000_000_500 + sid, None, None) for sid in range(n)]

    def outcome_pickle(k: int) -> None:
        pickle.dumps(("results", 1, outcomes[:k]), protocol=5)

    def seeding(k: int) -> None:
        for sid in range(k):
            seed_legacy(entropy, sid)

    ex = ShardExecutor(row, None, HeapPolicy(row, os.getpid()))

    def setup(fun: Any, kw: dict[str, Any]) -> None:
        ex.end_call()
        c = ex.call
        c.call_id, c.fun, c.kwargs, c.desc, c.entropy = 1, fun, kw, desc, entropy
        c.seeded, c.diagnostics, c.donemap = False, True, done
        ex.begin_call()

    def on_fail(o: Any) -> None:
        raise RuntimeError(f"shard failed: {o}")

    def on_cow(sid: int, events: Any) -> None:
        pass

    def block(k: int) -> None:
        ex.run_block(0, k, on_fail, on_cow)

    def ids(k: int) -> None:
        ex.run_ids(list(range(k)))

    def ids_careful(k: int) -> None:
        ex.run_ids(list(range(k)), careful=True)

    def seeding_before(k: int) -> None:  # what seed_legacy did before issue 18: a SeedSequence per shard
        import random

        for sid in range(k):
            state = np.random.SeedSequence(entropy, spawn_key=(sid, 1)).generate_state(2)
            np.random.seed(int(state[0]))
            random.seed(int(state[1]))

    res["loop"] = per_shard_ns(loop, n, rounds)
    res["bare_call"] = per_shard_ns(bare, n, rounds)
    res["fun_call"] = per_shard_ns(fun_call, n, rounds)
    res["fun_call_args"] = per_shard_ns(fun_call_args, n, rounds)
    res["shard_object"] = per_shard_ns(shard_object, n, rounds)
    res["shard_init"] = per_shard_ns(shard_init, n, rounds)
    res["rng_first_use"] = per_shard_ns(rng_first, min(n, 20_000), rounds)
    res["status_next"] = per_shard_ns(status_next, n, rounds)
    res["status_next_raw"] = per_shard_ns(status_next_raw, n, rounds)
    res["outcome_tuple"] = per_shard_ns(outcome_tuple, n, rounds)
    res["outcome_pickle"] = per_shard_ns(outcome_pickle, n, rounds)
    res["seed_legacy"] = per_shard_ns(seeding, min(n, 20_000), rounds)
    res["seed_legacy_before"] = per_shard_ns(seeding_before, min(n, 20_000), rounds)
    setup(shard_write, kwargs)
    res["executor_block"] = per_shard_ns(block, n, rounds)
    setup(shard_return, {})
    res["executor_ids"] = per_shard_ns(ids, n, rounds)
    res["executor_ids_careful"] = per_shard_ns(ids_careful, n, rounds)
    ex.end_call()
    done.close()
    table.close()
    return res


def end_to_end(n: int, rounds: int) -> dict[str, float]:
    """Worker ns per shard of whole calls on 2 workers (wall x 2 / N)."""
    import shardc

    pool = shardc.pool_create(2)
    buf = shardc.buffer("i8", n)
    res: dict[str, float] = {}
    try:
        calls = {
            "pool_shm_queue": lambda: shardc.shard_map(
                n, shard_write, out={"out": buf}, dispatch_mode="shm_queue", pool=pool
            ),
            "pool_rpc_auto": lambda: shardc.shard_map(n, shard_return, chunk_size="auto", pool=pool),
        }
        times: dict[str, list[float]] = {k: [] for k in calls}
        for name, call in calls.items():
            call()  # warm
        for r in range(rounds):
            for name in calls if r % 2 == 0 else reversed(list(calls)):
                t0 = time.perf_counter_ns()
                calls[name]()
                times[name].append((time.perf_counter_ns() - t0) * 2 / n)
        res = {k: statistics.median(v) for k, v in times.items()}
        assert np.array_equal(buf.array, np.arange(n))
    finally:
        pool.stop()
        buf.close()
    return res


ROWS = [  # (piece, what it is, counted in shm_queue / rpc)
    ("loop", "empty loop over the ids", "", ""),
    ("bare_call", "Python call of a function returning None", "", ""),
    ("fun_call", "fun(shard, **kwargs): the trivial shard (before)", "", ""),
    ("fun_call_args", "fun(shard, *args): how the executor calls it where that binds the same", "x", "x"),
    ("shard_object", "shard object (desc.maker(): slots filled directly)", "x", "x"),
    ("shard_init", "the same through Shard.__init__ (before)", "", ""),
    ("status_next", "done mark + status row (StatusRow.shard_next)", "x", "x"),
    ("status_next_raw", "the same C call, no Python method", "", ""),
    ("outcome_tuple", "outcome tuple per shard", "", "x"),
    ("outcome_pickle", "outcome pickled into RESULTS", "", "x"),
    ("executor_block", "whole executor loop, run_block (shm_queue)", "=", ""),
    ("executor_ids", "whole executor loop, run_ids (rpc): speculative runs + frames", "", "="),
    ("executor_ids_careful", "the same with per-shard status (careful): frames only", "", ""),
    ("rng_first_use", "shard.rng built (only if fun uses it)", "", ""),
    ("seed_legacy", "random/np.random seeded (seed= only): splitmix64 + direct seeding", "", ""),
    ("seed_legacy_before", "the same before issue 18: a SeedSequence per shard", "", ""),
    ("pool_shm_queue", "whole call, 2 workers: wall x 2 / N", "", ""),
    ("pool_rpc_auto", "whole call, 2 workers: wall x 2 / N", "", ""),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer shards and rounds")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per piece (median taken)")
    p.add_argument("--n", type=int, default=None, help="shards per round (default 200000; 50000 with --quick)")
    p.add_argument("--pool", action="store_true", help="also time whole calls on a pool of 2 workers")
    args = p.parse_args(argv)
    n = args.n or (50_000 if args.quick else 200_000)
    rounds = args.rounds or (3 if args.quick else 5)
    res = in_process(n, rounds)
    if args.pool:
        res.update(end_to_end(max(n, 200_000), rounds))
    for k, v in res.items():
        C.emit(f"pershard.{k}.ns", v, "ns")
    rows = [[k, what, round(res[k], 1), q, r] for k, what, q, r in ROWS if k in res]
    print()
    print(f"### per-shard cost of a trivial shard, ns (N = {n}, median of {rounds}; one process)")
    print()
    print(C.table(["piece", "what", "ns/shard", "shm_queue", "rpc"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
