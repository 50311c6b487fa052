"""shardc.buffer / buffer_open: typed shared arrays that behave as NumPy arrays across fork."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import shardc
from shardc import _lowlevel as ll
from shardc import segment
from shardc.buffer import Buffer
from shardc.errors import ClosedError, InvalidArgumentError, SegmentError

pytestmark = pytest.mark.usefixtures("no_segment_leak")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20

STRUCT = np.dtype([("id", "<i4"), ("x", "<f8"), ("tag", "S3"), ("ok", "?")])
DTYPES = ["f8", "f4", "i8", "i1", "u2", "?", "c16", "c8", STRUCT, "S7", "U3", "M8[s]"]


def sample(dtype, shape) -> np.ndarray:
    """Distinct, non-zero values of any supported dtype."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    k = np.arange(1, n + 1)
    if dt.names:
        out = np.zeros(n, dtype=dt)
        out["id"], out["x"], out["tag"], out["ok"] = k, k / 4, [b"t%d" % (i % 10) for i in k], k % 2 == 0
    elif dt.kind == "b":
        out = k % 3 == 0
    elif dt.kind == "c":
        out = (k + 1j * k[::-1]).astype(dt)
    elif dt.kind in "SU":
        out = np.array([str(i % 1000) for i in k]).astype(dt)
    elif dt.kind == "M":
        out = np.datetime64("2020-01-01T00:00:00") + k.astype("m8[s]")
    else:
        out = (k % 100).astype(dt)
    return out.reshape(shape)


def uss() -> int:
    return ll.proc_mem(os.getpid())["uss"]


# -- dtypes and shapes ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_roundtrip_and_fork_write(dtype, fork_run):
    """Any fixed-size dtype: fresh buffer is zero, parent writes read back, a forked child's writes reach the parent."""
    shape = (3, 5)
    want = sample(dtype, shape)
    with shardc.buffer(dtype, shape) as buf:
        assert buf.dtype == np.dtype(dtype) and buf.shape == shape and buf.ndim == 2
        assert buf.size == 15 and buf.nbytes == want.nbytes and len(buf) == 3
        assert not np.asarray(buf).view(np.uint8).any()

        def child() -> bool:
            buf[:] = want  # a write in the child ...
            return True

        assert fork_run(child, timeout=20)
        assert np.array_equal(buf.array, want)  # ... is the parent's memory


@pytest.mark.parametrize("shape", [(), 0, (0,), (0, 3), (3, 0, 2), 7, (2, 3, 4), (np.int64(2), np.uint8(3))], ids=str)
def test_any_shape(shape):
    """0-d, zero-size and n-d shapes (ints or NumPy ints) give arrays of exactly that shape."""
    want = (shape,) if np.ndim(shape) == 0 and shape != () else tuple(int(d) for d in shape)
    with shardc.buffer("i4", shape, init=5) as buf:
        assert buf.shape == want and buf.array.shape == want
        assert buf.size == int(np.prod(want)) and (buf.array == 5).all()


def test_zero_d_buffer_converts_like_a_scalar_array():
    """A 0-d buffer supports buf[()] and float/int/complex/bool/index conversions."""
    with shardc.buffer("i8", ()) as buf:
        buf[()] = 3
        assert buf[()] == 3 and float(buf) == 3.0 and int(buf) == 3 and complex(buf) == 3
        assert bool(buf) and [10, 20, 30, 40][buf] == 40
        with pytest.raises(TypeError):
            len(buf)


def test_zero_size_buffer_works():
    """A zero-size buffer is a valid empty array (sum 0, empty iteration, no crash)."""
    with shardc.buffer("f8", (0, 4)) as buf:
        assert buf.sum() == 0 and list(buf) == [] and np.asarray(buf).shape == (0, 4)


# -- NumPy behaviour --------------------------------------------------------------------


@pytest.fixture
def mat():
    with shardc.buffer("f8", (4, 6), init=np.arange(24.0).reshape(4, 6)) as buf:
        yield buf


