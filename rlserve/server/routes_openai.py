"""An OpenAI-compatible subset: /v1/models, /v1/completions, /v1/chat/completions (what the ``openai`` SDK,
TRL >= 1.10's client and load tools speak), with vLLM's extra fields (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, return_token_ids, return_tokens_as_token_ids, prompt_logprobs).

``prompt_logprobs=K`` (TRL >= 1.12's teacher scoring) puts vLLM's layout in each completion choice (at the top
level of a chat completion): per prompt position, None for the first, then ``{str(token id): {"logprob",
"rank", "decoded_token"}}`` for the prompt token and the top K. Unlike vLLM, which ignores the temperature for
prompt logprobs, they are log_softmax(logits / temperature): the request's temperature says how to score.

``stream=true`` streams token by token as vLLM does (``openai_stream.py``): text (or chat ``delta``) chunks of
each choice as its tokens come, interleaved between choices, each naming its choice index; the finish reason
on a choice's last chunk; ``stream_options.include_usage`` adds a last chunk with the usage and no choices;
then ``data: [DONE]``. The concatenated deltas of a choice are its non-streamed text. Validation errors are
HTTP errors, before any event; a client that goes away aborts the request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from itertools import accumulate
from typing import Any

import numpy as np

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from rlserve.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from rlserve.sampling import SamplingParams
from rlserve.server.binary import gc_paused
from rlserve.server.errors import BadRequest, EngineUnavailable, NotFound
from rlserve.server.openai_stream import EventStreamResponse, ResponseStream
from rlserve.server.routing import engine_of, json_response, route, tokenize_prompts
from rlserve.server.security import check_num_prompts

router = APIRouter()


class OpenAISampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    structured_outputs: dict[str, Any] | None = None
    prompt_logprobs: int | None = None

    def params(self, logprobs: int | None, max_tokens: int | None) -> SamplingParams:
        values = dict(n=self.n, max_tokens=max_tokens, stop=self.stop, seed=self.seed, min_tokens=self.min_tokens,
                      ignore_eos=self.ignore_eos, stop_token_ids=self.stop_token_ids, logprobs=logprobs,
                      include_stop_str_in_output=self.include_stop_str_in_output,
                      skip_special_tokens=self.skip_special_tokens, structured_outputs=self.structured_outputs,
                      prompt_logprobs=self.prompt_logprobs)
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        try:
            return SamplingParams(**values)
        except (TypeError, ValueError) as e:
            raise BadRequest(str(e), param=str(e).split(" ", 1)[0]) from None


class CompletionRequest(OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


class ChatCompletionRequest(OpenAISampling):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True


def check_model(engine, name: str | None) -> str:
    served = engine.config.model
    if name is not None and name not in (served, served.rstrip("/").split("/")[-1]):
        raise NotFound(f"model {name!r} does not exist; this server serves {served!r}", param="model")
    return served


@route(router, "GET", "/v1/models")
async def models(request: Request):
    engine = engine_of(request)
    return {"object": "list", "data": [{
        "id": engine.config.model, "object": "model", "created": int(time.time()), "owned_by": "rlserve",
        "root": engine.config.model, "max_model_len": engine.info.get("max_model_len")}]}


def _token_str(engine, token_id: int, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else engine.tokenizer.decode([token_id])


def _token_strs(engine, token_ids: list[int], as_ids: bool, names: dict[int, str]) -> list[str]:
    """Each token's name in an answer; ``names`` caches the decoded ones for the whole answer (an RL batch
    repeats its tokens: 524k of them in 1,024 completions of rl-small)."""
    if as_ids:
        return [f"token_id:{t}" for t in token_ids]
    for t in set(token_ids).difference(names):
        names[t] = engine.tokenizer.decode([t])
    return [names[t] for t in token_ids]


def _usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(engine, c: CompletionOutput, as_ids: bool, text_offset: int = 0,
                         names: dict[int, str] | None = None) -> dict | None:
    """vLLM's completions layout. ``text_offset``: the offset of the first token's text (a streamed chunk's, past
    the earlier ones); ``names``: token id -> decoded name, shared by an answer's completions (_token_strs).

    Built a list at a time: TRL >= 1.12 asks /v1/completions for its RL batches, whose answer has an entry per
    token -- 0.76 s for rl-small's 1,024 x 512 tokens with one dict sorted per token, in the API process, serially."""
    if c.sampled_logprobs is None:
        return None
    names = {} if names is None else names
    tokens = _token_strs(engine, c.token_ids, as_ids, names)
    if c.top_n is None or not len(c.top_n):  # logprobs=0: the sampled token's entry alone
        top = [{token: lp} for token, lp in zip(tokens, c.sampled_logprobs)]
    elif (top := _ranked_entries_by_id(c, tokens) if as_ids else None) is None:
        top = []
        for token_id, token, lp, row in zip(c.token_ids, tokens, c.sampled_logprobs, c.top_logprobs):
            entries = {token: lp}
            row_names = _token_strs(engine, [tid for tid, _ in row], as_ids, names)
            for (tid, top_lp), name in zip(row, row_names):
                if tid != token_id:  # tokens that decode alike (e.g. lone bytes, "\ufffd"): the sampled one wins,
                    entries.setdefault(name, top_lp)  # then the better-ranked one
            top.append(dict(sorted(entries.items(), key=_descending_logprob)))
    offsets = list(accumulate(map(len, tokens), initial=text_offset))
    offsets.pop()  # each token's start; the last sum is the end
    return {"tokens": tokens, "token_logprobs": list(c.sampled_logprobs), "top_logprobs": top,
            "text_offset": offsets}


