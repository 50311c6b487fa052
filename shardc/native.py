"""Native kernels: a compiled C function run by shardc's workers without the GIL.

``register_kernel(name, native=...)`` (``shardc.kernels``) wraps the function
in a :class:`NativeKernel`: a small, picklable record of *where the code is*
(a shared object and a symbol, a built-in of shardc's own module, or a numba
``cfunc``'s Python source and signature), since a warm pool's workers were
forked before the function was loaded and cannot use its address.  Each
worker resolves it once per call (``dlopen`` + ``dlsym``, cached per
process) and its loop hands whole blocks of shard ids to the C runner
(``csrc/kernel.c``; ``shardc.worker.native``).

The ABI (``csrc/kernel.h``)::

    int fn(const shardc_kernel_args_t *a, int64_t start, int64_t stop);

``a->arrays`` are the call's borrowed inputs and out buffers (pointer, ndim,
shape, strides in bytes, dtype code, writable), in the order of the
kernel's ``signature`` (``"X, out"``) or else borrow= then out=; the shard
geometry (``a->strategy``, ``a->n``, ``a->block``, ``a->tiles``) says which
items shard k covers.  Return 0 for success; anything else fails the shard
with :class:`~shardc.errors.NativeKernelError` carrying the value.

Accepted ``native=`` values:

* a cffi function pointer (``ffi.addressof(lib, "kern")`` of an API-mode
  module: a static wrapper, found again by its offset in the module, Linux
  only; or any pointer to an exported symbol);
* a ctypes function (``ctypes.CDLL(path).kern``);
* ``(path, symbol)``: a shared object and an exported symbol in it;
* a ``numba.cfunc`` with the ABI's signature (recompiled in each worker);
* the name of a built-in (``"shardc_kern_colstats"``).

A function pointer is located with ``dladdr``: it must lie in a shared
object (JIT code other than numba's cannot be found again in a worker and is
refused, naming what to pass instead).
"""

from __future__ import annotations

import ctypes
import inspect
import os
from typing import Any

import numpy as np

from . import _lowlevel as ll
from .errors import InvalidArgumentError, NativeKernelError

_resolved: dict[tuple[Any, ...], tuple[int, int]] = {}  # ref key -> (pid, address): cached per process


