"""Legacy RNG seeding per shard (``seed=``): ``random`` and ``np.random`` from
(the call's seed, the shard's global id), bit-identical whichever worker,
chunking, mode or attempt runs the shard.

Seeding both generators costs ~5 us a shard, 10-40x a trivial shard, and
most functions never touch them (``shard.rng`` is the generator to use, and
it is made only when read).  So the loops seed lazily (:class:`Legacy`):
the first shard of a call is seeded and watched (a fingerprint of both
states, :mod:`shardc._lowlevel.legacy`); a generator the function drew from
is seeded before every shard from then on (each generator on its own:
``np.random`` alone ~1.5 us, ``random`` ~4 us); the other runs unseeded and
watched: before a loop marks a run of shards done it checks the fingerprint
(~60 ns a run), and a run in which a shard drew (or reseeded) is run again
at once, seeded, its outcomes dropped, before anything of it leaves the
worker.  Outcomes are those of eager seeding.  What differs: such a run's
shards run twice (their side effects happen twice: at most once per
function, generator and worker, as the worker remembers what the function
drew from), and a shard that only reads a legacy state
(``np.random.get_state()``) without drawing sees the state the previous
shard left.
``SHARDC_LEGACY_SEEDING=eager`` seeds before every shard instead."""

from __future__ import annotations

import _random
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _lowlevel as ll
from .. import config

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


def _z(entropy: int, sid: int) -> int:
    """Output ``sid`` of the splitmix64 stream keyed by the call's seed: the
    shard's two 32-bit legacy seeds (low: NumPy's, high: ``random``'s)."""
    return _mix64((seed_key(entropy) + (sid + 1) * _GAMMA) & _M64)


def seed_legacy(entropy: int, sid: int) -> None:
    """Seed ``random`` and ``np.random`` from (seed, global shard id), for legacy code.

    The two 32-bit seeds are output ``sid`` of the splitmix64 stream keyed by
    the call's seed (:func:`seed_key`): a fixed integer mix, ~0.3 us, where a
    ``SeedSequence`` per shard cost ~10 us.  Each generator is then seeded
    exactly as ``np.random.seed(a)`` / ``random.seed(b)`` do (state, and the
    cached Gaussian dropped), without their Python-level wrappers.  What is
    left (~1.3 us for NumPy's MT19937, ~4 us for ``random``'s init_by_array)
    is the generators' own seeding."""
    z = _z(entropy, sid)
    _NP_SEED(z & 0xFFFFFFFF)
    _PY_SEED(_PY_RANDOM, z >> 32)
    _PY_RANDOM.gauss_next = None


def seed_np(entropy: int, sid: int) -> None:
    """:func:`seed_legacy`'s seeding of ``np.random`` alone."""
    _NP_SEED(_z(entropy, sid) & 0xFFFFFFFF)


def seed_py(entropy: int, sid: int) -> None:
    """:func:`seed_legacy`'s seeding of ``random`` alone."""
    _PY_SEED(_PY_RANDOM, _z(entropy, sid) >> 32)
    _PY_RANDOM.gauss_next = None


# Lazy seeding.  _watch: the states' ``changed()`` (None: seed eagerly),
# set up on first use in each worker; _watched: the bit generator watched
# (a reference keeps its memory alive; np.random.set_bit_generator swaps it).
_watch: Callable[[], int] | None = None
_watched: Any = None
_pid = 0  # the process that set them up (a forked worker sets up its own)
_DRAWS: dict[Any, int] = {}  # code object -> the generators a function was seen drawing from
NP, PY, BOTH = 1, 2, 3  # the generators, as the fingerprint's bits (np.random, random)
_SEEDERS: dict[int, Callable[[int, int], None]] = {NP: seed_np, PY: seed_py, BOTH: seed_legacy}


