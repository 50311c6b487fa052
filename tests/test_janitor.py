"""The janitor removes shm/file segments that dead shardc masters left behind,
and nothing that belongs to a live process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import shardc
from shardc import segment

pytestmark = pytest.mark.timeout(60)

_LEAVE_NAMED = r"""
import os, shardc
b = shardc.buffer("f8", 1000, name="shardc-jt-%d" % os.getpid(), backing={backing!r})
print(b.path, flush=True)
os.kill(os.getpid(), 9)
"""


def _dead_pid() -> int:
    """A pid that is certainly not running (a child that already exited)."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


@pytest.mark.parametrize("backing", ["shm", "file"])
def test_named_segment_of_a_killed_master_is_removed(backing: str, tmp_path, monkeypatch) -> None:
    """A named buffer whose creator was SIGKILLed is unlinked by the next janitor run."""
    monkeypatch.setenv("SHARDC_TMPDIR", str(tmp_path))
    code = _LEAVE_NAMED.format(backing=backing)
    if backing == "file":
        code = code.replace('"shardc-jt-%d" % os.getpid()', f'"{tmp_path}/shardc-jt-%d" % os.getpid()')
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "SHARDC_TMPDIR": str(tmp_path)},
        timeout=30,
    )
    assert proc.returncode == -9, proc.stderr
    path = proc.stdout.strip()
    where = "/dev/shm" + path if backing == "shm" else path
    assert os.path.exists(where)
    removed = segment.janitor()
    assert path in removed
    assert not os.path.exists(where)


def test_anonymous_leftovers_of_dead_pids_are_removed(tmp_path, monkeypatch) -> None:
    """Anonymous-segment names of a dead pid go; those of a live pid stay."""
    monkeypatch.setenv("SHARDC_TMPDIR", str(tmp_path))
    dead = _dead_pid()
    stale = tmp_path / f"shardc.in.{dead}.abc123.7"
    live = tmp_path / f"shardc.in.{os.getpid()}.abc123.8"
    other = tmp_path / "shardc-unrelated.txt"
    for f in (stale, live, other):
        f.write_bytes(b"x")
    removed = segment.janitor()
    assert str(stale) in removed
    assert not stale.exists() and live.exists() and other.exists()


def test_live_named_segment_is_kept(tmp_path, monkeypatch) -> None:
    """A named buffer of this (live) process survives the janitor and is unlinked on close."""
    monkeypatch.setenv("SHARDC_TMPDIR", str(tmp_path))
    b = shardc.buffer("i4", 10, name=f"shardc-jt-live-{os.getpid()}", backing="shm")
    try:
        assert b.path not in segment.janitor()
        assert os.path.exists("/dev/shm" + b.path)
    finally:
        b.close()
    assert not os.path.exists("/dev/shm" + b.path)
    assert not os.path.exists(segment._owner_file())