def test_indexing_slicing_fancy_boolean(mat):
    """Basic, sliced, fancy and boolean indexing read and write the shared memory."""
    ref = np.arange(24.0).reshape(4, 6)
    assert mat[1, 2] == ref[1, 2] and np.array_equal(mat[1:3, ::2], ref[1:3, ::2])
    assert np.shares_memory(mat[:, 1], mat.array)  # a slice is a view
    assert np.array_equal(mat[[0, 3], [1, 5]], ref[[0, 3], [1, 5]])
    assert np.array_equal(mat[mat.array > 20], ref[ref > 20])
    assert np.array_equal(mat[..., -1], ref[..., -1])
    mat[[0, 2]] = -1
    mat[mat.array > 20] = 99
    ref[[0, 2]] = -1
    ref[ref > 20] = 99
    assert np.array_equal(mat.array, ref)


def test_ufuncs_and_operators(mat):
    """Ufuncs (incl. out=buf and reductions), arithmetic and comparison operators act like ndarray's."""
    ref = np.arange(24.0).reshape(4, 6)
    assert np.array_equal(mat + 1, ref + 1) and np.array_equal(2 * mat, 2 * ref)
    assert np.array_equal(mat - mat, ref - ref) and np.array_equal(mat / 2, ref / 2)
    assert np.array_equal(-mat, -ref) and np.array_equal(mat**2, ref**2)
    assert np.array_equal(mat @ np.ones(6), ref @ np.ones(6))
    assert np.array_equal(mat == 5, ref == 5) and np.array_equal(mat > 5, ref > 5)
    assert np.array_equal(np.sqrt(mat), np.sqrt(ref)) and np.add.reduce(mat, axis=0).tolist() == ref.sum(0).tolist()
    assert type(mat + 1) is np.ndarray  # results are plain arrays in private memory
    r = np.multiply(mat, 3, out=mat)
    assert r is mat and np.array_equal(mat.array, ref * 3)


def test_inplace_operators_keep_the_buffer(mat):
    """buf += x writes in place and leaves the name bound to the same Buffer."""
    same = mat
    mat += 1
    mat *= 2
    assert mat is same and isinstance(mat, Buffer)
    assert np.array_equal(mat.array, (np.arange(24.0).reshape(4, 6) + 1) * 2)


def test_asarray_is_zero_copy(mat):
    """np.asarray(buf) returns the shared array itself: same data pointer, shared memory."""
    a = np.asarray(mat)
    assert a.ctypes.data == mat.segment.mapping().addr
    assert np.shares_memory(a, mat.array) and a is mat.array
    a[0, 0] = 42
    assert mat[0, 0] == 42
    with pytest.raises(ValueError):
        np.asarray(mat, dtype=np.float32, copy=False)
    c = np.array(mat)  # np.array copies by default
    assert not np.shares_memory(c, mat.array)


def test_numpy_functions_and_methods(mat):
    """np.mean/np.sum/np.concatenate/np.where and array methods/attributes work on a Buffer."""
    ref = np.arange(24.0).reshape(4, 6)
    assert np.mean(mat) == ref.mean() and np.sum(mat, axis=1).tolist() == ref.sum(1).tolist()
    assert np.array_equal(np.concatenate([mat, mat]), np.concatenate([ref, ref]))
    assert np.array_equal(np.where(mat > 3, mat, 0), np.where(ref > 3, ref, 0))
    assert mat.mean() == ref.mean() and mat.T.shape == (6, 4) and mat.reshape(-1).shape == (24,)
    assert np.array_equal(mat.astype(int), ref.astype(int)) and mat.strides == ref.strides
    assert [row.sum() for row in mat] == [row.sum() for row in ref]
    assert np.cumsum(ref, axis=1, out=mat) is mat and np.array_equal(mat.array, np.cumsum(ref, axis=1))
    np.copyto(mat, 1.5)
    assert (mat.array == 1.5).all()


