"""``Cluster(engine, ...)``: the cluster engine of a ``shard_map`` call and its options."""

from __future__ import annotations

import math
from typing import Any

from ..errors import InvalidArgumentError


class Cluster:
    """A cluster engine plus options, for ``shard_map(..., cluster=Cluster(client, ...))``.

    Args:
        engine: a ``dask.distributed.Client`` or ``"ray"`` (the connected Ray runtime).
        scheduler_timeout: seconds the scheduler may be unreachable before the
            call fails with :class:`~shardc.errors.ClusterError` (default 60).
        macro_seconds: target duration of one macro-shard (default 2 s).
        inflight_per_node: macro-shards outstanding per node (one running,
            the rest queued so the node never waits for the caller).
        max_attempts: tries of one macro-shard whose node or agent was lost.
        agent_idle_timeout: an agent with no work this long exits (agents
            are kept between the calls of one client/runtime; default 300 s).
        input_cache_bytes: inputs of earlier calls kept on the nodes (by
            content) up to this many bytes; the current call's inputs are
            always kept until the next call (default 2 GiB; 0: only those).
    """

    def __init__(
        self,
        engine: Any,
        *,
        scheduler_timeout: float = 60.0,
        macro_seconds: float = 2.0,
        inflight_per_node: int = 2,
        max_attempts: int = 4,
        agent_idle_timeout: float = 300.0,
        input_cache_bytes: int = 2 << 30,
    ) -> None:
        for name, v in (
            ("scheduler_timeout", scheduler_timeout),
            ("macro_seconds", macro_seconds),
            ("agent_idle_timeout", agent_idle_timeout),
        ):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise InvalidArgumentError(f"Cluster({name}=...) must be a positive number of seconds, got {v!r}")
        for name, k in (("inflight_per_node", inflight_per_node), ("max_attempts", max_attempts)):
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise InvalidArgumentError(f"Cluster({name}=...) must be a positive int, got {k!r}")
        if isinstance(input_cache_bytes, bool) or not isinstance(input_cache_bytes, int) or input_cache_bytes < 0:
            raise InvalidArgumentError(
                f"Cluster(input_cache_bytes=...) must be a non-negative int (bytes), got {input_cache_bytes!r}"
            )
        self.engine = engine
        self.scheduler_timeout = float(scheduler_timeout)
        self.macro_seconds = float(macro_seconds)
        self.inflight_per_node = inflight_per_node
        self.max_attempts = max_attempts
        self.agent_idle_timeout = float(agent_idle_timeout)
        self.input_cache_bytes = input_cache_bytes

    def __repr__(self) -> str:
        return f"<shardc.cluster.Cluster {type(self.engine).__name__} macro_seconds={self.macro_seconds:g}>"
