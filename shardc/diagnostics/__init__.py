"""Diagnostics you can prove: collected during the run, reported after it.

* :mod:`.collect`: :class:`Diagnostics`, the plain, picklable record the
  master fills while a call runs (no reference to the run or the pool).
* :mod:`.reports`: ``report(result, level)``, ``task_report``,
  ``mem_report``, ``copy_report``, ``cow_report``, ``worker_report``,
  ``segment_report()``; :mod:`.advice`: ``recommendations`` and the measured
  dispatch overhead they rest on.  Each report is a :class:`Report` with
  ``to_dict()`` and a readable ``str``.
* :mod:`.progress`: :class:`Progress`, the tqdm bar, fed with counts.
* :mod:`.plot`: ``plot_timeline`` (matplotlib, optional extra ``plot``).

Imports go one way: collect <- plot <- base <- advice <- reports.
"""

from .advice import chunk_advice, dispatch_overhead, recommendations
from .base import Report, diag_of
from .collect import Diagnostics
from .plot import plot_timeline
from .progress import Progress
from .reports import copy_report, cow_report, mem_report, report, segment_report, task_report, worker_report

__all__ = [
    "Diagnostics",
    "Progress",
    "Report",
    "chunk_advice",
    "copy_report",
    "cow_report",
    "diag_of",
    "dispatch_overhead",
    "mem_report",
    "plot_timeline",
    "recommendations",
    "report",
    "segment_report",
    "task_report",
    "worker_report",
]
