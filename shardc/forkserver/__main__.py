"""The fork server process: ``python -m shardc.forkserver FD`` (started by
:class:`shardc.forkserver.ForkServer`; the loop is :func:`shardc.forkserver.server.serve`).
"""

from __future__ import annotations

import signal
import sys

# SIGINT (Ctrl-C in the caller's terminal reaches the whole process group) is
# the master's business: ignore it before the imports below take time.
signal.signal(signal.SIGINT, signal.SIG_IGN)

import numpy  # noqa: E402, F401 - imported once here, not in every worker
import numpy.random  # noqa: E402, F401

import shardc  # noqa: E402, F401 - the whole package, once
from shardc.forkserver.server import serve  # noqa: E402

if __name__ == "__main__":
    serve(int(sys.argv[1]))
