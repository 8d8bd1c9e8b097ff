"""Weight-sync endpoints: TRL's (init_communicator, update_named_param, close_communicator) and the bucketed
``update_weights``.

Every update is validated in full against the model here, before any replica is told to receive: a wrong
name, shape or dtype is a 400 and no collective starts on either side. The handlers answer as soon as the
replicas are told; the trainer then broadcasts, and both sides meet in a barrier once everything landed.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request

from rlserve.distributed.weight_sync import parse_dtype
from rlserve.server.errors import BadRequest, Conflict
from rlserve.server.routing import engine_of, route
from rlserve.server.schemas import InitCommunicatorRequest, UpdateNamedParamRequest, UpdateWeightsRequest

logger = logging.getLogger(__name__)
router = APIRouter()


@route(router, "POST", "/init_communicator/")
async def init_communicator(request: Request, body: InitCommunicatorRequest):
    engine = engine_of(request)
    engine.check_serving()
    expected = engine.world_size + 1
    if body.world_size != expected:
        raise BadRequest(f"world_size must be {expected} (the server's {engine.world_size} workers + the "
                         f"client), got {body.world_size}", param="world_size")
    state = request.app.state
    # A new init replaces any group, established or half-made (a trainer that crashed and came back).
    backend = body.backend or ("nccl" if body.client_device_uuid else "gloo")
    if backend == "nccl" and engine.config.resolved_device().type != "cuda":
        raise BadRequest("backend 'nccl' needs a server on CUDA devices; this one runs on the CPU",
                         param="backend")
    state.weight_sync_init = engine.send_all_nowait(
        "init_weight_sync", host=body.host, port=body.port, world_size=body.world_size,
        group_timeout_s=body.timeout_s, backend=backend)
    state.weight_sync_updates = []
    return {"message": "Request received, initializing communicator"}


async def _require_group(request: Request, timeout_s: float = 60.0) -> None:
    init = getattr(request.app.state, "weight_sync_init", None)
    if not init:
        raise Conflict("no weight-sync group: call /init_communicator/ first", param="name")
    done, pending = await asyncio.wait(init, timeout=timeout_s)
    if pending:
        raise Conflict("the weight-sync group is not ready yet (has the client joined?)")
    for future in done:
        if future.exception() is not None:
            raise Conflict(f"the weight-sync group failed: {future.exception()}")


def validate_tensor(shapes: dict, name: str, dtype: str, shape: list[int], where: str) -> None:
    if name not in shapes:
        raise BadRequest(f"{where}: unknown parameter name {name!r}", param="name")
    if tuple(shape) != tuple(shapes[name]):
        raise BadRequest(f"{where}: {name} must have shape {list(shapes[name])}, got {list(shape)}", param="shape")
    try:
        parse_dtype(dtype)
    except ValueError as e:
        raise BadRequest(f"{where}: {e}", param="dtype") from None


def _dispatch(request: Request, buckets: list[dict], version: int) -> None:
    engine = engine_of(request)
    futures = engine.send_all_nowait("update_weights", buckets=buckets, version=version)
    request.app.state.weight_sync_updates = futures
    for future in futures:
        future.add_done_callback(_log_update(version))


def _log_update(version: int):
    def done(future: asyncio.Future) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            logger.error("weight update to version %d failed: %s", version, future.exception())
        else:
            r = future.result()
            logger.info("weights version %d loaded: %.1f MB in %.3fs", version, r["bytes"] / 1e6, r["seconds"])
    return done


@route(router, "POST", "/update_named_param/")
async def update_named_param(request: Request, body: UpdateNamedParamRequest):
    """TRL's per-tensor update: the tensor follows by broadcast."""
    engine = engine_of(request)
    engine.check_serving()
    validate_tensor(engine.weight_shapes, body.name, body.dtype, body.shape, "update_named_param")
    await _require_group(request)
    numel = 1
    for s in body.shape:
        numel *= s
    bucket = {"dtype": str(parse_dtype(body.dtype)).removeprefix("torch."), "numel": numel,
              "tensors": [{"name": body.name, "shape": body.shape, "offset": 0}]}
    version = engine.next_weight_version(named_param=True)
    _dispatch(request, [bucket], version)
    return {"message": "Request received, updating named parameter", "version": version}


@route(router, "POST", "/update_weights/")
async def update_weights(request: Request, body: UpdateWeightsRequest):
    """Bucketed update: metadata for many tensors in one call; buckets follow by broadcast, in order."""
    engine = engine_of(request)
    engine.check_serving()
    for b, bucket in enumerate(body.buckets):
        end = 0
        for t, entry in enumerate(sorted(bucket.tensors, key=lambda e: e.offset)):
            where = f"buckets[{b}].tensors[{t}]"
            validate_tensor(engine.weight_shapes, entry.name, bucket.dtype, entry.shape, where)
            numel = 1
            for s in entry.shape:
                numel *= s
            if entry.offset < end:
                raise BadRequest(f"{where}: offset {entry.offset} overlaps the previous tensor", param="offset")
            end = entry.offset + numel
        if end > bucket.numel:
            raise BadRequest(f"buckets[{b}]: tensors need {end} elements, numel is {bucket.numel}", param="numel")
    await _require_group(request)
    if body.version is not None and body.version <= engine.weight_version:
        raise BadRequest(f"version must be > {engine.weight_version}, got {body.version}", param="version")
    version = engine.next_weight_version()
    if body.version is not None:
        version = engine.weight_version = body.version
    buckets = [dict(b.model_dump(), dtype=str(parse_dtype(b.dtype)).removeprefix("torch.")) for b in body.buckets]
    _dispatch(request, buckets, version)
    return {"message": "Request received, updating weights", "version": version}


@route(router, "POST", "/close_communicator/")
async def close_communicator(request: Request):
    engine = engine_of(request)
    engine.check_serving()
    await engine.call_all("close_weight_sync")
    request.app.state.weight_sync_init = None
    return {"message": "Request received, closing communicator"}
