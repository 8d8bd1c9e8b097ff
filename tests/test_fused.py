"""The fused per-layer kernels (residual add + RMSNorm, rotary, SiLU-and-mul) against the PyTorch code they
replace on CUDA. Runs with ``-m gpu`` on CUDA, or on CPU under the Triton interpreter
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
@pytest.mark.parametrize("head_dim, heads, kv_heads", [(64, 14, 2), (128, 4, 4), (32, 7, 1)])
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
@pytest.mark.parametrize("width", [128, 4864, 1000])
def test_silu_mul(dtype, width):
    x = torch.randn(5, 2 * width, device=DEVICE).to(dtype)
    want = torch.nn.functional.silu(x[:, :width]) * x[:, width:]
    torch.testing.assert_close(fused.silu_mul(x), want, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_mlp_with_gate_and_up_as_two_gemms_equals_the_fused_projection(dtype, bias, monkeypatch):
    """The MLP's path where the fused kernels run: gate and up as two GEMMs over the halves of the fused weight
    (``SPLIT_GATE_UP``), then silu_mul_parts, against the fused [gate | up] GEMM and PyTorch's SiLU-and-mul."""
    from types import SimpleNamespace

    from rlserve.models import llama
    config = SimpleNamespace(hidden_size=64, intermediate_size=1000, hidden_act="silu", mlp_bias=bias)
    mlp = llama.LlamaMLP(config, llama.SINGLE).to(DEVICE, dtype)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(7, 64, device=DEVICE).to(dtype)
    gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
    want = mlp.down_proj(torch.nn.functional.silu(gate) * up)
    gate_part, up_part = mlp.gate_up_proj.forward_parts(x)
    torch.testing.assert_close(gate_part, gate, **tol(dtype))
    torch.testing.assert_close(up_part, up, **tol(dtype))
    mlp.act.use_fused = True
    for split in (True, False):
        monkeypatch.setattr(llama, "SPLIT_GATE_UP", split)
        torch.testing.assert_close(mlp(x), want, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_parts_reads_strided_rows(dtype):
    x = torch.randn(6, 3 * 300, device=DEVICE).to(dtype)
    gate, up = x[:, :300], x[:, 600:]  # rows of 900 elements, not of 300
    want = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(fused.silu_mul_parts(gate, up), want, **tol(dtype))
