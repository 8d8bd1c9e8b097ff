"""The GPU draw: one Triton pass over the logits computes each row's token and its logprob.

``gumbel_sample`` scales each row by its inverse temperature, keeps an online log-sum-exp of ``x * (1/T)`` and
draws by Gumbel-max, ``argmax(x * (1/T) + g)``, where ``g`` is Gumbel noise from a counter-based generator
(Philox) keyed by the row's seed and the token index -- derived on the host from the sequence's seed and
output position, so a seeded request draws the same tokens whatever else is in the batch.
``argmax(x / T + g)`` is an exact sample of ``softmax(x / T)``; greedy rows take ``argmax(x)``.

Each row's vocab is split into a few contiguous chunks (a multiple of ``BLOCK`` each), one program per
(row, chunk), so that a batch of a few hundred rows still fills the GPU: each program writes its chunk's
running max, sum of exponentials and best score with its index to a small scratch tensor, and a second, tiny
kernel (one program per row) merges them into the token and its logprob. The noise of token ``i`` depends
only on the row's seed and ``i`` and ties go to the lowest index, so the token drawn for a seed does not depend
on how the vocab is split. The number of chunks comes from static shapes alone (rows, vocab, the GPU's SM
count), so the launch is safe to capture in a CUDA graph; with one chunk the first kernel writes the result
itself.

Every row on CUDA is drawn here (see ``sampler``): rows needing only temperature straight from the model's
logits (bf16 or fp32), rows needing top-k/top-p/min-p, penalties or masks from the processed fp32 logits
(-inf where cut), still unscaled, so that the same instructions see the same values on both paths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlserve.attention.triton_paged import sm_count

BLOCK = 2048  # vocab entries per loop step of one program
PROGRAMS_PER_SM = 4  # aim for this many (row, chunk) programs per SM
CPU_CHUNKS = 4  # chunks per row off CUDA (the Triton interpreter)


@triton.jit
def uniform_noise(seed, start, BLOCK: tl.constexpr):
    """[BLOCK] uniforms in [0, 1) for vocab indices start .. start + BLOCK - 1 (``start`` a multiple of 4): index
    4c + j takes output j of Philox's counter c. One Philox call (10 rounds over four 32-bit words) gives four
    numbers; drawing one per index, as ``tl.rand`` does, threw three away, and Philox was most of the sampler's
    arithmetic. The number depends on the seed and the index alone, so any split of the vocab draws the same --
    provided every block starts at a multiple of 4 (``_split``'s chunks are multiples of BLOCK): an unaligned
    start would give index i another counter's output."""
    tl.static_assert(BLOCK % 4 == 0)
    r0, r1, r2, r3 = tl.randint4x(seed, start // 4 + tl.arange(0, BLOCK // 4))
    # join(join(r0, r2), join(r1, r3))[c, j, k] is r_(2j + k): row-major, index 4c + 2j + k
    return tl.random.uint_to_uniform_float(tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK]))


@triton.jit
def gumbel_noise(u):
    """-ln(-ln u) for uniforms u in [0, 1) (kept above 1e-10), both logarithms libdevice's ``tl.log``.

    The inner -ln u must stay accurate: u reaches 1 - 2^-24, where -ln u = 6e-8 is the tail of the noise that
    picks the token, and an approximate logarithm (``lg2.approx.f32``, 2^-22 absolute error near 1) would make it
    wrong, zero or negative. The outer one by lg2.approx was measured and lost: rl-small 6.8% slower seeded and
    4.5% plain, rl-7b 0.3% faster (one H200, two rounds; BENCHMARKS, sixteenth session)."""
    return -tl.log(-tl.log(tl.maximum(u, 1e-10)))