def _descending_logprob(item: tuple[str, float]) -> float:
    return -item[1]


def _ranked_entries_by_id(c: CompletionOutput, tokens: list[str]) -> list[dict] | None:
    """``_completion_logprobs``' per-token dicts when names are ids (``token_id:<id>``, one per id, so that no two
    entries of a row share a name) and every row of the top N is in descending order, as the sampler ranks it:
    the sampled token's entry then only has to be put in its place -- after each top entry with a higher logprob,
    before those with the same (it was first in) -- instead of a dict sorted per token. None (the general build
    sorts) when a row is out of order, holds an id twice or a logprob is NaN. With logprobs=5, 262k tokens
    (api_overhead --response_format openai --logprobs 5, CPU): build 975 -> 637 ms."""
    values = c.top_n.logprobs.astype(np.float64)
    sampled = np.asarray(c.sampled_logprobs, dtype=np.float64)
    ids = c.top_n.ids
    ranked = np.sort(ids, axis=1)
    if (np.isnan(sampled).any() or not (values[:, :-1] >= values[:, 1:]).all()  # NaN fails >= as well
            or (ranked[:, 1:] == ranked[:, :-1]).any()):  # an id twice in a row: the better-ranked one would win
        return None
    kept = ids != np.asarray(c.token_ids)[:, None]  # the sampled token's own top entry gives way to it
    places = ((values > sampled[:, None]) & kept).sum(axis=1).tolist()
    top = []
    for token, lp, place, row_ids, row_values, row_kept in zip(tokens, c.sampled_logprobs, places, ids.tolist(),
                                                               values.tolist(), kept.tolist()):
        items = [(f"token_id:{t}", v) for t, v, k in zip(row_ids, row_values, row_kept) if k]
        items.insert(place, (token, lp))
        top.append(dict(items))
    return top


def _chat_logprobs(engine, c: CompletionOutput, as_ids: bool, names: dict[int, str] | None = None) -> dict | None:
    """vLLM's chat layout: per token its name, logprob, UTF-8 bytes and top N. A token's ``bytes`` list is one
    object wherever the token recurs in the answer (it is serialised, never changed)."""
    if c.sampled_logprobs is None:
        return None
    names = {} if names is None else names
    texts = _token_strs(engine, c.token_ids, as_ids, names)
    tops = c.top_logprobs
    top_texts = [_token_strs(engine, [tid for tid, _ in row], as_ids, names) for row in tops] if tops else []
    utf8 = {text: list(text.encode()) for text in set(texts).union(*top_texts)}
    if not tops:  # logprobs=0
        return {"content": [{"token": text, "logprob": lp, "bytes": utf8[text], "top_logprobs": []}
                            for text, lp in zip(texts, c.sampled_logprobs)]}
    return {"content": [{"token": text, "logprob": lp, "bytes": utf8[text],
                         "top_logprobs": [{"token": t, "logprob": top_lp, "bytes": utf8[t]}
                                          for t, (_, top_lp) in zip(row_texts, row)]}
                        for text, lp, row, row_texts in zip(texts, c.sampled_logprobs, tops, top_texts)]}


