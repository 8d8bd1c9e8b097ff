"""The API server's handle on its engine cores: one process per data-parallel replica, reached over ZMQ.

It spawns the replicas, sends each request to the least-loaded one (outstanding tokens), gathers their
outputs through one ``OutputProcessor`` and resolves the awaiting HTTP handlers. It never blocks the event
loop: sockets are asyncio ZMQ sockets, and every wait has a timeout.

Failures: a replica that reports itself dead, or whose process exits, fails every in-flight request with a
503 that names the cause and marks the whole client dead (``on_dead`` stops the server, a supervisor restarts
it). A request that fails alone -- refused by its replica, a sample that ends with finish reason "error" in
the engine, or an output that cannot be processed -- fails alone (400 or 500, naming the cause).
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
from rlserve.engine.core_proc import run_engine_core
from rlserve.engine.output_processor import OutputProcessor, RequestState
from rlserve.engine.validation import PROMPT, InvalidRequest, Limits, admit
from rlserve.outputs import RequestOutput
from rlserve.sampling import SamplingParams
from rlserve.server.errors import BadRequest, Conflict, EngineUnavailable, ServerError
from rlserve.tokenizer import render_chat

logger = logging.getLogger(__name__)

SEND_TIMEOUT_S = 30.0  # a live replica reads its input between steps; a full pipe this long means a hung one


class ClientDisconnected(ServerError):
    """The HTTP client went away; its requests were aborted. Nobody reads the answer (nginx's 499)."""
    status = 499
    type = "client_closed_request"


@dataclass
class Replica:
    index: int
    process: multiprocessing.Process
    socket: zmq.asyncio.Socket
    info: dict | None = None
    stats: dict = field(default_factory=dict)
    outstanding_tokens: int = 0
    dead: str | None = None
    died: asyncio.Event = field(default_factory=asyncio.Event)  # set with ``dead``
    request_ids: set[str] = field(default_factory=set)


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
        self.limits: Limits | None = None  # admission's view of the replicas, once all are ready
        self.info: dict = {}
        self.weight_version = 0
        self.named_param_run: int | None = None  # the version an open run of per-tensor updates will hold
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
                                       self.log_level),
                                 kwargs={"parent_pid": os.getpid()})
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
        """Replica r knows its index (its own request seeds) and runs on devices [r*tp, (r+1)*tp) of the
        visible ones."""
        from dataclasses import replace
        device = self.config.resolved_device()
        if device.type != "cuda":
            return replace(self.config, data_parallel_rank=r)
        base = (device.index or 0) + r * self.config.tensor_parallel_size
        return replace(self.config, data_parallel_rank=r, device=f"cuda:{base}")

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        for replica in self.replicas:
            if replica.process.is_alive():
                try:
                    await self.send(replica, msg.Shutdown(), timeout_s=1.0)
                except (zmq.ZMQError, EngineUnavailable):
                    pass
        deadline = time.monotonic() + timeout_s
        for replica in self.replicas:
            while replica.process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if replica.process.is_alive():  # replicas ignore SIGTERM (see run_engine_core): kill
                logger.warning("replica %d did not stop within %.0fs: killing it", replica.index, timeout_s)
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
    def admit(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams,
              field: str = "prompts") -> list[SamplingParams]:
        """Admission, the only validation a request gets (the engine trusts it): every prompt's parameters as
        the engine will run them, or a 400 naming ``field[i]`` (an error about that prompt) or the sampling
        field at fault."""
        admitted = []
        for i, (_, ids) in enumerate(prompts):
            try:
                admitted.append(admit(self.limits, ids, params))
            except InvalidRequest as e:
                if e.field == PROMPT:
                    raise BadRequest(f"{field}[{i}]: {e.message}", param=field) from None
                raise BadRequest(e.message, param=e.field) from None
        return admitted

    async def generate(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams,
                       detokenize: bool = False, is_disconnected=None,
                       request_id: str | None = None, field: str = "prompts") -> list[RequestOutput]:
        """Run every prompt (with its n samples) on a replica; outputs in input order. Validates everything
        first, so a bad prompt queues nothing. ``is_disconnected``: an async callable; when it turns true, the
        request is aborted and its KV blocks freed. ``request_id`` (the caller's, e.g. ``X-Request-Id``): the
        engine requests are ``{request_id}-{i}``, one per prompt, so that ``abort([request_id])`` finds them.
        ``field``: the request field the prompts came from, named in 400s about one of them."""
        self.check_serving()
        admitted = self.admit(prompts, params, field)
        group = request_id if request_id else uuid.uuid4().hex[:12]
        request_ids = [f"{group}-{i}" for i in range(len(prompts))]
        if request_id and any(r in self.pending for r in request_ids):
            raise Conflict(f"request id {request_id!r} is already in use by a running request", param="request_id")
        futures, sent, gathered = [], [], None
        loop = asyncio.get_running_loop()
        try:
            batches: dict[int, list[msg.AddRequest]] = {}
            for rid, (text, ids), run_params in zip(request_ids, prompts, admitted):
                replica = min((r for r in self.replicas if r.dead is None), key=lambda r: r.outstanding_tokens)
                cost = (len(ids) + run_params.max_tokens) * params.n
                replica.outstanding_tokens += cost
                replica.request_ids.add(rid)
                self.request_replica[rid] = replica.index
                future = loop.create_future()
                future.cost = cost
                self.pending[rid] = future
                futures.append(future)
                self.processor.add_request(rid, text, ids, params, detokenize)
                add = msg.AddRequest(rid, ids, run_params)
                batches.setdefault(replica.index, []).append(add)
            for index, batch in batches.items():  # one message per replica: its prompts start together
                await self.send(self.replicas[index], msg.AddRequests(batch))
                sent += [m.request_id for m in batch]
                self.counters["prompt_tokens"] += sum(len(m.prompt_token_ids) for m in batch)
            gathered = asyncio.gather(*futures)
            while True:
                done, _ = await asyncio.wait([gathered], timeout=0.25)
                if done:
                    return gathered.result()
                if is_disconnected is not None and await is_disconnected():
                    # Aborted below; counted as aborted when their "abort" outputs come back (_resolve).
                    logger.info("client went away: aborting %d request(s)", len(request_ids))
                    raise ClientDisconnected("client disconnected")
        except BaseException:
            if gathered is not None:  # nobody awaits these outputs any more: consume what they end with
                gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
            for rid in [r for r in request_ids if r not in sent]:  # never reached a replica: forget it
                self.processor.states.pop(rid, None)
                future = self.pending.get(rid)
                self._finish(rid)
                if future is not None:
                    future.cancel()
            try:
                await self.abort([r for r in sent if r in self.pending])
            except EngineUnavailable:
                pass
            raise

    def find_requests(self, ids: list[str]) -> list[str]:
        """The engine requests of the callers' ids: each id itself, or ``{id}-{i}`` (see ``generate``)."""
        wanted = set(ids)
        prefixes = tuple(f"{i}-" for i in ids)
        return [r for r in self.pending if r in wanted or r.startswith(prefixes)]

    async def abort(self, request_ids: list[str] | None) -> None:
        """Abort some engine requests (None: all) on every replica that holds them. They end with
        finish_reason "abort" and what they generated so far."""
        by_replica: dict[int, list[str]] = {}
        for request_id in (list(self.pending) if request_ids is None else request_ids):
            replica = self.request_replica.get(request_id)
            if replica is not None:
                by_replica.setdefault(replica, []).append(request_id)
        for replica, ids in by_replica.items():
            r = self.replicas[replica]
            if r.dead is None:
                await self.send(r, msg.AbortRequests(ids))

    def render_chat(self, conversation, chat_template_kwargs=None, tools=None) -> list[int]:
        return render_chat(self.tokenizer, conversation, chat_template_kwargs, tools)

    # -- weight versions ---------------------------------------------------------------------------
    def next_weight_version(self) -> int:
        self.weight_version += 1
        return self.weight_version

    def named_param_run_version(self) -> int:
        """A run of per-tensor updates (TRL's protocol) is one version, held once the run ends."""
        if self.named_param_run is None:
            self.named_param_run = self.next_weight_version()
        return self.named_param_run

    async def end_named_param_run(self, timeout_s: float = 600.0) -> None:
        """The run ends with the next generation request, prefix-cache reset or other weight call: the
        replicas apply it (after the tensor they may still be receiving) before they see what follows."""
        version, self.named_param_run = self.named_param_run, None
        if version is not None:
            try:
                await self.call_all(msg.FinishWeightUpdate(version), timeout_s=timeout_s)
            except Exception as e:  # the run failed or already ended (its quiet time passed): status says
                logger.warning("weights version %d not applied by every replica: %s", version, e)

    # -- utility calls -----------------------------------------------------------------------------
    async def call(self, replica: int, op: msg.Utility, timeout_s: float = 30.0):
        """Run one utility operation (a typed message of ``engine/messages.py``) on a replica; its result."""
        r = self.replicas[replica]
        if r.dead is not None:
            raise EngineUnavailable(f"replica {replica} is dead: {r.dead}")
        call_id = next(self.call_ids)
        future = asyncio.get_running_loop().create_future()
        self.calls[call_id] = future
        try:
            await self.send(r, msg.UtilityCall(call_id, op))
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"replica {replica} did not answer {type(op).__name__} within "
                                    f"{timeout_s:.0f}s") from None
        finally:
            self.calls.pop(call_id, None)

    async def call_all(self, op: msg.Utility, timeout_s: float = 30.0) -> list:
        return await asyncio.gather(*(self.call(r.index, op, timeout_s) for r in self.replicas))

    def send_all_nowait(self, op: msg.Utility) -> list[asyncio.Future]:
        """Start an operation on every replica without waiting for the answers (returned as futures)."""
        return [asyncio.ensure_future(self.call(r.index, op, 3600.0)) for r in self.replicas]

    # -- sending -----------------------------------------------------------------------------------
    async def send(self, r: Replica, message, timeout_s: float = SEND_TIMEOUT_S) -> None:
        """Send to a replica without ever waiting on a dead one: a PUSH socket whose peer is gone blocks
        forever, so the send races the replica's death (and a timeout); EngineUnavailable if it loses."""
        if r.dead is not None:
            raise EngineUnavailable(f"replica {r.index} is dead: {r.dead}")
        sent = r.socket.send_pyobj(message)  # done at once unless the pipe is full or the peer is gone
        if not sent.done():
            died = asyncio.ensure_future(r.died.wait())
            try:
                await asyncio.wait({sent, died}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                died.cancel()
            if not sent.done():
                sent.cancel()
                if r.dead is not None:
                    raise EngineUnavailable(f"replica {r.index} is dead: {r.dead}")
                raise EngineUnavailable(f"replica {r.index} has not read its input for {timeout_s:.0f}s")
        sent.result()

    def send_soon(self, r: Replica, message) -> None:
        """``send`` in the background (from synchronous code); a failure is logged, not raised."""
        def done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                logger.warning("could not send %s to replica %d: %s", type(message).__name__, r.index,
                               task.exception())
        if r.dead is None:
            asyncio.ensure_future(self.send(r, message)).add_done_callback(done)

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
                if update.finish_reason == "error" and update.request_id in self.pending:
                    # A sample failed inside the engine (a grammar error, say): the request fails now with
                    # a 500 that says why, and its other samples are freed.
                    self._fail_request(update.request_id, ServerError(
                        f"request {update.request_id}: sample {update.index} failed in the engine: "
                        f"{update.stop_reason}"))
                    continue
                try:
                    done = self.processor.process(update)
                except Exception as e:  # fails this request only; the others of the step go on
                    logger.exception("could not process the output of request %s", update.request_id)
                    self._fail_request(update.request_id, ServerError(
                        f"could not process the output of request {update.request_id}: {type(e).__name__}: {e}"))
                    continue
                if done is not None:
                    self._resolve(done)
        elif isinstance(m, msg.UtilityResult):
            future = self.calls.get(m.call_id)
            if future is not None and not future.done():
                if m.error is None:
                    future.set_result(m.result)
                else:
                    error = {400: BadRequest, 409: Conflict}.get(m.status)
                    future.set_exception(error(m.error) if error else RuntimeError(m.error))
        elif isinstance(m, msg.RequestFailed):
            error = BadRequest(m.message, param=m.field) if m.status == 400 else ServerError(m.message)
            self.processor.states.pop(m.request_id, None)
            self._finish(m.request_id, exception=error)
        elif isinstance(m, msg.EngineReady):
            self.replicas[m.replica].info = m.info
            if all(r.info is not None for r in self.replicas):
                first = self.replicas[0].info
                self.info = {k: v for k, v in first.items() if k != "hf_weight_shapes"}
                self.info["kv_capacity_tokens"] = min(r.info["kv_capacity_tokens"] for r in self.replicas)
                self.limits = Limits.of(self.info, self.config.max_logprobs)
                self.weight_shapes = {k: tuple(v) for k, v in first["hf_weight_shapes"].items()}
                self.ready.set()
        elif isinstance(m, msg.EngineDead):
            self._mark_dead(m.replica, m.message)

    def _resolve(self, state: RequestState) -> None:
        output = state.to_output()
        reasons = {o.finish_reason for o in output.outputs}
        outcome = "failed" if "error" in reasons else "aborted" if "abort" in reasons else "ok"
        self.counters[f"requests_{outcome}"] += 1
        self.counters["generation_tokens"] += sum(len(o.token_ids) for o in output.outputs)
        self._finish(state.request_id, result=output)

    def _fail_request(self, request_id: str, exception: Exception) -> None:
        """Fail one engine request: the caller gets ``exception``, its replica forgets it."""
        self.processor.states.pop(request_id, None)
        replica = self.request_replica.get(request_id)
        self._finish(request_id, exception=exception)
        if replica is not None and self.replicas[replica].dead is None:
            self.send_soon(self.replicas[replica], msg.AbortRequests([request_id]))

    def _finish(self, request_id: str, result=None, exception=None) -> None:
        if exception is not None and request_id in self.pending:
            self.counters["requests_failed"] += 1
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
        r.died.set()
        self.dead = message
        logger.error("%s", message)
        if not self.ready.is_set():
            self.startup_error = message
            self.ready.set()
        # The server stops now (on_dead): requests on the other replicas fail too, and those replicas free them.
        for other in self.replicas:
            if other.dead is None and other.request_ids:
                self.send_soon(other, msg.AbortRequests(list(other.request_ids)))
        self._fail_all(EngineUnavailable(message))
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
