"""Tensor parallelism: an engine core driving ``t - 1`` worker processes.

Rank 0 is an ordinary ``EngineCore`` -- scheduler, block manager, sampler -- whose model holds shard 0.
Ranks 1..t-1 are worker processes holding the other shards. Every step, rank 0 sends the step's inputs (a
``StepInput`` of plain lists) down a pipe to each worker; all ranks run the same forward, meeting in the
all-reduces of the row-parallel layers and the all-gather of the LM head (NCCL on GPUs, gloo on CPUs, over
the default process group of these processes -- never a trainer's); rank 0 alone samples.

Weight sync: every rank is its own rank of the weight-sync group and receives every bucket, loading only its
shard. A worker that dies makes rank 0 raise at its next step.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import threading
import traceback
import weakref
from dataclasses import replace

import torch
import torch.distributed as dist

from rlserve.config import EngineConfig
from rlserve.distributed.parallel import TensorParallel
from rlserve.debug import dump_stacks_on_sigusr1, freeze_startup_heap
from rlserve.engine.core import EngineCore
from rlserve.models.loader import load_config, resolve_model_dir

logger = logging.getLogger(__name__)

TP_TIMEOUT = datetime.timedelta(seconds=300)


def _rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    device = config.resolved_device()
    if device.type != "cuda":
        return config
    return replace(config, device=f"cuda:{(device.index or 0) + rank}")


def _init_group(config: EngineConfig, rank: int, store: dist.Store) -> TensorParallel:
    """Join the ranks' default process group through ``store`` (rank 0 hosts it on a port the OS gave it,
    so that no other process can take the port between choosing and binding it)."""
    size = config.tensor_parallel_size
    cuda = config.resolved_device().type == "cuda"
    if cuda:
        torch.cuda.set_device(_rank_config(config, rank).resolved_device())
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // size))
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=size,
                            timeout=TP_TIMEOUT)
    return TensorParallel(rank, size, dist.group.WORLD)


def _teardown_default_group(runner, peers_alive: bool = True, timeout_s: float = 30.0) -> bool:
    """Tear down this process's default group -- and with it every group registered with torch.distributed; a TP
    engine refuses to start beside another group, and the weight-sync groups are not registered there. The
    device work and the decode graphs go first (``runner.release_cuda_graphs``): graphs that captured the group's
    all-reduces hold NCCL's resources, and on 2 x H200 (torch 2.11) rank 0's teardown waited for them until its
    timeout, after which the process wedged or died. With a dead peer a graph replay may never finish, so the
    graphs are left alone and the group aborted at once.

    NCCL: abort, which is local (it needs no peer, live or dead; at shutdown nothing in flight is worth
    finishing). Destroy after dropping the graphs was not tried on GPUs. Gloo (CPU): destroy, which is local.
    All of it in a thread joined for at most ``timeout_s``: a teardown that cannot finish is logged and left to
    process exit instead of hanging the caller."""
    from torch.distributed import distributed_c10d
    nccl = dist.get_backend() == "nccl"

    def teardown():
        if peers_alive:
            runner.release_cuda_graphs()
        (distributed_c10d._abort_process_group if nccl else dist.destroy_process_group)()

    done = threading.Thread(target=teardown, name="tp-group-teardown", daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        logger.warning("tensor-parallel group teardown did not finish within %.0fs; left to process exit", timeout_s)
        return False
    return True


class TensorParallelEngine(EngineCore):
    def __init__(self, config: EngineConfig, attention_backend: str = "auto"):
        from rlserve.engine.worker import check_tensor_parallel
        if dist.is_initialized():  # an earlier engine's group whose teardown never finished: fail before spawning
            raise RuntimeError("a tensor-parallel process group is still initialised in this process (an earlier "
                               "engine's teardown did not finish); start the engine in a new process")
        check_tensor_parallel(load_config(resolve_model_dir(config.model, config.revision), config.trust_remote_code),
                              config.tensor_parallel_size)
        store = dist.TCPStore("127.0.0.1", 0, config.tensor_parallel_size, is_master=True, timeout=TP_TIMEOUT,
                              wait_for_workers=False)
        spawn = multiprocessing.get_context("spawn")
        self.workers: list[multiprocessing.Process] = []
        self.pipes = []
        self._pipe_lock = threading.Lock()  # steps (main thread) and weight-sync joins (a thread) share pipes
        self._group = None  # the default process group this engine made (destroyed by shutdown(), if still it)
        self._num_threads = torch.get_num_threads()  # rank 0 runs in the caller's process: restored at shutdown
        self._is_shut_down = False
        for rank in range(1, config.tensor_parallel_size):
            parent, child = spawn.Pipe()
            proc = spawn.Process(target=run_tp_worker, name=f"rlserve-tp{rank}", daemon=True,
                                 args=(config, rank, store.port, child, attention_backend))
            proc.start()
            self.workers.append(proc)
            self.pipes.append(parent)
        tp = _init_group(config, 0, store)
        self._group = tp.group
        try:
            super().__init__(config, tp, attention_backend)
            for pipe in self.pipes:
                self._expect(pipe, "ready")
        except BaseException:  # (a refused memory share, a worker that failed to load, ...)
            self._abandon_start()
            raise
        me = weakref.proxy(self)  # not a bound method: engine <-> runner would be a cycle holding the KV cache
        self.runner.broadcast_step = lambda step: me._broadcast_step(step)

    def _abandon_start(self) -> None:
        """A start that failed stops its workers and drops the group, so that a later engine in this process (a
        retry with a smaller share) can make its own; the workers' own failures are in their logs."""
        for proc in self.workers:
            proc.terminate()
        for proc in self.workers:
            proc.join(10)
        if dist.is_initialized() and dist.group.WORLD is self._group:
            _teardown_default_group(None, peers_alive=False)
        self._group = None
        self._is_shut_down = True
        torch.set_num_threads(self._num_threads)
        if getattr(self, "runner", None) is not None:  # rank 0 loaded, a worker did not
            self.model = None
            self.runner.free_device_memory()

    def _expect(self, pipe, what: str, timeout_s: float = 600.0):
        if not pipe.poll(timeout_s):
            raise RuntimeError(f"tensor-parallel worker did not answer {what!r} within {timeout_s:.0f}s")
        status, payload = pipe.recv()
        if status != "ok":
            raise RuntimeError(f"tensor-parallel worker failed ({what}): {payload}")
        return payload

    def _send_all(self, message) -> None:
        """Every worker gets the message, or none does: with one dead, the others would enter the step's collectives
        and wait for it (and for rank 0, which raises here) until NCCL's timeout."""
        with self._pipe_lock:
            for proc in self.workers:
                if not proc.is_alive():
                    raise RuntimeError(f"tensor-parallel worker {proc.name} died (exit code {proc.exitcode})")
            for pipe in self.pipes:
                pipe.send(message)

    def _broadcast_step(self, step) -> None:
        self._send_all(("step", step))

    # -- operations every rank performs --------------------------------------------------------------
    def load_weights(self, weights, new_version: int | None = None) -> int:
        weights = [(name, tensor.detach().cpu()) for name, tensor in weights]
        self.drain()  # no step in flight on any rank while the weights change
        self._send_all(("load_weights", weights))
        version = super().load_weights(weights, new_version)
        for pipe in self.pipes:
            self._expect(pipe, "load_weights")
        return version

    def join_weight_sync(self, spec: dict, rank: int):
        self._send_all(("join_weight_sync", (spec, rank)))
        return super().join_weight_sync(spec, rank)

    def warm_up_weight_sync(self, group) -> None:
        self._send_all(("warm_up_weight_sync", None))
        super().warm_up_weight_sync(group)

    def receive_weights(self, group, buckets, discard: bool = False) -> int:
        self.drain()
        self._send_all(("receive_weights", (buckets, discard)))
        return super().receive_weights(group, buckets, discard)

    def close_weight_sync(self, group) -> None:
        self._send_all(("close_weight_sync", None))
        super().close_weight_sync(group)

    def shutdown(self) -> None:
        """Stop the workers and tear down this engine's process group -- only its own: the default group of
        this process may belong to a newer engine by now (``__del__`` runs whenever the garbage collector
        gets to an old engine, which used to destroy the group of the one starting or running then). Each rank
        tears down its own side (see _teardown_default_group: with NCCL an abort, which needs no peer)."""
        if self._is_shut_down:
            return
        self._is_shut_down = True
        for pipe in self.pipes:
            try:
                pipe.send(("shutdown", None))
            except (BrokenPipeError, OSError):
                pass
        peers_alive = all(proc.is_alive() for proc in self.workers)
        torn_down = True
        if self._group is not None and dist.is_initialized() and dist.group.WORLD is self._group:
            torn_down = _teardown_default_group(self.runner, peers_alive=peers_alive)
        self._group = None
        for proc in self.workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        torch.set_num_threads(self._num_threads)
        if peers_alive and torn_down:  # else a graph replay may still wait on a peer: its memory goes at exit
            self.model = None
            self.runner.free_device_memory()  # rank 0's shard, as a single-process engine's shutdown does

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


