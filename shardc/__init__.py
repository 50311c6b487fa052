"""shardc: deterministic, zero-copy parallel execution of NumPy kernels over shards."""
from ._version import __version__

__all__ = ["__version__"]
