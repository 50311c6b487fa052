"""``cow=`` through the public API: writes into borrowed inputs made by shards
run with ``shard_map(..., cow=...)`` in both dispatch modes.

Every user-space write path (``X[i] = ...``, ``X += 1``, ``np.copyto``, a
ufunc with ``out=X``, ``ctypes.memset``, a small ``f.readinto``) and the
kernel path (a large ``f.readinto(X)`` from a real file: EFAULT) is run by
shard 0 while the other shards only read.  Each case asserts the failure
(exact message, one attempt, no retry) or the report (which shards wrote
which input, pages, bytes, materialized bytes), that the other shards saw
pristine data (a CRC of X written into an ``out=`` buffer), and that the
caller's array and the shared segment are bit-identical afterwards.
Lower-level guard behaviour is in test_guard.py."""

from __future__ import annotations

import ctypes
import zlib

import numpy as np
import pytest
from _engine_helpers import assert_no_stray_children, drain, no_stray_children, pool2  # noqa: F401 (fixtures)

import shardc
from shardc import _lowlevel as ll
from shardc.share import default_cache

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not ll.seg_backing_supported(ll.BACKING_MEMFD), reason="needs memfd"),
]

MODES = ["rpc_chunked", "shm_queue"]
COWS = ["deny", "audit", "allow"]
PS = ll.PAGE_SIZE
ROWS, COLS = 64, 512  # float64: one row per 4 KiB page
N = 6


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """A small file (100 bytes, fits the io buffer: memcpy'd) and one as large as X (read by the kernel)."""
    d = tmp_path_factory.mktemp("cow")
    small, large = d / "small", d / "large"
    small.write_bytes(b"\x01" * 100)
    large.write_bytes(b"\x02" * (ROWS * COLS * 8))
    return {"small": str(small), "large": str(large)}


def make_x():
    return np.arange(ROWS * COLS, dtype=np.float64).reshape(ROWS, COLS)


# Where the workers' X comes from: a sealed segment copy (the default for an
# array this small), or inherited over fork (shardc.inherit, forced here by a
# 1-byte threshold): then X is a page-aligned view into a bigger private
# buffer, so its pages and offsets are the same as in the segment copy.
SOURCES = ["segment", "inherited"]


@pytest.fixture(params=SOURCES)
def source(request, monkeypatch):
    if request.param == "inherited":
        monkeypatch.setenv("SHARDC_INHERIT_MIN_BYTES", "1")
    return request.param


def make_src_x(source):
    if source == "segment":
        return make_x()
    nbytes = ROWS * COLS * 8
    root = np.zeros(nbytes + 3 * PS, np.uint8)
    off = (-root.ctypes.data) % PS + PS
    X = root[off : off + nbytes].view(np.float64).reshape(ROWS, COLS)
    X[...] = make_x()
    return X


def assert_source_pristine(r, X, source, before):
    """The caller's X is unchanged, and so is the segment copy (or X was really inherited)."""
    assert crc(X) == before
    if source == "segment":
        assert segment_crc(X) == before
    else:
        assert r.diagnostics.borrow["X"]["how"] == "inherited"
        assert r.diagnostics.borrow["X"]["bytes_copied"] == 0


def crc(a) -> int:
    return zlib.crc32(np.ascontiguousarray(a))


# -- write paths (run by shard 0 in a worker; also applied locally to a copy for the expected data) --


def w_setitem(X, files):
    X[1, 3] = -1.0


def w_iadd(X, files):
    X += 1


def w_copyto(X, files):
    np.copyto(X, 5.0)


def w_ufunc_out(X, files):
    np.add(X, 1.0, out=X)


def w_memset(X, files):
    ctypes.memset(X.ctypes.data + 2 * PS, 0xFF, 16)


def w_readinto_small(X, files):
    with open(files["small"], "rb") as f:
        f.readinto(X[3])


def w_readinto_large(X, files):
    with open(files["large"], "rb") as f:
        f.readinto(X)


# name -> (write, first byte, element, pages written)
STORE_PATHS = {
    "setitem": (w_setitem, PS + 24, (1, 3), 1),
    "iadd": (w_iadd, 0, (0, 0), ROWS),
    "copyto": (w_copyto, 0, (0, 0), ROWS),
    "ufunc_out": (w_ufunc_out, 0, (0, 0), ROWS),
    "ctypes_memset": (w_memset, 2 * PS, (2, 0), 1),
    "readinto_small": (w_readinto_small, 3 * PS, (3, 0), 1),
}
WRITES = {name: v[0] for name, v in STORE_PATHS.items()} | {"readinto_large": w_readinto_large}


def shard_fun(shard, X, how, files, out):
    """Shard 0 writes X by ``how``; every shard then writes the CRC of X as it sees it."""
    if shard.id == 0:
        WRITES[how](X, files)
    out[shard.id] = zlib.crc32(X)
    return shard.id


