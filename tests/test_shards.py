"""shards() / shards_list(): exact cover of 0..n-1, views for contiguous shards, auto sizing, validation."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shardc
from shardc.errors import ShardSpecError
from shardc.shards import Shard, ShardDescriptor, parse_count

FAST = settings(max_examples=200, deadline=None)


def all_indices(desc: ShardDescriptor) -> np.ndarray:
    return np.concatenate([s.indices() for s in desc])


def check_cover(desc: ShardDescriptor, n: int) -> None:
    """Every index of 0..n-1 exactly once; ids 0..num_shards-1; lengths consistent."""
    assert desc.n == n and len(desc) == desc.num_shards
    shards = list(desc)
    assert [s.id for s in shards] == list(range(desc.num_shards))
    for s in shards:
        idx = s.indices()
        assert len(s) == s.len == len(idx) >= 1
        assert s.start == idx.min() and s.stop == idx.max() + 1
    got = np.sort(all_indices(desc))
    assert np.array_equal(got, np.arange(n))


# -- properties --------------------------------------------------------------------------------


@FAST
@given(n=st.integers(1, 5000), block=st.integers(1, 6000), strategy=st.sampled_from(["contiguous", "strided"]))
def test_explicit_block_size_covers_range_exactly_once(n, block, strategy):
    """Property: for any n/block_size/strategy the shards cover range(n) once, ids 0..k-1, len matches."""
    desc = shardc.shards(n, block_size=block, strategy=strategy)
    check_cover(desc, n)
    assert desc.num_shards == math.ceil(n / min(block, n)) and desc.strategy == strategy
    if strategy == "contiguous":
        assert all(len(s) == min(block, n) for s in desc[:-1])


@FAST
@given(n=st.integers(1, 200_000), workers=st.integers(1, 64), strategy=st.sampled_from(["contiguous", "strided"]))
def test_auto_block_size_covers_and_gives_4_to_64_shards_per_worker(n, workers, strategy):
    """Property: auto sizing covers range(n) once with >= 4 (when n allows) and <= 64 shards per worker."""
    desc = shardc.shards(n, workers=workers, strategy=strategy)
    if n <= 20_000:
        check_cover(desc, n)
    assert desc.num_shards <= 64 * workers
    assert desc.num_shards >= min(n, 4 * workers)
    if n >= 64 * workers:
        assert desc.num_shards < 8 * workers  # "about 4": never twice the target


@FAST
@given(lists=st.lists(st.lists(st.integers(0, 10_000), min_size=1, max_size=30), min_size=1, max_size=30))
def test_shards_list_keeps_each_list(lists):
    """Property: shards_list gives one shard per list, in order, with exactly that list's indices."""
    desc = shardc.shards_list(lists)
    assert desc.strategy == "list" and desc.block_size is None and len(desc) == len(lists)
    assert desc.n == sum(len(x) for x in lists)
    for k, (s, want) in enumerate(zip(desc, lists)):
        assert s.id == k and s.len == len(want) and s.indices().tolist() == want
        assert s.start == min(want) and s.stop == max(want) + 1
        assert s.idx.dtype == np.int64 and not s.idx.flags.writeable


# -- contiguous and strided details ----------------------------------------------------------------


def test_contiguous_idx_is_a_slice_giving_views():
    """Contiguous shards carry a slice, so X[:, shard.idx] is a zero-copy view."""
    X = np.arange(5 * 103, dtype=np.float64).reshape(5, 103)
    desc = shardc.shards(103, block_size=10)
    assert len(desc) == 11 and desc[-1].len == 3
    for s in desc:
        assert isinstance(s.idx, slice) and s.idx == slice(s.start, s.stop)
        view = X[:, s.idx]
        assert np.shares_memory(view, X) and not view.flags.owndata
        assert np.array_equal(view, X[:, s.start : s.stop])


def test_strided_shards_interleave():
    """Strided shard k holds k, k+S, k+2S, ... (S shards) as an int64 index array."""
    desc = shardc.shards(10, block_size=4, strategy="strided")
    assert len(desc) == 3
    assert [s.indices().tolist() for s in desc] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert all(isinstance(s.idx, np.ndarray) and s.idx.dtype == np.int64 and s.stride == 3 for s in desc)


def test_descriptor_sequence_protocol():
    """Descriptors index like sequences (negative, slices, numpy ints) and raise IndexError/TypeError."""
    desc = shardc.shards(100, block_size=30)
    assert desc[-1].id == 3 and desc[np.int64(1)].start == 30 and [s.id for s in desc[1:3]] == [1, 2]
    assert desc[2] == desc[2] and desc[2] != desc[1]
    with pytest.raises(IndexError):
        desc[4]
    with pytest.raises(IndexError):
        desc[-5]
    with pytest.raises(TypeError):
        desc["0"]
    assert desc.to_dict() == {"n": 100, "block_size": 30, "strategy": "contiguous", "num_shards": 4}


def test_shards_pickle_roundtrip():
    """A Shard pickles to an equal Shard (what a worker receives)."""
    for s in (
        shardc.shards(50, block_size=7)[3],
        shardc.shards(50, block_size=7, strategy="strided")[2],
        shardc.shards_list([[4, 2, 9]])[0],
    ):
        assert pickle.loads(pickle.dumps(s)) == s


def test_huge_n_is_lazy():
    """3 billion items in 1K blocks is described in O(1): the last shard is computed on demand."""
    desc = shardc.shards("3B", block_size="1K")
    assert desc.n == 3 * 10**9 and len(desc) == 3 * 10**6
    last = desc[-1]
    assert (last.start, last.stop, last.len) == (3 * 10**9 - 1000, 3 * 10**9, 1000)


