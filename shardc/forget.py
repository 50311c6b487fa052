"""Telling workers to let go of segments the master closed.

Workers keep a call's segments mapped between calls (the next call may use
them again).  When the master closes a segment, every live worker of every
live pool must unmap it too, or the memory stays pinned.  A close can come
from a GC callback in the middle of any frame, so during a call the keys wait
for its end; outside a call they go out at once.  This module keeps the set
of live pools for that (and for closing other pools' sockets in a forked
worker).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from .protocol import FORGET
from .segment import _close_hooks

live_pools: weakref.WeakSet[Any] = weakref.WeakSet()

# Segments closed in this process that workers may still map.  Workers are
# told right away when nothing is being sent to them (no shard_map running);
# during a call (a close may come from a GC callback in the middle of a
# frame) the keys wait for the end of the call.
_pending_forget: set[str] = set()
_busy_calls = 0


def _on_segment_closed(key: str) -> None:
    _pending_forget.add(key)
    if _busy_calls == 0:
        flush_forgets()


def flush_forgets() -> None:
    """Tell every idle worker to drop the closed segments it still maps."""
    if not _pending_forget:
        return
    keys = set(_pending_forget)
    _pending_forget.difference_update(keys)
    for p in list(live_pools):
        if p.closed or os.getpid() != p._pid:
            continue
        for w in p.workers:
            mine = keys & w.known
            if mine and w.alive:
                try:
                    w.chan.send((FORGET, sorted(mine)))
                except OSError:
                    continue  # dead: its replacement starts with nothing mapped
                w.known.difference_update(mine)


def call_started() -> None:
    global _busy_calls
    _busy_calls += 1


def call_finished() -> None:
    global _busy_calls
    _busy_calls -= 1
    if _busy_calls == 0:
        flush_forgets()


_close_hooks.append(_on_segment_closed)
