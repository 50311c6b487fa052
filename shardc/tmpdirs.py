"""Temporary directories owned by this process, and their cleanup after a crash.

A front end that keeps data in files for a while (the tables' temporary part
files, ``auto_table_mode="row_groups"``) makes its directory with
:func:`owned_tempdir`: ``shardc-<kind>.<pid>.<start>.<token>`` in this user's
folder ``shardc-owned-<uid>`` of ``SHARDC_TMPDIR`` (mode 0700; made on first
use), where ``start`` is the process's start time (Linux: field 22 of
``/proc/<pid>/stat``, in clock ticks since boot; elsewhere 0).  Its owner
removes it when done; if the owner is SIGKILLed, :func:`sweep` removes every
such directory whose owner is gone: no process with that pid, or one with
another start time (the pid was reused).  A directory of a live process is
never touched, and only these names are: a persistent ``auto_table_path`` is
the user's and never swept.

When it runs:

* ``import shardc`` calls :func:`sweep_at_import`: it lists this user's folder
  only (one failed ``listdir`` when no table was ever spilled, a few
  ``/proc/<pid>/stat`` reads otherwise), so the import costs nothing
  measurable; it never raises.
* The janitor (``shardc.segment.janitor``, when the first pool starts) calls
  :func:`sweep`, which also looks at ``SHARDC_TMPDIR`` itself, where such
  directories went when the user's folder could not be used (made by another
  user, or a symlink: then it is left alone).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import stat
import tempfile

from . import config

log = logging.getLogger("shardc")

_NAME = re.compile(r"^shardc-(\w+)\.(\d+)\.(\d+)\.[0-9a-f]+$")


def start_time(pid: int) -> int:
    """The start time of process ``pid`` (clock ticks since boot; 0 where not
    known, -1 if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except FileNotFoundError:
        return -1 if os.path.isdir("/proc/self") else _alive_or_gone(pid)
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return int(stat_line[stat_line.rindex(b")") + 2 :].split()[19])


def _alive_or_gone(pid: int) -> int:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return -1
    except PermissionError:
        return 0
    return 0


def _root() -> str:
    return config.get_str("SHARDC_TMPDIR")


def _cheap_root() -> str:
    """``SHARDC_TMPDIR`` without the file that ``tempfile.gettempdir()``'s first
    call creates to test the candidates (a few hundred microseconds at import):
    the first existing candidate directory.  Should it differ from what
    gettempdir picks (an unwritable TMPDIR), the import sweeps a folder
    nobody uses and the janitor sweeps the right one when a pool starts."""
    if os.environ.get("SHARDC_TMPDIR", "").strip() or tempfile.tempdir is not None:
        return _root()
    env = [os.environ.get(v) for v in ("TMPDIR", "TEMP", "TMP")]
    for cand in [*env, "/tmp", "/var/tmp", "/usr/tmp"]:
        if cand and os.path.isdir(cand):
            return os.path.abspath(cand)
    return _root()


def owned_root(root: str | None = None) -> str:
    """This user's folder of owned temporary directories (its path; it may not exist)."""
    return os.path.join(root or _root(), f"shardc-owned-{os.getuid()}")


def _usable(folder: str) -> bool:
    """``folder`` is a real directory of this user that nobody else can write into."""
    try:
        st = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def owned_tempdir(kind: str) -> str:
    """Make and return a new directory owned by this process (see the module docstring)."""
    root = _root()
    folder = owned_root(root)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        folder = root
    if folder != root and not _usable(folder):
        log.warning("%s is not a private directory of this user: temporary tables go to %s", folder, root)
        folder = root
    pid = os.getpid()
    path = os.path.join(folder, f"shardc-{kind}.{pid}.{start_time(pid)}.{secrets.token_hex(4)}")
    os.makedirs(path, mode=0o700)
    return path


def _sweep_folder(folder: str) -> list[str]:
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
            st = os.lstat(full)
        except OSError:
            continue
        if st.st_uid != uid or not stat.S_ISDIR(st.st_mode):
            continue
        shutil.rmtree(full, ignore_errors=True)
        if not os.path.exists(full):
            removed.append(full)
    return removed


def sweep() -> list[str]:
    """Remove the owned temporary directories of processes that are gone
    (in this user's folder and in ``SHARDC_TMPDIR`` itself); returns their paths."""
    root = _root()
    folder = owned_root(root)
    return (_sweep_folder(folder) if _usable(folder) else []) + _sweep_folder(root)


def sweep_at_import() -> None:
    """The cheap sweep run by ``import shardc``: this user's folder only (see
    the module docstring); logs what it removed, never raises."""
    try:
        folder = owned_root(_cheap_root())
        if not _usable(folder):
            return
        for path in _sweep_folder(folder):
            log.info("removed %s, the temporary table directory of a shardc process that died", path)
    except Exception as exc:  # noqa: BLE001 - a cleanup must never break the import
        log.debug("sweep of dead processes' temporary directories failed: %s", exc)
