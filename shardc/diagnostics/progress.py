"""The progress bar: a small object fed with counts, apart from the record.

:class:`Progress` draws a tqdm bar (shards done of total, failures,
retries) when asked to, or when stderr is a terminal or the caller runs in
a notebook; otherwise every method is a no-op.  It knows nothing of the
run: the master loop calls :meth:`Progress.update` with its counts.
"""

from __future__ import annotations

import sys
from typing import Any


def want_progress(flag: bool | None) -> bool:
    """Whether to draw a bar: ``flag`` if given, else in a notebook or on a terminal."""
    if flag is not None:
        return flag
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A progress bar over ``total`` shards.

    Args:
        total: shards in the call.
        desc: the bar's label (e.g. ``"shard_map[rpc_chunked]"``).
        flag: True / False to force it on or off; None: on a terminal or in a notebook.
    """

    def __init__(self, total: int, desc: str, flag: bool | None = None) -> None:
        self.total = int(total)
        self._bar: Any = None
        self._last: tuple[int, int, int] = (0, 0, 0)
        if want_progress(flag):
            # tqdm is imported here, not at module level: it costs ~30 ms and
            # is needed only when a bar is drawn.
            from tqdm.auto import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: workers may be forked mid-run
            self._bar = tqdm(
                total=self.total, unit="shard", delay=1.0, file=sys.stderr, dynamic_ncols=True, desc=desc, leave=True
            )

    @property
    def active(self) -> bool:
        """True while a bar is drawn."""
        return self._bar is not None

    def update(self, done: int, failed: int, retries: int, refresh: bool = False) -> None:
        """Shards finished so far (ok or failed), of which ``failed`` failed, and retries so far."""
        bar = self._bar
        if bar is None:
            return
        self._last = (done, failed, retries)
        if done > bar.n:
            bar.update(done - bar.n)
        bar.set_postfix(failed=failed, retries=retries, refresh=refresh)

    def close(self) -> None:
        """Draw the last counts and close the bar (idempotent)."""
        bar, self._bar = self._bar, None
        if bar is not None:
            _done, failed, retries = self._last
            bar.set_postfix(failed=failed, retries=retries, refresh=True)
            bar.close()