class NativeKernel:
    """A registered native kernel (see the module docstring).

    Attributes:
        name: the kernel's registry name (used in messages).
        ref: where the code is: ``("lib", path, symbol, offset)`` (symbol
            "" for a static function: found by its offset in the object),
            ``("builtin", symbol)`` or ``("numba", pyfunc, signature)``.
        order: the names of the arrays in ``a->arrays`` order, or None
            (borrow= then out=, in the caller's order).
        iparams: up to 8 integers passed in ``a->iparams``.
    """

    def __init__(self, name: str, ref: tuple[Any, ...], order: tuple[str, ...] | None, iparams: tuple[int, ...] = ()):
        self.name = name
        self.ref = ref
        self.order = order
        self.iparams = tuple(int(v) for v in iparams)
        if len(self.iparams) > 8:
            raise InvalidArgumentError(f"kernel {name!r}: at most 8 integer parameters, got {len(self.iparams)}")
        if order is not None:
            params = [inspect.Parameter("shard", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in order]
            self.__signature__ = inspect.Signature(params)

    def __repr__(self) -> str:
        return f"NativeKernel({self.name!r}, {self.ref[0]}:{self.ref[-1] if self.ref[0] != 'numba' else '<cfunc>'})"

    def _key(self) -> tuple[Any, ...]:
        if self.ref[0] == "numba":  # the function arrives unpickled anew with each call: key by its code
            code = self.ref[1].__code__
            return ("numba", self.ref[1].__qualname__, code.co_code, repr(code.co_consts), str(self.ref[2]))
        return self.ref

    def address(self) -> int:
        """The function's address in this process (resolved once per process)."""
        key = self._key()
        hit = _resolved.get(key)
        if hit is not None and hit[0] == os.getpid():
            return hit[1]
        kind = self.ref[0]
        if kind == "builtin":
            addr = ll.fn_address(ll.BUILTIN[self.ref[1]])
        elif kind == "lib":
            addr, err = ll.kernel_resolve(self.ref[1], self.ref[2], self.ref[3])
            if not addr:
                raise InvalidArgumentError(
                    f"native kernel {self.name!r}: cannot load {self.ref[2] or hex(self.ref[3])} "
                    f"from {self.ref[1]!r}: {err}"
                )
        else:
            import numba  # a numba cfunc was registered, so numba is installed

            addr = int(numba.cfunc(self.ref[2])(self.ref[1]).address or 0)
        _resolved[key] = (os.getpid(), addr)
        return addr

    def __call__(self, shard: Any, **arrays: Any) -> None:
        """Run the kernel for one shard in this process (outside shard_map:
        ``kernel.impl(shard, X=..., out=...)``)."""
        names = self.order if self.order is not None else tuple(arrays)
        args = ll.KernelArgs([np.asarray(arrays[n]) for n in names], 1, ll.SHARDS_CONTIGUOUS, iparams=self.iparams)
        sid = int(getattr(shard, "id", shard))
        rc = ll.kernel_call(ll.kernel_fn(self.address()), args, sid, sid + 1)
        if rc != 0:
            raise kernel_error(self.name, sid, rc)


def kernel_header() -> str:
    """The text of ``csrc/kernel.h`` (the ABI), as compiled into this shardc:
    write it next to a kernel's source to ``#include "kernel.h"``."""
    return ll.kernel_header()


def write_kernel_header(directory: str | os.PathLike[str]) -> str:
    """Write ``kernel.h`` into ``directory``; returns its path."""
    path = os.path.join(os.fspath(directory), "kernel.h")
    with open(path, "w", encoding="utf-8") as f:
        f.write(kernel_header())
    return path


def kernel_cdef() -> str:
    """The ABI's types (``shardc_array_t``, ``shardc_kernel_args_t``, the
    ``SHARDC_*`` constants, ``shardc_kernel_fn``) as a cffi ``cdef``; add
    your kernels' prototypes after it."""
    text = kernel_header()
    body = text[text.index("/* --- cdef begin --- */") : text.index("/* What shardc_kernel_run() did. */")]
    return body.replace("/* --- cdef begin --- */", "")


def kernel_error(name: str, sid: int, code: int) -> NativeKernelError:
    return NativeKernelError(f"native kernel {name!r} returned {code} for shard {sid}", name, sid, code)


def _is_cffi_pointer(fn: Any) -> bool:
    return type(fn).__module__ == "_cffi_backend" and "CData" in type(fn).__name__


def native_ref(name: str, native: Any) -> tuple[Any, ...]:
    """Where ``native`` (any accepted form, see the module docstring) lives.

    Raises:
        InvalidArgumentError: a form shardc cannot find again in a worker.
    """
    if isinstance(native, str):
        if native not in ll.BUILTIN:
            raise InvalidArgumentError(
                f"kernel {name!r}: native={native!r} is not a built-in native kernel "
                f"({', '.join(sorted(ll.BUILTIN))}); pass a compiled function or (path, symbol)"
            )
        return ("builtin", native)
    if isinstance(native, tuple):
        if len(native) != 2 or not all(isinstance(v, (str, os.PathLike)) for v in native):
            raise InvalidArgumentError(
                f"kernel {name!r}: native=(library path, symbol name) takes two strings, got {native!r}"
            )
        path, sym = os.fspath(native[0]), os.fspath(native[1])
        addr, err = ll.kernel_resolve(os.path.abspath(path), sym)
        if not addr:
            raise InvalidArgumentError(f"kernel {name!r}: cannot load symbol {sym!r} from {path!r}: {err}")
        return ("lib", os.path.abspath(path), sym, 0)
    if type(native).__name__ == "CFunc" and hasattr(native, "_pyfunc") and hasattr(native, "_sig"):
        return ("numba", native._pyfunc, native._sig)
    if _is_cffi_pointer(native):
        addr = ll.fn_address(native)
    elif isinstance(native, ctypes._CFuncPtr):  # type: ignore[attr-defined]
        addr = ctypes.cast(native, ctypes.c_void_p).value or 0
    else:
        raise InvalidArgumentError(
            f"kernel {name!r}: native= takes a cffi function pointer (ffi.addressof(lib, 'fn')), a ctypes "
            f"function, a numba.cfunc, (library path, symbol) or a built-in's name; got {type(native).__name__}"
        )
    for sym, fn in ll.BUILTIN.items():
        if ll.fn_address(fn) == addr:
            return ("builtin", sym)
    where = ll.kernel_locate(addr) if addr else None
    if where is None:
        raise InvalidArgumentError(
            f"kernel {name!r}: the function at {addr:#x} is not in a shared object, so workers (forked "
            "before it was loaded) cannot find it; build it into a library and pass (path, symbol), "
            "or use a numba.cfunc"
        )
    return ("lib", where[0], where[1], where[2] if not where[1] else 0)
