"""The Ray backend: ``shard_map(..., cluster="ray")`` on the connected Ray runtime.

A *node* is a Ray node.  The caller starts one actor per alive node, pinned
there (``NodeAffinitySchedulingStrategy``, hard) and reserving no CPU: the
node's shardc agent, which the actor starts through :mod:`.node` on its first
macro-shard, uses the node's cores with its own pool.  An actor runs one
method call at a time, so its node runs one macro-shard at a time; the
others wait in its mailbox.  Handing out is the caller's: each macro-shard
goes to the live actor with the fewest outstanding, so a faster node,
finishing sooner, is given more.

Inputs: the job and each input array are ``ray.put`` once; passed as
top-level arguments, each node's object store fetches them once and the
actor gets the arrays zero-copy (read-only views of the store).  An actor
whose node died answers with ``RayActorError``: the actor is dropped and its
macro-shards are rerun on the others.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import ClusterError, InvalidArgumentError
from . import node

log = logging.getLogger("shardc")


class _NodeAgentActor:
    """Holds this node's agent for one call (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, job_id: str, mid: int, lo: int, hi: int, job: dict[str, Any], *inputs: np.ndarray) -> dict[str, Any]:
        return node.run_macro(job_id, job, list(inputs), mid, lo, hi, self.name)

    def close(self, job_id: str) -> bool:
        return node.close_job(job_id)


# No CPU reserved: the actor waits while the node's agent works the cores.
_NodeActor: Any = ray.remote(num_cpus=0)(_NodeAgentActor)


def _node_name(n: dict[str, Any]) -> str:
    return f"{n.get('NodeManagerAddress', '?')}/{n['NodeID'][:12]}"


class RayBackend:
    """See the module docstring."""

    name = "ray"

    def __init__(self, opts: Any) -> None:
        if not ray.is_initialized():
            raise InvalidArgumentError("cluster='ray' runs on the connected Ray runtime: call ray.init(...) first")
        self.opts = opts
        self.job_id = ""
        self.job_ref: Any = None
        self.input_refs: list[Any] = []
        self.actors: dict[str, Any] = {}  # node name -> actor
        self.load: dict[str, int] = {}  # node name -> outstanding macro-shards
        self.owner: dict[Any, str] = {}  # object ref -> node name

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {
            _node_name(n): {"host": n.get("NodeManagerAddress"), "cpus": n.get("Resources", {}).get("CPU")}
            for n in ray.nodes()
            if n.get("Alive")
        }

    def put(self, job_id: str, job: dict[str, Any], inputs: list[np.ndarray]) -> int:
        self.job_id = job_id
        self.job_ref = ray.put(job)
        self.input_refs = [ray.put(a) for a in inputs]
        for n in ray.nodes():
            if not n.get("Alive"):
                continue
            name = _node_name(n)
            strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
            self.actors[name] = _NodeActor.options(scheduling_strategy=strategy, max_restarts=0).remote(name)
            self.load[name] = 0
        return int(sum(a.nbytes for a in inputs))

    def submit(self, mid: int, lo: int, hi: int, attempt: int) -> Any:
        if not self.actors:
            raise ClusterError("every Ray node of this call was lost; nothing is left to run its macro-shards")
        name = min(self.actors, key=lambda k: self.load[k])
        ref = self.actors[name].run.remote(self.job_id, mid, lo, hi, self.job_ref, *self.input_refs)
        self.load[name] += 1
        self.owner[ref] = name
        return ref

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        if not handles:
            return []
        ready, rest = ray.wait(handles, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return list(ready)

    def fetch(self, handle: Any) -> dict[str, Any]:
        name = self.owner.pop(handle)
        self.load[name] = self.load.get(name, 1) - 1
        try:
            return ray.get(handle, timeout=self.opts.scheduler_timeout)
        except ray.exceptions.RayActorError as exc:
            if self.actors.pop(name, None) is not None:
                log.warning("shardc cluster: the actor of Ray node %s died (%s); its work goes elsewhere", name, exc)
            raise ClusterError(f"Ray node {name} was lost: {exc}") from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            raise cause from None

    def alive(self) -> bool:
        return bool(ray.is_initialized())

    def starts(self) -> list[dict[str, Any]]:
        return []  # the lost tries are in the result's "lost" list, with the node named

    def finish(self) -> None:
        for name, actor in list(self.actors.items()):
            try:
                ray.get(actor.close.remote(self.job_id), timeout=30)
            except Exception as exc:  # noqa: BLE001 - the agent exits with its actor anyway
                log.warning("shardc cluster: stopping the agent on Ray node %s failed: %s", name, exc)
            ray.kill(actor)
        self.actors.clear()
        self.job_ref = None
        self.input_refs = []