def run_cow(X, how, cow, mode, files, **kw):
    """shard_map(N, shard_fun) with X borrowed; returns (result, out contents)."""
    out = shardc.buffer(np.int64, (N,), init=-1)
    try:
        r = shardc.shard_map(
            shardc.shards(N, block_size=1),
            shard_fun,
            borrow={"X": X, "how": how, "files": files},
            out={"out": out},
            cow=cow,
            dispatch_mode=mode,
            max_retries=3,
            on_failure="collect",
            progress=False,
            **kw,
        )
        return r, np.asarray(out).copy()
    finally:
        out.close()


def segment_crc(X) -> int:
    """CRC of the shared segment that holds the cached copy of X (a fresh read-only shared mapping)."""
    sh, how, _ = default_cache.get(X, "auto")
    assert how == "cached"
    m = sh.segments[0].map(writable=False)
    view = np.frombuffer(m.buffer(), np.uint8)[sh.offset : sh.offset + X.nbytes]
    return crc(view)


def assert_others_pristine(r, got, mode, expected_crc):
    for i in range(1, N):
        assert got[i] == expected_crc, (i, got.tolist())
        assert r.results[i] == (i if mode == "rpc_chunked" else None)


# -- deny ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", list(STORE_PATHS))
def test_deny_fails_the_writing_shard_once_with_exact_message(pool2, data_files, how, mode, source):
    """deny: the writing shard fails at once with BorrowedInputWriteError naming shard, input, byte and element; nothing else changes."""
    _, offset, index, pages = STORE_PATHS[how]
    X = make_src_x(source)
    before = crc(X)
    r, got = run_cow(X, how, "deny", mode, data_files)
    assert list(r.failures) == [0] and isinstance(r.results[0], shardc.FailedShard)
    f = r.failures[0]
    idx = ", ".join(map(str, index))
    assert f.message == (
        f"shard 0 wrote to borrowed input 'X' at byte {offset} (element [{idx}]); "
        "cow='deny' forbids writes to borrowed inputs"
    )
    assert f.error_type == "shardc.errors.BorrowedInputWriteError" and f.attempts == 1
    assert isinstance(f.exception, shardc.BorrowedInputWriteError)
    assert (f.exception.input_name, f.exception.shard_id, f.exception.offset, f.exception.index) == (
        "X",
        0,
        offset,
        index,
    )
    assert r.diagnostics.retries == 0 and r.diagnostics.events == []
    assert_others_pristine(r, got, mode, before)
    assert_source_pristine(r, X, source, before)
    rep = shardc.cow_report(r).to_dict()
    assert rep["policy"] == "deny" and rep["violations"] == 1
    assert rep["inputs"] == {
        "X": {"shards": [0], "pages": pages, "bytes": pages * PS, "first_offset": offset, "mode": "deny"}
    }


# -- audit / allow ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cow", ["audit", "allow"])
@pytest.mark.parametrize("how", list(STORE_PATHS))
def test_audit_allow_write_privately_and_report(pool2, data_files, how, cow, mode, source):
    """audit/allow: the writing shard completes and sees its write; others, the caller and the segment see pristine data; the reports list it."""
    _, offset, _index, pages = STORE_PATHS[how]
    X = make_src_x(source)
    before = crc(X)
    expected = make_x()
    WRITES[how](expected, data_files)  # what shard 0 sees after its write
    assert crc(expected) != before
    r, got = run_cow(X, how, cow, mode, data_files)
    assert r.succeeded and r.results[0] == (0 if mode == "rpc_chunked" else None)
    assert got[0] == crc(expected)
    assert_others_pristine(r, got, mode, before)
    assert_source_pristine(r, X, source, before)
    assert r.diagnostics.retries == 0 and r.diagnostics.events == []
    rep = shardc.cow_report(r).to_dict()
    assert rep == {
        "policy": cow,
        "violations": 0,
        "copies_triggered": pages,
        "inputs": {"X": {"shards": [0], "pages": pages, "bytes": pages * PS, "first_offset": offset, "mode": cow}},
    }
    cp = shardc.copy_report(r).to_dict()
    assert cp["materialized_bytes"] == pages * PS


# -- the kernel writes: EFAULT under every mode ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cow", COWS)
def test_readinto_from_a_real_file_fails_under_every_mode(pool2, data_files, cow, mode, source):
    """A large f.readinto(X) (the kernel writes: EFAULT) fails the shard at once under every cow mode, naming X."""
    X = make_src_x(source)
    before = crc(X)
    r, got = run_cow(X, "readinto_large", cow, mode, data_files)
    assert list(r.failures) == [0]
    f = r.failures[0]
    assert f.attempts == 1 and f.error_type == "shardc.errors.BorrowedInputWriteError"
    assert f.message.startswith(
        "shard 0 passed borrowed input 'X' to a system call that writes into it "
        "(readinto/readv/recv_into: Bad address); "
    )
    if cow == "deny":
        assert f.message.endswith("cow='deny' forbids writes to borrowed inputs")
    else:
        assert "the kernel cannot write into borrowed inputs under any cow mode" in f.message
    assert f.exception.input_name == "X" and f.exception.shard_id == 0
    assert r.diagnostics.retries == 0
    assert_others_pristine(r, got, mode, before)
    assert_source_pristine(r, X, source, before)


