"""The penalty state kept on the device between steps (issue 14, item 6): each step it must hold exactly what a
from-scratch count of every penalised sequence's tokens gives, whatever happens between steps -- admission,
n > 1 forks, chunked prefill, preemption and recompute, sequences finishing or aborted mid-batch, slots reused
-- and the engine's tokens and logprobs must be those of a from-scratch state rebuilt every step."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import assert_no_leak
from rlserve import LLM, SamplingParams
from rlserve.engine import runner as runner_module
from rlserve.engine.penalty_state import PenaltyState, counts_dtype
from rlserve.engine.sampler import sample
from rlserve.engine.sampling_batch import prepare_sampling
from rlserve.engine.scheduler import ScheduledSeq
from rlserve.engine.sequence import Request, Sequence


def reference_rows(seq: Sequence, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From scratch: output-token counts [V] and prompt-or-output seen mask [V] of a sequence."""
    counts = torch.bincount(torch.tensor(seq.output_token_ids, dtype=torch.int64), minlength=vocab)
    seen = counts > 0
    seen[torch.tensor(seq.request.prompt_token_ids)] = True
    return counts, seen


def check_state(batch, items, penalties: PenaltyState, vocab: int) -> int:
    """Every penalised row of ``batch`` reads a slot equal to the from-scratch reference; returns how many."""
    rows = [] if batch.penalty_rows is None else batch.penalty_rows.tolist()
    slots = [] if batch.penalty_slots is None else batch.penalty_slots.tolist()
    owner = []  # the sequence of each sample row
    for item in items:
        owner += [item.seq] * item.seq.num_samples_to_draw
    assert rows == [r for r, seq in enumerate(owner) if seq.params.uses_penalties]
    for row, slot in zip(rows, slots):
        seq = owner[row]
        assert penalties.slot_of[seq.seq_id] == slot
        counts, seen = reference_rows(seq, vocab)
        assert torch.equal(penalties.counts[slot].long(), counts), (seq, slot)
        assert torch.equal(penalties.seen[slot], seen), (seq, slot)
    # No two live sequences share a slot.
    assert len(set(penalties.slot_of.values())) == len(penalties.slot_of)
    return len(rows)


PARAMS = [
    SamplingParams(temperature=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, presence_penalty=0.7, frequency_penalty=0.4, logprobs=2),
    SamplingParams(temperature=0.8, top_p=0.9),  # unpenalised neighbours
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.8, frequency_penalty=-0.3),
    SamplingParams(temperature=1.0, n=3, repetition_penalty=0.7, presence_penalty=-0.5, min_tokens=3),
    SamplingParams(temperature=1.0, n=2, logprobs=0),
]


def drive(llm, rng: random.Random, num_requests: int, on_step=None) -> dict:
    """Requests admitted at random steps with random lengths, some aborted mid-way; returns request id ->
    [(tokens, logprobs)] per sample."""
    engine = llm.engine
    results: dict[str, dict[int, tuple[list[int], list[float] | None]]] = {}
    pending = list(range(num_requests))
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                i = pending.pop(0)
                base = PARAMS[i % len(PARAMS)]
                prompt = [rng.randrange(1, 250) for _ in range(rng.randint(1, 40))]
                prompt += prompt[:rng.randint(0, len(prompt))]  # repeated prompt ids
                params = base.clone(seed=1000 + i, max_tokens=rng.randint(base.min_tokens or 1, 30),
                                    ignore_eos=rng.random() < 0.8)
                engine.add_request(f"r{i}", prompt, params)
        if rng.random() < 0.05 and engine.requests:
            engine.abort_request(rng.choice(sorted(engine.requests)))
        for update in engine.step():
            tokens, logprobs = results.setdefault(update.request_id, {}).setdefault(update.index, ([], []))
            tokens += update.token_ids
            if update.sampled_logprobs is not None:
                logprobs += update.sampled_logprobs
        if on_step is not None:
            on_step()
    return results


@pytest.mark.parametrize("variant", [
    dict(num_kv_blocks=14, block_size=8, max_num_seqs=6),  # preemption and recompute, slots reused
    dict(max_num_batched_tokens=9, max_num_seqs=5),  # chunked prefill beside decodes
    dict(max_num_seqs=2),  # n = 3 forks beyond the running limit, children waiting for a slot
])
def test_incremental_state_equals_a_from_scratch_count_every_step(tiny_model, variant):
    """Checked at every sampling step, for every penalised row, against a count of the sequence's tokens."""
    llm = LLM(tiny_model, device="cpu", enable_prefix_caching=False, **variant)
    runner = llm.engine.runner
    vocab = llm.info.vocab_size
    checked = []

    def checking_prepare(items, vocab_size, eos, device, penalties):
        batch = prepare_sampling(items, vocab_size, eos, device, penalties)
        assert penalties is runner.penalties
        checked.append(check_state(batch, items, penalties, vocab))
        return batch

    original = runner_module.prepare_sampling
    runner_module.prepare_sampling = checking_prepare
    try:
        drive(llm, random.Random(7), 40)
    finally:
        runner_module.prepare_sampling = original
    assert sum(checked) > 200
    if "num_kv_blocks" in variant:
        assert llm.stats()["num_preemptions"] > 0
    assert_no_leak(llm)  # every slot given back