def _prompt_logprobs(engine, pl: PromptLogprobs | None, as_ids: bool, names: dict) -> list | None:
    """vLLM's layout of a prompt's logprobs (see the module docstring); -inf is sent as -9999.0, as vLLM does.
    ``names``: token id -> (key, decoded token), shared by the prompts of one response."""
    if pl is None:
        return None

    def name(token_id: int) -> tuple[str, str]:
        if token_id not in names:
            names[token_id] = (str(token_id), _token_str(engine, token_id, as_ids))
        return names[token_id]

    top_ids, top_values = pl.top_ids.tolist(), np.maximum(pl.top_logprobs, -9999.0).tolist()
    values, ranks = np.maximum(pl.logprobs, -9999.0).tolist(), pl.ranks.tolist()
    entries: list[dict | None] = [None]
    for row, token_id in enumerate(pl.token_ids.tolist()):
        key, text = name(token_id)
        entry = {key: {"logprob": values[row], "rank": ranks[row], "decoded_token": text}}
        for rank, (tid, value) in enumerate(zip(top_ids[row], top_values[row]), start=1):
            key, text = name(tid)
            entry[key] = {"logprob": value, "rank": rank, "decoded_token": text}
        entries.append(entry)
    return entries


async def _serving_engine(request: Request):
    engine = engine_of(request)
    if request.app.state.draining:
        raise EngineUnavailable("server is shutting down")
    engine.check_alive()
    await engine.end_named_param_run()  # it may land the weights that replicas restarted after a push await
    engine.check_serving()
    return engine


async def _generate(request: Request, prompts, params: SamplingParams, field: str) -> list[RequestOutput]:
    engine = await _serving_engine(request)
    return await engine.generate(prompts, params, detokenize=True, is_disconnected=request.is_disconnected,
                                 request_id=request.headers.get("x-request-id"), field=field)


async def _stream(request: Request, body: OpenAISampling, prompts, params: SamplingParams, field: str, *,
                  chat: bool, model: str) -> StreamingResponse:
    """Submit the request and wait for its first updates (errors until then are HTTP errors), then answer with its
    token-by-token event stream."""
    engine = await _serving_engine(request)
    group = await engine.submit(prompts, params, detokenize=True, request_id=request.headers.get("x-request-id"),
                                field=field, stream=True)
    as_ids = body.return_tokens_as_token_ids
    token_names: dict[int, str] = {}  # decoded once for the whole stream
    if chat:
        def format_logprobs(delta, _offset):
            return _chat_logprobs(engine, delta, as_ids, token_names)
    else:
        def format_logprobs(delta, offset):
            return _completion_logprobs(engine, delta, as_ids, offset, token_names)
    names = {}
    stream = ResponseStream(engine, group, prompts, params, chat=chat, model=model,
                            include_usage=bool((body.stream_options or {}).get("include_usage")),
                            return_token_ids=body.return_token_ids, format_logprobs=format_logprobs,
                            format_prompt_logprobs=lambda pl: _prompt_logprobs(engine, pl, as_ids, names))
    await stream.start(request.is_disconnected)  # a request its replica refuses is an HTTP error, not an event
    return EventStreamResponse(stream, request.is_disconnected)


