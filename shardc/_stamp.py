"""Build stamp: one definition shared by the build script and the import check.

``csrc/ffi_build.py`` loads this file by path (the package is not importable
while it builds) and compiles the stamp into ``shardc._native``;
``shardc._lowlevel`` recomputes it from the source tree, when there is one, to
catch a native module that is older than the C sources beside it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def compute_stamp(csrc: Path, version: str) -> str:
    """Return ``"<version>+<hash of csrc/*.c, *.h and ffi_build.py>"``."""
    h = hashlib.sha256()
    files = sorted([*csrc.glob("*.c"), *csrc.glob("*.h"), csrc / "ffi_build.py"], key=lambda p: p.name)
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return f"{version}+{h.hexdigest()[:16]}"
