"""What every report is: :class:`Report` (title, data, lines, parts), and
:func:`diag_of`, the one check that a report was given a run's result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, InvalidTypeError
from .collect import Diagnostics
from .plot import plot_timeline


def diag_of(result: Any) -> Diagnostics:
    """The :class:`Diagnostics` of a ShardResult (TypeError for anything else)."""
    d = getattr(result, "diagnostics", None)
    if not isinstance(d, Diagnostics):
        raise InvalidTypeError(f"expected a ShardResult from shard_map, got {type(result).__name__}")
    return d


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


@dataclass
class Report:
    """A report: a title, the data as a dict, readable lines, and sub-reports."""

    title: str
    data: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    parts: list[Report] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-serializable data (private keys, like the run itself, left out)."""
        public = {k: v for k, v in self.data.items() if not k.startswith("_")}
        d = json.loads(json.dumps(public, default=_jsonable))
        if self.parts:
            d["parts"] = {p.title: p.to_dict() for p in self.parts}
        return d

    def __str__(self) -> str:
        out = [self.title, "-" * len(self.title), *self.lines]
        for p in self.parts:
            out += ["", str(p)]
        return "\n".join(out)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def plot(self, path: Any = None, **kw: Any) -> Any:
        """The timeline of the run this report is about (see :func:`plot_timeline`)."""
        res = self.data.get("_result")
        if res is None:
            raise InvalidArgumentError("this report has no run to plot")
        return plot_timeline(res, path=path, **kw)
