"""Temporary directories owned by this process, and their cleanup after a crash.

A front end that keeps data in files for a while (the tables' temporary part
files, ``auto_table_mode="row_groups"``) makes its directory with
:func:`owned_tempdir`: ``shardc-<kind>.<pid>.<start>.<token>`` in
``SHARDC_TMPDIR``, where ``start`` is the process's start time (Linux: field
22 of ``/proc/<pid>/stat``, in clock ticks since boot; elsewhere 0).  Its owner
removes it when done; if the owner is SIGKILLed, :func:`sweep` (run by the
janitor, ``shardc.segment.janitor``, when a pool starts) removes every such
directory whose owner is gone: no process with that pid, or one with another
start time (the pid was reused).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil

from . import config

_NAME = re.compile(r"^shardc-(\w+)\.(\d+)\.(\d+)\.[0-9a-f]+$")


def start_time(pid: int) -> int:
    """The start time of process ``pid`` (clock ticks since boot; 0 where not
    known, -1 if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return -1 if os.path.isdir("/proc/self") else _alive_or_gone(pid)
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _alive_or_gone(pid: int) -> int:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return -1
    except PermissionError:
        return 0
    return 0


def owned_tempdir(kind: str) -> str:
    """Make and return a new directory owned by this process (see the module docstring)."""
    pid = os.getpid()
    path = os.path.join(
        config.get_str("SHARDC_TMPDIR"), f"shardc-{kind}.{pid}.{start_time(pid)}.{secrets.token_hex(4)}"
    )
    os.makedirs(path, mode=0o700)
    return path


def sweep() -> list[str]:
    """Remove the owned temporary directories of processes that are gone;
    returns their paths."""
    folder = config.get_str("SHARDC_TMPDIR")
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    uid = os.getuid()
    removed = []
    for entry in entries:
        m = _NAME.match(entry)
        if m is None:
            continue
        pid, start = int(m.group(2)), int(m.group(3))
        now = start_time(pid)
        if now != -1 and (now == start or now == 0 or start == 0):
            continue  # the owner (or, without start times, some process with its pid) lives
        full = os.path.join(folder, entry)
        try:
            if os.stat(full).st_uid != uid:
                continue
        except OSError:
            continue
        shutil.rmtree(full, ignore_errors=True)
        if not os.path.exists(full):
            removed.append(full)
    return removed
