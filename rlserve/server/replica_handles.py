"""Where an engine replica runs, and the little the API server needs from it: start, is it alive, why did it
stop, kill it, wait for it. ``EngineClient`` (replicas.py) routes and gathers over ZMQ; it never knows which
kind of handle it holds.

- ``LocalReplica``: a child process of the API server (multiprocessing, spawn), reached over ipc://. It exits
  by itself when the API server dies (``run_engine_core`` watches its parent).
- ``RayReplica``: a Ray actor on any node of a Ray cluster, placed in one bundle of the server's placement
  group (``RayPlacement``), reached over tcp:// at the API server's advertised address. The actor runs
  ``run_engine_core`` in its own process (its TP workers are that process's children); Ray ties its life to
  the API server's (the driver that owns it).

Ray is imported only here, and only when a ``RayPlacement`` is made: without ``--ray_address`` nothing changes.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import threading
import time
import uuid
from dataclasses import replace

from rlserve.config import EngineConfig
from rlserve.engine.transport import CurveKeys

logger = logging.getLogger(__name__)

RAY_NAMESPACE = "rlserve"
PLACEMENT_TIMEOUT_S = 300.0  # a cluster without room for every replica fails the start, saying what it lacks


class LocalReplica:
    """Replica ``index`` as a child process on this host's devices [index*tp, (index+1)*tp)."""

    remote = False

    def __init__(self, config: EngineConfig, index: int, num_replicas: int, input_addr: str, output_addr: str,
                 log_level: str):
        from rlserve.engine.core_proc import run_engine_core
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(
            target=run_engine_core, name=f"rlserve-replica{index}", daemon=False,
            args=(local_replica_config(config, index), index, num_replicas, input_addr, output_addr,
                  index * config.tensor_parallel_size, log_level),
            kwargs={"parent_pid": os.getpid()})
        self.process.start()

    def describe(self) -> dict:
        return {"pid": self.process.pid, "alive": self.is_alive()}

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def exit_reason(self) -> str:
        return f"exited with code {self.process.exitcode}"

    def kill(self) -> None:
        """SIGKILL the replica and its tensor-parallel workers: a worker stuck in a collective would otherwise
        hold its GPU until NCCL's own timeout, after the replica is gone."""
        import psutil
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:  # already gone
            children = []
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        self.process.kill()

    def join(self, timeout_s: float) -> None:
        self.process.join(timeout_s)


def local_replica_config(config: EngineConfig, index: int) -> EngineConfig:
    """Replica ``index`` knows its index (its own request seeds) and runs on devices [index*tp, (index+1)*tp)
    of the visible ones."""
    device = config.resolved_device()
    if device.type != "cuda":
        return replace(config, data_parallel_rank=index)
    base = (device.index or 0) + index * config.tensor_parallel_size
    return replace(config, data_parallel_rank=index, device=f"cuda:{base}")


def import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray_address needs Ray: pip install 'rlserve[ray]' (ray>=2.40) on every node") from None
    return ray


