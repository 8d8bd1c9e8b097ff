"""Weight-sync endpoints: three front doors onto one transport (``rlserve.distributed.weight_sync``).

- TRL <= 1.10 (``trl vllm-serve``'s protocol): ``/init_communicator/`` (the server's first worker hosts the
  store, the trainer is the last rank), ``/update_named_param/`` per tensor, each followed by a store barrier;
  a run of them is one version, applied when the run ends. ``/close_communicator/``.
- vLLM's weight-transfer API (TRL >= 1.12): ``/init_weight_transfer_engine`` (the trainer is rank 0 and hosts
  the store), ``/start_weight_update``, ``/update_weights`` with ``update_info`` (vLLM's packed or per-tensor
  broadcasts), ``/finish_weight_update``.
- rlserve's own bucketed ``/update_weights/`` (a body with ``buckets``), one version per call.

Every update is validated in full against the model here, before any replica is told to receive: a wrong
name, shape or dtype is a 400 and nothing is loaded. Where the protocol has the trainer broadcast before the
answer (vLLM's), a refused update is received and dropped, so that the trainer is not left hanging.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from fastapi import APIRouter, Request
from pydantic import ValidationError

from rlserve.distributed.weight_sync import BUCKET_DTYPES, GroupSpec, parse_dtype, plan_vllm_buckets
from rlserve.engine import messages as msg
from rlserve.server.errors import BadRequest, Conflict
from rlserve.server.routing import engine_of, route
from rlserve.server.schemas import (InitCommunicatorRequest, InitWeightTransferRequest, UpdateNamedParamRequest,
                                    UpdateWeightsRequest, VllmUpdateInfo)

logger = logging.getLogger(__name__)
router = APIRouter()

NAMED_PARAM_RUN_QUIET_S = 5.0  # a run of per-tensor updates with no call for this long is complete
UPDATE_QUIET_S = 60.0  # a vLLM-style update with no call for this long is abandoned (the trainer is gone)


# -- joining a group ------------------------------------------------------------------------------------
def _backend(engine, requested: str | None) -> str:
    """NCCL on a CUDA server (what TRL's clients speak, with or without a device uuid), gloo on a CPU one."""
    on_cuda = engine.config.resolved_device().type == "cuda"
    backend = requested or ("nccl" if on_cuda else "gloo")
    if backend == "nccl" and not on_cuda:
        raise BadRequest("backend 'nccl' needs a server on CUDA devices; this one runs on the CPU", param="backend")
    return backend


async def _join(request: Request, spec: GroupSpec) -> list[asyncio.Future]:
    """Every worker joins; the futures resolve once each replica's workers are in and warmed up. A new group
    replaces any other, established or half-made (a trainer that crashed and came back): the old one is gone
    before this returns, so that the trainer cannot meet it."""
    engine, state = engine_of(request), request.app.state
    engine.check_all_replicas()
    state.weight_sync_init = None
    await engine.end_named_param_run()
    await engine.call_all(msg.CloseWeightSync(), timeout_s=spec.timeout_s + 30.0)
    state.weight_sync_spec = spec
    state.weight_sync_init = engine.send_all_nowait(msg.InitWeightSync(spec.to_dict()))
    return state.weight_sync_init


def _reachable_only_locally(host: str) -> bool:
    """A wildcard ("0.0.0.0", "::") or loopback host: dialled from a node, it names that node."""
    if host in ("", "localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name: taken as given
        return False
    return address.is_unspecified or address.is_loopback


def _server_store_host(engine, host: str) -> str:
    """Where the workers dial the store that the server's rank 0 (replica 0's first worker) hosts under TRL <=
    1.10's protocol. TRL's client posts host "0.0.0.0": rank 0 listens on every interface whatever the host, and
    local replicas, on its node, reach it there. A Ray replica on another node would dial itself: Ray replicas
    are told this node's advertised address when replica 0 is pinned here, else the address of replica 0's
    node."""
    placement = getattr(engine, "placement", None)
    if placement is None or not _reachable_only_locally(host):
        return host
    if placement.pin_first:
        resolved = engine.advertise_host
    else:
        resolved = engine.replicas[0].handle.node_ip()
        if resolved is None:  # its actor has not started (check_all_replicas let it through: it is live)
            raise Conflict("replica 0's Ray node is not known yet; try again once it has started")
    if resolved != host:
        logger.info("weight-sync store of rank 0 (replica 0): replicas dial %s (the request said %s)", resolved,
                    host)
    return resolved


@route(router, "POST", "/init_communicator/")
async def init_communicator(request: Request, body: InitCommunicatorRequest):
    engine = engine_of(request)
    engine.check_alive()
    expected = engine.world_size + 1
    if body.world_size != expected:
        raise BadRequest(f"world_size must be {expected} (the server's {engine.world_size} workers + the "
                         f"client), got {body.world_size}", param="world_size")
    engine.check_all_replicas()  # replica 0 among them: its node is where the store is
    spec = GroupSpec(host=_server_store_host(engine, body.host), port=body.port, world_size=body.world_size,
                     trainer_rank=body.world_size - 1,
                     backend=_backend(engine, body.backend), timeout_s=body.timeout_s)
    await _join(request, spec)  # answered once joining: the trainer joins the rendezvous after this returns
    return {"message": "Request received, initializing communicator"}


@route(router, "POST", "/init_weight_transfer_engine/")
async def init_weight_transfer_engine(request: Request, body: InitWeightTransferRequest):
    """vLLM's NCCL weight-transfer engine: answered once every worker has joined (the trainer joins the
    rendezvous while this request is in flight)."""
    engine = engine_of(request)
    engine.check_alive()
    info = body.init_info
    if info.world_size < info.rank_offset + engine.world_size:
        raise BadRequest(f"init_info.world_size must be at least rank_offset + {engine.world_size} (the server's "
                         f"workers), got {info.world_size}", param="init_info.world_size")
    spec = GroupSpec(host=info.master_address, port=info.master_port, world_size=info.world_size, trainer_rank=0,
                     rank_offset=info.rank_offset, backend=_backend(engine, body.backend),
                     timeout_s=body.timeout_s, barrier_after_update=False)
    request.app.state.weight_transfer_packed = info.packed
    await _join(request, spec)
    await _require_group(request, spec.timeout_s + 10.0)
    return {"message": "Weight transfer initialized"}


async def _require_group(request: Request, timeout_s: float = 60.0) -> GroupSpec:
    engine_of(request).check_all_replicas()  # a broadcast to a group with a dead member fails or hangs
    init = getattr(request.app.state, "weight_sync_init", None)
    if not init:
        raise Conflict("no weight-sync group: call /init_communicator/ or /init_weight_transfer_engine first")
    done, pending = await asyncio.wait(init, timeout=timeout_s)
    if pending:
        raise Conflict("the weight-sync group is not ready yet (has the client joined?)")
    for future in done:
        if future.exception() is not None:
            raise Conflict(f"the weight-sync group failed: {future.exception()}")
    return request.app.state.weight_sync_spec


# -- validation -----------------------------------------------------------------------------------------
def validate_tensor(shapes: dict, name: str, dtype: str, shape: list[int], where: str) -> None:
    if name not in shapes:
        raise BadRequest(f"{where}: unknown parameter name {name!r}", param="name")
    if tuple(shape) != tuple(shapes[name]):
        raise BadRequest(f"{where}: {name} must have shape {list(shapes[name])}, got {list(shape)}", param="shape")
    try:
        parse_dtype(dtype)
    except ValueError as e:
        raise BadRequest(f"{where}: {e}", param="dtype") from None


def _numel(shape: list[int]) -> int:
    numel = 1
    for s in shape:
        numel *= s
    return numel


def _log_update(version: int | None):
    def done(future: asyncio.Future) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            logger.error("weight update (version %s) failed: %s", version, future.exception())
        elif version is not None:
            r = future.result()
            logger.info("weights version %d loaded: %.1f MB in %.3fs", version, r["bytes"] / 1e6, r["seconds"])
    return done


def _dispatch(request: Request, buckets: list[dict], **kwargs) -> list[asyncio.Future]:
    engine = engine_of(request)
    targets = engine.live_replicas()  # send_all_nowait's, in its order
    futures = engine.send_all_nowait(msg.UpdateWeights(buckets, **kwargs))
    state = request.app.state
    version = kwargs.get("version")

    def landed(replica):  # a replica restarted after a push serves again once it holds the next version
        def done(future: asyncio.Future) -> None:
            if not future.cancelled() and future.exception() is None:
                engine.weights_landed(version, [replica])
        return done

    def group_lost(future: asyncio.Future) -> None:  # a replica closes its group when an update fails
        if not future.cancelled() and future.exception() is not None and state.weight_sync_init is init:
            state.weight_sync_init = None

    init = state.weight_sync_init
    for replica, future in zip(targets, futures):
        future.add_done_callback(_log_update(version))
        future.add_done_callback(group_lost)
        if version is not None:
            future.add_done_callback(landed(replica))
    return futures


# -- TRL <= 1.10: one tensor a call --------------------------------------------------------------------
@route(router, "POST", "/update_named_param/")
async def update_named_param(request: Request, body: UpdateNamedParamRequest):
    """TRL's per-tensor update: answered at once; the tensor follows by broadcast, then a store barrier."""
    engine = engine_of(request)
    engine.check_alive()
    validate_tensor(engine.weight_shapes, body.name, body.dtype, body.shape, "update_named_param")
    await _require_group(request)
    bucket = {"dtype": str(parse_dtype(body.dtype)).removeprefix("torch."), "numel": _numel(body.shape),
              "tensors": [{"name": body.name, "shape": body.shape, "offset": 0}]}
    version = engine.named_param_run_version()
    _dispatch(request, [bucket], run_version=version, run_timeout_s=NAMED_PARAM_RUN_QUIET_S)
    return {"message": "Request received, updating named parameter", "version": version}


# -- rlserve's bucketed update, and vLLM's update_info -----------------------------------------------------
@route(router, "POST", "/update_weights/")
async def update_weights(request: Request):
    """Two protocols share this path, told apart by the body: ``{"update_info": ...}`` is vLLM's (TRL >= 1.12),
    ``{"buckets": ...}`` rlserve's."""
    engine = engine_of(request)
    engine.check_alive()
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body must be a JSON object", param="body") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", param="body")
    if "update_info" in body:
        return await _vllm_update_weights(request, _parse(VllmUpdateInfo, body["update_info"], "update_info"))
    return await _bucketed_update_weights(request, _parse(UpdateWeightsRequest, body, None))


def _parse(model, data, prefix: str | None):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(part) for part in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        raise BadRequest(f"{field}: {err['msg']}", param=field) from None


async def _bucketed_update_weights(request: Request, body: UpdateWeightsRequest):
    """Metadata for many tensors in one call, answered at once; buckets follow by broadcast, in order."""
    engine = engine_of(request)
    for b, bucket in enumerate(body.buckets):
        end = 0
        for t, entry in enumerate(sorted(bucket.tensors, key=lambda e: e.offset)):
            where = f"buckets[{b}].tensors[{t}]"
            validate_tensor(engine.weight_shapes, entry.name, bucket.dtype, entry.shape, where)
            if entry.offset < end:
                raise BadRequest(f"{where}: offset {entry.offset} overlaps the previous tensor", param="offset")
            end = entry.offset + _numel(entry.shape)
        if end > bucket.numel:
            raise BadRequest(f"buckets[{b}]: tensors need {end} elements, numel is {bucket.numel}", param="numel")
    await _require_group(request)
    if body.version is not None and body.version <= engine.weight_version:
        raise BadRequest(f"version must be > {engine.weight_version}, got {body.version}", param="version")
    await engine.end_named_param_run()
    version = engine.next_weight_version()
    if body.version is not None:
        version = engine.weight_version = body.version
    buckets = [dict(b.model_dump(), dtype=str(parse_dtype(b.dtype)).removeprefix("torch.")) for b in body.buckets]
    _dispatch(request, buckets, version=version)
    return {"message": "Request received, updating weights", "version": version}


async def _vllm_update_weights(request: Request, info: VllmUpdateInfo):
    """vLLM's update: the trainer broadcasts while this request is in flight; answered once received. Refused
    metadata is still received (and dropped) when the transfer sizes are known, then answered with a 400."""
    engine = engine_of(request)
    spec = await _require_group(request)
    if spec.trainer_rank != 0:
        raise Conflict("this update_info call needs a group made by /init_weight_transfer_engine", param="update_info")
    packed = info.packed if info.packed is not None else getattr(request.app.state, "weight_transfer_packed", False)
    refusal = None
    try:
        for i, (name, dtype, shape) in enumerate(zip(info.names, info.dtype_names, info.shapes)):
            validate_tensor(engine.weight_shapes, name, dtype, shape, f"update_info[{i}]")
    except BadRequest as e:
        refusal = e
        if not all(d in BUCKET_DTYPES for d in info.dtype_names):  # sizes unknown: nothing can be drained
            raise
    await engine.end_named_param_run()
    buckets = [b.to_dict() for b in plan_vllm_buckets(info.names, info.dtype_names, info.shapes, bool(packed),
                                                      info.packed_buffer_size_bytes)]
    futures = _dispatch(request, buckets, discard=refusal is not None, run_timeout_s=UPDATE_QUIET_S)
    results = await asyncio.gather(*futures, return_exceptions=True)
    if refusal is not None:
        raise refusal
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return {"message": "Weights updated"}


@route(router, "POST", "/start_weight_update/")
async def start_weight_update(request: Request):
    """No engine step runs from here until ``/finish_weight_update``: tokens never see half an update."""
    engine = engine_of(request)
    engine.check_alive()
    await _require_group(request)
    await engine.end_named_param_run()
    await engine.call_all(msg.BeginWeightUpdate(UPDATE_QUIET_S), timeout_s=600.0)
    return {"message": "Weight update started"}


@route(router, "POST", "/finish_weight_update/")
async def finish_weight_update(request: Request):
    engine = engine_of(request)
    engine.check_alive()
    await _require_group(request)
    version = engine.weight_version + 1
    targets = engine.live_replicas()  # call_all's: a replica restarted meanwhile did not load this version
    try:
        await engine.call_all(msg.FinishWeightUpdate(version), timeout_s=600.0)
    except BadRequest as e:  # it failed, was refused, or expired: no new version
        raise Conflict(e.message) from None
    engine.weight_version = version
    engine.weights_landed(version, targets)
    return {"message": "Weight update finished", "version": version}


@route(router, "POST", "/close_communicator/")
async def close_communicator(request: Request):
    engine = engine_of(request)
    engine.check_alive()
    request.app.state.weight_sync_init = None
    await engine.end_named_param_run()
    await engine.call_all(msg.CloseWeightSync())
    return {"message": "Request received, closing communicator"}
