"""A Triton GEMM for the decode step's small matmuls, ``x @ w.T (+ bias)``, to time next to cuBLAS (not used by the
engine).

Why: at M = 256 decode tokens the QKV and O projections of a 7B model have few output tiles (256 x 3584 in
128 x 128 tiles is 56 tiles for 132 SMs), so cuBLAS runs them at about half the rate of the MLP GEMMs. Split-K
or smaller tiles give every SM work; ``gemm_shapes.py --triton`` times the ``CONFIGS`` below against cuBLAS.

Design
------
* ``x`` is ``[M, K]``, ``w`` is ``[N, K]`` (row-major, as ``nn.Linear`` stores it), both with K contiguous (rows
  may be strided): the kernel reads ``w`` as a ``[BLOCK_K, BLOCK_N]`` tile of ``w.T``, no transposed copy.
* Grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K)``. Axis 0 is the output tile, in grouped order: ``GROUP_M``
  tile rows are walked column by column, so programs that run together share the same ``w`` tiles in L2. Axis 1
  is the K slice: slice ``s`` covers ``[s * k_per_split, (s + 1) * k_per_split)``, ``k_per_split`` a multiple of
  ``BLOCK_K`` (the last slice may be short or even empty; an empty one writes zeros).
* fp32 accumulation; fp32 inputs use ``input_precision="ieee"`` (no TF32), 16-bit inputs the tensor cores.
* ``SPLIT_K == 1``: the kernel adds the bias and writes the output in ``x``'s dtype. ``SPLIT_K > 1``: each slice
  writes its fp32 partial tile to a workspace ``[SPLIT_K, M, N]`` and ``_reduce_kernel`` sums the slices in
  order, adds the bias and casts. No atomics, so the result is deterministic.
* Ragged shapes: row/column indices are wrapped modulo ``M``/``N`` so tile loads need no masks (the wrapped
  rows are computed and never stored); K is masked only when ``K`` is not a multiple of ``BLOCK_K``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Candidates for H200 (sm_90, 227 KB shared memory per block) at M = 256 and 512. Shared memory per stage is
# (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes in 16-bit; the largest here, 128x128x128 with 3 stages, needs 192 KB.
# Output tiles at M = 256 for N = 3584 (O, down) / 4608 (QKV), times SPLIT_K, against 132 SMs:
# 128x128: 56 / 72, 64x128 and 128x64: 112 / 144, 128x256: 28 / 36, 64x64: 224 / 288.
CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=3, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SPLIT_K=1, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SPLIT_K=3, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SPLIT_K=4, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, SPLIT_K=2, num_warps=8, num_stages=3),
]


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, out_ptr, bias_ptr, M, N, K, k_per_split,
                   stride_xm, stride_wn, stride_os, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr):
    # Grouped order: tile t runs down a column of GROUP_M tile rows before moving to the next column.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)  # the last group may be shorter
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    # Wrapped indices: rows >= M (columns >= N) reread valid ones and are masked at the store.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    k_start = tl.program_id(1) * k_per_split
    k_end = min(k_start + k_per_split, K)
    x_tile = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]
    w_tile = w_ptr + offs_n[None, :] * stride_wn + (k_start + offs_k)[:, None]  # [BLOCK_K, BLOCK_N] of w.T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_tile)
            b = tl.load(w_tile)
        else:
            a = tl.load(x_tile, mask=(k + offs_k)[None, :] < k_end, other=0.0)
            b = tl.load(w_tile, mask=(k + offs_k)[:, None] < k_end, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        x_tile += BLOCK_K
        w_tile += BLOCK_K

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out = out_ptr + tl.program_id(1) * stride_os + rows[:, None] * stride_om + cols[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out, acc, mask=mask)  # fp32 partial of slice program_id(1)


@triton.jit
def _reduce_kernel(ws_ptr, out_ptr, bias_ptr, M, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr):
    # ws is [SPLIT_K, M, N] and out [M, N], both contiguous: one flat index addresses an element of each slice.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: deterministic
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, BLOCK_M: int, BLOCK_N: int,
           BLOCK_K: int, SPLIT_K: int, num_warps: int, num_stages: int, GROUP_M: int = 8) -> torch.Tensor:
    """``x @ w.T (+ bias)`` for ``x`` ``[M, K]`` and ``w`` ``[N, K]``; output ``[M, N]`` in ``x``'s dtype."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] or x.dtype != w.dtype:
        raise ValueError(f"need x [M, K] and w [N, K] of one dtype, got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(w.shape)} {w.dtype}")
    if x.stride(1) != 1 or w.stride(1) != 1:  # K contiguous (known at compile time): vector loads along K
        raise ValueError("x and w need a contiguous last dim (stride 1)")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"bias must be [{w.shape[0]}], got {tuple(bias.shape)}")
    (M, K), N = x.shape, w.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    bias_arg = bias.contiguous() if bias is not None else out  # never read without HAS_BIAS
    k_per_split = triton.cdiv(triton.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    ws = out if SPLIT_K == 1 else torch.empty(SPLIT_K, M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N), SPLIT_K)
    _matmul_kernel[grid](
        x, w, ws, bias_arg, M, N, K, k_per_split, x.stride(0), w.stride(0), ws.stride(0) if SPLIT_K > 1 else 0, N,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, SPLIT_K=SPLIT_K,
        HAS_BIAS=bias is not None, EVEN_K=K % BLOCK_K == 0,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        num_warps=num_warps, num_stages=num_stages)
    if SPLIT_K > 1:
        block = 1024
        _reduce_kernel[(triton.cdiv(M * N, block),)](ws, out, bias_arg, M, N, SPLIT_K=SPLIT_K,
                                                      HAS_BIAS=bias is not None, BLOCK=block)
    return out


def config_name(cfg: dict) -> str:
    """``128x128x64 sk2 w4 s4``: tile, split-K, warps, stages."""
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} sk{cfg['SPLIT_K']} "
            f"w{cfg['num_warps']} s{cfg['num_stages']}")
