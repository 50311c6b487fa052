"""The Ray backend: ``shard_map(..., cluster="ray")`` on the connected Ray runtime.

A *node* is a Ray node.  The session starts one actor per alive node (kept
across its calls; a node that joins gets one at the next call), pinned
there (``NodeAffinitySchedulingStrategy``, hard) and reserving no CPU: the
node's shardc agent, which the actor starts through :mod:`.node` on its first
macro-shard, uses the node's cores with its own pool.  An actor runs one
method call at a time, so its node runs one macro-shard at a time; the
others wait in its mailbox.  Handing out is the caller's: each macro-shard
goes to the live actor with the fewest outstanding, so a faster node,
finishing sooner, is given more.

Inputs: the job and each input array the session does not hold yet are
``ray.put`` once (the session keeps the refs across calls, :mod:`.session`); passed as
top-level arguments, each node's object store fetches them once and the
actor gets the arrays zero-copy (read-only views of the store).  An actor
whose node died answers with ``RayActorError``: the actor is dropped and its
macro-shards are rerun on the others.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..errors import ClusterError
from . import node
from .keys import InputCache

log = logging.getLogger("shardc")


class _NodeAgentActor:
    """Holds this node's agent of one session (see the module docstring)."""

    def __init__(self, name: str, session: str) -> None:
        self.name = name
        self.session = session

    def run(self, job_id: str, mid: int, lo: int, hi: int, job: dict[str, Any], *inputs: np.ndarray) -> dict[str, Any]:
        return node.run_macro(self.session, job_id, job, list(inputs), mid, lo, hi, self.name)

    def close(self) -> bool:
        return node.close_session(self.session)


# No CPU reserved: the actor waits while the node's agent works the cores.
_NodeActor: Any = ray.remote(num_cpus=0)(_NodeAgentActor)


def _node_name(n: dict[str, Any]) -> str:
    return f"{n.get('NodeManagerAddress', '?')}/{n['NodeID'][:12]}"


class RayBackend:
    """A caller's session on the connected Ray runtime (see the module docstring)."""

    name = "ray"

    def __init__(self) -> None:
        self.session = uuid.uuid4().hex[:12]
        ctx = ray.get_runtime_context()
        self.runtime = (ctx.get_job_id(), ctx.gcs_address)
        self.call_lock = threading.Lock()
        self.cache = InputCache()
        self.shard_seconds: dict[str, float] = {}  # the planner's hints (base.job_signature)
        self.held: dict[str, Any] = {}  # content key -> its ObjectRef
        self.opts: Any = None
        self.job_id = ""
        self.job_ref: Any = None
        self.input_refs: list[Any] = []
        self.actors: dict[str, Any] = {}  # node name -> actor (kept across calls)
        self.load: dict[str, int] = {}  # node name -> outstanding macro-shards
        self.owner: dict[Any, str] = {}  # object ref -> node name

    def usable(self, engine: Any) -> bool:
        """Still the connected runtime's session (the runtime was not shut down)."""
        if not ray.is_initialized():
            return False
        ctx = ray.get_runtime_context()
        return (ctx.get_job_id(), ctx.gcs_address) == self.runtime

    def nodes(self) -> dict[str, dict[str, Any]]:
        return {
            _node_name(n): {"host": n.get("NodeManagerAddress"), "cpus": n.get("Resources", {}).get("CPU")}
            for n in ray.nodes()
            if n.get("Alive")
        }

    def put(self, job_id: str, job: dict[str, Any], inputs: list[np.ndarray], drop: list[str]) -> int:
        """Put the job, and the inputs the session does not hold yet; an actor on every
        alive node that has none.  Returns the bytes put (each node's store pulls them once)."""
        self.job_id = job_id
        self.owner = {}
        for k in drop:
            self.held.pop(k, None)  # the last reference: Ray frees the object
        self.job_ref = ray.put(job)
        sent = 0
        for spec, arr in zip(job["inputs"], inputs, strict=True):
            if spec["key"] not in self.held:
                self.held[spec["key"]] = ray.put(arr)
                sent += int(arr.nbytes)
        self.input_refs = [self.held[spec["key"]] for spec in job["inputs"]]
        alive = {_node_name(n): n for n in ray.nodes() if n.get("Alive")}
        for name in [k for k in self.actors if k not in alive]:
            self.actors.pop(name)  # its node is gone
        for name, n in alive.items():
            if name not in self.actors:
                strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
                self.actors[name] = _NodeActor.options(scheduling_strategy=strategy, max_restarts=0).remote(
                    name, self.session
                )
        self.load = dict.fromkeys(self.actors, 0)
        return sent

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
        """The call is over (its state on the agents ends with the next call's JOB: no
        round trip here); the agents, the actors and the inputs stay."""
        self.job_ref = None
        self.input_refs = []
        for k in [k for k in self.held if k not in self.cache.sizes]:
            self.held.pop(k)

    def close(self) -> None:
        """End the session: stop its agents and actors, let go of its inputs."""
        if ray.is_initialized():
            for name, actor in list(self.actors.items()):
                try:
                    ray.get(actor.close.remote(), timeout=30)
                except Exception as exc:  # noqa: BLE001 - the agent exits with its actor anyway
                    log.warning("shardc cluster: stopping the agent on Ray node %s failed: %s", name, exc)
                ray.kill(actor)
        self.actors.clear()
        self.held.clear()
        self.cache.sizes.clear()