@settings(max_examples=100, deadline=None)
@given(data=st.data(), shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
def test_indexing_matches_ndarray_property(data, shape):
    """Property: basic and integer-array indexing of a Buffer reads and writes exactly like an ndarray."""
    ref = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    with shardc.buffer("i4", shape, init=ref) as buf:
        key = data.draw(hnp.basic_indices(shape, allow_newaxis=True), label="key")
        assert np.array_equal(buf[key], ref[key])
        buf[key] = -1
        ref[key] = -1
        if ref.ndim:
            rows = (
                data.draw(st.lists(st.integers(-shape[0], shape[0] - 1), max_size=4), label="rows") if shape[0] else []
            )
            assert np.array_equal(buf[rows], ref[rows])
        assert np.array_equal(buf.array, ref)


def test_numpy_operations_in_forked_child(fork_run):
    """In a forked child a Buffer supports fancy/boolean writes, ufunc out=, in-place ops and np functions."""
    with shardc.buffer("f8", (4, 5), init=np.arange(20.0).reshape(4, 5)) as buf:

        def child() -> tuple:
            buf[[0, 3], 1] = -1.0
            buf[buf.array > 15] = 100.0
            np.sqrt(buf, out=buf)
            b = buf
            b += 1
            return float(np.mean(b)), np.asarray(b).ctypes.data == buf.segment.mapping().addr and b is buf

        with np.errstate(invalid="ignore"):  # sqrt(-1), in the child and here
            mean, zero_copy = fork_run(child, timeout=20)
            ref = np.arange(20.0).reshape(4, 5)
            ref[[0, 3], 1] = -1.0
            ref[ref > 15] = 100.0
            ref = np.sqrt(ref) + 1
        assert np.array_equal(buf.array, ref, equal_nan=True) and zero_copy
        assert np.isnan(mean) and np.isnan(buf[0, 1])  # sqrt(-1) is NaN in both processes


def test_parent_writes_after_fork_reach_child(fork_child):
    """Writes the parent makes after fork() are visible to the child (both directions are shared)."""
    with shardc.buffer("i8", 100) as buf:

        def child(conn) -> int:
            conn.recv()
            return int(buf.sum())

        proc = fork_child(child)
        buf[:] = np.arange(100)
        proc.send("go")
        assert proc.result(timeout=20) == 4950


def test_out_of_bounds_index_raises_index_error(mat):
    """Out-of-bounds indices raise IndexError, for reads and writes alike."""
    for key in (4, (0, 6), (-5, 0), ([0, 9], 0)):
        with pytest.raises(IndexError):
            mat[key]
        with pytest.raises(IndexError):
            mat[key] = 1.0


def test_buffer_is_not_pickled_by_value():
    """Pickling a Buffer raises TypeError pointing at out=/borrow= instead of copying silently."""
    with shardc.buffer("f8", 3) as buf, pytest.raises(TypeError, match="not pickled by value"):
        pickle.dumps(buf)


# -- init ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "init,backing", [(None, "auto"), (0, "auto"), (0.0, "auto"), (False, "auto"), (None, "shm"), (0, "file")]
)
def test_zero_init_costs_no_memory(init, backing, monkeypatch, tmp_path):
    """init=None/0 on a 256 MiB buffer adds no resident memory, RSS or USS (fresh pages read as zero)."""
    monkeypatch.setenv("SHARDC_TMPDIR", str(tmp_path))
    before = ll.proc_mem(os.getpid())
    with shardc.buffer("f8", 32 * MiB, init=init, backing=backing) as buf:
        after = ll.proc_mem(os.getpid())
        d_rss, d_uss = after["rss"] - before["rss"], after["uss"] - before["uss"]
        print(
            f"init={init!r} {buf.segment.backing}: 256 MiB buffer, RSS +{d_rss / MiB:.2f} MiB, "
            f"USS +{d_uss / MiB:.2f} MiB"
        )
        assert d_rss < 16 * MiB and d_uss < 16 * MiB
        assert buf[-1] == 0


def test_nonzero_init_fills_and_is_measured():
    """A non-zero scalar init fills every element (the memory probe above sees real pages)."""
    gc.collect()
    before = uss()
    with shardc.buffer("f8", 8 * MiB, init=2.5) as buf:  # 64 MiB
        grown = uss() - before
        assert grown > 60 * MiB  # the same probe that saw ~0 above does see a filled buffer
        assert (buf.array == 2.5).all()


