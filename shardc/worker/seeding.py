"""Legacy RNG seeding per shard (``seed=``): ``random`` and ``np.random`` from
(the call's seed, the shard's global id), bit-identical whichever worker,
chunking, mode or attempt runs the shard."""

from __future__ import annotations

import _random
import random
from typing import Any

import numpy as np

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment
_NP_SEED = np.random.mtrand._rand.seed  # np.random.seed's own target, without its module-level wrapper
_PY_RANDOM: Any = random._inst  # the instance behind random.seed/random.random
_PY_SEED = _random.Random.seed  # random.seed(int) minus its Python-level type checks
_seed_keys: dict[int, int] = {}


def _mix64(z: int) -> int:
    """splitmix64's output function (a 64-bit bijection with full avalanche)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def seed_key(entropy: int) -> int:
    """A call's seed folded to 64 bits (every bit of a bigger seed counts), memoized."""
    key = _seed_keys.get(entropy)
    if key is None:
        key, e = _mix64(0x5348415244430001), entropy  # a fixed start: "SHARDC" v1
        while True:
            key = _mix64((key + (e & _M64) + _GAMMA) & _M64)
            e >>= 64
            if not e:
                break
        if len(_seed_keys) > 64:
            _seed_keys.clear()
        _seed_keys[entropy] = key
    return key


def seed_legacy(entropy: int, sid: int) -> None:
    """Seed ``random`` and ``np.random`` from (seed, global shard id), for legacy code.

    The two 32-bit seeds are output ``sid`` of the splitmix64 stream keyed by
    the call's seed (:func:`seed_key`): a fixed integer mix, ~0.3 us, where a
    ``SeedSequence`` per shard cost ~10 us.  Each generator is then seeded
    exactly as ``np.random.seed(a)`` / ``random.seed(b)`` do (state, and the
    cached Gaussian dropped), without their Python-level wrappers.  What is
    left (~1.3 us for NumPy's MT19937, ~4 us for ``random``'s init_by_array)
    is the generators' own seeding."""
    z = _mix64((seed_key(entropy) + (sid + 1) * _GAMMA) & _M64)
    _NP_SEED(z & 0xFFFFFFFF)
    _PY_SEED(_PY_RANDOM, z >> 32)
    _PY_RANDOM.gauss_next = None
