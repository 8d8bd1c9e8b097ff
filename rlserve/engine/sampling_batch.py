"""Per-step sampling inputs: which logits row each sample reads, its parameters, and its random seed.

Randomness is counter-based: a row's seed is a hash of (the sample's stream seed, its output position), made
here on the host, so the draw does not depend on the rest of the batch or on preemption.
"""

from __future__ import annotations

import torch

from rlserve.engine.sampler import SamplingBatch
from rlserve.engine.scheduler import ScheduledSeq
from rlserve.engine.sequence import Sequence, mix64
from rlserve.engine.structured import build_allowed_mask

_SEED_MASK = (1 << 63) - 1


def sample_seed(seq: Sequence, sample_index: int) -> int:
    """The random stream of a request's sample ``sample_index`` (a forking parent draws for its children)."""
    if sample_index == seq.sample_index:
        return seq.rng_seed
    return mix64(seq.request.seed ^ mix64(sample_index))


def row_seed(stream_seed: int, position: int) -> int:
    """A non-negative 63-bit seed for one draw: counter-based in (stream, output position)."""
    return mix64(stream_seed ^ mix64(position + 0x5DEECE66D)) & _SEED_MASK


def prepare_sampling(items: list[ScheduledSeq], vocab_size: int, eos_token_ids: tuple[int, ...],
                     device: torch.device) -> SamplingBatch:
    """Per-row sampling tensors for the sequences that sample this step (a forking parent: one row per
    sample). Stages no row uses are left out, so the sampler skips them."""
    logits_index, temperature, greedy, seeds = [], [], [], []
    top_k, top_p, min_p, rep, pres, freq, raw = [], [], [], [], [], [], []
    banned_rows, banned_ids, penalty_rows, grammar_states = [], [], [], []
    max_logprobs = -1
    for r, item in enumerate(items):
        seq = item.seq
        p = seq.params
        for k in range(seq.num_samples_to_draw):
            index = seq.sample_index if seq.num_samples_to_draw == 1 else k
            row = len(logits_index)
            logits_index.append(r)
            greedy.append(p.is_greedy)
            temperature.append(1.0 if p.is_greedy else p.temperature)
            seeds.append(row_seed(sample_seed(seq, index), seq.num_output_tokens))
            top_k.append(p.top_k if p.top_k > 0 else vocab_size)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
            rep.append(p.repetition_penalty)
            pres.append(p.presence_penalty)
            freq.append(p.frequency_penalty)
            raw.append(p.logprobs_mode == "raw")
            if p.logprobs is not None:
                max_logprobs = max(max_logprobs, p.logprobs)
            if seq.num_output_tokens < p.min_tokens:
                stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                for t in stop_ids:
                    if t < vocab_size:
                        banned_rows.append(row)
                        banned_ids.append(t)
            if p.uses_penalties:
                penalty_rows.append((row, seq))
            grammar_states.append(seq.grammar_state)
    dev = device
    num_rows = len(logits_index)
    batch = SamplingBatch(
        logits_index=torch.tensor(logits_index, dtype=torch.int64, device=dev),
        temperature=torch.tensor(temperature, dtype=torch.float32, device=dev),
        is_greedy=torch.tensor(greedy, dtype=torch.bool, device=dev),
        seeds=torch.tensor(seeds, dtype=torch.int64, device=dev),
        all_greedy=all(greedy), any_greedy=any(greedy), max_num_logprobs=max_logprobs,
        needs_gather=num_rows != len(items))
    if any(k < vocab_size for k in top_k):
        batch.top_k = torch.tensor(top_k, dtype=torch.int64, device=dev)
    if any(p < 1.0 for p in top_p):
        batch.top_p = torch.tensor(top_p, dtype=torch.float32, device=dev)
    if any(p > 0.0 for p in min_p):
        batch.min_p = torch.tensor(min_p, dtype=torch.float32, device=dev)
    if any(state is not None for state in grammar_states):
        batch.allowed_mask = build_allowed_mask(grammar_states, vocab_size, dev)
    if any(raw):
        batch.raw_logprob_rows = torch.tensor(raw, dtype=torch.bool, device=dev)
    if banned_rows:
        batch.banned = (torch.tensor(banned_rows, device=dev), torch.tensor(banned_ids, device=dev))
    if penalty_rows:
        counts = torch.zeros(num_rows, vocab_size, dtype=torch.float32)
        prompt_mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool)
        for row, seq in penalty_rows:
            out = torch.tensor(seq.output_token_ids, dtype=torch.int64)
            if len(out):
                counts[row].index_add_(0, out, torch.ones(len(out)))
            prompt_mask[row, torch.tensor(seq.token_ids[:seq.num_prompt_tokens])] = True
        batch.output_counts = counts.to(dev)
        batch.prompt_mask = prompt_mask.to(dev)
        batch.repetition_penalty = torch.tensor(rep, dtype=torch.float32, device=dev)
        batch.presence_penalty = torch.tensor(pres, dtype=torch.float32, device=dev)
        batch.frequency_penalty = torch.tensor(freq, dtype=torch.float32, device=dev)
    return batch