@pytest.mark.parametrize(
    "dtype,init",
    [
        ("f4", 1.5),
        ("i2", -7),
        ("u1", 255),
        ("?", True),
        ("c16", 1 - 2j),
        ("c8", 3j),
        (STRUCT, (7, 2.5, b"abc", True)),
        ("S4", b"ab"),
        ("U2", "xy"),
        ("f8", -0.0),
        ("f8", np.nan),
        ("M8[D]", np.datetime64("2001-02-03")),
        ("i8", np.int8(-1)),
    ],
    ids=str,
)
def test_scalar_init_fills(dtype, init):
    """Non-zero scalar inits (incl. structured tuples, complex, strings, -0.0, NaN) fill every element."""
    with shardc.buffer(dtype, (5, 3), init=init) as buf:
        want = (
            np.full((5, 3), init, dtype=dtype)
            if not isinstance(init, tuple)
            else np.array([init] * 15, dtype=dtype).reshape(5, 3)
        )
        assert buf.array.tobytes() == want.tobytes()


def test_array_init_broadcasts():
    """An array init is broadcast to the shape (a row fills every row)."""
    with shardc.buffer("f8", (4, 3), init=[1.0, 2.0, 3.0]) as buf:
        assert np.array_equal(buf.array, np.tile([1.0, 2.0, 3.0], (4, 1)))
    with shardc.buffer("i4", (3, 2), init=np.array([[1], [2], [3]])) as buf:
        assert buf.array.tolist() == [[1, 1], [2, 2], [3, 3]]
    recs = [(1, 0.5, b"a", True), (2, 1.5, b"b", False)]
    with shardc.buffer(STRUCT, (3, 2), init=recs) as buf:  # a list of records broadcasts too
        assert buf.array.tolist() == [recs] * 3
    with shardc.buffer("S3", 2, init=["ab", "cd"]) as buf, shardc.buffer("M8[D]", 2, init=["2020-01-01"]) as day:
        assert buf.array.tolist() == [b"ab", b"cd"] and (day.array == np.datetime64("2020-01-01")).all()


@pytest.mark.parametrize(
    "dtype,init",
    [
        ("f8", [1.0, 2.0, 3.0]),
        ("f8", "abc"),
        ("i4", 1.5),
        ("i4", 2j),
        ("f8", 1 + 1j),
        ("u1", 300),
        ("i4", np.ones((4, 3))),
        (STRUCT, (1, 2.0)),
    ],
    ids=str,
)
def test_bad_init_names_init(dtype, init):
    """A bad init raises InvalidArgumentError (a ValueError) naming init, and leaks no segment."""
    with pytest.raises(ValueError, match=r"^init=") as info:
        shardc.buffer(dtype, (4, 2), init=init)
    assert isinstance(info.value, InvalidArgumentError)


# -- argument errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,exc",
    [
        (-1, InvalidArgumentError),
        ((3, -2), InvalidArgumentError),
        (2.5, TypeError),
        ((2, 1.0), TypeError),
        ("12", TypeError),
        (None, TypeError),
        ((True, 2), TypeError),
        ((2**40, 2**40), InvalidArgumentError),
    ],
    ids=str,
)
def test_bad_shape_names_shape(shape, exc):
    """Negative, non-integer or absurd shapes raise TypeError/ValueError naming shape."""
    with pytest.raises(exc, match="shape"):
        shardc.buffer("f8", shape)


@pytest.mark.parametrize("dtype", [object, [("a", "f8"), ("o", "O")], "U", "S", "not-a-dtype"], ids=str)
def test_bad_dtype_names_dtype(dtype):
    """Object, unsized or unknown dtypes raise TypeError naming dtype."""
    with pytest.raises(TypeError, match="dtype="):
        shardc.buffer(dtype, 3)


def test_unknown_backing_names_backing():
    """An unknown backing raises a ValueError naming backing=."""
    with pytest.raises(ValueError, match="backing='ramdisk'"):
        shardc.buffer("f8", 3, backing="ramdisk")


