"""An engine core in its own process: one data-parallel replica of the server.

A busy loop around ``EngineCore.step()``. Between steps it drains its input socket: new requests, aborts,
and utility calls, one typed message each (stats, prefix-cache reset, pause/resume, weight sync). It sends
finished sequences (and the tokens of streamed requests) to the API server after every step. An error in one
request's own work -- admitting it, its sampling parameters, its grammar, applying its token -- fails only that
request (finish reason "error"). Any other exception in a step (the forward, the sampler) fails every
in-flight request, reports the engine dead and exits non-zero: a supervisor restarts it. If the API server
dies without telling us (a SIGKILL), the loop notices that its parent is gone and exits, so that no engine outlives its server.

Pause modes (between steps): ``abort`` ends every in-flight request now (finish reason "abort", with what it
generated); ``wait`` lets them finish, then pauses; ``keep`` freezes them, KV cache and all, until ``resume``.
A paused engine still admits requests (they wait), aborts, reports stats and loads weights.

Weight updates run between steps too. One that comes in parts (TRL's per-tensor updates; vLLM's
start/update/finish) freezes stepping like ``keep`` until it is applied, so that no token is generated on a mix
of old and new weights; a trainer that goes quiet mid-update cannot freeze the engine for good (a deadline).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback

import zmq

from rlserve.config import EngineConfig
from rlserve.debug import GcPauses, dump_stacks_on_sigusr1, freeze_startup_heap
from rlserve.engine import messages as msg
from rlserve.engine.validation import PROMPT, InvalidRequest
from rlserve.engine.transport import CurveKeys, secure_connecting_socket

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25


def _partial_output_interval(text: str) -> float | None:
    """$RLSERVE_PARTIAL_OUTPUT_INTERVAL_S: seconds (tests: 0, every step), or "off" (each sample once, at its end)."""
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise ValueError(f"$RLSERVE_PARTIAL_OUTPUT_INTERVAL_S must be seconds >= 0 or 'off', got {text!r}")
    return seconds


# A running non-streamed sample's new tokens go to the API server this often (EngineCore.partial_output_interval_s):
# it unpickles and gathers them while the batch runs, instead of all of an RL batch's (~3.5 MB for 512 x 512
# tokens with logprobs) after its last step, where they delayed the answer (rl-small on an H200: the server's
# generate phase went from 0.07-0.09 s over its replica's steps to 0.05 s). A send of 512 samples' updates costs
# the replica ~1-1.5 ms (building and pickling them), so 5 a second add under 1% to its host work; with async
# scheduling that work overlaps the device's.
PARTIAL_OUTPUT_INTERVAL_S = _partial_output_interval(os.environ.get("RLSERVE_PARTIAL_OUTPUT_INTERVAL_S", "0.2"))


class EngineCoreProc:
    def __init__(self, config: EngineConfig, replica: int, input_addr: str, output_addr: str, tp_rank_base: int,
                 parent_pid: int | None = None, generation: int = 0, curve: CurveKeys | None = None):
        self.replica = replica
        self.generation = generation  # stamped on what names the replica: a restarted one's forerunner is ignored
        self.parent_pid = parent_pid  # the API server; when it is gone, so are we
        self.tp_rank_base = tp_rank_base  # this replica's first rank in the weight-sync group
        self.gc_pauses = GcPauses()  # in stats: what the collector cost this replica's loop
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        secure_connecting_socket(self.inbox, curve)
        self.inbox.connect(input_addr)
        self.outbox = self.ctx.socket(zmq.PUSH)
        secure_connecting_socket(self.outbox, curve)
        self.outbox.connect(output_addr)
        self.outbox.setsockopt(zmq.LINGER, 2000)
        from rlserve.engine.executor import make_engine
        self.engine = make_engine(config)
        self.engine.partial_output_interval_s = PARTIAL_OUTPUT_INTERVAL_S
        self.paused: str | None = None  # None, "keep" or "abort"
        self.draining_calls: list[int] = []  # pause(mode="wait") calls, answered once idle
        self.weight_sync = None
        self.weight_sync_error: str | None = None
        self.joined: queue.SimpleQueue = queue.SimpleQueue()  # (generation, call id, group, error) from joins
        self.join_generation = 0
        self.update: dict | None = None  # an update in progress: no step runs until it is applied or expires
        self.update_error: str | None = None  # why the last update did not complete
        self.last_stats = 0.0
        self.max_running = 0
        self.mean_step_seconds = 0.0  # exponential moving average
        self.step_seconds_total = 0.0  # cumulative, like num_steps: a benchmark subtracts two readings
        self.last_weight_sync_seconds: float | None = None
        self.num_multi_request_steps = 0
        self.should_exit = False
        info = self.engine.info.summary()
        info["hf_weight_shapes"] = {k: list(v) for k, v in self.engine.model.hf_weight_shapes().items()}
        info["startup_seconds"] = self.engine.info.startup_seconds
        info["protocol"] = msg.PROTOCOL  # the API server refuses a replica running other message classes
        self.send(msg.EngineReady(replica, info, os.getpid(), generation))

    def send(self, message) -> None:
        """Every message goes out after the updates of a step in flight that a drain applied (async scheduling):
        a drain's tokens come before anything that happened after it -- an abort's finished update, a utility
        call's result -- so a client never gets a sample's tokens after its end or after the call returned."""
        self.flush_drained()
        self.outbox.send_pyobj(message)

    def flush_drained(self) -> None:
        """Send the updates a drain (a weight or prefix-cache change) applied outside ``step()``, if any."""
        engine = getattr(self, "engine", None)  # EngineReady goes out once the engine exists; nothing before
        drained = engine.take_drained() if engine is not None else None
        if drained:
            self.outbox.send_pyobj(msg.StepOutputs(self.replica, drained, generation=self.generation))

    def close(self) -> None:
        """Stop what the engine started (tensor-parallel workers) before the interpreter's exit hooks, which
        would wait forever on daemon workers that ignore SIGTERM as we do; then flush the outbox."""
        try:
            self._close_weight_sync()
        except Exception:  # a dead tensor-parallel worker: the shutdown below must run all the same
            logger.exception("closing the weight sync failed")
        try:
            self.engine.shutdown()
        except Exception:
            logger.exception("engine shutdown failed")
        self.gc_pauses.close()
        self.ctx.destroy(linger=2000)  # flushes what is still queued for the API server

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        while not self.should_exit:
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                logger.error("the API server (pid %d) is gone: exiting", self.parent_pid)
                break
            busy = self.can_step()
            if poller.poll(0 if busy else 100):
                while True:
                    try:
                        self.handle(self.inbox.recv_pyobj(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if self.should_exit:
                break
            self.finish_joins()
            self.expire_update()
            self.flush_drained()  # a step in flight applied before a weight or cache change (also in ``send``)
            if self.can_step():
                self.step()
            elif self.draining_calls and not self.engine.has_unfinished():
                self.paused = "keep"
                for call_id in self.draining_calls:
                    self.send(msg.UtilityResult(call_id, {"paused": True}))
                self.draining_calls = []
            self.maybe_send_stats()

    def can_step(self) -> bool:
        return self.engine.has_unfinished() and self.paused is None and self.update is None

    def step(self) -> None:
        start = time.perf_counter()
        updates = self.engine.step()
        seconds = time.perf_counter() - start
        self.mean_step_seconds = 0.9 * self.mean_step_seconds + 0.1 * seconds
        self.step_seconds_total += seconds
        running = len(self.engine.scheduler.running)
        self.max_running = max(self.max_running, running)
        seqs = self.engine.scheduler.running
        if seqs and any(s.request is not seqs[0].request for s in seqs):  # stops at the first other request
            self.num_multi_request_steps += 1
        if updates:
            self.send(msg.StepOutputs(self.replica, updates, generation=self.generation))

    def maybe_send_stats(self) -> None:
        now = time.monotonic()
        if now - self.last_stats >= STATS_INTERVAL_S:
            self.last_stats = now
            self.send(msg.StepOutputs(self.replica, [], self.stats(), self.generation))

    def stats(self) -> dict:
        stats = self.engine.stats()
        stats.update(replica=self.replica, paused=self.paused, max_running_seqs=self.max_running,
                     mean_step_seconds=self.mean_step_seconds,
                     step_seconds_total=self.step_seconds_total, last_weight_sync_seconds=self.last_weight_sync_seconds,
                     num_multi_request_steps=self.num_multi_request_steps,
                     weight_sync_connected=self.weight_sync is not None,
                     weight_sync_error=self.weight_sync_error, weights_partial=self.engine.weights_partial,
                     weight_update_open=self.update is not None, **self.gc_pauses.stats())
        return stats

    # -- messages ----------------------------------------------------------------------------------
    def handle(self, m) -> None:
        if isinstance(m, msg.AddRequests):
            for request in m.requests:
                self.add(request)
        elif isinstance(m, msg.AbortRequests):
            ids = list(self.engine.requests) if m.request_ids is None else m.request_ids
            updates = []
            for request_id in ids:
                updates += self.engine.abort_request(request_id)
            if updates:
                self.send(msg.StepOutputs(self.replica, updates, generation=self.generation))
        elif isinstance(m, msg.UtilityCall):
            self.call(m)
        elif isinstance(m, msg.Shutdown):
            self.should_exit = True

    def add(self, m: msg.AddRequest) -> None:
        try:
            self.engine.add_request(m.request_id, m.prompt_token_ids, m.params, m.stream)
        except InvalidRequest as e:  # admission's limits were not this replica's (see EngineCore._check_runnable)
            self.send(msg.RequestFailed(m.request_id, e.message, 400, "prompts" if e.field == PROMPT else e.field))
        except ValueError as e:  # what admission could not check without the tokenizer: a grammar it refuses
            field = "structured_outputs" if m.params.structured_outputs is not None else "request"
            self.send(msg.RequestFailed(m.request_id, str(e), 400, field))
        except Exception as e:  # one bad request must not take the engine down
            logger.exception("could not admit request %s", m.request_id)
            if m.request_id in self.engine.requests:
                try:
                    self.engine.abort_request(m.request_id)
                except Exception:
                    logger.exception("could not clean up request %s", m.request_id)
            self.send(msg.RequestFailed(m.request_id, f"{type(e).__name__}: {e}", 500))

    def call(self, m: msg.UtilityCall) -> None:
        try:
            result = self.utility(m.call_id, m.op)
        except ValueError as e:
            self.send(msg.UtilityResult(m.call_id, error=str(e), status=400))
        except Exception as e:  # reported to the caller; the engine keeps serving
            logger.exception("utility call %s failed", type(m.op).__name__)
            self.send(msg.UtilityResult(m.call_id, error=f"{type(e).__name__}: {e}", status=500))
        else:
            if result is not DEFERRED:
                self.send(msg.UtilityResult(m.call_id, result))
        finally:
            self.flush_drained()  # a deferred call drained too: its tokens go out now, before any later message

    def utility(self, call_id: int, op: msg.Utility):
        """One operation per message class, dispatched here and nowhere else."""
        match op:
            case msg.Ping():
                return {"ok": True, "replica": self.replica}
            case msg.GetStats():
                return self.stats()
            case msg.ResetPrefixCache():
                self.engine.reset_prefix_cache()
                return {"ok": True}
            case msg.Pause(mode=mode):
                return self.pause(call_id, mode)
            case msg.Resume():
                return self.resume()
            case msg.InitWeightSync(spec=spec):
                return self.init_weight_sync(call_id, spec)
            case msg.CloseWeightSync():
                return self.close_weight_sync()
            case msg.BeginWeightUpdate(update_timeout_s=timeout_s):
                return self.begin_weight_update(timeout_s)
            case msg.UpdateWeights():
                return self.update_weights(op)
            case msg.FinishWeightUpdate(version=version):
                return self.finish_weight_update(version)
        raise RuntimeError(f"unknown utility operation {type(op).__name__}")

    # -- utility operations: each returns a result, or DEFERRED when it answers later ----------------
    def pause(self, call_id: int, mode: str):
        if mode == "abort":
            updates = self.engine.abort_all()
            if updates:
                self.send(msg.StepOutputs(self.replica, updates, generation=self.generation))
            self.paused = "abort"
        elif mode == "keep":
            self.paused = "keep"
        elif mode == "wait":
            self.paused = None  # a frozen ("keep") engine runs its requests to the end too
            self.draining_calls.append(call_id)  # answered by the loop once no request is left
            return DEFERRED
        else:
            raise ValueError(f"mode must be 'abort', 'wait' or 'keep', got {mode!r}")
        return {"paused": True}

    def resume(self):
        self.paused = None
        for waiting in self.draining_calls:  # a resume overrides a pause that has not happened yet
            self.send(msg.UtilityResult(waiting, {"paused": False}))
        self.draining_calls = []
        return {"paused": False}

    # -- weight sync ---------------------------------------------------------------------------------
    def init_weight_sync(self, call_id: int, spec: dict):
        """Join the group in a thread, so that generation goes on while the trainer connects; the group's
        warm-up collective then runs in the loop, between steps (``finish_joins``), and answers the call."""
        self._close_weight_sync()
        generation = self.join_generation
        rank = spec["rank_offset"] + self.tp_rank_base

        def join():
            logger.info("joining the weight-sync group at %s:%d as rank %d of %d (%s)", spec["host"], spec["port"],
                        rank, spec["world_size"], spec["backend"])
            try:
                group = self.engine.join_weight_sync(spec, rank)
            except Exception as e:
                self.joined.put((generation, call_id, None, f"{type(e).__name__}: {e}"))
            else:
                self.joined.put((generation, call_id, group, None))

        threading.Thread(target=join, name="weight-sync-init", daemon=True).start()
        return DEFERRED

    def finish_joins(self) -> None:
        while not self.joined.empty():
            generation, call_id, group, error = self.joined.get()
            if generation != self.join_generation:  # closed or replaced by a later init meanwhile
                if group is not None:
                    group.close()  # ours only: the workers have dropped theirs already
                self.send(msg.UtilityResult(call_id, error="replaced by a later init or close", status=409))
                continue
            if error is None:
                try:
                    self.engine.warm_up_weight_sync(group)
                except Exception as e:
                    self.engine.close_weight_sync(group)
                    error = f"{type(e).__name__}: {e}"
            if error is not None:
                self.weight_sync_error = f"init_communicator failed: {error}"
                logger.error(self.weight_sync_error)
                self.send(msg.UtilityResult(call_id, error=self.weight_sync_error, status=500))
                continue
            self.weight_sync, self.weight_sync_error = group, None
            logger.info("joined the weight-sync group as rank %d (%s)", group.rank, group.backend)
            self.send(msg.UtilityResult(call_id, {"rank": group.rank, "backend": group.backend}))

    def begin_weight_update(self, update_timeout_s: float):
        """vLLM's start_weight_update: no step runs until finish_weight_update, so that no token is generated
        on a mix of old and new weights -- or until ``update_timeout_s`` pass without a call of the update."""
        if self.weight_sync is None:
            raise ValueError("no weight-sync group: call init_weight_transfer_engine first")
        self._open_update(update_timeout_s)
        return {"ok": True}

    def update_weights(self, op: msg.UpdateWeights):
        """Receive and load every bucket now, between two steps. With ``version``: a whole update, which holds
        at once. Without: one part of an update (opened here if none is: ``run_version`` is the version it
        will hold), applied by finish_weight_update, or once ``run_timeout_s`` pass without another part.
        ``discard``: receive and drop an update that was refused after the trainer began sending; it ends the
        update in progress (the trainer will not finish it)."""
        from rlserve.distributed.weight_sync import BucketMeta
        buckets, version, discard = op.buckets, op.version, op.discard
        if self.weight_sync is None:
            raise ValueError("no weight-sync group: call init_communicator first")
        group = self.weight_sync
        if version is None and not discard:
            self._open_update(op.run_timeout_s, op.run_version)
        metas = [BucketMeta.from_dict(b) for b in buckets]
        start = time.perf_counter()
        try:
            nbytes = self.engine.receive_weights(group, metas, discard)
        except Exception as e:
            self.weight_sync_error = f"weight update failed: {type(e).__name__}: {e}"
            logger.error("%s; closing the weight-sync group", self.weight_sync_error)
            self._close_weight_sync()
            self._end_update(self.weight_sync_error)  # weights_partial stays set: the weights are a mix
            raise RuntimeError(self.weight_sync_error) from e
        self.last_weight_sync_seconds = time.perf_counter() - start
        if discard:
            if self.update is not None:
                self._end_update("the update was refused")
        elif version is not None:
            self._apply_update(version)
        else:
            self.update["deadline"] = time.monotonic() + self.update["timeout_s"]
        return {"version": version, "bytes": nbytes, "seconds": self.last_weight_sync_seconds}

    def finish_weight_update(self, version: int):
        """Apply the update in progress as ``version``. Refused (ValueError) when none is: it failed, was
        refused or expired -- the weights are then not labelled with a version they may not be."""
        if self.update is None:
            raise ValueError(f"no weight update in progress to finish"
                             f"{': ' + self.update_error if self.update_error else ''}")
        self._apply_update(version)
        return {"version": version}

    def _open_update(self, timeout_s: float, version: int | None = None) -> None:
        if self.update is None:
            self.update = {"version": version, "timeout_s": timeout_s}
            self.update_error = None
        self.update["deadline"] = time.monotonic() + timeout_s

    def _apply_update(self, version: int) -> None:
        self.engine.drain()  # a step in flight (async scheduling) drew its tokens on the weights before this version
        self.update = None
        self.engine.weight_version = version
        self.engine.weights_partial = False
        self.engine.reset_prefix_cache()

    def _end_update(self, error: str) -> None:
        """An update that will not be completed: serve again, on whatever the weights now are (a mix, when any
        part had loaded: ``weights_partial`` says so)."""
        self.update = None
        self.update_error = error
        self.engine.reset_prefix_cache()

    def expire_update(self) -> None:
        """The trainer went quiet in the middle of an update: a run of per-tensor updates (TRL <= 1.10) is
        complete at this point; a vLLM-style update without its finish is not."""
        update = self.update
        if update is None or time.monotonic() < update["deadline"]:
            return
        if update["version"] is not None:
            self._apply_update(update["version"])
        else:
            logger.error("weight update not finished within %.0fs: serving on", update["timeout_s"])
            self._end_update("not finished in time")

    def close_weight_sync(self):
        self._close_weight_sync()
        if self.update is not None:
            self.update["deadline"] = 0.0
            self.expire_update()
        return {"ok": True}

    def _close_weight_sync(self) -> None:
        """Drop the group, and any join still in flight (its result will be discarded)."""
        self.join_generation += 1
        group, self.weight_sync = self.weight_sync, None
        self.engine.close_weight_sync(group)


DEFERRED = object()


def limit_cpu_threads(device_type: str, num_replicas: int) -> None:
    """PyTorch's intra-op threads of a replica process. On CPU the replicas share the cores: oversubscribed
    threads spin against each other. On a GPU the host side is one Python thread issuing small ops, and every
    replica owning an OpenMP pool the size of the machine only makes them compete with each other and with the
    API process (vLLM's GPU workers run one thread too); $OMP_NUM_THREADS, when set, is the user's call there."""
    import torch
    if device_type == "cpu":
        if num_replicas > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_replicas))
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)


def run_engine_core(config: EngineConfig, replica: int, num_replicas: int, input_addr: str, output_addr: str,
                    tp_rank_base: int, log_level: str = "INFO", parent_pid: int | None = None,
                    hosted: bool = False, generation: int = 0, curve: CurveKeys | None = None) -> None:
    """Process entry point. ``parent_pid``: the API server's pid (default: our parent's now). ``hosted``: we
    run inside a process someone else owns (a Ray actor): it keeps its signals and its thread count, and
    there is no parent to watch (Ray ends the actor when the API server, its owner, is gone). ``generation``: the
    replica's restarts so far, stamped on the messages that name it. ``curve``: the keys of a replica that reaches
    the API server over tcp:// (engine/transport.py); None over ipc://."""
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s replica{replica} %(levelname)s %(message)s")
    if not hosted:
        dump_stacks_on_sigusr1()
        # Ctrl-C in a terminal, or a supervisor that signals the whole process group, must not kill the engine
        # under the API server while it drains: the server stops us (a Shutdown message, then SIGKILL), and we
        # exit on our own if it dies.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        limit_cpu_threads(config.resolved_device().type, num_replicas)
    proc = None
    try:
        proc = EngineCoreProc(config, replica, input_addr, output_addr, tp_rank_base,
                              parent_pid=None if hosted else parent_pid or os.getppid(), generation=generation,
                              curve=curve)
        # The engine is built and its CUDA graphs captured: what exists now lives as long as the process (a Ray
        # actor's too: it is this replica's alone). Here, not in the constructor: it is a process-wide setting.
        freeze_startup_heap()
        proc.run()
    except Exception as e:
        message = f"engine replica {replica} died: {type(e).__name__}: {e}"
        logger.error("%s\n%s", message, traceback.format_exc())
        try:
            if proc is not None:
                proc.send(msg.EngineDead(replica, message, generation))
                ctx = proc.ctx
            else:
                ctx = zmq.Context.instance()
                sock = ctx.socket(zmq.PUSH)
                secure_connecting_socket(sock, curve)
                sock.connect(output_addr)
                sock.send_pyobj(msg.EngineDead(replica, message, generation))
            ctx.destroy(linger=2000)  # ZMQ sends from its own thread: flush before os._exit, or the cause is lost
        finally:
            os._exit(1)
    finally:
        if proc is not None:  # a normal exit (Shutdown, or the API server gone)
            proc.close()
