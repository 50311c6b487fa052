"""cffi (API mode) build script for ``shardc._native``.

Named by ``setup.py``'s ``cffi_modules``.  The cdef is not written twice: it
is extracted from the ``/* --- cdef begin --- */ ... /* --- cdef end --- */``
section of each primitive header that ``csrc/shardc.h`` includes, so the C
headers stay the single export list.

A build stamp (package version + hash of every C source, header and this
script) is compiled into the module; ``shardc._lowlevel`` checks it at import
so a stale ``.so`` (C edited, module not rebuilt) fails loudly instead of
misbehaving.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_CDEF_RE = re.compile(r"/\* --- cdef begin --- \*/(.*?)/\* --- cdef end --- \*/", re.S)


def included_headers() -> list[str]:
    """Primitive headers in the order ``shardc.h`` includes them."""
    text = (HERE / "shardc.h").read_text()
    return re.findall(r'^#include "([a-z_]+\.h)"', text, re.M)


def cdef_text() -> str:
    parts = []
    for name in included_headers():
        m = _CDEF_RE.search((HERE / name).read_text())
        if m is None:
            raise RuntimeError(f"csrc/{name} has no cdef section")
        parts.append(f"/* from {name} */\n{m.group(1)}")
    parts.append("const char *shardc_build_stamp(void);")
    parts.append("const char *shardc_kernel_header(void);")
    return "\n".join(parts)


def package_version() -> str:
    text = (ROOT / "shardc" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def source_files() -> list[Path]:
    return sorted(HERE.glob("*.c"))


def build_stamp() -> str:
    """Hash of everything that determines the compiled module (see shardc/_stamp.py)."""
    spec = importlib.util.spec_from_file_location("_shardc_stamp", ROOT / "shardc" / "_stamp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.compute_stamp(HERE, package_version())


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())

# Python-facing glue (nothing in csrc/*.c includes Python.h).
def _c_string(text: str) -> str:
    """``text`` as a C string literal (for headers shipped inside the module)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", '\\n"\n"') + '"'


_PREAMBLE = f"""
#include "shardc.h"
static const char *shardc_build_stamp(void) {{ return "{build_stamp()}"; }}
/* csrc/kernel.h, for users compiling native kernels against an installed
 * shardc (shardc.native.kernel_header()). */
static const char *shardc_kernel_header(void) {{ return {_c_string((HERE / "kernel.h").read_text())}; }}

/* Page-guard notifier (csrc/guard.h): the SIGSEGV handler calls it for a write
 * into a deny input, and a Python handler for that signal then raises
 * BorrowedInputWriteError.  PyErr_SetInterruptEx is async-signal-safe; it is
 * declared here because cffi's Py_LIMITED_API hides it (stable ABI since 3.10). */
PyAPI_FUNC(int) PyErr_SetInterruptEx(int signum);
void shardc_guard_python_notify(int signum) {{ (void)PyErr_SetInterruptEx(signum); }}
"""

_extra = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
if os.environ.get("SHARDC_PORTABLE_WAIT"):
    _extra.append("-DSHARDC_PORTABLE_WAIT=1")

ffibuilder.set_source(
    "shardc._native",
    _PREAMBLE,
    sources=[os.path.relpath(p, ROOT) for p in source_files()],
    include_dirs=[os.path.relpath(HERE, ROOT)],
    extra_compile_args=_extra,
    libraries=["rt"] if os.uname().sysname == "Linux" else [],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(ROOT / "build" / "cffi"), verbose=True)
