"""The API server's handle on its engine cores: one process per data-parallel replica, reached over ZMQ.

It spawns the replicas, sends each request to the least-loaded one (outstanding tokens), gathers their
outputs through one ``OutputProcessor`` and resolves the awaiting HTTP handlers. It never blocks the event
loop: sockets are asyncio ZMQ sockets, and every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from rlserve.config import EngineConfig
from rlserve.engine import messages as msg
from rlserve.engine.core import validate_request
from rlserve.engine.core_proc import run_engine_core
from rlserve.engine.output_processor import OutputProcessor, RequestState, needs_streaming
from rlserve.outputs import RequestOutput
from rlserve.sampling import SamplingParams
from rlserve.server.errors import BadRequest, EngineUnavailable
from rlserve.tokenizer import render_chat

logger = logging.getLogger(__name__)


@dataclass
class Replica:
    index: int
    process: multiprocessing.Process
    socket: zmq.asyncio.Socket
    info: dict | None = None
    stats: dict = field(default_factory=dict)
    outstanding_tokens: int = 0
    dead: str | None = None
    request_ids: set[str] = field(default_factory=set)


class RuntimeView:
    """The bits of RuntimeInfo the API needs to validate requests, rebuilt from a replica's summary."""

    def __init__(self, info: dict):
        self.vocab_size = info["vocab_size"]
        self.max_model_len = info["max_model_len"]
        self.kv_capacity_tokens = info["kv_capacity_tokens"]


