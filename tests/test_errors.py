"""The exception hierarchy: every error is a ShardcError, C errors map to the primitive they came from."""

from __future__ import annotations

import ast
import builtins
import errno
import os
import pickle
import threading
from pathlib import Path

import pytest

import shardc
import shardc._lowlevel as ll
from shardc import errors, inherit
from shardc._channel import ChannelClosed
from shardc.errors import (
    ClosedError,
    GuardError,
    InvalidArgumentError,
    InvalidTypeError,
    NativeModuleError,
    QueueClosedError,
    QueueError,
    SegmentError,
    ShardcError,
    ShardcOSError,
    ShardIndexError,
    UsageError,
    WorkerSetupError,
)
from shardc.queue import TaskRing

REPO = Path(__file__).resolve().parent.parent

# Each class and the builtin it must also be, so `except <builtin>` keeps working.
BUILTIN_OF = {
    "ShardSpecError": ValueError,
    "InvalidArgumentError": ValueError,
    "InvalidTypeError": TypeError,
    "ShardIndexError": IndexError,
    "BindingError": TypeError,
    "UnpicklableFunctionError": TypeError,
    "ClosedError": ValueError,
    "UsageError": RuntimeError,
    "NativeModuleError": ImportError,
    "MissingDependencyError": ImportError,
    "ShardcOSError": OSError,
    "SegmentError": OSError,
    "QueueError": OSError,
    "GuardError": OSError,
    "QueueClosedError": EOFError,
    "WorkerSetupError": RuntimeError,
    "WorkerCrashedError": RuntimeError,
    "ExecutorBrokenError": RuntimeError,
    "ShardTimeoutError": TimeoutError,
    "CallSetupTimeoutError": TimeoutError,
    "WorkerMemoryError": MemoryError,
    "ShardMapError": RuntimeError,
    "ReduceError": RuntimeError,
    "NativeKernelError": RuntimeError,
    "ClusterError": RuntimeError,
}


def _exception_classes() -> list[type[BaseException]]:
    return [c for n in errors.__all__ if isinstance(c := getattr(errors, n), type) and issubclass(c, BaseException)]


def test_every_class_is_a_shardc_error_and_its_builtin() -> None:
    """Each exported error subclasses ShardcError and the builtin that fits, and is exported by shardc."""
    for cls in _exception_classes():
        if cls is errors.RemoteTraceback:  # a __cause__ carrier, never raised by itself
            continue
        assert issubclass(cls, ShardcError), cls
        if cls is not ShardcError and cls is not errors.BorrowedInputWriteError:
            assert issubclass(cls, BUILTIN_OF[cls.__name__]), cls
        assert cls.__name__ in shardc.__all__ and getattr(shardc, cls.__name__) is cls


def test_os_errors_form_one_family() -> None:
    """Segment, queue and guard errors are ShardcOSErrors; a QueueError is also a SegmentError (as before)."""
    assert issubclass(SegmentError, ShardcOSError) and issubclass(GuardError, ShardcOSError)
    assert issubclass(QueueError, SegmentError)
    assert not issubclass(GuardError, SegmentError)
    assert issubclass(ChannelClosed, ShardcError) and issubclass(ChannelClosed, EOFError)


@pytest.mark.parametrize("cls", [ShardcOSError, SegmentError, QueueError, GuardError])
def test_os_errors_pickle_with_errno(cls: type[ShardcOSError]) -> None:
    """An OS-level error crosses a process boundary (pickle) with its class, errno and message."""
    with pytest.raises(cls) as info:
        ll._check(-errno.ENOMEM, "op", "thing", cls)
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is cls and back.errno == errno.ENOMEM and str(back) == str(info.value)


def test_check_maps_each_domain_with_its_hints() -> None:
    """_check raises the class asked for, names the object as that domain does, and gives that domain's hints."""
    with pytest.raises(SegmentError) as seg:
        ll._check(-errno.ENOSPC, "ftruncate", "/seg-x")
    assert "for segment '/seg-x'" in str(seg.value) and "backing='file'" in str(seg.value)
    with pytest.raises(GuardError) as guard:
        ll._check(-errno.ENOSPC, "page-guard protect", "X", GuardError)
    assert "for borrowed input 'X'" in str(guard.value) and "region table is full" in str(guard.value)
    assert "backing='file'" not in str(guard.value)
    with pytest.raises(GuardError, match="vm.max_map_count"):
        ll._check(-errno.ENOMEM, "page-guard protect", "X", GuardError)
    with pytest.raises(QueueError) as queue:
        ll._check(-errno.ENOENT, "task ring attach", None, QueueError)
    assert "hint" not in str(queue.value)  # the segment's "no segment with this name" would mislead
    with pytest.raises(ShardcOSError) as proc:
        ll._check(-errno.ESRCH, "read memory", "pid 1", ShardcOSError)
    assert type(proc.value) is ShardcOSError and "for 'pid 1'" in str(proc.value)
    assert ll._check(3, "anything") == 3


def test_segment_calls_raise_segment_error() -> None:
    """A failed call on a segment (seg.c) is a SegmentError with errno."""
    with pytest.raises(SegmentError) as info:
        ll.seg_open(ll.BACKING_SHM, f"/shardc-test-errors-missing-{os.getpid()}", False)
    assert type(info.value) is SegmentError and info.value.errno == errno.ENOENT


