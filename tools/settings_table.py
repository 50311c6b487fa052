#!/usr/bin/env python3
"""Print the SHARDC_* settings table (shardc/config.py) as Markdown, or put it into the README.

    tools/settings_table.py           print the table
    tools/settings_table.py --write   replace the table in README.md's "Settings (environment variables)"
                                      section with it (tests/test_config.py checks the two are equal)

Runs against the shardc beside this script (no install needed).  A tool script rather than
``python -m shardc.config``: the package imports config itself, so ``-m`` would warn.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Settings (environment variables)"


def write_readme(table: str) -> None:
    readme = REPO / "README.md"
    lines = readme.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == SECTION)
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    last = first
    while last < len(lines) and lines[last].startswith("|"):
        last += 1
    readme.write_text("".join(lines[:first]) + table + "".join(lines[last:]))


def main() -> int:
    sys.path.insert(0, str(REPO))
    from shardc.config import render_markdown

    table = render_markdown()
    if sys.argv[1:] == ["--write"]:
        write_readme(table)
    elif sys.argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
