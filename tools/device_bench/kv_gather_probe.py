"""Is decode attention bound by its reads or by its own work? (H200 diagnosis, not a test.)

python tools/device_bench/kv_gather_probe.py --out DIR [--shapes rl-7b-ctx786,...]: at decode_sweep.py's shapes
(forked prompts sharing cache blocks, bf16, block size 16), times

- ``attention``: the engine's decode attention (its default launch config);
- ``gather``: a kernel with the same grid, tiles and launch config that reads every K and V tile through the block
  table exactly as the attention kernel does, and only sums them in registers (no softmax): the time the reads
  alone take in that access pattern;
- ``gather-dot``: the same, summed by one tensor-core product per tile with a 16-row ones matrix, so that the loads
  are pipelined through shared memory as the attention kernel's are (half its products, no softmax);
- ``gather-4w``: the same reads as 4-warp programs of 64-key tiles (the other decode config);
- ``copy``: a device-to-device copy of as many bytes as the contexts hold, distinct (bytes read + written over the
  time, the roofline's copy bandwidth).

and prints each with its read rate over the distinct bytes (each shared prompt block once) and over all bytes read
(each sample's prompt counted). If ``gather-dot`` takes about as long as ``attention``, the kernel is bound by its
reads and the lever is the access pattern (layout, tile shape, what stays in L2); if it is much shorter, by its
arithmetic or latency (the padded query group, the softmax); ``gather`` against ``gather-dot`` shows what the
pipelining through shared memory is worth. JSON in DIR/kv_gather_probe.json.

``--check`` (any machine; TRITON_INTERPRET=1 on a CPU): the gather kernel's sums against PyTorch on a small
shape, then exits."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from rlserve.attention import triton_paged as tp

if __package__ in (None, ""):  # run as a script: decode_sweep.py sits beside this file
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_sweep import SHAPES, build  # noqa: E402


@triton.jit
def _gather_kernel(k_cache, v_cache, bt_ptr, seq_lens_ptr, out_ptr, max_len, stride_bt, stride_kb, stride_ks,
                   stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, DOT: tl.constexpr):
    """Program (b, kv head): the sum of its sequence's K and V rows, read tile by tile as _attend_tile reads them.
    DOT: summed by tensor-core products with a ones matrix (16 rows, as the attention kernel's padded query group), so
    that Triton pipelines the loads through shared memory as it does the attention kernel's, whose loads feed
    tl.dot; else in registers (loads the pipeliner leaves alone). (The loop runs to the batch's longest context,
    masked past this one's: the probe's shapes have one length.)"""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([16 if DOT else BLOCK_N, HEAD_DIM], dtype=tl.float32)
    ones = tl.full([16, BLOCK_N], 1.0, dtype=k_cache.dtype.element_ty)
    for start in range(0, max_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        in_blk = offs_n % BLOCK_SIZE
        k_row = blk * stride_kb + in_blk * stride_ks + kv_head * stride_kh
        v_row = blk * stride_vb + in_blk * stride_vs + kv_head * stride_vh
        k = tl.load(k_cache + k_row[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_cache + v_row[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if DOT:
            acc = tl.dot(ones, k, acc)
            acc = tl.dot(ones, v, acc)
        else:
            acc += k.to(tl.float32) + v.to(tl.float32)
    total = tl.max(acc, 0) if DOT else tl.sum(acc, 0)  # (DOT: 16 equal rows)
    tl.store(out_ptr + (b * tl.num_programs(1) + kv_head) * HEAD_DIM + offs_d, total)


def gather(k: torch.Tensor, v: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
           block_n: int, num_warps: int, num_stages: int, dot: bool = False) -> torch.Tensor:
    """[B, KVH, D] fp32: each sequence's and KV head's K + V rows summed over its context (max_len: the longest,
    from the host, so that a timed call does not wait for the device)."""
    batch, (_, block_size, kv_heads, head_dim) = seq_lens.shape[0], k.shape
    out = torch.empty(batch, kv_heads, head_dim, dtype=torch.float32, device=k.device)
    _gather_kernel[(batch, kv_heads)](k, v, block_tables, seq_lens, out, max_len, block_tables.stride(0),
                                      k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                                      BLOCK_SIZE=block_size, BLOCK_N=block_n, HEAD_DIM=head_dim, DOT=dot,
                                      num_warps=num_warps, num_stages=num_stages)
    return out


def check(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    bs, kvh, d = 4, 2, 16
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # (fp32 products on a GPU would round to tf32)
    k, v = torch.randn(2, 9, bs, kvh, d, generator=g).to(device, dtype)
    tables = torch.tensor([[3, 1, 7], [3, 1, 2], [5, 0, 0]], dtype=torch.int32, device=device)
    lens = torch.tensor([11, 9, 3], dtype=torch.int32, device=device)
    for dot in (False, True):
        got = gather(k, v, tables, lens, 11, block_n=16, num_warps=1, num_stages=1, dot=dot)
        for b in range(3):
            n = int(lens[b])
            rows = tables[b].long().repeat_interleave(bs)[:n] * bs + torch.arange(n, device=device) % bs
            want = (k.reshape(-1, kvh, d)[rows].float() + v.reshape(-1, kvh, d)[rows].float()).sum(0)
            torch.testing.assert_close(got[b], want, atol=1e-3, rtol=1e-3)
    print("gather kernel: sums equal PyTorch's (in registers and by products)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--shapes", default="rl-7b-ctx786,rl-7b-ctx1100,rl-small-ctx384,rl-medium-ctx768")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        if os.environ.get("TRITON_INTERPRET") == "1":
            from rlserve.debug import patch_triton_interpreter
            patch_triton_interpreter()
            return check("cpu")
        return check("cuda")
    check("cuda")
    from rlserve.bench.roofline import measure_copy_bandwidth
    rows = []
    for name in args.shapes.split(","):
        batch, n, kvh, group, prompt, gen, d = SHAPES[name]
        q, k, v, bt, lens = build(batch, n, kvh, group, prompt, gen, d)
        context = prompt + gen + 1
        row_bytes = kvh * d * 2 * 2  # K and V, bf16, per token
        all_bytes = batch * context * row_bytes
        distinct = (batch // n * prompt + batch * (context - prompt)) * row_bytes
        config = tp._decode_config(triton.next_power_of_2(d), max(16, triton.next_power_of_2(group)), q.dtype,
                                   batch * kvh * tp.choose_num_splits(batch, kvh, q.device), tp.sm_count(q.device))
        flat = torch.empty(distinct // 2, dtype=torch.bfloat16, device="cuda")
        flat_out = torch.empty_like(flat)
        timed = {
            "attention": lambda: tp.decode_attention(q, k, v, bt, lens, d ** -0.5),
            "gather": lambda: gather(k, v, bt, lens, context, config["BLOCK_N"], config["num_warps"],
                                     config["num_stages"]),
            "gather-dot": lambda: gather(k, v, bt, lens, context, config["BLOCK_N"], config["num_warps"],
                                         config["num_stages"], dot=True),
            "gather-4w": lambda: gather(k, v, bt, lens, context, 64, 4, 3),
            "copy": lambda: flat_out.copy_(flat),
        }
        result = {"shape": name, "config": config, "distinct_bytes": distinct, "all_bytes": all_bytes}
        for label, fn in list(timed.items()) + [("attention-again", timed["attention"])]:
            us = triton.testing.do_bench(fn, warmup=10, rep=60) * 1e3
            moved = 2 * distinct if label == "copy" else distinct
            result[label] = {"us": us, "distinct_tbs": moved / us / 1e6, "all_tbs": all_bytes / us / 1e6}
            print(f"{name:18} {label:16} {us:8.1f} us  {moved / us / 1e6:5.2f} TB/s distinct"
                  + ("" if label == "copy" else f"  {all_bytes / us / 1e6:5.2f} TB/s all"))
        rows.append(result)
    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": measure_copy_bandwidth(torch.device("cuda"))
              / 1e9, "shapes": rows}
    Path(args.out, "kv_gather_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
