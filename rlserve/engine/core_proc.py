"""An engine core in its own process: one data-parallel replica of the server.

A busy loop around ``EngineCore.step()``. Between steps it drains its input socket: new requests, aborts,
stop-string finishes, and utility calls (stats, prefix-cache reset, pause/resume, weight sync). It sends
finished sequences (and the tokens of streamed requests) to the API server after every step. An exception in
a step fails every in-flight request, reports the engine dead and exits non-zero: a supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback

import zmq

from rlserve.config import EngineConfig
from rlserve.engine import messages as msg

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25


class EngineCoreProc:
    def __init__(self, config: EngineConfig, replica: int, input_addr: str, output_addr: str, tp_rank_base: int):
        self.replica = replica
        self.tp_rank_base = tp_rank_base  # this replica's first rank in the weight-sync group
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.connect(input_addr)
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.connect(output_addr)
        self.outbox.setsockopt(zmq.LINGER, 2000)
        from rlserve.engine.executor import make_engine
        self.engine = make_engine(config)
        self.paused: str | None = None  # None, "keep" or "abort"
        self.draining_call: int | None = None  # a pause(mode="wait") answered once idle
        self.weight_sync = None
        self.weight_sync_error: str | None = None
        self.weights_partial = False
        self.last_stats = 0.0
        self.max_running = 0
        self.mean_step_seconds = 0.0  # exponential moving average
        self.last_weight_sync_seconds: float | None = None
        self.num_multi_request_steps = 0
        self.should_exit = False
        info = self.engine.info.summary()
        info["hf_weight_shapes"] = {k: list(v) for k, v in self.engine.model.hf_weight_shapes().items()}
        info["startup_seconds"] = self.engine.info.startup_seconds
        self.send(msg.EngineReady(replica, info, os.getpid()))

    def send(self, message) -> None:
        self.outbox.send_pyobj(message)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        while not self.should_exit:
            busy = self.engine.has_unfinished() and self.paused is None
            if poller.poll(0 if busy else 100):
                while True:
                    try:
                        self.handle(self.inbox.recv_pyobj(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self.should_exit:
                break
            if self.engine.has_unfinished() and self.paused is None:
                self.step()
            elif self.draining_call is not None:
                self.paused = "keep"
                self.send(msg.UtilityResult(self.draining_call, {"paused": True}))
                self.draining_call = None
            self.maybe_send_stats()

    def step(self) -> None:
        start = time.perf_counter()
        updates = self.engine.step()
        self.mean_step_seconds = 0.9 * self.mean_step_seconds + 0.1 * (time.perf_counter() - start)
        running = len(self.engine.scheduler.running)
        self.max_running = max(self.max_running, running)
        if len({s.request.request_id for s in self.engine.scheduler.running}) > 1:
            self.num_multi_request_steps += 1
        if updates:
            self.send(msg.StepOutputs(self.replica, updates))

    def maybe_send_stats(self) -> None:
        now = time.monotonic()
        if now - self.last_stats >= STATS_INTERVAL_S:
            self.last_stats = now
            self.send(msg.StepOutputs(self.replica, [], self.stats()))

    def stats(self) -> dict:
        stats = self.engine.stats()
        stats.update(replica=self.replica, paused=self.paused, max_running_seqs=self.max_running,
                     mean_step_seconds=self.mean_step_seconds, last_weight_sync_seconds=self.last_weight_sync_seconds,
                     num_multi_request_steps=self.num_multi_request_steps,
                     weight_sync_connected=self.weight_sync is not None,
                     weight_sync_error=self.weight_sync_error, weights_partial=self.weights_partial)
        return stats

    # -- messages ----------------------------------------------------------------------------------
    def handle(self, m) -> None:
        if isinstance(m, msg.AddRequest):
            try:
                self.engine.add_request(m.request_id, m.prompt_token_ids, m.params, m.stream)
            except ValueError as e:
                self.send(msg.RequestFailed(m.request_id, str(e), 400))
        elif isinstance(m, msg.AbortRequests):
            ids = list(self.engine.requests) if m.request_ids is None else m.request_ids
            updates = []
            for request_id in ids:
                updates += self.engine.abort_request(request_id)
            if updates:
                self.send(msg.StepOutputs(self.replica, updates))
        elif isinstance(m, msg.FinishSample):
            self.engine.finish_sample(m.request_id, m.index, m.stop_reason)
        elif isinstance(m, msg.UtilityCall):
            self.call(m)
        elif isinstance(m, msg.Shutdown):
            self.should_exit = True

    def call(self, m: msg.UtilityCall) -> None:
        method = getattr(self, f"rpc_{m.method}", None)
        if method is None:
            self.send(msg.UtilityResult(m.call_id, error=f"unknown method {m.method!r}", status=500))
            return
        try:
            result = method(m.call_id, **m.kwargs)
        except ValueError as e:
            self.send(msg.UtilityResult(m.call_id, error=str(e), status=400))
        except Exception as e:  # reported to the caller; the engine keeps serving
            logger.exception("utility call %s failed", m.method)
            self.send(msg.UtilityResult(m.call_id, error=f"{type(e).__name__}: {e}", status=500))
        else:
            if result is not DEFERRED:
                self.send(msg.UtilityResult(m.call_id, result))

    # -- utility calls: each returns a result, or DEFERRED when it answers later ----------------------
    def rpc_ping(self, call_id):
        return {"ok": True, "replica": self.replica}

    def rpc_stats(self, call_id):
        return self.stats()

    def rpc_reset_prefix_cache(self, call_id):
        self.engine.reset_prefix_cache()
        return {"ok": True}

    def rpc_pause(self, call_id, mode: str):
        if mode == "abort":
            updates = self.engine.abort_all()
            if updates:
                self.send(msg.StepOutputs(self.replica, updates))
            self.paused = "abort"
        elif mode == "keep":
            self.paused = "keep"
        elif mode == "wait":
            self.paused = None
            self.draining_call = call_id  # answered by the loop once no request is left
            return DEFERRED
        else:
            raise ValueError(f"mode must be 'abort', 'wait' or 'keep', got {mode!r}")
        return {"paused": True}

    def rpc_resume(self, call_id):
        self.paused = None
        return {"paused": False}

    def rpc_init_weight_sync(self, call_id, host: str, port: int, world_size: int, group_timeout_s: float):
        """Join the group in a thread, so that generation goes on while the trainer connects."""
        self._close_weight_sync()

        def join():
            from rlserve.distributed.weight_sync import WeightSyncGroup
            try:
                group = WeightSyncGroup(host, port, self.tp_rank_base, world_size, self.engine.info.device,
                                        group_timeout_s)
            except Exception as e:
                self.weight_sync_error = f"init_communicator failed: {type(e).__name__}: {e}"
                self.send(msg.UtilityResult(call_id, error=self.weight_sync_error, status=500))
                return
            self.weight_sync, self.weight_sync_error = group, None
            self.send(msg.UtilityResult(call_id, {"rank": self.tp_rank_base, "backend": group.backend}))

        threading.Thread(target=join, name="weight-sync-init", daemon=True).start()
        return DEFERRED

    def rpc_update_weights(self, call_id, buckets: list[dict], version: int):
        """Receive and load every bucket now, between two steps; then the new version holds."""
        from rlserve.distributed.weight_sync import BucketMeta, receive_buckets
        if self.weight_sync is None:
            raise ValueError("no weight-sync group: call init_communicator first")
        group = self.weight_sync
        metas = [BucketMeta.from_dict(b) for b in buckets]
        start = time.perf_counter()
        try:
            nbytes = receive_buckets(group, metas, self._load)
            group.barrier()
        except Exception as e:
            self.weights_partial = True
            self.weight_sync_error = f"update to version {version} failed: {type(e).__name__}: {e}"
            logger.error("%s; closing the weight-sync group", self.weight_sync_error)
            self._close_weight_sync()
            raise RuntimeError(self.weight_sync_error) from e
        self.engine.weight_version = version
        self.engine.reset_prefix_cache()
        self.weights_partial = False
        self.last_weight_sync_seconds = time.perf_counter() - start
        return {"version": version, "bytes": nbytes, "seconds": self.last_weight_sync_seconds}

    def _load(self, named) -> None:
        self.engine.model.load_weights(named)
        self.weights_partial = True  # until the whole update has landed

    def rpc_close_weight_sync(self, call_id):
        self._close_weight_sync()
        return {"ok": True}

    def _close_weight_sync(self) -> None:
        group, self.weight_sync = self.weight_sync, None
        if group is not None:
            group.close()


DEFERRED = object()


def run_engine_core(config: EngineConfig, replica: int, num_replicas: int, input_addr: str, output_addr: str,
                    tp_rank_base: int, log_level: str = "INFO") -> None:
    """Process entry point."""
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s replica{replica} %(levelname)s %(message)s")
    if config.resolved_device().type == "cpu" and num_replicas > 1:
        import torch  # replicas share the cores: oversubscribed threads spin against each other
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_replicas))
    proc = None
    try:
        proc = EngineCoreProc(config, replica, input_addr, output_addr, tp_rank_base)
        proc.run()
    except Exception as e:
        message = f"engine replica {replica} died: {type(e).__name__}: {e}"
        logger.error("%s\n%s", message, traceback.format_exc())
        try:
            if proc is not None:
                proc.send(msg.EngineDead(replica, message))
            else:
                ctx = zmq.Context.instance()
                sock = ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 2000)
                sock.connect(output_addr)
                sock.send_pyobj(msg.EngineDead(replica, message))
                sock.close()
        finally:
            os._exit(1)
    finally:
        if proc is not None:
            proc.outbox.close(linger=2000)
