"""Segments (shardc/segment.py over csrc/seg.c): backings, fallback, names, errors, registry."""

from __future__ import annotations

import errno
import gc
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shardc import _lowlevel as ll
from shardc import segment
from shardc.errors import ClosedError, InvalidArgumentError, SegmentError
from shardc.segment import Segment

pytestmark = pytest.mark.usefixtures("no_segment_leak")

BACKINGS = ["memfd", "shm", "file"]
PAGE = ll.PAGE_SIZE
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Every test starts without SHARDC_BACKING and with its own SHARDC_TMPDIR."""
    monkeypatch.delenv("SHARDC_BACKING", raising=False)
    monkeypatch.setenv("SHARDC_TMPDIR", str(tmp_path))


def fail_backings(monkeypatch, failing: dict[str, int]) -> None:
    """Make seg_create fail with the given errno for some backings."""
    real = ll.seg_create
    codes = {segment._CODES[b]: e for b, e in failing.items()}

    def fake(backing: int, name: str, size: int, persist: bool) -> int:
        if backing in codes:
            ll._check(-codes[backing], "create", name)
        return real(backing, name, size, persist)

    monkeypatch.setattr(segment.ll, "seg_create", fake)


# -- backings -----------------------------------------------------------------


@pytest.mark.parametrize("backing", BACKINGS)
def test_backing_roundtrip(backing):
    """Each backing creates a zero-filled segment whose two shared maps see each other's writes."""
    with Segment.create(3 * PAGE, backing=backing) as seg:
        assert seg.backing == backing and seg.size == 3 * PAGE and seg.owner
        a = np.frombuffer(seg.map().buffer(), dtype=np.uint8)
        b = np.frombuffer(seg.map(writable=False).buffer(), dtype=np.uint8)
        assert not a.any()
        a[::PAGE] = 7
        assert b[PAGE] == 7 and b.sum() == 21
        assert ll.seg_size(seg.fd) == 3 * PAGE


@pytest.mark.parametrize("backing", ["shm", "file"])
def test_anonymous_segment_leaves_no_name(backing, tmp_path):
    """Anonymous shm/file segments are unlinked at once: /dev/shm and the temp dir stay empty."""
    shm_before = dev_shm()
    with Segment.create(PAGE, backing=backing) as seg:
        np.frombuffer(seg.map().buffer(), dtype=np.uint8)[:] = 1
        assert dev_shm() == shm_before
        assert os.listdir(tmp_path) == []
        assert os.readlink(f"/proc/self/fd/{seg.fd}").endswith("(deleted)")
    assert dev_shm() == shm_before and os.listdir(tmp_path) == []


def test_memfd_segment_has_no_name_anywhere(tmp_path):
    """A memfd segment is anonymous (memfd:) and never appears in /dev/shm or the temp dir."""
    shm_before = dev_shm()
    with Segment.create(PAGE, backing="memfd") as seg:
        assert os.readlink(f"/proc/self/fd/{seg.fd}").startswith("/memfd:")
        assert dev_shm() == shm_before and os.listdir(tmp_path) == []


def test_zero_size_segment_maps():
    """A 0-byte segment can be created and mapped (placeholder address, empty buffer)."""
    with Segment.create(0, backing="memfd") as seg:
        m = seg.mapping()
        assert m.addr != 0 and len(m.buffer()) == 0


# -- SHARDC_BACKING and argument validation -------------------------------------


@pytest.mark.parametrize("backing", BACKINGS)
def test_env_var_picks_backing_for_auto(monkeypatch, backing):
    """SHARDC_BACKING chooses the backing when backing='auto'."""
    monkeypatch.setenv("SHARDC_BACKING", backing.upper())
    with Segment.create(PAGE) as seg:
        assert seg.backing == backing


def test_env_var_auto_means_memfd_first(monkeypatch):
    """SHARDC_BACKING=auto behaves as unset: memfd first on Linux."""
    monkeypatch.setenv("SHARDC_BACKING", "auto")
    with Segment.create(PAGE) as seg:
        assert seg.backing == "memfd"


