#!/bin/sh
# Static checks: ruff (lint + format check) over the package and its tests, mypy over the
# package (settings in pyproject.toml). Runs every check, then exits non-zero if any failed.
# Usage: tools/check.sh   (from anywhere; needs `pip install ruff mypy`, in the `test` extra)
cd "$(dirname "$0")/.." || exit 2
status=0
for tool in ruff mypy; do
    command -v "$tool" >/dev/null 2>&1 || { echo "tools/check.sh: $tool is not installed (pip install ruff mypy)" >&2; exit 2; }
done
echo "== ruff check shardc tests"
ruff check shardc tests || status=1
echo "== ruff format --check shardc tests"
ruff format --check shardc tests || status=1
echo "== mypy shardc"
mypy shardc || status=1
exit $status
