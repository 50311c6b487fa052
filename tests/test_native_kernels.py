"""Native kernels (csrc/kernel.h ABI): register_kernel(native=...) with C
kernels compiled by cffi at test time, run in both dispatch modes, with the
same supervision as Python shards: a kernel failure fails its shard, a
segfault is a worker death charged to the shard that ran, a write into a
borrowed input is a cow event (deny: the named error) for that shard."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import pytest
from _engine_helpers import drain, no_stray_children, pool2  # noqa: F401 (fixtures)

import shardc
from shardc import _lowlevel as ll
from shardc import native
from shardc.errors import BorrowedInputWriteError, InvalidArgumentError, NativeKernelError, WorkerCrashedError

CSRC = Path(__file__).resolve().parent.parent / "csrc"

KERNELS = r"""
#include <signal.h>
#include <stdint.h>
#include "kernel.h"

/* out[i] = i + 1 for every shard i (out = arrays[0], int64) */
int plus_one(const shardc_kernel_args_t *a, int64_t start, int64_t stop) {
    int64_t *out = (int64_t *)a->arrays[0].data;
    for (int64_t i = start; i < stop; i++) out[i] = i + 1;
    return 0;
}

/* As plus_one, but shard iparams[0] segfaults and shard iparams[1] returns 7. */
int faulty(const shardc_kernel_args_t *a, int64_t start, int64_t stop) {
    int64_t *out = (int64_t *)a->arrays[0].data;
    for (int64_t i = start; i < stop; i++) {
        if (i == a->iparams[0]) raise(SIGSEGV);
        if (i == a->iparams[1]) return 7;
        out[i] = i + 1;
    }
    return 0;
}

/* arrays = (X borrowed float64, out int64): shard iparams[0] stores into X. */
int write_input(const shardc_kernel_args_t *a, int64_t start, int64_t stop) {
    double *x = (double *)a->arrays[0].data;
    int64_t *out = (int64_t *)a->arrays[1].data;
    for (int64_t i = start; i < stop; i++) {
        if (i == a->iparams[0]) x[3] = 42.0;
        out[i] = i + 1;
    }
    return 0;
}