def test_explicit_backing_overrides_env(monkeypatch):
    """An explicit backing= wins over SHARDC_BACKING."""
    monkeypatch.setenv("SHARDC_BACKING", "file")
    with Segment.create(PAGE, backing="shm") as seg:
        assert seg.backing == "shm"


def test_env_var_invalid_names_variable(monkeypatch):
    """A bad SHARDC_BACKING raises InvalidArgumentError (a ValueError) naming the variable."""
    monkeypatch.setenv("SHARDC_BACKING", "ramdisk")
    with pytest.raises(ValueError, match="SHARDC_BACKING='ramdisk'") as info:
        Segment.create(PAGE)
    assert isinstance(info.value, InvalidArgumentError)


def test_env_memfd_does_not_break_named_segments(monkeypatch):
    """SHARDC_BACKING=memfd is a default: a named segment still gets a nameable backing."""
    monkeypatch.setenv("SHARDC_BACKING", "memfd")
    name = f"shardc-test-envnamed-{os.getpid()}"
    with Segment.create(PAGE, name=name) as seg:
        assert seg.backing == "shm" and os.path.basename(seg.name) in dev_shm()


@pytest.mark.parametrize("bad", ["mmap", "", None, "MEMFD"])
def test_unknown_backing_names_argument(bad):
    """An unknown backing raises InvalidArgumentError naming backing= and listing the choices."""
    with pytest.raises(InvalidArgumentError, match=r"backing=.*auto, memfd, shm, file"):
        Segment.create(PAGE, backing=bad)


@pytest.mark.parametrize("size", [-1, 1.5, "10"])
def test_bad_size_rejected(size):
    """A negative or non-int size raises InvalidArgumentError naming the size."""
    with pytest.raises(InvalidArgumentError, match="size"):
        Segment.create(size)


def test_named_memfd_rejected():
    """backing='memfd' with a name is refused (a memfd cannot be opened by name)."""
    with pytest.raises(InvalidArgumentError, match="memfd segment cannot be named"):
        Segment.create(PAGE, backing="memfd", name="x")


# -- auto fallback ----------------------------------------------------------------


def test_auto_falls_back_when_memfd_fails_and_logs(monkeypatch, caplog):
    """auto: a failing memfd falls back to shm, and the shardc logger says why."""
    fail_backings(monkeypatch, {"memfd": errno.EMFILE})
    with caplog.at_level(logging.INFO, logger="shardc"), Segment.create(PAGE) as seg:
        assert seg.backing == "shm"
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "shardc")
    assert "memfd" in text and "Too many open files" in text and "'shm'" in text


def test_auto_skips_shm_that_does_not_fit_and_logs(monkeypatch, caplog):
    """auto: a segment bigger than /dev/shm's free space goes to a file, logged as not fitting."""
    fail_backings(monkeypatch, {"memfd": errno.ENOSYS})
    monkeypatch.setattr(segment, "_shm_free_bytes", lambda: PAGE)
    with caplog.at_level(logging.INFO, logger="shardc"), Segment.create(4 * PAGE) as seg:
        assert seg.backing == "file"
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "shardc")
    assert "does not fit in /dev/shm" in text and "'file'" in text


def test_auto_named_skips_full_shm_for_file(monkeypatch, tmp_path):
    """auto with a name: when /dev/shm is too small the named segment becomes a file."""
    monkeypatch.setattr(segment, "_shm_free_bytes", lambda: 0)
    path = str(tmp_path / "named.seg")
    with Segment.create(PAGE, name=path) as seg:
        assert seg.backing == "file" and seg.name == path and os.path.exists(path)
    assert not os.path.exists(path)


def test_auto_all_backings_fail(monkeypatch):
    """auto: when every backing fails, one SegmentError lists each backing's reason."""
    fail_backings(monkeypatch, {"memfd": errno.ENOMEM, "shm": errno.EACCES, "file": errno.EROFS})
    with pytest.raises(SegmentError) as info:
        Segment.create(PAGE)
    msg = str(info.value)
    assert isinstance(info.value, OSError) and info.value.errno is not None
    assert "memfd:" in msg and "shm:" in msg and "file:" in msg