@pytest.mark.parametrize("variant", [
    dict(num_kv_blocks=14, block_size=8, max_num_seqs=6),
    dict(max_num_batched_tokens=9, max_num_seqs=5),
])
def test_engine_outputs_equal_a_state_rebuilt_every_step(tiny_model, variant):
    """The same random workload, tokens and logprobs bit for bit: incremental state against a from-scratch
    state built for every step's batch (what the engine did before the state persisted)."""
    llm = LLM(tiny_model, device="cpu", enable_prefix_caching=False, **variant)
    incremental = drive(llm, random.Random(3), 30)
    assert_no_leak(llm)
    original = runner_module.prepare_sampling
    runner_module.prepare_sampling = lambda items, vocab, eos, device, penalties: original(items, vocab, eos, device)
    try:
        from_scratch = drive(llm, random.Random(3), 30)
    finally:
        runner_module.prepare_sampling = original
    assert incremental == from_scratch
    assert sum(len(t) for samples in incremental.values() for t, _ in samples.values()) > 100


def decoding_items(specs):
    items = []
    for i, (params, prompt, outputs) in enumerate(specs):
        request = Request(str(i), prompt, params, seed=i)
        request.is_forked = True
        seq = Sequence(request, 0, prompt + outputs)
        seq.num_computed_tokens = len(seq.token_ids) - 1
        request.seqs = [seq]
        items.append(ScheduledSeq(seq, 1))
    return items


def test_a_reused_slot_keeps_nothing_of_its_previous_owner():
    """A slot handed to a new sequence is overwritten whole: the new owner's row equals its own tokens only."""
    vocab = 64
    state = PenaltyState(1, 100, torch.device("cpu"))
    first = decoding_items([(SamplingParams(frequency_penalty=1.0), [1, 2, 3], [9, 9, 9, 10])])
    prepare_sampling(first, vocab, (0,), torch.device("cpu"), state)
    assert int(state.counts[0, 9]) == 3
    with pytest.raises(RuntimeError, match="no free penalty slot"):
        prepare_sampling(decoding_items([(SamplingParams(repetition_penalty=1.2), [4], [5])]), vocab, (0,),
                         torch.device("cpu"), state)
    state.release([first[0].seq])
    second = decoding_items([(SamplingParams(repetition_penalty=1.2), [4, 4], [5])])
    batch = prepare_sampling(second, vocab, (0,), torch.device("cpu"), state)
    counts, seen = reference_rows(second[0].seq, vocab)
    assert torch.equal(state.counts[0].long(), counts) and torch.equal(state.seen[0], seen)
    assert batch.penalty_slots.tolist() == [0]


def test_penalties_apply_to_their_rows_only_and_equal_the_dense_rule():
    """The sampler's penalised-rows-only pass against the dense rule on every row (the implementation before
    the state persisted), bit for bit, on logits with both signs, zeros and -inf."""
    vocab = 300
    gen = torch.Generator().manual_seed(0)
    specs = [(SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.3), [1, 2, 2, 7], [7, 8, 8]),
             (SamplingParams(temperature=0), [3], [4]),
             (SamplingParams(temperature=0, frequency_penalty=-0.6, repetition_penalty=0.8), [5, 6], [6, 6, 299]),
             (SamplingParams(temperature=0, logprobs=3), [9], [9])]
    items = decoding_items(specs)
    logits = torch.randn(len(specs), vocab, generator=gen) * 4
    logits[:, 7] = 0.0
    logits[:, 8] = float("-inf")
    batch = prepare_sampling(items, vocab, (0,), torch.device("cpu"))
    got = logits.clone()
    from rlserve.engine.sampler import _apply_penalties
    _apply_penalties(got, batch)
    want = logits.clone()
    counts = torch.zeros(len(specs), vocab)
    prompt_mask = torch.zeros(len(specs), vocab, dtype=torch.bool)
    rep, pres, freq = (torch.tensor([getattr(p, name) for p, _, _ in specs]) for name in
                       ("repetition_penalty", "presence_penalty", "frequency_penalty"))
    for r, (p, prompt, outputs) in enumerate(specs):
        if p.uses_penalties:
            for t in outputs:
                counts[r, t] += 1
            prompt_mask[r, prompt] = True
    seen = prompt_mask | (counts > 0)
    penalized = torch.where(want > 0, want / rep.unsqueeze(1), want * rep.unsqueeze(1))
    want.copy_(torch.where(seen, penalized, want))
    want.sub_(freq.unsqueeze(1) * counts)
    want.sub_(pres.unsqueeze(1) * (counts > 0).to(want.dtype))
    assert torch.equal(got, want)
    assert torch.equal(got[1], logits[1]) and torch.equal(got[3], logits[3])
    out = sample(logits.clone(), batch)
    assert out.token_ids.tolist() == want.argmax(dim=-1).tolist()


def test_counts_dtype_holds_any_count():
    assert counts_dtype(32767) == torch.int16 and counts_dtype(32768) == torch.int32


def test_a_penalised_fork_beyond_max_num_seqs_is_drawn_in_parts_from_one_slot(tiny_model, llm):
    """n = 10 on an engine running 3 sequences: the parent's 10 first draws read its one slot and are sampled
    in parts of 3 rows (slice_rows); every sample's tokens equal those of an engine drawing them at once. (Not
    the logprobs: the model's logits differ in the last bits between batch shapes, penalties or not.)"""
    params = SamplingParams(n=10, temperature=1.0, seed=4, max_tokens=8, min_tokens=8, repetition_penalty=1.6,
                            frequency_penalty=0.8, logprobs=1)
    prompts = [[5, 5, 6, 7, 5], list(range(30, 50))]
    small = LLM(tiny_model, device="cpu", max_num_seqs=3)
    got = small.generate(prompts, params)
    want = llm.generate(prompts, params)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    assert_no_leak(small)
    assert_no_leak(llm)