class RayPlacement:
    """The server's connection to a Ray cluster and its placement group: one bundle per replica.

    A bundle always lands on one node, so a replica's TP workers share a node (and its NVLink): that is the
    STRICT_PACK of a replica. Across replicas the group is PACK by default (``strategy``): replicas fill a
    node before the next, which leaves whole nodes free for a trainer sharing the cluster; SPREAD puts them
    on different nodes (one node's loss costs fewer replicas). Bundle 0 is pinned to the API server's node
    (``pin_first``): under TRL <= 1.10's protocol the server's rank 0 hosts the weight-sync store and the
    trainer dials it at the server's HTTP host."""

    def __init__(self, address: str, config: EngineConfig, num_replicas: int, strategy: str = "PACK",
                 pin_first: bool = True):
        """Connects to the cluster now (at the edge: a wrong address or a missing Ray fails the start);
        ``reserve`` makes the placement group."""
        ray = import_ray()
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, namespace=RAY_NAMESPACE, logging_level=logging.WARNING)
        self.node_ip = ray.util.get_node_ip_address()
        if pin_first:
            self._check_on_a_node(address)
        self.config = config
        self.num_replicas = num_replicas
        self.strategy = strategy
        self.pin_first = pin_first
        self.server_id = uuid.uuid4().hex[:8]  # actor names of two servers on one cluster do not collide
        tp = config.tensor_parallel_size
        self.on_cuda = config.resolved_device().type == "cuda"
        self.bundle = {"GPU": float(tp), "CPU": 1.0} if self.on_cuda else {"CPU": float(tp)}
        self.group = None
        # ``reserve`` runs in a thread that startup's cancellation does not stop: ``close`` must see a group made
        # after it was called, and end the wait for one it removed.
        self._lock = threading.Lock()
        self._closed = False

    def _check_on_a_node(self, address: str) -> None:
        """Pinning replica 0 to this node needs this node in the cluster: through Ray Client (ray://) the server
        runs outside it, the ``node:<ip>`` resource never exists, and the placement would wait out its timeout."""
        alive = sorted(str(n.get("NodeManagerAddress")) for n in self.ray.nodes() if n.get("Alive"))
        if self.node_ip in alive:
            return
        client = " (a ray:// address connects through Ray Client, from outside the cluster)" \
            if str(address).startswith("ray://") else ""
        raise RuntimeError(
            f"--ray_pin_first_replica puts replica 0 on this host ({self.node_ip}), which is not a node of the Ray "
            f"cluster (alive nodes: {', '.join(alive) or 'none'}){client}: pass --ray_pin_first_replica false, or "
            f"run rlserve serve on a node of the cluster")

    def bundles(self) -> list[dict]:
        """One bundle per replica; replica 0's carries a sliver of this node's resource when pinned."""
        bundles = [dict(self.bundle) for _ in range(self.num_replicas)]
        if self.pin_first:
            bundles[0][f"node:{self.node_ip}"] = 0.001
        return bundles

    def reserve(self, timeout_s: float = PLACEMENT_TIMEOUT_S) -> None:
        """Blocks until every bundle is placed (call it off the event loop), or until ``close``."""
        from ray.util.placement_group import placement_group
        ray = self.ray
        with self._lock:  # ``close`` either removes this group or comes first and no group is made
            if self._closed:
                raise RuntimeError("the server stopped before its replicas were placed")
            self.group = placement_group(self.bundles(), strategy=self.strategy, name=f"rlserve-{self.server_id}")
        ready = self.group.ready()
        deadline = time.monotonic() + timeout_s
        while True:
            placed = ray.wait([ready], timeout=min(1.0, max(deadline - time.monotonic(), 0.0)))[0]
            if self._closed:  # removed by ``close`` (which also ends the wait on ``ready``)
                raise RuntimeError("the server stopped before its replicas were placed")
            if placed:
                break
            if time.monotonic() >= deadline:
                self.close()
                raise RuntimeError(
                    f"the Ray cluster has no room for {self.num_replicas} replica(s) of {self.bundle} each "
                    f"({self.strategy}{', the first on this node, ' + self.node_ip if self.pin_first else ''}) "
                    f"after {timeout_s:.0f}s; available: {ray.available_resources()}")
        logger.info("placement group %s ready: %d bundle(s) of %s (%s)", self.group.id.hex(), self.num_replicas,
                    self.bundle, self.strategy)

    def close(self) -> None:
        """Removes the group, made or being made; a ``reserve`` still running fails within a second."""
        with self._lock:
            self._closed = True
            group = self.group
        if group is None:
            return
        try:
            self.ray.util.remove_placement_group(group)
        except Exception:  # the cluster may be gone already
            pass


