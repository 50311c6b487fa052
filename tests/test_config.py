"""shardc.config: the one table of SHARDC_* settings, its parsing, and the README's copy of it."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import shardc
from shardc import config
from shardc.errors import InvalidArgumentError, ShardcError

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Settings (environment variables)"


def _readme_table() -> str:
    text = (REPO / "README.md").read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    body = text.split(SECTION, 1)[1]
    rows = []
    for line in body.splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return "\n".join(rows) + "\n"


def test_readme_table_equals_rendering() -> None:
    """The README's settings table is exactly what render_markdown() prints (it cannot go stale)."""
    assert _readme_table() == config.render_markdown(), (
        "README.md's settings table differs from shardc/config.py: run tools/settings_table.py --write"
    )


def test_tool_prints_and_writes_the_table(tmp_path: Path) -> None:
    """tools/settings_table.py prints the table, and --write puts it into a README in place of an old one."""
    env = dict(os.environ, SHARDC_SKIP_STAMP_CHECK="1")
    tool = REPO / "tools" / "settings_table.py"
    out = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert out.stdout == config.render_markdown() and not out.stderr
    # --write on a copy of the tree's README with a stale table
    fake = tmp_path / "repo"
    (fake / "tools").mkdir(parents=True)
    (fake / "tools" / "settings_table.py").write_text(tool.read_text())
    (fake / "shardc").symlink_to(REPO / "shardc")
    (fake / "README.md").write_text(f"# x\n\n{SECTION}\n\nintro\n\n| old | table |\n|---|---|\n\nafter\n")
    subprocess.run(
        [sys.executable, str(fake / "tools" / "settings_table.py"), "--write"], env=env, timeout=60, check=True
    )
    text = (fake / "README.md").read_text()
    assert text == f"# x\n\n{SECTION}\n\nintro\n\n{config.render_markdown()}\nafter\n"


def _env_names_in_source() -> set[str]:
    """Every SHARDC_* name read from (or written to) the environment in shardc/ and csrc/."""
    names: set[str] = set()
    py_read = re.compile(r"""(?:environ(?:\.get)?\s*[\[(]|getenv\s*\()\s*["'](SHARDC_[A-Z0-9_]+)""")
    config_read = re.compile(r"""config\.(?:get_\w+|setting|is_set)\(\s*["'](SHARDC_[A-Z0-9_]+)""")
    c_read = re.compile(r"""getenv\(\s*"(SHARDC_[A-Z0-9_]+)""")
    for path in list((REPO / "shardc").rglob("*.py")) + list((REPO / "csrc").glob("*.py")):
        text = path.read_text()
        names.update(py_read.findall(text))
        names.update(config_read.findall(text))
    for path in list((REPO / "csrc").glob("*.[ch]")) + list((REPO / "bench").rglob("*.c")):
        names.update(c_read.findall(path.read_text()))
    return names


def test_every_variable_read_is_in_the_table() -> None:
    """Every SHARDC_* variable read in shardc/, csrc/ or the C benchmarks has a row in the table."""
    missing = _env_names_in_source() - set(config.SETTINGS)
    assert not missing, f"SHARDC_* variables read but missing from shardc/config.py: {sorted(missing)}"


def test_config_is_a_leaf() -> None:
    """config imports nothing of shardc but shardc.errors."""
    tree = ast.parse((REPO / "shardc" / "config.py").read_text())
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("shardc")):
            inner.add(node.module or "")
        elif isinstance(node, ast.Import):
            inner.update(a.name for a in node.names if a.name.startswith("shardc"))
    assert inner <= {"errors", "shardc.errors"}, inner


def test_defaults_when_unset_or_blank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset or blank variables give the table's default (the temp dir for SHARDC_TMPDIR)."""
    for name in config.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert config.get_float("SHARDC_SETUP_TIMEOUT") == 120.0
    assert config.get_str("SHARDC_BACKING") == "auto"
    assert config.get_bool("SHARDC_INHERIT") is True
    assert config.get_int("SHARDC_GUARD_SIGNAL") == signal.SIGUSR2
    assert config.get_int("SHARDC_GUARD_PAGES_PER_REGION") == 256
    assert config.get_str("SHARDC_TMPDIR") == tempfile.gettempdir()
    assert config.get_optional_int("SHARDC_WORKERS") is None and not config.is_set("SHARDC_WORKERS")
    monkeypatch.setenv("SHARDC_SETUP_TIMEOUT", "  ")
    assert config.get_float("SHARDC_SETUP_TIMEOUT") == 120.0


