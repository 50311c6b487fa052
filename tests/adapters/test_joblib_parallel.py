"""joblib's own ``test_parallel.py`` (shipped in joblib's wheel) run with the
"shardc" backend: its backend-parametrized tests, with "shardc" added to the
backend lists, collected from here (the file is imported, never copied);
only the cases that run the shardc backend are kept (``conftest.py``).
Expected failures are listed in ``XFAIL`` with their reasons."""

from __future__ import annotations

import pytest

import shardc

pytest.importorskip("joblib", minversion="1.3")
shardc.register_joblib()  # first: the peer module's lists are built from joblib's BACKENDS at import
peer = pytest.importorskip("joblib.test.test_parallel")
for _lst in (peer.PROCESS_BACKENDS, peer.PARALLEL_BACKENDS):
    if "shardc" not in _lst:
        _lst.append("shardc")  # the parametrize marks hold these very lists

from joblib.test.test_parallel import *  # noqa: E402, F403 - the peer tests, collected here

KEEP_ONLY = "shardc"  # conftest: keep only the cases parametrized with the shardc backend
_FRESH = (
    "the inner/child process is a fresh interpreter (loky's workers, a subprocess) that never imported "
    "shardc, so joblib does not know the 'shardc' backend there (joblib has no entry point for backends)"
)
_NO_FILES = "shardc shares big arrays through shared-memory segments, not np.memmap files in temp_folder (by design)"
XFAIL = {
    "test_nested_loop[loky-shardc]": _FRESH,
    "test_nested_loop[back_compat_backend-shardc]": _FRESH,
    "test_backend_nesting_level[parallel_config-shardc-loky]": _FRESH,
    "test_backend_nesting_level[parallel_backend-shardc-loky]": _FRESH,
    "test_parallel_with_interactively_defined_functions[shardc]": _FRESH,
    "test_auto_memmap_on_arrays_from_generator[shardc]": _NO_FILES + ": the test wants np.memmap instances",
    "test_memmapping_leaks[shardc]": _NO_FILES + ": the test wants files in temp_folder",
}

# A peer project's own suite: its own CI step (.ci/run), not the core run (-m peer_suite).
# Set after the star import above, which brings joblib's own pytestmark.
_theirs = getattr(peer, "pytestmark", [])
pytestmark = [*(_theirs if isinstance(_theirs, list) else [_theirs]), pytest.mark.peer_suite]
