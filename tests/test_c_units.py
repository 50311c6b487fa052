"""Runs the C unit tests (tests/c/test_*.c): optimized with -Werror, under
ASan+UBSan, and with the portable wait fallback; each binary in its own
process with a timeout."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CDIR = Path(__file__).resolve().parent / "c"
TESTS = sorted(p.stem for p in CDIR.glob("test_*.c"))
VARIANTS = ["", "_asan", "_portable"]

pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                                reason="needs make and a C compiler")


@pytest.fixture(scope="session")
def built() -> Path:
    """Build every C test binary once (make is incremental)."""
    proc = subprocess.run(["make", "-C", str(CDIR), "-j2", "all"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"C tests failed to build:\n{proc.stdout}\n{proc.stderr}"
    return CDIR / "bin"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", VARIANTS, ids=["O2", "asan", "portable"])
@pytest.mark.parametrize("name", TESTS)
def test_c_unit(built: Path, name: str, variant: str) -> None:
    """The C test program exits 0 (every CHECK held, no sanitizer report)."""
    exe = built / f"{name}{variant}"
    env = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:handle_segv=0:handle_sigbus=0:allow_user_segv_handler=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, f"{exe.name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "ok 1 -" in proc.stdout
