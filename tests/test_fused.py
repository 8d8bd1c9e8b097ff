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