/* Row k of out (int64, nshards x 16) describes what shard k was given. */
int describe(const shardc_kernel_args_t *a, int64_t start, int64_t stop) {
    const shardc_array_t *x = &a->arrays[0];
    int64_t *out = (int64_t *)a->arrays[1].data;
    for (int64_t k = start; k < stop; k++) {
        int64_t *r = out + k * a->arrays[1].strides[0] / 8;
        r[0] = a->abi; r[1] = a->narrays; r[2] = a->nshards; r[3] = a->strategy;
        r[4] = a->n; r[5] = a->block; r[6] = x->ndim; r[7] = x->dtype;
        r[8] = x->shape[0]; r[9] = x->shape[1]; r[10] = x->strides[0]; r[11] = x->strides[1];
        r[12] = x->writable; r[13] = a->arrays[1].writable; r[14] = a->iparams[0];
        /* the first element of the shard's rows, read through the strides */
        r[15] = (int64_t)*(const double *)((const char *)x->data + k * a->block * x->strides[0]);
    }
    return 0;
}
"""
NAMES = ("plus_one", "faulty", "write_input", "describe")


@pytest.fixture(scope="module")
def kmod(tmp_path_factory: pytest.TempPathFactory):
    """A cffi (API mode) module of test kernels, compiled now."""
    cffi = pytest.importorskip("cffi")
    d = tmp_path_factory.mktemp("native_kernels")
    native.write_kernel_header(d)  # the header shipped inside the module, as a user gets it
    ffi = cffi.FFI()
    ffi.cdef(native.kernel_cdef())  # the ABI types only
    ffi.cdef("".join(f"int {n}(const shardc_kernel_args_t *a, int64_t start, int64_t stop);\n" for n in NAMES))
    ffi.set_source("shardc_test_kmod", KERNELS, include_dirs=[str(d)], extra_compile_args=["-O2"])
    so = ffi.compile(tmpdir=str(d))
    sys.path.insert(0, str(d))
    try:
        import shardc_test_kmod as mod
    finally:
        sys.path.remove(str(d))
    return mod, so


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    """Kernels registered by a test do not outlive it."""
    from shardc import kernels

    monkeypatch.setattr(kernels, "_registry", dict(kernels._registry))


def reg(kmod, name: str, **kw):
    mod, _ = kmod
    return shardc.register_kernel(f"t_{name}", native=mod.ffi.addressof(mod.lib, name), **kw)


@pytest.mark.parametrize("mode", ["shm_queue", "rpc_chunked"])
def test_plus_one_in_both_modes(kmod, registry, pool2, mode):
    """A cffi kernel writes out[i] = i + 1 for 200k trivial shards, every one exactly."""
    reg(kmod, "plus_one", signature="out")
    n = 200_000
    out = shardc.buffer(np.int64, n)
    opts = {"chunk_size": 4096} if mode == "rpc_chunked" else {}
    res = shardc.shard_map(n, kernel="t_plus_one", out={"out": out}, pool=pool2, dispatch_mode=mode, **opts)
    assert res.failures == {}
    np.testing.assert_array_equal(out.array, np.arange(1, n + 1))
    out.close()


def test_shm_queue_call_builds_no_per_shard_state_on_the_master(kmod, registry, pool2):
    """A clean shm_queue call allocates no per-shard arrays or value list (they appear when read), a failed one does."""
    reg(kmod, "plus_one", signature="out")
    n = 300_000
    out = shardc.buffer(np.int64, n)
    res = shardc.shard_map(n, kernel="t_plus_one", out={"out": out}, pool=pool2, dispatch_mode="shm_queue")
    d = res.diagnostics
    assert d._per_shard == {} and isinstance(res._results, int) and len(res) == n
    assert sum(b[2] for b in d.blocks) == n  # the per-block records are kept
    assert res.results[-1] is None and len(res.results) == n and (d.shard_worker == -1).all()
    assert np.isnan(d.shard_mem_delta).all() and d.shard_t0.shape == (n,)
    reg(kmod, "faulty", signature="out", iparams=(-1, 77))
    res = shardc.shard_map(
        1000, kernel="t_faulty", out={"out": out}, pool=pool2, dispatch_mode="shm_queue", on_failure="collect"
    )
    assert list(res.failures) == [77] and res.diagnostics.shard_ok[77] == 3  # FAILED
    assert isinstance(res.results[77], shardc.result.FailedShard) and res.results[76] is None
    out.close()


def test_every_accepted_form_runs(kmod, registry, pool2):
    """(path, symbol), a ctypes function and a cffi pointer all find the same code in the workers."""
    mod, so = kmod
    lib = ctypes.CDLL(so)
    n = 5000
    for form in ((so, "plus_one"), lib.plus_one, mod.ffi.addressof(mod.lib, "plus_one")):
        k = shardc.register_kernel("t_form", native=form, signature="out")
        out = shardc.buffer(np.int64, n)
        shardc.shard_map(n, kernel="t_form", out={"out": out}, pool=pool2, dispatch_mode="shm_queue")
        np.testing.assert_array_equal(out.array, np.arange(1, n + 1))
        arr = np.zeros(3, dtype=np.int64)
        k.impl(shardc.shards(3, block_size=1)[2], out=arr)  # also callable in this process
        assert arr.tolist() == [0, 0, 3]
        out.close()
        drain(pool2)


def test_abi_fields_and_strided_views(kmod, registry, pool2):
    """The kernel sees the shard geometry, iparams and a borrowed view's real shape and strides (no copy)."""
    reg(kmod, "describe", signature="X, out", iparams=(99,))
    base = shardc.buffer(np.float64, (40, 6))
    base.array[:] = np.arange(240, dtype=np.float64).reshape(40, 6)
    X = base.array[::2, 1::2]  # a non-contiguous view of shared memory
    desc = shardc.shards(20, block_size=3)
    out = shardc.buffer(np.int64, (desc.num_shards, 16))
    shardc.shard_map(
        desc, kernel="t_describe", borrow={"X": X}, out={"out": out}, pool=pool2, dispatch_mode="shm_queue"
    )
    r = out.array
    assert (r[:, 0] == ll.KERNEL_ABI).all() and (r[:, 1] == 2).all() and (r[:, 2] == desc.num_shards).all()
    assert (r[:, 3] == ll.SHARDS_CONTIGUOUS).all() and (r[:, 4] == 20).all() and (r[:, 5] == 3).all()
    assert (r[:, 6] == 2).all() and (r[:, 7] == ll.dtype_code(np.dtype(np.float64))).all()
    assert (r[:, 8:12] == [20, 3, 96, 16]).all()
    assert (r[:, 12] == 0).all() and (r[:, 13] == 1).all() and (r[:, 14] == 99).all()
    np.testing.assert_array_equal(r[:, 15], X[::3, 0])
    base.close()
    out.close()