def completions_response(engine, outputs: list[RequestOutput], model: str, as_ids: bool,
                         return_token_ids: bool) -> dict:
    """A non-streamed /v1/completions answer (also timed by ``rlserve.bench.api_overhead --response_format
    openai``): one choice per sample, prompt-major."""
    choices, names, token_names = [], {}, {}
    for o in outputs:
        prompt_logprobs = _prompt_logprobs(engine, o.prompt_logprobs, as_ids, names)
        for c in o.outputs:
            choice = {"index": len(choices), "text": c.text, "finish_reason": c.finish_reason,
                      "stop_reason": c.stop_reason,
                      "logprobs": _completion_logprobs(engine, c, as_ids, names=token_names),
                      "prompt_logprobs": prompt_logprobs}
            if return_token_ids:
                choice.update(prompt_token_ids=o.prompt_token_ids, token_ids=c.token_ids)
            choice["weight_versions"] = c.weight_versions
            choices.append(choice)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage(outputs)}


@route(router, "POST", "/v1/completions")
async def completions(request: Request, body: CompletionRequest):
    engine = engine_of(request)
    model = check_model(engine, body.model)
    if body.echo:
        raise BadRequest("echo is not supported", param="echo")
    prompt = body.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise BadRequest("prompt must not be empty", param="prompt")
    check_num_prompts(request, len(prompt), "prompt", body.n)
    items = tokenize_prompts(engine, prompt, "prompt")
    params = body.params(body.logprobs, body.max_tokens)
    if body.stream:
        return await _stream(request, body, items, params, "prompt", chat=False, model=model)
    outputs = await _generate(request, items, params, "prompt")

    def respond():
        with gc_paused():  # as the TRL routes: the collector's passes over ~10^6 new dicts and lists, not the work
            return json_response(completions_response(engine, outputs, model, body.return_tokens_as_token_ids,
                                                      body.return_token_ids))

    # Logprobs make an entry per token (an RL batch's answer is ~45 MB) and prompt logprobs per prompt token: such
    # an answer is built off the event loop, which meanwhile serves other requests' outputs and health checks.
    large = params.logprobs is not None or params.prompt_logprobs is not None
    return await asyncio.to_thread(respond) if large else respond()


@route(router, "POST", "/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest):
    engine = engine_of(request)
    model = check_model(engine, body.model)
    if not body.messages:
        raise BadRequest("messages must not be empty", param="messages")
    limit = engine.limits.max_logprobs if engine.limits else engine.config.max_logprobs
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= limit:
        raise BadRequest(f"top_logprobs must be between 0 and {limit} (server flag --max_logprobs), got "
                         f"{body.top_logprobs}", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    params = body.params(logprobs, max_tokens)
    if body.response_format is not None:
        params = params.clone(structured_outputs=response_format_to_structured(body.response_format))
    try:
        ids = engine.render_chat(body.messages, body.chat_template_kwargs, body.tools)
    except Exception as e:
        raise BadRequest(f"messages: cannot apply the chat template: {e}", param="messages") from None
    if body.stream:
        return await _stream(request, body, [(None, ids)], params, "messages", chat=True, model=model)
    outputs = await _generate(request, [(None, ids)], params, "messages")
    out = outputs[0]
    choices, token_names = [], {}
    for c in out.outputs:
        choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                  "logprobs": _chat_logprobs(engine, c, body.return_tokens_as_token_ids, token_names),
                  "weight_versions": c.weight_versions}
        if body.return_token_ids:
            choice["token_ids"] = c.token_ids
        choices.append(choice)
    result = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
              "model": model, "choices": choices, "usage": _usage(outputs)}
    if body.return_token_ids:
        result["prompt_token_ids"] = out.prompt_token_ids
    if body.prompt_logprobs is not None:
        result["prompt_logprobs"] = _prompt_logprobs(engine, out.prompt_logprobs, body.return_tokens_as_token_ids, {})
    return json_response(result)


def response_format_to_structured(response_format: dict) -> dict | None:
    """OpenAI's response_format -> structured_outputs ({"json": schema}); "text" means none."""
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema is None:
            raise BadRequest("response_format.json_schema.schema is required", param="response_format")
        return {"json": schema}
    if kind == "json_object":
        return {"json": {"type": "object"}}
    raise BadRequest(f"response_format.type must be 'text', 'json_schema' or 'json_object', got {kind!r}",
                     param="response_format")

