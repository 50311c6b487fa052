"""``shard.rng``'s seed, cheaply: NumPy's own streams at ~1/4 of the cost.

A shard's generator is ``Generator(PCG64(SeedSequence(entropy,
spawn_key=(id,))))``.  Building the ``SeedSequence`` and drawing PCG64's
state from it costs ~10 us in NumPy (Python objects and arrays for 16
words of arithmetic), more than a tiny shard's own work.  :func:`shard_rng`
builds the same generator with a :class:`ShardSeed` in its place, whose
state comes from C (csrc/seedseq.c, the same algorithm): the streams are
NumPy's, bit for bit (checked against NumPy once per process; where they
differ, e.g. a future NumPy, the real ``SeedSequence`` is used).
A ``ShardSeed`` acts as the ``SeedSequence`` it stands for (``spawn``,
``entropy``, ``spawn_key``, ``generate_state``, pickling), building the real
one only when asked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.random.bit_generator import ISpawnableSeedSequence

from . import _lowlevel as ll

_STATE = np.empty(4, np.uint64)  # PCG64's seed words: read once at its construction, then free
_fill = ll.seedseq_filler(_STATE)
_words: dict[int, Any] = {}
_fast: bool | None = None  # None: not checked yet in this process


def real_seedseq(entropy: int, sid: int) -> np.random.SeedSequence:
    """The SeedSequence a shard's generator stands on (what a ShardSeed pickles to)."""
    return np.random.SeedSequence(entropy, spawn_key=(sid,))


class ShardSeed(ISpawnableSeedSequence):
    """``SeedSequence(entropy, spawn_key=(sid,))``, its PCG64 state from C."""

    __slots__ = ("_entropy", "_fresh", "_id", "_real", "_words")

    def __init__(self, words: Any, entropy: int, sid: int) -> None:
        self._words, self._entropy, self._id = words, entropy, sid
        self._real: np.random.SeedSequence | None = None
        self._fresh = True

    def generate_state(self, n_words: int, dtype: Any = np.uint32) -> np.ndarray:
        if self._fresh and n_words == 4 and dtype is np.uint64:  # PCG64's one read, as it is made
            self._fresh = False
            return _fill(self._words, self._id)
        return self.real().generate_state(n_words, dtype)

    def spawn(self, n_children: int) -> list[np.random.SeedSequence]:
        return self.real().spawn(n_children)

    def real(self) -> np.random.SeedSequence:
        if self._real is None:
            self._real = real_seedseq(self._entropy, self._id)
        return self._real

    def __getattr__(self, name: str) -> Any:  # entropy, spawn_key, pool, state, n_children_spawned, ...
        if name.startswith("_"):  # unset private names (copy, pickle probes): the usual AttributeError
            return object.__getattribute__(self, name)
        return getattr(self.real(), name)

    def __reduce__(self) -> Any:
        return (real_seedseq, (self._entropy, self._id))

    def __repr__(self) -> str:
        return repr(self.real())


def _check() -> bool:
    """The C state equals NumPy's for a few seeds (once per process)."""
    global _fast
    try:
        _fast = all(
            np.array_equal(
                ll.seedseq_filler(np.empty(4, np.uint64))(ll.seedseq_words(e), k),
                real_seedseq(e, k).generate_state(4, np.uint64),
            )
            and np.random.PCG64(ShardSeed(ll.seedseq_words(e), e, k)).state == np.random.PCG64(real_seedseq(e, k)).state
            for e, k in ((0, 0), (12345, 7), ((1 << 127) + 99, (1 << 40) + 3))
        )
    except Exception:  # noqa: BLE001 - any surprise: NumPy's own path
        _fast = False
    return _fast


def shard_rng(entropy: int, sid: int) -> np.random.Generator:
    """``Generator(PCG64(SeedSequence(entropy, spawn_key=(sid,))))``, cheaply."""
    if not (_fast if _fast is not None else _check()):
        return np.random.Generator(np.random.PCG64(real_seedseq(entropy, sid)))
    words = _words.get(entropy)
    if words is None:
        if len(_words) > 64:
            _words.clear()
        words = _words[entropy] = ll.seedseq_words(entropy)
    return np.random.Generator(np.random.PCG64(ShardSeed(words, entropy, sid)))