def test_queue_calls_raise_queue_error() -> None:
    """Failed task-ring calls (queue.c) are QueueErrors with errno; a closed ring stays QueueClosedError."""
    with TaskRing.create(8, 1) as r:
        with pytest.raises(QueueError) as bad:
            r.pop(5, 1, timeout=0)
        assert bad.value.errno == errno.EINVAL and "consumer 5" in str(bad.value)
        r.push([1, 2])
        r.register(0)
        r.pop(0, 1, timeout=0)
        with pytest.raises(QueueError, match="alive") as busy:
            r.repair(0)
        assert busy.value.errno == errno.EBUSY
        r.close()
        with pytest.raises(QueueClosedError):
            r.push([3])


def test_guard_calls_raise_guard_error() -> None:
    """Failed page-guard calls (guard.c) are GuardErrors with errno, not SegmentErrors."""
    with pytest.raises(GuardError) as limits:
        ll.guard_set_limits(10**6, 1)
    assert limits.value.errno == errno.EINVAL and not isinstance(limits.value, SegmentError)
    with pytest.raises(GuardError, match="for borrowed input 'X'") as add:
        ll.guard_add(ll.PAGE_SIZE + 1, ll.PAGE_SIZE, ll.GUARD_MODES["deny"], "X")
    assert add.value.errno == errno.EINVAL


def test_proc_calls_raise_shardc_os_error() -> None:
    """Failed process calls (proc.c) raise the plain OS-level class."""
    with pytest.raises(ShardcOSError) as info:
        ll.proc_set_affinity(os.getpid(), [1 << 20])
    assert type(info.value) is ShardcOSError and info.value.errno == errno.EINVAL


def test_python_level_errors_are_domain_classes() -> None:
    """Errors raised in Python by the leaf modules are ShardcErrors that keep their builtin."""
    with pytest.raises(InvalidTypeError):
        shardc.buffer(object, 4)
    d = shardc.shards(10, block_size=5)
    with pytest.raises(ShardIndexError):
        d[7]
    with pytest.raises(IndexError):
        d[7]
    with pytest.raises(InvalidTypeError):
        d["a"]
    with pytest.raises(WorkerSetupError, match="forked before inherited input"):
        inherit.lookup(-12345)
    with shardc.share({"a": 1}) as sh, pytest.raises(InvalidTypeError, match="not an array"):
        sh.array  # noqa: B018 - the access is the test
    buf = shardc.buffer("f8", 4)
    buf.close()
    with pytest.raises(ClosedError):
        buf.array  # noqa: B018 - the access is the test


def test_guard_install_off_the_main_thread_is_a_usage_error() -> None:
    """guard.install() from another thread raises UsageError (a RuntimeError)."""
    from shardc import guard

    caught: list[BaseException] = []

    def run() -> None:
        try:
            guard.install()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            caught.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert len(caught) == 1 and isinstance(caught[0], UsageError) and isinstance(caught[0], RuntimeError)


def test_native_module_error_is_an_import_error() -> None:
    """A missing/stale native module raises NativeModuleError, which `except ImportError` still catches."""
    assert issubclass(NativeModuleError, ImportError)
    with pytest.raises(ImportError):
        raise NativeModuleError("stale shardc native module")


# -- no builtin exceptions raised directly ----------------------------------------------------------

# Raised on purpose: protocol signals Python itself expects, not shardc failures.
PROTOCOL_RAISES = {
    ("shardc.buffer", "AttributeError"),  # __getattr__ delegation
    ("shardc.worker.loop", "UnpicklingError"),  # pickle's persistent_load protocol
    ("shardc.forkserver", "ChildProcessError"),  # os.waitpid's protocol (ForkServer.poll_exit)
}


def _builtin_raises() -> set[tuple[str, str]]:
    names = {
        n
        for n in dir(builtins)
        if isinstance(getattr(builtins, n), type) and issubclass(getattr(builtins, n), BaseException)
    } | {"UnpicklingError"}
    found = set()
    for path in sorted((REPO / "shardc").rglob("*.py")):
        mod = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                f = node.exc.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name in names:
                    found.add((mod, name))
    return found


def test_no_new_builtin_exceptions_raised() -> None:
    """No module raises a bare builtin exception (use a shardc.errors class) but pickle/attribute protocol ones."""
    new = _builtin_raises() - PROTOCOL_RAISES
    assert not new, f"raise a shardc.errors class (it can also inherit the builtin) instead of: {sorted(new)}"


def test_kernel_reserved_fields_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    """register_kernel's reserved signature/supports_views are type-checked, so a later meaning breaks nothing."""
    from shardc import kernels
    from shardc.kernels import get_kernel, register_kernel

    monkeypatch.setattr(kernels, "_registry", dict(kernels._registry))  # leave the real registry alone

    with pytest.raises(InvalidArgumentError, match="signature"):
        register_kernel("bad_sig", lambda shard: None, signature=3)
    with pytest.raises(InvalidArgumentError, match="supports_views"):
        register_kernel("bad_views", lambda shard: None, supports_views="yes")
    k = register_kernel("reserved_ok", lambda shard: None, signature="shard", supports_views=False)
    assert get_kernel("reserved_ok") is k and k.signature == "shard" and k.supports_views is False


def test_a_record_that_does_not_unpickle_keeps_our_type():
    """An error record whose pickled exception cannot be rebuilt still gives one of our
    exception types by its name (a WorkerMemoryError stays one); a foreign type becomes a
    ShardcError naming it."""
    from shardc.protocol import raise_from_record

    e = raise_from_record({"type": "shardc.errors.WorkerMemoryError", "message": "m", "traceback": "", "exc": b"x"})
    assert type(e) is shardc.WorkerMemoryError and str(e) == "m"
    e = raise_from_record({"type": "numpy.linalg.LinAlgError", "message": "m", "traceback": "tb"})
    assert type(e) is shardc.ShardcError and str(e) == "numpy.linalg.LinAlgError: m"