# -- close -------------------------------------------------------------------------------------------


def test_use_after_close_raises_closed_error():
    """After close() the Buffer raises ClosedError for every use and never crashes."""
    buf = shardc.buffer("f8", (10, 10), init=1.0)
    buf.close()
    buf.close()  # idempotent
    uses = [
        lambda: buf[0],
        lambda: buf.__setitem__(0, 1.0),
        lambda: buf.sum(),
        lambda: buf + 1,
        lambda: np.add(buf, 1),
        lambda: np.asarray(buf),
        lambda: np.mean(buf),
        lambda: len(buf),
        lambda: list(buf),
        lambda: buf.array,
        lambda: buf.size,
        lambda: buf.T,
    ]
    for use in uses:
        with pytest.raises(ClosedError):
            use()
    assert buf.closed and "closed" in repr(buf) and buf.info()["closed"]
    assert buf.segment not in segment.live_segments()


def test_views_taken_before_close_stay_valid():
    """NumPy views taken before close keep the mapping alive and keep their values."""
    with shardc.buffer("i8", 1000, init=np.arange(1000)) as buf:
        whole, part = np.asarray(buf), buf[10:20]
    del buf
    gc.collect()
    assert whole.sum() == 499500 and part.tolist() == list(range(10, 20))
    whole[0] = 5  # still writable, still the same memory
    assert whole[0] == 5


# -- named buffers and buffer_open ---------------------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess:
    # This process already checked the build stamp; a C edit by someone else mid-run
    # must not fail the child's import of the same extension.
    env = dict(os.environ, PYTHONPATH=REPO, SHARDC_SKIP_STAMP_CHECK="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60
    )


def test_buffer_open_from_unrelated_process():
    """buffer_open attaches a named buffer in a separate interpreter: it reads ours, its writes reach us."""
    name = f"shardc-test-open-{os.getpid()}"
    with shardc.buffer("f8", (3, 4), init=np.arange(12.0).reshape(3, 4), name=name) as buf:
        assert buf.path == "/" + name
        out = run_python(f"""
            import numpy as np, shardc
            b = shardc.buffer_open({buf.path!r}, "f8", (3, 4))
            print(float(b.sum()))
            b[:] *= -1
            b.close()
        """)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "66.0"
        assert np.array_equal(buf.array, -np.arange(12.0).reshape(3, 4))
    assert name not in os.listdir("/dev/shm")  # the owner's close unlinked it


def test_buffer_open_readonly_and_file_backing(tmp_path):
    """buffer_open(readonly=True) on a file-backed named buffer reads it but refuses writes."""
    path = str(tmp_path / "named.buf")
    with shardc.buffer("i4", 5, init=3, backing="file", name=path) as buf:
        out = run_python(f"""
            import shardc
            b = shardc.buffer_open({path!r}, "i4", 5, backing="file", readonly=True)
            print(int(b.sum()))
            try:
                b[0] = 1
            except ValueError as e:
                print("refused:", e)
            try:
                b.array.flags.writeable = True  # over a PROT_READ map this would allow a SIGSEGV
            except ValueError as e:
                print("refused:", e)
        """)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "15" and lines[1].startswith("refused:") and "read-only" in lines[1]
        assert lines[2].startswith("refused:") and "WRITEABLE" in lines[2]
        assert (buf.array == 3).all()
    assert not os.path.exists(path)


def test_buffer_open_checks_size_and_existence():
    """buffer_open raises InvalidArgumentError if the segment is too small, SegmentError(ENOENT) if missing."""
    name = f"shardc-test-small-{os.getpid()}"
    with shardc.buffer("f8", 4, name=name) as buf:
        with pytest.raises(InvalidArgumentError, match="holds 32 bytes"):
            shardc.buffer_open(buf.path, "f8", 5)
        with shardc.buffer_open(buf.path, "f4", 8) as other:  # a smaller or equal view is fine
            assert other.shape == (8,)
    with pytest.raises(SegmentError) as info:
        shardc.buffer_open(name, "f8", 4)
    assert info.value.errno == 2 and name in str(info.value)