class EngineClient:
    def __init__(self, config: EngineConfig, data_parallel_size: int, tokenizer, log_level: str = "info"):
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        self.config = config
        self.data_parallel_size = data_parallel_size
        self.tokenizer = tokenizer
        self.log_level = log_level
        self.processor = OutputProcessor(tokenizer)
        self.ctx = zmq.asyncio.Context()
        self.ipc_dir = tempfile.mkdtemp(prefix="rlserve-")
        self.output_addr = f"ipc://{self.ipc_dir}/out"
        self.replicas: list[Replica] = []
        self.pending: dict[str, asyncio.Future] = {}  # request id -> future of its RequestOutput
        self.request_replica: dict[str, int] = {}
        self.calls: dict[int, asyncio.Future] = {}
        self.call_ids = itertools.count()
        self.ready = asyncio.Event()
        self.startup_error: str | None = None
        self.dead: str | None = None
        self.view: RuntimeView | None = None
        self.info: dict = {}
        self.weight_version = 0
        self.named_param_run_open = False
        self.weight_shapes: dict[str, tuple] = {}
        self.on_dead = None  # callback(message) when a replica dies
        self.counters = {"requests_ok": 0, "requests_failed": 0, "requests_aborted": 0,
                         "prompt_tokens": 0, "generation_tokens": 0}
        self._tasks: list[asyncio.Task] = []

    @property
    def world_size(self) -> int:
        return self.config.tensor_parallel_size * self.data_parallel_size

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self, timeout_s: float = 600.0) -> None:
        self.output = self.ctx.socket(zmq.PULL)
        self.output.bind(self.output_addr)
        spawn = multiprocessing.get_context("spawn")
        for r in range(self.data_parallel_size):
            addr = f"ipc://{self.ipc_dir}/in{r}"
            sock = self.ctx.socket(zmq.PUSH)
            sock.bind(addr)
            sock.setsockopt(zmq.LINGER, 0)
            config = self._replica_config(r)
            proc = spawn.Process(target=run_engine_core, name=f"rlserve-replica{r}", daemon=False,
                                 args=(config, r, self.data_parallel_size, addr, self.output_addr,
                                       r * self.config.tensor_parallel_size,
                                       self.log_level))
            proc.start()
            self.replicas.append(Replica(r, proc, sock))
        self._tasks = [asyncio.create_task(self._read_outputs()), asyncio.create_task(self._watch_processes())]
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            self.startup_error = f"engine replicas not ready after {timeout_s:.0f}s"
            raise EngineUnavailable(self.startup_error)
        if self.startup_error:
            raise EngineUnavailable(self.startup_error)

    def _replica_config(self, r: int) -> EngineConfig:
        """Replica r runs on devices [r*tp, (r+1)*tp) of the visible ones."""
        device = self.config.resolved_device()
        if device.type != "cuda":
            return self.config
        from dataclasses import replace
        base = (device.index or 0) + r * self.config.tensor_parallel_size
        return replace(self.config, device=f"cuda:{base}")

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        for replica in self.replicas:
            if replica.process.is_alive():
                try:
                    await replica.socket.send_pyobj(msg.Shutdown())
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + timeout_s
        for replica in self.replicas:
            while replica.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if replica.process.is_alive():
                replica.process.terminate()
                replica.process.join(5)
            if replica.process.is_alive():
                replica.process.kill()
                replica.process.join(5)
        for task in self._tasks:
            task.cancel()
        self._fail_all(EngineUnavailable("server is shutting down"))
        self.ctx.destroy(linger=0)
        try:
            for name in os.listdir(self.ipc_dir):
                os.unlink(os.path.join(self.ipc_dir, name))
            os.rmdir(self.ipc_dir)
        except OSError:
            pass

    @property
    def is_serving(self) -> bool:
        return self.ready.is_set() and self.dead is None and self.startup_error is None

    def check_serving(self) -> None:
        if self.dead is not None:
            raise EngineUnavailable(f"engine is dead: {self.dead}")
        if not self.ready.is_set():
            raise EngineUnavailable("engine is starting")

    # -- generation --------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(self.view, prompt_token_ids, params, self.config.max_logprobs)

    async def generate(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams,
                       detokenize: bool = False, is_disconnected=None) -> list[RequestOutput]:
        """Run every prompt (with its n samples) on a replica; outputs in input order. Validates everything
        first, so a bad prompt queues nothing. ``is_disconnected``: an async callable; when it turns true, the
        request is aborted and its KV blocks freed."""
        self.check_serving()
        for i, (_, ids) in enumerate(prompts):
            try:
                self.validate(ids, params)
            except ValueError as e:
                raise BadRequest(f"prompts[{i}]: {e}", param="prompts") from None
        group = uuid.uuid4().hex[:12]
        request_ids = [f"{group}-{i}" for i in range(len(prompts))]
        futures = []
        loop = asyncio.get_running_loop()
        for request_id, (text, ids) in zip(request_ids, prompts):
            replica = min((r for r in self.replicas if r.dead is None), key=lambda r: r.outstanding_tokens)
            cost = (len(ids) + (params.max_tokens or 0)) * params.n
            replica.outstanding_tokens += cost
            replica.request_ids.add(request_id)
            self.request_replica[request_id] = replica.index
            future = loop.create_future()
            future.cost = cost
            self.pending[request_id] = future
            futures.append(future)
            self.processor.add_request(request_id, text, ids, params, detokenize)
            await replica.socket.send_pyobj(msg.AddRequest(request_id, ids, params, needs_streaming(params)))
            self.counters["prompt_tokens"] += len(ids)
        try:
            gathered = asyncio.gather(*futures)
            while True:
                done, _ = await asyncio.wait([gathered], timeout=0.25)
                if done:
                    return gathered.result()
                if is_disconnected is not None and await is_disconnected():
                    logger.info("client went away: aborting %d request(s)", len(request_ids))
                    await self.abort(request_ids)
                    self.counters["requests_aborted"] += len(request_ids)
                    raise asyncio.CancelledError("client disconnected")
        except BaseException:
            await self.abort([r for r in request_ids if r in self.pending])
            raise

    async def abort(self, request_ids: list[str] | None) -> None:
        """Abort some requests (None: all) on every replica that holds them."""
        by_replica: dict[int, list[str]] = {}
        for request_id in (list(self.pending) if request_ids is None else request_ids):
            replica = self.request_replica.get(request_id)
            if replica is not None:
                by_replica.setdefault(replica, []).append(request_id)
        for replica, ids in by_replica.items():
            r = self.replicas[replica]
            if r.dead is None:
                await r.socket.send_pyobj(msg.AbortRequests(ids))

    def render_chat(self, conversation, chat_template_kwargs=None, tools=None) -> list[int]:
        return render_chat(self.tokenizer, conversation, chat_template_kwargs, tools)

    # -- weight versions ---------------------------------------------------------------------------
    def next_weight_version(self, named_param: bool = False) -> int:
        """A bucketed update is one version; a run of per-tensor updates (TRL's protocol) shares one,
        which ends with the next generation request or prefix-cache reset."""
        if not (named_param and self.named_param_run_open):
            self.weight_version += 1
        self.named_param_run_open = named_param
        return self.weight_version

    def end_named_param_run(self) -> None:
        self.named_param_run_open = False

    # -- utility calls -----------------------------------------------------------------------------
    async def call(self, replica: int, method: str, timeout_s: float = 30.0, **kwargs):
        r = self.replicas[replica]
        if r.dead is not None:
            raise EngineUnavailable(f"replica {replica} is dead: {r.dead}")
        call_id = next(self.call_ids)
        future = asyncio.get_running_loop().create_future()
        self.calls[call_id] = future
        await r.socket.send_pyobj(msg.UtilityCall(call_id, method, kwargs))
        try:
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"replica {replica} did not answer {method} within {timeout_s:.0f}s") from None
        finally:
            self.calls.pop(call_id, None)

    async def call_all(self, method: str, timeout_s: float = 30.0, **kwargs) -> list:
        return await asyncio.gather(*(self.call(r.index, method, timeout_s, **kwargs) for r in self.replicas))

    def send_all_nowait(self, method: str, **kwargs) -> list[asyncio.Future]:
        """Start a call on every replica without waiting for the answers (returned as futures)."""
        return [asyncio.ensure_future(self.call(r.index, method, 3600.0, **kwargs)) for r in self.replicas]

    # -- receiving ---------------------------------------------------------------------------------
    async def _read_outputs(self) -> None:
        while True:
            try:
                m = await self.output.recv_pyobj()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            try:
                self._dispatch(m)
            except Exception:
                logger.exception("failed to process an engine message %r", type(m).__name__)

    def _dispatch(self, m) -> None:
        if isinstance(m, msg.StepOutputs):
            if m.stats is not None:
                self.replicas[m.replica].stats = m.stats
            for update in m.updates:
                done, finish = self.processor.process(update)
                if finish is not None:
                    replica = self.replicas[m.replica]
                    asyncio.ensure_future(replica.socket.send_pyobj(msg.FinishSample(*finish)))
                if done is not None:
                    self._resolve(done)
        elif isinstance(m, msg.UtilityResult):
            future = self.calls.get(m.call_id)
            if future is not None and not future.done():
                if m.error is None:
                    future.set_result(m.result)
                else:
                    future.set_exception(BadRequest(m.error) if m.status == 400 else RuntimeError(m.error))
        elif isinstance(m, msg.RequestFailed):
            self.processor.states.pop(m.request_id, None)
            self._finish(m.request_id, exception=BadRequest(m.message, param="prompts"))
        elif isinstance(m, msg.EngineReady):
            self.replicas[m.replica].info = m.info
            if all(r.info is not None for r in self.replicas):
                first = self.replicas[0].info
                self.info = {k: v for k, v in first.items() if k != "hf_weight_shapes"}
                self.info["kv_capacity_tokens"] = min(r.info["kv_capacity_tokens"] for r in self.replicas)
                self.view = RuntimeView(self.info)
                self.weight_shapes = {k: tuple(v) for k, v in first["hf_weight_shapes"].items()}
                self.ready.set()
        elif isinstance(m, msg.EngineDead):
            self._mark_dead(m.replica, m.message)

    def _resolve(self, state: RequestState) -> None:
        output = state.to_output()
        failed = any(o.finish_reason == "error" for o in output.outputs)
        self.counters["requests_failed" if failed else "requests_ok"] += 1
        self.counters["generation_tokens"] += sum(len(o.token_ids) for o in output.outputs)
        self._finish(state.request_id, result=output)

    def _finish(self, request_id: str, result=None, exception=None) -> None:
        future = self.pending.pop(request_id, None)
        replica = self.request_replica.pop(request_id, None)
        if replica is not None:
            r = self.replicas[replica]
            r.request_ids.discard(request_id)
            if future is not None:
                r.outstanding_tokens -= getattr(future, "cost", 0)
        if future is not None and not future.done():
            if exception is not None:
                future.set_exception(exception)
            else:
                future.set_result(result)

    def _mark_dead(self, replica: int, message: str) -> None:
        r = self.replicas[replica]
        if r.dead is not None:
            return
        r.dead = message
        self.dead = message
        logger.error("%s", message)
        if not self.ready.is_set():
            self.startup_error = message
            self.ready.set()
        for request_id in list(r.request_ids):
            self.processor.states.pop(request_id, None)
            self._finish(request_id, exception=EngineUnavailable(message))
        for future in self.calls.values():
            if not future.done():
                future.set_exception(EngineUnavailable(message))
        if self.on_dead is not None:
            self.on_dead(message)

    def _fail_all(self, exception: Exception) -> None:
        for request_id in list(self.pending):
            self.processor.states.pop(request_id, None)
            self._finish(request_id, exception=exception)

    async def _watch_processes(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for r in self.replicas:
                if r.dead is None and not r.process.is_alive():
                    await asyncio.sleep(0.5)  # let a last EngineDead message arrive first
                    self._mark_dead(r.index, f"engine replica {r.index} exited with code {r.process.exitcode}")

    # -- introspection -----------------------------------------------------------------------------
    def aggregate_stats(self) -> dict:
        total: dict = {}
        for r in self.replicas:
            for key, value in r.stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "replica":
                    total[key] = total.get(key, 0) + value
        return total
