"""TRL's server protocol (what ``trl vllm-serve`` served): health, world size, generate, chat, cache reset."""

from __future__ import annotations

import dataclasses
import time

import orjson
from fastapi import APIRouter, Request

from rlserve.engine import messages as msg
from rlserve.outputs import RequestOutput
from rlserve.sampling import SamplingParams
from rlserve.server import binary, trl_logprobs
from rlserve.server.errors import BadRequest, EngineUnavailable
from rlserve.server.routing import engine_of, json_response, route, tokenize_prompts
from rlserve.server.schemas import ChatRequest, GenerateRequest
from rlserve.server.security import check_num_prompts

router = APIRouter()


@route(router, "GET", "/health/")
async def health(request: Request):
    """Asks every live engine replica; 503 unless all answer. On Ray, a server whose other replicas serve is
    "degraded" (200: it still serves) and names its dead ones (restart: ``POST /restart_replica/{i}``). One whose
    live replicas were all restarted after a weight push is "awaiting_weights" (200: it is up, and waits for the
    trainer to init the weight-sync group and push; generation answers 503 until then)."""
    engine = engine_of(request)
    if request.app.state.draining:
        raise EngineUnavailable("server is shutting down")
    engine.check_alive()
    await engine.call_all(msg.Ping(), timeout_s=10.0)
    dead = engine.dead_replicas()
    awaiting = engine.awaiting_weights()
    if dead or awaiting:
        return {"status": "degraded" if engine.routable_replicas() else "awaiting_weights",
                "dead_replicas": {str(i): why for i, why in dead.items()}, "awaiting_weights": awaiting}
    return {"status": "ok"}


@route(router, "GET", "/get_world_size/")
async def get_world_size(request: Request):
    return {"world_size": engine_of(request).world_size}


@route(router, "GET", "/get_tensor_parallel_size/")
async def get_tensor_parallel_size(request: Request):
    return {"tensor_parallel_size": engine_of(request).config.tensor_parallel_size}


SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def sampling_params_from(body) -> SamplingParams:
    unknown = sorted(set(body.generation_kwargs) - SAMPLING_FIELDS)
    if unknown:  # checked here so that the error names the field the caller wrote
        raise BadRequest(f"generation_kwargs: unknown sampling parameter(s): {', '.join(unknown)}",
                         param="generation_kwargs")
    try:
        return SamplingParams.from_dict(body.sampling_dict())
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e), param=str(e).split(" ", 1)[0]) from None


def trl_response(outputs: list[RequestOutput], params: SamplingParams) -> dict:
    """TRL's response: prompt_ids (one per prompt), completion_ids (len(prompts) * n, grouped by prompt),
    logprobs / logprob_token_ids ([sequence][token][entry], or None), plus finish_reasons and weight
    version(s). Built for orjson, not a pydantic model: an RL batch is ~10 MB of JSON. With logprobs=0 (the RL
    case) each sequence's per-token lists are an ``orjson.Fragment`` made from its flat list (``_one_per_token``),
    not 2 x 262k one-element Python lists (2/3 of building and encoding time); the bytes are the same. With
    logprobs=N, likewise from the engine's top-N arrays (``trl_logprobs.json_rows``)."""
    completions = [c for o in outputs for c in o.outputs]
    logprobs = ids = None
    if params.logprobs == 0:  # the RL case: [[logprob of the sampled token]] per token
        logprobs = _one_per_token([c.sampled_logprobs for c in completions])
        ids = _one_per_token([c.token_ids for c in completions])
    elif params.logprobs is not None:  # from the top-N arrays, sequence by sequence as bytes (trl_logprobs.py)
        logprobs, ids = trl_logprobs.json_rows(completions)
    versions = [c.weight_versions for c in completions]
    return {"prompt_ids": [o.prompt_token_ids for o in outputs], "completion_ids": [c.token_ids for c in completions],
            "logprobs": logprobs, "logprob_token_ids": ids, "finish_reasons": [c.finish_reason for c in completions],
            "weight_version": max((v for vs in versions for v in vs), default=0), "weight_versions": versions}


