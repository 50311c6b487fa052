"""shardc.share: one sealed copy, by-reference sharing, pickle-5 objects, ShareCache, and their costs."""

from __future__ import annotations

import errno
import gc
import time

import numpy as np
import pytest

import shardc
from shardc import _lowlevel as ll
from shardc import segment
from shardc.errors import ClosedError, InvalidArgumentError, SegmentError
from shardc.share import MIN_OOB_BYTES, ShareCache, default_cache

pytestmark = pytest.mark.usefixtures("no_segment_leak")

MiB = 1 << 20
STRUCT = np.dtype([("a", "<i2"), ("b", "<f8"), ("s", "S5")])
DTYPES = ["f8", "f2", "i4", "u8", "?", "c8", "c16", STRUCT, "S6", "U4", "m8[ns]"]


def filled(dtype, shape) -> np.ndarray:
    """A C-ordered array of ``dtype`` with distinct, non-zero bytes."""
    n = int(np.prod(shape))
    raw = (np.arange(n * np.dtype(dtype).itemsize) % 251 + 1).astype(np.uint8)
    arr = raw.view(dtype).reshape(shape)
    return arr.copy()


def owner_segment(arr: np.ndarray) -> segment.Segment | None:
    hit = segment.find_address(arr.ctypes.data, max(arr.nbytes, 1))
    return hit[0] if hit else None


# -- one copy into a sealed segment ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_array_is_copied_once_sealed_and_read_only(dtype):
    """A plain array of any dtype is copied once into a sealed memfd; .array is an equal, read-only copy."""
    src = filled(dtype, (6, 7))
    with shardc.share(src) as sh:
        assert sh.kind == "array" and sh.how == "copied" and sh.bytes_copied == src.nbytes
        view = sh.array
        assert view.dtype == src.dtype and view.shape == src.shape
        assert view.tobytes() == src.tobytes() and not np.shares_memory(view, src)
        assert not view.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            view[0, 0] = view[1, 1]
        with pytest.raises(ValueError):
            view.flags.writeable = True  # the pages are PROT_READ: a store would SIGSEGV
        seg = sh.segments[0]
        assert seg.backing == "memfd" and seg.sealed and ll.seg_is_sealed(seg.fd)
        assert owner_segment(view) is seg
        src[...] = src[::-1].copy()  # the caller's later writes do not reach the copy
        assert view.tobytes() == filled(dtype, (6, 7)).tobytes()


def test_sealed_copy_refuses_writable_shared_maps():
    """Nobody can map a shared copy writable: the kernel refuses (EPERM) after sealing."""
    with shardc.share(np.arange(10_000.0)) as sh:
        with pytest.raises(SegmentError) as info:
            sh.segments[0].map(writable=True)
        assert info.value.errno == errno.EPERM


@pytest.mark.parametrize("backing", ["shm", "file"])
def test_share_with_unsealable_backings(backing):
    """share(backing='shm'|'file') copies the array (no seal there) and still hands out a read-only view."""
    src = np.arange(1000, dtype=np.int32)
    with shardc.share(src, backing=backing) as sh:
        assert sh.segments[0].backing == backing and not sh.segments[0].sealed
        assert np.array_equal(sh.array, src) and not sh.array.flags.writeable


def test_fortran_order_is_kept():
    """An F-ordered array stays F-ordered in the copy (same strides), with equal values."""
    src = np.asfortranarray(np.arange(60.0).reshape(3, 4, 5))
    with shardc.share(src) as sh:
        assert sh.array.flags.f_contiguous and not sh.array.flags.c_contiguous
        assert sh.array.strides == src.strides and np.array_equal(sh.array, src)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[:, ::3],
        lambda a: a[::-1],
        lambda a: a.T[::2],
        lambda a: a[1:-1, 2:-2][::-2, ::-1],
        lambda a: a["b"] if a.dtype.names else a[:, 5],
    ],
    ids=["step", "reversed", "T-step", "nested-negative", "column"],
)
def test_non_contiguous_views_become_contiguous(make):
    """A non-contiguous view is copied once into a C-contiguous array with the same values."""
    base = np.arange(20 * 30, dtype=np.float64).reshape(20, 30)
    src = make(base)
    with shardc.share(src) as sh:
        assert sh.how == "copied" and sh.bytes_copied == src.nbytes
        assert sh.array.flags.c_contiguous and np.array_equal(sh.array, src)


