"""Per-step sampling inputs: which logits row each sample reads, its parameters, and its random seed.

Randomness is counter-based: a row's seed is a hash of (the sample's stream seed, its output position), made
here on the host, so the draw does not depend on the rest of the batch or on preemption.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from rlserve.engine.penalty_state import PenaltyState
from rlserve.engine.sampler import SamplingBatch
from rlserve.sampling import SamplingParams
from rlserve.engine.scheduler import ScheduledSeq
from rlserve.engine.sequence import Sequence, stream_seed
from rlserve.engine.structured import build_allowed_mask

_SEED_MASK = np.uint64((1 << 63) - 1)
_POSITION_SALT = np.uint64(0x5DEECE66D)


def sample_seed(seq: Sequence, sample_index: int) -> int:
    """The random stream of a request's sample ``sample_index`` (a forking parent draws for its children)."""
    if sample_index == seq.sample_index:
        return seq.rng_seed
    return stream_seed(seq.request.seed, sample_index)


def mix64_array(x: np.ndarray) -> np.ndarray:
    """``sequence.mix64`` on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_seeds(stream_seeds: list[int], positions: list[int]) -> np.ndarray:
    """Non-negative 63-bit seeds, one per draw: counter-based in (stream, output position)."""
    streams = np.array(stream_seeds, dtype=np.uint64)
    pos = np.array(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return (mix64_array(streams ^ mix64_array(pos + _POSITION_SALT)) & _SEED_MASK).astype(np.int64)


class _RequestRow:
    """A request's sampling parameters as one row of the batch's columns, computed once per request."""
    __slots__ = ("values", "logprobs", "min_tokens", "banned", "penalties", "checks", "prompt_ids")

    def __init__(self, p: SamplingParams, vocab_size: int, eos_token_ids: tuple[int, ...]):
        greedy = p.is_greedy
        # temperature, greedy, top_k, top_p, min_p, repetition, presence, frequency, raw logprobs. A greedy row
        # takes the argmax: truncation would change nothing but its logprobs, so it has none (as in HF).
        top_k = min(p.top_k, vocab_size) if p.top_k > 0 and not greedy else vocab_size
        self.values = (1.0 if greedy else p.temperature, greedy, top_k, 1.0 if greedy else p.top_p,
                       0.0 if greedy else p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
                       p.logprobs_mode == "raw")
        self.logprobs = -1 if p.logprobs is None else p.logprobs
        self.min_tokens = p.min_tokens
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        self.banned = sorted(t for t in stop_ids if t < vocab_size)  # masked until min_tokens
        self.penalties = p.uses_penalties
        self.checks = self.penalties or self.min_tokens > 0  # rows needing per-step work beyond the columns
        self.prompt_ids: list[int] | None = None  # the prompt's distinct ids (penalties), once needed


def prepare_sampling(items: list[ScheduledSeq], vocab_size: int, eos_token_ids: tuple[int, ...],
                     device: torch.device, penalties: PenaltyState | None = None, num_steps: int = 1) -> SamplingBatch:
    """Per-row sampling tensors for the sequences that sample this step (a forking parent: one row per
    sample). Stages no row uses are left out, so the sampler skips them. An item whose rows cannot be made
    gets greedy placeholder rows and is listed in ``failed_items``: it fails alone.

    ``penalties``: the runner's persistent penalty state, whose penalised rows this brings up to date (None: a
    state built from scratch for this batch alone, as a test or a one-off batch wants).

    ``num_steps`` > 1: a multi-step launch's batch, whose ``step_seeds`` [K, S] hold each step's seeds (the rows'
    output positions advance by one a step); its other columns serve every step."""
    logits_index, values, streams, positions = [], [], [], []
    banned_rows, banned_ids, penalty_rows, grammar_states = [], [], [], []
    max_logprobs = -1
    any_grammar = False
    failed: dict[int, str] = {}
    for r, item in enumerate(items):
        mark = len(logits_index), len(banned_rows), len(penalty_rows)
        try:
            seq = item.seq
            request = seq.request
            row = request.sampling_row
            if row is None:
                row = request.sampling_row = _RequestRow(request.params, vocab_size, eos_token_ids)
            # with a draw in flight (async scheduling): seq.num_scheduled_tokens, inline (a hot loop)
            num_out = len(seq.token_ids) + seq.num_pending_tokens - seq.num_prompt_tokens
            if request.is_forked and not row.checks:  # the common case, one row, nothing to mask
                logits_index.append(r)
                values.append(row.values)
                streams.append(seq.rng_seed)
                positions.append(num_out)
                grammar_states.append(seq.grammar_state)
                if row.logprobs > max_logprobs:
                    max_logprobs = row.logprobs
                any_grammar = any_grammar or seq.grammar_state is not None
                continue
            count = seq.num_samples_to_draw
            for k in range(count):
                if row.min_tokens > num_out or row.penalties:
                    index = len(logits_index)
                    if row.min_tokens > num_out:
                        banned_rows += [index] * len(row.banned)
                        banned_ids += row.banned
                    if row.penalties:
                        penalty_rows.append((index, seq))
                logits_index.append(r)
                values.append(row.values)
                streams.append(seq.rng_seed if count == 1 else sample_seed(seq, k))
                positions.append(num_out)
                grammar_states.append(seq.grammar_state)
            if row.logprobs > max_logprobs:
                max_logprobs = row.logprobs
            any_grammar = any_grammar or seq.grammar_state is not None
        except Exception as e:  # this request's draw fails alone (finish reason "error"), not the step
            failed[r] = f"{type(e).__name__}: {e}"
            for column in (logits_index, values, streams, positions, grammar_states):
                del column[mark[0]:]
            del banned_rows[mark[1]:], banned_ids[mark[1]:], penalty_rows[mark[2]:]
            for _ in range(item.seq.num_samples_to_draw):  # placeholder rows: greedy, drawn and dropped
                logits_index.append(r)
                values.append((1.0, True, vocab_size, 1.0, 0.0, 1.0, 0.0, 0.0, False))
                streams.append(0)
                positions.append(0)
                grammar_states.append(None)
    temperature, greedy, top_k, top_p, min_p, rep, pres, freq, raw = zip(*values)
    dev = device
    num_rows = len(logits_index)
    step_seeds = None
    if num_steps > 1:
        positions = np.add.outer(np.arange(num_steps), np.array(positions, dtype=np.int64)).ravel()
        step_seeds = torch.from_numpy(row_seeds(streams * num_steps, positions).reshape(num_steps, num_rows)).to(dev)
    batch = SamplingBatch(
        logits_index=torch.tensor(logits_index, dtype=torch.int64, device=dev),
        temperature=torch.tensor(temperature, dtype=torch.float32, device=dev),
        is_greedy=torch.tensor(greedy, dtype=torch.bool, device=dev),
        seeds=step_seeds[0] if step_seeds is not None else torch.from_numpy(row_seeds(streams, positions)).to(dev),
        step_seeds=step_seeds,
        all_greedy=all(greedy), any_greedy=any(greedy), max_num_logprobs=max_logprobs,
        needs_gather=num_rows != len(items), failed_items=failed)
    if min(top_k) < vocab_size:
        batch.top_k = torch.tensor(top_k, dtype=torch.int64, device=dev)
    if min(top_p) < 1.0:
        batch.top_p = torch.tensor(top_p, dtype=torch.float32, device=dev)
    if max(min_p) > 0.0:
        batch.min_p = torch.tensor(min_p, dtype=torch.float32, device=dev)
    if any_grammar:
        batch.allowed_mask = build_allowed_mask(grammar_states, vocab_size, dev)
    if any(raw):
        batch.raw_logprob_rows = torch.tensor(raw, dtype=torch.bool, device=dev)
    if banned_rows:
        batch.banned = (torch.tensor(banned_rows, device=dev), torch.tensor(banned_ids, device=dev))
    if penalty_rows:
        if penalties is None:
            penalties = PenaltyState(len(penalty_rows), 2 ** 31 - 1, dev)
        batch.penalty_rows, batch.penalty_slots = penalties.update(penalty_rows, vocab_size)
        batch.output_counts, batch.seen = penalties.counts, penalties.seen
        index = [r for r, _ in penalty_rows]
        # A penalty no row uses is left out: 1.0 divides and multiplies exactly, x - (+0.0) is x.
        rep_p, pres_p, freq_p = (np.array([column[r] for r in index], dtype=np.float32) for column in (rep, pres, freq))
        if (rep_p != 1.0).any():
            batch.repetition_penalty = torch.from_numpy(rep_p).to(dev)
        if ((pres_p != 0.0) | np.signbit(pres_p)).any():
            batch.presence_penalty = torch.from_numpy(pres_p).to(dev)
        if ((freq_p != 0.0) | np.signbit(freq_p)).any():
            batch.frequency_penalty = torch.from_numpy(freq_p).to(dev)
    return batch


def batch_to_device(batch: SamplingBatch, device: torch.device) -> SamplingBatch:
    """A batch built on the host, moved through pinned memory without waiting for the device (async scheduling on
    CUDA: a copy from pageable memory would wait for the step in flight). Tensors already there stay."""
    def move(value):
        if isinstance(value, tuple):
            return tuple(move(v) for v in value)
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":  # ("cuda" != "cuda:0": ask the type)
            return value.pin_memory().to(device, non_blocking=True)
        return value

    return dataclasses.replace(batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)})
