"""Teacher scoring as TRL 1.9-1.10 asks ``trl vllm-serve`` for it: ``POST /get_sequence_logprobs/``.

Each sequence (prompt + completion token ids) is scored by one score-only engine request (``max_tokens=0``,
``prompt_logprobs=top_logprobs``), and the answer holds its completion region, positions ``prompt_length`` to
``len(sequence) - 1``, laid out as that server did: nested JSON lists, or base64 numpy arrays (``"binary"``).
Position 0 has no distribution (vLLM's ``None``): an empty entry in JSON, padding in binary.

TRL >= 1.12 asks ``/v1/completions`` with ``prompt_logprobs`` instead (``routes_openai.py``).
"""

from __future__ import annotations

import asyncio
import base64
import math

import numpy as np
from fastapi import APIRouter, Request

from rlserve.outputs import RequestOutput
from rlserve.sampling import MAX_PROMPT_LOGPROBS, SamplingParams
from rlserve.server.errors import BadRequest, EngineUnavailable
from rlserve.server.routing import engine_of, json_response, route
from rlserve.server.schemas import SequenceLogprobsRequest
from rlserve.server.security import check_num_prompts

router = APIRouter()


def validate(body: SequenceLogprobsRequest, max_model_len: int, vocab_size: int) -> None:
    """TRL's checks, as 400s naming the field and the limit."""
    if len(body.sequences) != len(body.prompt_lengths):
        raise BadRequest(f"prompt_lengths has {len(body.prompt_lengths)} entries for {len(body.sequences)} "
                         f"sequences: give one per sequence", param="prompt_lengths")
    for i, (seq, prompt_length) in enumerate(zip(body.sequences, body.prompt_lengths)):
        if not seq:
            raise BadRequest(f"sequences[{i}] must not be empty", param="sequences")
        if not 0 <= prompt_length <= len(seq):
            raise BadRequest(f"prompt_lengths[{i}] is {prompt_length}, outside [0, {len(seq)}] (0 to the length of "
                             f"sequences[{i}])", param="prompt_lengths")
        if len(seq) > max_model_len:
            raise BadRequest(f"sequences[{i}] is {len(seq)} tokens, more than max_model_len ({max_model_len})",
                             param="sequences")
    limit = min(MAX_PROMPT_LOGPROBS, vocab_size)
    if not 0 <= body.top_logprobs <= limit:
        raise BadRequest(f"top_logprobs must be between 0 and {limit}, got {body.top_logprobs}",
                         param="top_logprobs")
    if not (math.isfinite(body.temperature) and body.temperature > 0):
        raise BadRequest(f"temperature must be > 0, got {body.temperature}", param="temperature")


@route(router, "POST", "/get_sequence_logprobs/")
async def get_sequence_logprobs(request: Request, body: SequenceLogprobsRequest):
    """Logprobs of existing sequences under the served weights: per completion position, the top
    ``top_logprobs`` of log_softmax(logits / temperature) (fp32) and the actual token's. Unlike vLLM, which
    ignores the temperature for prompt logprobs, the temperature applies: the field says it does."""
    engine = engine_of(request)
    if request.app.state.draining:
        raise EngineUnavailable("server is shutting down")
    engine.check_alive()  # a routable replica: checked by engine.generate, once a per-tensor run has ended
    check_num_prompts(request, len(body.sequences), "sequences")
    validate(body, engine.info["max_model_len"], engine.info["vocab_size"])
    outputs = []
    if body.sequences:
        await engine.end_named_param_run()
        params = SamplingParams(max_tokens=0, temperature=body.temperature, prompt_logprobs=body.top_logprobs)
        outputs = await engine.generate([(None, seq) for seq in body.sequences], params, detokenize=False,
                                        is_disconnected=request.is_disconnected,
                                        request_id=request.headers.get("x-request-id"), field="sequences")
    layout = binary_layout if body.response_format == "binary" else json_layout
    # An answer for a batch of long sequences is large: built off the event loop.
    return await asyncio.to_thread(lambda: json_response(
        layout(outputs, body.sequences, body.prompt_lengths, body.top_logprobs)))


def json_layout(outputs: list[RequestOutput], sequences, prompt_lengths, top_k: int) -> dict:
    """Per sequence, per completion position: the top-k token ids and logprobs by rank, then the actual token
    when it is not among them (vLLM's dict sorted by rank: its rank is then > k)."""
    all_logprobs, all_ids = [], []
    for out, seq, prompt_length in zip(outputs, sequences, prompt_lengths):
        pl = out.prompt_logprobs
        top_ids, top_values = pl.top_ids.tolist(), pl.top_logprobs.tolist()
        actual = pl.logprobs.tolist()
        seq_logprobs, seq_ids = ([[]], [[]]) if prompt_length == 0 else ([], [])  # position 0: no entry
        for row in range(max(prompt_length, 1) - 1, len(seq) - 1):  # row p - 1 scores position p
            ids, values, token = top_ids[row], top_values[row], seq[row + 1]
            if token not in ids:
                ids, values = ids + [token], values + [actual[row]]
            seq_ids.append(ids)
            seq_logprobs.append([None if math.isnan(v) else v for v in values])
        all_logprobs.append(seq_logprobs)
        all_ids.append(seq_ids)
    # The binary fields are null here, as in TRL's response model.
    return {"logprobs": all_logprobs, "logprob_token_ids": all_ids, "logprobs_b64": None, "token_ids_b64": None,
            "actual_logprobs_b64": None, "actual_token_ids_b64": None, "shape": None, "completion_lengths": None}


def binary_layout(outputs: list[RequestOutput], sequences, prompt_lengths, top_k: int) -> dict:
    """float32 / int32 arrays [batch, max completion length, top_k] (and [.., 1] for the actual tokens), padded
    with -inf / 0, base64-encoded, with ``shape`` and ``completion_lengths`` to cut them."""
    lengths = [len(seq) - prompt_length for seq, prompt_length in zip(sequences, prompt_lengths)]
    shape = (len(sequences), max(lengths, default=0), top_k)
    logprobs = np.full(shape, -np.inf, dtype=np.float32)
    token_ids = np.zeros(shape, dtype=np.int32)
    actual_logprobs = np.full(shape[:2] + (1,), -np.inf, dtype=np.float32)
    actual_ids = np.zeros(shape[:2] + (1,), dtype=np.int32)
    for i, (out, seq, prompt_length) in enumerate(zip(outputs, sequences, prompt_lengths)):
        pl, first = out.prompt_logprobs, max(prompt_length, 1)  # position 0 stays padding
        t = slice(first - prompt_length, len(seq) - prompt_length)  # completion positions
        rows = slice(first - 1, len(seq) - 1)  # their rows in the prompt logprobs
        logprobs[i, t] = pl.top_logprobs[rows]
        token_ids[i, t] = pl.top_ids[rows]
        actual_logprobs[i, t, 0] = pl.logprobs[rows]
        actual_ids[i, t, 0] = seq[first:]
    for array in (logprobs, actual_logprobs):
        array[np.isnan(array)] = -np.inf  # TRL's server leaves a NaN position as padding

    def b64(array: np.ndarray) -> str:
        return base64.b64encode(array.tobytes()).decode("ascii")

    return {"logprobs_b64": b64(logprobs), "token_ids_b64": b64(token_ids),
            "actual_logprobs_b64": b64(actual_logprobs), "actual_token_ids_b64": b64(actual_ids),
            "shape": list(shape), "completion_lengths": lengths}
