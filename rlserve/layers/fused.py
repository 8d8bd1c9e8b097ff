"""Fused Triton kernels for the small per-layer operations of a decode step on CUDA.

A decoder layer in plain PyTorch launches ~30 kernels (RMSNorm in fp32, the rotary embedding, SiLU-and-mul,
residual adds); at decode batch sizes each is a few microseconds of launch-bound work. These three kernels
do the same arithmetic in three launches:

- ``add_rmsnorm(x, residual, weight, eps)``: ``residual += x`` (rounded to the model dtype, as the unfused
  code does) and ``rmsnorm(residual)`` computed in fp32, in one pass;
- ``rotary_(q, k, cos, sin, positions)``: the "rotate half" embedding of q and k, in place;
  ``rotary_store_(...)`` the same with the KV-cache store of k and v (the attention layer's path);
- ``silu_mul(x)``: ``silu(gate) * up`` of a fused [gate | up] projection; ``silu_mul_parts(gate, up)`` of two.

They are used on CUDA only (``enabled(device, dtype)``); the CPU path keeps the PyTorch code, whose float32
results equal Hugging Face transformers' bit for bit. Each kernel is checked against that code at first use on
a device, and the PyTorch path is used if it disagrees.

The layers do not choose: the model runner decides once per engine, from ``EngineConfig.fused_kernels`` and
``enabled``, and calls ``use_fused_kernels(model, on, ...)``; a layer with a fused path reads its ``use_fused``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


if triton is not None:
    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
                            HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # the sum, in the model dtype
            tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
        xf = x.to(tl.float32)
        variance = tl.sum(xf * xf, axis=0) / n_cols
        normed = (xf * tl.rsqrt(variance + eps)).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype),
                 mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache, v_cache,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
                       stride_kcs, stride_kch, stride_vcs, stride_vch, num_q_heads, num_k_heads,
                       HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr, STORE: tl.constexpr):
        """One token: q and k rotated; k in place, or (STORE) written with v to the caches' row ``slot``."""
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        d = tl.arange(0, BLOCK_HALF)
        d_ok = d < HALF  # head dims like 80 or 96: halves padded to a power of two
        cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d_ok)  # cos/sin tables hold [cos | cos]: the first half
        sin = tl.load(sin_ptr + pos * stride_cos + d, mask=d_ok)
        h = tl.arange(0, BLOCK_H)
        k_mask = (h[:, None] < num_k_heads) & d_ok[None, :]
        if STORE:
            slot = tl.load(slot_ptr + t).to(tl.int64)  # flat slot = block * block_size + offset; -1: not stored
            k_mask = k_mask & (slot >= 0)
            v_dst = v_cache + slot * stride_vcs + h[:, None] * stride_vch + d[None, :]
            v_src = v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :]
            for part in tl.static_range(2):
                v = tl.load(v_src + part * HALF, mask=k_mask)
                tl.store(v_dst + part * HALF, v.to(v_cache.dtype.element_ty), mask=k_mask)
        for which in tl.static_range(2):
            if which == 0:
                ptr = q_ptr + t * stride_qt + h[:, None] * stride_qh + d[None, :]
                mask = (h[:, None] < num_q_heads) & d_ok[None, :]
                dst = ptr
            else:
                ptr = k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :]
                mask = k_mask
                if STORE:
                    dst = k_cache + slot * stride_kcs + h[:, None] * stride_kch + d[None, :]
                else:
                    dst = ptr
            x1 = tl.load(ptr, mask=mask, other=0.0)
            x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
            c = cos[None, :].to(x1.dtype)
            s = sin[None, :].to(x1.dtype)
            # Same roundings as q * cos + rotate_half(q) * sin in the model dtype.
            o1 = ((x1 * c).to(tl.float32) + (-x2 * s).to(tl.float32)).to(x1.dtype)
            o2 = ((x2 * c).to(tl.float32) + (x1 * s).to(tl.float32)).to(x1.dtype)
            tl.store(dst, o1.to(dst.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, o2.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, stride_g, stride_u, stride_o, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0)
        silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        tl.store(out_ptr + row * stride_o + cols, silu * up, mask=mask)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                ) -> torch.Tensor:
    """x [N, D]; residual [N, D] updated in place to residual + x (when given) -> rmsnorm of it [N, D]."""
    out = torch.empty_like(x)
    n, d = x.shape
    if n:
        _add_rmsnorm_kernel[(n,)](x, residual if residual is not None else x, weight, out, x.stride(0),
                                  residual.stride(0) if residual is not None else 0, out.stride(0), d, eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(d),
                                  num_warps=4 if d <= 4096 else 8)
    return out


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
            ) -> None:
    """q [T, H, D], k [T, KVH, D] (last dim contiguous), rotated in place; cos/sin [P, D] fp32 tables."""
    _rotary(q, k, None, cos, sin, positions, None, None, None)


