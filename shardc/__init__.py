"""shardc: deterministic, zero-copy parallel execution of NumPy kernels over shards.

The public API; see each object's docstring and the README.
"""

from ._version import __version__
from .buffer import Buffer, buffer, buffer_open
from .colstats import col_means, col_stats, col_sums, col_vars, shard_crossprod
from .diagnostics import copy_report, cow_report, mem_report, recommendations, report, segment_report, task_report
from .errors import (
    BindingError,
    BorrowedInputWriteError,
    CallSetupTimeoutError,
    ClosedError,
    ClusterError,
    ExecutorBrokenError,
    GuardError,
    InvalidArgumentError,
    InvalidTypeError,
    MissingDependencyError,
    NativeKernelError,
    NativeModuleError,
    QueueClosedError,
    QueueError,
    ReduceError,
    SegmentError,
    ShardcError,
    ShardcOSError,
    ShardIndexError,
    ShardMapError,
    ShardSpecError,
    ShardTimeoutError,
    UnpicklableFunctionError,
    UsageError,
    WorkerCrashedError,
    WorkerMemoryError,
    WorkerSetupError,
)
from .executor import Executor
from .joblib_hook import install as _install_joblib_hook
from .joblib_hook import register_joblib
from .kernels import list_kernels, register_kernel, tiles2d
from .map import shard_map
from .pool import Pool, pool_create, pool_get, pool_health_check, pool_status, pool_stop
from .pool_map import DispatchResult, dispatch_chunks, pool_lapply, pool_sapply  # also attaches Pool.map/imap
from .reduce import shard_reduce
from .reduction import ReduceResult
from .result import FailedShard, ShardFailure, ShardResult
from .shards import Shard, ShardDescriptor, shards, shards_list
from .share import Shared, share
from .tmpdirs import sweep_at_import as _sweep_tmpdirs

__all__ = [
    "__version__",
    "Buffer",
    "buffer",
    "buffer_open",
    "Shared",
    "share",
    "Shard",
    "ShardDescriptor",
    "shards",
    "shards_list",
    "tiles2d",
    "shard_map",
    "shard_reduce",
    "ReduceResult",
    "Executor",
    "ExecutorBrokenError",
    "ShardResult",
    "ShardFailure",
    "FailedShard",
    "Pool",
    "pool_create",
    "pool_get",
    "pool_stop",
    "pool_status",
    "pool_health_check",
    "pool_lapply",
    "pool_sapply",
    "dispatch_chunks",
    "DispatchResult",
    "register_joblib",
    "register_kernel",
    "col_sums",
    "col_means",
    "col_vars",
    "col_stats",
    "shard_crossprod",
    "list_kernels",
    "report",
    "mem_report",
    "copy_report",
    "cow_report",
    "task_report",
    "segment_report",
    "recommendations",
    "ShardcError",
    "ShardSpecError",
    "InvalidArgumentError",
    "BindingError",
    "UnpicklableFunctionError",
    "ClosedError",
    "SegmentError",
    "QueueClosedError",
    "BorrowedInputWriteError",
    "WorkerCrashedError",
    "ShardTimeoutError",
    "WorkerMemoryError",
    "ShardMapError",
    "ReduceError",
    "CallSetupTimeoutError",
    "ClusterError",
    "InvalidTypeError",
    "ShardIndexError",
    "UsageError",
    "NativeModuleError",
    "MissingDependencyError",
    "NativeKernelError",
    "ShardcOSError",
    "QueueError",
    "GuardError",
    "WorkerSetupError",
]

_install_joblib_hook()  # registers the joblib backend when joblib is (or gets) imported
_sweep_tmpdirs()  # removes temporary table directories of dead shardc processes (cheap: see tmpdirs)
