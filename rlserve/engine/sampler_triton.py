"""The GPU draw: one Triton pass per row computes the token and its logprob.

``gumbel_sample`` scales each row by its inverse temperature, keeps an online log-sum-exp of ``x * (1/T)`` and
draws by Gumbel-max, ``argmax(x * (1/T) + g)``, where ``g`` is Gumbel noise from a counter-based generator
(Philox) keyed by the row's seed and the token index -- derived on the host from the sequence's seed and
output position, so a seeded request draws the same tokens whatever else is in the batch.
``argmax(x / T + g)`` is an exact sample of ``softmax(x / T)``; greedy rows take ``argmax(x)``.

Every row on CUDA is drawn here (see ``sampler``): rows needing only temperature straight from the model's
logits (bf16 or fp32), rows needing top-k/top-p/min-p, penalties or masks from the processed fp32 logits
(-inf where cut), still unscaled, so that the same instructions see the same values on both paths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gumbel_sample_kernel(logits_ptr, stride_row, inv_temperature_ptr, greedy_ptr, seed_ptr, token_ptr,
                          logprob_ptr, vocab_size, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    inv_t = tl.load(inv_temperature_ptr + row)
    greedy = tl.load(greedy_ptr + row) != 0
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
        # exp(-inf - -inf) is NaN: a block (or row so far) of only -inf adds nothing.
        alive = m_new > float("-inf")
        s = tl.where(alive, s * tl.exp(m - m_new), s) \
            + tl.sum(tl.where(valid & alive, tl.exp(x - m_new), 0.0), axis=0)
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


def gumbel_sample(logits: torch.Tensor, inv_temperature: torch.Tensor, is_greedy: torch.Tensor,
                  seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [S, V] (bf16/fp16/fp32, unit stride along V, -inf where cut); inv_temperature [S] fp32 (1 for
    greedy rows); is_greedy [S] bool; seeds [S] int64 -> (token ids [S] int64, logprobs [S] fp32 of the drawn
    tokens under softmax(logits * inv_temperature))."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _gumbel_sample_kernel[(rows,)](logits, logits.stride(0), inv_temperature.float().contiguous(),
                                       is_greedy.to(torch.int8).contiguous(), seeds.contiguous(), tokens,
                                       logprobs, vocab, BLOCK=2048, num_warps=8)
    return tokens, logprobs


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``gumbel_sample`` with temperatures: temperature [S] fp32, 0 = greedy."""
    greedy = temperature == 0
    inv_temperature = 1.0 / torch.where(greedy, 1.0, temperature.float())
    return gumbel_sample(logits, inv_temperature, greedy, seeds)