def run_tp_worker(config: EngineConfig, rank: int, store_port: int, pipe, attention_backend: str) -> None:
    """Process entry point of rank > 0: build the shard the same way rank 0 does, then serve its pipe."""
    logging.basicConfig(level="INFO", format=f"%(asctime)s tp{rank} %(levelname)s %(message)s")
    dump_stacks_on_sigusr1()
    try:
        from rlserve.engine.worker import load_worker
        store = dist.TCPStore("127.0.0.1", store_port, config.tensor_parallel_size, is_master=False,
                              timeout=TP_TIMEOUT)
        tp = _init_group(config, rank, store)
        if config.resolved_device().type == "cuda":
            from rlserve.engine.core_proc import limit_cpu_threads  # a GPU worker's host side: one thread
            limit_cpu_threads("cuda", 1)
        loaded = load_worker(_rank_config(config, rank), tp, attention_backend)
        freeze_startup_heap()  # the shard is loaded: rank 0's step waits on every pause of ours
        pipe.send(("ok", "ready"))
        TensorParallelWorker(loaded, rank, pipe).run()
    except Exception as e:  # reported to rank 0, which fails its step
        logger.error("tensor-parallel worker %d failed: %s\n%s", rank, e, traceback.format_exc())
        try:
            pipe.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        os._exit(1)