def rotary_store_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """``rotary_`` and the KV store in one kernel: q rotated in place; k rotated and, with v [T, KVH, D], written
    to the paged caches [N, BS, KVH, D] at ``slot_mapping`` ([T], -1: not written). k itself is left as it was.
    The stored rows are those of ``rotary_`` and then the attention backend's ``write_kv``, bit for bit."""
    if v.shape != k.shape or k_cache.shape[2:] != k.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"rotary_store_: k {tuple(k.shape)}, v {tuple(v.shape)} and caches "
                         f"{tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not match ([T, KVH, D], [N, BS, KVH, D])")
    for cache in (k_cache, v_cache):
        if cache.stride(0) != cache.shape[1] * cache.stride(1):
            raise ValueError("rotary_store_: cache blocks must be dense (a slot is block * block_size + offset)")
    _rotary(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping)


def _rotary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
            positions: torch.Tensor, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None,
            slot_mapping: torch.Tensor | None) -> None:
    """rotary_ (v None: k rotated in place) or rotary_store_ (k and v to the caches)."""
    t, num_q, d = q.shape
    for x in (q, k, v, k_cache, v_cache):
        if x is not None and x.stride(-1) != 1:
            raise ValueError("rotary: the head_dim axis must be contiguous (stride 1)")
    if d % 2:
        raise ValueError(f"rotary: head_dim {d} must be even")
    if not t:
        return
    store = v is not None
    vs = (v.stride(0), v.stride(1)) if store else (0, 0)
    cs = (k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2)) if store else (0, 0, 0, 0)
    _rotary_kernel[(t,)](q, k, v, cos, sin, positions, slot_mapping, k_cache, v_cache,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1), *vs, cos.stride(0), *cs,
                         num_q, k.shape[1], HALF=d // 2, BLOCK_HALF=triton.next_power_of_2(d // 2),
                         BLOCK_H=triton.next_power_of_2(max(num_q, k.shape[1])), STORE=store, num_warps=4)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [N, 2I] = [gate | up] -> silu(gate) * up [N, I]."""
    half = x.shape[1] // 2
    return silu_mul_parts(x[:, :half], x[:, half:])


def silu_mul_parts(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [N, I] (rows may be strided, columns contiguous) -> silu(gate) * up [N, I]."""
    if gate.dim() != 2 or gate.shape != up.shape:
        raise ValueError(f"silu_mul_parts: gate {tuple(gate.shape)} and up {tuple(up.shape)} must be the same [N, I]")
    if gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError("silu_mul_parts: gate's and up's columns must be contiguous")
    n, width = gate.shape
    out = torch.empty(n, width, dtype=up.dtype, device=up.device)
    if n:
        block = 1024
        _silu_mul_kernel[(n, triton.cdiv(width, block))](gate, up, out, gate.stride(0), up.stride(0), out.stride(0),
                                                          width, BLOCK=block, num_warps=4)
    return out


_checked: dict[tuple, bool] = {}


def enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Use the fused kernels on this device and dtype? Only on CUDA, and only if they agree with PyTorch."""
    if triton is None or device.type != "cuda":
        return False
    key = (device.index, dtype)
    if key not in _checked:
        _checked[key] = _self_check(device, dtype)
    return _checked[key]


# With the fused kernels, a large MLP computes gate and up as two GEMMs over the halves of their fused weight (views,
# no copy). For the fused [gate | up] product at rl-7b's decode shape cuBLAS picks its one cluster kernel, which
# waits ~4 µs behind a memset of its own; each half gets a plain kernel. The halves compute no faster, but the
# layer idles 4 µs less: rl-7b +0.6% end to end. A small MLP loses a launch and a tail a layer instead: rl-small
# -5.6% seeded, rl-medium even (BENCHMARKS, fifteenth and sixteenth sessions; one H200, TP=1, these three shapes
# only). So only MLPs whose gate (per rank) has SPLIT_GATE_UP_MIN_WEIGHTS entries or more are split: rl-7b's has
# 68M, rl-medium's 14M; unmeasured, rl-32b's (141M) splits, and so does rl-7b's under TP=2 (34M), not under TP=4.
# False: one GEMM everywhere (an A/B).
SPLIT_GATE_UP = True
SPLIT_GATE_UP_MIN_WEIGHTS = 32 * 2 ** 20
# With the fused kernels, an attention layer rotates q and k and stores k and v in one kernel (rotary_store_), not
# rotary_ and then the backend's store. False: two kernels (an A/B).
FUSE_ROTARY_STORE = True


def use_fused_kernels(model: torch.nn.Module, on: bool, fuse_kv_store: bool = True) -> None:
    """Switch every layer of ``model`` that has a fused path (a ``use_fused`` attribute) on or off, and with them
    the split gate/up GEMMs of its large MLPs (a ``split_gate_up`` attribute and ``gate_weights``; SPLIT_GATE_UP
    and SPLIT_GATE_UP_MIN_WEIGHTS) and the rotary-and-store kernel of its attention layers (``fuse_rotary_store``;
    FUSE_ROTARY_STORE). ``fuse_kv_store``: whether the bound attention backend's store may be replaced by
    rotary_store_, which writes the cache rows itself (the runner: with the Triton backend, not the reference)."""
    for module in model.modules():
        if hasattr(module, "use_fused"):
            module.use_fused = on
        if hasattr(module, "split_gate_up"):
            module.split_gate_up = on and SPLIT_GATE_UP and module.gate_weights >= SPLIT_GATE_UP_MIN_WEIGHTS
        if hasattr(module, "fuse_rotary_store"):
            module.fuse_rotary_store = on and fuse_kv_store and FUSE_ROTARY_STORE


def _self_check(device: torch.device, dtype: torch.dtype) -> bool:
    import logging
    g = torch.Generator(device=device).manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    try:
        x = torch.randn(5, 320, device=device, generator=g).to(dtype)
        r = torch.randn(5, 320, device=device, generator=g).to(dtype)
        w = torch.randn(320, device=device, generator=g).to(dtype)
        want_r = x + r
        f = want_r.float()
        want = w * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        got_r = r.clone()
        got = add_rmsnorm(x, got_r, w, 1e-6)
        ok = torch.allclose(got_r, want_r) and torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
        q = torch.randn(7, 4, 64, device=device, generator=g).to(dtype)
        k = torch.randn(7, 2, 64, device=device, generator=g).to(dtype)
        ang = torch.rand(16, 32, device=device, generator=g)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        pos = torch.randint(0, 16, (7,), device=device, generator=g)

        def rot(v):
            c, s = cos[pos].unsqueeze(1).to(dtype), sin[pos].unsqueeze(1).to(dtype)
            return v * c + torch.cat((-v[..., 32:], v[..., :32]), -1) * s

        want_q, want_k = rot(q), rot(k)
        v = torch.randn(7, 2, 64, device=device, generator=g).to(dtype)
        q2, k2 = q.clone(), k.clone()
        caches = torch.zeros(2, 3, 4, 2, 64, device=device, dtype=dtype)  # [K/V, blocks, slots, heads, dim]
        slots = torch.tensor([5, 0, -1, 11, 2, 7, 9], device=device)
        rotary_store_(q2, k2, v, cos, sin, pos, caches[0], caches[1], slots)
        rotary_(q, k, cos, sin, pos)
        ok = ok and torch.allclose(q.float(), want_q.float(), atol=tol, rtol=tol) and \
            torch.allclose(k.float(), want_k.float(), atol=tol, rtol=tol)
        kept = slots >= 0
        ok = ok and torch.equal(q2, q) and torch.equal(caches[0].view(-1, 2, 64)[slots[kept]], k[kept]) and \
            torch.equal(caches[1].view(-1, 2, 64)[slots[kept]], v[kept])
        gu = torch.randn(3, 2 * 300, device=device, generator=g).to(dtype)
        want_a = torch.nn.functional.silu(gu[:, :300]) * gu[:, 300:]
        ok = ok and torch.allclose(silu_mul(gu).float(), want_a.float(), atol=tol, rtol=tol)
        gate, up = gu[:, :300].contiguous(), gu[:, 300:].contiguous()  # the split MLP's two GEMM outputs
        ok = ok and torch.allclose(silu_mul_parts(gate, up).float(), want_a.float(), atol=tol, rtol=tol)
    except Exception as e:  # a kernel that cannot build here: the PyTorch path
        logging.getLogger(__name__).warning("fused kernels disabled on %s: %s", device, e)
        return False
    if not ok:
        logging.getLogger(__name__).warning("fused kernels disagree with PyTorch on %s %s: disabled", device, dtype)
    return bool(ok)