@pytest.mark.parametrize("mode", ["shm_queue", "rpc_chunked"])
def test_kernel_error_fails_only_its_shard(kmod, registry, pool2, mode):
    """A non-zero return fails that shard with NativeKernelError (code kept); the others finish."""
    reg(kmod, "faulty", signature="out", iparams=(-1, 57))
    n = 300
    out = shardc.buffer(np.int64, n)
    res = shardc.shard_map(
        n, kernel="t_faulty", out={"out": out}, pool=pool2, dispatch_mode=mode, max_retries=1, on_failure="collect"
    )
    assert list(res.failures) == [57]
    f = res.failures[57]
    assert f.attempts == 2 and isinstance(f.exception, NativeKernelError)
    assert f.exception.code == 7 and "returned 7 for shard 57" in f.message
    want = np.arange(1, n + 1)
    want[57] = 0
    np.testing.assert_array_equal(out.array, want)
    out.close()


@pytest.mark.parametrize("mode", ["shm_queue", "rpc_chunked"])
def test_segfault_is_a_death_charged_to_its_shard(kmod, registry, pool2, mode):
    """SIGSEGV inside the kernel kills the worker; only the shard that ran is charged, the rest complete."""
    reg(kmod, "faulty", signature="out", iparams=(1234, -1))
    n = 5000
    out = shardc.buffer(np.int64, n)
    res = shardc.shard_map(
        n,
        kernel="t_faulty",
        out={"out": out},
        pool=pool2,
        dispatch_mode=mode,
        max_retries=1,
        on_failure="collect",
        **({"chunk_size": 100} if mode == "rpc_chunked" else {}),
    )
    assert list(res.failures) == [1234]
    f = res.failures[1234]
    assert f.attempts == 2 and isinstance(f.exception, WorkerCrashedError) and "SIGSEGV" in f.message
    want = np.arange(1, n + 1)
    want[1234] = 0
    np.testing.assert_array_equal(out.array, want)
    assert len(pool2.workers) == 2 and all(w.alive for w in pool2.workers)
    out.close()


@pytest.mark.parametrize("mode", ["shm_queue", "rpc_chunked"])
def test_cow_deny_from_a_native_kernel(kmod, registry, pool2, mode):
    """A kernel's store into a borrowed input fails exactly that shard with the named error; data unchanged."""
    reg(kmod, "write_input", signature="X, out", iparams=(77,))
    X = np.arange(1000, dtype=np.float64)
    n = 400
    out = shardc.buffer(np.int64, n)
    res = shardc.shard_map(
        n,
        kernel="t_write_input",
        borrow={"X": X},
        out={"out": out},
        pool=pool2,
        dispatch_mode=mode,
        on_failure="collect",
        cow="deny",
    )
    assert list(res.failures) == [77]
    exc = res.failures[77].exception
    assert isinstance(exc, BorrowedInputWriteError) and exc.input_name == "X" and exc.shard_id == 77
    assert exc.index == (3,) and res.failures[77].attempts == 1  # deterministic: not retried
    assert X[3] == 3.0
    want = np.arange(1, n + 1)
    np.testing.assert_array_equal(np.delete(out.array, 77), np.delete(want, 77))
    out.close()


