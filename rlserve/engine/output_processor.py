"""Front-end side of generation: gathers the core's ``SeqUpdate``s into ``RequestOutput``s.

It detokenizes (when asked), applies stop strings -- which need text, so the core cannot -- and tells the
caller which samples to end early. Used in-process by ``LLM`` and in the API server for every replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlserve.engine.messages import SeqUpdate
from rlserve.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from rlserve.sampling import SamplingParams
from rlserve.tokenizer import IncrementalDetokenizer, find_stop_string


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenize: bool
    outputs: list[CompletionOutput] = field(default_factory=list)
    detokenizers: dict[int, IncrementalDetokenizer] = field(default_factory=dict)
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    def to_output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.outputs,
                             finished=self.finished, num_cached_tokens=self.num_cached_tokens,
                             prompt_logprobs=self.prompt_logprobs)


def needs_streaming(params: SamplingParams) -> bool:
    """Stop strings must be checked token by token, so the core streams those requests."""
    return bool(params.stop)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, detokenize: bool = True) -> RequestState:
        state = RequestState(request_id, prompt, list(prompt_token_ids), params, detokenize)
        want_logprobs = params.logprobs is not None
        state.outputs = [CompletionOutput(i, sampled_logprobs=[] if want_logprobs else None,
                                          top_logprobs=[] if params.logprobs else None)
                         for i in range(params.n)]
        self.states[request_id] = state
        return state

    def process(self, update: SeqUpdate) -> tuple[RequestState | None, tuple[str, int, str] | None]:
        """Apply one update. Returns (the request's state if it just finished, else None) and, when a stop
        string ended the sample, (request_id, index, stop string) for the core to free it."""
        state = self.states.get(update.request_id)
        if state is None:
            return None, None
        if update.prompt_logprobs is not None:  # the request's, sent once with whichever sample came first
            state.prompt_logprobs = update.prompt_logprobs
        out = state.outputs[update.index]
        if out.finished:
            return None, None
        state.num_cached_tokens = update.num_cached_tokens
        out.weight_versions = update.weight_versions
        stopped = self._append(state, out, update)
        if stopped is None and update.finish_reason is not None:
            out.finish_reason = update.finish_reason
            out.stop_reason = update.stop_reason
        if out.finished and state.detokenize and update.index not in state.detokenizers:
            out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=state.params.skip_special_tokens)
        finish_in_core = None
        if stopped is not None and update.finish_reason is None:
            finish_in_core = (state.request_id, update.index, stopped)
        if state.finished:
            del self.states[state.request_id]
            return state, finish_in_core
        return None, finish_in_core

    def _append(self, state: RequestState, out: CompletionOutput, update: SeqUpdate) -> str | None:
        """Add the update's tokens, one at a time when stop strings apply; returns the stop string hit."""
        params = state.params
        if not params.stop:
            out.token_ids += update.token_ids
            if update.sampled_logprobs is not None:
                out.sampled_logprobs += update.sampled_logprobs
            if update.top_logprobs is not None:
                out.top_logprobs += update.top_logprobs
            return None
        detok = state.detokenizers.get(update.index)
        if detok is None:
            detok = state.detokenizers[update.index] = IncrementalDetokenizer(
                self.tokenizer, state.prompt_token_ids, params.skip_special_tokens)
        for i, token in enumerate(update.token_ids):
            out.token_ids.append(token)
            if update.sampled_logprobs is not None:
                out.sampled_logprobs.append(update.sampled_logprobs[i])
            if update.top_logprobs is not None:
                out.top_logprobs.append(update.top_logprobs[i])
            delta = detok.add(token)
            hit = find_stop_string(detok.text, len(delta), params.stop)
            if hit is not None:
                stop, at = hit
                out.text = detok.text[:at + len(stop)] if params.include_stop_str_in_output else detok.text[:at]
                out.finish_reason, out.stop_reason = "stop", stop
                return stop
        out.text = detok.text
        return None
