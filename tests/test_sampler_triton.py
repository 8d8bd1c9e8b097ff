"""The fused GPU sampler (temperature / greedy + the sampled token's logprob, one pass) against PyTorch.

Runs on CUDA (``-m gpu``) or on CPU under the Triton interpreter with ``RLSERVE_TRITON_INTERPRET=1``."""

from __future__ import annotations

import pytest
from conftest import TRITON_INTERPRET as INTERPRET, triton_kernel_module

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
torch = pytest.importorskip("torch")
DEVICE, pytestmark = triton_kernel_module()

from rlserve.engine.sampler_triton import fused_sample, gumbel_noise, uniform_noise  # noqa: E402

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


@triton.jit
def _gumbel_noise_kernel(u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = tl.load(u_ptr + offs, mask=mask, other=0.5)
    tl.store(out_ptr + offs, gumbel_noise(u), mask=mask)


def test_gumbel_noise_is_accurate_in_its_tail():
    """-ln(-ln u) to 1e-5 over uniforms the generator gives, its largest ones included. Near u = 1 the noise is
    large and picks the token: a logarithm with an absolute error there (such as lg2.approx's 2^-22 on [0.5, 2])
    would make -ln u wrong, zero or negative -- noise off by whole units, infinite or NaN."""
    scale = torch.tensor(4.6566127342e-10, dtype=torch.float32)  # uint_to_uniform_float's, for 32-bit integers
    largest = torch.arange(2**31 - 2**12, 2**31, dtype=torch.int64).to(torch.float32) * scale
    below_one = 1 - torch.arange(1, 65, dtype=torch.float32) * 2.0**-24  # every float32 in [1 - 2^-18, 1)
    below_one = below_one[below_one <= largest.max()]
    edges = torch.tensor([0.0, 1e-12, 1e-10, 1e-6, 0.25, 0.5, 0.5 + 2**-24, 0.75, 0.999], dtype=torch.float32)
    torch.manual_seed(3)
    u = torch.cat([largest, below_one, edges, torch.rand(100_000)])
    assert u.max() < 1
    out = torch.empty_like(u, device=DEVICE)
    _gumbel_noise_kernel[(triton.cdiv(u.numel(), 1024),)](u.to(DEVICE), out, u.numel(), BLOCK=1024)
    clamped = torch.maximum(u, torch.tensor(1e-10, dtype=torch.float32)).double()  # the kernel's clamp, in fp32
    want = -torch.log(-torch.log(clamped))
    out = out.cpu().double()
    assert torch.isfinite(out).all()
    assert (out - want).abs().max() < 1e-5, (out - want).abs().argmax()


@triton.jit
def _noise_kernel(seed_ptr, out_ptr, ref_ptr, BLOCK: tl.constexpr):
    """Program i writes uniform_noise for the block at 4 * BLOCK * i + 8 (a start that is a multiple of 4, not of
    BLOCK) and, beside it, the definition index by index: output (i % 4) of Philox's counter i // 4."""
    start = 4 * BLOCK * tl.program_id(0) + 8
    seed = tl.load(seed_ptr)
    offs = start + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, uniform_noise(seed, start, BLOCK))
    r0, r1, r2, r3 = tl.randint4x(seed, offs // 4)
    lane = offs % 4
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    tl.store(ref_ptr + offs, tl.random.uint_to_uniform_float(r))


def test_noise_is_philox_output_j_of_counter_c_for_index_4c_plus_j():
    """The draw's noise, one Philox call per four vocab indices, equals its definition index by index (so no
    lane is repeated or swapped for another); uniform in [0, 1) in each lane."""
    block, programs = 256, 8
    size = 4 * block * programs + 8
    for seed in (7, 2 ** 40 + 3):
        out = torch.full((size,), -1.0, device=DEVICE)
        ref = torch.full((size,), -2.0, device=DEVICE)
        _noise_kernel[(programs,)](torch.tensor([seed], dtype=torch.int64, device=DEVICE), out, ref, BLOCK=block)
        written = torch.cat([torch.arange(4 * block * i + 8, 4 * block * i + 8 + block) for i in range(programs)])
        assert torch.equal(out[written], ref[written])
        assert ((out[written] >= 0) & (out[written] < 1)).all()
        lanes = out[written].reshape(-1, 4)
        assert (lanes.mean(0) - 0.5).abs().max() < 0.05


# The single-program kernel that drew every row before the vocab was split into chunks (one program a row,
# looping over the whole vocab), kept as the reference for the draw: a seed must draw the same token. Changes:
# `tl.where(valid & alive, ...)` is written as two nested `where`s (the same values), since the interpreter
# cannot AND a vector with a reduced scalar; the noise is the sampler's own `gumbel_noise`.
@triton.jit
def _reference_kernel(logits_ptr, stride_row, inv_temperature_ptr, greedy_ptr, seed_ptr, token_ptr,
                      logprob_ptr, vocab_size, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    inv_t = tl.load(inv_temperature_ptr + row)
    greedy = tl.load(greedy_ptr + row) != 0
    seed = tl.load(seed_ptr + row)
    base = logits_ptr + row.to(tl.int64) * stride_row
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    best_score = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32)
    best_x = tl.full((), 0.0, tl.float32)
    for start in range(0, vocab_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < vocab_size
        x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(x, axis=0))
        alive = m_new > float("-inf")
        s = tl.where(alive, s * tl.exp(m - m_new), s) \
            + tl.sum(tl.where(alive, tl.where(valid, tl.exp(x - m_new), 0.0), 0.0), axis=0)
        m = m_new
        u = uniform_noise(seed, start, BLOCK)
        score = tl.where(valid, tl.where(greedy, x, x + gumbel_noise(u)), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0).to(tl.int32)
        take = block_best > best_score
        best_x = tl.where(take, tl.sum(tl.where(offs == start + block_index, x, 0.0), axis=0), best_x)
        best_index = tl.where(take, start + block_index, best_index)
        best_score = tl.where(take, block_best, best_score)
    tl.store(token_ptr + row, best_index.to(tl.int64))
    tl.store(logprob_ptr + row, best_x - (m + tl.log(s)))


def _reference(logits, inv_t, greedy, seeds):
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _reference_kernel[(rows,)](logits, logits.stride(0), inv_t, greedy.to(torch.int8), seeds, tokens, logprobs,
                               vocab, BLOCK=2048, num_warps=8)
    return tokens, logprobs


def _hard_rows(vocab: int = 5000) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that test the merge of chunks (BLOCK 256, chunks of 5 blocks = 1280 entries) -> (logits, greedy)."""
    torch.manual_seed(1)
    logits = torch.randn(12, vocab) * 2
    inf = float("-inf")
    logits[0, 4321] = 30.0  # the best token in the last chunk, sampled
    logits[1, 4321] = 30.0  # ... and greedy
    logits[2, :1280] = inf  # the first chunk only -inf
    logits[3, 1280:2560] = inf  # a middle chunk only -inf, greedy
    logits[3, 1000] = logits[3, 3000] = 25.0  # ... and a greedy tie across chunks: the lower index
    logits[4, :] = inf  # all but one -inf, in a later chunk
    logits[4, 3333] = 0.5
    logits[5, :] = inf  # all but one -inf, greedy
    logits[5, 2600] = -3.0
    logits[6, :] = 1.0  # flat, greedy: a tie everywhere, token 0
    logits[7, :3840] = inf  # only the last chunk (with its partial block) alive
    logits[8, 4999] = 40.0  # the very last entry
    logits[9, 1279] = logits[9, 1280] = 40.0  # a greedy tie across a chunk boundary
    greedy = torch.zeros(12, dtype=torch.bool)
    greedy[[1, 3, 5, 6, 9, 11]] = True
    return logits, greedy


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # -inf - -inf, discarded
@pytest.mark.parametrize("num_chunks", [1, 3, 4, 20])  # 4: the chunks of 1280 entries _hard_rows is built on
def test_chunked_draw_equals_the_single_program_kernel(num_chunks):
    from rlserve.engine.sampler_triton import _gumbel_sample
    logits, greedy = _hard_rows()
    logits, greedy = logits.to(DEVICE), greedy.to(DEVICE)
    rows = logits.shape[0]
    temperature = torch.tensor([1.0, 0.0, 0.7, 0.0, 1.3, 0.0, 0.0, 2.0, 1.0, 0.0, 0.5, 0.0], device=DEVICE)
    inv_t = 1.0 / torch.where(greedy, 1.0, temperature)
    seeds = torch.arange(rows, dtype=torch.int64, device=DEVICE) * 104729 + 11
    tokens, logprobs = _gumbel_sample(logits, inv_t, greedy, seeds, block=256, num_chunks=num_chunks)
    ref_tokens, ref_logprobs = _reference(logits, inv_t, greedy, seeds)
    assert torch.equal(tokens, ref_tokens)
    want = torch.log_softmax(logits * inv_t[:, None], dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens[greedy], logits[greedy].argmax(dim=-1))  # torch's argmax: the first maximum
    assert tokens[[0, 1, 4, 5, 8]].tolist() == [4321, 4321, 3333, 2600, 4999]
    assert tokens[3].item() == 1000 and tokens[6].item() == 0 and tokens[9].item() == 1279
    assert tokens[2].item() >= 1280 and tokens[7].item() >= 3840
    assert logprobs[[4, 5]].tolist() == [0.0, 0.0]


def test_random_rows_draw_as_the_single_program_kernel_for_every_split():
    from rlserve.engine.sampler_triton import _gumbel_sample
    torch.manual_seed(2)
    rows, vocab = 8, 5000
    logits = torch.randn(rows, vocab, device=DEVICE)  # flat enough that the noise decides
    inv_t = torch.rand(rows, device=DEVICE) + 0.5
    greedy = torch.zeros(rows, dtype=torch.bool, device=DEVICE)
    seeds = torch.randint(0, 2**62, (rows,), dtype=torch.int64, device=DEVICE)
    ref_tokens, _ = _reference(logits, inv_t, greedy, seeds)
    for block, num_chunks in [(256, 4), (512, 3), (2048, None)]:
        tokens, _ = _gumbel_sample(logits, inv_t, greedy, seeds, block=block, num_chunks=num_chunks)
        assert torch.equal(tokens, ref_tokens), (block, num_chunks)


def test_split_comes_from_static_shapes():
    from rlserve.engine.sampler_triton import _split
    assert _split(256, 152064, 2048, target_programs=4 * 132) == (3, 25 * 2048)  # the RL shape on an H200
    assert _split(4096, 152064, 2048, target_programs=4 * 132) == (1, 75 * 2048)  # large batches: one chunk
    assert _split(1, 152064, 2048, target_programs=4 * 132) == (75, 2048)  # one row: one block a chunk
    assert _split(12, 5000, 256, num_chunks=3) == (3, 7 * 256)
    assert _split(12, 5000, 256, num_chunks=100) == (20, 256)
    assert _split(3, 7, 2048, num_chunks=4) == (1, 2048)
    assert _split(3, 0, 2048, num_chunks=4) == (1, 2048)