@pytest.mark.parametrize("shape", [(), (0,), (3, 0)], ids=str)
def test_zero_d_and_empty_arrays(shape):
    """0-d and zero-size arrays share fine (empty segments map to valid empty arrays)."""
    src = np.full(shape, 7, dtype=np.int16)
    with shardc.share(src) as sh:
        assert sh.array.shape == shape and np.array_equal(sh.array, src)


def test_array_protocol_copies_only_when_asked():
    """np.asarray(shared) is the shared view; np.array(shared) is a private writable copy."""
    with shardc.share(np.arange(100.0)) as sh:
        assert np.asarray(sh) is sh.array
        private = np.array(sh)
        assert not np.shares_memory(private, sh.array) and private.flags.writeable
        assert np.asarray(sh, dtype=np.float32).dtype == np.float32
        with pytest.raises(ValueError, match="without a copy"):
            np.asarray(sh, dtype=np.float32, copy=False)


def test_masked_array_keeps_its_mask():
    """A masked array is pickled whole: .get() returns a MaskedArray with the same mask."""
    src = np.ma.array(np.arange(20_000.0), mask=np.arange(20_000) % 3 == 0)
    with shardc.share(src) as sh:
        got = sh.get()
        assert isinstance(got, np.ma.MaskedArray) and np.array_equal(got.mask, src.mask)
        assert np.ma.allequal(got, src)


# -- by reference ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda b: b,
        lambda b: b.array,
        lambda b: b[2:7],
        lambda b: b[:, ::2],
        lambda b: b[::-1, ::-3],
        lambda b: b.array.T,
        lambda b: b[3],
        lambda b: b[::-2, 4],
        lambda b: b[5:5],
        lambda b: b["y"],
    ],
    ids=["buffer", "array", "rows", "step", "negative", "T", "row", "neg-col", "empty", "field"],
)
def test_arrays_in_segments_pass_by_reference(make):
    """A Buffer or any view of one (any strides, incl. negative) is shared by reference: no copy, same memory."""
    dt = np.dtype([("x", "<f8"), ("y", "<i4")])
    with shardc.buffer(dt, (10, 12)) as buf:
        buf["x"] = np.arange(120.0).reshape(10, 12)
        buf["y"] = -np.arange(120).reshape(10, 12)
        src = make(buf)
        src_arr = np.asarray(src)
        sh = shardc.share(src)
        assert sh.how == "reference" and sh.bytes_copied == 0 and sh.segments == [buf.segment]
        assert sh.array.ctypes.data == src_arr.ctypes.data and sh.array.strides == src_arr.strides
        assert src_arr.size == 0 or np.shares_memory(sh.array, src_arr)
        assert np.array_equal(sh.array, src_arr) and not sh.array.flags.writeable
        sh.close()
        assert not buf.closed and buf.segment in segment.live_segments()  # a reference does not own


def test_shared_copies_pass_by_reference():
    """A view of a share()d copy is itself shared by reference, and share(Shared) returns it unchanged."""
    with shardc.share(np.arange(100.0).reshape(10, 10)) as first:
        again = shardc.share(first.array[::-1, 1::2])
        assert again.how == "reference" and again.segments == first.segments
        assert np.shares_memory(again.array, first.array)
        assert shardc.share(first) is first


def test_views_of_a_closed_buffer_are_copied():
    """A view that outlived its closed Buffer is copied, never referenced into a dead segment."""
    with shardc.buffer("f8", 100, init=3.0) as buf:
        view = buf[10:20]
    with shardc.share(view) as sh:
        assert sh.how == "copied" and np.array_equal(sh.array, view)


def test_buffer_writes_after_share_are_seen_by_reference():
    """By-reference sharing sees later writes to the buffer (it is the same memory)."""
    with shardc.buffer("i8", 5) as buf:
        sh = shardc.share(buf)
        buf[:] = 9
        assert sh.array.tolist() == [9] * 5


# -- pickle protocol 5 -----------------------------------------------------------------------------


