"""Per-shard cost of the shared status row and done map (``shardc.status``).

Measures, in one process with no worker (the writer's own cost, which is
what every shard pays on top of the user's function), the median over
``--rounds`` rounds of N calls each, in ns per shard:

* ``status_rpc_shard``: ``shard_begin`` + ``shard_end`` (one rpc shard).
* ``status_queue_shard``: a block of 64 shards as the shm_queue loop writes it
  (``block_begin``, 63 x ``shard_next``, ``block_end``), per shard.
* ``status_read``: one master ``StatusTable.read`` (a consistent snapshot).
* ``status_donemap_count``: ``DoneMap.count()`` over 1,000,000 shards, per call (us).

It uses only the public API of ``shardc.status``, so the same script measures
any commit (run it at the commit before and after a change, interleaved).
Does not measure: contention with a reading master (cache-line transfers
between cores cost the same for any implementation of the same layout), or
the rest of a shard's overhead (see bench_tiny).

``python bench/bench_status.py [--quick] [--rounds N] [--impl FILE]``

``--impl FILE`` measures another version of ``shardc/status.py`` (e.g. the
previous commit's, from ``git show REV:shardc/status.py > FILE``) against
this tree's ``shardc`` package, so before and after run in one sitting.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shardc  # noqa: E402,F401


def load_status(path: str | None):  # type: ignore[no-untyped-def]
    """shardc.status, or the module at ``path`` loaded as a sibling of it."""
    if path is None:
        import shardc.status as mod
        return mod
    spec = importlib.util.spec_from_file_location("shardc._bench_status_impl", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

BLOCK = 64


def per_shard_rpc(row, done, n: int) -> float:  # type: ignore[no-untyped-def]
    begin, end = row.shard_begin, row.shard_end
    t0 = time.perf_counter_ns()
    for sid in range(n):
        begin(sid)
        end(done, sid, 1)
    return (time.perf_counter_ns() - t0) / n


def per_shard_queue(row, done, n: int) -> float:  # type: ignore[no-untyped-def]
    bb, nx, be = row.block_begin, row.shard_next, row.block_end
    nblocks = n // BLOCK
    t0 = time.perf_counter_ns()
    for b in range(nblocks):
        start = b * BLOCK
        stop = start + BLOCK
        bb(start, BLOCK)
        for sid in range(start, stop - 1):
            nx(done, sid, 1, sid + 1)
        be(done, stop - 1, 1, BLOCK)
    return (time.perf_counter_ns() - t0) / (nblocks * BLOCK)


def per_read(table, n: int) -> float:  # type: ignore[no-untyped-def]
    read = table.read
    t0 = time.perf_counter_ns()
    for _ in range(n):
        read(0)
    return (time.perf_counter_ns() - t0) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--impl", default=None, help="another status.py to measure")
    args = p.parse_args()
    mod = load_status(args.impl)
    StatusTable, DoneMap = mod.StatusTable, mod.DoneMap
    rounds = args.rounds or (3 if args.quick else 9)
    n = 20_000 if args.quick else 200_000
    n -= n % BLOCK
    table = StatusTable(2)
    row = table.row(0)
    done = DoneMap(n)
    big = DoneMap(1_000_000)
    res: dict[str, list[float]] = {"status_rpc_shard": [], "status_queue_shard": [], "status_read": [],
                                   "status_donemap_count": []}
    for _ in range(rounds):
        res["status_rpc_shard"].append(per_shard_rpc(row, done, n))
        res["status_queue_shard"].append(per_shard_queue(row, done, n))
        res["status_read"].append(per_read(table, n // 10))
        t0 = time.perf_counter_ns()
        for _ in range(20):
            big.count()
        res["status_donemap_count"].append((time.perf_counter_ns() - t0) / 20 / 1e3)
    units = {"status_donemap_count": "us"}
    for name, vals in res.items():
        print(f"{name}\t{statistics.median(vals):.1f}\t{units.get(name, 'ns')}")
    table.close()
    done.close()
    big.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
