"""Admission of a generation request: every check that can be made before it is queued, in one place.

The API server runs ``admit`` once per prompt, before anything is sent to a replica (a refusal is a 400 that
names the field); offline ``LLM.generate`` runs the same. An engine core trusts what it is given: it only
asserts that a request was admitted. The checks need the runtime limits only (vocabulary, context, KV
capacity), never the model, so this module imports no torch: the API process imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlserve.sampling import SamplingParams

PROMPT = "prompt"  # InvalidRequest.field of errors about the prompt itself or its length


class InvalidRequest(ValueError):
    """A request the engine cannot run. ``field``: the request field at fault (``PROMPT`` for the prompt and
    its length, else a ``SamplingParams`` field); ``value``: what was given; ``limit``: the bound it broke.
    The front end turns these into the 400 body; nothing parses the message."""

    def __init__(self, field: str, message: str, value: Any = None, limit: Any = None):
        super().__init__(message)
        self.field = field
        self.message = message
        self.value = value
        self.limit = limit


@dataclass(frozen=True)
class Limits:
    """The runtime facts admission needs (a replica's ``RuntimeInfo``; the smallest KV cache of all replicas)."""
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int
    max_logprobs: int

    @classmethod
    def of(cls, info, max_logprobs: int) -> "Limits":
        """From a ``RuntimeInfo`` or its ``summary()`` dict."""
        get = info.get if isinstance(info, dict) else lambda k: getattr(info, k)
        return cls(get("vocab_size"), get("max_model_len"), get("kv_capacity_tokens"), max_logprobs)


def check_prompt_ids(prompt_token_ids: list[int], vocab: int) -> None:
    """A non-empty list of ints inside the vocabulary (an id outside the embedding is a device assert on CUDA)."""
    if not prompt_token_ids:
        raise InvalidRequest(PROMPT, "prompt must not be empty")
    for t in prompt_token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise InvalidRequest(PROMPT, f"prompt token id {t!r} is outside the vocabulary [0, {vocab})",
                                 value=t, limit=vocab)


def admit(limits: Limits, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
    """Check a prompt and its sampling parameters; raises InvalidRequest. Returns the parameters the engine
    runs: ``max_tokens`` resolved (None becomes as many as the context and the cache allow)."""
    vocab = limits.vocab_size
    check_prompt_ids(prompt_token_ids, vocab)
    for t in params.stop_token_ids:
        if t >= vocab:
            raise InvalidRequest("stop_token_ids", f"stop_token_ids: {t} is outside the vocabulary [0, {vocab})",
                                 value=t, limit=vocab)
    if params.logprobs is not None and params.logprobs > limits.max_logprobs:
        raise InvalidRequest("logprobs", f"logprobs must be <= {limits.max_logprobs} (server flag --max_logprobs), "
                             f"got {params.logprobs}", value=params.logprobs, limit=limits.max_logprobs)
    if params.prompt_logprobs is not None and params.prompt_logprobs > vocab:
        raise InvalidRequest("prompt_logprobs", f"prompt_logprobs must be <= {vocab} (the vocabulary size), "
                             f"got {params.prompt_logprobs}", value=params.prompt_logprobs, limit=vocab)
    if params.structured_outputs is not None:
        from rlserve.engine.structured import check_spec  # imports torch: only for structured requests
        try:
            check_spec(params.structured_outputs)
        except ValueError as e:
            raise InvalidRequest("structured_outputs", str(e)) from None
    max_tokens = check_fits(len(prompt_token_ids), params.max_tokens, limits.max_model_len,
                            limits.kv_capacity_tokens)
    return params if max_tokens == params.max_tokens else params.clone(max_tokens=max_tokens)


def check_fits(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, capacity: int) -> int:
    """Refuse what could never run (longer than the context or the whole KV cache); returns the effective
    max_tokens (None: as long as the context and the cache allow). Errors name the prompt: it is what a
    caller with several prompts must shorten."""
    if max_tokens == 0:  # score the prompt only: it may fill the whole context
        limit = min(max_model_len, capacity)
        if num_prompt_tokens > limit:
            raise InvalidRequest(PROMPT, f"prompt is {num_prompt_tokens} tokens, max_model_len is {max_model_len} "
                                 f"and the KV cache holds {capacity}: the prompt must fit in both",
                                 value=num_prompt_tokens, limit=limit)
        return 0
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequest(PROMPT, f"prompt is {num_prompt_tokens} tokens, max_model_len is {max_model_len}: "
                             f"the prompt must be shorter than max_model_len",
                             value=num_prompt_tokens, limit=max_model_len - 1)
    if max_tokens is None:
        max_tokens = min(max_model_len, capacity) - num_prompt_tokens
        if max_tokens < 1:
            raise InvalidRequest(PROMPT, f"prompt is {num_prompt_tokens} tokens, the KV cache holds {capacity}",
                                 value=num_prompt_tokens, limit=capacity - 1)
    total = num_prompt_tokens + max_tokens
    if total > max_model_len:
        raise InvalidRequest(PROMPT, f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} "
                             f"exceeds max_model_len ({max_model_len})", value=total, limit=max_model_len)
    if total > capacity:
        raise InvalidRequest(PROMPT, f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} "
                             f"exceeds the KV cache capacity ({capacity} tokens)", value=total, limit=capacity)
    return max_tokens
