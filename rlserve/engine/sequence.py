"""Requests and the sequences they sample.

A ``Request`` holds one prompt and its ``n`` samples. Its prompt is computed once, by its first sequence; when
that prefill ends, the request forks into ``n`` sequences that share the prompt's KV blocks (copy-on-write for
the last, partial block) and each draw their first token from the same logits.

A ``Sequence`` owns its tokens, how many of them have KV in the cache (``num_computed_tokens``), its block
table and its status. "Prefill" and "decode" are not states: every step, a sequence catches its computed
tokens up to its length, in one chunk or several.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from rlserve.outputs import PromptLogprobs, TopLogprobs
from rlserve.sampling import SamplingParams

_MASK64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(request_seed: int, sample_index: int) -> int:
    """The random stream of sample ``sample_index`` of a request."""
    return mix64(request_seed ^ mix64(sample_index))


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    # Finished states are ordered after the live ones.
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4
    FINISHED_ERROR = 5

    @property
    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_ERROR: "error",
}


class TopLogprobRows:
    """A sample's top-N logprobs so far, one row per generated token, in two growing [T, N] arrays (ids int32,
    logprobs fp32) filled from each step's [S, N] arrays: no Python object per token. The width is fixed at the
    first row: N, or fewer when the vocabulary is smaller (the sampler's top-k is cut to it)."""

    def __init__(self, num_top: int):
        self.num_top = num_top
        self.num_rows = 0
        self.ids = np.empty((0, num_top), np.int32)
        self.logprobs = np.empty((0, num_top), np.float32)

    def __len__(self) -> int:
        return self.num_rows

    def append(self, step_ids: np.ndarray, step_logprobs: np.ndarray, row: int) -> None:
        """Row ``row`` of a step's [S, >= N] arrays (its first N columns: another request may have asked for more)."""
        if self.num_rows == len(self.ids):
            self._grow(step_ids.shape[1])
        self.ids[self.num_rows] = step_ids[row, :self.num_top]
        self.logprobs[self.num_rows] = step_logprobs[row, :self.num_top]
        self.num_rows += 1

    def _grow(self, step_width: int) -> None:
        capacity = max(16, 2 * self.num_rows)
        if self.num_rows == 0:  # the width is fixed now, and there is nothing to copy
            self.num_top = min(self.num_top, step_width)
            self.ids = np.empty((capacity, self.num_top), np.int32)
            self.logprobs = np.empty((capacity, self.num_top), np.float32)
            return
        ids, logprobs = np.empty((capacity, self.num_top), np.int32), np.empty((capacity, self.num_top), np.float32)
        ids[:self.num_rows], logprobs[:self.num_rows] = self.ids[:self.num_rows], self.logprobs[:self.num_rows]
        self.ids, self.logprobs = ids, logprobs

    def since(self, start: int) -> TopLogprobs:
        """Rows ``start`` onwards, copied (what an update sends)."""
        return TopLogprobs(self.ids[start:self.num_rows].copy(), self.logprobs[start:self.num_rows].copy())


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # the user's seed, or one drawn from the engine's generator
    stream: bool = False  # send every new token to the front end, not only the finished sequences
    grammar: object | None = None  # a CompiledGrammar when the request asks for structured outputs
    stop_strings: object | None = None  # a stop_strings.StopStrings when the request has stop strings
    sampling_row: object | None = None  # its parameters as a row of the sampler's batch (sampling_batch.py)
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list["Sequence"] = field(default_factory=list)
    is_forked: bool = False
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    # Prompt logprobs (params.prompt_logprobs), computed once by the parent, chunk by chunk of its prefill; the
    # whole result waits in ``prompt_logprobs`` until it is sent to the front end with the first sample's update.
    prompt_logprob_chunks: list[PromptLogprobs] = field(default_factory=list)
    num_prompt_logprobs: int = 0  # prompt positions scored so far (1..num_prompt_logprobs)
    prompt_logprobs: PromptLogprobs | None = None  # complete and not yet sent

    @property
    def is_finished(self) -> bool:
        return self.is_forked and all(s.status.is_finished for s in self.seqs)

    def add_prompt_logprobs(self, chunk: PromptLogprobs) -> None:
        if len(chunk.token_ids):
            self.prompt_logprob_chunks.append(chunk)
            self.num_prompt_logprobs += len(chunk.token_ids)

    def complete_prompt_logprobs(self) -> None:
        self.prompt_logprobs = PromptLogprobs.concat(self.prompt_logprob_chunks, self.params.prompt_logprobs)
        self.prompt_logprob_chunks = []


_seq_ids = itertools.count()


class Sequence:
    def __init__(self, request: Request, sample_index: int, token_ids: list[int]):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.sample_index = sample_index
        self.token_ids = token_ids
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens drawn on the device but not applied yet (async scheduling: those of the launch being applied and of
        # the one launched after it, K each for a multi-step launch). ``num_tokens`` counts only applied tokens; the
        # scheduler sees both.
        self.num_pending_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of this sequence's full blocks, by index
        self.num_registered_blocks = 0  # leading blocks already offered to the prefix cache
        self.cache_epoch = -1  # prefix-cache epoch of its blocks; registration only in the current one
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None
        self.rng_seed = stream_seed(request.seed, sample_index)
        self.grammar_state = None  # advanced with each newly sampled token (never on recompute)
        self.stop_state = None  # its text, for stop strings: advanced likewise (stop_strings.StopState)
        # What the front end gets back (kept here: non-streamed requests send it in few messages).
        self.sampled_logprobs: list[float] = []
        self.top_logprobs = TopLogprobRows(request.params.logprobs) if request.params.logprobs else None
        self.weight_versions: list[int] = []
        self.num_sent_tokens = 0  # tokens already sent to the front end

    # -- reading -----------------------------------------------------------------------------------
    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Its length as the scheduler sees it: applied tokens and those still being drawn on the device."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_unforked_parent(self) -> bool:
        """The sequence computing a multi-sample request's prompt, before it splits into n samples."""
        return not self.request.is_forked

    @property
    def num_samples_to_draw(self) -> int:
        return self.request.params.n if self.is_unforked_parent else 1

    # -- changing ----------------------------------------------------------------------------------
    def append_token(self, token_id: int, weight_version: int) -> None:
        self.token_ids.append(token_id)
        if not self.weight_versions or self.weight_versions[-1] != weight_version:
            if weight_version not in self.weight_versions:
                self.weight_versions.append(weight_version)

    def finish(self, status: SequenceStatus, stop_reason: int | str | None = None) -> None:
        assert status.is_finished
        self.status = status
        self.stop_reason = stop_reason

    def __repr__(self) -> str:
        return (f"Sequence({self.request.request_id}#{self.sample_index}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")
