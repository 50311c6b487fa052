"""The SPIN models of the shared-memory protocol (tests/spin/*.pml) verify:
``spin -a``, gcc ``pan.c``, run ``pan`` (exhaustive safety search: assertions
and invalid end states) and require "errors: 0".  Each model is also run in
deliberately broken variants, which must fail, so a model that can no
longer find anything is noticed.

Skipped only when ``spin`` is missing and ``CI`` is unset: in CI a missing
``spin`` fails (``.ci/run`` installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SPIN_DIR = Path(__file__).resolve().parent / "spin"

if shutil.which("spin") is None and not os.environ.get("CI"):
    pytest.skip("spin is not installed (apt-get install spin); required when CI is set", allow_module_level=True)

# Runs the SPIN models: its own CI step (.ci/run), -m evidence.
pytestmark = pytest.mark.evidence


def verify(model: str, tmp_path: Path, defines: tuple[str, ...] = ()) -> str:
    """Generate, compile and run the verifier of ``model``; return pan's output."""
    spin = shutil.which("spin")
    assert spin is not None, "spin is required in CI: apt-get install spin"
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc is not None, "a C compiler is needed to build pan"
    src = tmp_path / model
    shutil.copy(SPIN_DIR / model, src)
    gen = subprocess.run(
        [spin, *defines, "-a", model], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert gen.returncode == 0 and (tmp_path / "pan.c").is_file(), gen.stdout + gen.stderr
    # SAFETY: assertions and invalid end states (no never claim); COLLAPSE
    # keeps the state store small.
    build = subprocess.run(
        [cc, "-O2", "-w", "-DSAFETY", "-DCOLLAPSE", "-o", "pan", "pan.c"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run(
        ["./pan", "-m20000", "-w22"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    return run.stdout + run.stderr


@pytest.mark.timeout(180)
def test_protocol_model(tmp_path: Path) -> None:
    """Ring claims + repair, status rows and done map with workers SIGKILLed
    at any step: no shard lost or completed twice, no deadlock."""
    out = verify("protocol.pml", tmp_path)
    assert "errors: 0" in out, out
    assert "Search not completed" not in out, out


@pytest.mark.timeout(180)
def test_protocol_model_catches_lost_claims(tmp_path: Path) -> None:
    """A repair that does not requeue a dead worker's claims loses shards:
    pan finds the run that never ends (the model is able to fail)."""
    out = verify("protocol.pml", tmp_path, ("-DBROKEN_REPAIR",))
    assert "invalid end state" in out and "errors: 0" not in out, out


@pytest.mark.timeout(120)
def test_seqlock_model(tmp_path: Path) -> None:
    """The row's two-copy seqlock: a snapshot is never torn, even when the
    writer dies mid-update, and the reader never waits on a dead writer."""
    out = verify("seqlock.pml", tmp_path)
    assert "errors: 0" in out, out
    assert "Search not completed" not in out, out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", ["-DNOSEQ", "-DSAMECOPY"])
def test_seqlock_model_catches_broken_variants(tmp_path: Path, variant: str) -> None:
    """Plain in-place stores, or writing the visible copy, give a torn
    snapshot that pan finds (the model is able to fail)."""
    out = verify("seqlock.pml", tmp_path, (variant,))
    assert "assertion violated" in out and "errors: 0" not in out, out
