"""shardc beyond one machine: ``shard_map(..., cluster=client)`` on Dask or Ray.

See ``docs/cluster.md``.  :mod:`.base` is the caller's side, :mod:`.session`
keeps agents and inputs across calls, :mod:`.node` runs in the engine's
worker processes, :mod:`.agent` is the per-node shardc process; :mod:`.dask`
and :mod:`.ray` adapt the engines.  Importing this package imports neither
Dask nor Ray.
"""

from .options import Cluster
from .session import close

__all__ = ["Cluster", "close"]
