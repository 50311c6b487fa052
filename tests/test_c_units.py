"""Runs the C unit tests (tests/c/test_*.c): optimized with -Werror, under
ASan+UBSan, with the portable wait fallback, and under TSan for the tests
listed in the Makefile's TSAN_TESTS; each binary in its own process with a
timeout."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CDIR = Path(__file__).resolve().parent / "c"
TESTS = sorted(p.stem for p in CDIR.glob("test_*.c"))
VARIANTS = ["", "_asan", "_portable"]
# Threaded harnesses also built with -fsanitize=thread (tests/c/Makefile TSAN_TESTS).
TSAN_TESTS = ["test_status", "test_queue_threads"]
CASES = [(name, v) for name in TESTS for v in VARIANTS] + [(name, "_tsan") for name in TSAN_TESTS]
LABELS = {"": "O2", "_asan": "asan", "_portable": "portable", "_tsan": "tsan"}

pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("cc") is None, reason="needs make and a C compiler"
)
pytestmark = [pytestmark, pytest.mark.evidence]  # its own CI step (.ci/run): -m evidence


@pytest.fixture(scope="session")
def built() -> Path:
    """Build every C test binary once (make is incremental)."""
    proc = subprocess.run(["make", "-C", str(CDIR), "-j2", "all"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"C tests failed to build:\n{proc.stdout}\n{proc.stderr}"
    return CDIR / "bin"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "variant"), CASES, ids=[f"{LABELS[v]}-{n}" for n, v in CASES])
def test_c_unit(built: Path, name: str, variant: str) -> None:
    """The C test program exits 0 (every CHECK held, no sanitizer report)."""
    exe = built / f"{name}{variant}"
    env = {
        "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:handle_segv=0:handle_sigbus=0:allow_user_segv_handler=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1",
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=280, env=env)
    assert proc.returncode == 0, f"{exe.name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "ok 1 -" in proc.stdout