def _changed() -> Callable[[], int] | None:
    """The watch for this process's current legacy generators, or None
    (set up, and ``SHARDC_LEGACY_SEEDING`` read, once per process)."""
    global _watch, _watched, _pid
    bg = np.random.mtrand._rand._bit_generator
    if bg is not _watched or _pid != os.getpid():
        _watched, _pid = bg, os.getpid()
        _watch = None
        if config.get_str("SHARDC_LEGACY_SEEDING") == "lazy":
            _watch = ll.legacy_watch(bg, _PY_RANDOM)
    return _watch


def _never() -> int:
    """The watch where there is none (both generators are then seeded eagerly)."""
    return 0


def _code(fun: Any) -> Any:
    """What identifies a function across calls in a worker (its code object)."""
    fun = getattr(fun, "func", fun)  # functools.partial
    return getattr(fun, "__code__", None)


class Legacy:
    """One call's legacy seeding in a worker (kept across the call's loops).

    Each loop starts with :meth:`loop_start`, then calls ``fn(shard, *extra)`` (rebinding ``fn`` at each of its runs'
    boundaries: it changes as this learns) and, before it marks a run's
    shards done (and before it reports a failure), asks :meth:`drawn`; True
    means a shard of the run drew from a generator that is not seeded before
    every shard: the loop drops the run's outcomes, calls :meth:`redo` and
    runs the run again (``fn`` then seeds that generator too).
    ``eager``: the generators (NP, PY bits) seeded before every shard, the
    others watched; ``probing``: the call's first shard is yet to run (``fn``
    seeds both and watches which it draws from).  ``fn`` is the function
    itself when ``eager`` is 0: no cost per shard.
    """

    __slots__ = ("changed", "eager", "entropy", "fn", "inner", "key", "last", "probing", "watched")
    inner: Callable[..., Any]  # the loop's bound function, and what the loop calls: set by loop_start
    fn: Callable[..., Any]

    def __init__(self, entropy: int, fun: Any) -> None:
        self.entropy = entropy
        self.key = _code(fun)
        changed = _changed()
        self.watched = _watched
        self.last = 0
        known = _DRAWS.get(self.key) if self.key is not None else None
        self.probing = changed is not None and known is None
        self.eager = BOTH if changed is None else (known or 0)
        self.changed: Callable[[], int] = changed if changed is not None else _never

    def loop_start(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        """A loop of this call starts (``inner`` bound for it): the function to call."""
        self.inner = inner
        if self.eager != BOTH:
            changed = _changed()
            if changed is None or _watched is not self.watched:  # np.random's generator was swapped
                self.eager, self.probing, self.changed = BOTH, False, _never
            else:
                changed()  # the reference: the states as this loop finds them
        self.fn = self._closure()
        return self.fn

    def drawn(self) -> bool:
        """True if a shard since the last check drew from (or reseeded) a
        generator that is not seeded before every shard; the fingerprint is
        taken again either way."""
        self.last = self.changed() & (BOTH & ~self.eager)
        return bool(self.last)

    def redo(self) -> Callable[..., Any]:
        """After :meth:`drawn`: seed what was drawn from before every shard
        from now on (this worker remembers it for the function); returns the
        function to call."""
        self._learn(self.eager | (self.last or BOTH))
        self.fn = self._closure()
        return self.fn

    def _learn(self, eager: int) -> None:
        self.eager, self.probing = eager, False
        if self.key is not None and eager:
            if len(_DRAWS) > 256:
                _DRAWS.clear()
            _DRAWS[self.key] = eager

    def _closure(self) -> Callable[..., Any]:
        inner, entropy = self.inner, self.entropy
        if not self.probing:
            if not self.eager:
                return inner
            seed = _SEEDERS[self.eager]

            def eager(shard: Any, *args: Any) -> Any:
                seed(entropy, shard.id)
                return inner(shard, *args)

            return eager
        changed = self.changed

        def probe(shard: Any, *args: Any) -> Any:
            if not self.probing:  # decided by an earlier shard of this run
                if self.eager:
                    _SEEDERS[self.eager](entropy, shard.id)
                return inner(shard, *args)
            seed_legacy(entropy, shard.id)
            changed()  # the states just seeded are the reference
            try:
                return inner(shard, *args)
            finally:
                self._learn(changed())

        return probe