# -- the next shard on the same worker ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cow", COWS)
def test_next_shard_on_the_same_worker_sees_pristine_data(data_files, cow, mode, source):
    """With one worker, shard 0 overwrites all of X (np.copyto) and shards 1.. on that worker read pristine data."""
    X = make_src_x(source)
    before = crc(X)
    out = shardc.buffer(np.int64, (N,), init=-1)
    with shardc.Pool(1) as pool:
        r = pool.shard_map(
            shardc.shards(N, block_size=1),
            shard_fun,
            borrow={"X": X, "how": "copyto", "files": data_files},
            out={"out": out},
            cow=cow,
            dispatch_mode=mode,
            on_failure="collect",
            progress=False,
        )
        pids = {p for rec in r.diagnostics.workers.values() for p in rec["pids"]}
    got = np.asarray(out).copy()
    out.close()
    assert len(pids) == 1  # one worker ran every shard, in order
    assert list(r.failures) == ([0] if cow == "deny" else [])
    assert_others_pristine(r, got, mode, before)
    assert crc(X) == before


# -- what is not flagged --------------------------------------------------------------------------------------


def read_and_fill(shard, X, out):
    """Reads X, fills its row of out (many pages), and records the guard faults it caused."""
    f0 = ll.guard_counters()["faults"]
    out[shard.id, :] = X[shard.id % ROWS].sum()
    out[shard.id, 0] = ll.guard_counters()["faults"] - f0


@pytest.mark.parametrize("mode", MODES)
def test_out_writes_and_reads_are_never_flagged(pool2, mode):
    """deny: shards that read X and write whole pages of out= are not flagged and cause no guard faults."""
    X = make_x()
    out = shardc.buffer(np.float64, (N, 4 * COLS), init=-1.0)  # 4 pages per row
    r = shardc.shard_map(
        shardc.shards(N, block_size=1),
        read_and_fill,
        borrow={"X": X},
        out={"out": out},
        cow="deny",
        dispatch_mode=mode,
        progress=False,
    )
    got = np.asarray(out).copy()
    out.close()
    assert r.succeeded
    assert got[:, 0].tolist() == [0.0] * N  # no fault in any shard
    for i in range(N):
        assert (got[i, 1:] == X[i].sum()).all()
    assert shardc.cow_report(r).to_dict() == {"policy": "deny", "inputs": {}, "violations": 0, "copies_triggered": 0}
    assert shardc.copy_report(r).to_dict()["materialized_bytes"] == 0


# -- pickle-path borrowed objects ---------------------------------------------------------------------------------


