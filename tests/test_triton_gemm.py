"""The benchmark's Triton GEMM (tools/device_bench/triton_gemm.py) against ``F.linear``.

Ragged M/N/K (masks, wrapped tile rows), split-K 1-3 (including an empty last K slice), bias or not, strided x
rows. With ``RLSERVE_TRITON_INTERPRET=1`` it runs on CPU under the Triton interpreter with small tiles, fp32 and
fp16 (the interpreter cannot multiply bf16); on a CUDA machine the tests are marked ``gpu`` and add bf16 and the
Hopper configs of ``CONFIGS`` at a decode shape. Without CUDA (and not interpreting) the tests are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import TRITON_INTERPRET as INTERPRET, triton_kernel_module

pytest.importorskip("triton")
torch = pytest.importorskip("torch")
F = torch.nn.functional

DEVICE, pytestmark = triton_kernel_module()

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "device_bench"))
import triton_gemm  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
SHAPES = [(5, 70, 100), (33, 64, 64), (1, 17, 40), (48, 96, 160)]  # (M, N, K)
SMALL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)


def _inputs(M, N, K, dtype, has_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=gen) * K ** -0.5).to(DEVICE, dtype)
    bias = torch.randn(N, generator=gen).to(DEVICE, dtype) if has_bias else None
    return x, w, bias


def _check(out, x, w, bias):
    assert out.shape == (x.shape[0], w.shape[0]) and out.dtype == x.dtype
    ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())  # fp32 reference of the inputs
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    else:
        err = (out.float() - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-2, f"max abs err relative to the output scale: {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("split_k", [1, 2, 3])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_linear(shape, has_bias, split_k, dtype):
    x, w, bias = _inputs(*shape, dtype, has_bias, seed=split_k)  # not the previous case's output in a reused buffer
    _check(triton_gemm.linear(x, w, bias, SPLIT_K=split_k, **SMALL), x, w, bias)


def test_strided_rows_and_group_order():
    """x as a column slice of a wider tensor (row stride > K); GROUP_M=2 over 4 tile rows of 3 tile columns."""
    wide, w, bias = _inputs(64, 80, 96, torch.float32, True)
    x = wide[:, :72]
    _check(triton_gemm.linear(x, w[:, :72].contiguous(), bias, SPLIT_K=2, GROUP_M=2, **SMALL), x,
           w[:, :72], bias)


def test_split_k_is_deterministic():
    x, w, bias = _inputs(33, 64, 200, torch.float32, True)
    first = triton_gemm.linear(x, w, bias, SPLIT_K=3, **SMALL)
    _check(first, x, w, bias)
    assert torch.equal(first, triton_gemm.linear(x, w, bias, SPLIT_K=3, **SMALL))


def test_rejects_mismatched_inputs():
    x, w, _ = _inputs(4, 8, 16, torch.float32, False)
    with pytest.raises(ValueError):
        triton_gemm.linear(x, w[:, :8], SPLIT_K=1, **SMALL)
    with pytest.raises(ValueError):  # K not contiguous
        triton_gemm.linear(x.t().contiguous().t(), w, SPLIT_K=1, **SMALL)


@pytest.mark.skipif(INTERPRET, reason="Hopper-sized tiles are too slow for the interpreter")
@pytest.mark.parametrize("cfg", triton_gemm.CONFIGS, ids=triton_gemm.config_name)
@pytest.mark.parametrize("K", [896, 928])
def test_bench_configs_at_a_decode_shape(K, cfg):
    """Every benchmark config, bf16, at a decode-like shape with M not a multiple of the tile; K = 928 is not a
    multiple of BLOCK_K (masked loads), 896 is for BLOCK_K = 64 and 128."""
    x, w, bias = _inputs(200, 1152, K, torch.bfloat16, True, seed=triton_gemm.CONFIGS.index(cfg))
    _check(triton_gemm.linear(x, w, bias, **cfg), x, w, bias)
