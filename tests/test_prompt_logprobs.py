"""Prompt logprobs (teacher scoring) in the engine: equal to transformers' log_softmax(logits / T) in fp32 on
CPU, whatever splits the prompt's computation -- a cached prefix, chunked prefill, preemption, tensor
parallelism -- and a score-only request (max_tokens=0) that generates nothing. The HTTP front doors are tested
in test_sequence_logprobs.py."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlserve import LLM, SamplingParams
from rlserve.outputs import Logprob, PromptLogprobs

TOL = 1e-4


def random_prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def hf(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def hf_logprobs(hf, prompt, temperature=1.0) -> torch.Tensor:
    """[P-1, V]: row p - 1 is the distribution of prompt position p, the oracle."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def assert_matches(pl: PromptLogprobs, prompt, ref: torch.Tensor, k: int) -> None:
    assert len(pl) == len(prompt) and pl[0] is None
    assert pl.top_ids.shape == pl.top_logprobs.shape == (len(prompt) - 1, k)
    assert pl.token_ids.tolist() == prompt[1:]
    actual = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:], dtype=torch.long)]
    np.testing.assert_allclose(pl.logprobs, actual.numpy(), atol=TOL, rtol=0)
    assert pl.ranks.tolist() == (ref >= actual.unsqueeze(1)).sum(dim=1).tolist()
    if k:
        top_values, top_ids = ref.topk(k, dim=-1)
        assert pl.top_ids.tolist() == top_ids.tolist()
        np.testing.assert_allclose(pl.top_logprobs, top_values.numpy(), atol=TOL, rtol=0)
    for p in range(1, len(prompt)):  # vLLM's layout: the prompt token plus the top K, ranks 1..K
        entry, top = pl[p], pl.top_ids[p - 1].tolist()
        assert list(entry) == [prompt[p]] + [t for t in top if t != prompt[p]]
        assert [entry[t].rank for t in top] == list(range(1, k + 1))
        if prompt[p] not in top:
            assert entry[prompt[p]] == Logprob(float(pl.logprobs[p - 1]), int(pl.ranks[p - 1]))


@pytest.mark.parametrize("k", [0, 5])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_prompt_logprobs_equal_transformers(llm, hf, k, temperature):
    prompts = random_prompts([1, 2, 9, 33, 70], seed=k)
    params = SamplingParams(n=2, max_tokens=3, min_tokens=3, temperature=temperature, prompt_logprobs=k, seed=1)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert_matches(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt, temperature), k)
        assert [len(c.token_ids) for c in out.outputs] == [3, 3]  # the completion is generated as usual
    # The same request without prompt logprobs samples the same tokens (the seed does not see them).
    plain = llm.generate(prompts, params.clone(prompt_logprobs=None))
    assert [[c.token_ids for c in o.outputs] for o in plain] == [[c.token_ids for c in o.outputs] for o in outs]
    assert all(o.prompt_logprobs is None for o in plain)


def test_greedy_request_scores_unscaled_logits(llm, hf):
    prompt = random_prompts([20], seed=3)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))[0]
    assert_matches(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt), 3)


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs(tiny_model, hf):
    engine = LLM(tiny_model, device="cpu", block_size=8)
    shared = random_prompts([40], seed=4)[0]
    prompts = [shared + tail for tail in random_prompts([5, 13], seed=5)]
    engine.generate([shared + [1, 2, 3]], SamplingParams(max_tokens=1))  # caches the shared blocks
    warm = engine.generate([prompts[0]], SamplingParams(max_tokens=1))[0]
    assert warm.num_cached_tokens == 40  # the cache does hold the prefix
    outs = engine.generate(prompts, SamplingParams(max_tokens=2, prompt_logprobs=4))
    for prompt, out in zip(prompts, outs):
        assert out.num_cached_tokens == 0  # every position computed
        assert_matches(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt), 4)
    assert engine.generate([prompts[1]], SamplingParams(max_tokens=1))[0].num_cached_tokens >= 40


