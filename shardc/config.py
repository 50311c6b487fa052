"""Every ``SHARDC_*`` environment variable shardc reads, in one table (a leaf module).

:data:`SETTINGS` lists each variable once: its type, its default and what it
does.  Code never reads ``os.environ`` for a ``SHARDC_*`` name itself; it asks
this module, which parses and validates the value and, for a bad one, raises
:class:`~shardc.errors.InvalidArgumentError` naming the variable and the form
it expects::

    limit = config.get_float("SHARDC_SETUP_TIMEOUT")   # 120.0 unless set
    backing = config.get_str("SHARDC_BACKING")         # "auto", "memfd", ...

Values are read from the environment on every call (nothing is cached), so a
variable changed at run time, or by a test's ``monkeypatch.setenv``, takes
effect at the next read.  An empty value counts as unset.

``render_markdown()`` (or ``tools/settings_table.py``) gives the table as Markdown; the README's
"Settings (environment variables)" section is that output, and a test keeps
the two equal.

This module imports nothing of shardc but :mod:`shardc.errors`.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
from dataclasses import dataclass

from .errors import InvalidArgumentError

__all__ = [
    "Setting",
    "SETTINGS",
    "setting",
    "get_int",
    "get_optional_int",
    "get_float",
    "get_bool",
    "get_str",
    "is_set",
    "default_workers",
    "render_markdown",
]

_TRUE = ("1", "yes", "on", "true", "always")
_FALSE = ("0", "no", "off", "false", "never")

Value = int | float | bool | str


@dataclass(frozen=True)
class Setting:
    """One environment variable.

    Attributes:
        name: the variable, ``SHARDC_...``.
        kind: how the value is parsed: ``int``, ``float``, ``bool``, ``choice``
            (one of ``choices``, case-insensitive), ``path`` or ``signal`` (a
            name such as ``SIGUSR2`` or a number; parsed to the number).
        default: the value when unset; None when it is computed elsewhere
            (``default_doc`` says how) or there is none.
        meaning: one sentence for the table.
        default_doc: how the default is shown in the table, if not ``default``.
        minimum, maximum: bounds of an ``int``/``float`` (inclusive), if any.
        exclusive_minimum: the value must be strictly greater than ``minimum``.
        choices: the allowed values of a ``choice``.
        scope: who reads it: ``runtime`` (the package and its workers),
            ``build`` (``csrc/ffi_build.py``), ``bench`` (the C benchmarks) or
            ``worker`` (set by shardc in each worker, for ``fun`` to read).
    """

    name: str
    kind: str
    default: Value | None
    meaning: str
    default_doc: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()
    scope: str = "runtime"

    def expected(self) -> str:
        """The form a value must have, for error messages and the table."""
        if self.kind == "bool":
            return "a boolean: " + "/".join(_TRUE[:4]) + " or " + "/".join(_FALSE[:4])
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind == "signal":
            return "a signal name (e.g. SIGUSR2) or number"
        if self.kind == "path":
            return "a directory"
        what = "an integer" if self.kind == "int" else "a number"
        if self.minimum is not None and self.maximum is not None:
            return f"{what} in [{_num(self.minimum)}, {_num(self.maximum)}]"
        if self.minimum is not None:
            return f"{what} {'>' if self.exclusive_minimum else '>='} {_num(self.minimum)}"
        return what


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# Runtime settings by topic, then the other scopes; the README's table is rendered from this.
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "SHARDC_BACKING",
            "choice",
            "auto",
            "default segment backing: `auto` (memfd, then shm, then file, with the reason logged), "
            "`memfd`, `shm`, `file`; an explicit `backing=` wins",
            choices=("auto", "memfd", "shm", "file"),
        ),
        Setting(
            "SHARDC_TMPDIR",
            "path",
            None,
            "directory for `file` segments, file-backed task rings and the janitor's owner files",
            default_doc="the temp dir",
        ),
        Setting(
            "SHARDC_PORTABLE",
            "bool",
            False,
            "`1` (Linux): take the paths of platforms without Linux's extras, to test them here: POSIX shm "
            "segments instead of memfd, no parent-death signal (workers see the master's death as their "
            "socket's EOF), memory sampled through psutil, and the polling wait instead of futexes "
            "(read at import)",
        ),
        Setting(
            "SHARDC_WORKERS",
            "int",
            None,
            "default pool size",
            default_doc="usable CPUs - 1, at least 1 (affinity and cgroup quota respected)",
            minimum=1,
        ),
        Setting(
            "SHARDC_SETUP_TIMEOUT",
            "float",
            120.0,
            "seconds a worker may take to load `fun` and map the inputs of a call before it is killed "
            "and the call fails with `CallSetupTimeoutError`",
            minimum=0,
            exclusive_minimum=True,
        ),
        Setting(
            "SHARDC_INHERIT",
            "bool",
            True,
            "`0` turns off inheriting big borrowed arrays at fork (they are copied into a segment instead)",
        ),
        Setting(
            "SHARDC_FORK_SERVER",
            "bool",
            None,
            'where pools with `fork_mode="auto"` (the default) get their workers: `1` always from a '
            "fork server (a single-threaded process started by exec), `0` always by forking the caller; "
            "unset: from the fork server while the caller has other threads alive",
            default_doc="unset",
        ),
        Setting(
            "SHARDC_ZYGOTE",
            "bool",
            True,
            'a pool with `fork_mode="auto"` that forks its workers directly also forks a *zygote* (a '
            "single-threaded fork server copied from the caller at pool start) that starts the pool's "
            "later workers while the caller has other threads; `0`: those come from a fork server "
            "started by exec instead (an interpreter importing the caller's modules)",
        ),
        Setting(
            "SHARDC_INHERIT_MIN_BYTES",
            "int",
            64 * 1024**2,
            "smallest plain array (bytes) inherited at fork instead of copied",
            default_doc="67108864 (64 MiB)",
            minimum=0,
        ),
        Setting(
            "SHARDC_RECYCLE_MIN_BYTES",
            "int",
            32 * 1024**2,
            "memory growth (bytes) below this never counts as drift",
            default_doc="33554432 (32 MiB)",
            minimum=0,
        ),
        Setting(
            "SHARDC_WORKER_SCHED",
            "choice",
            "batch",
            "Linux scheduling policy of the workers: `batch` (`SCHED_BATCH`: a worker woken by the "
            "master does not preempt it, so the master hands every worker its work before any runs; "
            "same CPU share as `normal`) or `normal` (`SCHED_OTHER`)",
            choices=("batch", "normal"),
        ),
        Setting(
            "SHARDC_HEAP_REUSE",
            "bool",
            True,
            "`0`: workers return freed memory to the kernel at once (glibc's default) instead of keeping "
            "it for their next shards during a call",
        ),
        Setting(
            "SHARDC_LEGACY_SEEDING",
            "choice",
            "lazy",
            "with `seed=`: how workers seed `random` and `np.random` per shard. `lazy`: a generator only "
            "once the function is seen drawing from it (a run of shards found drawing unseeded runs again, "
            "seeded); `eager`: both before every shard (no shard ever runs twice). Read by each worker at "
            "its first seeded call",
            choices=("lazy", "eager"),
        ),
        Setting(
            "SHARDC_GUARD_SIGNAL",
            "signal",
            int(signal.SIGUSR2),
            "signal the page guards use to raise a deny error in Python",
            default_doc="SIGUSR2",
        ),
        Setting(
            "SHARDC_GUARD_PAGES_PER_REGION",
            "int",
            256,
            "pages of one borrowed input tracked one by one before it is tracked as a whole",
            minimum=0,
            maximum=1024,
        ),
        Setting(
            "SHARDC_GUARD_PAGES_TOTAL",
            "int",
            8192,
            "pages of all borrowed inputs together tracked one by one",
            minimum=0,
            maximum=2**31 - 1,
        ),
        Setting(
            "SHARDC_SKIP_STAMP_CHECK",
            "bool",
            False,
            "load a native module built from other C sources (development only)",
        ),
        Setting(
            "SHARDC_WORKER",
            "int",
            None,
            "set by shardc in each worker to its slot number (0, 1, ...); unset in the caller",
            default_doc="unset",
            minimum=0,
            scope="worker",
        ),
        Setting(
            "SHARDC_PORTABLE_WAIT",
            "bool",
            False,
            "at build time (`csrc/ffi_build.py`): build only the polling wait, as on a platform "
            "without futex or ulock (the C tests' portable variant)",
            scope="build",
        ),
        Setting(
            "SHARDC_BENCH_WAKE_CYCLES",
            "int",
            10**7,
            "park/wake cycles in `bench/run.sh`",
            default_doc="10^7; 10^5 with `--quick`",
            minimum=1,
            scope="bench",
        ),
    )
}


def _spec(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise InvalidArgumentError(f"{name!r} is not a shardc setting; known: {', '.join(SETTINGS)}") from None


def is_set(name: str) -> bool:
    """True if the variable ``name`` is set to a non-blank value."""
    _spec(name)
    return bool(os.environ.get(name, "").strip())


def _bad(spec: Setting, raw: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{spec.name}={raw!r} is not valid; expected {spec.expected()}")


def _parse(spec: Setting, raw: str) -> Value:
    text = raw.strip()
    if spec.kind == "bool":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _bad(spec, raw)
    if spec.kind == "choice":
        low = text.lower()
        if low not in spec.choices:
            raise _bad(spec, raw)
        return low
    if spec.kind == "path":
        return text
    if spec.kind == "signal":
        if text.isdigit():
            return int(text)
        try:
            return int(signal.Signals[text.upper()])
        except KeyError:
            raise _bad(spec, raw) from None
    number: int | float
    try:
        number = int(text) if spec.kind == "int" else float(text)
    except ValueError:
        raise _bad(spec, raw) from None
    if spec.kind == "float" and number != number:  # NaN passes no bound
        raise _bad(spec, raw)
    if spec.minimum is not None and (number < spec.minimum or (spec.exclusive_minimum and number == spec.minimum)):
        raise _bad(spec, raw)
    if spec.maximum is not None and number > spec.maximum:
        raise _bad(spec, raw)
    return number


def setting(name: str) -> Value | None:
    """The parsed value of the variable ``name``, or its default when it is unset.

    Raises:
        InvalidArgumentError: ``name`` is not in :data:`SETTINGS`, or its value
            does not parse; the message names the variable and the expected form.
    """
    raw = os.environ.get(name, "")
    hit = _parsed.get(name)
    if hit is not None and hit[0] == raw:  # read again as set: the value parsed last time
        return hit[1]
    spec = _spec(name)
    if not raw.strip():
        if spec.kind == "path" and spec.default is None:
            return tempfile.gettempdir()
        value = spec.default
    else:
        value = _parse(spec, raw)
    _parsed[name] = (raw, value)
    return value


# name -> (the raw text last read, its value): the engine reads a dozen settings
# per call, and parsing each again cost more than reading the environment.
_parsed: dict[str, tuple[str, Value | None]] = {}


def _typed(name: str, kinds: tuple[str, ...]) -> Value | None:
    spec = _spec(name)
    if spec.kind not in kinds:
        raise InvalidArgumentError(f"{name} is a {spec.kind} setting, not one of {', '.join(kinds)}")
    return setting(name)


def _required(name: str, value: Value | None) -> Value:
    if value is None:
        raise InvalidArgumentError(f"{name} has no default; check is_set({name!r}) or use get_optional_int")
    return value


def get_optional_int(name: str) -> int | None:
    """An ``int`` or ``signal`` setting; None when it is unset and has no default."""
    value = _typed(name, ("int", "signal"))
    return None if value is None else int(value)


def get_int(name: str) -> int:
    """An ``int`` or ``signal`` setting (a signal as its number)."""
    return int(_required(name, _typed(name, ("int", "signal"))))


def get_float(name: str) -> float:
    """A ``float`` (or ``int``) setting."""
    return float(_required(name, _typed(name, ("float", "int"))))


def get_bool(name: str) -> bool:
    """A ``bool`` setting."""
    return bool(_required(name, _typed(name, ("bool",))))


def get_str(name: str) -> str:
    """A ``choice`` (lower-cased) or ``path`` setting."""
    return str(_required(name, _typed(name, ("choice", "path"))))


def default_workers() -> int:
    """``SHARDC_WORKERS``, else its computed default: ``max(1, usable CPUs - 1)``,
    where usable CPUs honours the affinity mask and a cgroup v2 CPU quota."""
    n = get_optional_int("SHARDC_WORKERS")
    if n is not None:
        return n
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus - 1)


def _cgroup_cpus() -> int | None:
    """CPUs allowed by a cgroup v2 quota (``cpu.max``), rounded up; None without one."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def _default_cell(spec: Setting) -> str:
    if spec.default_doc is not None:
        return spec.default_doc
    if isinstance(spec.default, bool):
        return "`1`" if spec.default else "`0`"
    if isinstance(spec.default, float) and spec.default.is_integer():
        return f"`{int(spec.default)}`"
    return f"`{spec.default}`"


def _type_cell(spec: Setting) -> str:
    if spec.kind == "choice":
        return "choice"
    if spec.kind in ("int", "float") and (spec.minimum is not None or spec.maximum is not None):
        return spec.expected().replace("an integer", "int").replace("a number", "float")
    return {"bool": "bool", "path": "directory", "signal": "signal", "int": "int", "float": "float"}[spec.kind]


def render_markdown() -> str:
    """The settings table as Markdown (the README's copy must equal it)."""
    rows = SETTINGS.values()
    lines = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    for s in rows:
        lines.append(f"| `{s.name}` | {_type_cell(s)} | {_default_cell(s)} | {s.meaning} |")
    return "\n".join(lines) + "\n"
