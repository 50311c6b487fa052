"""``fun``'s pickle, reused across calls while it provably cannot differ.

Every call ships ``fun`` to the workers.  cloudpickle pickles a function
defined in ``__main__`` (a script, a notebook) *by value*: its code, the
globals it names, its defaults, closure cells and attributes, and, again by
value, the ``__main__`` functions among them.  That costs ~60 us a call,
a tenth of a small call.  Caching the bytes is only correct while everything
pickled by value is exactly what it was, so a cached pickle is reused only
for a function whose by-value content is made of *frozen* values, compared
by identity at every call:

* frozen: None, bools, ints, floats, complex, strings, bytes, Ellipsis;
  tuples and frozensets of frozen values; modules, classes and functions
  that cloudpickle pickles *by reference* (importable by name, their module
  not registered for pickling by value); built-in functions of modules; and
  ``__main__`` functions whose own content is frozen (checked the same way);
* anything else (a list, dict, set, array, instance, a class defined in
  ``__main__``, a shardc buffer or shared input) makes the function
  uncacheable: it is pickled at every call, as before.

The fingerprint of a function is the identity of each such value: its code
object, defaults, keyword defaults, closure cells' contents, the current
value (or absence) of every global name its code (and nested code) names,
the module globals cloudpickle copies, its ``__dict__``, names, doc and
annotations.  Rebinding a global, assigning a default, a ``nonlocal``
rebinding a cell, a new function attribute: each changes an identity, and
the function is pickled again.  Mutation cannot reach a frozen value.  The
imported submodules of the packages it names that cloudpickle records with
it (``np.random`` used as an attribute) and cloudpickle's by-value registry
are part of the fingerprint too.
"""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Callable
from typing import Any

from .validate import pickle_function

try:  # cloudpickle's registry of modules pickled by value (register_pickle_by_value)
    from cloudpickle import cloudpickle as _cp

    _BY_VALUE: Any = _cp._PICKLE_BY_VALUE_MODULES
except (ImportError, AttributeError):  # an unknown cloudpickle: never cache
    _BY_VALUE = None

_ATOMS = frozenset((type(None), bool, int, float, complex, str, bytes, type(Ellipsis)))
_BASE_GLOBALS = ("__package__", "__name__", "__path__", "__file__")  # copied by cloudpickle
_MISSING = object()
MAX_ENTRIES = 64  # functions remembered (the oldest is dropped)


class _Uncacheable(Exception):
    """Something pickled by value is not frozen."""


def _by_value_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in _BY_VALUE)  # it or a parent registered


def _by_reference(obj: Any) -> bool:
    """cloudpickle pickles the function or class ``obj`` by reference (by name)."""
    mod_name = getattr(obj, "__module__", None)
    if not isinstance(mod_name, str) or mod_name == "__main__" or _by_value_module(mod_name):
        return False
    found: Any = sys.modules.get(mod_name)
    if found is None:
        return False
    for part in str(getattr(obj, "__qualname__", "")).split("."):
        if part == "<locals>":
            return False
        found = getattr(found, part, _MISSING)
    return found is obj


