"""The API server's handle on its engine cores: one per data-parallel replica, reached over ZMQ.

It starts the replicas (where they run is ``replica_handles``' business: local child processes over ipc://,
or Ray actors anywhere on a cluster over tcp://), sends each request to the least-loaded live one
(outstanding tokens), gathers their outputs through one ``OutputProcessor`` and resolves the awaiting HTTP
handlers. The prompts of one HTTP request are a ``RequestGroup``: ``generate`` submits one and awaits its
outputs; a streamed one (``submit(stream=True)``) also collects every step's updates, which ``next_updates``
hands out. It never blocks the event loop: sockets are asyncio ZMQ sockets, and every wait has a timeout.

Failures: a replica that reports itself dead, or whose process (actor) is gone, fails its in-flight requests
with a 503 that names it and the cause. Locally that marks the whole client dead (``on_dead`` stops the
server, a supervisor restarts it), and the other replicas' requests fail too. On Ray
(``tolerate_replica_death``) the other replicas keep serving, routing skips the dead one, and
``restart_replica`` brings it back. A request that fails alone -- refused by its replica, a sample that ends
with finish reason "error" in the engine, or an output that cannot be processed -- fails alone (400 or 500,
naming the cause).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from rlserve.config import EngineConfig
from rlserve.engine import messages as msg
from rlserve.engine.output_processor import OutputProcessor, RequestState
from rlserve.engine.validation import PROMPT, InvalidRequest, Limits, admit
from rlserve.engine.transport import ClientKeyAuthenticator, CurveKeys, secure_bound_socket
from rlserve.outputs import CompletionOutput, RequestOutput
from rlserve.sampling import SamplingParams
from rlserve.server.errors import BadRequest, Conflict, EngineUnavailable, NotFound, ServerError
from rlserve.server.replica_handles import LocalReplica, RayPlacement, RayReplica
from rlserve.tokenizer import render_chat

logger = logging.getLogger(__name__)

SEND_TIMEOUT_S = 30.0  # a live replica reads its input between steps; a full pipe this long means a hung one
REPLICA_TIMEOUT_S = 300.0  # silence that means a hung replica (as vLLM's execute-model timeout): see EngineClient
# What may keep a replica's loop from reporting while it waits on the trainer, under the call's own timeout.
WEIGHT_SYNC_OPS = (msg.InitWeightSync, msg.BeginWeightUpdate, msg.UpdateWeights, msg.FinishWeightUpdate)


class ClientDisconnected(ServerError):
    """The HTTP client went away; its requests were aborted. Nobody reads the answer (nginx's 499)."""
    status = 499
    type = "client_closed_request"


@dataclass
class Replica:
    index: int
    handle: LocalReplica | RayReplica
    socket: zmq.asyncio.Socket
    generation: int = 0  # restarts so far
    info: dict | None = None
    stats: dict = field(default_factory=dict)
    outstanding_tokens: int = 0
    dead: str | None = None
    died: asyncio.Event = field(default_factory=asyncio.Event)  # set with ``dead``
    request_ids: set[str] = field(default_factory=set)
    started: asyncio.Event = field(default_factory=asyncio.Event)  # its EngineReady came
    # Restarted after the trainer pushed weights: it serves the weights on disk, so it takes no requests until it
    # reports this version or a later one (the trainer's next push after re-initing the group).
    awaiting_weights: int | None = None
    start_failure: str | None = None  # why it died while restarting (its EngineDead), for restart_replica's answer
    last_heard: float = 0.0  # monotonic time of its last message (its loop sends stats every 0.25 s)


@dataclass
class StreamedUpdate:
    """One update of a streamed sample: its prompt's index in the group, the update (new tokens and logprobs)
    and the sample's output so far (at its finish, with its final text)."""
    prompt_index: int
    update: msg.SeqUpdate
    output: CompletionOutput


@dataclass
class RequestGroup:
    """The engine requests of one HTTP request, one per prompt, and what a stream of them has not handed out."""
    request_ids: list[str]
    futures: list[asyncio.Future] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)  # the ones that reached their replica
    gathered: asyncio.Future | None = None  # of every future, once all were sent
    updates: list[StreamedUpdate] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set with each update, and when a request ends