def test_explicit_backing_does_not_fall_back(monkeypatch):
    """An explicit backing that fails raises instead of silently using another."""
    fail_backings(monkeypatch, {"shm": errno.EACCES})
    with pytest.raises(SegmentError) as info:
        Segment.create(PAGE, backing="shm")
    assert info.value.errno == errno.EACCES


# -- errors -----------------------------------------------------------------------


def test_explicit_shm_too_big_is_enospc_with_file_hint():
    """backing='shm' larger than /dev/shm fails up front with ENOSPC and a backing='file' hint."""
    free = segment._shm_free_bytes()
    assert free is not None
    shm_before = dev_shm()
    with pytest.raises(SegmentError) as info:
        Segment.create(free + 64 * PAGE, backing="shm")
    exc = info.value
    assert exc.errno == errno.ENOSPC
    assert "create" in str(exc) and "/shardc." in str(exc) and "backing='file'" in str(exc)
    assert dev_shm() == shm_before


def test_errno_becomes_segment_error_naming_segment_and_operation():
    """A C -errno becomes SegmentError (an OSError with errno) naming segment, op and a hint."""
    name = f"/shardc-test-missing-{os.getpid()}"
    with pytest.raises(OSError) as info:
        Segment.open(name)
    exc = info.value
    assert isinstance(exc, SegmentError) and exc.errno == errno.ENOENT
    assert str(exc).startswith(f"[Errno {errno.ENOENT}] open failed for segment {name!r}")
    assert "hint:" in str(exc)


def test_missing_tmpdir_hint_names_shardc_tmpdir(monkeypatch, tmp_path):
    """A file segment in a missing SHARDC_TMPDIR fails with ENOENT naming the directory and the variable."""
    missing = tmp_path / "gone"
    monkeypatch.setenv("SHARDC_TMPDIR", str(missing))
    with pytest.raises(SegmentError) as info:
        Segment.create(PAGE, backing="file")
    assert info.value.errno == errno.ENOENT
    assert repr(str(missing)) in str(info.value) and "SHARDC_TMPDIR" in str(info.value)
    assert "unlinked by its owner" not in str(info.value)


def test_enospc_hint_suggests_file_backing():
    """The choke point turns -ENOSPC into SegmentError suggesting backing='file'."""
    with pytest.raises(SegmentError) as info:
        ll._check(-errno.ENOSPC, "ftruncate", "/seg-x")
    assert info.value.errno == errno.ENOSPC
    assert "ftruncate failed for segment '/seg-x'" in str(info.value)
    assert "backing='file'" in str(info.value)


@pytest.mark.parametrize("backing", ["shm", "file"])
def test_create_existing_name_fails_and_keeps_it(backing, tmp_path):
    """Creating a name that exists fails with EEXIST and does not unlink the other's segment."""
    name = f"shardc-test-dup-{os.getpid()}" if backing == "shm" else str(tmp_path / "dup")
    with Segment.create(PAGE, backing=backing, name=name) as first:
        with pytest.raises(SegmentError) as info:
            Segment.create(PAGE, backing=backing, name=name)
        assert info.value.errno == errno.EEXIST and "already exists" in str(info.value)
        with Segment.open(first.name, backing=backing) as again:
            assert again.size == PAGE


def test_open_rejects_memfd():
    """Segment.open only accepts shm and file (the nameable backings)."""
    with pytest.raises(InvalidArgumentError, match="backing='memfd'"):
        Segment.open("x", backing="memfd")


# -- named segments -----------------------------------------------------------------