def write_dict(shard, D, out):
    if shard.id == 0:
        D["a"][5] = -1.0
    out[shard.id] = zlib.crc32(D["a"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cow", COWS)
def test_pickled_dict_of_arrays_is_guarded(pool2, cow, mode):
    """A dict of arrays borrowed through pickle-5 (out-of-band segment) is guarded like an array."""
    D = {"a": np.arange(20_000, dtype=np.float64), "b": np.ones(3), "name": "cfg"}
    before = crc(D["a"])
    out = shardc.buffer(np.int64, (N,), init=-1)
    r = shardc.shard_map(
        shardc.shards(N, block_size=1),
        write_dict,
        borrow={"D": D},
        out={"out": out},
        cow=cow,
        dispatch_mode=mode,
        max_retries=3,
        on_failure="collect",
        progress=False,
    )
    got = np.asarray(out).copy()
    out.close()
    assert r.diagnostics.borrow["D"]["how"] == "pickled"
    assert got[1:].tolist() == [before] * (N - 1)
    assert crc(D["a"]) == before and D["a"][5] == 5.0
    rep = shardc.cow_report(r).to_dict()
    assert list(rep["inputs"]) == ["D"] and rep["inputs"]["D"]["shards"] == [0]
    assert rep["inputs"]["D"]["pages"] == 1 and rep["inputs"]["D"]["mode"] == cow
    if cow == "deny":
        f = r.failures[0]
        assert list(r.failures) == [0] and f.attempts == 1 and r.diagnostics.retries == 0
        assert f.error_type == "shardc.errors.BorrowedInputWriteError"
        # A pickled object has no layout: the offset is the byte in D["a"]'s out-of-band buffer.
        assert f.message.startswith("shard 0 wrote to borrowed input 'D' at byte 40 ")
        assert f.message.endswith("cow='deny' forbids writes to borrowed inputs")
        assert (f.exception.input_name, f.exception.offset) == ("D", 40)
    else:
        expected = D["a"].copy()
        expected[5] = -1.0
        assert r.succeeded and got[0] == crc(expected)


# -- layouts and swallowed errors ------------------------------------------------------------------------------


def write_13(shard, X, out):
    if shard.id == 0:
        X[1, 3] = -1
    out[shard.id] = 1


def _layouts():
    base = make_x()
    return {
        "fortran": (np.asfortranarray(base), 3 * ROWS * 8 + 8),
        "int32": (base.astype(np.int32), COLS * 4 + 12),
        "reversed-rows": (base[::-1], PS + 24),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["fortran", "int32", "reversed-rows", "view-of-shared"])
def test_deny_message_names_the_element_for_other_layouts(pool2, layout, mode):
    """deny: byte offset and element index are right for Fortran, int32, reversed and a sliced view of a Shared."""
    shared = None
    if layout == "view-of-shared":
        shared = shardc.share(make_x())
        X, offset = shared.array[10:, 5:], PS + 24  # by reference: offset and strides of the view
    else:
        X, offset = _layouts()[layout]
    out = shardc.buffer(np.int64, (3,), init=-1)
    try:
        r = shardc.shard_map(
            3,
            write_13,
            borrow={"X": X},
            out={"out": out},
            dispatch_mode=mode,
            max_retries=2,
            on_failure="collect",
            progress=False,
        )
        assert np.asarray(out).tolist()[1:] == [1, 1]
    finally:
        out.close()
        if shared is not None:
            shared.close()
    assert list(r.failures) == [0] and r.failures[0].attempts == 1 and r.diagnostics.retries == 0
    assert r.failures[0].message == (
        f"shard 0 wrote to borrowed input 'X' at byte {offset} (element [1, 3]); "
        "cow='deny' forbids writes to borrowed inputs"
    )


def swallow(shard, X, out):
    if shard.id == 0:
        try:
            X[1, 3] = -1.0
            len(())  # a call: the prompt error is raised here
        except shardc.BorrowedInputWriteError:
            pass
    out[shard.id] = 1


@pytest.mark.parametrize("mode", MODES)
def test_deny_error_swallowed_by_the_shard_still_fails_it(pool2, mode):
    """deny: a shard that catches the prompt BorrowedInputWriteError still fails, once, at its end."""
    out = shardc.buffer(np.int64, (4,), init=-1)
    r = shardc.shard_map(
        shardc.shards(4, block_size=1),
        swallow,
        borrow={"X": make_x()},
        out={"out": out},
        dispatch_mode=mode,
        on_failure="collect",
        progress=False,
    )
    got = np.asarray(out).tolist()
    out.close()
    assert got == [1, 1, 1, 1]  # the shard ran to its end
    assert list(r.failures) == [0] and r.failures[0].attempts == 1 and r.diagnostics.retries == 0
    assert r.failures[0].message.startswith(f"shard 0 wrote to borrowed input 'X' at byte {PS + 24} (element [1, 3])")


# -- a segment guarded again in later calls ------------------------------------------------------------------


def write_row_and_count_maps(shard, X, out):
    if shard.id == 0:
        X[1, 3] = -1.0
    with open("/proc/self/maps") as f:
        out[shard.id] = (X[1, 3], sum(1 for _ in f))


@pytest.mark.parametrize("mode", MODES)
def test_a_segment_borrowed_again_is_guarded_again(mode):
    """The same shared segment in consecutive calls on the same worker: the
    guard is set up once per mapping (later calls only write-protect it,
    csrc GUARD_PRIMED), and still every call's write is refused, every other
    shard reads pristine data and the worker's mappings do not pile up."""
    Xs = shardc.share(make_x())
    out = shardc.buffer(np.float64, (N, 2), init=-2.0)
    maps = []
    try:
        with shardc.Pool(1) as pool:
            for call in range(4):
                out.array[:] = -2.0
                r = pool.shard_map(
                    shardc.shards(N, block_size=1),
                    write_row_and_count_maps,
                    borrow={"X": Xs},
                    out={"out": out},
                    cow="deny",
                    dispatch_mode=mode,
                    on_failure="collect",
                    progress=False,
                )
                assert list(r.failures) == [0], call
                assert r.failures[0].exception.input_name == "X"
                assert out.array[1:, 0].tolist() == [float(1 * COLS + 3)] * (N - 1)
                maps.append(out.array[1:, 1].max())
        assert Xs.array[1, 3] == 1 * COLS + 3
        assert maps[3] <= maps[1] + 2, maps
    finally:
        out.close()
        Xs.close()
