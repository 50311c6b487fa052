"""The ``auto_table*`` keys of ``dispatch_opts`` (rpc_chunked): defaults and
checks, run by ``shardc.validate.check_dispatch_opts`` before any worker
starts.  A leaf: imports nothing of shardc but errors and units, and not
pyarrow unless a schema is given (then it must be a ``pyarrow.Schema``).

=========================  ==============  ===========================================
key                        default         meaning
=========================  ==============  ===========================================
``auto_table``             False           frames returned by shards go to part files
``auto_table_mode``        "row_groups"    temporary parts / "partitioned": a dataset
``auto_table_path``        None            directory (required for "partitioned")
``auto_table_format``      "auto"          "arrow" (IPC) / "parquet"; auto: arrow for
                                           row_groups, parquet for partitioned; the
                                           reference's "rds" maps to "arrow", "native"
                                           to "parquet"
``auto_table_materialize`` "auto"          "never" (a handle) / "always" (a pyarrow
                                           Table) / "auto" (a Table up to max_bytes)
``auto_table_max_bytes``   256 MiB         the "auto" threshold (Arrow in-memory bytes)
``auto_table_schema``      None            a ``pyarrow.Schema`` every frame must match
=========================  ==============  ===========================================
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import InvalidArgumentError, MissingDependencyError
from ..units import parse_bytes

KEYS = (
    "auto_table",
    "auto_table_mode",
    "auto_table_path",
    "auto_table_format",
    "auto_table_materialize",
    "auto_table_max_bytes",
    "auto_table_schema",
)
MODES = ("row_groups", "partitioned")
FORMATS = ("auto", "arrow", "parquet", "rds", "native")
FORMAT_ALIASES = {"rds": "arrow", "native": "parquet"}  # the R reference's names
MATERIALIZE = ("never", "auto", "always")
DEFAULT_MAX_BYTES = 256 * 1024**2
INSTALL_HINT = "pip install 'shardc[tables]' (it needs pyarrow)"


def require_pyarrow(feature: str) -> Any:
    """The pyarrow module, or MissingDependencyError naming the extra."""
    try:
        import pyarrow
    except ImportError as exc:
        raise MissingDependencyError(f"{feature} needs pyarrow: {INSTALL_HINT}") from exc
    return pyarrow


def _choice(opts: dict[str, Any], key: str, choices: tuple[str, ...], default: str) -> str:
    v = opts.get(key, default)
    if not isinstance(v, str) or v not in choices:
        raise InvalidArgumentError(
            f"dispatch_opts[{key!r}]={v!r} is not supported; use one of: " + ", ".join(repr(c) for c in choices)
        )
    return v


def resolve_format(fmt: str, mode: str) -> str:
    """ "arrow" or "parquet" for a checked ``auto_table_format`` and mode."""
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt == "auto":
        return "arrow" if mode == "row_groups" else "parquet"
    return fmt


def check_auto_table(opts: dict[str, Any]) -> dict[str, Any]:
    """Check the ``auto_table*`` keys of ``opts``; returns ``opts`` with every
    key filled in (defaults), the format resolved to "arrow"/"parquet" and
    the byte limit an int.  Options other than ``auto_table`` without
    ``auto_table=True`` are an error (they would silently do nothing)."""
    on = opts.get("auto_table", False)
    if not isinstance(on, bool):
        raise InvalidArgumentError(f"dispatch_opts['auto_table'] must be True or False, got {on!r}")
    if not on:
        extra = sorted(k for k in opts if k in KEYS and k != "auto_table")
        if extra:
            raise InvalidArgumentError(f"dispatch_opts {extra} only apply with dispatch_opts['auto_table']=True")
        return opts
    out = dict(opts)
    mode = _choice(opts, "auto_table_mode", MODES, "row_groups")
    fmt = _choice(opts, "auto_table_format", FORMATS, "auto")
    out["auto_table_mode"] = mode
    out["auto_table_format"] = resolve_format(fmt, mode)
    out["auto_table_materialize"] = _choice(opts, "auto_table_materialize", MATERIALIZE, "auto")
    mb = parse_bytes(opts.get("auto_table_max_bytes", DEFAULT_MAX_BYTES), "dispatch_opts['auto_table_max_bytes']")
    out["auto_table_max_bytes"] = mb if mb is not None else 2**62
    path = opts.get("auto_table_path")
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgumentError(f"dispatch_opts['auto_table_path'] must be a directory path, got {path!r}")
        path = os.path.abspath(os.fspath(path))
        if os.path.exists(path) and not os.path.isdir(path):
            raise InvalidArgumentError(f"dispatch_opts['auto_table_path']={path!r} exists and is not a directory")
        if os.path.isdir(path) and any(not e.startswith(".") for e in os.listdir(path)):
            raise InvalidArgumentError(
                f"dispatch_opts['auto_table_path']={path!r} is not empty; give a new or empty directory "
                "(a dataset's parts must not mix with other files)"
            )
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise InvalidArgumentError(
                f"dispatch_opts['auto_table_path']={path!r}: {parent!r} is not a writable directory"
            )
    elif mode == "partitioned":
        raise InvalidArgumentError(
            "dispatch_opts['auto_table_mode']='partitioned' writes a persistent dataset: give its "
            "directory as dispatch_opts['auto_table_path']"
        )
    out["auto_table_path"] = path
    pa = require_pyarrow("dispatch_opts['auto_table']")
    schema = opts.get("auto_table_schema")
    if schema is not None and not isinstance(schema, pa.Schema):
        raise InvalidArgumentError(
            f"dispatch_opts['auto_table_schema'] must be a pyarrow.Schema (e.g. shardc.tables.schema("
            f"x=pa.float64())), got {type(schema).__name__}"
        )
    out["auto_table_schema"] = schema
    return out