@pytest.mark.parametrize("backing", ["shm", "file"])
def test_named_segment_persists_until_owner_closes(backing, tmp_path):
    """A named segment exists until its owner closes it (a non-owner close keeps it), then is unlinked."""
    name = f"shardc-test-named-{os.getpid()}" if backing == "shm" else str(tmp_path / "named")
    owner = Segment.create(2 * PAGE, backing=backing, name=name)
    path = "/dev/shm" + owner.name if backing == "shm" else owner.name
    assert os.path.exists(path)
    np.frombuffer(owner.mapping().buffer(), dtype=np.uint8)[5] = 42
    other = Segment.open(owner.name, backing=backing)
    assert not other.owner and other.size == 2 * PAGE
    assert np.frombuffer(other.map(writable=False).buffer(), dtype=np.uint8)[5] == 42
    other.close()
    assert os.path.exists(path)
    owner.close()
    owner.close()  # idempotent
    assert not os.path.exists(path)


def test_named_segment_unlinked_when_owner_is_collected():
    """A named segment whose owner is garbage-collected without close() is unlinked (last net)."""
    seg = Segment.create(PAGE, backing="shm", name=f"shardc-test-gc-{os.getpid()}")
    base = os.path.basename(seg.name)
    assert base in dev_shm()
    del seg
    gc.collect()
    assert base not in dev_shm()


def test_forked_child_close_does_not_unlink_parents_segment(fork_run):
    """A forked child closing its copy of a named segment neither unlinks it nor closes the parent's fd."""
    with Segment.create(PAGE, backing="shm", name=f"shardc-test-fork-{os.getpid()}") as seg:
        base = os.path.basename(seg.name)

        def child() -> list:
            seg.close()
            return [s.key for s in segment.live_segments()]

        assert fork_run(child, timeout=20) == []  # the parent's segments are not the child's
        assert base in dev_shm()
        assert ll.seg_size(seg.fd) == PAGE and seg in segment.live_segments()


def test_interpreter_exit_leaves_nothing(tmp_path):
    """An interpreter that exits without closing its segments leaves nothing in /dev/shm or the temp dir."""
    tag = f"shardc-test-exit-{os.getpid()}"
    script = textwrap.dedent(f"""
        import os
        from shardc.segment import Segment
        keep = [Segment.create(4096, backing=b) for b in ("memfd", "shm", "file")]
        keep.append(Segment.create(4096, backing="shm", name={tag!r}))
        keep.append(Segment.create(4096, backing="file", name={str(tmp_path / tag)!r}))
        assert {tag!r} in os.listdir("/dev/shm") and {tag!r} in os.listdir({str(tmp_path)!r})
        print("created", len(keep))
    """)
    env = dict(
        os.environ, PYTHONPATH=REPO, SHARDC_TMPDIR=str(tmp_path), SHARDC_SKIP_STAMP_CHECK="1"
    )  # checked by this process already
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "created 5"
    assert tag not in dev_shm()
    assert os.listdir(tmp_path) == []


# -- sealing -------------------------------------------------------------------------


def test_seal_memfd_forbids_writable_shared_maps():
    """A sealed memfd refuses new writable shared maps (EPERM) but still maps read-only and private."""
    with Segment.create(PAGE, backing="memfd") as seg:
        np.frombuffer(seg.map().buffer(), dtype=np.uint8)[0] = 9  # map dropped at once
        gc.collect()
        assert seg.seal() is True and seg.sealed and ll.seg_is_sealed(seg.fd)
        with pytest.raises(SegmentError) as info:
            seg.map(writable=True)
        assert info.value.errno == errno.EPERM and seg.name in str(info.value)
        assert np.frombuffer(seg.map(writable=False).buffer(), dtype=np.uint8)[0] == 9
        private = np.frombuffer(seg.map(writable=True, private=True).buffer(), dtype=np.uint8)
        private[0] = 1  # lands in a private copy-on-write page
        assert np.frombuffer(seg.map(writable=False).buffer(), dtype=np.uint8)[0] == 9


def test_seal_fails_while_a_writable_map_exists():
    """Sealing a memfd with a live writable shared map fails (EBUSY) instead of lying."""
    with Segment.create(PAGE, backing="memfd") as seg:
        m = seg.map(writable=True)
        with pytest.raises(SegmentError) as info:
            seg.seal()
        assert info.value.errno == errno.EBUSY and not seg.sealed
        del m


