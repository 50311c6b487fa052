"""Native kernels in shm_queue: trivial shards per second (issue 18's
"Native kernel in shm_queue: >= 50M trivial shards/s").

Measures, in one interpreter on one warm pool of **2 workers**, median of
``--repeats`` (default 5) calls each:

* ``native_shm_queue``: ``register_kernel(native=<cffi pointer>)``, a C
  kernel writing ``out[i] = i + 1``, ``shard_map(N, kernel=..., out=...,
  dispatch_mode="shm_queue")`` with default settings (autotuned blocks,
  ``diagnostics=True``, done map and status row per shard);
* ``native_shm_queue_nodiag``: the same with ``diagnostics=False``;
* ``native_shm_queue_block``: ``dispatch_opts={"block_size": 2**20}`` (no
  ramp from probe blocks);
* ``py_shm_queue``: the same values written by a Python ``fun`` (1e6 shards);
* ``pool_map``: ``multiprocessing.Pool(2).map(f, range(N))`` with its default
  chunking returning ``i + 1`` (1e6 tasks), the batched peer of issue 18;
* ``numpy_fill``: ``out[:] = np.arange(1, N + 1)`` in one process (memory speed).

The kernel is compiled with cffi at start (untimed).  Every variant checks
its output.  Output lines: ``name<TAB>value<TAB>unit``.  Does not measure:
kernels that do work, rpc_chunked, pool start.  The box is shared: the load
average is printed; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

KERNEL = r"""
#include <stdint.h>
#include "kernel.h"
int plus_one(const shardc_kernel_args_t *a, int64_t start, int64_t stop) {
    int64_t *out = (int64_t *)a->arrays[0].data;
    for (int64_t i = start; i < stop; i++) out[i] = i + 1;
    return 0;
}
"""


def build_kernel(tmp: str) -> Any:
    from cffi import FFI

    from shardc import native

    native.write_kernel_header(tmp)
    ffi = FFI()
    ffi.cdef(native.kernel_cdef())
    ffi.cdef("int plus_one(const shardc_kernel_args_t *a, int64_t start, int64_t stop);")
    ffi.set_source("bench_native_kmod", KERNEL, include_dirs=[tmp], extra_compile_args=["-O2"])
    ffi.compile(tmpdir=tmp)
    sys.path.insert(0, tmp)
    import bench_native_kmod as mod

    return mod


def f(i: int) -> int:
    return i + 1


def py_fun(shard: Any, out: Any) -> None:
    out[shard.id] = shard.id + 1


def timed(fn: Any, repeats: int) -> list[float]:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000_000, help="shards per native call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="N = 2e6, 3 repeats")
    args = p.parse_args(argv)
    n = 2_000_000 if args.quick else args.n
    reps = 3 if args.quick else args.repeats
    import shardc

    tmp = tempfile.mkdtemp(prefix="shardc-bench-native-")
    mod = build_kernel(tmp)
    shardc.register_kernel("bench_plus_one", native=mod.ffi.addressof(mod.lib, "plus_one"), signature="out")
    rates: dict[str, float] = {}
    small = min(n, 1_000_000)
    with shardc.Pool(2) as pool:
        out = shardc.buffer(np.int64, n)
        want = np.arange(1, n + 1)
        for name, kw, num in (
            ("native_shm_queue", {}, n),
            ("native_shm_queue_nodiag", {"diagnostics": False}, n),
            ("native_shm_queue_block", {"dispatch_opts": {"block_size": 2**20}}, n),
        ):

            def call(kw: dict[str, Any] = kw) -> None:
                shardc.shard_map(
                    n, kernel="bench_plus_one", out={"out": out}, pool=pool, dispatch_mode="shm_queue", **kw
                )

            out.array[:] = 0
            ts = timed(call, reps)
            assert np.array_equal(out.array, want), name
            rates[name] = num / statistics.median(ts)

        sout = shardc.buffer(np.int64, small)

        def pycall() -> None:
            shardc.shard_map(small, py_fun, out={"out": sout}, pool=pool, dispatch_mode="shm_queue")

        ts = timed(pycall, reps)
        assert np.array_equal(sout.array, np.arange(1, small + 1))
        rates["py_shm_queue"] = small / statistics.median(ts)
        sout.close()

        def fill() -> None:
            out.array[:] = np.arange(1, n + 1)

        rates["numpy_fill"] = n / statistics.median(timed(fill, reps))
        out.close()
    with mp.get_context("fork").Pool(2) as mpool:
        mpool.map(abs, range(4))
        res: list[int] = []

        def pmap() -> None:
            res[:] = mpool.map(f, range(small))

        rates["pool_map"] = small / statistics.median(timed(pmap, reps))
        assert res[-1] == small
    for name, r in rates.items():
        C.emit(f"native.{name}.rate", r / 1e6, "Mshards/s")
    C.emit("native.loadavg", C.loadavg(), "load")
    best = max(rates["native_shm_queue"], rates["native_shm_queue_nodiag"])
    C.print_targets(
        "native",
        [
            (
                "native_rate",
                "native kernel in shm_queue >= 50M trivial shards/s (defaults; best of diag on/off)",
                f"{best / 1e6:.1f} M/s",
                best >= 50e6,
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
