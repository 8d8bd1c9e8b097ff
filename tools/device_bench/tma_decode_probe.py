"""Decode attention with K/V tiles fetched by the Hopper TMA engine, against the gather kernel (H200 diagnosis).

python tools/device_bench/tma_decode_probe.py --out DIR [--shapes ...] [--configs PAIR:warps:stages,...]: the
seventeenth session found ``_decode_kernel`` bound by its K/V loads as issued (3.15 TB/s of distinct bytes at rl-7b,
76% of a copy's rate): every thread computes a gathered address per 16 bytes and waits on its own copies. Here a
cache block of one KV head ([block_size, head_dim], one box of a 4-D tensor descriptor on the cache) is fetched by
the TMA engine on one thread's command (two copies at head dim 128: the swizzle's 128-byte rows), and Triton's
pipeliner keeps ``num_stages - 1`` boxes in flight. ``PAIR`` takes two blocks a softmax step (32 keys at block size
16). One split, direct output: the launch the one-warp config runs. (rlserve's ``_decode_tma_kernel`` is config
``0:1:3`` of this one.)
Times are do_bench_cudagraph medians (no host launch cost in them), each call walking ``--copies`` caches (4:
no call finds its K/V in the L2; the eighteenth session's first run, c09b137's JSON, had one, warm); ``gather``
is ``decode_attention`` with its TMA path off, ``rlserve`` as it ships (TMA where ``_tma_decode_ok``). Outputs are
compared with the gather kernel's first. JSON in DIR/tma_decode_probe.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from rlserve.attention import triton_paged as tp

if __package__ in (None, ""):  # run as a script: decode_sweep.py sits beside this file
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_sweep import SHAPES, build  # noqa: E402


@triton.jit
def _block_step(acc, m_i, l_i, q, k_desc, v_desc, blk0, blk1, kv_head, n, seq_len, qk_scale,
                BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, PAIR: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over cache blocks blk0 (and blk1 when PAIR), keys [n, n + BLOCK_SIZE * (1 + PAIR))."""
    k0 = k_desc.load([blk0, 0, kv_head, 0]).reshape(BLOCK_SIZE, BLOCK_D)
    v0 = v_desc.load([blk0, 0, kv_head, 0]).reshape(BLOCK_SIZE, BLOCK_D)
    s0 = tl.dot(q, tl.trans(k0)) * qk_scale  # [BLOCK_G, BLOCK_SIZE]
    offs = n + tl.arange(0, BLOCK_SIZE)
    if MASKED:
        s0 = tl.where((offs < seq_len)[None, :], s0, float("-inf"))
        v0 = tl.where((offs < seq_len)[:, None], v0, 0.0)  # stale cache bytes may be NaN: 0 * NaN is NaN
    if PAIR:
        k1 = k_desc.load([blk1, 0, kv_head, 0]).reshape(BLOCK_SIZE, BLOCK_D)
        v1 = v_desc.load([blk1, 0, kv_head, 0]).reshape(BLOCK_SIZE, BLOCK_D)
        s1 = tl.dot(q, tl.trans(k1)) * qk_scale
        if MASKED:
            s1 = tl.where((offs + BLOCK_SIZE < seq_len)[None, :], s1, float("-inf"))
            v1 = tl.where((offs + BLOCK_SIZE < seq_len)[:, None], v1, 0.0)
        m_new = tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1)))
        alpha = tl.exp2(m_i - m_new)
        p0 = tl.exp2(s0 - m_new[:, None])
        p1 = tl.exp2(s1 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p0, 1) + tl.sum(p1, 1)
        acc = acc * alpha[:, None] + tl.dot(p0.to(v0.dtype), v0) + tl.dot(p1.to(v1.dtype), v1)
    else:
        m_new = tl.maximum(m_i, tl.max(s0, 1))
        alpha = tl.exp2(m_i - m_new)
        p0 = tl.exp2(s0 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p0, 1)
        acc = acc * alpha[:, None] + tl.dot(p0.to(v0.dtype), v0)
    return acc, m_new, l_i


@triton.jit
def decode_tma_kernel(q_ptr, k_desc, v_desc, bt_ptr, seq_lens_ptr, out_ptr, qk_scale,
                      stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
                      GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                      PAIR: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    g_ok = offs_g < GROUP
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None],
                other=0.0)
    bt_row = bt_ptr + b64 * stride_bt
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    step: tl.constexpr = BLOCK_SIZE * (2 if PAIR else 1)
    full_end = seq_len // step * step
    # The block ids are read one step ahead (loop-carried), so that a step's TMA copies do not wait on a load of
    # the same iteration and the pipeliner can issue them stages early; ids past the row's blocks read as 0 (a
    # real block; its keys are masked).
    nblk = tl.cdiv(seq_len, BLOCK_SIZE)
    blk0 = tl.load(bt_row, mask=nblk > 0, other=0)
    blk1 = tl.load(bt_row + 1, mask=nblk > 1, other=0)
    for n in range(0, full_end, step):
        j = n // BLOCK_SIZE + (2 if PAIR else 1)
        nxt0 = tl.load(bt_row + j, mask=j < nblk, other=0)
        nxt1 = tl.load(bt_row + j + 1, mask=j + 1 < nblk, other=0)
        acc, m_i, l_i = _block_step(acc, m_i, l_i, q, k_desc, v_desc, blk0, blk1, kv_head, n, seq_len, qk_scale,
                                    BLOCK_SIZE, BLOCK_D, PAIR, False)
        blk0 = nxt0
        blk1 = nxt1
    for n in range(full_end, seq_len, step):
        acc, m_i, l_i = _block_step(acc, m_i, l_i, q, k_desc, v_desc, blk0, blk1, kv_head, n, seq_len, qk_scale,
                                    BLOCK_SIZE, BLOCK_D, PAIR, True)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


def descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor):
    """One box = one cache block of one KV head: [1, block_size, 1, head_dim] of the [N, BS, KVH, D] cache."""
    box = [1, k_cache.shape[1], 1, k_cache.shape[3]]
    return (TensorDescriptor(k_cache, list(k_cache.shape), list(k_cache.stride()), box),
            TensorDescriptor(v_cache, list(v_cache.shape), list(v_cache.stride()), box))


def decode_tma(q, k_cache, v_cache, block_tables, seq_lens, scale, out=None, descs=None, pair=True, num_warps=1,
               num_stages=3):
    batch, num_heads, head_dim = q.shape
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // kvh
    out = torch.empty_like(q) if out is None else out
    k_desc, v_desc = descriptors(k_cache, v_cache) if descs is None else descs
    decode_tma_kernel[(batch, kvh)](
        q, k_desc, v_desc, block_tables, seq_lens, out, scale * tp._LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        GROUP=group, BLOCK_SIZE=block_size, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=head_dim,
        PAIR=pair, num_warps=num_warps, num_stages=num_stages)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--shapes", default="rl-7b-ctx786,rl-7b-ctx1100,rl-small-ctx384,7b-p2048-ctx2300")
    parser.add_argument("--configs", default="1:1:2,1:1:3,1:1:4,0:1:3,0:1:4,0:1:6,1:2:3,1:4:3,1:1:5")
    parser.add_argument("--copies", type=int, default=4,
                        help="caches a timed call walks through in turn, so that no call finds the last one's K/V "
                             "in the L2 (the engine's GEMMs evict it between layers); times are per kernel")
    args = parser.parse_args()
    SHAPES.setdefault("7b-p2048-ctx2300", (256, 8, 4, 7, 2048, 251, 128))
    result = {"device": torch.cuda.get_device_name(), "copies": args.copies, "shapes": []}

    def gather(*a, **kw):  # decode_attention with its TMA path off: the gather kernel, as before c09b137
        cap = tp._TMA_MIN_CAPABILITY
        tp._TMA_MIN_CAPABILITY = 1 << 30
        try:
            return tp.decode_attention(*a, **kw)
        finally:
            tp._TMA_MIN_CAPABILITY = cap

    for name in args.shapes.split(","):
        batch, n, kvh, group, prompt, gen, d = SHAPES[name]
        copies = [build(batch, n, kvh, group, prompt, gen, d) for _ in range(args.copies)]
        q, k, v, bt, lens = copies[0]
        # a ragged batch for the check: every tail length, block-table padding past each row's last block
        ragged = lens - torch.arange(batch, device="cuda", dtype=torch.int32) % 40
        scale = d ** -0.5
        distinct = ((batch // n) * prompt + batch * (gen + 1)) * kvh * d * 2 * 2
        out = torch.empty_like(q)
        descs = [descriptors(c[1], c[2]) for c in copies]
        row = {"shape": name, "distinct_bytes": distinct}
        for lens_ in (ragged, lens):
            want = gather(q, k, v, bt, lens_, scale).float()
            torch.testing.assert_close(tp.decode_attention(q, k, v, bt, lens_, scale).float(), want, atol=2e-2,
                                       rtol=1e-2)
            for spec in args.configs.split(","):
                pair, warps, stages = (int(x) for x in spec.split(":"))
                got = decode_tma(q, k, v, bt, lens_, scale, out, descs[0], bool(pair), warps, stages).float()
                torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)

        def each_copy(fn):
            return lambda: [fn(c, desc) for c, desc in zip(copies, descs)]

        timings = [("gather", each_copy(lambda c, _: gather(*c, scale, out=out))),
                   ("rlserve", each_copy(lambda c, _: tp.decode_attention(*c, scale, out=out)))]
        for spec in args.configs.split(","):
            pair, warps, stages = (int(x) for x in spec.split(":"))
            timings.append((f"tma-{spec}", each_copy(lambda c, desc, p=bool(pair), w=warps, s=stages:
                                                     decode_tma(*c, scale, out, desc, p, w, s))))
        timings += [("gather-again", timings[0][1]), ("rlserve-again", timings[1][1])]
        for label, fn in timings:
            try:
                us = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3 / len(copies)
            except Exception as e:  # e.g. out of shared memory at a config
                print(f"{name:18} {label:14} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            row[label] = us
            print(f"{name:18} {label:14} {us:8.1f} us  {distinct / us / 1e6:5.2f} TB/s distinct", flush=True)
        result["shapes"].append(row)
        Path(args.out, "tma_decode_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
