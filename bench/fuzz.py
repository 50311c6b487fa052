"""The long fuzzing profile: tests/test_fuzz.py with many more examples.

What it measures: nothing about speed; it runs every property of
tests/test_fuzz.py with ``--examples`` random (not derandomized) examples
each and prints ``fuzz_<name><TAB>value<TAB>unit`` lines (examples per
property, properties passed and failed).  Exit status 1 if any failed.

Usage: ``python3 bench/fuzz.py --examples 2000`` (about 10 minutes).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000, help="examples per property")
    args = ap.parse_args(argv)
    env = dict(os.environ, SHARDC_FUZZ_EXAMPLES=str(args.examples), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "timeout=0",
            str(ROOT / "tests" / "test_fuzz.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", tail)) else 0
    failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", tail)) else 0
    print(f"fuzz_examples_per_property\t{args.examples}\tcount")
    print(f"fuzz_properties_passed\t{passed}\tcount")
    print(f"fuzz_properties_failed\t{failed}\tcount")
    if proc.returncode != 0:
        findings = [ln.strip() for ln in proc.stdout.splitlines() if "AssertionError: " in ln or "Falsifying" in ln]
        print("\n".join(dict.fromkeys(findings)) or proc.stdout[-5000:], file=sys.stderr)
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
