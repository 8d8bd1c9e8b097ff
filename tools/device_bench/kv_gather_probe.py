"""Is decode attention bound by its reads or by its own work? (H200 diagnosis, not a test.)

python tools/device_bench/kv_gather_probe.py --out DIR [--shapes rl-7b-ctx786,...]: at decode_sweep.py's shapes
(forked prompts sharing cache blocks, bf16, block size 16; one split each), times

- ``attention``: the engine's decode attention at its default launch config (and ``attention-4w`` at 64-key tiles of
  4 warps, the other config);
- ``gather``: a kernel with the same grid, tiles, loops (unmasked full tiles, then a masked tail) and launch config
  that reads every K and V tile through the block table as the attention kernel does and only sums each tile's rows
  into a [D] accumulator: the reads, with almost no work;
- ``gather-dot``: the same reads fed to two tensor-core products a tile of the attention's sizes ([16, N] x [N, D],
  with a ones matrix): the attention kernel without its softmax and bookkeeping (and ``gather-dot-4w``);
- ``gather-contiguous``: ``gather`` over the same bytes with every sequence's blocks renumbered to lie in order
  (shared prompt blocks once per group), against the engine's scattered block ids;
- ``copy``: a device-to-device copy of the distinct bytes (read + written over the time: the copy bandwidth).

Each with its read rate over the distinct bytes (each shared prompt block once) and over all bytes read (each
sample's prompt counted), and each Triton variant with its registers, spills, shared memory and asynchronous copies
(cp.async in its TTGIR). Reading it: ``gather`` about as long as ``attention`` -- bound by the reads (then
``gather-contiguous`` and ``copy`` say whether the block scatter or the bandwidth itself); ``gather-dot`` about as
long but ``gather`` much shorter -- bound by the products one warp issues; ``gather-dot`` much shorter too -- by
the softmax and bookkeeping. Every variant's sums are checked against PyTorch at the shape before it is timed.
JSON in DIR/kv_gather_probe.json after each shape.

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
def _gather_tile(acc, ones, k_cache, v_cache, bt_row, kv_head, start_n, kv_end,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                 DOT: tl.constexpr):
    """Keys [start_n, start_n + BLOCK_N) of one sequence and KV head, read as _attend_tile reads them, summed."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < kv_end
    if MASKED:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
    in_blk = offs_n % BLOCK_SIZE
    k_row = blk * stride_kb + in_blk * stride_ks + kv_head * stride_kh
    v_row = blk * stride_vb + in_blk * stride_vs + kv_head * stride_vh
    if MASKED:
        k = tl.load(k_cache + k_row[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_cache + v_row[:, None] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(k_cache + k_row[:, None] + offs_d[None, :])
        v = tl.load(v_cache + v_row[:, None] + offs_d[None, :])
    if DOT:  # acc [16, D]: the products of Q K^T and P V's sizes
        acc = tl.dot(ones, k, acc)
        acc = tl.dot(ones, v, acc)
    else:  # acc [D]
        acc += tl.sum(k.to(tl.float32), 0) + tl.sum(v.to(tl.float32), 0)
    return acc


@triton.jit
def _gather_kernel(k_cache, v_cache, bt_ptr, seq_lens_ptr, out_ptr, stride_bt, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, DOT: tl.constexpr):
    """Program (b, kv head), as _decode_kernel's with one split: the sum of its sequence's K and V rows, full tiles
    unmasked, then at most one masked tail tile."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    full_end = seq_len // BLOCK_N * BLOCK_N
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    offs_d = tl.arange(0, HEAD_DIM)
    ones = tl.full([16, BLOCK_N], 1.0, dtype=k_cache.dtype.element_ty)
    if DOT:
        acc = tl.zeros([16, HEAD_DIM], dtype=tl.float32)
    else:
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for n in range(0, full_end, BLOCK_N):
        acc = _gather_tile(acc, ones, k_cache, v_cache, bt_row, kv_head, n, seq_len, stride_kb, stride_ks,
                           stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, BLOCK_N, HEAD_DIM, False, DOT)
    for n in range(full_end, seq_len, BLOCK_N):
        acc = _gather_tile(acc, ones, k_cache, v_cache, bt_row, kv_head, n, seq_len, stride_kb, stride_ks,
                           stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, DOT)
    if DOT:
        total = tl.max(acc, 0)  # 16 equal rows
    else:
        total = acc
    tl.store(out_ptr + (b * tl.num_programs(1) + kv_head) * HEAD_DIM + offs_d, total)


def gather(k: torch.Tensor, v: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, block_n: int,
           num_warps: int, num_stages: int, dot: bool = False, compiled: dict | None = None) -> torch.Tensor:
    """[B, KVH, D] fp32: each sequence's and KV head's K + V rows summed over its context. ``compiled``: gets the
    launch's compiled kernel under "kernel"."""
    batch, (_, block_size, kv_heads, head_dim) = seq_lens.shape[0], k.shape
    out = torch.empty(batch, kv_heads, head_dim, dtype=torch.float32, device=k.device)
    kernel = _gather_kernel[(batch, kv_heads)](
        k, v, block_tables, seq_lens, out, block_tables.stride(0), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), BLOCK_SIZE=block_size, BLOCK_N=block_n, HEAD_DIM=head_dim, DOT=dot,
        num_warps=num_warps, num_stages=num_stages)
    if compiled is not None:
        compiled["kernel"] = kernel
    return out


def reference_sums(k: torch.Tensor, v: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor
                   ) -> torch.Tensor:
    """PyTorch's [B, KVH, D] fp32 sums of each sequence's K and V rows."""
    bs, kvh, d = k.shape[1:]
    sums = []
    for b in range(seq_lens.shape[0]):
        n = int(seq_lens[b])
        rows = block_tables[b].long().repeat_interleave(bs)[:n] * bs + torch.arange(n, device=k.device) % bs
        sums.append(k.reshape(-1, kvh, d)[rows].float().sum(0) + v.reshape(-1, kvh, d)[rows].float().sum(0))
    return torch.stack(sums)


def contiguous_copy(k: torch.Tensor, v: torch.Tensor, block_tables: torch.Tensor):
    """The same caches and tables with the blocks renumbered in order of first use (a sequence's blocks
    consecutive, a group's shared prompt blocks once): (k, v, tables)."""
    order = list(dict.fromkeys(block_tables.flatten().tolist()))
    new_id = torch.zeros(k.shape[0], dtype=torch.long)
    new_id[torch.tensor(order)] = torch.arange(len(order))
    old = torch.tensor(order, device=k.device)
    return k[old].contiguous(), v[old].contiguous(), new_id.to(k.device)[block_tables.long()].to(torch.int32)


def _kernel_stats(kernel) -> dict:
    ttgir = kernel.asm.get("ttgir", "")
    return {"registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
            "shared_bytes": kernel.metadata.shared, "async_copies": ttgir.count("async_copy_global_to_local")}


def check(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    bs, kvh, d = 4, 2, 16
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # (fp32 products on a GPU would round to tf32)
    k, v = torch.randn(2, 9, bs, kvh, d, generator=g).to(device, dtype)
    tables = torch.tensor([[3, 1, 7], [3, 1, 2], [5, 0, 0]], dtype=torch.int32, device=device)
    lens = torch.tensor([11, 9, 3], dtype=torch.int32, device=device)
    want = reference_sums(k, v, tables, lens)
    for dot in (False, True):
        torch.testing.assert_close(gather(k, v, tables, lens, 16, 1, 1, dot=dot), want, atol=1e-3, rtol=1e-3)
    ck, cv, ct = contiguous_copy(k, v, tables)
    torch.testing.assert_close(gather(ck, cv, ct, lens, 16, 1, 1), want, atol=1e-3, rtol=1e-3)
    print("gather kernel: sums equal PyTorch's (in registers, by products, over renumbered blocks)")


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
    result = {"device": torch.cuda.get_device_name(),
              "copy_bandwidth_gbs": measure_copy_bandwidth(torch.device("cuda")) / 1e9, "shapes": []}
    default_config = tp._decode_config
    four_warps = dict(BLOCK_N=64, num_warps=4, num_stages=3)
    for name in args.shapes.split(","):
        batch, n, kvh, group, prompt, gen, d = SHAPES[name]
        if tp.choose_num_splits(batch, kvh, torch.device("cuda")) != 1:
            raise SystemExit(f"{name}: decode splits its contexts there; the gather kernels have no split axis")
        q, k, v, bt, lens = build(batch, n, kvh, group, prompt, gen, d)
        ck, cv, ct = contiguous_copy(k, v, bt)
        context = prompt + gen + 1
        row_bytes = kvh * d * 2 * 2  # K and V, bf16, per token
        all_bytes = batch * context * row_bytes
        distinct = (batch // n * prompt + batch * (context - prompt)) * row_bytes
        config = default_config(triton.next_power_of_2(d), max(16, triton.next_power_of_2(group)), q.dtype,
                                batch * kvh, tp.sm_count(q.device))
        flat = torch.empty(distinct // 2, dtype=torch.bfloat16, device="cuda")
        flat_out = torch.empty_like(flat)
        tiles = (config["BLOCK_N"], config["num_warps"], config["num_stages"])

        def attention(launch=None):
            tp._decode_config = default_config if launch is None else (lambda *_: launch)
            try:
                return tp.decode_attention(q, k, v, bt, lens, d ** -0.5)
            finally:
                tp._decode_config = default_config

        variants = {  # label: (call, Triton variant or None)
            "attention": (attention, None),
            "attention-4w": (lambda: attention(four_warps), None),
            "gather": (lambda c=None: gather(k, v, bt, lens, *tiles, compiled=c), True),
            "gather-dot": (lambda c=None: gather(k, v, bt, lens, *tiles, dot=True, compiled=c), True),
            "gather-4w": (lambda c=None: gather(k, v, bt, lens, 64, 4, 3, compiled=c), True),
            "gather-dot-4w": (lambda c=None: gather(k, v, bt, lens, 64, 4, 3, dot=True, compiled=c), True),
            "gather-contiguous": (lambda c=None: gather(ck, cv, ct, lens, *tiles, compiled=c), True),
            "copy": (lambda: flat_out.copy_(flat), None),
        }
        want = reference_sums(k, v, bt, lens)
        row = {"shape": name, "config": config, "distinct_bytes": distinct, "all_bytes": all_bytes}
        for label in list(variants) + ["attention-again"]:
            fn, triton_variant = variants["attention" if label == "attention-again" else label]
            entry = {}
            if triton_variant:
                compiled = {}
                torch.testing.assert_close(fn(compiled), want, atol=5e-2, rtol=1e-3)  # the sums are right
                entry.update(_kernel_stats(compiled["kernel"]))
            us = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3
            moved = 2 * distinct if label == "copy" else distinct
            entry.update(us=us, distinct_tbs=moved / us / 1e6,
                         all_tbs=None if label == "copy" else all_bytes / us / 1e6)
            row[label] = entry
            stats = "".join(f"  {key} {entry[key]}" for key in ("registers", "spills", "shared_bytes", "async_copies")
                            if key in entry)
            print(f"{name:18} {label:18} {us:8.1f} us  {moved / us / 1e6:5.2f} TB/s distinct"
                  + ("" if label == "copy" else f"  {all_bytes / us / 1e6:5.2f} TB/s all") + stats, flush=True)
        result["shapes"].append(row)
        Path(args.out, "kv_gather_probe.json").write_text(json.dumps(result, indent=1))  # a run cut short keeps it


if __name__ == "__main__":
    main()
