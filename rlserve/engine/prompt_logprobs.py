"""Prompt logprobs on the device: score the prompt positions a step computes, a chunk of rows at a time.

For a request with ``prompt_logprobs=K``, the hidden state at position q (computed from tokens 0..q) gives the
distribution of token q + 1, so prompt position p >= 1 is scored by row p - 1. A step's scored rows go through
the LM head ``CHUNK_ROWS`` at a time -- fp32 log-softmax at the request's temperature, the prompt token's
logprob and rank, the top K -- so that [rows, vocab] is never materialised for more than one chunk, and only
[rows, 1 + K] numbers per step come back to the host.

Under tensor parallelism every rank runs ``score`` on the same ``PromptLogprobsInput`` (the LM head all-gathers
its vocabulary shards), so every rank cuts the same chunks; only rank 0's results are read. Nothing here runs
for a step in which no request asked for prompt logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlserve.outputs import PromptLogprobs

CHUNK_ROWS = 256


@dataclass
class PromptLogprobsInput:
    """Which rows of a step's flat batch score which prompt tokens (plain lists: sent to the other TP ranks)."""
    rows: list[int]  # [R] the flat-batch row of each scored position (the row of the token before it)
    targets: list[int]  # [R] the prompt token each row scores
    counts: list[int]  # rows of each SchedulerOutput.prompt_logprobs item, in order (0 for some)
    temperatures: list[float]  # per item; 1.0 for a greedy request: its logits unscaled
    tops: list[int]  # K per item

    @property
    def num_top(self) -> int:
        return max(self.tops)


def plan(items, flat_starts: list[int]) -> PromptLogprobsInput | None:
    """The rows to score for ``items`` (SchedulerOutput.prompt_logprobs, each starting at row ``flat_starts[i]``
    of the flat batch). None when none of their chunks holds a position to score."""
    rows, targets, counts, temperatures, tops = [], [], [], [], []
    for item, first in zip(items, flat_starts):
        seq = item.seq
        start = seq.num_computed_tokens
        # Rows q in [lo, hi) score positions q + 1 <= P - 1; after a preemption the prompt is recomputed from
        # the start, and the positions already scored are not scored again.
        lo = max(start, seq.request.num_prompt_logprobs)
        hi = min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)
        rows += range(first + lo - start, first + hi - start)
        targets += seq.token_ids[lo + 1:hi + 1]
        counts.append(max(hi - lo, 0))
        params = seq.params
        temperatures.append(1.0 if params.is_greedy else params.temperature)
        tops.append(params.prompt_logprobs)
    return PromptLogprobsInput(rows, targets, counts, temperatures, tops) if rows else None


@dataclass
class ScoringTensors:
    rows: torch.Tensor  # [R] int64
    targets: torch.Tensor  # [R, 1] int64
    temperatures: torch.Tensor  # [R] fp32
    num_top: int


def to_device(inp: PromptLogprobsInput, device: torch.device) -> ScoringTensors:
    """Made before the forward is queued, so that these copies do not wait for it."""
    temperatures = torch.repeat_interleave(torch.tensor(inp.temperatures, dtype=torch.float32),
                                           torch.tensor(inp.counts))
    return ScoringTensors(torch.tensor(inp.rows, device=device),
                          torch.tensor(inp.targets, device=device).unsqueeze(1),
                          temperatures.to(device), inp.num_top)


def score(model: torch.nn.Module, hidden: torch.Tensor, t: ScoringTensors,
          chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden: [T, D], the step's hidden states. Returns values [R, 1 + K] fp32 (column 0: the prompt token's
    logprob, then the top K logprobs) and ids [R, 1 + K] int32 (column 0: its rank, then the top-K ids)."""
    num_rows, k = t.rows.shape[0], t.num_top
    values = torch.empty(num_rows, 1 + k, dtype=torch.float32, device=hidden.device)
    ids = torch.empty(num_rows, 1 + k, dtype=torch.int32, device=hidden.device)
    for s in range(0, num_rows, chunk_rows):
        e = min(s + chunk_rows, num_rows)
        logits = model.compute_logits(hidden[t.rows[s:e]]).float()  # [C, V], a fresh tensor: scaled in place
        logprobs = torch.log_softmax(logits.div_(t.temperatures[s:e].unsqueeze(1)), dim=-1)  # [C, V] fp32
        del logits
        actual = logprobs.gather(1, t.targets[s:e])  # [C, 1]
        values[s:e, 0] = actual.squeeze(1)
        # vLLM's rank: how many tokens are at least as likely (so a token outside the top K ranks > K).
        ids[s:e, 0] = (logprobs >= actual).sum(dim=1)
        if k:
            top_values, top_ids = logprobs.topk(k, dim=-1)  # [C, K], sorted
            values[s:e, 1:] = top_values
            ids[s:e, 1:] = top_ids
    return values, ids


def split(values: torch.Tensor, ids: torch.Tensor, inp: PromptLogprobsInput) -> list[PromptLogprobs]:
    """The step's results (on the host) as one PromptLogprobs chunk per item, each cut to its own K."""
    values, ids = values.numpy(), ids.numpy()
    targets = np.asarray(inp.targets, dtype=np.int64)
    chunks, at = [], 0
    for n, k in zip(inp.counts, inp.tops):
        v, i = values[at:at + n], ids[at:at + n]
        chunks.append(PromptLogprobs(targets[at:at + n], v[:, 0], i[:, 0], i[:, 1:1 + k], v[:, 1:1 + k]))
        at += n
    return chunks
