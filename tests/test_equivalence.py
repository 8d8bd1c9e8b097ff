"""The oracle: rlserve's greedy tokens equal Hugging Face transformers' on the same weights (float32, CPU),
for every model family, in a batch of prompts of different lengths; and sampled-token logprobs equal the
log-softmax of transformers' identically processed logits."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from rlserve import LLM, SamplingParams
from rlserve.models.tiny import FAMILIES
from hf_utils import hf_greedy


def random_prompts(n=8, seed=0, low=1, high=40):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(low, high))] for _ in range(n)]


@pytest.fixture(scope="module")
def engines(tiny_models):
    return {f: LLM(tiny_models[f], device="cpu") for f in FAMILIES}


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    return {f: AutoModelForCausalLM.from_pretrained(tiny_models[f], dtype=torch.float32).eval() for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers(family, engines, hf_models):
    prompts = random_prompts(n=8, seed=1)
    # min_tokens = max_tokens masks EOS as transformers' min_new_tokens does: exactly 40 tokens each.
    outs = engines[family].generate(prompts, SamplingParams(temperature=0, max_tokens=40, min_tokens=40))
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(hf_models[family], prompt, 40)
        assert out.outputs[0].token_ids == expected, f"{family}: prompt of {len(prompt)} tokens diverged"
        assert out.prompt_token_ids == prompt


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_stops_at_eos_like_transformers(family, engines, hf_models):
    prompts = random_prompts(n=8, seed=2)
    outs = engines[family].generate(prompts, SamplingParams(temperature=0, max_tokens=200))
    for prompt, out in zip(prompts, outs):
        expected = hf_greedy(hf_models[family], prompt, 200, stop_at_eos=True)
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == ("stop" if expected[-1] in (256, 258) else "length")


def test_greedy_with_repetition_penalty_equals_transformers(engines, hf_models):
    prompts = random_prompts(n=4, seed=3)
    outs = engines["qwen2"].generate(prompts, SamplingParams(temperature=0, max_tokens=32, min_tokens=32,
                                                            repetition_penalty=1.5))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_models["qwen2"], prompt, 32, repetition_penalty=1.5)


def hf_processed_logprobs(hf, prompt, completion, warpers):
    """transformers' log-softmax of the processed logits at each completion position: [len(completion), V]."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1].float()
    rows = []
    for i in range(len(completion)):
        scores = logits[i:i + 1].clone()
        context = ids[:, :len(prompt) + i]
        for w in warpers:
            scores = w(context, scores)
        rows.append(torch.log_softmax(scores, dim=-1)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_sampled_logprobs_equal_transformers_processed(family, engines, hf_models):
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, max_tokens=24, logprobs=5, seed=11, n=2,
                            ignore_eos=True)
    prompts = random_prompts(n=4, seed=4)
    warpers = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9)]
    for prompt, out in zip(prompts, engines[family].generate(prompts, params)):
        for completion in out.outputs:
            ref = hf_processed_logprobs(hf_models[family], prompt, completion.token_ids, warpers)
            got = torch.tensor(completion.sampled_logprobs)
            want = ref.gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
            assert torch.isfinite(want).all(), "sampled a token transformers' processing removes"
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            for i, top in enumerate(completion.top_logprobs):  # the top 5, by rank
                values, ids = ref[i].topk(5)
                torch.testing.assert_close(torch.tensor([v for _, v in top]), values, atol=1e-4, rtol=0)


def test_raw_logprobs_mode_and_penalties(engines, hf_models):
    prompt = random_prompts(n=1, seed=5)[0]
    params = SamplingParams(temperature=0.9, max_tokens=16, logprobs=0, seed=3, repetition_penalty=1.2,
                            ignore_eos=True)
    processed = engines["qwen2"].generate([prompt], params)[0].outputs[0]
    ref = hf_processed_logprobs(hf_models["qwen2"], prompt, processed.token_ids,
                                [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.9)])
    want = ref.gather(1, torch.tensor(processed.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(processed.sampled_logprobs), want, atol=1e-4, rtol=0)

    raw = engines["qwen2"].generate([prompt], params.clone(logprobs_mode="raw"))[0].outputs[0]
    assert raw.token_ids == processed.token_ids  # the mode changes what is reported, not what is drawn
    ref_raw = hf_processed_logprobs(hf_models["qwen2"], prompt, raw.token_ids, [])
    want_raw = ref_raw.gather(1, torch.tensor(raw.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(raw.sampled_logprobs), want_raw, atol=1e-4, rtol=0)