@triton.jit
def _gumbel_partial_kernel(logits_ptr, stride_row, inv_temperature_ptr, greedy_ptr, seed_ptr,
                           m_ptr, s_ptr, score_ptr, index_ptr, token_ptr, logprob_ptr,
                           vocab_size, chunk_size, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """Program (row, chunk) reduces vocab [chunk * chunk_size, (chunk + 1) * chunk_size) of its row.
    SINGLE (one chunk a row): store the token and logprob; else the chunk's partial at [row, chunk]."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_t = tl.load(inv_temperature_ptr + row)
    greedy = tl.load(greedy_ptr + row) != 0
    seed = tl.load(seed_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lo = chunk * chunk_size
    hi = tl.minimum(lo + chunk_size, vocab_size)

    m = tl.full((), float("-inf"), tl.float32)  # running max of x / T
    s = tl.full((), 0.0, tl.float32)  # running sum of exp(x / T - m)
    best_score = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        # Past the vocab x is -inf: it adds exp(-inf) = 0 to s and can never be the best score.
        x = tl.load(base + offs, mask=offs < vocab_size, other=float("-inf")).to(tl.float32) * inv_t  # [BLOCK]
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # exp(-inf - -inf) is NaN: a block (or chunk so far) of only -inf adds nothing.
        s = tl.where(m_new > float("-inf"), s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0), s)
        m = m_new
        u = uniform_noise(seed, start, BLOCK)  # [0, 1); depends on the seed and the vocab index alone
        score = tl.where(greedy, x, x + gumbel_noise(u))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0).to(tl.int32)  # the first of equal maxima
        take = block_best > best_score  # strict: an earlier block keeps a tie
        best_index = tl.where(take, start + block_index, best_index)
        best_score = tl.where(take, block_best, best_score)
    if SINGLE:
        # x at the best index, computed as in the loop (0 when nothing beat -inf, as the merge does)
        best_x = tl.load(base + best_index).to(tl.float32) * inv_t
        best_x = tl.where(best_score > float("-inf"), best_x, 0.0)
        tl.store(token_ptr + row, best_index.to(tl.int64))
        tl.store(logprob_ptr + row, best_x - (m + tl.log(s)))
    else:
        at = row * tl.num_programs(1) + chunk
        tl.store(m_ptr + at, m)
        tl.store(s_ptr + at, s)
        tl.store(score_ptr + at, best_score)
        tl.store(index_ptr + at, best_index)


@triton.jit
def _gumbel_merge_kernel(logits_ptr, stride_row, inv_temperature_ptr, m_ptr, s_ptr, score_ptr, index_ptr,
                         token_ptr, logprob_ptr, num_chunks, CHUNKS: tl.constexpr):
    """One program per row: the row's num_chunks partials -> its token and logprob (CHUNKS >= num_chunks)."""
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS)
    valid = c < num_chunks
    at = row * num_chunks + c
    m = tl.load(m_ptr + at, mask=valid, other=float("-inf"))
    s = tl.load(s_ptr + at, mask=valid, other=0.0)
    score = tl.load(score_ptr + at, mask=valid, other=float("-inf"))
    m_row = tl.max(m, axis=0)
    # A chunk of only -inf (m = -inf, s = 0) adds nothing; it must not meet exp(-inf - -inf) = NaN.
    s_row = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - m_row), 0.0), axis=0)
    best_chunk = tl.argmax(score, axis=0)  # the first of equal maxima: the earlier chunk wins a tie
    best_score = tl.max(score, axis=0)
    best_index = tl.load(index_ptr + row * num_chunks + best_chunk)
    inv_t = tl.load(inv_temperature_ptr + row)
    best_x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + best_index).to(tl.float32) * inv_t
    best_x = tl.where(best_score > float("-inf"), best_x, 0.0)
    tl.store(token_ptr + row, best_index.to(tl.int64))
    tl.store(logprob_ptr + row, best_x - (m_row + tl.log(s_row)))


def _split(rows: int, vocab: int, block: int, target_programs: int | None = None,
           num_chunks: int | None = None) -> tuple[int, int]:
    """-> (chunks per row, vocab entries per chunk, a multiple of block); every chunk holds some vocab.
    Either num_chunks (an upper bound) or target_programs (rows * chunks to aim for) sets the split."""
    blocks = max(1, triton.cdiv(vocab, block))
    if num_chunks is None:
        num_chunks = triton.cdiv(target_programs, max(rows, 1))
    num_chunks = min(max(num_chunks, 1), blocks)
    blocks_per_chunk = triton.cdiv(blocks, num_chunks)
    return triton.cdiv(blocks, blocks_per_chunk), blocks_per_chunk * block


def _gumbel_sample(logits: torch.Tensor, inv_temperature: torch.Tensor, is_greedy: torch.Tensor,
                   seeds: torch.Tensor, block: int = BLOCK, num_chunks: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``gumbel_sample`` with the loop step and (an upper bound on) the chunks per row open, for tests."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=device)
    if not rows:
        return tokens, logprobs
    if num_chunks is None and device.type == "cuda":
        chunks, chunk_size = _split(rows, vocab, block, target_programs=PROGRAMS_PER_SM * sm_count(device))
    else:
        chunks, chunk_size = _split(rows, vocab, block, num_chunks=CPU_CHUNKS if num_chunks is None else num_chunks)
    inv_temperature = inv_temperature.float().contiguous()
    greedy = is_greedy.to(torch.int8).contiguous()
    seeds = seeds.contiguous()
    if chunks == 1:
        _gumbel_partial_kernel[(rows, 1)](logits, logits.stride(0), inv_temperature, greedy, seeds,
                                          None, None, None, None, tokens, logprobs, vocab, chunk_size,
                                          BLOCK=block, SINGLE=True, num_warps=8)
        return tokens, logprobs
    m = torch.empty(rows, chunks, dtype=torch.float32, device=device)
    s = torch.empty_like(m)
    score = torch.empty_like(m)
    index = torch.empty(rows, chunks, dtype=torch.int32, device=device)
    _gumbel_partial_kernel[(rows, chunks)](logits, logits.stride(0), inv_temperature, greedy, seeds,
                                           m, s, score, index, None, None, vocab, chunk_size,
                                           BLOCK=block, SINGLE=False, num_warps=8)
    _gumbel_merge_kernel[(rows,)](logits, logits.stride(0), inv_temperature, m, s, score, index, tokens,
                                  logprobs, chunks, CHUNKS=triton.next_power_of_2(chunks), num_warps=1)
    return tokens, logprobs


def gumbel_sample(logits: torch.Tensor, inv_temperature: torch.Tensor, is_greedy: torch.Tensor,
                  seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [S, V] (bf16/fp16/fp32, unit stride along V, -inf where cut); inv_temperature [S] fp32 (1 for
    greedy rows); is_greedy [S] bool; seeds [S] int64 -> (token ids [S] int64, logprobs [S] fp32 of the drawn
    tokens under softmax(logits * inv_temperature))."""
    return _gumbel_sample(logits, inv_temperature, is_greedy, seeds)


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``gumbel_sample`` with temperatures: temperature [S] fp32, 0 = greedy."""
    greedy = temperature == 0
    inv_temperature = 1.0 / torch.where(greedy, 1.0, temperature.float())
    return gumbel_sample(logits, inv_temperature, greedy, seeds)
