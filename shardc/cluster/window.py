"""A window of a shard descriptor: the shards of one macro-shard.

A node agent runs shards ``lo .. hi-1`` of the caller's descriptor as one
local ``shard_map`` call.  :class:`WindowDescriptor` numbers them ``0 ..
hi-lo-1`` for the local engine (its scheduler, done map and results), while
every :class:`~shardc.shards.Shard` it makes keeps its *global* id, start,
stop and ``idx``: ``fun`` sees exactly the shard a local run would give it,
and ``shard.rng`` (and the legacy ``random``/``np.random`` seeding, which the
executor takes from ``shard.id``) depend on the global id only.

Pickled (to the pool's workers, once per macro-shard) it carries a few
integers, or for ``shards_list`` descriptors only the window's index lists.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..shards import Shard, ShardDescriptor


class WindowDescriptor(ShardDescriptor):
    """Shards ``lo .. hi-1`` of ``base``, local number ``k`` = global ``lo + k``.

    Attributes:
        lo, hi: the global ids covered (``hi`` excluded).
    """

    def __init__(self, base: ShardDescriptor, lo: int, hi: int) -> None:
        super().__init__(base.n, base.block_size, base.strategy, hi - lo, None)
        self.lo = lo
        self.hi = hi
        self.base_num_shards = base.num_shards
        self._win_lists: list[np.ndarray] | None = None
        self._base: ShardDescriptor | None = None
        if base.strategy == "list":
            self._win_lists = [base.shard(g).idx for g in range(lo, hi)]
        else:
            self._base = ShardDescriptor(base.n, base.block_size, base.strategy, base.num_shards)

    def shard(self, k: int, seedseq: Any = None) -> Shard:
        g = self.lo + k
        if self._win_lists is not None:
            idx = self._win_lists[k]
            return Shard(g, int(idx.min()), int(idx.max()) + 1, len(idx), idx, 0, seedseq)
        assert self._base is not None
        return self._base.shard(g, seedseq)

    def maker(self) -> Any:
        """The worker's fast shard factory: the base descriptor's (contiguous:
        slots filled directly, see ``ShardDescriptor.maker``) shifted by ``lo``;
        tiny shards run about 1 us each, where a generic ``shard()`` per shard
        would cost a third of that again.  Its ``block_class`` and ``id_offset``
        let the workers' speculative loops (:mod:`shardc.worker.spec`) make
        each shard inline with its global id, without the two calls."""
        if self._base is None or self.strategy != "contiguous":
            return self.shard
        make, lo = self._base.maker(), self.lo

        def shifted(k: int, seedseq: Any = None) -> Shard:
            return make(lo + k, seedseq)

        cls = getattr(make, "block_class", None)
        if cls is not None:  # the workers' hot loops make the base's BlockShard inline, at id k + lo
            shifted.block_class = cls  # type: ignore[attr-defined]
            shifted.id_offset = lo  # type: ignore[attr-defined]
        return shifted

    def __reduce__(self) -> Any:
        return (
            _rebuild,
            (self.n, self.block_size, self.strategy, self.base_num_shards, self.lo, self.hi, self._win_lists),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "lo": self.lo, "hi": self.hi}

    def __repr__(self) -> str:
        return f"<WindowDescriptor shards {self.lo}..{self.hi - 1} of {self.base_num_shards} ({self.strategy})>"


def _rebuild(
    n: int, block: int | None, strategy: str, num: int, lo: int, hi: int, lists: list[np.ndarray] | None
) -> WindowDescriptor:
    w = WindowDescriptor.__new__(WindowDescriptor)
    ShardDescriptor.__init__(w, n, block, strategy, hi - lo, None)
    w.lo, w.hi, w.base_num_shards, w._win_lists = lo, hi, num, lists
    w._base = None if lists is not None else ShardDescriptor(n, block, strategy, num)
    return w
