"""The fused per-layer kernels (residual add + RMSNorm, rotary with and without the KV store, SiLU-and-mul)
against the PyTorch code they replace on CUDA. Runs with ``-m gpu`` on CUDA, or on CPU under the Triton interpreter
(``RLSERVE_TRITON_INTERPRET=1``)."""

from __future__ import annotations

import os

import pytest

INTERPRET = os.environ.get("RLSERVE_TRITON_INTERPRET") == "1"
triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")
if INTERPRET:
    DEVICE, pytestmark = "cpu", []
else:
    DEVICE = "cuda"
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from rlserve.layers import fused  # noqa: E402
from rlserve.layers.rotary import _rotate_half  # noqa: E402

DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]


def tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 896, 1000])
def test_add_rmsnorm(dtype, hidden):
    x = torch.randn(7, hidden, device=DEVICE).to(dtype)
    residual = torch.randn(7, hidden, device=DEVICE).to(dtype)
    weight = torch.randn(hidden, device=DEVICE).to(dtype)
    want_residual = residual + x
    f = want_residual.float()
    want = weight * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    got = fused.add_rmsnorm(x, residual, weight, 1e-6)
    torch.testing.assert_close(residual, want_residual)
    torch.testing.assert_close(got, want, **tol(dtype))
    alone = fused.add_rmsnorm(want_residual, None, weight, 1e-6)
    torch.testing.assert_close(alone, want, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, heads, kv_heads", [(64, 14, 2), (128, 4, 4), (32, 7, 1), (80, 4, 2)])
def test_rotary_in_place(dtype, head_dim, heads, kv_heads):
    tokens = 9
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)  # strided views, as in the model
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    angles = torch.rand(50, head_dim // 2, device=DEVICE) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    positions = torch.randint(0, 50, (tokens,), device=DEVICE)
    c, s = cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)
    want_q, want_k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    fused.rotary_(q, k, cos, sin, positions)
    torch.testing.assert_close(q, want_q, **tol(dtype))
    torch.testing.assert_close(k, want_k, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, heads, kv_heads", [(64, 14, 2), (128, 28, 4), (32, 7, 1), (96, 6, 2)])
def test_rotary_store_writes_what_rotary_then_the_kv_store_write(dtype, head_dim, heads, kv_heads):
    """rotary_store_ against rotary_ and then the Triton backend's store_kv, bit for bit: q rotated in place, the
    caches' rows at each slot, slot -1 (CUDA-graph padding) writing nothing, k itself left as it was. (rotary_ is
    the same kernel without the store; test_rotary_in_place holds it to PyTorch's rotary.)"""
    from rlserve.attention.triton_paged import store_kv
    tokens, blocks, block_size = 9, 5, 4
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    q, k, v = (x.view(tokens, -1, head_dim) for x in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                 kv_heads * head_dim], dim=-1))  # strided views
    angles = torch.rand(50, head_dim // 2, device=DEVICE) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    positions = torch.randint(0, 50, (tokens,), device=DEVICE)
    slots = torch.randperm(blocks * block_size, device=DEVICE)[:tokens]
    slots[[2, 6]] = -1
    k_before = k.clone()
    want_q, want_k = q.clone(), k.clone()
    fused.rotary_(want_q, want_k, cos, sin, positions)
    want = torch.randn(2, blocks, block_size, kv_heads, head_dim, device=DEVICE).to(dtype)  # stale contents
    got = want.clone()
    store_kv(want_k, v, want[0], want[1], slots)
    fused.rotary_store_(q, k, v, cos, sin, positions, got[0], got[1], slots)
    assert torch.equal(q, want_q)
    assert torch.equal(got, want)
    assert torch.equal(k, k_before)
    kept = slots >= 0  # and the rows it wrote are rotary's (not left stale by a masked store)
    assert torch.equal(got[0].view(-1, kv_heads, head_dim)[slots[kept]], want_k[kept])
    assert torch.equal(got[1].view(-1, kv_heads, head_dim)[slots[kept]], v[kept])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_with_fused_rotary_store_equals_the_unfused_layer(dtype, qk_norm, monkeypatch):
    """A Llama / Qwen3 (q/k norm before rotary) attention block as the runner sets it up where the fused kernels run
    (``fuse_rotary_store``: rotary and the KV store in one kernel on the QKV projection's strided views) against the
    same block without it (the rotary kernel, then the backend's write_kv). A batch of a decode row, a 5-token
    prefill chunk and a padding row (slot -1): the same output and the same caches, bit for bit."""
    from types import SimpleNamespace

    from rlserve.attention import AttentionMetadata, get_backend
    from rlserve.models import llama, qwen3
    config = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6, attention_bias=True)
    rotary = llama.RotaryEmbedding(32, 64, llama.rope_parameters(config)).to(DEVICE)
    cls = qwen3.Qwen3Attention if qk_norm else llama.LlamaAttention
    torch.manual_seed(0)
    block = cls(config, llama.SINGLE, rotary).to(DEVICE, dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    bs = 4
    lens, query_lens = [7, 5, 1], [1, 5, 1]  # a decode row (6 cached tokens + 1), a 5-token prefill, padding
    tables = torch.tensor([[3, 0], [1, 2], [0, 0]], dtype=torch.int32, device=DEVICE)
    positions = torch.tensor([6, 0, 1, 2, 3, 4, 0], device=DEVICE)
    slots = torch.tensor([3 * bs + 2, bs, bs + 1, bs + 2, bs + 3, 2 * bs, -1], device=DEVICE)
    meta = AttentionMetadata(slots, torch.tensor([0, 1, 6, 7], dtype=torch.int32, device=DEVICE),
                             torch.tensor(lens, dtype=torch.int32, device=DEVICE), tables, 1, 5, 7, query_lens, lens)
    x = torch.randn(7, 64, device=DEVICE).to(dtype)
    cached = torch.randn(2, 4, bs, 2, 32, device=DEVICE).to(dtype)  # the decode row's 6 tokens, stale rows
    outs, caches = [], []
    for fuse in (False, True):
        cache = cached.clone()
        block.attn.bind(cache[0], cache[1], get_backend("reference", torch.device(DEVICE)))
        monkeypatch.setattr(fused, "FUSE_ROTARY_STORE", fuse)
        fused.use_fused_kernels(block, True)
        assert block.attn.fuse_rotary_store is fuse and rotary.use_fused
        outs.append(block(positions, x, meta))
        caches.append(cache)
    assert torch.equal(outs[1][:6], outs[0][:6])  # the padding row's output is never read
    assert torch.equal(caches[1], caches[0])
    assert not torch.equal(caches[1][:, 3, 2], cached[:, 3, 2])  # the decode row's new token was written


def test_rotary_store_checks_its_shapes():
    q, k = torch.zeros(2, 4, 64, device=DEVICE), torch.zeros(2, 2, 64, device=DEVICE)
    cos = sin = torch.zeros(8, 64, device=DEVICE)
    positions = slots = torch.zeros(2, dtype=torch.long, device=DEVICE)
    cache = torch.zeros(3, 4, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="do not match"):
        fused.rotary_store_(q, k, torch.zeros(2, 1, 64, device=DEVICE), cos, sin, positions, cache, cache, slots)
    with pytest.raises(ValueError, match="dense"):
        strided = torch.zeros(3, 5, 2, 64, device=DEVICE)[:, :4]  # a block's stride is 5 slots
        fused.rotary_store_(q, k, k.clone(), cos, sin, positions, strided, strided, slots)
    with pytest.raises(ValueError, match="even"):
        fused.rotary_(torch.zeros(2, 4, 63, device=DEVICE), torch.zeros(2, 2, 63, device=DEVICE),
                      torch.zeros(8, 63, device=DEVICE), torch.zeros(8, 63, device=DEVICE), positions)
    fused.rotary_store_(q, k, k.clone(), cos, sin, positions, cache, cache.clone(), slots)  # and a good call runs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [128, 4864, 1000])
def test_silu_mul(dtype, width):
    x = torch.randn(5, 2 * width, device=DEVICE).to(dtype)
    want = torch.nn.functional.silu(x[:, :width]) * x[:, width:]
    torch.testing.assert_close(fused.silu_mul(x), want, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_mlp_with_gate_and_up_as_two_gemms_equals_the_fused_projection(dtype, bias, monkeypatch):
    """The MLP as the runner sets it up where the fused kernels run: gate and up as two GEMMs over the halves of the
    fused weight (``fused.SPLIT_GATE_UP``), then silu_mul_parts, against the fused [gate | up] GEMM and PyTorch's
    SiLU-and-mul; and with the split off, silu_mul on the fused GEMM."""
    from types import SimpleNamespace

    from rlserve.models import llama
    config = SimpleNamespace(hidden_size=64, intermediate_size=1000, hidden_act="silu", mlp_bias=bias)
    mlp = llama.LlamaMLP(config, llama.SINGLE).to(DEVICE, dtype)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(7, 64, device=DEVICE).to(dtype)
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    want = mlp.down_proj(torch.nn.functional.silu(gate) * up)
    monkeypatch.setattr(fused, "SPLIT_GATE_UP_MIN_WEIGHTS", 0)  # split whatever the size
    for split in (True, False):
        monkeypatch.setattr(fused, "SPLIT_GATE_UP", split)
        fused.use_fused_kernels(mlp, True)
        assert mlp.split_gate_up is split and mlp.act.use_fused
        torch.testing.assert_close(mlp(x), want, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_parts_reads_each_tensors_own_row_stride(dtype):
    x = torch.randn(6, 3 * 300, device=DEVICE).to(dtype)
    contiguous = torch.randn(6, 300, device=DEVICE).to(dtype)
    for gate, up in ((contiguous, x[:, 600:]), (x[:, 600:], contiguous), (x[:, :300], x[:, 600:])):
        want = torch.nn.functional.silu(gate) * up
        torch.testing.assert_close(fused.silu_mul_parts(gate, up), want, **tol(dtype))
    with pytest.raises(ValueError, match="same"):
        fused.silu_mul_parts(contiguous, x[:, 300:])
    with pytest.raises(ValueError, match="contiguous"):
        fused.silu_mul_parts(x[:, ::3], contiguous)