def test_dict_of_arrays_is_pickled_with_big_buffers_in_segments():
    """A dict of arrays goes through pickle 5: big arrays land in segments and .get() reads them in place."""
    obj = {
        "big": np.arange(100_000.0),
        "fortran": np.asfortranarray(np.ones((200, 100), np.float32)),
        "small": np.arange(10),
        "meta": {"name": "x", "n": 3},
    }
    with shardc.share(obj) as sh:
        assert sh.kind == "pickle" and sh.how == "pickled"
        assert len(sh.segments) == 2 and sh.bytes_copied == 800_000 + 80_000
        got = sh.get()
        assert got["meta"] == obj["meta"] and set(got) == set(obj)
        for key in ("big", "fortran", "small"):
            assert np.array_equal(got[key], obj[key])
        assert owner_segment(got["big"]) in sh.segments and owner_segment(got["fortran"]) in sh.segments
        assert got["fortran"].flags.f_contiguous
        assert owner_segment(got["small"]) is None  # under MIN_OOB_BYTES: in-band
        assert not got["big"].flags.writeable
        again = sh.get()
        assert np.shares_memory(again["big"], got["big"])  # both views of the same segment


def test_object_arrays_and_plain_objects_are_pickled():
    """Object arrays and non-array objects are pickled (no segments when nothing is big)."""
    obj = np.array([{"a": 1}, "x", None], dtype=object)
    with shardc.share(obj) as sh:
        assert sh.kind == "pickle" and sh.segments == [] and sh.get().tolist() == obj.tolist()
    with shardc.share([1, "two", (3.0,)]) as sh:
        assert sh.get() == [1, "two", (3.0,)]
        with pytest.raises(TypeError, match="not an array"):
            sh.array


