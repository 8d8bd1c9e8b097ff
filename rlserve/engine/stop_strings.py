"""Stop strings, found where tokens are made: each sample's text is detokenized as its tokens are sampled, so
that a sample that completes a stop string finishes in the step that drew the token (freeing its KV blocks
then, not after a round trip to the front end).

As vLLM does: the token that completes a stop string is the sample's last (its text may go on past the stop
string, or the stop string may span several tokens); the text ends before the stop string, or after it with
``include_stop_str_in_output``; stop strings count only after ``min_tokens`` output tokens. Torch-free: the
scheduler calls it through ``Sequence.stop_state``.
"""

from __future__ import annotations

from rlserve.sampling import SamplingParams
from rlserve.tokenizer import IncrementalDetokenizer, find_stop_string


class StopStrings:
    """A request's stop strings and the tokenizer that turns its samples' tokens into text."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.params = params

    def new_state(self) -> "StopState":
        return StopState(IncrementalDetokenizer(self.tokenizer, self.prompt_token_ids,
                                                self.params.skip_special_tokens), self.params)


class StopState:
    """One sample's text so far. ``text`` is the sample's output text: cut at the stop string once one is found
    (``cut``). Each token costs two short decodes and a search of the text's last characters: nothing grows with
    the length of the sample."""

    def __init__(self, detokenizer: IncrementalDetokenizer, params: SamplingParams):
        self.detokenizer = detokenizer
        self.stops = params.stop
        self.longest = max(len(stop) for stop in self.stops)
        self.include_stop = params.include_stop_str_in_output
        self.cut: str | None = None  # the text cut at the stop string, once one ended the sample

    @property
    def text(self) -> str:
        return self.cut if self.cut is not None else self.detokenizer.text

    def final_text(self) -> str:
        """The finished sample's text: cut at its stop string, or else all of it, a trailing incomplete character
        included (as a plain decode of its tokens shows it)."""
        return self.cut if self.cut is not None else self.detokenizer.text + self.detokenizer.held_back()

    def add(self, token_id: int, can_stop: bool) -> str | None:
        """Append a sampled token; returns the stop string it completed (``can_stop``: min_tokens are out)."""
        delta = self.detokenizer.add(token_id)
        if not can_stop or not delta:
            return None
        window = self.detokenizer.tail(len(delta) + self.longest - 1)
        hit = find_stop_string(window, len(delta), self.stops)
        if hit is None:
            return None
        stop, at = hit
        at += self.detokenizer.num_chars - len(window)
        text = self.detokenizer.text
        self.cut = text[:at + len(stop)] if self.include_stop else text[:at]
        return stop
