"""Frame builders shared by the tables tests (the same rows serially and in a worker)."""

from __future__ import annotations

import numpy as np
import pandas as pd

import shardc


def frame(shard, n: int = 50):
    """A pandas frame for ``shard``: floats from shard.rng, an int column
    numbering rows globally, a string column with nulls."""
    r = shard.rng
    sid = shard.id
    s = np.array([f"id{sid:04d}-{k:03d}" for k in range(n)], dtype=object)
    s[::7] = None
    return pd.DataFrame({"x": r.random(n), "i": np.arange(sid * n, sid * n + n, dtype=np.int64), "s": s})


def expected(num: int, seed: int, n: int = 50):
    """What the concatenated frames of ``num`` shards are (built serially)."""
    desc = shardc.shards(num, block_size=1)
    parts = []
    for k in range(num):
        sh = desc.shard(k, seed_entropy(seed))
        parts.append(frame(sh, n))
    return pd.concat(parts, ignore_index=True)


def seed_entropy(seed: int) -> int:
    return int(np.random.SeedSequence(seed).entropy)  # what shard_map passes workers as the entropy
