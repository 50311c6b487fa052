"""shardc: deterministic, zero-copy parallel execution of NumPy kernels over shards.

The public API; see each object's docstring and the README.
"""

from ._version import __version__
from .buffer import Buffer, buffer, buffer_open
from .diagnostics import copy_report, cow_report, mem_report, recommendations, report, segment_report, task_report
from .errors import (
    BindingError,
    BorrowedInputWriteError,
    CallSetupTimeoutError,
    ClosedError,
    ClusterError,
    GuardError,
    InvalidArgumentError,
    InvalidTypeError,
    MissingDependencyError,
    NativeModuleError,
    QueueClosedError,
    QueueError,
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
from .kernels import list_kernels, register_kernel, tiles2d
from .map import shard_map
from .pool import Pool, pool_create, pool_get, pool_health_check, pool_status, pool_stop
from .result import FailedShard, ShardFailure, ShardResult
from .shards import Shard, ShardDescriptor, shards, shards_list
from .share import Shared, share

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
    "ShardResult",
    "ShardFailure",
    "FailedShard",
    "Pool",
    "pool_create",
    "pool_get",
    "pool_stop",
    "pool_status",
    "pool_health_check",
    "register_kernel",
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
    "CallSetupTimeoutError",
    "ClusterError",
    "InvalidTypeError",
    "ShardIndexError",
    "UsageError",
    "NativeModuleError",
    "MissingDependencyError",
    "ShardcOSError",
    "QueueError",
    "GuardError",
    "WorkerSetupError",
]