# -- block_size and count strings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,value",
    [
        ("500", 500),
        ("10K", 10_000),
        ("10k", 10_000),
        ("1M", 10**6),
        ("3B", 3 * 10**9),
        ("1.5K", 1500),
        (" 2 M ", 2 * 10**6),
        ("123456789123B", 123456789123 * 10**9),
        (7, 7),
        (np.int32(9), 9),
        (4.0, 4),
    ],
    ids=str,
)
def test_count_strings(text, value):
    """Counts accept ints and strings with K/M/B suffixes (B = billions), exactly."""
    assert parse_count(text, "block_size") == value


def test_count_strings_drive_shards():
    """n and block_size both accept count strings."""
    desc = shardc.shards("10K", block_size="1K")
    assert desc.n == 10_000 and desc.block_size == 1000 and len(desc) == 10


def test_block_size_larger_than_n_gives_one_shard():
    """A block_size beyond n yields a single shard of n items."""
    desc = shardc.shards(5, block_size="1M")
    assert len(desc) == 1 and desc[0].len == 5 and desc.block_size == 5


# -- auto sizing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,workers,shards",
    [
        (1000, 2, 8),
        (10, 2, 10),
        (9, 2, 9),
        (3, 4, 3),
        (10**6, 4, 16),
        (1000, 1, 4),
    ],
)
def test_auto_shard_counts(n, workers, shards):
    """block_size='auto' aims at 4 shards per worker (fewer only when n is smaller)."""
    assert len(shardc.shards(n, workers=workers)) == shards


def test_auto_respects_scratch_budget_and_max_per_worker():
    """A scratch budget shrinks blocks, but never past max_shards_per_worker shards per worker."""
    desc = shardc.shards(10_000, workers=2, scratch_bytes_per_item=8, scratch_budget=800)
    assert desc.block_size == 100 and len(desc) == 100
    capped = shardc.shards(10_000, workers=2, scratch_bytes_per_item=8, scratch_budget=8)
    assert len(capped) <= 2 * 64
    few = shardc.shards(10_000, workers=2, min_shards_per_worker=1, max_shards_per_worker=2)
    assert len(few) == 2


def test_auto_uses_default_workers(monkeypatch):
    """workers=None plans for the default worker count (SHARDC_WORKERS here)."""
    monkeypatch.setenv("SHARDC_WORKERS", "3")
    assert len(shardc.shards(1200)) == 12


# -- validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, 2.5, "abc", "1.5", "-3", None, True, [3], float("nan"), "5X"], ids=repr)
def test_invalid_n_names_n(n):
    """A non-positive, fractional or malformed n raises ShardSpecError (a ValueError) naming n."""
    with pytest.raises(ValueError, match=r"\bn\b") as info:
        shardc.shards(n, block_size=1)
    assert isinstance(info.value, ShardSpecError)


@pytest.mark.parametrize("block", [0, -5, 1.5, "", "0.0005K", "10Q", None, False, "auto-ish"], ids=repr)
def test_invalid_block_size_names_block_size(block):
    """A bad block_size raises ShardSpecError naming block_size."""
    with pytest.raises(ShardSpecError, match="block_size"):
        shardc.shards(100, block_size=block)


@pytest.mark.parametrize("strategy", ["random", "Contiguous", "", None])
def test_invalid_strategy_names_strategy(strategy):
    """An unknown strategy raises ShardSpecError naming strategy and the choices."""
    with pytest.raises(ShardSpecError, match=r"strategy=.*'contiguous' or 'strided'"):
        shardc.shards(100, strategy=strategy, workers=2)


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"workers": 0}, "workers"),
        ({"workers": 1.5}, "workers"),
        ({"workers": True}, "workers"),
        ({"min_shards_per_worker": 0}, "min_shards_per_worker"),
        ({"max_shards_per_worker": 2, "min_shards_per_worker": 4}, "max_shards_per_worker"),
    ],
)
def test_invalid_auto_parameters_named(kw, name):
    """Bad workers/min/max shards per worker raise ShardSpecError naming the argument."""
    with pytest.raises(ShardSpecError, match=name):
        shardc.shards(100, **{"workers": 2, **kw})


@pytest.mark.parametrize(
    "idxs,pattern",
    [
        ([], "idxs is empty"),
        ([[1, 2], []], r"idxs\[1\] is empty"),
        ([[0, -1]], r"idxs\[0\] has a negative"),
        ([[0.5]], r"idxs\[0\] must hold integer"),
        ([[1.0, 1e20]], r"idxs\[0\] must hold integer"),
        ([["a"]], r"idxs\[0\] must hold integer"),
        ([[True, False]], r"idxs\[0\] must hold integer"),
        ([[[1, 2]]], r"idxs\[0\] must be a 1-D"),
        ([np.array([1, 2**63], dtype=np.uint64)], r"idxs\[0\] has an index beyond int64"),
        ("0123", "idxs must be a sequence"),
        (5, "idxs must be a sequence"),
        (None, "idxs must be a sequence"),
    ],
    ids=repr,
)
def test_invalid_index_lists_named(idxs, pattern):
    """Empty, negative, non-integer or malformed index lists raise ShardSpecError naming the list."""
    with pytest.raises(ShardSpecError, match=pattern):
        shardc.shards_list(idxs)


def test_shards_list_accepts_arrays_and_integral_floats():
    """Index lists may be NumPy arrays (any int dtype), scalars, or floats with integral values."""
    desc = shardc.shards_list([np.array([3, 1], dtype=np.uint8), 7, [2.0, 4.0]])
    assert [s.indices().tolist() for s in desc] == [[3, 1], [7], [2, 4]]
    assert isinstance(desc[0], Shard)
