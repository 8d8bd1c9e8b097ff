"""Time decode attention alone at a workload's shape over launch configurations (H200 tuning, not a test).

python tools/device_bench/decode_sweep.py --out DIR: B sequences in groups of n samples sharing a prompt of P
keys (forked: the same cache blocks), each with its own generated keys; the rl-7b (KVH 4, G 7, head dim 128) and
rl-small (KVH 2, G 7, head dim 64) shapes, bf16, block size 16. For each (BLOCK_N, num_warps, num_stages) of
_decode_config (patched), triton.testing.do_bench's time and the read rate of the whole contexts (the prompt
counted once per sample); the default config is timed twice (first and last), so that the run's own drift shows
beside the differences between configs. JSON in DIR/decode_sweep.json."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from rlserve.attention import triton_paged as tp

SHAPES = {  # name: (batch, n, kv_heads, group, prompt, generated so far, head dim)
    "rl-7b-ctx786": (256, 8, 4, 7, 256, 530, 128),
    "rl-7b-ctx1100": (256, 8, 4, 7, 256, 844, 128),
    "rl-small-ctx384": (512, 8, 2, 7, 128, 256, 64),
}


def build(batch, n, kvh, group, prompt, gen, d, bs=16, dtype=torch.bfloat16):
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
    parser.add_argument("--prefetch", action="store_true",
                        help="also configs with PREFETCH_BLOCKS (block ids one tile ahead), at 3 to 5 stages")
    args = parser.parse_args()
    rows = []
    default_config = tp._decode_config
    for name, shape in SHAPES.items():
        q, k, v, bt, lens = build(*shape)
        head_dim = shape[6]
        scale = head_dim ** -0.5
        read = shape[0] * (shape[4] + shape[5] + 1) * shape[2] * head_dim * 2 * 2

        def bench(config=None, splits=None):
            tp._decode_config = default_config if config is None else (lambda block_d, dtype: config)
            try:
                ms = triton.testing.do_bench(lambda: tp.decode_attention(q, k, v, bt, lens, scale, num_splits=splits),
                                             warmup=10, rep=50)
            except Exception:  # e.g. out of shared memory
                ms = None
            finally:
                tp._decode_config = default_config
            return dict(shape=name, config=config or "default", splits=splits or "default", us=ms and ms * 1e3,
                        tbps=ms and read / ms / 1e9)

        rows.append(bench())
        for bn, warps, stages in itertools.product([32, 64, 128], [2, 4, 8], [2, 3]):
            rows.append(bench(dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)))
        if args.prefetch:
            for bn, warps, stages in itertools.product([32, 64], [2, 4], [3, 4, 5]):  # at 2 it changes nothing
                rows.append(bench(dict(BLOCK_N=bn, num_warps=warps, num_stages=stages, PREFETCH_BLOCKS=True)))
            # two splits: the rl shapes launch one program per (sequence, KV head), 1,024 at rl-7b for 132 SMs;
            # split in two, the last wave is a smaller share of the kernel
            for bn, stages in itertools.product([32, 64], [3, 4]):
                rows.append(bench(dict(BLOCK_N=bn, num_warps=4, num_stages=stages, PREFETCH_BLOCKS=True), splits=2))
        rows.append(bench())
        mine = [r for r in rows if r["shape"] == name]
        best = min((r for r in mine if r["us"]), key=lambda r: r["us"])
        print(f"{name}: default {mine[0]['us']:.1f} us, again at the end {mine[-1]['us']:.1f} us; best {best}",
              flush=True)
        fetched = [r for r in mine if r["us"] and isinstance(r["config"], dict) and r["config"].get("PREFETCH_BLOCKS")]
        if fetched:
            print(f"{name}: best with the prefetch {min(fetched, key=lambda r: r['us'])}", flush=True)
        # after each shape: a run cut short keeps what it measured
        Path(args.out, "decode_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