class RayReplica:
    """Replica ``index`` as a Ray actor in bundle ``index`` of the placement group. The actor's one task,
    ``run``, is ``run_engine_core``: it ends when the engine stops (a Shutdown message), and fails when the
    actor dies (killed, its node gone, or the engine's fatal-error exit)."""

    remote = True

    def __init__(self, placement: RayPlacement, index: int, num_replicas: int, input_addr: str, output_addr: str,
                 log_level: str, generation: int = 0, curve: CurveKeys | None = None):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        ray = self.ray = placement.ray
        tp = placement.config.tensor_parallel_size
        config = replace(placement.config, data_parallel_rank=index)
        if placement.on_cuda:  # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs: they are cuda:0..tp-1
            config = replace(config, device="cuda:0")
        self.name = f"rlserve-{placement.server_id}-replica{index}-{generation}"
        self.index = index
        self.actor = _engine_actor_class(ray).options(
            name=self.name, namespace=RAY_NAMESPACE, max_restarts=0, max_concurrency=1,
            num_cpus=1 if placement.on_cuda else tp, num_gpus=tp if placement.on_cuda else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement.group, placement_group_bundle_index=index),
        ).remote()
        # Actor tasks run in order: ``where`` answers as the actor starts, before ``run`` holds it for good.
        self._where = self.actor.where.remote()
        self._node: tuple[str, str] | None = None  # (node id, node IP), once the actor has said
        self.done = self.actor.run.remote(config, index, num_replicas, input_addr, output_addr,
                                          index * tp, log_level, generation, curve)
        self._reason: str | None = None

    def describe(self) -> dict:
        return {"ray_actor": self.name, "ray_namespace": RAY_NAMESPACE, "ray_node_id": self.node_id(),
                "ray_node_ip": self.node_ip(), "alive": self.is_alive()}

    def node_id(self) -> str | None:
        """The Ray node it runs on; None until its actor has started (or if it died first)."""
        node = self._node_of_actor()
        return node[0] if node else None

    def node_ip(self) -> str | None:
        """That node's IP: where rank 0 of a weight-sync group listens when this is replica 0."""
        node = self._node_of_actor()
        return node[1] if node else None

    def _node_of_actor(self) -> tuple[str, str] | None:
        """The actor's own answer, read once it is there: no GCS call on every /server_info/. A restarted
        replica is a new handle, so a bundle that Ray moved to another node is seen there."""
        if self._node is None and self.ray.wait([self._where], timeout=0)[0]:
            try:
                self._node = tuple(self.ray.get(self._where, timeout=0))
            except Exception:  # the actor died before it answered
                return None
        return self._node

    def is_alive(self) -> bool:
        ready, _ = self.ray.wait([self.done], timeout=0)
        return not ready

    def exit_reason(self) -> str:
        if self._reason is None:
            try:
                self.ray.get(self.done, timeout=0)
                self._reason = "stopped"
            except self.ray.exceptions.GetTimeoutError:
                return "still running"
            except Exception as e:  # RayActorError: killed, node lost, or the engine's os._exit
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self._reason = f"Ray actor {self.name} died ({type(e).__name__}: {first_line[:300]})"
        return self._reason

    def kill(self) -> None:
        try:
            self.ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone
            pass

    def join(self, timeout_s: float) -> None:
        self.ray.wait([self.done], timeout=timeout_s)


@functools.cache
def _engine_actor_class(ray):
    """``EngineActor`` as a Ray actor class, made once rather than per launch (each ``ray.remote`` wraps the
    class anew, to be pickled and exported again); not a decorator, so that this module imports without Ray."""
    return ray.remote(EngineActor)


class EngineActor:
    """The Ray actor (see ``_engine_actor_class``)."""

    def where(self) -> tuple[str, str]:
        """(node id, node IP) of this actor's node."""
        import ray
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def run(self, config: EngineConfig, index: int, num_replicas: int, input_addr: str, output_addr: str,
            tp_rank_base: int, log_level: str, generation: int = 0, curve: CurveKeys | None = None) -> None:
        from rlserve.engine.core_proc import run_engine_core
        # Ray owns this process's signals and its life (it dies with the API server that owns the actor), and
        # gives it OMP_NUM_THREADS = its CPUs: no parent to watch, no thread count to guess.
        run_engine_core(config, index, num_replicas, input_addr, output_addr, tp_rank_base, log_level,
                        hosted=True, generation=generation, curve=curve)
