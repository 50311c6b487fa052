"""The master's handle on one worker process (a slot of a pool)."""

from __future__ import annotations

import time
from typing import Any

from ._channel import Channel


class WorkerHandle:
    """The master's view of one worker slot."""

    def __init__(self, slot: int, pid: int, chan: Channel) -> None:
        self.slot = slot
        self.pid = pid
        self.chan = chan
        self.known: set[str] = set()  # segment keys whose fd this worker has
        self.started = time.monotonic()
        self.baseline: int | None = None  # USS (or RSS) after start
        self.last_mem: dict[str, int] | None = None
        self.peak: dict[str, int] = {"rss": 0, "pss": 0, "uss": 0, "anon": 0}
        self.recycles = 0
        self.restarts = 0
        self.last_recycle = 0.0
        self.state = "idle"
        self.alive = True
        self.exitcode: int | None = None
        self.call_id = -1
        self.call_ended = False  # the call's END already went with its work (RpcDispatcher.start)
        self.pids: list[int] = [pid]
        self.precise_t = 0.0  # when the last smaps_rollup sample was taken
        self.precise_cost = 0.0  # ... and how long it took (s): it grows with the memory mapped
        self.ring_held: tuple[int, str] | None = None  # (pid, token) of the queue ring it has mapped
        self.fast_raw: dict[str, int] | None = None  # the last statm sample read (MemoryModel._statm), raw
        self.fast_t = 0.0  # ... and when it was read
        self.busy_unread_ns = 0  # shard time reported since then (MemoryModel.unmoved)
        self.anon_offset = 0  # statm RssAnon minus Pss_Anon at that sample
        self.cow_slack = 0  # growth that copy-on-write of inherited pages alone can cause
        self.fast_anon = 0  # statm private estimate at that time
        # Borrowed arrays this worker inherited at fork (shardc.inherit tokens)
        # and their bytes: still mapped until the call that uses them ends.
        self.inherit_tokens: frozenset[int] = frozenset()
        self.inherited_bytes = 0
        self.needs_baseline = False  # set by the first precise sample (Pool.refork)
        self.hello_anon = 0  # statm anonymous memory when it said hello (Pool.refork)
        self.server: Any = None  # the shardc.forkserver.ForkServer that forked it (None: forked by the master)

    def info(self) -> dict[str, Any]:
        m = self.last_mem or {}
        return {
            "worker": self.slot,
            "pid": self.pid,
            "state": self.state if self.alive else "dead",
            "rss": m.get("rss"),
            "pss": m.get("pss"),
            "uss": m.get("uss"),
            "anon": m.get("pss_anon"),
            "baseline": self.baseline,
            "recycles": self.recycles,
            "restarts": self.restarts,
        }
