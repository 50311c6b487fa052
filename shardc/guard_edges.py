"""The partial end pages of inherited inputs, for the page guards (:mod:`shardc.guard`).

An array inherited over fork (:mod:`shardc.inherit`) rarely starts and ends on
page boundaries, and other objects may live on its first and last pages, so
those pages cannot be write-protected.  Their bytes that belong to the array
(the "edges") are saved when the input is protected, compared after every
shard, and put back when a shard changed them: a write there is reported when
the shard ends, rather than at once, and undone like any other.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

from .guard_locate import Input, element_index

__all__ = ["Edge", "EdgeTable"]


@dataclass
class Edge:
    """Bytes ``[lo, lo + len(saved))`` of an inherited input, on a page shared with other memory."""

    lo: int
    saved: bytes
    views: list[Input] = field(default_factory=list)


class EdgeTable:
    """Every saved edge in this process, and which protect handle holds which."""

    def __init__(self) -> None:
        self.edges: dict[tuple[int, int], Edge] = {}
        self.by_handle: dict[int, list[tuple[int, int]]] = {}

    def __bool__(self) -> bool:
        return bool(self.edges)

    def add(self, handle: int, spans: list[tuple[int, int]], view_of: Any) -> None:
        """Save the spans ``[(lo, hi), ...]`` (empty ones skipped) for ``handle``;
        ``view_of(lo, hi)`` gives the :class:`Input` naming bytes there."""
        keys = []
        for s0, s1 in spans:
            if s1 <= s0:
                continue
            edge = self.edges.get((s0, s1))
            if edge is None:
                edge = self.edges[(s0, s1)] = Edge(s0, ctypes.string_at(s0, s1 - s0))
            edge.views.append(view_of(s0, s1))
            keys.append((s0, s1))
        self.by_handle.setdefault(handle, []).extend(keys)

    def drop(self, handle: int) -> None:
        """Forget what ``handle`` saved (an edge goes when its last view does)."""
        for key in self.by_handle.pop(handle, ()):
            edge = self.edges.get(key)
            if edge is not None:
                edge.views.pop()
                if not edge.views:
                    del self.edges[key]

    def check(self, shard_id: Any) -> list[dict[str, Any]]:
        """Events for edges changed since they were saved; the saved bytes are put back."""
        events = []
        for (s0, s1), edge in self.edges.items():
            now = ctypes.string_at(s0, s1 - s0)
            if now == edge.saved:
                continue
            first = next(i for i in range(len(now)) if now[i] != edge.saved[i])
            ctypes.memmove(s0, edge.saved, len(edge.saved))
            inp = edge.views[0]
            for v in edge.views:
                vlo, vhi = v.extent()
                if vlo <= first < vhi:
                    inp = v
                    break
            rel = first - inp.offset0
            events.append(
                {
                    "input": inp.name,
                    "shard": shard_id,
                    "mode": inp.mode,
                    "pages": 1,
                    "bytes": s1 - s0,
                    "first_offset": rel,
                    "first_index": element_index(inp, rel),
                    "faults": 0,
                    "exact": True,
                }
            )
        return events
