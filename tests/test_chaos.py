"""The chaos run (bench/chaos.py --quick) in CI: random worker deaths of every
kind in both dispatch modes, and every check of the run holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(150)
pytestmark = [pytestmark, pytest.mark.evidence]  # its own CI step (.ci/run): -m evidence


def parse(stdout: str) -> dict[str, float]:
    """The run's ``name<TAB>value<TAB>unit`` lines as name -> value."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            rows[parts[0]] = float(parts[1])
    return rows


def test_chaos_quick() -> None:
    """bench/chaos.py --quick exits 0: done shards never rerun, out correct, counts agree, nothing leaks."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "chaos.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=140,
        cwd=REPO,
        env=env,
    )
    rows = parse(proc.stdout)
    tail = "\n".join(line for line in proc.stderr.splitlines() if "VIOLATION" in line or "Error" in line)
    # The violations, then the end of stderr whole (an exception's traceback, not only its last line).
    assert proc.returncode == 0, f"chaos run failed ({proc.returncode}):\n{proc.stdout}\n{tail}\n{proc.stderr[-6000:]}"
    assert rows["chaos_violations"] == 0
    assert rows["chaos_done_reruns"] == 0
    assert rows["chaos_rounds"] >= 2
    for kind in ("sigkill", "sigsegv", "exit", "hang", "mem", "raise"):
        assert rows[f"chaos_faults_{kind}"] >= 1, f"no {kind} fault was injected:\n{proc.stdout}"
    assert rows["chaos_failed_shards"] >= 1  # the doomed shards: the failure path ran
    assert rows["chaos_leaked_fds"] == 0 and rows["chaos_leaked_shm"] == 0 and rows["chaos_leaked_processes"] == 0
    assert rows["chaos_rss_growth"] <= 5