def test_cow_audit_from_a_native_kernel(kmod, registry, pool2):
    """Under audit the writing shard completes and the write is reported for that shard."""
    reg(kmod, "write_input", signature="X, out", iparams=(77,))
    X = np.arange(1000, dtype=np.float64)
    n = 400
    out = shardc.buffer(np.int64, n)
    res = shardc.shard_map(
        n, kernel="t_write_input", borrow={"X": X}, out={"out": out}, pool=pool2, dispatch_mode="shm_queue", cow="audit"
    )
    assert res.failures == {}
    np.testing.assert_array_equal(out.array, np.arange(1, n + 1))
    rep = shardc.cow_report(res).data
    assert rep["inputs"]["X"]["shards"] == [77]
    assert X[3] == 3.0
    out.close()


def test_shipped_header_is_the_source_header():
    """kernel_header() is csrc/kernel.h byte for byte (the build embeds it), and it stands alone."""
    assert native.kernel_header() == (CSRC / "kernel.h").read_text()
    assert '#include "' not in native.kernel_header()


def test_bad_native_arguments_fail_at_registration(kmod, registry):
    """Forms shardc cannot find again in a worker are refused when registered, naming what to pass."""
    mod, so = kmod
    with pytest.raises(InvalidArgumentError, match="native= takes"):
        shardc.register_kernel("t_bad", native=42)
    with pytest.raises(InvalidArgumentError, match="cannot load symbol"):
        shardc.register_kernel("t_bad", native=(so, "no_such_kernel"))
    with pytest.raises(InvalidArgumentError, match="not a built-in"):
        shardc.register_kernel("t_bad", native="no_such_builtin")
    with pytest.raises(InvalidArgumentError, match="not both"):
        shardc.register_kernel("t_bad", lambda shard: None, native=(so, "plus_one"))
    with pytest.raises(InvalidArgumentError, match="signature"):
        shardc.register_kernel("t_bad", native=(so, "plus_one"), signature="X, 3y")
    cb = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)(lambda a, s, e: 0)
    with pytest.raises(InvalidArgumentError, match="not in a shared object"):
        shardc.register_kernel("t_bad", native=cb)


def _numba_kernel_run() -> tuple[list[int], int]:
    """In a forked child: register a numba.cfunc kernel and run it on a pool of its own."""
    import numba

    sig = numba.types.int32(numba.types.voidptr, numba.types.int64, numba.types.int64)

    def fails_on_3(a, start, stop):  # noqa: ARG001 - the ABI's arguments
        return 5 if start == 3 else 0

    shardc.register_kernel("t_numba", native=numba.cfunc(sig)(fails_on_3), signature="out")
    out = shardc.buffer(np.int64, 8)
    with shardc.Pool(2) as pool:
        res = shardc.shard_map(
            8,
            kernel="t_numba",
            out={"out": out},
            pool=pool,
            dispatch_mode="shm_queue",
            max_retries=0,
            on_failure="collect",
        )
    out.close()
    return list(res.failures), res.failures[3].exception.code


def test_numba_cfunc_kernel(fork_run):
    """A numba.cfunc with the ABI's signature is recompiled in each worker; its return codes fail shards.

    In a forked child: compiling a cfunc loads SciPy's OpenBLAS into the
    process, after the pool code cached its BLAS controller, and later pools
    of this process would not limit that library (tests/test_map.py checks)."""
    pytest.importorskip("numba")
    assert fork_run(_numba_kernel_run, 120) == ([3], 5)
