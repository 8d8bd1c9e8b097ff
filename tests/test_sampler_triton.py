"""The fused GPU sampler (temperature / greedy + the sampled token's logprob, one pass) against PyTorch.

Runs on CUDA (``-m gpu``) or on CPU under the Triton interpreter with ``RLSERVE_TRITON_INTERPRET=1``."""

from __future__ import annotations

import os

import pytest

INTERPRET = os.environ.get("RLSERVE_TRITON_INTERPRET") == "1"
triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")
if INTERPRET:
    DEVICE = "cpu"
    pytestmark = []
else:
    DEVICE = "cuda"
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from rlserve.engine.sampler_triton import fused_sample  # noqa: E402

DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [7, 2048, 5000] if INTERPRET else [7, 2048, 5000, 151936])
def test_token_and_logprob_match_log_softmax(dtype, vocab):
    torch.manual_seed(vocab)
    logits = (torch.randn(6, vocab, device=DEVICE) * 3).to(dtype)
    temperature = torch.tensor([1.0, 0.0, 0.7, 1.0, 2.0, 0.0], device=DEVICE)
    seeds = torch.arange(6, dtype=torch.int64, device=DEVICE) * 1000003 + 7
    tokens, logprobs = fused_sample(logits, temperature, seeds)
    scaled = logits.float() / torch.where(temperature == 0, 1.0, temperature)[:, None]
    want = torch.log_softmax(scaled, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, want, atol=1e-4, rtol=1e-4)
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits.float()[greedy].argmax(dim=-1))


def test_draws_follow_the_distribution_and_depend_only_on_the_seed():
    torch.manual_seed(0)
    vocab, rows = 8, 4000 if INTERPRET else 100000
    logits = torch.randn(1, vocab, device=DEVICE).repeat(rows, 1)
    seeds = torch.arange(rows, dtype=torch.int64, device=DEVICE) * 7919 + 13
    tokens, _ = fused_sample(logits, torch.ones(rows, device=DEVICE), seeds)
    empirical = torch.bincount(tokens, minlength=vocab).float() / rows
    expected = torch.softmax(logits[0], dim=-1)
    assert (empirical - expected).abs().max() < (0.03 if INTERPRET else 0.006)
    again, _ = fused_sample(logits[:10].clone(), torch.ones(10, device=DEVICE), seeds[:10].clone())
    assert torch.equal(again, tokens[:10])  # the same seeds draw the same tokens in another batch