def _code_names(code: types.CodeType, cache: dict[types.CodeType, tuple[str, ...]]) -> tuple[str, ...]:
    """Every name ``code`` and the code nested in it refer to (a superset of the globals it uses)."""
    names = cache.get(code)
    if names is None:
        seen = dict.fromkeys(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                seen.update(dict.fromkeys(_code_names(const, cache)))
        names = cache[code] = tuple(seen)
    return names


_names_cache: dict[types.CodeType, tuple[str, ...]] = {}


def _frozen(v: Any, out: list[Any], active: set[int]) -> None:
    """Append to ``out`` what identifies ``v``; raise _Uncacheable if it is not frozen."""
    t = type(v)
    if t in _ATOMS:
        out.append(v)
    elif t is tuple or t is frozenset:
        out.append(t)
        out.append(len(v))
        for x in v:
            _frozen(x, out, active)
    elif t is types.ModuleType:
        if _by_value_module(v.__name__) or v.__name__ not in sys.modules:
            raise _Uncacheable(v.__name__)
        out.append(v)
    elif t is types.BuiltinFunctionType:
        if not (v.__self__ is None or type(v.__self__) is types.ModuleType):
            raise _Uncacheable(repr(v))  # a bound method of some object
        out.append(v)
    elif t is types.FunctionType:
        out.append(v)
        if not _by_reference(v):
            _function(v, out, active)
    elif isinstance(v, type):
        if not _by_reference(v):
            raise _Uncacheable(repr(v))
        out.append(v)
    else:
        raise _Uncacheable(t.__name__)


def _function(f: types.FunctionType, out: list[Any], active: set[int]) -> None:
    """Append the fingerprint of ``f``'s by-value content (see the module docstring)."""
    if id(f) in active:
        return  # recursion (f names itself, or a helper names f): f is already being walked
    active.add(id(f))
    code = f.__code__
    g = f.__globals__
    values = [g.get(name, _MISSING) for name in _code_names(code, _names_cache)]
    values += [g.get(name, _MISSING) for name in _BASE_GLOBALS]
    values += (f.__name__, f.__qualname__, f.__module__, f.__doc__, f.__defaults__)
    for d in (f.__kwdefaults__, f.__annotations__, f.__dict__):
        if d:
            for item in d.items():
                values += item
        values.append(len(d) if d else 0)
    for cell in f.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            values.append(_MISSING)
    out.append(code)
    atoms = _ATOMS
    for v in values:
        if v is _MISSING or type(v) in atoms:
            out.append(v)
        else:
            _frozen(v, out, active)
            if type(v) is types.ModuleType and getattr(v, "__package__", None):
                _submodules(v.__name__, code.co_names, out)


def _submodules(package: str, names: tuple[str, ...], out: list[Any]) -> None:
    """Append the imported submodules of ``package`` that cloudpickle records
    for a function naming ``names`` (every part of the submodule's path among
    them): a package's submodules are imported after their parent, so a walk
    from the package down through the names finds exactly those."""
    todo = [package]
    while todo:
        prefix = todo.pop() + "."
        for name in names:
            sub = sys.modules.get(prefix + name)
            if sub is not None:
                out.append(sub)
                todo.append(prefix + name)
    out.append(_MISSING)  # (the end of this package's list)


def fingerprint(fun: Any) -> tuple[Any, ...] | None:
    """What identifies everything cloudpickle would pickle by value for
    ``fun``, or None when some of it is not frozen (or ``fun`` is not a plain
    function)."""
    if _BY_VALUE is None or type(fun) is not types.FunctionType:
        return None
    out: list[Any] = [len(_BY_VALUE), *sorted(_BY_VALUE)]  # (items, not a new tuple: compared by identity)
    try:
        _function(fun, out, set())
    except _Uncacheable:
        return None
    return tuple(out)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Item by item the same object (or equal ints: they pickle the same)."""
    if len(a) != len(b):
        return False
    return all(x is y or (type(x) is int and type(y) is int and x == y) for x, y in zip(a, b, strict=True))


# id(fun) -> (weak reference to fun, fingerprint, pickle)
_cache: dict[int, tuple[weakref.ref[Any], tuple[Any, ...], bytes]] = {}


def pickle_fun(fun: Callable[..., Any], on_ref: Callable[[Any], Any]) -> bytes:
    """``fun``'s pickle (:func:`shardc.validate.pickle_function`), reused from
    an earlier call when its fingerprint is identical (see the module docstring)."""
    fp = fingerprint(fun)
    if fp is None:
        return pickle_function(fun, on_ref)
    hit = _cache.get(id(fun))
    if hit is not None and hit[0]() is fun and _same(hit[1], fp):
        return hit[2]
    captured: list[Any] = []

    def spy(obj: Any) -> Any:
        captured.append(obj)
        return on_ref(obj)

    blob = pickle_function(fun, spy)
    # Kept only if nothing changed while it was made (pickling may import a module).
    if not captured and _same(fp, fingerprint(fun) or ()):  # (a captured input is never frozen; checked all the same)
        if len(_cache) >= MAX_ENTRIES and id(fun) not in _cache:
            del _cache[next(iter(_cache))]
        _cache[id(fun)] = (weakref.ref(fun), fp, blob)
    return blob