def _one_per_token(rows: list[list]) -> list[orjson.Fragment]:
    """Each row (a list of numbers) as ``[[a],[b],...]``, encoded from the flat row: orjson writes ``[a,b]``, and
    every comma becomes ``],[``. Sound because orjson puts no whitespace between items and a number or null
    holds no comma: the bytes are exactly orjson's for the nested lists. (One encoding per row, not one for the
    batch: on CPU the small buffers were faster than one 6 MB one, and an empty row needs no special case.)"""
    return [orjson.Fragment(b"[[" + orjson.dumps(row)[1:-1].replace(b",", b"],[") + b"]]" if row else b"[]")
            for row in rows]


def binary_response(outputs: list[RequestOutput], params: SamplingParams) -> dict:
    """``trl_response``'s values in the compact layout of rlserve/server/binary.py, built without the nested
    per-token lists."""
    completions = [c for o in outputs for c in o.outputs]
    sampled = top = None
    if params.logprobs == 0 and all(len(c.sampled_logprobs) == len(c.token_ids) for c in completions):
        sampled = [c.sampled_logprobs for c in completions]
    elif params.logprobs is not None:
        top = trl_logprobs.flat_entries(completions)
    versions = [c.weight_versions for c in completions]
    return binary.encode([o.prompt_token_ids for o in outputs], [c.token_ids for c in completions], sampled, top,
                         [c.finish_reason for c in completions],
                         max((v for vs in versions for v in vs), default=0), versions)


async def run_generation(request: Request, prompts, params: SamplingParams,
                         truncate_prompt_tokens: int | None = None, response_format: str = "json"):
    """``truncate_prompt_tokens`` (older TRL releases send it): keep only each prompt's last N tokens.
    ``response_format``: "json" (TRL's layout) or "binary" (rlserve/server/binary.py)."""
    engine = engine_of(request)
    if truncate_prompt_tokens is not None:
        prompts = [(text if len(ids) <= truncate_prompt_tokens else None, ids[-truncate_prompt_tokens:])
                   for text, ids in prompts]
    if request.app.state.draining:
        raise EngineUnavailable("server is shutting down")
    await engine.end_named_param_run()
    start = time.perf_counter()
    outputs = await engine.generate(prompts, params, detokenize=False, is_disconnected=request.is_disconnected,
                                    request_id=request.headers.get("x-request-id"))
    generated = time.perf_counter()
    layout = binary_response if response_format == "binary" else trl_response
    with binary.gc_paused():
        response = json_response(layout(outputs, params))
    # Where the server's time went (W3C Server-Timing, ms): admission to the last output processed, then the
    # answer built and serialised. `rlserve bench --through_server` reads it to split a request's wall time.
    response.headers["Server-Timing"] = (f"generate;dur={(generated - start) * 1e3:.1f}, "
                                         f"build;dur={(time.perf_counter() - generated) * 1e3:.1f}")
    return response


@route(router, "POST", "/generate/")
async def generate(request: Request, body: GenerateRequest):
    engine = engine_of(request)
    engine.check_alive()  # a routable replica: checked by engine.generate, once a per-tensor run has ended
    check_num_prompts(request, len(body.prompts), "prompts", body.n)
    params = sampling_params_from(body)
    return await run_generation(request, tokenize_prompts(engine, body.prompts, "prompts"), params,
                                body.truncate_prompt_tokens, body.response_format)


@route(router, "POST", "/chat/")
async def chat(request: Request, body: ChatRequest):
    engine = engine_of(request)
    engine.check_alive()  # a routable replica: checked by engine.generate, once a per-tensor run has ended
    check_num_prompts(request, len(body.messages), "messages", body.n)
    params = sampling_params_from(body)
    prompts = []
    for i, conversation in enumerate(body.messages):
        try:
            prompts.append((None, engine.render_chat(conversation, body.chat_template_kwargs, body.tools)))
        except Exception as e:  # a template error is the caller's input
            raise BadRequest(f"messages[{i}]: cannot apply the chat template: {e}", param="messages") from None
    return await run_generation(request, prompts, params, body.truncate_prompt_tokens, body.response_format)


@route(router, "POST", "/reset_prefix_cache/")
async def reset_prefix_cache(request: Request):
    engine = engine_of(request)
    engine.check_alive()
    await engine.end_named_param_run()
    await engine.call_all(msg.ResetPrefixCache())
    return {"message": "Prefix cache reset"}