class EngineClient:
    def __init__(self, config: EngineConfig, data_parallel_size: int, tokenizer, log_level: str = "info",
                 placement: RayPlacement | None = None, advertise_host: str = "127.0.0.1",
                 replica_timeout_s: float = REPLICA_TIMEOUT_S):
        """``placement``: run the replicas as Ray actors in its placement group, reached over tcp:// at
        ``advertise_host`` (an address of this host that every node of the cluster can reach).
        ``replica_timeout_s``: a started replica that sends nothing this long outside a utility call (which has its
        own timeout) is hung -- a GPU that never finishes a kernel, a partitioned network: it is declared dead
        like one whose process ended, so that its requests fail instead of waiting for good. 0: never."""
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        self.config = config
        self.data_parallel_size = data_parallel_size
        self.tokenizer = tokenizer
        self.log_level = log_level
        self.processor = OutputProcessor(tokenizer)
        self.ctx = zmq.asyncio.Context()
        self.placement = placement
        # Ray replicas reach this process over tcp://: CURVE keys admit only them (engine/transport.py)
        self.curve = CurveKeys.generate() if placement is not None else None
        self.authenticator: ClientKeyAuthenticator | None = None
        self.tolerate_replica_death = placement is not None
        self.advertise_host = advertise_host
        self.replica_timeout_s = replica_timeout_s
        self.ipc_dir = tempfile.mkdtemp(prefix="rlserve-")
        self.output_addr = ""
        self.replicas: list[Replica] = []
        self.pending: dict[str, asyncio.Future] = {}  # request id -> future of its RequestOutput
        self.streams: dict[str, tuple[int, RequestGroup]] = {}  # streamed request id -> (prompt index, group)
        self.request_replica: dict[str, int] = {}
        self.calls: dict[int, asyncio.Future] = {}
        self.call_replica: dict[int, int] = {}  # call id -> the replica that answers it
        self.weight_calls: set[int] = set()  # call ids of weight-sync operations: they may hold a replica's loop
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
        self.paused: str | None = None  # the mode of the last pause not followed by a resume: a restart replays it
        self.counters = {"requests_ok": 0, "requests_failed": 0, "requests_aborted": 0,
                         "prompt_tokens": 0, "generation_tokens": 0}
        self._tasks: list[asyncio.Task] = []
        self.stopping = False  # shutdown began: the background tasks are cancelled on purpose

    @property
    def world_size(self) -> int:
        return self.config.tensor_parallel_size * self.data_parallel_size

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self, timeout_s: float = 600.0) -> None:
        if self.curve is not None:
            self.authenticator = ClientKeyAuthenticator(self.ctx, self.curve)
        self.output = self.ctx.socket(zmq.PULL)
        self.output_addr = self._bind(self.output, "out")
        if self.placement is not None:  # blocks until the cluster has room for every replica (bounded)
            await asyncio.to_thread(self.placement.reserve)
        self.replicas = [self._launch(r) for r in range(self.data_parallel_size)]
        self._start_background_tasks()
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            missing = [r for r in self.replicas if r.info is None]
            self.startup_error = (
                f"engine replica(s) {', '.join(str(r.index) for r in missing)} of {len(self.replicas)} not ready "
                f"after {timeout_s:.0f}s: " + "; ".join(f"replica {r.index} {r.handle.describe()}" for r in missing)
                + (f" (a Ray replica that cannot reach {self.advertise_host} never reports: check --advertise_host)"
                   if self.placement is not None else ""))
            raise EngineUnavailable(self.startup_error)
        if self.startup_error:
            raise EngineUnavailable(self.startup_error)

    def _bind(self, sock: zmq.asyncio.Socket, name: str) -> str:
        """ipc:// for local replicas; for Ray ones, tcp:// on the advertised address, on a port the OS picks,
        open only to CURVE peers with the replicas' key."""
        if self.placement is None:
            addr = f"ipc://{self.ipc_dir}/{name}"
            sock.bind(addr)
            return addr
        host = socket.gethostbyname(self.advertise_host)
        secure_bound_socket(sock, self.curve)
        port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"

    def _launch(self, index: int, generation: int = 0) -> Replica:
        """Start replica ``index`` on a fresh input socket (a restarted replica never shares a socket with the
        peer it replaces: a half-open connection to a lost node would take its share of the messages)."""
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        addr = self._bind(sock, f"in{index}-{generation}")
        if self.placement is None:
            handle = LocalReplica(self.config, index, self.data_parallel_size, addr, self.output_addr,
                                  self.log_level)
        else:
            handle = RayReplica(self.placement, index, self.data_parallel_size, addr, self.output_addr,
                                self.log_level, generation, self.curve.for_replica())
        return Replica(index, handle, sock, generation=generation)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        self.stopping = True
        for replica in self.replicas:
            if replica.dead is None and replica.handle.is_alive():
                try:
                    await self.send(replica, msg.Shutdown(), timeout_s=1.0)
                except (zmq.ZMQError, EngineUnavailable):
                    pass
        deadline = time.monotonic() + timeout_s
        for replica in self.replicas:
            while replica.handle.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if replica.handle.is_alive():  # local replicas ignore SIGTERM (see run_engine_core): kill
                logger.warning("replica %d did not stop within %.0fs: killing it", replica.index, timeout_s)
                replica.handle.kill()
                replica.handle.join(5)
            elif replica.handle.remote:
                replica.handle.kill()  # its task ended; the idle actor would hold its bundle until we exit
        if self.placement is not None:
            self.placement.close()
        for task in self._tasks:
            task.cancel()
        self._fail_all(EngineUnavailable("server is shutting down"))
        if self.authenticator is not None:
            self.authenticator.stop()
        self.ctx.destroy(linger=0)
        try:
            for name in os.listdir(self.ipc_dir):
                os.unlink(os.path.join(self.ipc_dir, name))
            os.rmdir(self.ipc_dir)
        except OSError:
            pass

    @property
    def is_alive(self) -> bool:
        """Up, with at least one live replica (which may still wait for the trainer's weights)."""
        return (self.ready.is_set() and self.dead is None and self.startup_error is None
                and bool(self.live_replicas()))

    def live_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.dead is None]

    def routable_replicas(self) -> list[Replica]:
        """Live replicas on the trainer's weights: the ones requests go to."""
        return [r for r in self.replicas if r.dead is None and r.awaiting_weights is None]

    def dead_replicas(self) -> dict[int, str]:
        """index -> why, for every replica that is not serving (dead, or restarting)."""
        return {r.index: r.dead for r in self.replicas if r.dead is not None}

    def awaiting_weights(self) -> list[int]:
        """The live replicas that take no request until the trainer pushes its weights (restarted after a push)."""
        return [r.index for r in self.replicas if r.dead is None and r.awaiting_weights is not None]

    def check_alive(self) -> None:
        """503 unless the server is up with at least one live replica. Health, pause/resume, abort and weight
        sync need only this: a server whose live replicas all wait for the trainer's weights must still take
        the trainer's init and push, the only thing that brings them back."""
        if self.dead is not None:
            raise EngineUnavailable(f"engine is dead: {self.dead}")
        if not self.ready.is_set():
            raise EngineUnavailable("engine is starting")
        if not self.live_replicas():
            raise EngineUnavailable("every engine replica is dead: " + "; ".join(
                f"replica {i}: {why}" for i, why in self.dead_replicas().items()))

    def check_serving(self) -> None:
        """For generation: ``check_alive``, and a replica on the trainer's weights to route to."""
        self.check_alive()
        if not self.routable_replicas():
            raise EngineUnavailable("no replica serves the trainer's weights: the live ones were restarted and "
                                    "wait for the trainer to init the weight-sync group again and push its weights")

    def check_all_replicas(self) -> None:
        """Weight sync needs every worker of every replica in the group: 503 while one is missing."""
        self.check_alive()
        dead = self.dead_replicas()
        if dead:
            i, why = next(iter(dead.items()))
            raise EngineUnavailable(f"replica {i} is not serving ({why}): weight sync needs every replica; restart "
                                    f"it (POST /restart_replica/{i}), then init the weight-sync group again")

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
        """Run every prompt (with its n samples) on a replica; outputs in input order (see ``submit`` for the
        arguments). ``is_disconnected``: an async callable; when it turns true, the request is aborted and its KV
        blocks freed."""
        group = await self.submit(prompts, params, detokenize, request_id, field)
        try:
            while True:
                done, _ = await asyncio.wait([group.gathered], timeout=0.25)
                if done:
                    return group.gathered.result()
                if is_disconnected is not None and await is_disconnected():
                    # Aborted below; counted as aborted when their "abort" outputs come back (_resolve).
                    logger.info("client went away: aborting %d request(s)", len(group.request_ids))
                    raise ClientDisconnected("client disconnected")
        except BaseException:
            await self._abort_quietly(self.release(group))
            raise

    async def submit(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams,
                     detokenize: bool = False, request_id: str | None = None, field: str = "prompts",
                     stream: bool = False) -> RequestGroup:
        """Validate every prompt, then send each (with its n samples) to a replica; returns once they are sent.
        A bad prompt queues nothing. ``request_id`` (the caller's, e.g. ``X-Request-Id``): the engine requests
        are ``{request_id}-{i}``, one per prompt, so that ``abort([request_id])`` finds them. ``field``: the
        request field the prompts came from, named in 400s about one of them. ``stream``: the replicas send
        every step's new tokens, gathered in the group for ``next_updates``. The caller ends with ``release``
        (and aborts what it returns) unless the group ran to its end."""
        self.check_serving()
        admitted = self.admit(prompts, params, field)
        group_id = request_id if request_id else uuid.uuid4().hex[:12]
        request_ids = [f"{group_id}-{i}" for i in range(len(prompts))]
        if request_id and any(r in self.pending for r in request_ids):
            raise Conflict(f"request id {request_id!r} is already in use by a running request", param="request_id")
        group = RequestGroup(request_ids)
        loop = asyncio.get_running_loop()
        try:
            batches: dict[int, list[msg.AddRequest]] = {}
            for i, (rid, (text, ids), run_params) in enumerate(zip(request_ids, prompts, admitted)):
                routable = self.routable_replicas()
                if not routable:
                    raise EngineUnavailable("no engine replica is serving")
                replica = min(routable, key=lambda r: r.outstanding_tokens)
                cost = (len(ids) + run_params.max_tokens) * params.n
                replica.outstanding_tokens += cost
                replica.request_ids.add(rid)
                self.request_replica[rid] = replica.index
                future = loop.create_future()
                future.cost = cost
                self.pending[rid] = future
                group.futures.append(future)
                self.processor.add_request(rid, text, ids, params, detokenize)
                if stream:
                    self.streams[rid] = (i, group)
                    future.add_done_callback(lambda _: group.wake.set())  # a failure ends the stream at once
                batches.setdefault(replica.index, []).append(msg.AddRequest(rid, ids, run_params, stream=stream))
            for index, batch in batches.items():  # one message per replica: its prompts start together
                await self.send(self.replicas[index], msg.AddRequests(batch))
                group.sent += [m.request_id for m in batch]
                self.counters["prompt_tokens"] += sum(len(m.prompt_token_ids) for m in batch)
        except BaseException:
            await self._abort_quietly(self.release(group))
            raise
        group.gathered = asyncio.gather(*group.futures)
        return group

    async def next_updates(self, group: RequestGroup, is_disconnected=None) -> list[StreamedUpdate] | None:
        """The updates of a streamed group that came since the last call, waiting for one if none did; None once
        every request of the group finished (after its last updates were handed out). Raises what a request
        failed with, or ``ClientDisconnected`` when ``is_disconnected`` (checked every 0.25 s) turns true; the
        caller then ``release``s the group and aborts."""
        while True:
            group.wake.clear()
            if group.updates:
                updates, group.updates = group.updates, []
                return updates
            if group.gathered.done():
                group.gathered.result()  # raises a request's failure
                return None
            try:
                await asyncio.wait_for(group.wake.wait(), 0.25)
            except asyncio.TimeoutError:
                if is_disconnected is not None and await is_disconnected():
                    logger.info("client went away: aborting %d streamed request(s)", len(group.request_ids))
                    raise ClientDisconnected("client disconnected") from None

    def release(self, group: RequestGroup) -> list[str]:
        """Let go of a group nobody waits for any more: requests never sent are forgotten, and their outputs
        consumed. Returns the sent requests still running, for the caller to abort."""
        if group.gathered is not None:  # nobody awaits these outputs any more: consume what they end with
            group.gathered.add_done_callback(lambda f: f.cancelled() or f.exception())
        # By identity: once this group's requests ended, a new request may reuse their ids (X-Request-Id).
        own = dict(zip(group.request_ids, group.futures))
        for rid in group.request_ids:
            entry = self.streams.get(rid)
            if entry is not None and entry[1] is group:
                del self.streams[rid]
        for rid in [r for r in group.request_ids if r not in group.sent]:  # never reached a replica: forget it
            future = self.pending.get(rid)
            if future is None or future is not own.get(rid):
                continue
            self.processor.states.pop(rid, None)
            self._finish(rid)
            future.cancel()
        return [r for r in group.sent if r in own and self.pending.get(r) is own[r]]

    async def _abort_quietly(self, request_ids: list[str]) -> None:
        try:
            await self.abort(request_ids)
        except EngineUnavailable:
            pass

    def abort_soon(self, request_ids: list[str]) -> None:
        """``abort`` in the background, from code that cannot await (a cancelled response's cleanup)."""
        by_replica: dict[int, list[str]] = {}
        for request_id in request_ids:
            replica = self.request_replica.get(request_id)
            if replica is not None:
                by_replica.setdefault(replica, []).append(request_id)
        for replica, ids in by_replica.items():
            self.send_soon(self.replicas[replica], msg.AbortRequests(ids))

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
                targets = self.live_replicas()
                await self.call_all(msg.FinishWeightUpdate(version), timeout_s=timeout_s)
                self.weights_landed(version, targets)
            except Exception as e:  # the run failed or already ended (its quiet time passed): status says
                logger.warning("weights version %d not applied by every replica: %s", version, e)

    def weights_landed(self, version: int, replicas: list[Replica] | None = None) -> None:
        """These replicas (default: the live ones) loaded ``version``: any of them that awaited it takes
        requests again now, without waiting for its next stats (a request sent after the update is generated
        with it: messages to a replica keep their order)."""
        for r in self.live_replicas() if replicas is None else replicas:
            if (r.awaiting_weights is not None and version >= r.awaiting_weights and r.dead is None
                    and self.replicas[r.index] is r):
                logger.info("replica %d has the trainer's weights (version %d): serving again", r.index, version)
                r.awaiting_weights = None

    # -- utility calls -----------------------------------------------------------------------------
    async def call(self, replica: int, op: msg.Utility, timeout_s: float = 30.0):
        """Run one utility operation (a typed message of ``engine/messages.py``) on a replica; its result."""
        r = self.replicas[replica]
        if r.dead is not None:
            raise EngineUnavailable(f"replica {replica} is dead: {r.dead}")
        return await self._call(r, op, timeout_s)

    async def _call(self, r: Replica, op: msg.Utility, timeout_s: float):
        """``call`` on this replica object, dead or not yet live (a restart readies its new replica with it)."""
        call_id = next(self.call_ids)
        future = asyncio.get_running_loop().create_future()
        self.calls[call_id] = future
        self.call_replica[call_id] = r.index
        if isinstance(op, WEIGHT_SYNC_OPS):
            self.weight_calls.add(call_id)
        try:
            await self.send(r, msg.UtilityCall(call_id, op), starting=True)
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"replica {r.index} did not answer {type(op).__name__} within "
                                    f"{timeout_s:.0f}s") from None
        finally:
            self.calls.pop(call_id, None)
            self.call_replica.pop(call_id, None)
            self.weight_calls.discard(call_id)

    async def call_all(self, op: msg.Utility, timeout_s: float = 30.0) -> list:
        """Call every live replica (every replica, unless replica deaths are tolerated: then a dead one has
        stopped the server already)."""
        return await asyncio.gather(*(self.call(r.index, op, timeout_s) for r in self.live_replicas()))

    async def call_each(self, op: msg.Utility, timeout_s: float = 30.0) -> dict[int, object]:
        """Call every live replica; replica index -> its answer, or the exception it ended with."""
        live = self.live_replicas()
        results = await asyncio.gather(*(self.call(r.index, op, timeout_s) for r in live), return_exceptions=True)
        return {r.index: result for r, result in zip(live, results)}

    async def pause(self, mode: str) -> None:
        """Pause every live replica; a replica restarted before the resume starts paused too."""
        self.paused = mode
        await self.call_all(msg.Pause(mode), timeout_s=3600.0 if mode == "wait" else 30.0)

    async def resume(self) -> None:
        self.paused = None
        await self.call_all(msg.Resume())

    def send_all_nowait(self, op: msg.Utility) -> list[asyncio.Future]:
        """Start an operation on every live replica without waiting for the answers (returned as futures)."""
        return [asyncio.ensure_future(self.call(r.index, op, 3600.0)) for r in self.live_replicas()]

    # -- sending -----------------------------------------------------------------------------------
    async def send(self, r: Replica, message, timeout_s: float = SEND_TIMEOUT_S, starting: bool = False) -> None:
        """Send to a replica without ever waiting on a dead one: a PUSH socket whose peer is gone blocks
        forever, so the send races the replica's death (and a timeout); EngineUnavailable if it loses.
        ``starting``: send even though the replica is not live (yet): a restart readies it so."""
        if r.dead is not None and not starting:
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
        dropped, last_logged = 0, -1e9
        while True:
            try:
                frame = await self.output.recv()
            except zmq.ZMQError:
                if self.ctx.closed:  # shutdown
                    return
                raise
            try:  # a frame that does not unpickle is dropped, and the reader goes on with the next one
                m = pickle.loads(frame)
            except Exception as e:
                dropped += 1
                if time.monotonic() - last_logged > 10:  # at most one line per 10 s: a skewed replica sends many
                    last_logged = time.monotonic()
                    logger.error("dropped a message of %d bytes from a replica that does not unpickle (%s: %s; %d "
                                 "so far): does every replica run the same rlserve, Python and numpy as the API "
                                 "server?", len(frame), type(e).__name__, e, dropped)
                continue
            try:
                self._dispatch(m)
            except Exception:
                logger.exception("failed to process an engine message %r", type(m).__name__)

    def _start_background_tasks(self) -> None:
        self._tasks = [asyncio.create_task(self._read_outputs()), asyncio.create_task(self._watch_replicas())]
        for task in self._tasks:
            task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task) -> None:
        """The output reader and the replica watcher run for the server's life. If one ends otherwise than by
        shutdown, no output would reach a request again: the engine is dead, and every waiter hears it now."""
        if self.stopping or self.dead is not None or self.ctx.closed:
            return
        # Cancelled by anyone but shutdown (pyzmq cancels a pending recv when its socket closes): a failure too.
        error = asyncio.CancelledError("cancelled") if task.cancelled() else task.exception()
        name = {"_read_outputs": "output reader", "_watch_replicas": "replica watcher"}.get(
            task.get_coro().__name__, task.get_coro().__name__)
        message = f"the API server's {name} task stopped" + (f": {type(error).__name__}: {error}" if error else "")
        logger.error("%s", message)
        self._die(message)

    def _die(self, message: str) -> None:
        """The engine as a whole is dead: startup ends with the reason, every request and utility call waiting
        fails with a 503 naming it, and ``on_dead`` stops the server."""
        self.dead = message
        if not self.ready.is_set():
            self.startup_error = message
            self.ready.set()
        self._fail_all(EngineUnavailable(message))
        for future in self.calls.values():
            if not future.done():
                future.set_exception(EngineUnavailable(message))
        if self.on_dead is not None:
            self.on_dead(message)

    def _current(self, m) -> bool:
        """Whether a message that names its replica comes from that replica's current generation: a killed
        actor's last outputs (or its EngineDead) can arrive after its restart, and must not touch the new one."""
        if m.generation == self.replicas[m.replica].generation:
            return True
        log = logger.debug if isinstance(m, msg.StepOutputs) else logger.warning  # stats come 4 times a second
        log("dropped a %s from replica %d's generation %d (now %d)", type(m).__name__, m.replica, m.generation,
            self.replicas[m.replica].generation)
        return False

    def _dispatch(self, m) -> None:
        if isinstance(m, (msg.StepOutputs, msg.EngineReady, msg.EngineDead)) and not self._current(m):
            return
        if isinstance(m, (msg.StepOutputs, msg.EngineReady, msg.EngineDead)):
            self.replicas[m.replica].last_heard = time.monotonic()
        if isinstance(m, msg.StepOutputs):
            if m.stats is not None:
                r = self.replicas[m.replica]
                r.stats = m.stats
                if r.awaiting_weights is not None and m.stats.get("weight_version", 0) >= r.awaiting_weights:
                    logger.info("replica %d has the trainer's weights (version %d): serving again", r.index,
                                m.stats["weight_version"])
                    r.awaiting_weights = None
            for update in m.updates:
                if update.finish_reason == "error" and update.request_id in self.pending:
                    # A sample failed inside the engine (a grammar error, say): the request fails now with
                    # a 500 that says why, and its other samples are freed.
                    self._fail_request(update.request_id, ServerError(
                        f"request {update.request_id}: sample {update.index} failed in the engine: "
                        f"{update.stop_reason}"))
                    continue
                stream = self.streams.get(update.request_id)
                state = self.processor.states.get(update.request_id) if stream is not None else None
                try:
                    done = self.processor.process(update)
                except Exception as e:  # fails this request only; the others of the step go on
                    logger.exception("could not process the output of request %s", update.request_id)
                    self._fail_request(update.request_id, ServerError(
                        f"could not process the output of request {update.request_id}: {type(e).__name__}: {e}"))
                    continue
                if state is not None:  # before its future resolves: a stream hands out every update first
                    index, group = stream
                    group.updates.append(StreamedUpdate(index, update, state.outputs[update.index]))
                    group.wake.set()
                if done is not None:
                    self._resolve(done)
        elif isinstance(m, msg.UtilityResult):
            index = self.call_replica.get(m.call_id)
            if index is not None:
                self.replicas[index].last_heard = time.monotonic()
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
            if m.info.get("protocol") != msg.PROTOCOL:
                self._mark_dead(m.replica, f"engine replica {m.replica} runs another rlserve than the API server "
                                           f"(message protocol {m.info.get('protocol')} vs {msg.PROTOCOL}): install "
                                           f"the same rlserve on every node")
                self.replicas[m.replica].handle.kill()  # it would hold its GPUs (its Ray bundle) for nothing
                return
            self.replicas[m.replica].info = m.info
            self.replicas[m.replica].started.set()
            if not self.ready.is_set() and all(r.info is not None for r in self.replicas):
                first = self.replicas[0].info
                self.info = {k: v for k, v in first.items() if k != "hf_weight_shapes"}
                self.info["kv_capacity_tokens"] = min(r.info["kv_capacity_tokens"] for r in self.replicas)
                self.limits = Limits.of(self.info, self.config.logprobs_limit(self.info["vocab_size"]))
                self.weight_shapes = {k: tuple(v) for k, v in first["hf_weight_shapes"].items()}
                self.ready.set()
            elif self.ready.is_set():  # a restarted replica (Ray): admission's KV limit is the smallest live one's
                capacity = min(r.info["kv_capacity_tokens"] for r in self.replicas if r.info is not None)
                if capacity != self.info["kv_capacity_tokens"]:
                    logger.info("replica %d holds %d KV tokens: admission now allows requests up to %d tokens",
                                m.replica, m.info["kv_capacity_tokens"], capacity)
                self.info["kv_capacity_tokens"] = capacity
                self.limits = Limits.of(self.info, self.config.logprobs_limit(self.info["vocab_size"]))
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
        self.streams.pop(request_id, None)
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
            if r.dead.startswith("restarting"):  # its own cause, for restart_replica to report
                r.start_failure = message
            return
        r.dead = message
        r.died.set()
        logger.error("%s", message)
        if self.tolerate_replica_death and self.ready.is_set():
            self._fail_replica(r, EngineUnavailable(message))
            return
        # The server stops now (on_dead): requests on the other replicas fail too, and those replicas free them.
        for other in self.replicas:
            if other.dead is None and other.request_ids:
                self.send_soon(other, msg.AbortRequests(list(other.request_ids)))
        self._die(message)

    def _fail_replica(self, r: Replica, exception: Exception) -> None:
        """Fail what one replica holds -- its requests and its utility calls -- and nothing else."""
        for request_id in list(r.request_ids):
            self.processor.states.pop(request_id, None)
            self._finish(request_id, exception=exception)
        for call_id, index in list(self.call_replica.items()):
            future = self.calls.get(call_id)
            if index == r.index and future is not None and not future.done():
                future.set_exception(exception)

    def _fail_all(self, exception: Exception) -> None:
        for request_id in list(self.pending):
            self.processor.states.pop(request_id, None)
            self._finish(request_id, exception=exception)

    async def _watch_replicas(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for r in list(self.replicas):
                if r.dead is None and not r.handle.is_alive():
                    await asyncio.sleep(0.5)  # let a last EngineDead message arrive first
                    if self.replicas[r.index] is r:  # not restarted meanwhile
                        self._mark_dead(r.index, f"engine replica {r.index} {r.handle.exit_reason()}")
                elif self._is_hung(r):
                    self._mark_dead(r.index, f"engine replica {r.index} sent nothing for {self.replica_timeout_s:g}s "
                                             f"(--replica_timeout): hung")
                    r.handle.kill()  # its GPU (or its Ray bundle) is freed; a restart makes a new one

    def _is_hung(self, r: Replica) -> bool:
        """Silent past the timeout, started, and not inside a weight-sync call (which waits on the trainer under
        its own timeout). Other calls (a health probe's Ping) do not hold the loop and do not exempt it."""
        return (self.replica_timeout_s > 0 and r.dead is None and r.started.is_set()
                and time.monotonic() - r.last_heard > self.replica_timeout_s
                and not any(self.call_replica.get(c) == r.index for c in self.weight_calls))

    # -- restarting (Ray) ----------------------------------------------------------------------------
    async def restart_replica(self, index: int, timeout_s: float = 600.0) -> dict:
        """Replace a dead replica by a new one in the same bundle (Ray places it anew if its node is gone), on
        a fresh input socket; returns once it is ready, and routing uses it again. It starts from the model's
        weights on disk, outside any weight-sync group: the trainer must init the group again. If the trainer has
        pushed weights before, it takes no requests until the trainer pushes again (``awaiting_weights``)."""
        if not 0 <= index < len(self.replicas):
            raise NotFound(f"no replica {index}: the server has {len(self.replicas)} (0..{len(self.replicas) - 1})")
        if self.placement is None:
            raise Conflict("restarting a replica needs Ray (--ray_address); a local replica's death stops the server")
        old = self.replicas[index]
        if old.dead is None:
            raise Conflict(f"replica {index} is serving; only a dead replica is restarted")
        if old.dead.startswith("restarting"):
            raise Conflict(f"replica {index} is already restarting")
        old.handle.kill()
        old.socket.close(linger=0)
        new = self._launch(index, old.generation + 1)
        new.dead = f"restarting (was: {old.dead})"  # skipped by routing and the watcher until it is ready
        self.replicas[index] = new
        try:
            await self._wait_started(new, timeout_s)
            await self._replay_pause(new)
        except BaseException as e:  # failed, timed out or cancelled: never left "restarting", so it can be retried
            why = "cancelled" if isinstance(e, asyncio.CancelledError) else getattr(e, "message", None) or str(e)
            new.handle.kill()
            new.dead = f"engine replica {index} failed to restart: {why}"
            new.died.set()
            self._fail_replica(new, EngineUnavailable(new.dead))
            logger.error("%s", new.dead)
            if not isinstance(e, Exception):  # cancelled: stays cancelled
                raise
            raise EngineUnavailable(new.dead) from e
        if self.weight_version > 0:  # any version the trainer pushes from now on is newer than this
            new.awaiting_weights = self.weight_version + 1
        new.dead = None
        logger.warning("replica %d restarted (generation %d)%s%s", index, new.generation,
                       "; it takes requests once the trainer pushes its weights" if new.awaiting_weights else "",
                       f"; paused ({self.paused}) like the others" if self.paused else "")
        return {"replica": index, "generation": new.generation, "awaiting_weights": new.awaiting_weights is not None,
                **new.handle.describe()}

    async def _wait_started(self, r: Replica, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not r.started.is_set():
            if r.start_failure is not None:
                raise EngineUnavailable(r.start_failure)
            if not r.handle.is_alive():
                await asyncio.sleep(0.5)  # its EngineDead (the engine's own cause) may still be on the way
                raise EngineUnavailable(r.start_failure or r.handle.exit_reason())
            if time.monotonic() > deadline:
                raise EngineUnavailable(f"not ready after {timeout_s:.0f}s")
            try:
                await asyncio.wait_for(r.started.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    async def _replay_pause(self, r: Replica) -> None:
        """Give a restarted replica the server's pause state before it takes requests. A /pause/ or /resume/
        that comes meanwhile reaches only the live replicas: replay until the state holds still (no await lies
        between the last check and the caller making the replica live)."""
        replayed = None  # a new replica starts unpaused
        while self.paused != replayed:
            replayed = self.paused
            if replayed is None:
                await self._call(r, msg.Resume(), 30.0)
            else:  # "wait" has nothing to drain on a new replica: it ends frozen, as "keep" does
                await self._call(r, msg.Pause("keep" if replayed == "wait" else replayed), 30.0)

    # -- introspection -----------------------------------------------------------------------------
    def aggregate_stats(self) -> dict:
        total: dict = {}
        for r in self.replicas:
            for key, value in r.stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "replica":
                    total[key] = total.get(key, 0) + value
        return total