def test_pandas_dataframe_columns_in_segments():
    """A pandas DataFrame is pickled with its big column blocks in segments (skipped without pandas)."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": np.arange(50_000.0), "b": np.arange(50_000)})
    with shardc.share(df) as sh:
        got = sh.get()
        assert got.equals(df) and sh.segments and sh.bytes_copied >= MIN_OOB_BYTES


def test_unpicklable_object_names_the_type():
    """An unpicklable object raises InvalidArgumentError naming its type."""
    with pytest.raises(InvalidArgumentError, match="cannot share function"):
        shardc.share(lambda: 1)


# -- lifetime ------------------------------------------------------------------------------------------


def test_close_releases_segments_and_blocks_use():
    """close() releases the segments (idempotent); .array/.get() then raise ClosedError; earlier views stay valid."""
    sh = shardc.share(np.arange(1000.0))
    view = sh.array
    seg = sh.segments[0]
    sh.close()
    sh.close()
    assert seg.closed and seg not in segment.live_segments()
    with pytest.raises(ClosedError):
        sh.array
    with pytest.raises(ClosedError):
        sh.get()
    with pytest.raises(ClosedError):
        shardc.share(sh)
    gc.collect()
    assert view.sum() == 499500.0


def test_forked_child_reads_shared_copy(fork_run):
    """A forked child reads the shared copy and the pickled object unchanged."""
    src = np.random.default_rng(0).random((300, 200))
    with shardc.share(src) as sh, shardc.share({"w": src[:, :100].copy()}) as po:
        seen = fork_run(lambda: (sh.array.tobytes(), po.get()["w"].tobytes()), timeout=20)
        assert seen == (src.tobytes(), src[:, :100].tobytes())


# -- ShareCache -----------------------------------------------------------------------------------------


def test_default_cache_is_a_share_cache():
    """share.default_cache is the process-wide ShareCache."""
    assert isinstance(default_cache, ShareCache)


def test_cache_reuses_copy_while_unchanged():
    """The cache copies once, then reuses the same copy while the array lives and is unchanged."""
    cache = ShareCache()
    arr = np.arange(10_000.0)
    first, how, _ = cache.get(arr, "auto")
    assert how == "copied" and cache.owns(first)
    second, how, _ = cache.get(arr, "auto")
    assert how == "cached" and second is first
    cache.clear()
    assert first.closed


@pytest.mark.parametrize(
    "change",
    [
        lambda a: a.__setitem__((3, 3), 5.0),
        lambda a: a.__setitem__((0, 0), -0.0),  # equal as a value, different bytes
        lambda a: a.__setitem__((1, 0), np.frombuffer(np.uint64(0x7FF8000000000001).tobytes(), np.float64)[0]),
    ],
    ids=["value", "negative-zero", "nan-payload"],
)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_cache_recopies_after_mutation(change, layout):
    """A caller mutating the array (even to -0.0 or another NaN) gets a fresh copy, never a stale one."""
    cache = ShareCache()
    base = np.zeros((8, 8))
    base[1, 0] = np.nan
    arr = base if layout == "contiguous" else base[:, ::2]
    first, _, _ = cache.get(arr, "auto")
    change(arr)
    second, how, _ = cache.get(arr, "auto")
    assert how == "copied" and second is not first and first.closed
    assert second.array.tobytes() == np.ascontiguousarray(arr).tobytes()
    cache.clear()


def test_cache_releases_copy_when_array_is_collected():
    """When the caller's array is garbage-collected the cached copy's segment is closed."""
    cache = ShareCache()
    arr = np.arange(5000.0)
    shared, _, _ = cache.get(arr, "auto")
    seg = shared.segments[0]
    del shared
    assert seg in segment.live_segments()
    del arr  # refcount drop -> weakref callback -> release
    assert seg.closed and seg not in segment.live_segments()


def test_cache_passes_buffers_by_reference():
    """The cache never copies an array that already lives in a segment."""
    cache = ShareCache()
    with shardc.buffer("f4", 100) as buf:
        shared, how, _ = cache.get(buf[::3], "auto")
        assert how == "reference" and shared.bytes_copied == 0 and not cache.owns(shared)


# -- costs (256 MiB) -------------------------------------------------------------------------------------


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.fixture(scope="module")
def big() -> np.ndarray:
    return np.arange(32 * MiB, dtype=np.float64)  # 256 MiB


def test_share_256mib_costs_one_copy_in_time_and_memory(big):
    """Sharing 256 MiB takes about one memcpy and raises peak memory by at most ~1.05x its size."""
    t0 = time.perf_counter()
    ref = big.copy()  # the yardstick: one copy into fresh pages
    t_copy = time.perf_counter() - t0
    del ref
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = vm_kib("VmRSS")
    t0 = time.perf_counter()
    sh = shardc.share(big)
    t_share = time.perf_counter() - t0
    try:
        assert float(sh.array[::4096].sum()) == float(big[::4096].sum())
        sh.array.sum()  # map and touch all of the copy, so it counts in our RSS
        peak_added = vm_kib("VmHWM") - before
        now_added = vm_kib("VmRSS") - before
        print(
            f"\nshare 256 MiB: {t_share * 1e3:.0f} ms vs np.copy {t_copy * 1e3:.0f} ms; "
            f"memory added {now_added / MiB:.1f} MiB, peak {peak_added / MiB:.1f} MiB "
            f"({peak_added / big.nbytes:.3f}x)"
        )
        assert sh.bytes_copied == big.nbytes
        assert t_share < 4 * t_copy + 0.25  # loose: other processes share these 2 cores
        assert peak_added <= 1.05 * big.nbytes
        assert now_added >= 0.95 * big.nbytes  # the measure does see the copy
    finally:
        sh.close()


def test_forked_reader_adds_no_private_memory(big, fork_child):
    """A forked child reading all of a 256 MiB shared copy gains RSS but no USS (private memory)."""
    with shardc.share(big) as sh:
        expected = float(sh.array.sum())  # the parent maps (and reads) it too, as a master would

        def child(conn) -> None:
            conn.send("forked")
            conn.recv()
            conn.send(float(sh.array.sum()))  # read every page
            conn.recv()
            private = np.array(sh.array)  # control: a real copy is private memory
            conn.send(float(private[-1]))
            conn.recv()

        proc = fork_child(child)
        assert proc.recv(20) == "forked"
        m0 = ll.proc_mem(proc.pid)
        proc.send("read")
        assert proc.recv(20) == expected
        m1 = ll.proc_mem(proc.pid)
        proc.send("copy")
        assert proc.recv(20) == float(big[-1])
        m2 = ll.proc_mem(proc.pid)
        proc.send("exit")
        assert proc.result(20) is None
        print(
            f"\nchild after reading 256 MiB: RSS {m1['rss'] / MiB:.1f} MiB "
            f"(+{(m1['rss'] - m0['rss']) / MiB:.1f}), USS {m1['uss'] / MiB:.1f} MiB "
            f"(+{(m1['uss'] - m0['uss']) / MiB:.1f}); after a private copy USS {m2['uss'] / MiB:.1f} MiB"
        )
        assert m1["precise"]
        assert m1["rss"] - m0["rss"] >= 0.9 * big.nbytes
        assert m1["uss"] < 0.1 * big.nbytes and m1["uss"] - m0["uss"] < 0.05 * big.nbytes
        assert m2["uss"] - m1["uss"] >= 0.9 * big.nbytes  # the probe sees private memory when there is some
