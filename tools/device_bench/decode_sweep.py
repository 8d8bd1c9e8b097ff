"""Time decode attention alone at a workload's shape over launch configurations (H200 tuning, not a test).

python tools/device_bench/decode_sweep.py --out DIR: B sequences in groups of n samples sharing a prompt of P
keys (forked: the same cache blocks), each with its own generated keys; the rl-7b (KVH 4, G 7) and rl-small
(KVH 2, G 7) shapes, bf16, block size 16, head dim 128. For each (BLOCK_N, num_warps, num_stages) of
_decode_config (patched) and each program order (_HEAD_FASTEST), triton.testing.do_bench's time and the read
rate of the whole contexts (the prompt counted once per sample); JSON in DIR/decode_sweep.json."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from rlserve.attention import triton_paged as tp

SHAPES = {  # name: (batch, n, kv_heads, group, prompt, generated so far)
    "7b-ctx786": (256, 8, 4, 7, 256, 530),
    "7b-ctx1100": (256, 8, 4, 7, 256, 844),
    "0.5b-ctx384": (512, 8, 2, 7, 128, 256),
}


def build(batch, n, kvh, group, prompt, gen, bs=16, d=128, dtype=torch.bfloat16):
    prompt_blocks, own = prompt // bs, -(-(gen + 1) // bs)
    num_blocks = 1 + (batch // n) * prompt_blocks + batch * own
    k = torch.randn(num_blocks, bs, kvh, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    order = torch.randperm(num_blocks - 1).add_(1).tolist()
    tables = []
    for _ in range(batch // n):
        shared = [order.pop() for _ in range(prompt_blocks)]
        tables += [shared + [order.pop() for _ in range(own)] for _ in range(n)]
    lens = torch.full((batch,), prompt + gen + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, kvh * group, d, device="cuda", dtype=dtype)
    return q, k, v, torch.tensor(tables, dtype=torch.int32, device="cuda"), lens


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp")
    args = parser.parse_args()
    rows = []
    default_config = tp._decode_config
    for name, shape in SHAPES.items():
        q, k, v, bt, lens = build(*shape)
        scale = 128 ** -0.5
        batch, kvh = shape[0], shape[2]
        read = batch * (shape[4] + shape[5] + 1) * kvh * 128 * 2 * 2
        ref = tp.decode_attention(q, k, v, bt, lens, scale)
        for head_fastest in (False, True):
            tp._HEAD_FASTEST = head_fastest
            assert torch.equal(tp.decode_attention(q, k, v, bt, lens, scale), ref)
            for bn, warps, stages in itertools.product([64, 128], [2, 4, 8], [2, 3]):
                tp._decode_config = lambda block_d, dtype, c=dict(BLOCK_N=bn, num_warps=warps, num_stages=stages): c
                try:
                    ms = triton.testing.do_bench(lambda: tp.decode_attention(q, k, v, bt, lens, scale),
                                                 warmup=10, rep=50)
                except Exception:  # e.g. out of shared memory
                    ms = None
                rows.append(dict(shape=name, head_fastest=head_fastest, BLOCK_N=bn, num_warps=warps,
                                 num_stages=stages, us=ms and ms * 1e3, tbps=ms and read / ms / 1e9))
            tp._decode_config = default_config
            ms = triton.testing.do_bench(lambda: tp.decode_attention(q, k, v, bt, lens, scale), warmup=10, rep=50)
            best = min((r for r in rows if r["shape"] == name and r["head_fastest"] == head_fastest and r["us"]),
                       key=lambda r: r["us"])
            print(f"{name} head_fastest={head_fastest}: default {ms * 1e3:.1f} us ({read / ms / 1e9:.2f} TB/s); "
                  f"best {best}", flush=True)
        tp._HEAD_FASTEST = False
    Path(args.out, "decode_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