def test_values_are_parsed_and_read_live(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values are parsed per kind and re-read on every call (nothing cached)."""
    monkeypatch.setenv("SHARDC_SETUP_TIMEOUT", "2.5")
    assert config.get_float("SHARDC_SETUP_TIMEOUT") == 2.5
    monkeypatch.setenv("SHARDC_SETUP_TIMEOUT", "7")
    assert config.get_float("SHARDC_SETUP_TIMEOUT") == 7.0
    monkeypatch.setenv("SHARDC_BACKING", " FILE ")
    assert config.get_str("SHARDC_BACKING") == "file"
    for raw, want in (("0", False), ("off", False), ("Never", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("SHARDC_INHERIT", raw)
        assert config.get_bool("SHARDC_INHERIT") is want
    monkeypatch.setenv("SHARDC_GUARD_SIGNAL", "sigusr1")
    assert config.get_int("SHARDC_GUARD_SIGNAL") == signal.SIGUSR1
    monkeypatch.setenv("SHARDC_GUARD_SIGNAL", "12")
    assert config.get_int("SHARDC_GUARD_SIGNAL") == 12
    monkeypatch.setenv("SHARDC_WORKERS", "3")
    assert config.get_optional_int("SHARDC_WORKERS") == 3 and config.setting("SHARDC_WORKERS") == 3


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("SHARDC_SETUP_TIMEOUT", "soon", "a number > 0"),
        ("SHARDC_SETUP_TIMEOUT", "0", "a number > 0"),
        ("SHARDC_SETUP_TIMEOUT", "nan", "a number > 0"),
        ("SHARDC_WORKERS", "0", "an integer >= 1"),
        ("SHARDC_WORKERS", "2.5", "an integer >= 1"),
        ("SHARDC_BACKING", "ramdisk", "one of auto, memfd, shm, file"),
        ("SHARDC_INHERIT", "maybe", "a boolean"),
        ("SHARDC_GUARD_SIGNAL", "SIGNOPE", "a signal name"),
        ("SHARDC_GUARD_PAGES_PER_REGION", "5000", "an integer in [0, 1024]"),
    ],
)
def test_bad_values_name_the_variable_and_form(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str, expected: str
) -> None:
    """A bad value raises InvalidArgumentError (a ValueError) naming the variable, value and expected form."""
    monkeypatch.setenv(name, raw)
    with pytest.raises(InvalidArgumentError) as info:
        config.setting(name)
    msg = str(info.value)
    assert f"{name}={raw!r}" in msg and expected in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, ShardcError)


def test_unknown_name_and_wrong_kind_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking for an unknown variable or with the wrong typed accessor is an error, not a silent None."""
    with pytest.raises(InvalidArgumentError, match="not a shardc setting"):
        config.setting("SHARDC_NOPE")
    with pytest.raises(InvalidArgumentError, match="SHARDC_BACKING is a choice setting"):
        config.get_int("SHARDC_BACKING")
    monkeypatch.delenv("SHARDC_WORKERS", raising=False)
    with pytest.raises(InvalidArgumentError, match="no default"):
        config.get_int("SHARDC_WORKERS")


def test_guard_and_inherit_read_through_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The modules that read settings get them (and their validation) from config."""
    from shardc import inherit, segment

    monkeypatch.setenv("SHARDC_INHERIT", "off")
    assert inherit.enabled() is False
    monkeypatch.setenv("SHARDC_INHERIT_MIN_BYTES", "0")
    assert inherit.min_bytes() == 1
    monkeypatch.setenv("SHARDC_INHERIT_MIN_BYTES", "lots")
    with pytest.raises(InvalidArgumentError, match="SHARDC_INHERIT_MIN_BYTES='lots'"):
        inherit.min_bytes()
    monkeypatch.setenv("SHARDC_BACKING", "Shm")
    assert segment.default_backing() == "shm"


def test_default_workers_matches_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """config.default_workers() is SHARDC_WORKERS, else usable CPUs - 1 (at least 1), and it is the pool's default size."""
    import os

    monkeypatch.delenv("SHARDC_WORKERS", raising=False)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = config._cgroup_cpus()
    expected = max(1, (cpus if quota is None else min(cpus, quota)) - 1)
    assert config.default_workers() == expected >= 1
    monkeypatch.setenv("SHARDC_WORKERS", "1")
    with shardc.Pool() as p:
        assert p.size == 1
    monkeypatch.setenv("SHARDC_WORKERS", "5")
    assert config.default_workers() == 5
    monkeypatch.setenv("SHARDC_WORKERS", "-1")
    with pytest.raises(InvalidArgumentError, match="SHARDC_WORKERS='-1'"):
        config.default_workers()
