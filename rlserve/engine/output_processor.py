"""Front-end side of generation: gathers the core's ``SeqUpdate``s into ``RequestOutput``s.

It detokenizes finished samples (when asked). Stop strings are not its business: the core finds them where
it makes the tokens (``stop_strings.py``) and sends those samples' text, already cut. Used in-process by
``LLM`` and in the API server for every replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlserve.engine.messages import SeqUpdate
from rlserve.outputs import CompletionOutput, PromptLogprobs, RequestOutput, TopLogprobs
from rlserve.sampling import SamplingParams


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenize: bool
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None
    # Per sample, the top-N arrays of its updates (logprobs=N > 0), concatenated once, when the request is
    # handed over: a streamed sample's updates are not copied again with each one.
    top_chunks: list[list[TopLogprobs]] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    def to_output(self) -> RequestOutput:
        if self.top_chunks is not None:
            for out, chunks in zip(self.outputs, self.top_chunks):
                out.top_n = TopLogprobs.concat(chunks, self.params.logprobs)
                chunks[:] = [out.top_n]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.outputs,
                             finished=self.finished, num_cached_tokens=self.num_cached_tokens,
                             prompt_logprobs=self.prompt_logprobs)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, detokenize: bool = True) -> RequestState:
        state = RequestState(request_id, prompt, list(prompt_token_ids), params, detokenize)
        want_logprobs = params.logprobs is not None
        state.outputs = [CompletionOutput(i, sampled_logprobs=[] if want_logprobs else None)
                         for i in range(params.n)]
        if params.logprobs:
            state.top_chunks = [[] for _ in range(params.n)]
        self.states[request_id] = state
        return state

    def process(self, update: SeqUpdate) -> RequestState | None:
        """Apply one update; returns the request's state if it just finished, else None."""
        state = self.states.get(update.request_id)
        if state is None:
            return None
        if update.prompt_logprobs is not None:  # the request's, sent once with whichever sample came first
            state.prompt_logprobs = update.prompt_logprobs
        out = state.outputs[update.index]
        if out.finished:
            return None
        state.num_cached_tokens = update.num_cached_tokens
        out.weight_versions = update.weight_versions
        out.token_ids += update.token_ids
        if update.sampled_logprobs is not None:
            out.sampled_logprobs += update.sampled_logprobs
        if update.top_logprobs is not None and state.top_chunks is not None:
            state.top_chunks[update.index].append(update.top_logprobs)
        if update.finish_reason is not None:
            out.finish_reason = update.finish_reason
            out.stop_reason = update.stop_reason
            if state.detokenize:
                out.text = update.text if update.text is not None else self.tokenizer.decode(
                    out.token_ids, skip_special_tokens=state.params.skip_special_tokens)
        if state.finished:
            del self.states[state.request_id]
            return state
        return None