class TensorParallelWorker:
    def __init__(self, loaded, rank: int, pipe):
        self.runner, self.model, self.info = loaded.runner, loaded.model, loaded.info
        self.rank = rank
        self.pipe = pipe
        self.weight_sync = None
        self.joining: threading.Thread | None = None  # a join in progress (it waits for the trainer)
        self.join_generation = 0  # bumped by every join or close: a join thread keeps its group only if current
        self.lock = threading.Lock()

    def run(self) -> None:
        while True:
            kind, payload = self.pipe.recv()
            if kind == "step":
                if payload.num_steps > 1:  # a multi-step launch: each step's tokens come from rank 0
                    self.runner.follow_burst(payload)
                else:
                    self.runner.forward(payload)
            elif kind == "load_weights":
                self.model.load_weights(payload)
                self.pipe.send(("ok", None))
            elif kind == "join_weight_sync":
                self._close()
                self.joining = threading.Thread(target=self._join, args=(*payload, self.join_generation),
                                                daemon=True)
                self.joining.start()
            elif kind == "warm_up_weight_sync":
                self._with_group("warm-up", lambda group: group.warm_up())
            elif kind == "receive_weights":
                buckets, discard = payload
                self._with_group("weight update", lambda group: self._receive(group, buckets, discard))
            elif kind == "close_weight_sync":
                self._close()
            elif kind == "shutdown":
                self._close()
                if dist.is_initialized():
                    _teardown_default_group(self.runner)
                return
            else:  # rank 0 would wait for an answer that never comes: fail loudly instead
                raise RuntimeError(f"tensor-parallel worker {self.rank}: unknown message {kind!r}")

    def _join(self, spec: dict, rank: int, generation: int) -> None:
        """In a thread: the rendezvous waits for the trainer. No collective runs here (the warm-up comes
        through the pipe, in order with the steps), so NCCL launches on this rank stay ordered. A join that a
        later join or close overtook drops its group."""
        from rlserve.distributed.weight_sync import GroupSpec, WeightSyncGroup
        spec = GroupSpec(**spec)
        device = self.info.device if spec.backend == "nccl" else torch.device("cpu")
        try:
            group = WeightSyncGroup(spec, rank + self.rank, device)
        except Exception as e:  # rank 0 sees the group fail too (its warm-up times out)
            logger.error("weight-sync join failed on tp rank %d: %s", self.rank, e)
            return
        with self.lock:
            if generation == self.join_generation:
                self.weight_sync, group = group, None
        if group is not None:
            group.close()

    def _with_group(self, what: str, action) -> None:
        if self.joining is not None:
            # Rank 0 can finish its join, and the trainer start an update, a moment before this rank's join
            # thread has stored its group.
            self.joining.join(TP_TIMEOUT.total_seconds())
        group = self.weight_sync
        if group is None:
            logger.error("%s without a weight-sync group on tp rank %d", what, self.rank)
            return
        try:
            action(group)
        except Exception as e:
            logger.error("%s failed on tp rank %d: %s", what, self.rank, e)
            self._close()

    def _receive(self, group, buckets, discard: bool) -> None:
        from rlserve.distributed.weight_sync import receive_buckets
        receive_buckets(group, buckets, (lambda named: None) if discard else self.model.load_weights)
        if group.spec.barrier_after_update:
            group.barrier()

    def _close(self) -> None:
        """Drop the group, and the result of any join in flight."""
        with self.lock:
            self.join_generation += 1
            group, self.weight_sync = self.weight_sync, None
        if group is not None:
            group.close()