def test_chunked_prefill_and_preemption(tiny_model, hf):
    # 24 tokens a step and 10 blocks of 8: every prompt is computed in chunks, and sequences are preempted and
    # recomputed, some of them half-way through a prompt whose logprobs they are collecting.
    engine = LLM(tiny_model, device="cpu", max_num_batched_tokens=24, num_kv_blocks=10, block_size=8)
    preempted_mid_prompt = []
    scheduler = engine.engine.scheduler
    original = scheduler._preempt

    def preempt(seq):
        preempted_mid_prompt.append(seq.is_unforked_parent and seq.request.num_prompt_logprobs > 0)
        original(seq)

    scheduler._preempt = preempt
    prompts = random_prompts([40, 33, 50, 45, 60, 7], seed=6)
    params = [SamplingParams(n=2, max_tokens=8, min_tokens=8, prompt_logprobs=3) if i % 2 == 0 else
              SamplingParams(max_tokens=8) for i in range(len(prompts))]  # scoring beside plain requests
    outs = engine.generate(prompts, params)
    assert any(preempted_mid_prompt)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        if i % 2 == 0:
            assert_matches(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt), 3)
        else:
            assert out.prompt_logprobs is None
    bm = engine.engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and not scheduler.scoring


def test_score_only_requests(tiny_model, hf):
    engine = LLM(tiny_model, device="cpu", max_model_len=64, max_num_batched_tokens=16)
    prompts = random_prompts([64, 10, 1], seed=7)  # a prompt may fill the whole context when nothing follows
    outs = engine.generate(prompts, SamplingParams(n=2, max_tokens=0, prompt_logprobs=2))
    for prompt, out in zip(prompts, outs):
        assert [(c.token_ids, c.finish_reason) for c in out.outputs] == [([], "length")] * 2
        assert_matches(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt), 2)
    with pytest.raises(ValueError, match="prompt is 65 tokens, max_model_len is 64"):
        engine.generate([[1] * 65], SamplingParams(max_tokens=0, prompt_logprobs=2))
    assert engine.generate([[1, 2]], SamplingParams(max_tokens=1))[0].outputs[0].token_ids  # still serving
    assert not engine.engine.has_unfinished()


def test_tensor_parallel_equals_transformers(tiny_model, hf):
    prompts = random_prompts([3, 30, 57], seed=8)
    with LLM(tiny_model, device="cpu", tensor_parallel_size=2, max_num_batched_tokens=32) as engine:
        outs = engine.generate(prompts, SamplingParams(max_tokens=2, temperature=0.7, prompt_logprobs=5))
        for prompt, out in zip(prompts, outs):
            assert_matches(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt, 0.7), 5)


@pytest.mark.parametrize("values, message", [
    (dict(prompt_logprobs=-1), "prompt_logprobs must be >= 0"),
    (dict(prompt_logprobs=1001), "prompt_logprobs must be <= 1000"),
    (dict(prompt_logprobs=1.5), "prompt_logprobs must be an integer"),
    (dict(max_tokens=0), r"max_tokens must be >= 1 \(0 only with prompt_logprobs\)"),
    (dict(max_tokens=0, prompt_logprobs=1, min_tokens=1), "min_tokens must be <= 0"),
])
def test_invalid_params(values, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**values)


def test_more_prompt_logprobs_than_the_vocabulary(llm):
    vocab = llm.info.vocab_size
    with pytest.raises(ValueError, match=f"prompt_logprobs must be <= {vocab} \\(the vocabulary size\\)"):
        llm.generate([[1, 2, 3]], SamplingParams(prompt_logprobs=vocab + 1))
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1, prompt_logprobs=vocab))[0]
    assert out.prompt_logprobs.top_ids.shape == (2, vocab)
    assert sorted(out.prompt_logprobs.top_ids[0].tolist()) == list(range(vocab))


def test_vllm_layout_of_a_prompt_token_among_the_top_k():
    pl = PromptLogprobs(np.array([7]), np.array([-0.5], np.float32), np.array([1], np.int32),
                        np.array([[7, 3]], np.int32), np.array([[-0.5, -1.5]], np.float32))
    assert len(pl) == 2 and list(pl) == [None, {7: Logprob(-0.5, 1), 3: Logprob(-1.5, 2)}]
    assert pl[-1] == pl[1]
    with pytest.raises(IndexError):
        pl[2]
