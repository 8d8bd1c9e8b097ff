"""A fused GPU sampler for the common RL case: temperature (or greedy) only, the sampled token's logprob.

One pass over each row of logits (bf16 or fp32) computes both the token and its logprob: an online
log-sum-exp of ``x / T`` and a Gumbel-max draw ``argmax(x / T + g)``, where ``g`` is Gumbel noise from a
counter-based generator (Philox) keyed by the row's seed -- derived on the host from the sequence's seed
and output position, so a seeded request draws the same tokens whatever else is in the batch.
``argmax(x / T + g)`` is an exact sample of ``softmax(x / T)``; greedy rows (T = 0) take ``argmax(x)``.

Rows needing top-k/top-p/min-p, penalties, masks or top-N logprobs go through ``sampler.sample`` instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fused_sample_kernel(logits_ptr, stride_row, temperature_ptr, seed_ptr, token_ptr, logprob_ptr, vocab_size,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.where(greedy, 1.0, temperature))
    seed = tl.load(seed_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride_row

    m = tl.full((), float("-inf"), tl.float32)  # running max of x / T
    s = tl.full((), 0.0, tl.float32)  # running sum of exp(x / T - m)
    best_score = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32)
    best_x = tl.full((), 0.0, tl.float32)
    for start in range(0, vocab_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < vocab_size
        x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_t  # [BLOCK]
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(valid, tl.exp(x - m_new), 0.0), axis=0)
        m = m_new
        u = tl.rand(seed, offs)  # [0, 1)
        gumbel = -tl.log(-tl.log(tl.maximum(u, 1e-10)))
        score = tl.where(valid, tl.where(greedy, x, x + gumbel), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0).to(tl.int32)
        take = block_best > best_score
        best_x = tl.where(take, tl.sum(tl.where(offs == start + block_index, x, 0.0), axis=0), best_x)
        best_index = tl.where(take, start + block_index, best_index)
        best_score = tl.where(take, block_best, best_score)
    tl.store(token_ptr + row, best_index.to(tl.int64))
    tl.store(logprob_ptr + row, best_x - (m + tl.log(s)))


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [S, V] (bf16/fp16/fp32, unit stride along V); temperature [S] fp32 (0 = greedy);
    seeds [S] int64 -> (token ids [S] int64, logprobs [S] fp32 of softmax(logits / T))."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _fused_sample_kernel[(rows,)](logits, logits.stride(0), temperature, seeds, tokens, logprobs, vocab,
                                      BLOCK=2048, num_warps=8)
    return tokens, logprobs