@pytest.mark.parametrize("backing", ["shm", "file"])
def test_seal_unsupported_backings_return_false(backing):
    """Backings without seals report seal() -> False and stay writable."""
    with Segment.create(PAGE, backing=backing) as seg:
        assert seg.seal() is False and not seg.sealed
        np.frombuffer(seg.map(writable=True).buffer(), dtype=np.uint8)[0] = 1


# -- registry and lifetime ---------------------------------------------------------------


def test_live_segments_tracks_open_segments():
    """live_segments() lists a segment while open, not after close."""
    seg = Segment.create(PAGE)
    assert seg in segment.live_segments()
    seg.close()
    assert seg.closed and seg not in segment.live_segments()
    assert "closed" in repr(seg) and seg.info()["closed"]


def test_closed_segment_raises_closed_error():
    """map(), mapping() and seal() on a closed segment raise ClosedError naming the segment."""
    seg = Segment.create(PAGE)
    seg.close()
    for op in (seg.map, seg.mapping, seg.seal):
        with pytest.raises(ClosedError, match=seg.name):
            op()


def test_mapping_outlives_close():
    """Arrays built on a segment's mapping stay readable after close (the mapping is kept alive)."""
    seg = Segment.create(PAGE)
    arr = np.frombuffer(seg.mapping().buffer(), dtype=np.int64)
    arr[:] = np.arange(arr.size)
    seg.close()
    gc.collect()
    assert np.array_equal(arr, np.arange(arr.size))


def test_find_address_only_inside_live_primary_mappings():
    """find_address() finds ranges inside a live primary mapping, with the offset, and nothing else."""
    seg = Segment.create(2 * PAGE)
    m = seg.mapping()
    assert segment.find_address(m.addr + 100, 50) == (seg, 100)
    assert segment.find_address(m.addr + PAGE, PAGE) == (seg, PAGE)
    assert segment.find_address(m.addr + PAGE, PAGE + 1) is None  # runs past the end
    assert segment.find_address(m.addr - 1, 2) is None
    seg.close()
    assert segment.find_address(m.addr + 100, 50) is None


def test_child_sees_parent_writes_after_fork(fork_child):
    """Writes the parent makes after fork() reach the child through the shared mapping."""
    with Segment.create(PAGE) as seg:
        arr = np.frombuffer(seg.mapping().buffer(), dtype=np.int64)

        def child(conn) -> int:
            conn.recv()
            return int(arr[3])

        proc = fork_child(child)
        arr[3] = 1234
        proc.send("go")
        assert proc.result(timeout=20) == 1234


def test_fork_helper_kills_a_stuck_child(fork_child):
    """The fork helper's deadline works: a child that never answers is SIGKILLed and reaped."""
    proc = fork_child(lambda conn: conn.recv())  # waits for a message that never comes
    with pytest.raises(AssertionError, match="killed"):
        proc.result(timeout=0.5)
    assert proc.exitcode == -9
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


def _finalize_under_the_registry_lock() -> bool:
    """In a child: the cyclic GC frees a segment while this thread holds the
    registry lock, as it can inside any allocation made under it (it did in
    Segment.__init__, in a worker, and hung it for good)."""
    import gc

    from shardc import segment as S

    seg = S.Segment.create(4096)
    m = seg.mapping()
    key, addr = seg.key, m.addr
    cycle: list = [seg]
    cycle.append(cycle)  # only the cyclic GC can free it now
    del seg, cycle
    with S._lock:
        gc.collect()  # runs the finalizer here
    # The dead segment's range is gone from find_address (its mapping m is still alive).
    return S.find_address(addr, 8) is None and all(r[2] != key for r in S._ranges)


def test_gc_finalizing_a_segment_under_the_registry_lock_does_not_deadlock(fork_run):
    assert fork_run(_finalize_under_the_registry_lock, 10)
