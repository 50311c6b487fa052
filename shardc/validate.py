"""Argument checks for ``shard_map``: everything that can be checked before a
worker starts is checked here, and every message names the culprit and says
how to fix it."""

from __future__ import annotations

import inspect
import io
import logging
import numbers
import types
from collections.abc import Callable
from typing import Any

import cloudpickle
import numpy as np

from . import inherit as _inherit
from .buffer import Buffer
from .errors import BindingError, InvalidArgumentError, UnpicklableFunctionError
from .segment import find_address
from .shards import ShardDescriptor, parse_count
from .shards import shards as make_shards
from .share import Shared, array_extent
from .tables.options import KEYS as AUTO_TABLE_KEYS  # the tables' option names (no pyarrow)

log = logging.getLogger("shardc")

COW_MODES = ("deny", "audit", "allow")
DISPATCH_MODES = ("rpc_chunked", "shm_queue")
DISPATCH_OPTS = {
    "rpc_chunked": {"prefetch", *AUTO_TABLE_KEYS},
    "shm_queue": {"block_size", "queue_backing", "error_log", "error_log_max_lines", "claim_batch"},
}


def check_int(value: Any, arg: str, minimum: int) -> int:
    if type(value) is int and value >= minimum:  # (no ABC check for the usual case)
        return value
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise InvalidArgumentError(f"{arg} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise InvalidArgumentError(f"{arg} must be >= {minimum}, got {value!r}")
    return int(value)


def check_packages(packages: Any) -> list[str]:
    """``packages=``: None or a list/tuple of module names; returns a list."""
    if packages is None:
        return []
    if not isinstance(packages, (list, tuple)) or not all(isinstance(p, str) for p in packages):
        raise InvalidArgumentError(f"packages must be a list of module names, e.g. ['scipy.stats'], got {packages!r}")
    return list(packages)


def check_choice(value: Any, arg: str, choices: tuple[str, ...]) -> str:
    # Type first: `in` compares with ==, which an array answers elementwise.
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(
            f"{arg}={value!r} is not supported; use one of: " + ", ".join(repr(c) for c in choices)
        )
    return value


def resolve_shards(shards: Any) -> tuple[ShardDescriptor, bool]:
    """``(descriptor, is_scalar_n)``; an int N means N single-item shards."""
    if isinstance(shards, ShardDescriptor):
        return shards, False
    if type(shards) is int and shards >= 1:  # (the common case, without the ABC checks: ~10 us a call)
        return ShardDescriptor(shards, 1, "contiguous", shards), True
    if isinstance(shards, (numbers.Integral, np.integer, str)) and not isinstance(shards, bool):
        n = parse_count(shards, "shards")
        return make_shards(n, block_size=1), True
    raise InvalidArgumentError(
        f"shards must be an int N or a descriptor from shards()/shards_list(), got {type(shards).__name__}"
    )


def check_names(d: Any, arg: str) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise InvalidArgumentError(f"{arg} must be a dict of name -> object, got {type(d).__name__}")
    for k in d:
        if not isinstance(k, str) or not k.isidentifier():
            raise InvalidArgumentError(
                f"{arg} keys must be valid Python identifiers (they become keyword arguments of fun), got {k!r}"
            )
    return dict(d)


def check_out(out: dict[str, Any]) -> None:
    for name, obj in out.items():
        if isinstance(obj, Buffer):
            if obj.closed:
                raise InvalidArgumentError(f"out[{name!r}] is a closed buffer")
            continue
        if isinstance(obj, np.ndarray) and find_address(*array_extent(obj)) is not None:
            continue
        raise InvalidArgumentError(
            f"out[{name!r}] must be a shardc.buffer(...) (or a view of one), got "
            f"{type(obj).__name__}: a plain array lives only in this process, so worker writes "
            "would be lost; create it with shardc.buffer(dtype, shape)"
        )


_BOUND_OK: set[Any] = set()  # plain functions (code, defaults, names, what) that passed check_binding


def check_binding(fun: Callable[..., Any], names: list[str], what: str) -> None:
    """``fun(shard, **{name: ...})`` must bind for every name.  A plain
    function's answer is kept by its code, defaults and the names (its
    signature is a function of those alone): ``inspect.signature`` cost
    ~20 us of every call."""
    key = None
    if type(fun) is types.FunctionType and not hasattr(fun, "__wrapped__") and not hasattr(fun, "__signature__"):
        key = (
            fun.__code__,
            fun.__defaults__,
            fun.__kwdefaults__ and tuple(fun.__kwdefaults__.items()),
            tuple(names),
            what,
        )
        try:
            if key in _BOUND_OK:
                return
        except TypeError:  # an unhashable default
            key = None
    _check_binding(fun, names, what)
    if key is not None:
        if len(_BOUND_OK) > 256:
            _BOUND_OK.clear()
        _BOUND_OK.add(key)


def _check_binding(fun: Callable[..., Any], names: list[str], what: str) -> None:
    try:
        sig = inspect.signature(fun)
    except (TypeError, ValueError):
        return  # builtins without signatures: cannot check here
    params = list(sig.parameters.values())
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    has_var_pos = any(p.kind is p.VAR_POSITIONAL for p in params)
    if not positional and not has_var_pos:
        raise BindingError(
            f"{what} must take the shard as its first argument: def f(shard, ...), but its signature is {sig}"
        )
    accepted = {p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if positional and positional[0].kind is positional[0].POSITIONAL_OR_KEYWORD and positional[0] is params[0]:
        accepted.discard(params[0].name)
    for n in names:
        if n == params[0].name and params[0].kind is not params[0].VAR_POSITIONAL:
            raise BindingError(
                f"the name {n!r} in borrow/out clashes with {what}'s first parameter (the shard); rename one of them"
            )
        if n not in accepted and not has_var_kw:
            raise BindingError(
                f"{what} has no parameter {n!r} for the borrowed input/out buffer of "
                f"that name; add it (def f(shard, {', '.join(names)})) or **kwargs. "
                f"Signature: {sig}"
            )
    provided = set(names)
    for p in params[1:]:
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in provided:
            raise BindingError(
                f"{what} requires an argument {p.name!r} that neither borrow= nor out= "
                f"provides; pass it in borrow={{'{p.name}': ...}} or give it a default"
            )


class _Pickler(cloudpickle.CloudPickler):
    """cloudpickle that sends shardc buffers and shared inputs by reference,
    and big plain arrays that workers can inherit at fork (a global or
    closure variable of ``fun``; see ``shardc.inherit``) by token instead of
    by value: ``on_ref`` returns None for an array it leaves to pickle."""

    def __init__(self, file: Any, on_ref: Callable[[Any], Any]) -> None:
        super().__init__(file, protocol=5)
        self._on_ref = on_ref

    def persistent_id(self, obj: Any) -> Any:  # noqa: D401
        if isinstance(obj, (Buffer, Shared)):
            return self._on_ref(obj)
        if type(obj) is np.ndarray and obj.nbytes >= _inherit.min_bytes():
            return self._on_ref(obj)
        return None


def pickle_function(fun: Callable[..., Any], on_ref: Callable[[Any], Any]) -> bytes:
    """cloudpickle ``fun`` once; on failure name the global or closure variable at fault."""
    buf = io.BytesIO()
    try:
        _Pickler(buf, on_ref).dump(fun)
        blob = buf.getvalue()
    except Exception as exc:  # noqa: BLE001
        culprit = _find_culprit(fun)
        where = f" (it captures {culprit})" if culprit else ""
        raise UnpicklableFunctionError(
            f"fun {getattr(fun, '__qualname__', fun)!r} cannot be pickled to send it to the workers"
            f"{where}: {type(exc).__name__}: {exc}. Pass such objects through borrow= or create "
            "them inside fun (or with init_expr=)"
        ) from exc
    if len(blob) > BIG_FUN_BYTES:
        big = _biggest_capture(fun)
        log.warning(
            "fun %r pickles to %.1f MiB, sent to every worker on every call: it captures big "
            "data by value%s; pass it in borrow= (shared, not copied) or build it in init_expr=",
            getattr(fun, "__qualname__", fun),
            len(blob) / 2**20,
            f" (the biggest: {big})" if big else "",
        )
    return blob


BIG_FUN_BYTES = 16 * 1024**2


def _captures(fun: Any) -> list[tuple[str, Any]]:
    """(label, value) of the globals and closure variables ``fun`` uses."""
    code = getattr(fun, "__code__", None)
    if code is None:
        return []
    out: list[tuple[str, Any]] = []
    g = getattr(fun, "__globals__", {})
    out += [(f"global {name!r}", g[name]) for name in code.co_names if name in g]
    for name, cell in zip(code.co_freevars, getattr(fun, "__closure__", None) or (), strict=False):
        try:
            out.append((f"closure variable {name!r}", cell.cell_contents))
        except ValueError:
            pass
    return out


def capture_label(fun: Any, obj: Any) -> str:
    """How ``fun`` refers to ``obj`` (e.g. "global 'X'"), for messages."""
    for label, value in _captures(fun):
        if value is obj:
            return label
    return "an array captured by fun"


def _biggest_capture(fun: Any) -> str | None:
    sizes = [(getattr(v, "nbytes", 0), label) for label, v in _captures(fun) if hasattr(v, "nbytes")]
    if not sizes:
        return None
    n, label = max(sizes, key=lambda t: t[0])
    return f"{label}, {n / 2**20:.1f} MiB" if n else None


def _find_culprit(fun: Any) -> str | None:
    code = getattr(fun, "__code__", None)
    if code is None:
        return None
    candidates = _captures(fun)
    code_args = code.co_varnames[: code.co_argcount]
    for name, value in zip(
        code_args[len(code_args) - len(getattr(fun, "__defaults__", None) or ()) :],
        getattr(fun, "__defaults__", None) or (),
        strict=True,
    ):
        candidates.append((f"default of argument {name!r}", value))
    for name, value in (getattr(fun, "__kwdefaults__", None) or {}).items():
        candidates.append((f"default of argument {name!r}", value))
    for label, obj in candidates:
        if isinstance(obj, (Buffer, Shared)) or inspect.ismodule(obj):
            continue
        try:
            cloudpickle.dumps(obj)
        except Exception as exc:  # noqa: BLE001
            return f"{label} of type {type(obj).__name__} ({type(exc).__name__}: {exc})"
    return None


def check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (numbers.Integral, np.integer)) or seed < 0:
        raise InvalidArgumentError(f"seed must be None or a non-negative integer, got {seed!r}")
    return int(seed)


def check_timeout(timeout: Any) -> float:
    if type(timeout) in (int, float) and timeout > 0:
        return float(timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not float(timeout) > 0:
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def check_autotune(autotune: Any, scalar_n: bool) -> dict[str, Any] | None:
    """Normalise ``autotune``: None (on for int N), True/"online", False/"none", or a dict."""
    defaults = {"mode": "online", "target_chunk_seconds": 0.005, "max_rounds": 64}
    if autotune is None:
        return defaults if scalar_n else None
    if autotune is True or (isinstance(autotune, str) and autotune == "online"):
        return defaults
    if autotune is False or (isinstance(autotune, str) and autotune == "none"):
        return None
    if isinstance(autotune, dict):
        unknown = set(autotune) - {
            "mode",
            "target_chunk_seconds",
            "max_rounds",
            "probe_shards_per_worker",
            "min_shard_time",
        }
        if unknown:
            raise InvalidArgumentError(f"autotune has unknown keys {sorted(unknown)}")
        mode = autotune.get("mode", "online")
        if not isinstance(mode, str) or mode not in ("online", "none"):
            raise InvalidArgumentError(f"autotune mode {mode!r} is not supported; use 'online' or 'none'")
        if mode == "none":
            return None
        return {**defaults, **autotune}
    raise InvalidArgumentError(f"autotune must be None, True, False, 'online', 'none' or a dict, got {autotune!r}")


def check_dispatch_opts(opts: Any, mode: str) -> dict[str, Any]:
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise InvalidArgumentError(f"dispatch_opts must be a dict, got {type(opts).__name__}")
    unknown = set(opts) - DISPATCH_OPTS[mode]
    if unknown:
        raise InvalidArgumentError(
            f"dispatch_opts keys {sorted(unknown)} do not apply to dispatch_mode="
            f"{mode!r}; it accepts {sorted(DISPATCH_OPTS[mode])}"
        )
    if "block_size" in opts:
        check_int(opts["block_size"], "dispatch_opts['block_size']", 1)
    if "queue_backing" in opts:
        check_choice(opts["queue_backing"], "dispatch_opts['queue_backing']", ("mmap", "shm", "memfd", "auto"))
    if "error_log_max_lines" in opts:
        check_int(opts["error_log_max_lines"], "dispatch_opts['error_log_max_lines']", 1)
    if "claim_batch" in opts:
        check_int(opts["claim_batch"], "dispatch_opts['claim_batch']", 1)
    if "prefetch" in opts:
        check_int(opts["prefetch"], "dispatch_opts['prefetch']", 1)
    if any(k.startswith("auto_table") for k in opts):
        from .tables.options import check_auto_table  # the tables' keys (pyarrow only if used)

        return check_auto_table(dict(opts))
    return dict(opts)


def check_scheduler_policy(policy: Any) -> dict[str, Any]:
    if policy is None:
        return {}
    if not isinstance(policy, dict):
        raise InvalidArgumentError(f"scheduler_policy must be a dict, got {type(policy).__name__}")
    unknown = set(policy) - {"max_huge_concurrency"}
    if unknown:
        raise InvalidArgumentError(
            f"scheduler_policy has unknown keys {sorted(unknown)}; supported: max_huge_concurrency"
        )
    if "max_huge_concurrency" in policy:
        check_int(policy["max_huge_concurrency"], "scheduler_policy['max_huge_concurrency']", 1)
    return dict(policy)
